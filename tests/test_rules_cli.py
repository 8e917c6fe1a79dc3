"""``nba rules check`` / ``test`` / ``diff`` as a marketer runs them, on the demo rules and broken copies."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from engine.cli import main
from engine.rules.errors import ConditionError
from engine.rules.parser import parse

from .conftest import RULES_DIR


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_demo_rules_check_and_pass_their_tests(capsys) -> None:
    code, out = run(capsys, "rules", "check", str(RULES_DIR))
    assert code == 0 and out.strip().endswith(": ok")
    code, out = run(capsys, "rules", "test", "-v", str(RULES_DIR))
    assert code == 0, out
    total = int(re.search(r"(\d+) rule tests: \1 passed, 0 failed", out).group(1))
    assert total >= 15 and out.count(": ok ") == total


def where(path: Path, fragment: str, offset: int = 0) -> str:
    """``file:line:col`` of ``fragment`` (plus ``offset`` characters) in ``path``."""
    text = path.read_text()
    index = text.index(fragment) + offset
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"{path}:{line}:{col}"


# Each mistake: the file, the text replaced, the broken text, the fragment (and offset in it) the
# error must point at, and what the message must say.
MISTAKES = {
    "unknown feature": ("catalog.yaml", "eligible: 'open_cases > 0'", "eligible: 'open_casez > 0'",
                        "open_casez", 0, 'unknown feature "open_casez"; did you mean "open_cases"?'),
    "type mismatch": ("policies.yaml", "when: 'open_cases > 0'", "when: 'open_cases > \"none\"'",
                      "open_cases > \"none\"", 0, "cannot compare a number with text"),
    "unbalanced parenthesis": ("catalog.yaml", "eligible: 'holds(\"tv\") and tv_hours_week >= 15'",
                               "eligible: '(holds(\"tv\") and tv_hours_week >= 15'",
                               "(holds(\"tv\") and tv_hours_week >= 15'", 36,
                               'expected ")" but found the end of the condition; to close the "(" at position 1'),
    "unknown level": ("catalog.yaml", "plan != \"unlimited\" and data_usage_ratio > 0.8",
                      "plan != \"unlimted\" and data_usage_ratio > 0.8", "\"unlimted\"", 0,
                      '"unlimted" is not a level of plan'),
    "= instead of ==": ("policies.yaml", "when: 'value_tier == \"C\"'", "when: 'value_tier = \"C\"'",
                        "= \"C\"", 0, 'unexpected "="; use "==" to compare'),
    "duplicate id": ("catalog.yaml", "  - id: upsell_extra_data\n", "  - id: upsell_unlimited\n",
                     "upsell_unlimited\n    name: Extra data pack", 0, 'duplicate action id "upsell_unlimited"'),
    "bad date": ("catalog.yaml", "    value: 120\n", "    value: 120\n    valid_from: 2026-13-01\n",
                 "2026-13-01", 0, "expected a date for valid_from"),
    "unknown key": ("catalog.yaml", "    eligible: 'trigger(\"callback_requested\")'",
                    "    eligibel: 'trigger(\"callback_requested\")'", "eligibel", 0,
                    'unknown key "eligibel" in action; did you mean "eligible"?'),
    "situation cycle": ("policies.yaml", "when: 'lifecycle_stage == \"prospect\"'", "when: 'contract_ending'",
                        "not prospect'", 4,
                        'situation "prospect" depends on itself: prospect -> contract_ending -> prospect'),
    "unknown channel": ("catalog.yaml", "      sms: {text: \"We're working", "      smss: {text: \"We're working",
                        "smss", 0, 'unknown channel "smss"; did you mean "sms"?'),
    "YAML indentation": ("policies.yaml", "    weight: 3.0\n", "   weight: 3.0\n", "   weight: 3.0", 3,
                         "YAML syntax error"),
    "reaching Python": ("policies.yaml", "when: 'open_cases > 0'", "when: '__import__(\"os\").system(\"ls\")'",
                        "__import__", 0, 'syntax error: "__import__"'),
    "unknown action in a test": ("tests/scenarios.yaml", "admitted: [upsell_fiber_speed, bundle_home_duo]",
                                 "admitted: [upsell_fibre_speed, bundle_home_duo]", "upsell_fibre_speed", 0,
                                 'unknown action "upsell_fibre_speed" in test "once the case is closed, sales come back"; '
                                 'did you mean "upsell_fiber_speed"?'),
    "unknown rule in a test": ("tests/scenarios.yaml", "upsell_fiber_speed: fraud_hold_stops_sales",
                               "upsell_fiber_speed: fraud_hold_stop_sales", "fraud_hold_stop_sales", 0,
                               'unknown rule "fraud_hold_stop_sales"; did you mean "fraud_hold_stops_sales"?'),
    "unknown profile field in a test": ("tests/scenarios.yaml", "profile: {new_lines_30d: 48}",
                                        "profile: {new_lines_30: 48}", "new_lines_30:", 0,
                                        'unknown profile field "new_lines_30"; did you mean "new_lines_30d"?'),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_every_kind_of_mistake_fails_check_and_test_with_file_line_col(capsys, rules_copy: Path, mistake: str) -> None:
    name, old, new, fragment, offset, message = MISTAKES[mistake]
    path = rules_copy / name
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    expected = f"{where(path, fragment, offset)}: {message}"
    for command in ("check", "test"):
        code, out = run(capsys, "rules", command, str(rules_copy))
        assert code == 1, (command, out)
        assert expected in out, f"{command}: wanted\n{expected}\ngot\n{out}"
        if command == "test":
            assert "no test ran" in out


def test_a_failing_rule_test_names_the_test_and_says_what_happened(capsys, rules_copy: Path) -> None:
    policies = rules_copy / "policies.yaml"
    policies.write_text(policies.read_text().replace(
        "  - name: fraud_hold_stops_sales\n    when: 'fraud_hold'", "  - name: fraud_hold_stops_sales\n    when: 'false'"))
    code, out = run(capsys, "rules", "check", str(rules_copy))
    assert code == 0  # the rules are well-formed; only their tests can tell
    code, out = run(capsys, "rules", "test", str(rules_copy))
    assert code == 1
    tests = rules_copy / "tests" / "scenarios.yaml"
    at = where(tests, "name: many new lines in a month block every sale")
    assert f"{at}: FAIL many new lines in a month block every sale and raise a review" in out
    assert "expected upsell_fiber_speed blocked by fraud_hold_stops_sales, but it was admitted" in out
    assert re.search(r"\d+ rule tests: \d+ passed, [1-9]\d* failed", out)


def test_failure_messages_say_where_an_action_went(capsys, rules_copy: Path) -> None:
    tests = rules_copy / "tests" / "extra.yaml"
    tests.write_text("""tests:
  - name: wrong expectations on purpose
    channel: web
    profile: {products: [mobile], open_cases: 1, consents: [web]}
    expect:
      top: upsell_fiber_speed
      admitted: [resolve_open_case, upsell_unlimited, callback_customer]
      blocked: {resolve_open_case: service_before_sales, cross_sell_broadband: eligible}
      situations: [fraud_hold]
