"""Every command the reference documents quote still parses: the script or module exists, every ``--flag``
it passes is an option of that script (or of the ``nba`` subcommand it names), and every subcommand exists.

Commands are taken from fenced code blocks (continued lines joined, comments and ``$`` prompts dropped,
``&&``/``;``/``|``/subshells split apart) and from inline code, when they start with ``python
<path>.py``, ``python -m <module of this repository>`` or ``nba <subcommand>`` (also ``.venv/bin/...``,
after ``VAR=value`` prefixes). No benchmark runs: one child process runs each script and module once up
to its argparse ``parse_args`` call, stops it there and hands back the parser's options and subcommands;
a script without argparse is not run at all (the flags it accepts are the ``"--flag"`` strings in its
source).

Run as a script (``python tests/test_docs.py script:loadtest/x.py module:engine.cli``) it prints those
specs as JSON; that is the child process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# README.md and the guides per reader it links to (where the commands it quoted before the split went)
CHECKED = ("BENCHMARKS.md", "CAPACITY.md", "README.md", "ARCHITECTURE.md", "proto/README.md", "rules/README.md",
           "engine/deploy/README.md", "models/README.md")
NBA_LOADTEST = "script:loadtest/loadgen.py"  # `nba loadtest ...` hands its arguments to loadgen.py (engine/cli.py)

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # inline code may wrap onto the next line of a paragraph
_SUBST = re.compile(r"\$\([^()]*\)")  # $(...) inside an argument
_PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")  # <id printed by simulate>, not a redirection
_PYTHON = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")
_NBA = re.compile(r"^(?:\S*/)?nba$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_BREAKS = {"&&", "||", ";", "|", "(", ")", "&", ";;"}
_REDIRECTS = {">", ">>", "<", "2>", "&>"}
_KEYWORDS = {"do", "then", "else", "time", "exec", "!"}  # shell words that may stand before a command
_ALTERNATIVES = re.compile(r"(?<=[\w-])\|(?=[\w-])")  # `--via grpc|direct` in prose: choices, not a pipe


@dataclass(frozen=True)
class Quoted:
    line: int
    text: str


@dataclass(frozen=True)
class Command:
    line: int
    target: str  # "script:loadtest/x.py", "module:engine.rules.bench" or "module:engine.cli"
    words: tuple[str, ...]  # the arguments after the script, module or `nba`
    text: str


# -- finding the commands ---------------------------------------------------------------------------------


def quoted(text: str) -> list[Quoted]:
    """Code-block lines (continuations joined) and inline code spans, with their line numbers."""
    found: list[Quoted] = []
    lines = text.splitlines()
    prose: list[tuple[int, str]] = []
    in_block = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, 1):
        if _FENCE.match(line):
            in_block = not in_block
            pending = None
            continue
        if not in_block:
            prose.append((number, line))
            continue
        body = line.strip()
        if body.startswith("$ "):
            body = body[2:]
        start, sofar = pending if pending else (number, "")
        joined = f"{sofar} {body}".strip()
        if joined.endswith("\\"):
            pending = (start, joined[:-1])
            continue
        pending = None
        found.append(Quoted(start, joined))
    paragraph = "\n".join(line for _, line in prose)
    numbers = [number for number, _ in prose]
    for match in _INLINE.finditer(paragraph):
        found.append(Quoted(numbers[paragraph.count("\n", 0, match.start())], match.group(1).replace("\n", " ")))
    return found


def _words(text: str) -> list[str]:
    text = _ALTERNATIVES.sub("/", _PLACEHOLDER.sub("PLACEHOLDER", _SUBST.sub("SUBST", text)))
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose: words are good enough
        return text.split()


def _segments(text: str) -> list[list[str]]:
    """The simple commands of a shell line: split at && ; | and parentheses, redirections dropped."""
    segments: list[list[str]] = [[]]
    words = iter(_words(text))
    for word in words:
        if word in _BREAKS:
            segments.append([])
        elif word in _REDIRECTS:
            next(words, None)
        else:
            segments[-1].append(word)
    return [s for s in segments if s]


def _in_repo(module: str) -> bool:
    top = module.split(".")[0]
    return (ROOT / top).is_dir() or (ROOT / f"{top}.py").is_file()


def commands(text: str) -> list[Command]:
    """The python and nba commands quoted in a markdown text."""
    found: list[Command] = []
    for quote in quoted(text):
        for words in _segments(quote.text):
            while words and (_ENV.match(words[0]) or words[0] in _KEYWORDS):
                words = words[1:]
            if len(words) >= 2 and _PYTHON.match(words[0]):
                if words[1] == "-m" and len(words) >= 3:
                    if _in_repo(words[2]):
                        found.append(Command(quote.line, f"module:{words[2]}", tuple(words[3:]), quote.text))
                elif words[1].endswith(".py"):
                    found.append(Command(quote.line, f"script:{words[1]}", tuple(words[2:]), quote.text))
            elif len(words) >= 2 and _NBA.match(words[0]) and re.match(r"^[a-z-]+$", words[1]):
                if words[1] == "loadtest":
                    found.append(Command(quote.line, NBA_LOADTEST, tuple(words[2:]), quote.text))
                else:
                    found.append(Command(quote.line, "module:engine.cli", tuple(words[1:]), quote.text))
    return found


# -- what each script accepts ------------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _spec(parser: argparse.ArgumentParser) -> dict[str, Any]:
    options: dict[str, Any] = {}
    subcommands: dict[str, Any] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                subcommands[name] = _spec(sub)
        for flag in action.option_strings:
            options[flag] = action.nargs
    return {"options": options, "subcommands": subcommands}


def _capture(target: str) -> dict[str, Any]:
    """Runs a script or module as __main__ until its first parse_args call; that parser's spec."""
    kind, name = target.split(":", 1)
    if kind == "script" and not (ROOT / name).is_file():
        return {"error": f"no such script {name}"}
    found = importlib.util.find_spec(name) if kind == "module" else None
    if kind == "module" and (found is None or found.origin is None):
        return {"error": f"no such module {name}"}
    source = Path(found.origin if found and found.origin else ROOT / name).read_text()
    if "parse_args" not in source and "ArgumentParser" not in source:  # reads sys.argv itself: not run
        flags = re.findall(r"""["'](--[a-z0-9][a-z0-9-]*)["']""", source)  # the flags it compares arguments with
        return {"options": {flag: 0 for flag in flags}, "subcommands": {}, "no_parser": True}
    original = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> Any:
        raise _Captured(self)

    argv = sys.argv
    argparse.ArgumentParser.parse_args = grab  # type: ignore[assignment,method-assign]
    argparse.ArgumentParser.parse_known_args = grab  # type: ignore[assignment,method-assign]
    try:
        sys.argv = [name, "--help"]
        if kind == "script":
            runpy.run_path(str(ROOT / name), run_name="__main__")
        else:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    except _Captured as caught:
        return _spec(caught.parser)
    except BaseException as exc:  # noqa: BLE001 - a script that fails to start is what this reports
        return {"error": f"{name} did not reach its argument parser: {type(exc).__name__}: {exc}"}
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
        sys.argv = argv
    return {"options": {}, "subcommands": {}, "no_parser": True}


