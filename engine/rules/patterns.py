"""Event types and event patterns: ``rules/events.yaml``, compiled to one durable-rules ruleset.

A pattern has one of four kinds, each made of *parts* (an event type and an optional condition on
that event's attributes, written in the condition language):

- ``count``     at least N events of a part within a window, counted when such an event arrives;
- ``threshold`` one event whose attributes satisfy a condition (a count of 1 with no window);
- ``sequence``  an event of ``then`` arriving at most ``within`` after an event of ``first``;
- ``absence``   an event of ``after``, then *no* event of ``missing`` within ``within``: decided by a
                timer at the due time (kept in Redis, see ``engine/events/timers.py``).

Evaluation: the customer's recent history (kept in Redis, not in durable-rules) is asserted as one
fact per event into a fresh durable session (one per evaluation, deleted afterwards: durable holds at
most 1024 sessions per ruleset). One durable rule per part matches the event type and the attribute
condition, so durable decides which events are *relevant* to which part; the windows, counts and
order of events are then checked on those matches here. The pattern ruleset is built with the rest of
the rule set (``CompiledRules.patterns``), so a hot reload swaps both together.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import math
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import durable_rules_engine

from engine.errors import NbaError
from engine.features import FeatureSchema
from engine.rules.checker import IDENT, NUM, STR, Scope, Ty, _Checker, _compare_hint
from engine.rules.compile import condition_json
from engine.rules.errors import ConditionError, RuleError, suggest
from engine.rules.facts import GUARD_FIELD, to_json
from engine.rules.nodes import And, Compare, Field, Node, Str
from engine.rules.normalize import MAX_MARKERS, TooComplex, markers, prepare
from engine.rules.parser import parse_all

log = logging.getLogger(__name__)

EVENTS_FILE = "events.yaml"
KINDS = ("count", "threshold", "sequence", "absence")
PARTS = {"count": ("on",), "threshold": ("on",), "sequence": ("first", "then"), "absence": ("after", "missing")}
HISTORY_PARTS = ("first", "missing")  # with a count's "on": the parts whose events are read from the history
ATTRIBUTE_TYPES = ("number", "text")  # or a list of levels
MAX_HISTORY_EVENTS = 200  # per customer, newest kept
MIN_HISTORY_MS = 86_400_000  # history kept at least a day even when every window is shorter
EVENT_FIELD, INDEX_FIELD = "e", "i"
CATCH_ALL = "nba$all"

FILE_KEYS = {"event_types": True, "patterns": False, "description": False}
TYPE_KEYS = {"attributes": False, "sets": False, "description": False}
PATTERN_KEYS = {"name": True, "description": False, "raise": False, "outbound": False, "cleared_by": False,
                **{k: False for k in KINDS}}
SPEC_KEYS = {
    "count": {"event": True, "where": False, "at_least": False, "within": True},
    "threshold": {"event": True, "when": True},
    "sequence": {"first": True, "then": True, "within": True},
    "absence": {"after": True, "missing": True, "within": True},
}
PART_KEYS = {"event": True, "where": False}
RAISE_KEYS = {"trigger": True, "ttl": True}
OUTBOUND_KEYS = {"action": True, "channel": True}
CLEARED_KEYS = {"events": False, "responses": False}
CLEARING_OUTCOMES = ("accepted", "rejected")
CONSENT_WITHDRAWN = "consent_withdrawn"  # built-in event type whose ``channel`` leaves the profile's consent
ALL_CHANNELS = "all"  # its ``channel`` for every channel at once

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int | None:
    """Milliseconds of ``7d``, ``24h``, ``30m``, ``10s``, ``500ms``; None when not a duration."""
    match = _DURATION.match(str(text))
    if not match:
        return None
    ms = float(match.group(1)) * _UNIT_MS[match.group(2)]
    return int(ms) if math.isfinite(ms) else None  # 400 digits make inf


def attribute_field(name: str) -> str:
    return f"a__{name}"


# --- the model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttributeType:
    name: str
    kind: str  # "num", "str" (free text) or "cat" (one of ``levels``)
    levels: tuple[str, ...] = ()

    def describe(self) -> str:
        return {"num": "a number", "str": "text"}.get(self.kind, "one of: " + ", ".join(self.levels))

    def parse(self, raw: str) -> float | str:
        """The attribute value from its text form; ValueError says what was expected."""
        if self.kind == "num":
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f'"{raw}" is not a number') from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f'"{raw}" is not a finite number')
            return value
        if self.kind == "cat" and raw not in self.levels:
            hint = suggest(raw, self.levels)
            raise ValueError(f'"{raw}" is not one of: {", ".join(self.levels)}' + (f"; {hint}" if hint else ""))
        if len(raw) > 1000:
            raise ValueError("at most 1000 characters")
        return raw


@dataclass(frozen=True)
class EventType:
    name: str
    attributes: dict[str, AttributeType]
    description: str = ""
    sets: dict[str, str] = field(default_factory=dict)  # profile attribute (domain.yaml) -> event attribute


@dataclass(frozen=True)
class Part:
    event: str
    where: Node | None = None
    where_text: str = ""


@dataclass(frozen=True)
class Outbound:
    action: str
    channel: str


@dataclass(frozen=True, eq=False)
class Pattern:
    name: str
    kind: str
    parts: dict[str, Part]
    within_ms: int = 0
    at_least: int = 1
    trigger: str | None = None
    ttl_ms: int = 0
    outbound: Outbound | None = None
    description: str = ""
    source: str = ""


@dataclass(eq=False)
class EventRules:
    """What ``events.yaml`` declares; ``clears_by_event`` / ``clears_by_response`` map an event type /
    an (action, outcome) to the triggers it resolves."""

    types: dict[str, EventType]
    patterns: tuple[Pattern, ...]
    clears_by_event: dict[str, frozenset[str]] = field(default_factory=dict)
    clears_by_response: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    @property
    def window_ms(self) -> int:
        """The longest window of any pattern: how much history an evaluation needs."""
        return max((p.within_ms for p in self.patterns), default=0)

    @cached_property
    def keeps(self) -> dict[str, int]:
        """Event type -> how long (ms) an event of it stays in the customer's history; types no pattern
        part names are not in it (never stored). A part whose events are read from the history (a count's
        ``on``, a sequence's ``first``, an absence's ``missing``) keeps them its pattern's window; a part
        that reads only the arriving event (a threshold, a sequence's ``then``, an absence's ``after``)
        adds nothing to it. Every kept type gets ``MIN_HISTORY_MS`` more, for late timers and events
        that arrive after their time."""
        out: dict[str, int] = {}
        for p in self.patterns:
            for key, part in p.parts.items():
                read = p.kind == "count" or key in HISTORY_PARTS
                out[part.event] = max(out.get(part.event, 0), p.within_ms if read else 0)
        return {t: ms + MIN_HISTORY_MS for t, ms in out.items()}

    @cached_property
    def keeps_json(self) -> str:
        """``keeps`` as the ingest script takes it (made once per rule set, not per event)."""
        return json.dumps(self.keeps, separators=(",", ":"))

    def keep_ms(self, event_type: str) -> int:
        """How long an event of ``event_type`` must stay in the history for the patterns to read it; 0:
        never stored."""
        return self.keeps.get(event_type, 0)

    def by_name(self, name: str) -> Pattern | None:
        return next((p for p in self.patterns if p.name == name), None)

    def validate(self, event_type: str, attributes: dict[str, str]) -> dict[str, float | str]:
        """Typed attributes of an event; raises ``InvalidEvent`` naming the field at fault."""
        declared = self.types.get(event_type)
        if declared is None:
            known = sorted(self.types)
            hint = suggest(event_type, known)
            raise InvalidEvent("type", f'unknown event type "{event_type}"' + (f"; {hint}" if hint else "")
                               + f" (known: {', '.join(known)})")
        out: dict[str, float | str] = {}
        for name, raw in attributes.items():
            attr = declared.attributes.get(name)
            if attr is None:
                hint = suggest(name, declared.attributes)
                allowed = ", ".join(declared.attributes) or "none"
                raise InvalidEvent(f"attributes.{name}", f'{event_type} has no attribute "{name}"'
                                   + (f"; {hint}" if hint else "") + f" (attributes: {allowed})")
            try:
                out[name] = attr.parse(raw)
            except ValueError as err:
                raise InvalidEvent(f"attributes.{name}", f"expected {attr.describe()}: {err}") from None
        missing = [n for n in declared.attributes if n not in attributes]
        if missing:
            raise InvalidEvent(f"attributes.{missing[0]}", f"{event_type} needs attribute {missing[0]} "
                               f"({declared.attributes[missing[0]].describe()})")
        return out


class InvalidEvent(NbaError, ValueError):
    """An event that does not match its declaration; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


