"""Rule tests for event patterns: ``event_tests:`` in ``rules/tests/*.yaml``.

A test gives a customer (a partial profile, as in the other rule tests) and a timed sequence of
events (``at: 0s``, ``at: 3d``...), and expects triggers active at the end, patterns that matched and
outbound actions sent. It runs the compiled patterns (the same durable ruleset and the same window,
count and order logic as the server) on an in-memory history kept as the server keeps it (per event
type, ``EventRules.keeps``, the ids as their tags) with a simulated clock: absence timers
fire when the clock passes their due time, replays (an event ``id`` seen before) count once. An
outbound action counts as sent when the rules admit it for that customer on its channel at that
moment (triggers included); like the other rule tests, contact history, budgets and quiet hours are
not part of it (they depend on what was sent before, not on the rules).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from engine.authoring.results import TestResult, why
from engine.rules.facts import FactInputs
from engine.rules.patterns import MAX_HISTORY_EVENTS, Event, Firing, InvalidEvent, Timer, parse_duration
from engine.rules.yamlsrc import Loc

TEST_KEYS = {"name": True, "description": False, "profile": False, "events": True, "until": False, "expect": True}
EVENT_KEYS = ("at", "event", "id")
EXPECT_KEYS = {"triggers": False, "not_triggers": False, "patterns": False, "not_patterns": False, "outbound": False}
EXAMPLES = {"events": "[{at: 0s, event: <event type>}]", "expect": "{triggers: [<trigger name>]}"}  # for a missing key
START_MS = int(datetime(2026, 6, 1, 12, tzinfo=UTC).timestamp() * 1000)  # "at: 0s"


@dataclass(frozen=True)
class TimedEvent:
    at_ms: int
    event: Event


@dataclass(frozen=True)
class EventExpect:
    triggers: tuple[str, ...] = ()
    not_triggers: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    not_patterns: tuple[str, ...] = ()
    outbound: tuple[str, ...] | None = None  # None: not checked


@dataclass(frozen=True)
class EventTest:
    name: str
    where: str
    inputs: FactInputs
    events: tuple[TimedEvent, ...]
    until_ms: int
    expect: EventExpect

    def run(self, rules):
        run = _Simulation(rules, self.inputs)
        for timed in self.events:
            run.advance(timed.event.ts_ms)
            run.event(timed.event)
        run.advance(START_MS + (self.events[-1].at_ms if self.events else 0) + self.until_ms)
        active = run.active()
        e, failures = self.expect, []
        for name in e.triggers:
            if name not in active:
                failures.append(f"expected trigger {name} active at the end, but it is not"
                                + (f" (active: {', '.join(sorted(active))})" if active else ""))
        for name in e.not_triggers:
            if name in active:
                failures.append(f"expected trigger {name} not active at the end, but it is")
        for name in e.patterns:
            if name not in run.fired:
                failures.append(f"expected pattern {name} to match, but it did not"
                                + (f" (matched: {', '.join(run.fired)})" if run.fired else ""))
        for name in e.not_patterns:
            if name in run.fired:
                failures.append(f"expected pattern {name} not to match, but it did")
        if e.outbound is not None and sorted(e.outbound) != sorted(run.sent):
            detail = "; ".join(run.suppressed)
            failures.append(f"expected outbound {', '.join(e.outbound) or 'nothing'}, got {', '.join(run.sent) or 'nothing'}"
                            + (f" (suppressed: {detail})" if detail else ""))
        return TestResult(self, failures, run.sent)


class _Simulation:
    """The event processor's semantics (engine/events/processor.py) on in-memory state and a simulated clock."""

    def __init__(self, rules, inputs: FactInputs) -> None:
        self.rules = rules
        self.patterns = rules.patterns
        self.events = rules.ruleset.events
        self.inputs = inputs
        self.now = START_MS
        self.history: list[Event] = []
        self.seen: set[str] = set()
        self.triggers: dict[str, int] = {}  # name -> expiry ms
        self.timers: list[Timer] = []
        self.fired: list[str] = []
        self.sent: list[str] = []
        self.suppressed: list[str] = []
        self.outbound_done: set[tuple[str, str]] = set()

    def active(self) -> set[str]:
        return {n for n, expiry in self.triggers.items() if expiry > self.now}

    def advance(self, to_ms: int) -> None:
        while True:
            due = sorted((t for t in self.timers if t.due_ms <= to_ms), key=lambda t: t.due_ms)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer.due_ms)
            window = [e for e in self.history if timer.opened_ms <= e.ts_ms <= timer.due_ms]
            firing = self.patterns.on_timer(window, timer)
            if firing is not None:
                self.apply([firing], [])
        self.now = max(self.now, to_ms)

    def event(self, event: Event) -> None:
        if event.id in self.seen:
            return
        self.seen.add(event.id)
        keep = self.events.keep_ms
        # as the server stores and trims it: per type, in the compact member (the id as its tag)
        stored = [Event.decode(event.member(), event.ts_ms)] if keep(event.type) else []
        self.history = [e for e in self.history + stored if keep(e.type) and e.ts_ms >= self.now - keep(e.type)]
        self.history = sorted(self.history, key=lambda e: e.ts_ms)[-MAX_HISTORY_EVENTS:]
        window = [e for e in self.history if e.ts_ms >= event.ts_ms - self.events.window_ms]
        firings, timers = self.patterns.on_event(window, event)
        self.timers += timers
        self.apply(firings, sorted(self.events.clears_by_event.get(event.type, ())))

    def apply(self, firings: list[Firing], cleared: list[str]) -> None:
        raised = {f.pattern.trigger for f in firings if f.pattern.trigger}
        for name in cleared:
            if name not in raised:
                self.triggers.pop(name, None)
        for f in firings:
            self.fired.append(f.pattern.name)
            if f.pattern.trigger:
                self.triggers[f.pattern.trigger] = self.now + f.pattern.ttl_ms
        for f in firings:
            spec = f.pattern.outbound
            if spec is None or (f.pattern.name, f.event_id) in self.outbound_done:
                continue
            self.outbound_done.add((f.pattern.name, f.event_id))
            fact = self.rules.build_fact(replace(self.inputs, channel=spec.channel, triggers=frozenset(self.active())))
            outcome = self.rules.evaluate(fact)
            day = datetime.fromtimestamp(self.now / 1000, UTC).date()
            verdict = next(v for v in self.rules.verdicts(outcome, spec.channel, day) if v.action.id == spec.action)
            if verdict.admitted:
                self.sent.append(spec.action)
            else:
                self.suppressed.append(f"{spec.action} on {spec.channel}: {why(verdict, spec.channel)}")