@cache
def specs(targets: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The specs of many targets from one child process (imports stay out of the test process)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *targets], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the spec dump failed: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- checking a command against a spec ---------------------------------------------------------------------


def _values(nargs: Any) -> tuple[int, int]:
    """(least, most) values an option with this nargs takes."""
    if nargs == 0:
        return 0, 0
    if nargs is None:
        return 1, 1
    if isinstance(nargs, int):
        return nargs, nargs
    return {"?": (0, 1), "*": (0, 10**6), "+": (1, 10**6)}.get(nargs, (0, 10**6))


def problems_of(command: Command, spec: dict[str, Any]) -> list[str]:
    label = command.target.split(":", 1)[1]
    if command.target == "module:engine.cli":
        label = "nba"
    elif command.target == NBA_LOADTEST:
        label = "nba loadtest (loadtest/loadgen.py)"
    if "error" in spec:
        return [spec["error"]]
    found: list[str] = []
    words = list(command.words)
    i = 0
    chose = not spec["subcommands"]
    while i < len(words):
        word = words[i]
        i += 1
        if word.startswith("--") and len(word) > 2:
            flag = word.split("=", 1)[0]
            if flag not in spec["options"]:
                known = " ".join(sorted(spec["options"]))
                where = f"no argparse parser; flags in its source: {known or 'none'}" if spec.get("no_parser") else f"options: {known}"
                found.append(f"{flag} is not an option of {label} ({where})")
                continue
            least, most = _values(spec["options"][flag]) if "=" not in word else (0, 0)
            taken = 0
            while taken < most and i < len(words) and (taken < least or not words[i].startswith("-")):
                i += 1
                taken += 1
        elif word == "--":
            break
        elif not chose and not word.startswith("-"):
            if word not in spec["subcommands"]:
                found.append(f"{label} has no subcommand {word!r} (it has: {' '.join(sorted(spec['subcommands']))})")
                break
            label, spec, chose = f"{label} {word}", spec["subcommands"][word], not spec["subcommands"][word]["subcommands"]
    if not chose and not found:
        found.append(f"{label} needs a subcommand (one of: {' '.join(sorted(spec['subcommands']))})")
    return found


def check(text: str, where: str) -> list[str]:
    """One line per problem in the commands that `text` quotes."""
    found = commands(text)
    known = specs(tuple(sorted({c.target for c in found})))
    return [f"{where}:{c.line}: `{c.text}`: {problem}" for c in found for problem in problems_of(c, known[c.target])]