MEMBER_SEP = "\x1f"  # between the fields of a history member (no type, tag or JSON text holds it)


def id_tag(event_id: str) -> str:
    """A short stable digest of an event id (11 characters): what the history stores in place of the id.
    64 bits: two distinct events fold into one member (same type, attributes and time) or are taken for
    each other (``CompiledPatterns.on_event``) only when their ids' digests collide, about n * n / 2**65
    for the n <= 200 events of a customer's history."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class Event:
    id: str  # decoded from a history member: its ``id_tag``
    type: str
    ts_ms: int
    attrs: dict = field(default_factory=dict)

    def member(self) -> str:
        """The history member: ``<type>\\x1f<id tag>\\x1f<attributes JSON, '' when none>``; the time is
        the member's score. Short enough (about 50 bytes for short attributes) for Redis to keep a
        customer's history in its compact listpack encoding."""
        attrs = json.dumps(self.attrs, separators=(",", ":")) if self.attrs else ""
        return MEMBER_SEP.join((self.type, id_tag(self.id), attrs))

    def encode(self) -> str:
        """The earlier history member (JSON with the id and time), still read until it ages out."""
        return json.dumps({"id": self.id, "t": self.type, "ts": self.ts_ms, "a": self.attrs}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str, score: float | None = None) -> Event:
        """A history member of either layout; ``score`` (its time, ms) is needed for the compact one."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.startswith("{"):
            d = json.loads(text)
            return cls(d["id"], d["t"], int(d["ts"]), d.get("a") or {})
        if score is None:
            raise ValueError("a compact history member needs its score")
        kind, tag, attrs = text.split(MEMBER_SEP, 2)
        return cls(tag, kind, int(score), json.loads(attrs) if attrs else {})


# --- conditions on event attributes -----------------------------------------------------------------

class _EventChecker(_Checker):
    """The condition checker with an event's attributes as the only names."""

    def __init__(self, event: EventType):
        super().__init__(Scope(FeatureSchema()))
        self.event = event

    def _Name(self, node):
        attr = self.event.attributes.get(node.name)
        span = {"pos": node.pos, "end": node.end}
        if attr is None:
            names = list(self.event.attributes)
            hint = suggest(node.name, names) or (f"attributes of {self.event.name}: " + ", ".join(names)
                                                 if names else f"{self.event.name} has no attributes")
            self.error(node, f'unknown attribute "{node.name}" of event {self.event.name}', hint)
            return node, None
        if attr.kind == "num":
            return Field(attribute_field(attr.name), "num", **span), NUM
        if attr.kind == "cat":
            return Field(attribute_field(attr.name), "str", **span), Ty("cat", attr.name, attr.levels)
        return Field(attribute_field(attr.name), "str", **span), STR

    def _Call(self, node):
        self.error(node, f"{node.func}() is not available in event conditions",
                   f"use the attributes of {self.event.name}")
        return node, None

    def _ContextRef(self, node):
        self.error(node, "context is not available in event conditions", f"use the attributes of {self.event.name}")
        return node, None


