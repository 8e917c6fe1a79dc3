"""The ``nba`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.config import Config
from engine.features import CHANNELS


def _config(args: argparse.Namespace) -> Config:
    cfg = Config()
    for name in ("redis_url", "data_dir", "rules_dir", "models_dir"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, Path(value) if name.endswith("_dir") else value)
    return cfg


@contextmanager
def _store(cfg: Config) -> Iterator:
    """A ProfileStore on REDIS_URL, else on the Redis of a running ``nba serve`` with the same data
    directory, else on an embedded server started for this command."""
    from engine.redis_embedded import DataDirInUse, EmbeddedRedis
    from engine.store import ProfileStore

    embedded = None
    url = cfg.redis_url
    if url is None:
        try:
            embedded = EmbeddedRedis(cfg.data_dir / "redis").start()
            url = embedded.url
        except DataDirInUse as busy:
            url = busy.url
    store = ProfileStore.from_url(url)
    try:
        yield store
    finally:
        store.client.close()
        if embedded:
            embedded.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.serve import serve

    cfg = _config(args)
    cfg.grpc_address = args.address
    cfg.metrics_host, cfg.metrics_port = args.metrics_host, args.metrics_port
    cfg.demo_customers = args.customers
    cfg.demo = not args.no_demo
    cfg.workers = args.workers
    cfg.rules_watch_seconds = args.watch_rules
    return serve(cfg)


def cmd_loadtest(argv: list[str]) -> int:
    """Runs loadtest/loadgen.py with the rest of the command line (its own --help)."""
    import runpy

    from engine.config import REPO

    script = REPO / "loadtest" / "loadgen.py"
    sys.argv = ["nba loadtest", *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from engine import demo

    cfg = _config(args)
    with _store(cfg) as store:
        seconds = demo.seed(store, args.customers, args.world_seed)
    print(f"seeded {args.customers} customers (C0000000..C{args.customers - 1:07d}) in {seconds:.1f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from engine import demo
    from engine.registry import ModelRegistry
    from engine.rules.check import load_and_compile

    cfg = _config(args)
    rules = load_and_compile(cfg.rules_dir)
    try:
        registry = ModelRegistry(cfg.models_dir)
        version, metrics = demo.train_demo(registry, rules.ruleset.actions, args.customers, args.world_seed,
                                           args.rounds, promote=not args.no_promote)
    finally:
        rules.close()
    print(f"model {version} in {registry.dir / version}{' (champion)' if not args.no_promote else ''}")
    for k, v in metrics.items():
        print(f"  {k:30} {v}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    import grpc

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.server import CHANNEL_TO_PB

    context = dict(kv.split("=", 1) for kv in args.context)
    request = pb.DecideRequest(customer_id=args.customer_id, channel=CHANNEL_TO_PB[args.channel],
                               touchpoint=args.touchpoint, context=context,
                               max_actions=args.max_actions, explain=args.explain)
    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = pb_grpc.DecisionServiceStub(channel).Decide(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(reply), indent=2))
        return 0
    print(format_decision(reply))
    return 0


def format_decision(reply) -> str:
    from engine.api.nba.v1 import nba_pb2 as pb

    lines = [
        f"decision {reply.decision_id}  ruleset {reply.ruleset_version}  model {reply.model_version}"
        + ("  DEGRADED" if reply.degraded else "") + ("  cold start" if reply.cold_start else ""),
    ]
    if reply.situations:
        lines.append("situations: " + ", ".join(reply.situations))
    header = f"{'#':>2}  {'action':28} {'type':12} {'propensity':>10} {'value':>8} {'priority':>9}  reasons"
    lines += [header, "-" * len(header)]
    for a in reply.actions:
        type_name = pb.ActionType.Name(a.type).removeprefix("ACTION_TYPE_").lower()
        lines.append(f"{a.rank:>2}  {a.action_id:28} {type_name:12} {a.propensity:>10.4f} {a.value:>8.2f} "
                     f"{a.priority:>9.3f}  {'; '.join(a.reasons)}")
    for f in reply.funnel:
        lines.append(f"    funnel {f.action_id:28} {f.stage:13} {f.detail}")
    return "\n".join(lines)


def cmd_rules_check(args: argparse.Namespace) -> int:
    from engine.rules.check import check

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    errors = check(rules_dir)
    for e in errors:
        print(e.render())
    if errors:
        print(f"{len(errors)} error(s) in {rules_dir}", file=sys.stderr)
        return 1
    print(f"{rules_dir}: ok")
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    from engine.rules.check import test

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    rules, errors, results = test(rules_dir)
    if rules is not None:
        rules.close()
    for e in errors:
        print(e.render())
    if errors:
        print(f"{len(errors)} error(s) in {rules_dir}; no test ran", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.passed]
    for r in results:
        if args.verbose_tests or not r.passed:
            print(r.render())
    summary = f"{len(results)} rule tests: {len(results) - len(failed)} passed, {len(failed)} failed"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def cmd_rules_diff(args: argparse.Namespace) -> int:
    from engine.registry import ModelRefused, ModelRegistry
    from engine.rules.check import RuleErrors, test
    from engine.whatif import load_pair, sample_customers, what_if

    cfg = _config(args)
    try:
        model = ModelRegistry(cfg.models_dir).load()
    except ModelRefused as exc:
        print(f"error: {exc} (nba train makes one)", file=sys.stderr)
        return 1
    try:
        old, new = load_pair(Path(args.old_dir), Path(args.new_dir))
    except RuleErrors as exc:
        for e in exc.errors:
            print(e.render())
        print(f"{len(exc.errors)} error(s): nothing compared", file=sys.stderr)
        return 1
    try:
        with _store(cfg) as store:
            customers = sample_customers(store, args.customers)
            if not customers:
                print("error: no stored customers (nba seed writes the demo ones)", file=sys.stderr)
                return 1
            report = what_if(store, model, old, new, customers, args.channel or ["web"], args.examples)
    finally:
        old.close()
        new.close()
    if args.json:
        print(json.dumps(report.as_dict(args.examples), indent=2))
    else:
        print(report.render(args.examples))
    rules, _, results = test(Path(args.new_dir))
    if rules is not None:
        rules.close()
    failed = [r for r in results if not r.passed]
    if failed:
        print(f"note: {len(failed)} of {len(results)} rule tests fail under {args.new_dir} "
              "(nba rules test shows them); it would be refused live", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine.registry import ModelRefused, ModelRegistry

    registry = ModelRegistry(_config(args).models_dir)
    if args.models_cmd == "promote":
        try:
            registry.promote(args.version)
        except ModelRefused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 1
        print(f"{args.version} is the champion")
        return 0
    champion = registry.champion()
    for version in registry.versions():
        m = registry.metrics(version).get("metrics", {})
        mark = "*" if version == champion else " "
        print(f"{mark} {version}  auc {m.get('holdout_auc', '?')}  logloss {m.get('holdout_logloss', '?')}  "
              f"rank-corr-with-truth {m.get('rank_correlation_with_truth', '?')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nba", description="Next-best-action decision service")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", help="use this Redis instead of the embedded one (env REDIS_URL)")
        p.add_argument("--data-dir", help="embedded Redis data directory (default .nba-data)")
        p.add_argument("--rules-dir", help="rule files (default ./rules)")
        p.add_argument("--models-dir", help="model registry (default ./models)")

    p = sub.add_parser("serve", help="run the gRPC service (embedded Redis unless REDIS_URL is set)")
    paths(p)
    p.add_argument("--address", default="127.0.0.1:50051", help="gRPC listen address")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: off)")
    p.add_argument("--customers", type=int, default=20_000, help="demo customers to seed when none exist")
    p.add_argument("--no-demo", action="store_true", help="do not seed demo data or train a demo model")
    p.add_argument("--watch-rules", type=float, default=1.0, metavar="SECONDS",
                   help="check the rule files for changes this often and reload them (0: only on ReloadRules)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="serving processes on the one port (default: number of cores)")
    p.set_defaults(fn=cmd_serve)

    sub.add_parser("loadtest", help="open-loop gRPC load test: nba loadtest --help", add_help=False)

    p = sub.add_parser("seed", help="write the synthetic demo customer base to Redis")
    paths(p)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--world-seed", type=int, default=7)
    p.set_defaults(fn=cmd_seed)

    p = sub.add_parser("train", help="train a propensity model on simulated responses")
    paths(p)
    p.add_argument("--customers", type=int, default=50_000)
    p.add_argument("--world-seed", type=int, default=7)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--no-promote", action="store_true", help="store the model without making it champion")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("decide", help="ask a running server for a decision and print it")
    p.add_argument("customer_id")
    p.add_argument("--channel", default="web", choices=CHANNELS)
    p.add_argument("--touchpoint", default="")
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-actions", type=int, default=0)
    p.add_argument("--explain", action="store_true", help="show where every catalog action dropped out")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_decide)

    rules = sub.add_parser("rules", help="rule file tools").add_subparsers(dest="rules_cmd", required=True)
    p = rules.add_parser("check", help="parse and type-check the rule files; lists every error")
    p.add_argument("dir", nargs="?")
    p.set_defaults(fn=cmd_rules_check)
    p = rules.add_parser("test", help="run the rule tests in DIR/tests/*.yaml; lists every failure")
    p.add_argument("dir", nargs="?")
    p.add_argument("-v", dest="verbose_tests", action="store_true", help="list the tests that pass too")
    p.set_defaults(fn=cmd_rules_test)
    p = rules.add_parser("diff", help="what-if: decide for stored customers under two rule sets and compare")
    p.add_argument("old_dir", help="the rules in use, e.g. rules")
    p.add_argument("new_dir", help="the changed rules, e.g. a copy you edited")
    p.add_argument("--customers", type=int, default=2000, help="how many stored customers to decide for")
    p.add_argument("--channel", action="append", choices=CHANNELS, help="channel(s) to decide on (default web)")
    p.add_argument("--examples", type=int, default=10, help="customers to show whose top action changed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--redis-url", help="use this Redis instead of the embedded one (env REDIS_URL)")
    p.add_argument("--data-dir", help="embedded Redis data directory (default .nba-data)")
    p.add_argument("--models-dir", help="model registry (default ./models)")
    p.set_defaults(fn=cmd_rules_diff)

    p = sub.add_parser("models", help="model registry")
    p.add_argument("--models-dir")
    models = p.add_subparsers(dest="models_cmd", required=True)
    models.add_parser("list", help="versions and holdout metrics; * marks the champion").set_defaults(fn=cmd_models)
    p = models.add_parser("promote", help="make VERSION the champion")
    p.add_argument("version")
    p.set_defaults(fn=cmd_models)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        return cmd_loadtest(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.rules.errors import RuleErrors

    try:
        return args.fn(args)
    except RuleErrors as exc:  # rules that do not load, compile or pass their tests: say where
        for e in exc.errors:
            print(e.render(), file=sys.stderr)
        print(f"{len(exc.errors)} error(s) in the rules", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