""")
    code, out = run(capsys, "rules", "test", str(rules_copy))
    assert code == 1
    assert f"{tests}:2:5: FAIL wrong expectations on purpose" in out
    for line in ("top: expected upsell_fiber_speed, got resolve_open_case",
                 "expected upsell_unlimited admitted, but it was not eligible: holds(\"mobile\") and plan != \"unlimited\"",
                 "expected callback_customer admitted, but it has no treatment for web",
                 "expected resolve_open_case blocked by service_before_sales, but it was admitted",
                 "expected cross_sell_broadband blocked by eligible, but it was blocked by policy service_before_sales",
                 "expected situation fraud_hold to hold, but it does not"):
        assert line in out, (line, out)


@pytest.mark.parametrize("text", [
    '__import__("os")', '__import__("os").system("rm -rf /")', 'context.__class__', 'plan.upper() == "X"',
    'open_cases.real > 0', 'lambda: 1', 'lambda x: x > 1', '(lambda: True)()', 'exec("import os")',
])
def test_text_that_reaches_for_python_is_a_syntax_error(text: str) -> None:
    with pytest.raises(ConditionError) as err:
        parse(text)  # the parser refuses it: nothing is ever looked up, let alone run
    assert str(err.value).startswith("syntax error")


# --- what-if -------------------------------------------------------------------------------------------
@pytest.fixture()
def stored_customers(redis_url: str) -> str:
    from engine.sim.telco import SCHEMA
    from engine.sim.world import generate
    from engine.store.profiles import ProfileStore

    store = ProfileStore.from_url(redis_url)
    store.save(list(generate(400, seed=9).profiles()), SCHEMA)
    store.client.close()
    return redis_url


def test_what_if_reports_how_top_actions_move(capsys, stored_customers: str, models_dir: Path, rules_copy: Path,
                                              tmp_path: Path) -> None:
    # Without the control group: every decision ranked (its random offers: the test after this one).
    contact = rules_copy / "contact.yaml"
    contact.write_text(contact.read_text().split("control_group:")[0])
    old_rules = tmp_path / "old"
    shutil.copytree(rules_copy, old_rules)
    policies = rules_copy / "policies.yaml"
    policies.write_text(policies.read_text().replace("policies:\n", """policies:
  - name: no_bundles_online
    when: 'channel == "web"'
    blocks: {types: [bundle]}
    reason: "Bundles are sold in person this month"