def check_event_condition(text: str, event: EventType) -> tuple[Node | None, list[ConditionError]]:
    tree, errors = parse_all(text)
    if tree is None:
        return None, errors
    checker = _EventChecker(event)
    resolved, ty = checker.expr(tree)
    if ty is not None and ty.kind != "bool":
        checker.error(tree, f"expected a condition (true or false) but this is {ty.describe()}", _compare_hint(ty))
    errors = sorted([*errors, *checker.errors], key=lambda e: e.pos)
    return (None, errors) if errors else (resolved, [])


# --- loading ------------------------------------------------------------------------------------

def load_events(loader, rules_dir: Path, actions: Sequence, triggers: Iterable[str] | None) -> EventRules | None:
    """``events.yaml`` (optional) through the rule loader's validators; errors go to ``loader``."""
    if not loader.has(EVENTS_FILE):
        return None
    path = Path(rules_dir) / EVENTS_FILE
    tree = loader.yaml(EVENTS_FILE)
    top = loader.keys(tree, FILE_KEYS, EVENTS_FILE) if tree is not None else None
    if not top:
        return EventRules({}, ())
    errors_before = len(loader.errors)
    types = _load_types(loader, top.get("event_types"))
    declared = set(triggers) if triggers is not None else None
    by_id = {a.id: a for a in actions}
    patterns, seen = [], set()
    clears_event: dict[str, set[str]] = {}
    clears_response: dict[tuple[str, str], set[str]] = {}
    for item in loader.sequence(top["patterns"], "patterns") if "patterns" in top else []:
        fields = loader.keys(item, PATTERN_KEYS, "pattern")
        if fields is None:
            continue
        name = loader.ident(fields.get("name"), "pattern name")
        if name and name in seen:  # "": no name, reported by keys()
            loader.err(fields["name"].error(f'duplicate pattern name "{name}"'))
        seen.add(name)
        what = f'pattern "{name or "?"}"'
        kinds = [k for k in KINDS if k in fields]
        if len(kinds) != 1:
            loader.err(item.error(f"{what} needs exactly one of: {', '.join(KINDS)}"
                                  + (f" (it has {', '.join(kinds)})" if kinds else "")))
            continue
        kind = kinds[0]
        spec = loader.keys(fields[kind], SPEC_KEYS[kind], f"{what} {kind}",
                           {"when": "'amount > 0'"} if kind == "threshold" else None)
        if spec is None:
            continue
        parts: dict[str, Part] = {}
        if kind in ("count", "threshold"):
            cond_key = "where" if kind == "count" else "when"
            part = _load_part(loader, spec.get("event"), spec.get(cond_key), types, what)
            if part is not None:
                parts["on"] = part
        else:
            for key in PARTS[kind]:
                sub = loader.keys(spec[key], PART_KEYS, f"{what} {key}") if key in spec else None
                if sub is not None:
                    part = _load_part(loader, sub.get("event"), sub.get("where"), types, f"{what} {key}")
                    if part is not None:
                        parts[key] = part
        # None leaves the pattern out: a missing required key is reported by keys(), a bad value by _duration()
        within: int | None = 0
        if "within" in spec:
            within = _duration(loader, spec["within"], f"{what} within")
        elif SPEC_KEYS[kind].get("within"):
            within = None
        at_least = loader.number(spec.get("at_least"), f"{what} at_least", positive=True) if "at_least" in spec else 1
        if at_least is not None and int(at_least) != at_least:
            loader.err(spec["at_least"].error(f"{what} at_least must be a whole number"))
            at_least = None
        ttl: int | None
        trigger, ttl = None, 0
        if "raise" in fields:
            raised = loader.keys(fields["raise"], RAISE_KEYS, f"{what} raise") or {}
            trigger = loader.ident(raised["trigger"], "trigger") if "trigger" in raised else None
            if trigger and declared is not None and trigger not in declared:
                hint = suggest(trigger, declared) or "declare it under triggers: in policies.yaml"
                loader.err(raised["trigger"].error(f'unknown trigger "{trigger}"', hint))
            ttl = _duration(loader, raised["ttl"], f"{what} ttl") if "ttl" in raised else None
        outbound = _load_outbound(loader, fields.get("outbound"), by_id, what) if "outbound" in fields else None
        if "raise" not in fields and "outbound" not in fields:
            loader.err(item.error(f"{what} neither raises a trigger nor sends anything",
                                  "add raise: {trigger: NAME, ttl: 7d} or outbound: {action: ID, channel: email}"))
        if "cleared_by" in fields:
            cleared = loader.keys(fields["cleared_by"], CLEARED_KEYS, f"{what} cleared_by") or {}
            if trigger is None and cleared:
                loader.err(fields["cleared_by"].error(f"{what} has cleared_by but raises no trigger"))
            for event, loc in loader.names(cleared.get("events"), "cleared_by events"):
                if event not in types:
                    loc_hint = suggest(event, types) or "declare it under event_types:"
                    loader.err(loc.error(f'unknown event type "{event}"', loc_hint))
                elif trigger:
                    clears_event.setdefault(event, set()).add(trigger)
            for aid, loc in loader.names(cleared.get("responses"), "cleared_by responses"):
                if aid not in by_id:
                    loader.ref_err("action", loc.error(f'unknown action "{aid}"',
                                                       suggest(aid, by_id) or "see the ids in catalog.yaml"))
                elif trigger:
                    for outcome in CLEARING_OUTCOMES:
                        clears_response.setdefault((aid, outcome), set()).add(trigger)
        if len(parts) == len(PARTS[kind]) and within is not None and at_least is not None and ttl is not None:
            if kind != "threshold" and within <= 0:
                loader.err(spec["within"].error(f"{what} within must be longer than 0"))
                continue
            if trigger and ttl <= 0:
                loader.err(fields["raise"].error(f"{what} needs a ttl longer than 0"))
                continue
            patterns.append(Pattern(name, kind, parts, within, int(at_least), trigger, ttl, outbound,
                                    loader.text(fields.get("description"), "description"), item.where()))
    if declared is not None and len(loader.errors) == errors_before:  # else a broken pattern would count
        raised = {p.trigger for p in patterns if p.trigger}
        for name in sorted(declared - raised) if patterns else ():
            loader.err(RuleError(str(path), 1, 1, f'trigger "{name}" is declared in policies.yaml but no pattern raises it',
                                 "add a pattern with raise: {trigger: " + name + ", ttl: ...} or remove the declaration"))
    return EventRules(types, tuple(patterns),
                      {k: frozenset(v) for k, v in clears_event.items()},
                      {k: frozenset(v) for k, v in clears_response.items()})


