"""``nba seed`` (synthetic customers of the rule directory's domain), ``nba train`` (a propensity model
from the synthetic world, the recorded decisions, a file or past offers) and ``nba simulate`` (the
synthetic world played on a private Redis)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from engine.commands.common import archive_for, config_for, domain_schema, open_store
from engine.commands.options import archive_option, paths, range_options
from engine.config import Config

if TYPE_CHECKING:
    from engine.features import FeatureSchema
    from engine.models.training import TrainingSet
    from engine.rules.model import RuleSet
    from engine.rules.runtime import CompiledRules
    from engine.store.profiles import ProfileStore


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seed", help="write synthetic demo customers of the rule directory's domain.yaml to Redis")
    paths(p)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--world-seed", type=int, default=7)
    p.add_argument("--decisions", type=int, default=0, metavar="N", help="then play N one-action decisions of demo "
                   "traffic through the real funnel (the live models and experiment.yaml), each answered as the "
                   "synthetic customer would: the data nba evaluate reads (telco demo only)")
    p.set_defaults(fn=cmd_seed)
    _train_parser(sub)
    _simulate_parser(sub)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a propensity model (synthetic world, recorded streams or a file)")
    paths(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from-stream", "--from-recorded", dest="from_stream", action="store_true",
                        help="recorded decisions joined with their responses (the archive plus the streams' tails)")
    source.add_argument("--from-file", metavar="FILE", help="a training set written by --export")
    source.add_argument("--from-history", metavar="FILE", help="past offers and outcomes (as nba import history "
                        "reads them) on the customers' stored profiles")
    p.add_argument("--window-days", type=float, default=7.0,
                   help="label window: an acceptance within it is positive; later, no acceptance is negative")
    p.add_argument("--as-of", type=float, help="epoch seconds that closes label windows (default: now)")
    p.add_argument("--uplift", action="store_true",
                   help="--from-stream: also train the organic model of uplift arbitration (what customers take "
                   "without being shown it: exploring decisions' candidates joined with offer_accepted events)")
    p.add_argument("--export", metavar="FILE", help="also write the training set to FILE (CSV; .gz compresses)")
    p.add_argument("--export-only", action="store_true", help="write --export and stop")
    p.add_argument("--campaign", action="append", metavar="NAME",
                   help="--from-stream: only rows of actions presented for this campaign (repeat for several; "
                   "'-' for actions of no campaign)")
    p.add_argument("--campaign-weight", action="append", metavar="NAME=WEIGHT",
                   help="--from-stream: weigh the rows of a campaign's actions (e.g. fibre_migration=3; '-' for none)")
    range_options(p, "recorded decision (--from-stream)")
    archive_option(p)
    p.add_argument("--customers", type=int, default=50_000, help="synthetic world: customers")
    p.add_argument("--world-seed", type=int, default=7)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--no-promote", action="store_true",
                   help="store the model only (default: promote it unless the champion does better on the same holdout)")
    p.set_defaults(fn=cmd_train)


def _simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="play the synthetic world on a private Redis: NBA vs rules-only, generic, "
                       "random, and oracles under the same and under no contact limits")
    paths(p)
    p.add_argument("--world", choices=("realistic", "uplift", "ideal"), default="realistic",
                   help="realistic (unobserved traits, fatigue, holdings, late responses, drift, new actions), uplift "
                   "(realistic plus sure things, sleeping dogs and organic purchases) or ideal")
    p.add_argument("--customers", type=int, default=1000, help="evaluated customers (the same for every policy)")
    p.add_argument("--rounds", type=int, default=8, help="rounds (simulated days)")
    p.add_argument("--seeds", type=int, default=5, help="world seeds (mean and 95%% CI over them)")
    p.add_argument("--seed", type=int, default=11, help="first world seed")
    p.add_argument("--history-customers", type=int, default=10_000,
                   help="customers of the other population whose recorded traffic trains the model")
    p.add_argument("--history-days", type=int, default=7, help="days of that recorded traffic")
    p.add_argument("--no-retrain", action="store_true", help="keep the starting model (default: retrain nightly "
                   "on the history plus the decisions and responses recorded in the run)")
    p.add_argument("--explore", type=float, default=0.1, help="share of nba decisions that explore (0: off); with "
                   "--off-policy, the logging policy's epsilon per slot")
    p.add_argument("--off-policy", action="store_true", help="instead: check nba evaluate's estimators against the "
                   "truth (one logged day per seed, five candidate policies; engine/sim/offpolicy_check.py)")
    p.add_argument("--trees", type=int, default=100, help="boosting rounds per training")
    p.add_argument("--policies", nargs="+", metavar="POLICY",
                   help="only these policies (nba rules_only generic random_eligible constrained_oracle oracle; "
                   "the uplift world also nba_uplift uplift_oracle, and plays nba nba_uplift rules_only "
                   "constrained_oracle uplift_oracle by default)")
    p.add_argument("--campaign", metavar="FILE", help="a campaign file: plan it on the evaluated customers (traffic "
                   "and model from the history), then play it over the simulated days; reports plan vs presented")
    p.add_argument("--json", action="store_true", help="one JSON object keyed by policy, plus world, seeds, model")
    p.add_argument("--png", metavar="FILE", help="learning curves: value per 1,000 decisions per round")
    p.add_argument("--progress", dest="verbose_progress", action="store_true", help="progress on stderr")
    p.set_defaults(fn=cmd_simulate)


def cmd_seed(args: argparse.Namespace) -> int:
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules
    from engine.sim import demo

    cfg = config_for(args)
    ruleset, errors = load_rules(cfg.rules_dir)
    if ruleset is None:
        raise RuleErrors(errors)
    with open_store(cfg) as store:  # the telco demo's world, or customers generated for the declared domain
        seconds = demo.seed_for(store, ruleset, args.customers, args.world_seed)
        print(f"seeded {args.customers} customers (C0000000..C{args.customers - 1:07d}) in {seconds:.1f}s")
        if args.decisions > 0:
            if not demo.is_telco(ruleset):
                print("error: --decisions plays the telco demo's synthetic world", file=sys.stderr)
                return 1
            from engine.models.registry import ModelRegistry

            started = time.perf_counter()
            played = demo.play_traffic(store, cfg.rules_dir, ModelRegistry(cfg.models_dir, domain_schema(cfg)),
                                       args.decisions, args.customers, args.world_seed)
            print(f"played {played['decisions']:,} decisions ({played['accepted']:,} accepted) in "
                  f"{time.perf_counter() - started:.1f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from engine.models import training
    from engine.rules.runtime import load_and_compile

    cfg = config_for(args)
    if args.uplift and not args.from_stream:
        print("error: --uplift trains from recorded decisions and events: add --from-stream", file=sys.stderr)
        return 2
    rules = load_and_compile(cfg.rules_dir)
    organic = None
    try:
        data = _training_set(args, cfg, rules)
        if data is not None and args.uplift:
            organic = _organic_rows(args, cfg, rules, list(data.actions))
    finally:
        rules.close()
    if data is None:
        return 1
    if organic is not None:
        print("organic rows: " + ", ".join(f"{k} {v}" for k, v in organic.summary.items()
                                           if not isinstance(v, (dict, list))) + f"; {len(organic)} labelled rows")
    print("training set: " + ", ".join(f"{k} {v}" for k, v in data.summary.items()
                                       if not isinstance(v, (dict, list))) + f"; {len(data)} labelled rows")
    if args.export:
        print(f"exported {training.export_csv(data, args.export)} rows to {args.export}")
    if args.export_only:
        return 0
    return _train_and_register(args, cfg, rules.schema, data, organic)


def _organic_rows(args: argparse.Namespace, cfg: Config, rules: CompiledRules, levels: list[str]) -> TrainingSet:
    """``nba train --from-stream --uplift``: the untreated arm (``training_rows``' organic rows)."""
    from engine.analytics.training_rows import from_streams

    with open_store(cfg) as store:
        return from_streams(store.client, rules.schema, levels, args.window_days, args.as_of,
                            archive=archive_for(args, cfg), since=args.since, until=args.until, arm="organic",
                            actions={a.id: (a.type, a.value) for a in rules.ruleset.actions})


def _training_set(args: argparse.Namespace, cfg: Config, rules: CompiledRules) -> TrainingSet | None:
    """The rows ``nba train``'s source option names; None after printing why there are none."""
    from engine.models import training

    catalog = [a.id for a in rules.ruleset.actions]
    if args.from_stream:
        with open_store(cfg) as store:
            weights = _campaign_weights(args.campaign_weight or [])
            if weights is None:
                return None
            return _recorded_training_rows(args, cfg, store, rules.schema, catalog, weights)
    if args.from_file:
        return training.read_csv(args.from_file, rules.schema, catalog)
    if args.from_history:
        return _past_offer_rows(args, cfg, rules.ruleset)
    return _synthetic_rows(args, cfg, rules.ruleset)


def _campaign_weights(items: list[str]) -> dict[str, float] | None:
    """--campaign-weight NAME=WEIGHT, each; None after printing the one that is not."""
    weights = {}
    for item in items:
        name, _, w = item.partition("=")
        try:
            weights[name] = float(w)
        except ValueError:
            print(f"error: --campaign-weight {item}: expected NAME=WEIGHT", file=sys.stderr)
            return None
    return weights


def _recorded_training_rows(args: argparse.Namespace, cfg: Config, store: ProfileStore, schema: FeatureSchema,
                            catalog: list[str], weights: dict[str, float]) -> TrainingSet:
    """``nba train --from-stream``: the rows of the decisions recorded from --since to --until (the archive
    plus the streams' tails), assembled in DuckDB."""
    from engine.analytics.training_rows import from_streams

    return from_streams(store.client, schema, catalog, args.window_days, args.as_of, campaigns=args.campaign or (),
                        campaign_weights=weights, archive=archive_for(args, cfg), since=args.since, until=args.until)


def _past_offer_rows(args: argparse.Namespace, cfg: Config, ruleset: RuleSet) -> TrainingSet:
    """``nba train --from-history FILE``: past offers and outcomes on the customers' stored profiles."""
    from engine.analytics.past import read_past, training_set

    now = time.time()
    past = read_past(args.from_history, ruleset, now)
    if past.rejected:
        print(past.render(), file=sys.stderr)
    with open_store(cfg) as store:
        return training_set(store, ruleset, past.offers, now)


def _synthetic_rows(args: argparse.Namespace, cfg: Config, ruleset: RuleSet) -> TrainingSet | None:
    """The telco demo's synthetic world's responses; None (said why) for a rule directory of another business."""
    from engine.sim.demo import is_telco
    from engine.sim.training_data import simulate_responses
    from engine.sim.world import generate

    if not is_telco(ruleset):
        print(f"error: the synthetic world is the telco demo's; {cfg.rules_dir}/domain.yaml declares another "
              "business: train --from-history FILE or --from-stream", file=sys.stderr)
        return None
    return simulate_responses(generate(args.customers, args.world_seed), ruleset.actions)


def _train_and_register(args: argparse.Namespace, cfg: Config, schema: FeatureSchema, data: TrainingSet,
                        organic: TrainingSet | None = None) -> int:
    """Train on ``data``, store the model and promote it unless --no-promote or the champion does better."""
    from engine.models import training
    from engine.models.registry import ModelRegistry

    registry = ModelRegistry(cfg.models_dir, schema)
    try:
        version, metrics, promoted = training.train_and_register(
            registry, data, args.rounds, promote="never" if args.no_promote else "if-better", organic=organic)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status = "champion" if promoted else "stored, not promoted" + (
        "" if args.no_promote else ": the champion did better on the same holdout (nba models promote to override)")
    print(f"model {version} in {registry.dir / version} ({status})")
    print(training.format_metrics(metrics))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Runs on a redis-server of its own (``engine.sim.simulate.private_store``), never on REDIS_URL's."""
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules
    from engine.sim.simulate import POLICIES, UPLIFT_POLICIES, Settings, format_simulation, plot_curves, simulate, table

    cfg = config_for(args)
    campaign = ""
    if args.campaign:
        from engine.analytics.campaign_plan import what_if_rules

        live, planned, found = what_if_rules(cfg.rules_dir, Path(args.campaign))
        ruleset, campaign = planned.ruleset, found.name
        live.close()
        planned.close()
        print(f"campaign {campaign} runs over the {args.rounds} simulated days (its own dates are "
              f"{found.describe_dates()}); plan first, then play", file=sys.stderr)
    else:
        loaded, errors = load_rules(cfg.rules_dir)
        if loaded is None:
            raise RuleErrors(errors)
        ruleset = loaded
    progress = (lambda msg: print(msg, file=sys.stderr)) if args.verbose_progress else (lambda msg: None)
    if args.off_policy:
        from engine.sim.offpolicy_check import CheckSettings, check, format_check

        result = check(ruleset, CheckSettings(world=args.world, seeds=tuple(range(args.seed, args.seed + args.seeds)),
                                              customers=args.customers, history_customers=args.history_customers,
                                              history_days=args.history_days, trees=args.trees,
                                              epsilon=args.explore), progress)
        print(json.dumps(result, indent=2) if args.json else format_check(result))
        return 0
    settings = Settings(world=args.world, customers=args.customers, rounds=args.rounds,
                        seeds=tuple(range(args.seed, args.seed + args.seeds)),
                        history_customers=args.history_customers, history_days=args.history_days,
                        retrain=not args.no_retrain, explore=args.explore, trees=args.trees,
                        policies=tuple(args.policies) if args.policies
                        else UPLIFT_POLICIES if args.world == "uplift" else POLICIES, campaign=campaign)
    sim = simulate(ruleset, settings, progress=progress)
    if args.png:
        plot_curves(sim, args.png)
        print(f"learning curves: {args.png}", file=sys.stderr)
    print(json.dumps(table(sim), indent=2) if args.json else format_simulation(sim))
    return 0
