"""``nba models``: the model registry's versions and their holdout metrics (``list``, ``show``) and the
champion (``promote``)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from engine.commands.common import audit_by_user, config_for, domain_schema
from engine.commands.options import redis_options
from engine.config import Config

if TYPE_CHECKING:
    from engine.models.registry import ModelRegistry


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model registry")
    p.add_argument("--models-dir")
    models = p.add_subparsers(dest="models_cmd", required=True)
    p = models.add_parser("list", help="versions and holdout metrics; * marks the champion")
    p.set_defaults(fn=cmd_models)
    p.add_argument("--models-dir", default=argparse.SUPPRESS, help="model registry (default ./models)")
    p = models.add_parser("show", help="a version's metrics: per action type, calibration, training data")
    p.add_argument("version")
    p.add_argument("--models-dir", default=argparse.SUPPRESS, help="model registry (default ./models)")
    p.set_defaults(fn=cmd_models)
    p = models.add_parser("promote", help="make VERSION the champion (running servers switch within a second); shows "
                          "its off-policy estimate against the champion, and refuses it where experiment.yaml's "
                          "promotion gate says so")
    p.add_argument("version")
    redis_options(p)
    p.add_argument("--rules-dir", help="rule files (default ./rules)")
    p.add_argument("--models-dir", default=argparse.SUPPRESS, help="model registry (default ./models)")
    p.add_argument("--force", action="store_true", help="promote even when the gate refuses (audited)")
    p.set_defaults(fn=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from engine.models.registry import ModelRegistry

    cfg = config_for(args)
    registry = ModelRegistry(cfg.models_dir, domain_schema(cfg))
    if args.models_cmd == "promote":
        # the estimate needs the recorded decisions: a Redis given, or the data directory's embedded one
        evaluate = bool(cfg.redis_url or args.data_dir or (cfg.data_dir / "redis").is_dir())
        return _promote(cfg, registry, args.version, args.force, evaluate)
    if args.models_cmd == "show":
        return _show(registry, args.version)
    return _list(registry)


def _promote(cfg: Config, registry: ModelRegistry, version: str, force: bool = False, evaluate: bool = True) -> int:
    from engine.analytics.evaluate import format_evaluation
    from engine.commands.evaluate import promotion_estimate
    from engine.errors import NbaError
    from engine.models.experiment import ExperimentError, read_experiment
    from engine.models.registry import ModelRefused

    try:
        gate = read_experiment(registry).promotion
    except ExperimentError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    versus, size, why = None, None, ""
    if (evaluate or gate.require != "none") and version != registry.champion() and version in registry.versions():
        try:
            result = promotion_estimate(cfg, version, gate.days)
            print(format_evaluation(result))
            entry = result["candidates"][-1]
            versus, size = entry.get("versus_champion"), entry.get("effective_sample_size")
        except NbaError as exc:
            why = str(exc)
            print(f"no off-policy estimate: {exc}", file=sys.stderr)
    refusal = None if version == registry.champion() else gate.verdict(versus, size)
    if refusal is not None:
        refusal = f"promotion gate ({gate.require}): {refusal}" + (f" ({why})" if why and versus is None else "")
        if not force:
            audit_by_user(cfg, "model_promotion_refused", model=version, reason=refusal)
            print(f"refused: {refusal}; --force promotes anyway", file=sys.stderr)
            return 1
        print(f"warning: {refusal}; promoted anyway (--force)", file=sys.stderr)
    try:
        registry.promote(version)
    except ModelRefused as exc:
        audit_by_user(cfg, "model_promotion_refused", model=version, reason=str(exc))
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    audit_by_user(cfg, "model_promoted", model=version, **({"gate_overridden": refusal} if refusal else {}))
    print(f"{version} is the champion")
    return 0


def _show(registry: ModelRegistry, version: str) -> int:
    from engine.models.training import format_metrics

    if version not in registry.versions():
        print(f"no model {version} in {registry.dir}", file=sys.stderr)
        return 1
    saved = registry.metrics(version)
    print(f"{version}: " + ", ".join(f"{k} {v}" for k, v in saved.get("training", {}).items()
                                     if not isinstance(v, (dict, list))))
    print(format_metrics(saved.get("metrics", {})))
    organic = saved.get("organic")
    if organic:
        print("\norganic model (uplift arbitration: P(take | not shown)): " + ", ".join(
            f"{k} {v}" for k, v in organic.get("training", {}).items() if not isinstance(v, (dict, list))))
        print(format_metrics(organic.get("metrics", {})))
    return 0


def _list(registry: ModelRegistry) -> int:
    from engine.models.experiment import ExperimentError, read_experiment

    champion = registry.champion()
    try:
        challenger = read_experiment(registry).challenger
    except ExperimentError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        challenger = None
    print("* champion, c challenger (experiment.yaml), ! cannot go live")
    for version in registry.versions():
        saved = registry.metrics(version)
        m, t = saved.get("metrics", {}), saved.get("training", {})
        mark = "*" if version == champion else "c" if challenger and version == challenger.version else " "
        problem = registry.problem(version)
        print(f"{mark}{'!' if problem else ' '} {version}  auc {m.get('holdout_auc', '?')}  "
              f"logloss {m.get('holdout_logloss', '?')}  rank-corr-with-truth {m.get('rank_correlation_with_truth', '-')}  "
              f"rows {t.get('rows', '?')}  source {t.get('source', '?')}" + (f"  ({problem})" if problem else ""))
    return 0