def _duration(loader, loc, what: str) -> int | None:
    ms = parse_duration(loc.value) if loc is not None and isinstance(loc.value, str) else None
    if ms is None:
        loader.err(loc.error(f"expected a duration for {what}", "write e.g. 7d, 24h, 30m, 10s"))
    return ms


def _load_types(loader, loc) -> dict[str, EventType]:
    types: dict[str, EventType] = {}
    for name, item in (loader.mapping(loc, "event_types") or {}).items():
        if not IDENT.match(name):
            loader.err(item.key_error(f'event type "{name}" must be lower case letters, digits and _'))
            continue
        fields = {} if item.value is None else loader.keys(item, TYPE_KEYS, f'event type "{name}"')
        if fields is None:
            continue
        attrs: dict[str, AttributeType] = {}
        for attr, spec in (loader.mapping(fields.get("attributes"), f"attributes of {name}") or {}).items():
            if not IDENT.match(attr):
                loader.err(spec.key_error(f'attribute name "{attr}" must be lower case letters, digits and _'))
            elif spec.is_seq:
                levels = tuple(v for v, _ in loader.names(spec, f"levels of {name}.{attr}"))
                attrs[attr] = AttributeType(attr, "cat", levels)
            elif spec.is_scalar and spec.value in ATTRIBUTE_TYPES:
                attrs[attr] = AttributeType(attr, "num" if spec.value == "number" else "str")
            else:
                shown = spec.plain()  # a mapping's value holds Locs, whose repr is the whole file
                hint = suggest(str(shown), ATTRIBUTE_TYPES) or "number, text, or a list of levels [a, b]"
                loader.err(spec.error(f'unknown attribute type "{shown}" for {name}.{attr}', hint))
        if name == CONSENT_WITHDRAWN and "channel" in attrs:
            # every channel domain.yaml declares, whatever the file lists: a channel added later can be withdrawn too
            attrs["channel"] = AttributeType("channel", "cat", (*loader.schema.channel_names, ALL_CHANNELS))
        sets = _load_sets(loader, fields.get("sets"), name, attrs)
        types[name] = EventType(name, attrs, loader.text(fields.get("description"), "description"), sets)
    return types


