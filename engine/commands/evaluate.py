"""``nba evaluate``: the off-policy estimate of a candidate (a model version, arbitration weights, a rule
set's catalog values) from the recorded decisions and responses (``engine.analytics.evaluate``); the same
estimate ``nba models promote`` shows and gates on, and ``nba rules diff`` shows."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.commands.common import archive_for, config_for, domain_schema, open_store
from engine.commands.options import archive_option, paths, range_options
from engine.config import Config
from engine.errors import NbaError

if TYPE_CHECKING:
    from engine.models.registry import LoadedModel
    from engine.rules.model import RuleSet


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="off-policy: what a candidate model, weights or rule set would have earned "
                       "on the recorded decisions (IPS, SNIPS, DR)")
    paths(p)
    range_options(p, "decision")
    archive_option(p)
    p.add_argument("--model", metavar="VERSION", help="the candidate's model (default: the champion)")
    p.add_argument("--weight", action="append", default=[], metavar="KEY=X",
                   help="multiply the priority of an action id, group or type by X (repeatable)")
    p.add_argument("--candidate-rules", metavar="DIR", help="rank with this rule directory's catalog values "
                   "(eligibility and levers stay as logged; a catalog with new actions is refused)")
    p.add_argument("--window-days", type=float, default=7.0, help="an acceptance counts this long after the "
                   "decision (default 7, as training's label window)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_evaluate)


def _weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise NbaError(f"--weight {item!r}: expected KEY=NUMBER (an action id, group or type)") from None
        if not sep or not key.strip() or not out[key.strip()] >= 0:
            raise NbaError(f"--weight {item!r}: expected KEY=NUMBER with a number of 0 or more")
    return out


def _ruleset(rules_dir: Path) -> RuleSet:
    from engine.rules.loader import load_rules

    ruleset, errors = load_rules(rules_dir)
    if ruleset is None:
        raise NbaError(f"{rules_dir}: " + "; ".join(str(e) for e in errors[:3]))
    return ruleset


def candidate_values(rules_dir: Path, live: RuleSet) -> dict[str, float]:
    """The catalog values of the rule set in ``rules_dir``; refused when it adds actions the logs never saw."""
    ruleset = _ruleset(rules_dir)
    new = sorted(set(ruleset.by_id) - set(live.by_id))
    if new:
        raise NbaError(f"{rules_dir} adds action(s) {', '.join(new)}: the recorded decisions never had them as "
                       "candidates, so nothing can be estimated for them (try them on a share of traffic instead)")
    return {a.id: a.value for a in ruleset.actions}


def off_policy(cfg: Config, store: Any, candidates: list[tuple[str, LoadedModel | None, dict[str, float],
                                                                  dict[str, float] | None]],
               since: str = "-", until: str = "+", archive: Path | str | None = None, window_days: float = 7.0,
               rules_dir: Path | None = None) -> dict:
    """Evaluate ``candidates`` (name, model or None for the champion, weights, catalog values) with the
    champion's greedy policy first (the baseline) on the decisions recorded in the range, under the rule
    set of ``rules_dir`` (default: the configured one, the rules that decided)."""
    from engine.analytics.evaluate import Candidate, evaluate, read_logged
    from engine.models.registry import ModelRegistry

    schema = domain_schema(cfg)
    ruleset = _ruleset(rules_dir or cfg.rules_dir)
    champion = ModelRegistry(cfg.models_dir, schema).load()
    logged = read_logged(store.client, schema, ruleset, archive, since, until, window_days)
    chosen = [Candidate("champion", champion)] + [
        Candidate(name, model or champion, weights, values) for name, model, weights, values in candidates]
    return evaluate(logged, chosen, champion, schema, ruleset)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from engine.analytics.evaluate import format_evaluation
    from engine.models.registry import ModelRegistry

    cfg = config_for(args)
    weights = _weights(args.weight)
    model = ModelRegistry(cfg.models_dir, domain_schema(cfg)).load(args.model) if args.model else None
    values = candidate_values(Path(args.candidate_rules), _ruleset(cfg.rules_dir)) if args.candidate_rules else None
    candidates = [("candidate", model, weights, values)] if (model or weights or values is not None) else []
    with open_store(cfg) as store:
        result = off_policy(cfg, store, candidates, args.since, args.until, archive_for(args, cfg), args.window_days)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))
    return 0


def promotion_estimate(cfg: Config, version: str, days: float) -> dict:
    """The estimate of ``version`` against the champion over the last ``days`` of recorded decisions (the
    data directory's archive when there is one), for ``nba models promote``."""
    from engine.models.registry import ModelRegistry

    model = ModelRegistry(cfg.models_dir, domain_schema(cfg)).load(version)
    since = str(int((time.time() - days * 86_400) * 1000))
    archive = archive_for(argparse.Namespace(archive=None, no_archive=False), cfg)
    with open_store(cfg) as store:
        return off_policy(cfg, store, [(version, model, {}, None)], since, "+", archive)
