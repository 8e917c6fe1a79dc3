"""``nba loadtest``: the open-loop gRPC load generator, loadtest/loadgen.py, with the rest of the command
line (its own --help)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    # listed in nba --help only: engine.cli hands `nba loadtest ...` to cmd_loadtest before parsing
    sub.add_parser("loadtest", help="open-loop gRPC load test: nba loadtest --help", add_help=False)


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