def _load_sets(loader, loc, event: str, attrs: dict[str, AttributeType]) -> dict[str, str]:
    """``sets: {profile attribute: event attribute}``: what an event of this type writes to the profile.
    A number goes to a number attribute; a list of levels to a category that has every one of them."""
    schema = loader.schema
    out: dict[str, str] = {}
    for target, source_loc in (loader.mapping(loc, f"sets of {event}") or {}).items():
        source = loader.text(source_loc, f"sets of {event}.{target}")
        attr = attrs.get(source)
        if attr is None:
            loader.err(source_loc.error(f'{event} has no attribute "{source}"',
                                        suggest(source, attrs) or "declare it under attributes:"))
            continue
        if target in schema.numeric and target not in schema.dates:
            ok, want = attr.kind == "num", "a number attribute"
        elif target in schema.categorical:
            missing = [v for v in attr.levels if v not in schema.categorical[target]]
            ok = attr.kind == "cat" and not missing
            want = f"a list of levels of {target} ({', '.join(schema.categorical[target])})" + (
                f"; not levels of {target}: {', '.join(missing)}" if missing else "")
        else:
            settable = [n for n in (*schema.numeric, *schema.categorical) if n not in schema.dates]
            loader.err(source_loc.key_error(f'"{target}" is not a number or category attribute of domain.yaml',
                                            suggest(target, settable) or "attributes: " + ", ".join(settable)))
            continue
        if not ok:
            loader.err(source_loc.error(f"{event}.{source} cannot set {target}: it must be {want}"))
            continue
        out[target] = source
    return out