""", 1))
    code, out = run(capsys, "rules", "diff", str(old_rules), str(rules_copy), "--customers", "300",
                    "--redis-url", stored_customers, "--models-dir", str(models_dir), "--json", "--examples", "5")
    assert code == 0, out
    report = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert report["decisions"] == 300 and report["channels"] == ["web"]
    bundles_before = sum(n for a, n in report["old_top"].items() if a.startswith("bundle_"))
    assert bundles_before > 0 and not any(a.startswith("bundle_") for a in report["new_top"])
    assert report["changed"] == bundles_before == sum(m["decisions"] for m in report["moves"])
    assert all(m["old"].startswith("bundle_") for m in report["moves"])
    assert sum(report["new_top"].values()) == sum(report["old_top"].values()) == 300
    assert len(report["examples"]) == 5
    assert all("blocked, policy no_bundles_online: Bundles are sold in person" in e["why"] for e in report["examples"])

    code, out = run(capsys, "rules", "diff", str(old_rules), str(rules_copy), "--customers", "300",
                    "--redis-url", stored_customers, "--models-dir", str(models_dir), "--channel", "call_center")
    assert code == 0 and "top action changed in 0 of 300 decisions (0.0%)" in out  # only the web changed


def test_what_if_refuses_broken_rules(capsys, stored_customers: str, models_dir: Path, rules_copy: Path) -> None:
    catalog = rules_copy / "catalog.yaml"
    catalog.write_text(catalog.read_text().replace("eligible: 'open_cases > 0'", "eligible: 'open_casez > 0'"))
    code, out = run(capsys, "rules", "diff", str(RULES_DIR), str(rules_copy), "--redis-url", stored_customers,
                    "--models-dir", str(models_dir))
    assert code == 1 and f"{catalog}:" in out and "nothing compared" in out


def test_json_schema_of_rule_tests_accepts_the_demo_tests_and_agrees_with_the_reader() -> None:
    from engine.authoring import ruletests

    from .test_rule_language import _validate, _yaml_as_json

    schema = json.loads((RULES_DIR / "schema" / "tests.schema.json").read_text())
    for path in sorted((RULES_DIR / "tests").glob("*.yaml")):
        assert _validate(_yaml_as_json(path), schema, schema) == [], path
    defs = schema["definitions"]
    assert set(schema["properties"]) == set(ruletests.FILE_KEYS)
    assert set(defs["test"]["properties"]) == set(ruletests.TEST_KEYS)
    assert set(defs["test"]["properties"]["expect"]["properties"]) == set(ruletests.EXPECT_KEYS)
    profile = defs["profile"]["properties"]  # the attributes are domain.yaml's: the schema checks their shape
    assert set(profile) == set(ruletests.SET_KEYS)
    broken = _yaml_as_json(RULES_DIR / "tests" / "scenarios.yaml")
    broken["tests"][0]["channel"] = "Fax"  # channel names are domain.yaml's: the schema checks their shape
    broken["tests"][1]["profile"]["value_tier"] = ["D"]
    broken["tests"][2]["expect"]["top"] = 3
    assert len(_validate(broken, schema, schema)) == 3


def test_what_if_keeps_the_control_groups_random_offers_apart_from_the_changes_effect(
        capsys, stored_customers: str, models_dir: Path, rules_copy: Path, tmp_path: Path) -> None:
    contact = rules_copy / "contact.yaml"
    contact.write_text(contact.read_text().replace("share: 0.1", "share: 0.5"))  # many control customers
    old_rules = tmp_path / "old"
    shutil.copytree(rules_copy, old_rules)
    argv = ["rules", "diff", str(old_rules), str(rules_copy), "--customers", "300", "--redis-url", stored_customers,
            "--models-dir", str(models_dir), "--json"]

    def diff() -> dict:
        code, out = run(capsys, *argv)
        assert code == 0, out
        return json.loads(out[out.index("{"): out.rindex("}") + 1])

    policies = rules_copy / "policies.yaml"
    policies.write_text(policies.read_text().replace("policies:\n", """policies:
  - name: nothing_for_tv_lovers_in_branches
    when: 'channel == "branch" and tv_hours_week > 1000'
    blocks: {types: [bundle]}
