"""The arguments the load tools share, as functions that add them to a parser (each tool keeps its own
defaults where they differ)."""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc`` (the tool's module docstring)."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def add_address(ap: argparse.ArgumentParser, default: str = "127.0.0.1:50051") -> None:
    ap.add_argument("--address", default=default, help=f"the server's host:port (default {default})")


def add_load(ap: argparse.ArgumentParser, rate: float | None = None, duration: float | None = None,
             warmup: float | None = None, rate_help: str = "offered requests per second (open loop)",
             duration_help: str = "measured seconds", warmup_help: str = "seconds sent but not measured") -> None:
    """--rate, --duration and --warmup (those given a default)."""
    if rate is not None:
        ap.add_argument("--rate", type=float, default=rate, help=f"{rate_help} (default {rate:g})")
    if duration is not None:
        ap.add_argument("--duration", type=float, default=duration, help=f"{duration_help} (default {duration:g})")
    if warmup is not None:
        ap.add_argument("--warmup", type=float, default=warmup, help=f"{warmup_help} (default {warmup:g})")


def add_processes(ap: argparse.ArgumentParser, default: int = 2) -> None:
    ap.add_argument("--processes", type=int, default=default, help=f"load generator processes (default {default})")


def add_rounds(ap: argparse.ArgumentParser, default: int, help: str = "rounds; the sides' order alternates by round") -> None:
    ap.add_argument("--rounds", type=int, default=default, help=f"{help} (default {default})")


def add_turns(ap: argparse.ArgumentParser, turns: int = 12, calls: int = 300) -> None:
    """--turns and --calls of the sequential in-process A/B comparisons (the first turn is warm-up)."""
    ap.add_argument("--turns", type=int, default=turns, help=f"alternating turns, the first dropped (default {turns})")
    ap.add_argument("--calls", type=int, default=calls, help=f"sequential calls per side per turn (default {calls})")


def add_slo(ap: argparse.ArgumentParser, default: str = "p99=5ms") -> None:
    ap.add_argument("--slo", action="append", default=[], metavar="pNN=Xms",
                    help=f"latency objective, e.g. p99=5ms (repeatable; default {default})")


def add_find_max(ap: argparse.ArgumentParser, start_rate: float, step: float = 1.25, repeats: int = 3) -> None:
    """--start-rate, --step and --repeats of ``loadgen.find_max``."""
    ap.add_argument("--start-rate", type=float, default=start_rate, help=f"first rate of the find-max (default {start_rate:g})")
    ap.add_argument("--step", type=float, default=step, help=f"rate multiplier per find-max step (default {step:g})")
    ap.add_argument("--repeats", type=int, default=repeats, help=f"runs per rate, judged on the median p99 (default {repeats})")


def add_customers(ap: argparse.ArgumentParser, default: int = 20_000) -> None:
    ap.add_argument("--customers", type=int, default=default, help=f"demo customers C0000000.. (default {default:,})")


def add_models_dir(ap: argparse.ArgumentParser, default: str | Path) -> None:
    ap.add_argument("--models-dir", default=str(default), help=f"the trained models (default {default})")


def add_json(ap: argparse.ArgumentParser, help: str = "write the result here") -> None:
    ap.add_argument("--json", metavar="FILE", help=help)


def add_compare_tree(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--compare-tree", type=Path, metavar="DIR",
                    help="also nba serve from this source tree (a worktree of an earlier commit): before/after in one run")


def add_modes(ap: argparse.ArgumentParser, modes: dict[str, str]) -> None:
    """Mutually exclusive ``--<mode>`` switches, each running the tool's other measurement instead of its default."""
    group = ap.add_mutually_exclusive_group()
    for flag, help in modes.items():
        group.add_argument(flag, action="store_true", help=f"instead: {help}")