def _load_part(loader, event_loc, cond_loc, types: dict[str, EventType], what: str) -> Part | None:
    event = loader.text(event_loc, f"{what} event")
    if not event:
        if event_loc is not None and event_loc.value == "":  # missing or not text: reported already
            hint = "one of: " + ", ".join(types) if types else "declare it under event_types:"
            loader.err(event_loc.error(f"{what} names no event type", hint))
        return None
    if event not in types:
        hint = suggest(event, types) or "declare it under event_types:"
        loader.err(event_loc.error(f'unknown event type "{event}"', hint))
        return None
    if cond_loc is None:
        return Part(event)
    if not isinstance(cond_loc.value, str) or not cond_loc.is_scalar:
        loader.err(cond_loc.error(f"expected a condition (text) for {what}", "e.g. 'amount > 0'"))
        return None
    tree, errors = check_event_condition(cond_loc.value, types[event])
    for e in errors:
        loader.err(cond_loc.error_at(e.pos, e.message, e.hint))
    return Part(event, tree, str(cond_loc.value)) if tree is not None else None


def _load_outbound(loader, loc, by_id: dict, what: str) -> Outbound | None:
    fields = loader.keys(loc, OUTBOUND_KEYS, f"{what} outbound")
    if not fields or "action" not in fields or "channel" not in fields:
        return None
    action = loader.text(fields["action"], "outbound action")
    channel = loader.text(fields["channel"], "outbound channel")
    ok = True
    if action not in by_id:
        loader.ref_err("action", fields["action"].error(f'unknown action "{action}"',
                                                        suggest(action, by_id) or "see the ids in catalog.yaml"))
        ok = False
    outbound = loader.schema.outbound_channels
    if channel not in outbound:
        hint = suggest(channel, outbound) or "outbound channels (domain.yaml): " + ", ".join(outbound)
        loader.err(fields["channel"].error(f'"{channel}" is not an outbound channel', hint))
        ok = False
    elif ok and channel not in by_id[action].channels:
        loader.err(fields["channel"].error(f'action "{action}" has no {channel} treatment',
                                           f"add a {channel} treatment to it in catalog.yaml or pick another channel"))
        ok = False
    return Outbound(action, channel) if ok else None


