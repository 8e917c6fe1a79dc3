"""Rule tests written by marketers: ``rules/tests/*.yaml``.

Each test gives a customer (a partial profile: everything not given is 0, empty or absent, after
the file's ``defaults``) and a moment (channel, touchpoint, context, day), and expects actions to be
admitted, blocked (optionally by a given rule), on top of the list, and situations to hold or not.
The decision is the real one (the compiled rule set, then arbitration) with two differences: every
action gets the same propensity (or the one the test gives), so a test checks the rules, not the
model; and there is no contact history (contact.yaml limits, budgets and the control group depend
on what was presented before, not on the rules). See rules/README.md ("Testing your rules") for the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path

import numpy as np

from engine.authoring.eventtests import EventTest, load_event_tests
from engine.authoring.results import TestResult, why
from engine.decision.arbitration import arbitrate, fallback_action
from engine.models.derived import derive
from engine.rules.errors import RuleError, suggest
from engine.rules.facts import FactInputs
from engine.rules.loader import _Loader
from engine.rules.model import RuleSet
from engine.rules.runtime import ActionVerdict, CompiledRules
from engine.rules.yamlsrc import Loc, load_yaml
from engine.store.updates import epoch_days

TESTS_DIR = "tests"
FILE_KEYS = {"description": False, "defaults": False, "tests": False, "event_tests": False}  # event_tests: eventtests.py
TEST_KEYS = {"name": True, "channel": True, "touchpoint": False, "context": False, "today": False,
             "profile": False, "propensity": False, "expect": True, "description": False}
EXPECT_KEYS = {"top": False, "admitted": False, "blocked": False, "situations": False, "not_situations": False}
SET_KEYS = ("products", "consents", "triggers")
# What "blocked: {action: RULE}" may name besides a policy: the stage it dropped out at.
STAGE_WORDS = {"eligible": "eligibility", "applicable": "applicability", "suitable": "suitability",
               "channel": "channel", "dates": "dates"}


@dataclass(frozen=True)
class Expect:
    top: tuple[str, ...] = ()
    admitted: tuple[str, ...] = ()
    blocked: dict[str, str | None] = field(default_factory=dict)  # action -> rule (None: any)
    situations: tuple[str, ...] = ()
    not_situations: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuleTest:
    name: str
    where: str  # file:line:col of the test
    inputs: FactInputs
    expect: Expect
    today: date | None = None
    propensity: dict[str, float] = field(default_factory=dict)


def test_files(rules_dir: Path) -> list[Path]:
    folder = Path(rules_dir) / TESTS_DIR
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def load_tests(rules_dir: Path, ruleset: RuleSet) -> tuple[list[RuleTest | EventTest], list[RuleError]]:
    """Every test in ``rules_dir/tests/*.yaml`` and every error in those files."""
    reader = _TestReader(Path(rules_dir), ruleset)
    tests: list[RuleTest | EventTest] = []
    for path in test_files(rules_dir):
        tests += reader.load_file(path)
    return tests, reader.errors


def run_tests(rules: CompiledRules, tests: list[RuleTest | EventTest]) -> list[TestResult]:
    return [t.run(rules) if hasattr(t, "run") else run_test(rules, t) for t in tests]


def run_test(rules: CompiledRules, test: RuleTest) -> TestResult:
    channel = test.inputs.channel
    fact = rules.build_fact(test.inputs)
    outcome = rules.evaluate(fact)
    verdicts = {v.action.id: v for v in rules.verdicts(outcome, channel, test.today)}
    admitted = [v for v in verdicts.values() if v.admitted]
    propensity = np.array([test.propensity.get(v.action.id, 1.0) for v in admitted])
    ranked_ids = [a.action_id for a in arbitrate(admitted, propensity, channel, max(len(test.expect.top), 3), None)]
    if not ranked_ids:
        action = fallback_action(rules, outcome, channel, None)
        ranked_ids = [action.id] if action is not None else []
    expect, failures = test.expect, []
    if expect.top and tuple(ranked_ids[: len(expect.top)]) != expect.top:
        shown = ", ".join(ranked_ids) or "nothing"
        failures.append(f"top: expected {', '.join(expect.top)}, got {shown}")
    for aid in expect.admitted:
        v = verdicts[aid]
        if not v.admitted:
            failures.append(f"expected {aid} admitted, but {why(v, channel)}")
    for aid, rule in expect.blocked.items():
        v = verdicts[aid]
        what = f"expected {aid} blocked" + (f" by {rule}" if rule else "")
        if v.admitted:
            failures.append(f"{what}, but it was admitted")
        elif rule and not _blocked_by(v, rule):
            failures.append(f"{what}, but {why(v, channel)}")
    for name in expect.situations:
        if name not in outcome.situations:
            failures.append(f"expected situation {name} to hold, but it does not")
    for name in expect.not_situations:
        if name in outcome.situations:
            failures.append(f"expected situation {name} not to hold, but it does")
    return TestResult(test, failures, ranked_ids)


def _blocked_by(v: ActionVerdict, rule: str) -> bool:
    if rule in STAGE_WORDS:
        return v.stage == STAGE_WORDS[rule]
    return v.stage == "policy" and rule in v.blocked_by


class _TestReader:
    """Reads test files with the rule loader's validators (same messages, same file:line:col)."""

    def __init__(self, rules_dir: Path, ruleset: RuleSet):
        self.check = _Loader(rules_dir)
        self.check.schema = self.schema = ruleset.schema
        self.ruleset = ruleset
        self.actions = {a.id for a in ruleset.actions}
        self.policies = {p.name for p in ruleset.policies}

    @property
    def errors(self) -> list[RuleError]:
        return self.check.errors

    def err(self, error: RuleError) -> None:
        self.check.err(error)

    def load_file(self, path: Path) -> list[RuleTest | EventTest]:
        tree, _source, errors = load_yaml(path, str(path))
        self.errors.extend(errors)
        if tree is None:
            return []
        top = self.check.keys(tree, FILE_KEYS, path.name)
        if top is None:
            return []
        defaults = self.profile(top.get("defaults"), "defaults") if "defaults" in top else {}
        tests: list[RuleTest | EventTest] = []
        names = set()
        for item in self.check.sequence(top["tests"], "tests") if "tests" in top else []:
            test = self.load_test(item, defaults)
            if test is None:
                continue
            if test.name and test.name in names:  # "": no name, reported by keys()
                self.err(item.error(f'duplicate test name "{test.name}" in {path.name}'))
            names.add(test.name)
            tests.append(test)
        if "tests" not in top and "event_tests" not in top:
            self.err(tree.error(f"{path.name} has no tests", "add tests: or event_tests:"))

        tests += load_event_tests(self, top.get("event_tests"), defaults, path.name)
        return tests

    def load_test(self, item: Loc, defaults: dict) -> RuleTest | None:
        fields = self.check.keys(item, TEST_KEYS, "test", {"expect": "{admitted: [<action id>]}"})
        if fields is None:
            return None
        errors_before = len(self.errors)
        name = self.check.text(fields.get("name"), "test name")
        what = f'test "{name or "?"}"'
        channel = self.check.text(fields.get("channel"), f"{what} channel")
        channels = self.schema.channel_names
        if channel and channel not in channels:
            hint = suggest(channel, channels) or "channels: " + ", ".join(channels)
            self.err(fields["channel"].error(f'unknown channel "{channel}"', hint))
        touchpoint = self.check.text(fields.get("touchpoint"), f"{what} touchpoint")
        context = {}
        for key, value in (self.check.mapping(fields.get("context"), f"{what} context") or {}).items():
            context[key] = self.check.text(value, f"context.{key}")
        today = self.check.day(fields.get("today"), "today")
        profile = dict(defaults)
        profile.update(self.profile(fields.get("profile"), what) if fields.get("profile") else {})
        propensity = {}
        for aid, value in (self.check.mapping(fields.get("propensity"), f"{what} propensity") or {}).items():
            self.known_action(aid, value, what, key=True)
            number = self.check.number(value, f"propensity of {aid}", positive=True)
            if number is not None:
                propensity[aid] = float(number)
        expect = self.expect(fields.get("expect"), what)
        if len(self.errors) > errors_before or expect is None:
            return None
        at = datetime.combine(today, time(12), UTC).timestamp() if today else None
        return RuleTest(name, item.where(), self.inputs(profile, channel, touchpoint, context, at), expect, today,
                        propensity)

    # --- profile --------------------------------------------------------------------------------
    def profile(self, loc: Loc | None, what: str) -> dict:
        """Profile fields as plain values (numbers, levels, sets), errors reported."""
        items = self.check.mapping(loc, f"the profile of {what}")
        if not items:
            return {}
        schema = self.schema
        out: dict[str, float | str | set[str]] = {}
        known = [*schema.numbers, *schema.categorical, *SET_KEYS, *(s for s in schema.sets if s != "consent")]
        for key, value in items.items():
            if key in schema.dates:  # a date (or a timestamp), kept as days since 1970-01-01 UTC
                day = self.check.day(value, key) if not isinstance(value.value, datetime) else value.value
                if day is not None:
                    out[key] = epoch_days(day)
            elif key in schema.numbers:
                number = self.check.number(value, key)
                if number is not None:
                    out[key] = float(number)
            elif key in schema.categorical:
                level = self.check.text(value, key)
                levels = schema.categorical[key]
                if level and level not in levels:
                    hint = suggest(level, levels) or "levels: " + ", ".join(levels)
                    self.err(value.error(f'"{level}" is not a level of {key}', hint))
                else:
                    out[key] = level
            elif key in schema.sets and key != "consent":  # products and the other set attributes
                out[key] = self.members(value, key, schema.sets[key], "member")
            elif key == "consents":
                if value.is_scalar and value.value in ("all", "none"):
                    out[key] = set(schema.channel_names) if value.value == "all" else set()
                else:
                    out[key] = self.members(value, key, schema.channel_names, "channel")
            elif key == "triggers":
                declared = self.ruleset.triggers
                out[key] = self.members(value, key, declared, "trigger") if declared is not None else {
                    n for n, _ in self.check.names(value, key)}
            else:
                hint = suggest(key, known) or "see the feature list in rules/README.md"
                self.err(value.key_error(f'unknown profile field "{key}"', hint))
        return out

    def members(self, loc: Loc, key: str, allowed, singular: str) -> set[str]:
        found = set()
        for name, item in self.check.names(loc, key):
            if name not in allowed:
                hint = suggest(name, allowed) or f"{key}: " + ", ".join(allowed)
                self.err(item.error(f'unknown {singular} "{name}"', hint))
            found.add(name)
        return found

    def inputs(self, profile: dict, channel: str, touchpoint: str, context: dict, now: float | None = None) -> FactInputs:
        """The decision's input as in production: stored numbers as float32 (declared defaults for those
        the test leaves out), derived ones computed from them at ``now`` (unless the test gives them);
        categories the test leaves out are "" (no level)."""
        schema = self.schema
        stored = np.array([profile.get(n, schema.defaults.get(n, 0.0)) for n in schema.numeric], dtype=np.float32)
        derived = derive(stored, schema, now)
        for i, name in enumerate(schema.derived):
            if name in profile:
                derived[i] = profile[name]
        categories = {k: v for k, v in profile.items() if k in schema.categorical}
        return FactInputs(numbers=np.concatenate((stored, derived)), categories=categories,
                          products=frozenset(profile.get("products", ())),
                          consents=frozenset(profile.get("consents", ())), channel=channel,
                          touchpoint=touchpoint, context=context, triggers=frozenset(profile.get("triggers", ())),
                          sets={name: frozenset(profile.get(name, ())) for name in schema.sets if name != "consent"})

    # --- expectations -----------------------------------------------------------------------------
    def expect(self, loc: Loc | None, what: str) -> Expect | None:
        fields = self.check.keys(loc, EXPECT_KEYS, f"expect of {what}") if loc is not None else None
        if loc is None or fields is None:
            return None
        if not fields:
            self.err(loc.error(f"{what} expects nothing", "give top, admitted, blocked or situations"))
            return None
        blocked: dict[str, str | None] = {}
        loc_blocked = fields.get("blocked")
        if loc_blocked is not None and loc_blocked.is_map:
            for aid, rule_loc in loc_blocked.value.items():
                self.known_action(aid, rule_loc, what, key=True)
                rule = None if rule_loc.value in (None, "any") else self.check.text(rule_loc, f"rule blocking {aid}")
                if rule and rule not in self.policies and rule not in STAGE_WORDS:
                    hint = (suggest(rule, [*self.policies, *STAGE_WORDS])
                            or "name a policy, or eligible / applicable / suitable / channel / dates")
                    self.err(rule_loc.error(f'unknown rule "{rule}"', hint))
                blocked[aid] = rule
        else:
            blocked = {aid: None for aid in self.action_list(loc_blocked, what)}
        return Expect(
            top=tuple(self.action_list(fields.get("top"), what)),
            admitted=tuple(self.action_list(fields.get("admitted"), what)),
            blocked=blocked,
            situations=tuple(self.situation_list(fields.get("situations"))),
            not_situations=tuple(self.situation_list(fields.get("not_situations"))),
        )

    def action_list(self, loc: Loc | None, what: str) -> list[str]:
        out = []
        for aid, item in self.check.names(loc, "actions"):
            self.known_action(aid, item, what)
            out.append(aid)
        return out

    def known_action(self, aid: str, loc: Loc, what: str, key: bool = False) -> None:
        if aid not in self.actions:
            hint = suggest(aid, self.actions) or "see the ids in catalog.yaml"
            message = f'unknown action "{aid}" in {what}'
            self.err(loc.key_error(message, hint) if key else loc.error(message, hint))

    def situation_list(self, loc: Loc | None) -> list[str]:
        out = []
        for name, item in self.check.names(loc, "situations"):
            if name not in self.ruleset.situations:
                hint = suggest(name, self.ruleset.situations) or "see situations: in policies.yaml"
                self.err(item.error(f'unknown situation "{name}"', hint))
            out.append(name)
        return out
