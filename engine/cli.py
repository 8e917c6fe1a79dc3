"""The ``nba`` command: the top parser, the subcommands of each command group (``engine.commands``) and
the dispatch to the handler the command line chose."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.commands import campaign, customer, data, evaluate, loadtest, models, report, rules, serve, training

GROUPS = (serve, loadtest, training, report, evaluate, campaign, customer, rules, models, data)  # nba --help's order

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


def main(argv: list[str] | None = None) -> int:
    """Every command; a reader that closes its end of stdout early (``nba decide --json | head -1``) ends
    it quietly with ``SIGPIPE_EXIT``, as a command stopped by SIGPIPE would."""
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python's own flush of stdout at exit would hit the closed pipe again and print a warning
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT


def build_parser() -> argparse.ArgumentParser:
    """The ``nba`` parser: the top options, then every group's subcommands, each with its handler as ``fn``."""
    parser = argparse.ArgumentParser(prog="nba", description="Next-best-action decision service")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        return loadtest.cmd_loadtest(argv[1:])
    args = build_parser().parse_args(argv)
    from engine.serving.telemetry import configure_logging

    configure_logging(getattr(args, "log_format", None), logging.DEBUG if args.verbose else logging.INFO)
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen handler; the errors a user must fix become one line on stderr and exit status 1."""
    from engine.errors import NbaError
    from engine.rules.errors import RuleErrors

    try:
        return args.fn(args)
    except RuleErrors as exc:  # rules that do not load, compile or pass their tests: say where
        for e in exc.errors:
            print(e.render(), file=sys.stderr)
        print(f"{len(exc.errors)} error(s) in the rules", file=sys.stderr)
        return 1
    except NbaError as exc:  # a setting or input the user must fix: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
