"""events.yaml: errors name file:line:col with a hint; pattern semantics on the compiled ruleset."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.authoring.check import check
from engine.rules.patterns import Event, parse_duration
from engine.rules.runtime import load_and_compile

from .conftest import RULES_DIR

DAY = 86_400_000


def _errors(rules_dir: Path, old: str, new: str) -> list[str]:
    path = rules_dir / "events.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return [str(e) for e in check(rules_dir)]


def _line_of(rules_dir: Path, needle: str) -> int:
    return next(i for i, line in enumerate((rules_dir / "events.yaml").read_text().splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old, new, needle, message", [
    ("where: 'amount > 0'", "where: 'amont > 0'", "amont", 'unknown attribute "amont" of event payment_failed; did you mean "amount"?'),
    ("when: 'used_ratio >= 0.9'", "when: 'used_ratio >= \"high\"'", "used_ratio >=", "cannot compare a number with text"),
    ("severity != \"low\"", "severity != \"lo\"", "severity !=", '"lo" is not a level of severity'),
    ("{trigger: data_cap_near, ttl: 3d}", "{trigger: data_cap_nearr, ttl: 3d}", "data_cap_nearr", 'unknown trigger "data_cap_nearr"; did you mean "data_cap_near"?'),
    ("{event: payment_failed, where", "{event: payment_faild, where", "payment_faild", 'unknown event type "payment_faild"; did you mean "payment_failed"?'),
    ("ttl: 14d}\n    outbound", "ttl: 14 days}\n    outbound", "14 days", "expected a duration"),
    ("channel: sms}", "channel: push}", "channel: push", '"push" is not an outbound channel; outbound channels (domain.yaml): mobile_app, email, sms'),
    ("holds", "holds", "", ""),
])
def test_mistakes_in_events_yaml_name_file_line_and_column(rules_copy: Path, old, new, needle, message) -> None:
    if not needle:  # conditions on events cannot use profile functions
        errors = _errors(rules_copy, "when: 'used_ratio >= 0.9'", "when: 'holds(\"tv\")'")
        assert any("holds() is not available in event conditions" in e for e in errors), errors
        return
    errors = _errors(rules_copy, old, new)
    line = _line_of(rules_copy, needle)
    matching = [e for e in errors if message in e]
    assert matching, errors
    assert matching[0].startswith(f"{rules_copy / 'events.yaml'}:{line}:"), matching


def test_a_declared_trigger_no_pattern_raises_is_an_error(rules_copy: Path) -> None:
    policies = rules_copy / "policies.yaml"
    policies.write_text(policies.read_text().replace("  - callback_overdue\n", "  - callback_overdue\n  - never_raised\n", 1))
    assert any('trigger "never_raised" is declared in policies.yaml but no pattern raises it' in str(e)
               for e in check(rules_copy))


def test_durations() -> None:
    assert parse_duration("7d") == 7 * DAY and parse_duration("24h") == DAY and parse_duration("500ms") == 500
    assert parse_duration("1.5h") == 5_400_000 and parse_duration("7 days") is None and parse_duration("") is None


def test_pattern_kinds_on_the_compiled_ruleset() -> None:
    rules = load_and_compile(RULES_DIR)
    try:
        p = rules.patterns
        pay = [Event("a", "payment_failed", 0, {"amount": 5.0}), Event("b", "payment_failed", 6 * DAY, {"amount": 5.0})]
        assert [f.pattern.name for f in p.on_event(pay, pay[1])[0]] == ["repeated_payment_failure"]
        late = [pay[0], Event("c", "payment_failed", 7 * DAY + 1, {"amount": 5.0})]
        assert p.on_event(late, late[1]) == ([], [])  # outside the 7-day window
        # the count is decided on arrival of the completing event only, not by an older one
        assert p.on_event(pay, pay[0])[0] == []
        usage = Event("u", "data_usage", 0, {"used_ratio": 0.9})
        assert [f.pattern.name for f in p.on_event([usage], usage)[0]] == ["data_cap_near"]
        request = Event("r", "contact_request", 0, {"topic": "sales"})
        firings, (timer,) = p.on_event([request], request)
        assert [f.pattern.name for f in firings] == ["callback_request"] and timer.due_ms == DAY
        assert p.on_timer([request], timer).pattern.name == "callback_overdue"
        called = Event("k", "call_completed", DAY - 1)
        assert p.on_timer([request, called], timer) is None
        too_late = Event("k2", "call_completed", DAY + 1)
        assert p.on_timer([request, too_late], timer) is not None
        assert p.sessions_open == 0
    finally:
        rules.close()
    assert rules.patterns.closed


def test_sessions_that_were_not_deleted_would_fail_at_1025() -> None:
    """Why every evaluation deletes its session: the 1,025th live session of a ruleset fails. After
    3,000 evaluations through ``match`` the same ruleset still takes 1,024 new sessions."""
    import durable_rules_engine

    rules = load_and_compile(RULES_DIR)
    try:
        p = rules.patterns
        for i in range(3_000):
            event = Event(f"e{i}", "payment_failed", i, {"amount": 1.0})
            assert p.match([event]) == {("repeated_payment_failure", "on"): {0}, ("complaint_then_payment_failure", "then"): {0}}
        handle = p._holder[0]
        for sid in range(1_024):
            durable_rules_engine.assert_fact(handle, f'{{"sid":"leak{sid}","id":"f","e":"call_completed"}}')
        with pytest.raises(MemoryError):
            durable_rules_engine.assert_fact(handle, '{"sid":"leak1024","id":"f","e":"call_completed"}')
    finally:
        rules.close()  # deleting the ruleset frees its sessions


def test_event_rule_tests_fail_and_err_with_file_line_and_column(rules_copy: Path) -> None:
    from engine.authoring.check import test

    tests = rules_copy / "tests" / "events.yaml"
    text = tests.read_text()
    tests.write_text(text.replace("      - {at: 3d, event: payment_failed, amount: 35}",
                                  "      - {at: 9d, event: payment_failed, amount: 35}", 1))
    rules, errors, results = test(rules_copy)
    rules.close()
    assert not errors
    (failed,) = [r for r in results if not r.passed]
    line = next(i for i, l in enumerate(tests.read_text().splitlines(), 1) if "two failed payments within a week" in l)
    assert failed.render().startswith(f"{tests}:{line}:5: FAIL two failed payments within a week")
    assert "expected pattern repeated_payment_failure to match, but it did not" in failed.render()
    assert "expected outbound payment_help_plan, got nothing" in failed.render()

    tests.write_text(text.replace("{at: 0s, event: data_usage, used_ratio: 0.93}", "{at: 0s, event: data_usage, used_ratoi: 0.93}", 1))
    errors = [str(e) for e in check(rules_copy)]
    line = next(i for i, l in enumerate(tests.read_text().splitlines(), 1) if "used_ratoi" in l)
    assert any(e.startswith(f"{tests}:{line}:") and 'did you mean "used_ratio"' in e for e in errors), errors
