"""``nba rules``: check the rule files, ask a running service whether it took them (``status``), run
their tests, and compare two rule sets on stored customers (``diff``, the what-if)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.commands.common import config_for, live_model, open_store, rpc, rule_errors
from engine.commands.options import client_options, redis_options
from engine.config import Config

if TYPE_CHECKING:
    from engine.rules.model import RuleSet


def register(sub: argparse._SubParsersAction) -> None:
    rules = sub.add_parser("rules", help="rule file tools").add_subparsers(dest="rules_cmd", required=True)
    p = rules.add_parser("check", help="parse and type-check the rule files; lists every error")
    p.add_argument("dir", nargs="?")
    p.set_defaults(fn=cmd_rules_check)
    p = rules.add_parser("status", help="ask the running service whether it took the rule files on disk: live, "
                         "refused (with its errors) or not yet picked up (exit 0, 1, 2)")
    p.add_argument("dir", nargs="?", help="the rule files to compare (default ./rules)")
    client_options(p)
    p.set_defaults(fn=cmd_rules_status)
    p = rules.add_parser("test", help="run the rule tests in DIR/tests/*.yaml; lists every failure")
    p.add_argument("dir", nargs="?")
    p.add_argument("-v", dest="verbose_tests", action="store_true", help="list the tests that pass too")
    p.set_defaults(fn=cmd_rules_test)
    p = rules.add_parser("diff", help="what-if: decide for stored customers under two rule sets and compare")
    p.add_argument("old_dir", help="the rules in use, e.g. rules")
    p.add_argument("new_dir", help="the changed rules, e.g. a copy you edited")
    p.add_argument("--customers", type=int, default=2000, help="how many stored customers to decide for")
    p.add_argument("--channel", action="append", help="channel(s) to decide on (default web)")
    p.add_argument("--examples", type=int, default=10, help="customers to show whose top action changed")
    p.add_argument("--json", action="store_true")
    redis_options(p)
    p.add_argument("--models-dir", help="model registry (default ./models)")
    p.set_defaults(fn=cmd_rules_diff)


def cmd_rules_check(args: argparse.Namespace) -> int:
    from engine.authoring.check import check

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    errors = check(rules_dir)
    if errors:
        return rule_errors(errors, f" in {rules_dir}")
    print(f"{rules_dir}: ok")
    return 0


def cmd_rules_status(args: argparse.Namespace) -> int:
    """Whether the running service took the rule files on disk: 0 live, 1 refused, 2 not yet picked up."""
    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.authoring.watch import files_digest
    from engine.rules.loader import rules_version

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    reply = rpc(args, "AdminService", "GetStatus", pb.GetStatusRequest())
    text, code = rules_status_text(reply, rules_dir, rules_version(rules_dir), files_digest(rules_dir))
    print(text)
    return code


def rules_status_text(reply, rules_dir: Path, version: str, digest: str) -> tuple[str, int]:
    """What a GetStatus ``reply`` says about the files in ``rules_dir`` (their ``version`` and files
    ``digest``), in words, and ``nba rules status``'s exit status."""
    from datetime import datetime

    def clock(seconds: float) -> str:
        when = datetime.fromtimestamp(seconds)
        return when.strftime("%H:%M:%S" if when.date() == datetime.now().date() else "%Y-%m-%d %H:%M:%S")

    live = reply.ruleset_version
    lines = [f"live: {live} (loaded {clock(reply.ruleset_loaded_at.ToNanoseconds() / 1e9)})"]
    served = Path(reply.rules_dir) if reply.rules_dir else None
    if served is not None and served != Path(rules_dir).resolve():
        lines.append(f"note: the service reads {served}; these are the files in {Path(rules_dir).resolve()}")
    refused = reply.rules_refused if reply.HasField("rules_refused") else None
    if digest == reply.ruleset_files_digest or (version == live and (refused is None or refused.files_digest != digest)):
        lines.append("your files are that version")
        code = 0
    elif refused is not None and refused.files_digest == digest:
        lines.append(f"your files ({version}) are newer and were refused at "
                     f"{clock(refused.at.ToNanoseconds() / 1e9)}; {live} stays live:")
        lines.extend(f"  {e}" for e in refused.errors)
        code = 1
    elif reply.rules_watch_seconds > 0:
        lines.append(f"your files ({version}) are not yet picked up: the service checks them every "
                     f"{reply.rules_watch_seconds:g} s; ask again in a moment")
        code = 2
    else:
        lines.append(f"your files ({version}) are not yet picked up: the service does not watch them "
                     "(--watch-rules 0); they go live on a ReloadRules call")
        code = 2
    lines.append(f"(worker {reply.worker_pid} answered; with several workers each reloads on its own)")
    return "\n".join(lines), code