def load_event_tests(reader, loc: Loc | None, defaults: dict, file_name: str) -> list[EventTest]:
    """``event_tests:`` of one test file through the rule-test reader (same validators and errors)."""
    check = reader.check
    events = reader.ruleset.events
    if loc is None:
        return []
    if events is None:
        reader.err(loc.error("event_tests need rules/events.yaml"))
        return []
    patterns = {p.name for p in events.patterns}
    triggers = set(reader.ruleset.triggers or ())
    actions = reader.actions
    out: list[EventTest] = []
    names = set()
    for item in check.sequence(loc, "event_tests"):
        fields = check.keys(item, TEST_KEYS, "event test", EXAMPLES)
        if fields is None:
            continue
        before = len(reader.errors)
        name = check.text(fields.get("name"), "test name")
        what = f'event test "{name or "?"}"'
        if name and name in names:  # "": no name, reported by keys()
            reader.err(fields["name"].error(f'duplicate test name "{name}" in {file_name}'))
        names.add(name)
        profile = dict(defaults)
        profile.update(reader.profile(fields.get("profile"), what) if fields.get("profile") else {})
        timed = _load_events(reader, fields.get("events"), events, what, len(out))
        until: int | None = 0
        if "until" in fields:
            until = parse_duration(fields["until"].value) if isinstance(fields["until"].value, str) else None
            if until is None:
                reader.err(fields["until"].error(f"expected a duration for until in {what}", "write e.g. 2d, 25h"))
        expect = _load_expect(reader, fields.get("expect"), what, patterns, triggers, actions)
        if len(reader.errors) > before or expect is None or until is None:
            continue
        out.append(EventTest(name, item.where(), reader.inputs(profile, "", "", {}), tuple(timed), until, expect))
    return out


def _load_events(reader, loc: Loc | None, events, what: str, test_no: int) -> list[TimedEvent]:
    check = reader.check
    out: list[TimedEvent] = []
    last = None
    for n, item in enumerate(check.sequence(loc, f"events of {what}") if loc is not None else []):
        fields = check.mapping(item, f"an event of {what}")
        if fields is None:
            continue
        at_loc, type_loc = fields.get("at"), fields.get("event")
        if at_loc is None or type_loc is None:
            reader.err(item.error(f"each event of {what} needs at: and event:",
                                  "e.g. {at: 3d, event: payment_failed, amount: 20}"))
            continue
        at = parse_duration(at_loc.value) if isinstance(at_loc.value, str) else (0 if at_loc.value == 0 else None)
        if at is None:
            reader.err(at_loc.error("expected a time since the first event for at", "write e.g. 0s, 3d, 25h"))
            continue
        if last is not None and at < last:
            reader.err(at_loc.error("events must be listed in time order"))
        last = at
        kind = check.text(type_loc, "event")
        attrs_raw = {k: v for k, v in fields.items() if k not in EVENT_KEYS}
        try:
            attrs = events.validate(kind, {k: _text(v.value) for k, v in attrs_raw.items()})
        except InvalidEvent as err:
            message = str(err).split(": ", 1)[1]
            attr_loc = attrs_raw.get(err.field.split(".", 1)[-1]) if err.field != "type" else None
            if err.field == "type":
                reader.err(type_loc.error(message))
            elif attr_loc is None:
                reader.err(item.error(message))
            else:
                reader.err(attr_loc.key_error(message) if "has no attribute" in message else attr_loc.error(message))
            continue
        event_id = check.text(fields["id"], "id") if "id" in fields else f"t{test_no}-{n}"
        out.append(TimedEvent(at, Event(event_id, kind, START_MS + at, attrs)))
    if loc is not None and not out and not reader.errors:
        reader.err(loc.error(f"{what} has no events"))
    return out


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _load_expect(reader, loc: Loc | None, what: str, patterns: set[str], triggers: set[str],
                 actions: set[str]) -> EventExpect | None:
    from engine.rules.errors import suggest

    check = reader.check
    fields = check.keys(loc, EXPECT_KEYS, f"expect of {what}") if loc is not None else None
    if fields is None:
        return None

    def names(key: str, known: set[str], singular: str) -> tuple[str, ...]:
        found = []
        for value, item in check.names(fields.get(key), key):
            if value not in known:
                reader.err(item.error(f'unknown {singular} "{value}"', suggest(value, known) or ""))
            found.append(value)
        return tuple(found)

    outbound = None
    if "outbound" in fields:
        outbound = () if fields["outbound"].value in (None, []) else names("outbound", actions, "action")
    return EventExpect(names("triggers", triggers, "trigger"), names("not_triggers", triggers, "trigger"),
                       names("patterns", patterns, "pattern"), names("not_patterns", patterns, "pattern"), outbound)


__all__ = ["EventTest", "load_event_tests"]