# --- compiling and matching ---------------------------------------------------------------------

def _fits(piece: Node) -> bool:
    return markers(piece) <= MAX_MARKERS


@dataclass(frozen=True)
class Firing:
    pattern: Pattern
    event_id: str  # the event that completed the pattern (absence: the opening event)


@dataclass(frozen=True)
class Timer:
    pattern: str
    opened_by: str  # event id of the opening event
    opened_ms: int
    due_ms: int


_rulesets = itertools.count(1)


class CompiledPatterns:
    """The durable ruleset of the patterns' parts, and the window/count/order logic around it.

    Thread-safe: durable's C engine is not, so one lock serialises its calls (like ``CompiledRules``).
    """

    def __init__(self, events: EventRules, name: str = "") -> None:
        self.events = events
        self.name = f"nba-events-{name or 'rules'}-{next(_rulesets)}"
        self._rule_part: dict[str, tuple[str, str]] = {}  # durable rule name -> (pattern, part)
        definition: dict[str, dict] = {}
        fields: dict[str, str] = {}
        for p in events.patterns:
            for key, part in p.parts.items():
                cond: Node = Compare("==", Field(EVENT_FIELD, "str"), Str(part.event))
                if part.where is not None:
                    cond = And((cond, part.where))
                try:
                    pieces, _exclusive = prepare(cond, {}, _fits)
                except TooComplex as err:
                    raise RuleErrorsFor(p, f"the condition of pattern {p.name} is too complex ({err})") from err
                if pieces is False:
                    continue
                assert isinstance(pieces, list)
                for k, piece in enumerate(pieces):
                    rule = f"ev${p.name}${key}" + (f"#{k + 1}" if len(pieces) > 1 else "")
                    definition[rule] = {"all": [{"m": condition_json(piece, fields)}]}
                    self._rule_part[rule] = (p.name, key)
        # Every session must run an action before it is deleted (see compile.py): a sentinel fact.
        definition[CATCH_ALL] = {"all": [{"m": {"$eq": {GUARD_FIELD: 0.0}}}]}
        self.types = frozenset(part.event for p in events.patterns for part in p.parts.values())
        self._definition = to_json(definition)
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._holder = [durable_rules_engine.create_ruleset(self.name, self._definition)]
        self.engine_errors = 0  # durable failures (the ruleset was replaced, the evaluation raised)
        self._finalizer = weakref.finalize(self, _delete, self._holder)
        self.sessions_open = 0  # live durable sessions (0 between evaluations)

    def close(self) -> None:
        with self._lock:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def match(self, events: Sequence[Event]) -> dict[tuple[str, str], set[int]]:
        """(pattern, part) -> indexes into ``events`` of the events that part matches, decided by
        durable in one short-lived session."""
        found: dict[tuple[str, str], set[int]] = {}
        relevant = [(i, e) for i, e in enumerate(events) if e.type in self.types]
        if not relevant:
            return found
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError(f"pattern ruleset {self.name} is closed")
            handle = self._holder[0]
            sid = str(next(self._sids))
            facts = []
            for i, e in relevant:
                fact = {"sid": sid, "id": f"f{i}", INDEX_FIELD: i, EVENT_FIELD: e.type}
                for k, v in e.attrs.items():
                    fact[attribute_field(k)] = v
                facts.append(fact)
            facts.append({"sid": sid, "id": "g", GUARD_FIELD: 0.0})
            self.sessions_open += 1
            try:
                state = durable_rules_engine.assert_facts(handle, to_json(facts))[1]
                result = durable_rules_engine.start_action_for_state(handle, state)
                while result:
                    message = result[1] if isinstance(result, tuple) else result
                    for rule, body in json.loads(message).items():
                        where = self._rule_part.get(rule)
                        if where is not None:
                            for match in body.values() if isinstance(body, dict) else ():
                                if isinstance(match, dict) and INDEX_FIELD in match:
                                    found.setdefault(where, set()).add(int(match[INDEX_FIELD]))
                    result = durable_rules_engine.complete_and_start_action(handle, state)
                # Deleted only now, every action completed (see runtime.py): an undeleted session
                # would count against durable's 1024.
                durable_rules_engine.delete_state(handle, sid)
            except Exception:
                # A session whose actions did not all run must not be deleted (durable would free
                # uninitialised memory): drop the whole ruleset instead, with every session in it.
                self.engine_errors += 1
                self._holder[0] = durable_rules_engine.create_ruleset(f"{self.name}-r{sid}", self._definition)
                _delete([handle])
                raise
            finally:
                self.sessions_open -= 1
        return found

    def on_event(self, history: Sequence[Event], current: Event) -> tuple[list[Firing], list[Timer]]:
        """What ``current`` (already in ``history``) completes, and the absence timers it opens."""
        events = list(history)
        ids = (current.id, id_tag(current.id))  # decoded from the history, it has its id's tag
        ci = next((i for i, e in enumerate(events) if e.id in ids), None)
        if ci is None:
            events.append(current)
            ci = len(events) - 1
        if current.type not in self.types:
            return [], []
        matched = self.match(events)
        now = current.ts_ms
        firings, timers = [], []
        for p in self.events.patterns:
            if p.kind == "absence":
                if ci in matched.get((p.name, "after"), ()):
                    timers.append(Timer(p.name, current.id, now, now + p.within_ms))
                continue
            last = "then" if p.kind == "sequence" else "on"
            if ci not in matched.get((p.name, last), ()):
                continue
            if p.kind == "threshold":
                firings.append(Firing(p, current.id))
            elif p.kind == "count":
                n = sum(1 for j in matched[(p.name, "on")] if now - p.within_ms < events[j].ts_ms <= now)
                if n >= p.at_least:
                    firings.append(Firing(p, current.id))
            else:  # sequence
                if any(j != ci and now - p.within_ms <= events[j].ts_ms <= now
                       for j in matched.get((p.name, "first"), ())):
                    firings.append(Firing(p, current.id))
        return firings, timers

    def on_timer(self, history: Sequence[Event], timer: Timer) -> Firing | None:
        """An absence pattern at its due time: it fires when no ``missing`` event came in time."""
        p = self.events.by_name(timer.pattern)
        if p is None or p.kind != "absence":
            return None
        opener = (timer.opened_by, id_tag(timer.opened_by))
        window = [e for e in history if timer.opened_ms <= e.ts_ms <= timer.due_ms and e.id not in opener]
        if window and self.match(window).get((p.name, "missing")):
            return None
        return Firing(p, timer.opened_by)