""", 1))
    report = diff()  # a new rule that touches no web decision: nothing moves, control group included
    assert report["changed"] == report["control_changed"] == 0 and report["moves"] == []
    assert 100 < report["control_decisions"] < 200

    policies.write_text(policies.read_text().replace("""policies:
  - name: nothing_for_tv_lovers_in_branches
""", """policies:
  - name: no_bundles_online
    when: 'channel == "web"'
    blocks: {types: [bundle]}
  - name: nothing_for_tv_lovers_in_branches
""", 1))
    report = diff()
    bundles_before = sum(n for a, n in report["old_top"].items() if a.startswith("bundle_"))
    # control customers whose random offer was not a bundle keep it: the same draw on both sides
    assert report["changed"] == bundles_before > 0 and all(m["old"].startswith("bundle_") for m in report["moves"])
    assert 0 < report["control_changed"] < report["changed"]


CAP_EVERYTHING = """contact_policies:
  - name: upsell_extra_data_once_a_week
    description: Offer upsell_extra_data at most once a week
    per: action
    max: 1
    days: 7
"""


def test_diff_and_test_say_what_a_contact_policy_applies_to_and_warn_of_a_misleading_name(
        capsys, stored_customers: str, models_dir: Path, rules_copy: Path, tmp_path: Path) -> None:
    old_rules = tmp_path / "old"
    shutil.copytree(rules_copy, old_rules)
    contact = rules_copy / "contact.yaml"
    text = contact.read_text()
    contact.write_text(text.replace("contact_policies:\n", CAP_EVERYTHING, 1))  # the trap: it caps every action
    code, out = run(capsys, "rules", "test", str(rules_copy))
    assert code == 0, out
    warning = 'mentions action "upsell_extra_data" but it limits'
    assert "upsell_extra_data_once_a_week: applies to" in out and warning in out, out
    argv = ["rules", "diff", str(old_rules), str(rules_copy), "--customers", "50", "--redis-url", stored_customers,
            "--models-dir", str(models_dir)]
    code, out = run(capsys, *argv)
    assert code == 0, out
    catalog = re.search(r"upsell_extra_data_once_a_week \(new\): applies to (\d+) of (\d+) actions \(all\)", out)
    assert catalog and catalog.group(1) == catalog.group(2), out
    assert out.count(warning) == 2, out  # its name and its description
    # it counts service actions' impressions, which no live policy counts: the history has none of them yet
    assert re.search(r"the impressions it counts \(\d+ action x channel pair\(s\), e\.g\. \w+ on \w+\) were not "
                     r"kept under the live policies, so for its first 7 days it counts only those made after", out), out
    assert "no_repeats" not in out  # unchanged policies are not listed

    contact.write_text(text.replace("contact_policies:\n", CAP_EVERYTHING + "    actions: [upsell_extra_data]\n", 1))
    code, out = run(capsys, *argv, "--json")
    assert code == 0, out
    report = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert report["contact_policies"] == [{"name": "upsell_extra_data_once_a_week", "status": "new",
                                           "applies_to": 1, "catalog": catalog and int(catalog.group(2)),
                                           "actions": ["upsell_extra_data"], "warnings": []}]

    contact.write_text(text.replace("contact_policies:\n", CAP_EVERYTHING.replace(
        "upsell_extra_data_once_a_week", "mobile_plan_weekly").replace("Offer upsell_extra_data", "Plans") +
        "    actions: [cross_sell_tv]\n", 1))
    code, out = run(capsys, "rules", "test", str(rules_copy))
    assert code == 0 and 'its name mentions group "mobile_plan" but it limits 1 other action(s) too' in out, out
    code, out = run(capsys, "rules", "test", str(RULES_DIR))
    assert code == 0 and "contact policy" not in out, out  # the demo's policies say what they limit