def cmd_rules_test(args: argparse.Namespace) -> int:
    from engine.authoring.check import test
    from engine.authoring.contactscope import policy_scopes

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    rules, errors, results = test(rules_dir)
    scopes = policy_scopes(rules.ruleset) if rules is not None else []
    if rules is not None:
        rules.close()
    if errors:
        return rule_errors(errors, f" in {rules_dir}; no test ran")
    failed = [r for r in results if not r.passed]
    for r in results:
        if args.verbose_tests or not r.passed:
            print(r.render())
    for scope in scopes:  # a policy that limits more than its name says passes every test: say so
        if scope.warnings:
            print("contact policy " + "\n".join(scope.render()).strip(), file=sys.stderr)
    summary = f"{len(results)} rule tests: {len(results) - len(failed)} passed, {len(failed)} failed"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _off_policy(cfg: Config, store, old_dir: Path, new_dir: Path, old: RuleSet) -> dict:
    """What the new rule set's catalog values would have earned on the recorded decisions against the old
    (``nba evaluate --candidate-rules``), or why that cannot be estimated."""
    from engine.commands.evaluate import candidate_values, off_policy
    from engine.errors import NbaError

    try:
        return off_policy(cfg, store, [(str(new_dir), None, {}, candidate_values(new_dir, old))], rules_dir=old_dir)
    except NbaError as exc:
        return {"error": str(exc)}


def cmd_rules_diff(args: argparse.Namespace) -> int:
    from engine.authoring.check import RuleErrors, test
    from engine.authoring.whatif import load_pair, sample_customers, what_if

    cfg = config_for(args)
    model = live_model(cfg)
    if model is None:
        return 1
    try:
        old, new = load_pair(Path(args.old_dir), Path(args.new_dir))
    except RuleErrors as exc:
        return rule_errors(exc.errors, ": nothing compared")
    try:
        with open_store(cfg) as store:
            customers = sample_customers(store, args.customers)
            if not customers:
                print("error: no stored customers (nba seed writes the demo ones)", file=sys.stderr)
                return 1
            report = what_if(store, model, old, new, customers, args.channel or ["web"], args.examples)
            estimate = _off_policy(cfg, store, Path(args.old_dir), Path(args.new_dir), old.ruleset)
    finally:
        old.close()
        new.close()
    if args.json:
        print(json.dumps(report.as_dict(args.examples) | {"off_policy": estimate}, indent=2))
    else:
        print(report.render(args.examples))
        print(f"\noff-policy estimate on the recorded decisions ({args.new_dir}'s catalog values; eligibility and "
              "levers as logged):")
        if "error" in estimate:
            print(f"  none: {estimate['error']}")
        else:
            from engine.analytics.evaluate import format_evaluation

            print(format_evaluation(estimate))
    rules, _, results = test(Path(args.new_dir))
    if rules is not None:
        rules.close()
    failed = [r for r in results if not r.passed]
    if failed:
        print(f"note: {len(failed)} of {len(results)} rule tests fail under {args.new_dir} "
              "(nba rules test shows them); it would be refused live", file=sys.stderr)
    return 0
