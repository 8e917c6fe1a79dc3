"""Issue 28: a broken file is reported alone, every mistake of a condition at once, and ``nba rules
status`` says whether the running service took the files on disk."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from engine.authoring.check import check
from engine.rules.checker import Scope
from engine.rules.lang import compile_condition
from engine.sim.telco import SCHEMA

from .conftest import ADMIN_TOKEN, served_app
from .test_rules_cli import run


# --- a file that does not parse is reported alone ----------------------------------------------------
def test_one_bad_quote_in_the_catalog_is_one_error_and_a_note(capsys, rules_copy: Path) -> None:
    with (rules_copy / "catalog.yaml").open("a") as f:
        f.write("  - [x\n")
    errors = check(rules_copy)
    assert len(errors) == 1, [str(e) for e in errors]
    assert errors[0].file.endswith("catalog.yaml") and "YAML syntax error" in errors[0].message
    assert re.fullmatch(r"catalog\.yaml did not parse: \d+ reference\(s\) to its actions and groups not checked",
                        errors[0].note)
    code, out = run(capsys, "rules", "check", str(rules_copy))
    assert code == 1 and "note: catalog.yaml did not parse" in out and "1 error(s)" in out
    assert "unknown action" not in out


def test_errors_independent_of_the_broken_file_still_show(rules_copy: Path) -> None:
    catalog, policies = rules_copy / "catalog.yaml", rules_copy / "policies.yaml"
    catalog.write_text(catalog.read_text() + "  - [x\n")
    text = policies.read_text()
    assert "when: 'value_tier == \"C\"'" in text
    policies.write_text(text.replace("when: 'value_tier == \"C\"'", "when: 'value_tier == \"D\"'", 1))
    errors = check(rules_copy)
    assert [Path(e.file).name for e in errors] == ["catalog.yaml", "policies.yaml"], [str(e) for e in errors]
    assert '"D" is not a level of value_tier' in errors[1].message


def test_a_broken_policies_file_leaves_situation_names_unchecked(rules_copy: Path) -> None:
    with (rules_copy / "policies.yaml").open("a") as f:
        f.write("  - [x\n")
    errors = check(rules_copy)
    assert len(errors) == 1 and errors[0].file.endswith("policies.yaml"), [str(e) for e in errors]
    assert "reference(s) to its situations not checked" in errors[0].note


def test_a_catalog_whose_actions_are_no_list_is_reported_without_its_consequences(rules_copy: Path) -> None:
    catalog = rules_copy / "catalog.yaml"
    text = catalog.read_text()
    assert text.count("\nactions:\n") == 1
    catalog.write_text(text.replace("\nactions:\n", "\nactions: 3\nunused:\n"))
    errors = check(rules_copy)
    assert {e.file for e in errors} == {str(catalog)}, [str(e) for e in errors]
    assert {e.message for e in errors} == {'unknown key "unused" in catalog.yaml', "expected actions (a list of '- ...' items)"}
    notes = [e.note for e in errors if e.note]
    assert len(notes) == 1 and notes[0].startswith("catalog.yaml could not be read: "), notes


# --- every mistake of a condition at once ----------------------------------------------------------
SCOPE = Scope(SCHEMA, situations={"service_first"}, triggers={"callback_requested"})


def mistakes(text: str) -> list[tuple[int, str]]:
    tree, errors = compile_condition(text, SCOPE)
    assert tree is None
    return [(e.pos, e.message) for e in errors]


def test_three_independent_mistakes_give_three_errors_where_they_are() -> None:
    text = 'tenur_months >= 12 and segment == "studnt" and age > "x"'
    found = mistakes(text)
    assert [pos for pos, _ in found] == [0, text.index('"studnt"'), text.index('age > "x"')]
    assert 'unknown feature "tenur_months"' in found[0][1]
    assert '"studnt" is not a level of segment' in found[1][1]
    assert "cannot compare a number with text" in found[2][1]


def test_syntax_errors_do_not_hide_the_other_mistakes() -> None:
    text = 'tenure_months => 12 and segmnt = "student" or age > and holds("tvv")'
    found = mistakes(text)
    assert found == [
        (text.index("=>"), 'unexpected "=>"'),
        (text.index("segmnt"), 'unknown feature "segmnt"'),
        (text.index(' = "') + 1, 'unexpected "="'),
        (text.index("and holds"), 'expected a value (number, "text", feature name or function) but found "and"'),
        (text.index('"tvv"'), 'unknown product "tvv"'),
    ], found


@pytest.mark.parametrize("text, count", [
    ('(tenure_months > 3 plan == "none") and agee > 1', 2),  # missing "and" inside ( ), then an unknown name
    ("tenure_months > 1 > 2 and agee > 1", 2),  # chained comparison
    ('plan in [none, "x"] and _x > 1 and AND', 5),  # "x" is no level; AND ends the text
    ("(tenure_months > 3 and agee > 1", 2),  # the ")" is missing at the end
    ("tenure_months > 3) and agee > 1", 2),
    ("segment == “studnt” and agee > 1", 3),
])
def test_each_mistake_is_reported_once(text: str, count: int) -> None:
    found = mistakes(text)
    assert len(found) == count, found
    assert len({pos for pos, _ in found}) == count


def test_a_rule_file_shows_every_mistake_of_a_condition_with_line_and_column(rules_copy: Path) -> None:
    policies = rules_copy / "policies.yaml"
    text = policies.read_text()
    assert "when: 'payment_trouble'" in text
    condition = 'payment_troubl and segment == "studnt" and age > "x"'
    policies.write_text(text.replace("when: 'payment_trouble'", f"when: '{condition}'", 1))
    line = next(i for i, t in enumerate(policies.read_text().splitlines(), 1) if condition in t)
    column = policies.read_text().splitlines()[line - 1].index(condition) + 1
    errors = check(rules_copy)
    assert [(e.line, e.column) for e in errors] == [
        (line, column), (line, column + condition.index('"studnt"')), (line, column + condition.index("age"))
    ], [str(e) for e in errors]


# --- nba rules status -----------------------------------------------------------------------------
@pytest.fixture()
def watched(redis_url: str, models_dir: Path, tmp_path: Path):
    """A served App whose rule files (a copy) are watched every 0.1 s; yields (app, address)."""
    with served_app(redis_url, models_dir, tmp_path / "rules", demo_customers=200, rules_watch_seconds=0.1) as served:
        yield served


def test_rules_status_says_live_refused_and_live_again(capsys, watched, tmp_path: Path) -> None:
    app, address = watched
    rules_dir = app.config.rules_dir
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN)
    status = ["rules", "status", str(rules_dir), "--address", address, "--token-file", str(token)]
    v0 = app.rules.current.version

    code, out = run(capsys, *status)
    assert code == 0 and f"live: {v0}" in out and "your files are that version" in out, out

    catalog = rules_dir / "catalog.yaml"
    good = catalog.read_text()
    assert "eligible: 'open_cases > 0'" in good
    catalog.write_text(good.replace("eligible: 'open_cases > 0'", "eligible: 'open_casez > 0'", 1))
    deadline = time.monotonic() + 30
    while app.rules_refused is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.rules_refused is not None, "the broken edit was never refused"
    code, out = run(capsys, *status)
    assert code == 1, out
    assert f"live: {v0}" in out and "are newer and were refused at" in out and f"{v0} stays live" in out
    assert re.search(r"catalog\.yaml:\d+:\d+: unknown feature \"open_casez\"", out), out
    assert app.rules.current.version == v0

    catalog.write_text(good)
    deadline = time.monotonic() + 30
    while app.rules_refused is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    code, out = run(capsys, *status)
    assert code == 0 and f"live: {v0}" in out and "your files are that version" in out, out


def test_rules_status_says_not_yet_picked_up(capsys, service, tmp_path: Path) -> None:
    """The service's answer is taken as is: files that changed since are not yet picked up."""
    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.authoring.watch import files_digest
    from engine.commands.rules import rules_status_text
    from engine.rules.loader import rules_version

    app, channel = service
    reply = pb_grpc.AdminServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
    rules_dir = app.config.rules_dir
    assert reply.rules_dir == str(rules_dir.resolve()) and reply.rules_watch_seconds == 1.0
    with (rules_dir / "policies.yaml").open("a") as f:
        f.write("# a comment changes the version\n")
    text, code = rules_status_text(reply, rules_dir, rules_version(rules_dir), files_digest(rules_dir))
    assert code == 2 and "not yet picked up: the service checks them every 1 s" in text, text