class RuleErrorsFor(NbaError):
    def __init__(self, pattern: Pattern, message: str) -> None:
        super().__init__(message)
        self.pattern = pattern


def _delete(holder: list[int]) -> None:
    try:
        durable_rules_engine.delete_ruleset(holder[0])
    except Exception:
        pass


def compile_patterns(events: EventRules | None, name: str = "") -> CompiledPatterns | None:
    """The compiled patterns (None when there is no ``events.yaml``); raises ``RuleErrors``."""
    from engine.rules.errors import RuleErrors

    if events is None:
        return None
    try:
        return CompiledPatterns(events, name)
    except RuleErrorsFor as err:
        file, line, col = err.pattern.source.rsplit(":", 2) if err.pattern.source.count(":") >= 2 else ("events.yaml", 1, 1)
        raise RuleErrors([RuleError(file, int(line), int(col), str(err), "simplify the condition")]) from err
    except Exception as err:  # durable refused the ruleset
        raise RuleErrors([RuleError(EVENTS_FILE, 1, 1, f"the rule engine refused the event patterns: {err}")]) from err


__all__ = ["CompiledPatterns", "Event", "EventRules", "EventType", "Firing", "InvalidEvent",
           "Pattern", "Timer", "compile_patterns", "id_tag", "load_events", "parse_duration"]
