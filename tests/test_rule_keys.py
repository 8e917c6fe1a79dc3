"""A rule file with a key left out: ``nba rules check`` reports located errors and never raises.

Each distinct key path of the demo rule files (``patterns[*].count.within``, ``actions[*].channels.email``...)
is deleted once, at its first occurrence, from an otherwise intact copy of ``rules/``: the whole entry of
a block mapping, or that one entry of a flow mapping (``{event: x, within: 1d}`` -> ``{event: x}``).
The files of a folder (``campaigns/*.yaml``, ``tests/*.yaml``) share their paths. Every error must be a
``RuleError`` at file:line:col (test_fuzz.assert_located).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.authoring.check import check

from .conftest import REPO, RULES_DIR
from .test_fuzz import assert_located

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Case:
    file: str  # relative to the rules folder
    path: str  # the key path, e.g. patterns[*].count.within
    edited: str  # the file's text without that key


# --- deleting one key from a YAML text --------------------------------------------------------------

def _entries(node: yaml.Node, path: tuple = (), at: tuple = ()) -> Iterator[tuple[tuple, tuple, yaml.MappingNode, int]]:
    """(key path with [*] for list items, the concrete path, the mapping, the entry's index) of every key."""
    if isinstance(node, yaml.MappingNode):
        for i, (key, value) in enumerate(node.value):
            yield (*path, key.value), (*at, key.value), node, i
            yield from _entries(value, (*path, key.value), (*at, key.value))
    elif isinstance(node, yaml.SequenceNode):
        for j, item in enumerate(node.value):
            yield from _entries(item, (*path, "[*]"), (*at, j))


def _content_end(text: str, node: yaml.Node) -> int:
    """Where the text of ``node`` ends: a block collection's end mark lies at the next token (maybe past
    comments), a block scalar's past the following line breaks."""
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    end = node.end_mark.index
    while end > node.start_mark.index and text[end - 1] in " \t\r\n":
        end -= 1
    return end


def delete_entry(text: str, mapping: yaml.MappingNode, i: int) -> str:
    key, value = mapping.value[i]
    start, end = key.start_mark.index, _content_end(text, value)
    following = mapping.value[i + 1][0] if i + 1 < len(mapping.value) else None
    if mapping.flow_style:
        if following is not None:  # "a: 1, b: 2" -> "b: 2"
            return text[:start] + text[following.start_mark.index:]
        if i > 0:  # "a: 1, b: 2" -> "a: 1"
            return text[:_content_end(text, mapping.value[i - 1][1])] + text[end:]
        return text[:start] + text[end:]
    if len(mapping.value) == 1:  # the mapping stays, empty
        return text[:start] + "{}" + text[end:]
    line_start = text.rfind("\n", 0, start) + 1
    if following is not None:
        if text[line_start:start].strip():  # "- a: 1\n  b: 2" -> "- b: 2"
            return text[:start] + text[following.start_mark.index:]
        return text[:line_start] + text[text.rfind("\n", 0, following.start_mark.index) + 1:]
    line_end = text.find("\n", end)  # the last entry, on lines of its own (comments after it go too)
    return text[:line_start] + (text[line_end + 1:] if line_end >= 0 else "")


def _without(data: Any, at: tuple) -> Any:
    data = copy.deepcopy(data)
    inner = data
    for step in at[:-1]:
        inner = inner[step]
    del inner[at[-1]]
    return data


def _show(path: tuple) -> str:
    return ".".join(path).replace(".[*]", "[*]")


def key_cases() -> list[Case]:
    cases, seen = [], set()
    for file in sorted(p.relative_to(RULES_DIR).as_posix() for p in RULES_DIR.rglob("*.yaml")
                       if not p.relative_to(RULES_DIR).as_posix().startswith("examples/")):  # other rule dirs
        text = (RULES_DIR / file).read_text(encoding="utf-8")
        kind = file.rsplit("/", 1)[0] + "/*.yaml" if "/" in file else file
        data = yaml.load(text, Loader=_LOADER)
        for path, at, mapping, i in _entries(yaml.compose(text, Loader=_LOADER)):
            if (kind, path) in seen:
                continue
            seen.add((kind, path))
            edited = delete_entry(text, mapping, i)
            # the edit removed exactly that key, whatever the layout around it
            assert yaml.load(edited, Loader=_LOADER) == _without(data, at), f"{file}: deleting {_show(path)} went wrong"
            cases.append(Case(file, _show(path), edited))
    return cases


CASES = key_cases()


@pytest.fixture(scope="module")
def rules_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rules_dir = tmp_path_factory.mktemp("keys") / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    return rules_dir


def test_the_cases_cover_every_rule_file() -> None:
    files = {c.file for c in CASES}
    for name in ("catalog.yaml", "policies.yaml", "contact.yaml", "events.yaml"):
        assert name in files
    assert any(f.startswith("campaigns/") for f in files) and any(f.startswith("tests/") for f in files)
    assert "patterns[*].count.within" in {c.path for c in CASES if c.file == "events.yaml"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.file}:{c.path}" for c in CASES])
def test_a_missing_key_gives_located_errors(rules_copy: Path, case: Case) -> None:
    target = rules_copy / case.file
    original = target.read_text(encoding="utf-8")
    target.write_text(case.edited, encoding="utf-8")
    try:
        errors = check(rules_copy)
        assert_located(errors, rules_copy)
    finally:
        target.write_text(original, encoding="utf-8")


# --- the bug that started this, and the others found with it ------------------------------------------

def _edited_rules(tmp_path: Path, file: str, old: str, new: str, count: int = 1) -> Path:
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    text = (rules_dir / file).read_text(encoding="utf-8")
    assert text.count(old) >= count, old
    (rules_dir / file).write_text(text.replace(old, new, count), encoding="utf-8")
    return rules_dir


def test_a_count_pattern_without_within_is_reported_by_rules_check(tmp_path: Path) -> None:
    """It raised KeyError: 'within' (engine/rules/patterns.py) and printed a traceback."""
    rules_dir = _edited_rules(tmp_path, "events.yaml", "count: {event: contact_request, within: 1d}",
                              "count: {event: contact_request}")
    errors = check(rules_dir)
    assert [(e.message, e.hint) for e in errors] == [
        ('pattern "callback_request" count is missing "within"', "add it, e.g. within: 7d")]
    assert_located(errors, rules_dir)
    run = subprocess.run([sys.executable, "-m", "engine.cli", "rules", "check", str(rules_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.search(r"events\.yaml:\d+:\d+: .*within", run.stdout), run.stdout
    assert "Traceback" not in run.stdout + run.stderr, run.stderr


ODD_FILES = [
    # two nameless items: the second looked up the "name" it does not have as a duplicate of ""
    ("policies.yaml", "  - name: ", "  - title: ", 2, 'policy is missing "name"'),
    ("events.yaml", "  - name: ", "  - title: ", 2, 'pattern is missing "name"'),
    ("contact.yaml", "  - name: ", "  - title: ", 2, 'contact policy is missing "name"'),
    ("tests/events.yaml", "  - name: ", "  - title: ", 2, 'event test is missing "name"'),
    # policy generic without share: the generic error was put at the missing share
    ("contact.yaml", "  share: 0.1\n  policy: random_eligible", "  policy: generic", 1,
     'control_group is missing "share"'),
    # a time zone that is a folder of zones, or too long a name: OSError from ZoneInfo
    ("campaigns/fibre_migration.yaml", "time_zone: Europe/Amsterdam", "time_zone: America", 1,
     'unknown time zone "America"'),
    ("campaigns/fibre_migration.yaml", "time_zone: Europe/Amsterdam", "time_zone: " + "a" * 300, 1,
     "unknown time zone"),
    # .inf and .nan: int() of them raised
    ("contact.yaml", "max: 3", "max: .inf", 1, 'expected a number for contact policy "no_repeats" max'),
    ("events.yaml", "at_least: 2", "at_least: .nan", 1, "expected a number for pattern"),
    ("catalog.yaml", "daily_budget: ", "daily_budget: .inf #", 1, "expected a number for action"),
    # a duration too long for a float
    ("events.yaml", "within: 7d", "within: " + "9" * 400 + "d", 1, "expected a duration for pattern"),
    ("tests/events.yaml", "until: 2d", "until: " + "9" * 400 + "d", 1, "expected a duration for until"),
    # an alias inside the value it repeats: RecursionError
    ("contact.yaml", "channels: [email, sms]", "channels: &a [email, *a]", 1, "contains an alias of itself"),
    # an empty event type left the pattern out unreported (only its trigger was said to be raised by none)
    ("events.yaml", "count: {event: complaint_opened, within: 1d}", "count: {event: '', within: 1d}", 1,
     'pattern "complaint" names no event type'),
]


@pytest.mark.parametrize(("file", "old", "new", "count", "expected"), ODD_FILES,
                         ids=[f"{f}:{e}" for f, _o, _n, _c, e in ODD_FILES])
def test_odd_rule_files_give_located_errors(tmp_path: Path, file: str, old: str, new: str, count: int,
                                            expected: str) -> None:
    rules_dir = _edited_rules(tmp_path, file, old, new, count)
    errors = check(rules_dir)
    assert any(expected in e.message for e in errors), [str(e) for e in errors]
    assert_located(errors, rules_dir)
