"""The ``nba`` command's tree: every subcommand's ``--help`` renders, and the subcommand paths with their
positionals and option strings are the checked-in list (tests/cli_tree.txt), so a flag lost when the
parsers move fails here. After an intended change to the command line, regenerate the list with
``.venv/bin/python tests/test_cli_help.py > tests/cli_tree.txt`` and review its diff."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import cli

TREE = Path(__file__).resolve().parent / "cli_tree.txt"
ENGINE = Path(__file__).resolve().parent.parent / "engine"
LONGEST = 60  # lines a function of the nba command may run to (issue 32)


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))


def _has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def tree_lines() -> list[str]:
    """One line per command path: ``nba PATH | positionals | option strings`` (both sorted)."""
    lines = []
    for path, parser in _walk(cli.build_parser()):
        positionals = sorted(a.dest for a in parser._actions
                             if not a.option_strings and not isinstance(a, argparse._SubParsersAction))
        options = sorted(s for a in parser._actions for s in a.option_strings)
        lines.append((" ".join(("nba", *path)) + " | " + " ".join(positionals) + " | " + " ".join(options)).rstrip())
    return lines


def test_the_command_tree_is_the_checked_in_one() -> None:
    expected = TREE.read_text().splitlines()
    found = tree_lines()
    lost = [line for line in expected if line not in found]
    new = [line for line in found if line not in expected]
    assert not lost and not new, ("the nba command's subcommands or options changed (tests/cli_tree.txt; "
                                  "regenerate it if intended):\nlost:\n  " + "\n  ".join(lost)
                                  + "\nnew:\n  " + "\n  ".join(new))
    assert len(found) > 30 and found[0].startswith("nba | ")


@pytest.mark.parametrize("path", [p for p, _ in _walk(cli.build_parser()) if p != ("loadtest",)],
                         ids=lambda p: " ".join(p) or "nba")
def test_every_subcommand_help_renders(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*path, "--help"])
    out = capsys.readouterr()
    assert done.value.code == 0 and not out.err
    assert out.out.startswith("usage: " + " ".join(("nba", *path))), out.out[:200]


def test_loadtest_hands_its_help_to_the_load_generator(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["loadtest", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nba loadtest") and "--rate" in out and "--token-file" in out


def test_every_leaf_command_has_a_handler() -> None:
    """A parser without subcommands runs the function its group set as ``fn`` (``nba loadtest`` is handed
    to loadtest/loadgen.py before parsing)."""
    missing = [" ".join(path) for path, parser in _walk(cli.build_parser())
               if path and path != ("loadtest",) and not _has_subcommands(parser)
               and not callable(parser._defaults.get("fn"))]
    assert not missing, f"subcommands without a handler: {missing}"


def test_no_function_of_the_nba_command_runs_over_the_limit() -> None:
    files = [ENGINE / "cli.py", *sorted((ENGINE / "commands").glob("*.py"))]
    long = [f"{path.relative_to(ENGINE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in files for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (node.end_lineno or node.lineno) - node.lineno + 1 > LONGEST]
    assert len(files) > 5 and not long, f"functions over {LONGEST} lines: {long}"


if __name__ == "__main__":
    print("\n".join(tree_lines()))