# -- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", CHECKED)
def test_every_quoted_command_parses(doc: str) -> None:
    path = ROOT / doc
    if not path.is_file():
        pytest.skip(f"{doc} is not there")
    problems = check(path.read_text(), doc)
    assert not problems, "commands quoted in the docs that do not parse:\n" + "\n".join(problems)


def test_the_reference_quotes_commands_of_each_kind() -> None:
    """The extraction finds the benchmark commands (a check that finds none would pass anything)."""
    found = commands((ROOT / "BENCHMARKS.md").read_text())
    kinds = {c.target.split(":")[0] for c in found}
    assert len(found) >= 20 and kinds == {"script", "module"}, found


def test_commands_are_found_in_blocks_loops_subshells_and_inline_code() -> None:
    text = "\n".join([
        "Run `python loadtest/bench_rules.py --scaling 120,200` or `nba models list`; `nba.v1` is a package.",
        "```",
        "for run in 1 2; do",
        "  (cd $tree && PYTHONPATH=. python loadtest/contact_p99.py --in-process 4000 \\",
        "     --json /tmp/x-$(basename $tree)-$run.json)     # a comment --not-a-flag",
        "done",
        "$ nba simulate --customers 20 --json > /tmp/out.json",
        "nba train --from-stream --as-of <30 days on> --export rows.csv.gz",
        "for b in 0 3; do python loadtest/history_cost.py --ballast $b; done",
        "nba decide C1 --json | head -1",
        "```",
        "Then `python loadtest/tracing_overhead.py --via grpc|direct",
        "--sample R` twice.",
    ])
    found = [(c.line, c.target, c.words) for c in commands(text)]
    assert found == [
        (4, "script:loadtest/contact_p99.py", ("--in-process", "4000", "--json", "/tmp/x-SUBST-$run.json")),
        (7, "module:engine.cli", ("simulate", "--customers", "20", "--json")),
        (8, "module:engine.cli", ("train", "--from-stream", "--as-of", "PLACEHOLDER", "--export", "rows.csv.gz")),
        (9, "script:loadtest/history_cost.py", ("--ballast", "$b")),
        (10, "module:engine.cli", ("decide", "C1", "--json")),
        (1, "script:loadtest/bench_rules.py", ("--scaling", "120,200")),
        (1, "module:engine.cli", ("models", "list")),
        (12, "script:loadtest/tracing_overhead.py", ("--via", "grpc/direct", "--sample", "R")),
    ]


@pytest.mark.parametrize("doc", ("BENCHMARKS.md", "loadtest/BENCHMARKS-HISTORY.md"))
def test_the_benchmarks_are_headed_by_capability_not_by_issue_or_session(doc: str) -> None:
    path = ROOT / doc
    lines = path.read_text().splitlines()
    headings = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
    assert not [h for h in headings if re.match(r"issue \d", h, re.I)], "a heading names an issue, not a capability"
    sessions = [line for line in lines if re.search(r"\bsessions?\b", line, re.I)
                and not re.search(r"durable(-rules)? sessions?|sessions_open|(each|one|live|leaked) session", line, re.I)]
    assert not sessions, "the benchmarks speak of work sessions (give the date):\n" + "\n".join(sessions)


def test_a_broken_command_is_reported() -> None:
    text = "\n".join([
        "```",
        "python loadtest/bench_rules.py --scaling 120,200 --json /tmp/r.json",  # fine
        "python loadtest/no_such_bench.py --rate 5",  # unknown script
        "python loadtest/bench_rules.py --no-such-flag 3",  # unknown flag
        "nba models lst",  # unknown subcommand
        "nba serve --workers 2 --no-such-option",  # unknown flag of a subcommand
        "nba rules",  # a group without its subcommand
        "nba loadtest --rate 100 --no-such-rate 3",  # nba loadtest is loadgen.py's parser
        "python -m engine.rules.bench --no-such-flag",  # a module of this repository
        "```",
    ])
    problems = check(text, "doc.md")
    assert [p.split(": ", 1)[0] for p in problems] == [f"doc.md:{n}" for n in (3, 4, 5, 6, 7, 8, 9)], problems
    assert "no such script loadtest/no_such_bench.py" in problems[0]
    assert "--no-such-flag is not an option of loadtest/bench_rules.py" in problems[1]
    assert "nba models has no subcommand 'lst'" in problems[2]
    assert "--no-such-option is not an option of nba serve" in problems[3]
    assert "nba rules needs a subcommand" in problems[4]
    assert "--no-such-rate is not an option of nba loadtest" in problems[5]
    assert "--no-such-flag is not an option of engine.rules.bench (no argparse parser; flags in its source: none)" in problems[6]
    assert check("```\npython -m engine.serving.protogen --release\n```", "doc.md") == []  # compares sys.argv itself


if __name__ == "__main__":
    print(json.dumps({target: _capture(target) for target in sys.argv[1:]}))
