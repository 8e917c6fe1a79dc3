"""Contact policies, quiet hours and the control group as loaded from ``rules/contact.yaml``.

The limits are data here; ``engine.decision.contact`` applies them atomically in Redis when a
decision presents its actions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.rules.errors import suggest
from engine.rules.timezones import LocalClock, find_zone, utc_clock, zone_names

if TYPE_CHECKING:
    from engine.rules.model import Action

CONTACT_FILE = "contact.yaml"
DAY_MS = 86_400_000
KINDS = {"impressions": "i", "rejections": "r", "acceptances": "a"}
PERS = {"action": "a", "group": "g", "customer": "c"}


@dataclass(frozen=True)
class ContactLimit:
    """At most ``max`` contacts of kind ``counts`` per ``per`` within ``days``, counted over
    ``channels``, action ``types``, ``actions`` (ids) and ``groups`` (each: all when empty; together:
    all must hold); it applies to the actions it counts, decided on those channels."""

    name: str
    max: int
    days: float
    per: str = "action"  # action | group | customer
    counts: str = "impressions"  # impressions | rejections | acceptances
    channels: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    reason: str = ""
    source: str = ""
    actions: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    description: str = ""

    def applies(self, action: Action, channel: str) -> bool:
        return self.counts_contact(action.id, action.group, action.type, channel)

    def counts_contact(self, action_id: str, group: str, type_: str, channel: str) -> bool:
        """Whether a contact with this action on ``channel`` is within the policy's scope."""
        return ((not self.types or type_ in self.types) and (not self.channels or channel in self.channels)
                and (not self.actions or action_id in self.actions) and (not self.groups or group in self.groups))

    def scope(self, actions: Sequence[Action]) -> list[str]:
        """The ids of ``actions`` the policy applies to (on its channels)."""
        return [a.id for a in actions if (not self.types or a.type in self.types)
                and (not self.actions or a.id in self.actions) and (not self.groups or a.group in self.groups)]

    def spec(self, now_ms: int) -> list:
        """The limit as the Lua script reads it."""
        return [KINDS[self.counts], PERS[self.per], self.max, now_ms - int(self.days * DAY_MS),
                {c: 1 for c in self.channels} if self.channels else 0,
                {t: 1 for t in self.types} if self.types else 0,
                {a: 1 for a in self.actions} if self.actions else 0,
                {g: 1 for g in self.groups} if self.groups else 0]


@dataclass(frozen=True)
class QuietHours:
    """No contact on ``channels`` from ``start`` to ``end`` (minutes after local midnight) on the wall
    clock of the customer's time zone: the zone the profile's ``customer_zone`` attribute names, else
    ``clock``'s (contact.yaml ``time_zone``). Daylight saving time moves the window with the clocks."""

    channels: frozenset[str]
    start: int
    end: int
    clock: LocalClock = field(default_factory=utc_clock)
    customer_zone: str = ""  # a category attribute whose levels are IANA zones ("": every customer on ``clock``)
    # customer_zone's levels (domain.yaml) -> their zones' clocks; follows from customer_zone and domain.yaml
    clocks: Mapping[str, LocalClock] = field(default_factory=dict, compare=False)

    @property
    def time_zone(self) -> str:
        return self.clock.name

    def clock_for(self, categorical: Mapping[str, str]) -> LocalClock:
        """The clock quiet hours run on for a customer with these category values: the customer's own
        zone, or the default one when the attribute is empty, unknown or not a zone."""
        if not self.customer_zone:
            return self.clock
        return self.clocks.get(categorical.get(self.customer_zone, ""), self.clock)

    def quiet(self, channel: str, now: float, clock: LocalClock | None = None) -> bool:
        if channel not in self.channels:
            return False
        return self._inside(int((clock or self.clock).minute_of_day(now)))

    def _inside(self, minute: int) -> bool:
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def ends_after(self, now: float, clock: LocalClock | None = None) -> float:
        """When the quiet window that ``now`` falls in ends (epoch seconds); ``now`` if it is not quiet.
        A clock change inside the window (at most one: a window is shorter than a day) is found and the
        rest of the window is measured on the clock after it, so the answer is the first moment the
        local time is outside the window: 08:00 on the night clocks go back is an hour later in UTC, and
        a window ending at 02:30 on the night clocks skip from 02:00 to 03:00 ends at the skip."""
        clock = clock or self.clock
        at = now
        for _ in range(3):
            minute = clock.minute_of_day(at)
            if not self._inside(int(minute)):
                return at
            end = at + ((self.end - minute) % 1440) * 60
            change = clock.next_transition(at, end)
            if change is None:
                return end
            at = change
        return at

    def describe(self, clock: LocalClock | None = None) -> str:
        return (f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d} "
                f"{(clock or self.clock).name}")


@dataclass(frozen=True)
class ControlGroup:
    """A stable ``share`` of customers gets the control policy instead of the ranked decision."""

    share: float = 0.0
    policy: str = "random_eligible"  # random_eligible | generic
    generic_action: str = ""
    salt: str = "control"

    def contains(self, customer_id: str) -> bool:
        if self.share <= 0:
            return False
        digest = hashlib.blake2b(f"{self.salt}:{customer_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < self.share


ON_DECIDE, ON_IMPRESSION = "on_decide", "on_impression"


@dataclass(frozen=True)
class Interactions:
    """When an impression counts and how long decisions are remembered.

    ``on_impression``: channels (web, app) whose decisions count an impression only when the channel
    reports it (``OUTCOME_IMPRESSION``); their budget units are reserved at decision time and released
    after ``reservation_minutes`` without an impression. Elsewhere deciding is presenting (``on_decide``).
    ``window_minutes``: how long the same customer + interaction id gets the same decision back.
    ``accept_days``: how long responses to a decision are accepted (and its record kept);
    ``future_skew_seconds``: how far a response's timestamp may lie ahead of the server clock.
    """

    on_impression: frozenset[str] = frozenset()
    reservation_minutes: float = 15.0
    window_minutes: float = 30.0
    accept_days: float = 7.0
    future_skew_seconds: float = 300.0

    def counts_on_decide(self, channel: str) -> bool:
        return channel not in self.on_impression

    @property
    def window_ms(self) -> int:
        return int(self.window_minutes * 60_000)

    @property
    def reservation_ms(self) -> int:
        return int(self.reservation_minutes * 60_000)

    @property
    def accept_ms(self) -> int:
        return int(self.accept_days * DAY_MS)


@dataclass(frozen=True)
class ContactRules:
    limits: tuple[ContactLimit, ...] = ()
    quiet_hours: QuietHours | None = None
    control: ControlGroup = field(default_factory=ControlGroup)
    interactions: Interactions = field(default_factory=Interactions)
    _applicable: dict = field(default_factory=dict, compare=False, repr=False)  # (action id, channel) -> [limit #]

    @property
    def history_days(self) -> float:
        return max((l.days for l in self.limits), default=0.0)

    def keep_ms(self, kind: str, action_id: str, group: str, type_: str, channel: str) -> int:
        """How long the contact history keeps a contact of ``kind`` (``i``, ``r``, ``a``): the longest
        window of the limits that count it, at least a day; 0 when none does (it is not kept)."""
        days = [l.days for l in self.limits
                if KINDS[l.counts] == kind and l.counts_contact(action_id, group, type_, channel)]
        return max(int(max(days) * DAY_MS), DAY_MS) if days else 0

    def applicable(self, action: Action, channel: str) -> list[int]:
        """1-based indexes of the limits that apply to ``action`` decided on ``channel``."""
        key = (action.id, channel)
        found = self._applicable.get(key)
        if found is None:
            found = self._applicable[key] = [i + 1 for i, l in enumerate(self.limits) if l.applies(action, channel)]
        return found


# --- rules/contact.yaml ------------------------------------------------------------------------------

CONTACT_KEYS = {"contact_policies": False, "quiet_hours": False, "control_group": False, "impressions": False,
                "interactions": False, "responses": False, "description": False}
IMPRESSION_KEYS = {"counted": False, "reservation_minutes": False}
INTERACTION_KEYS = {"window_minutes": False}
RESPONSE_KEYS = {"accept_days": False, "future_skew_seconds": False}
LIMIT_KEYS = {"name": True, "max": False, "days": True, "per": False, "counts": False, "channels": False,
              "types": False, "actions": False, "groups": False, "reason": False, "description": False}
QUIET_KEYS = {"channels": False, "from": True, "to": True, "time_zone": False, "customer_time_zone": False,
              "utc_offset_minutes": False}  # utc_offset_minutes: refused, with a pointer to time_zone
CONTROL_KEYS = {"share": True, "policy": False, "generic": False}


def _time_of_day(loader, loc, what: str) -> int | None:
    value = loader.text(loc, what)
    try:
        hours, minutes = value.split(":")
        h, m = int(hours), int(minutes)
        if 0 <= h <= 24 and 0 <= m < 60:
            return (h * 60 + m) % 1440
    except ValueError:
        pass
    if value:
        loader.err(loc.error(f'{what} "{value}" is not a time of day', 'write it as "HH:MM" in quotes, e.g. "21:00"'))
    return None


def _names(loader, loc, what: str, known: Sequence[str]) -> frozenset[str]:
    out = set()
    kind = what[:-1] if what.endswith("s") else what
    for value, item in loader.names(loc, what):
        if value not in known:
            error = item.error(f'unknown {kind} "{value}"', suggest(value, known) or "one of: " + ", ".join(known))
            if kind in ("action", "group"):  # none is known while catalog.yaml does not parse
                loader.ref_err(kind, error)
            else:
                loader.err(error)
        out.add(value)
    return frozenset(out)


def _description(loc) -> str:
    """A policy's description as written (not checked: it is prose; ``nba rules diff`` reads it)."""
    return str(loc.value) if loc is not None and loc.is_scalar and loc.value is not None else ""


def _quiet_channels(loader, fields: dict) -> frozenset[str]:
    """The channels quiet hours cover: every outbound channel of domain.yaml when none are listed. A list
    must name every outbound channel that domain.yaml does not exempt (``quiet_hours: false``), so a
    channel added later is never less protected than the others."""
    schema = loader.schema
    if "channels" not in fields:
        return frozenset(schema.quiet_channels)
    channels = _names(loader, fields["channels"], "channels", schema.channel_names)
    missing = [c for c in schema.quiet_channels if c not in channels]
    if missing:
        loader.err(fields["channels"].error(
            "quiet hours must cover every outbound channel; missing: " + ", ".join(missing),
            "add them, leave channels out (all outbound channels), or exempt one in domain.yaml with quiet_hours: false"))
    return channels


def _quiet_clock(loader, fields: dict) -> LocalClock:
    """The default zone of quiet hours (``time_zone``, UTC when absent). ``utc_offset_minutes`` (before
    time zones) is refused: a fixed offset is an hour off for half the year wherever clocks change."""
    if "utc_offset_minutes" in fields:
        loader.err(fields["utc_offset_minutes"].key_error(
            "quiet_hours utc_offset_minutes is no longer read: a fixed offset ignores daylight saving time",
            "name the time zone instead, e.g. time_zone: Europe/Amsterdam (time_zone: UTC for an offset of 0)"))
    name = loader.text(fields.get("time_zone"), "quiet_hours time_zone", "UTC")
    tz = find_zone(name)
    if tz is None:
        loader.err(fields["time_zone"].error(f'quiet_hours time_zone "{name}" is not an IANA time zone',
                                             suggest(name, zone_names()) or "e.g. Europe/Amsterdam or UTC"))
        return utc_clock()
    return LocalClock(name, tz)


def _customer_zones(loader, loc) -> tuple[str, dict[str, LocalClock]]:
    """``customer_time_zone``: a category attribute of domain.yaml whose levels are IANA zones (its
    default level may stand for "unknown"), and the clock of each such level."""
    if loc is None:
        return "", {}
    name = loader.ident(loc, "quiet_hours customer_time_zone")
    schema = loader.schema
    if not name:
        return "", {}
    if name not in schema.categorical:
        kind = ("a date" if name in schema.dates else "a number" if name in schema.numeric
                else "a set" if name in schema.sets else "")
        if kind:
            loader.err(loc.error(f'quiet_hours customer_time_zone "{name}" is {kind}, not a category attribute',
                                 "declare it in domain.yaml as type: category with IANA zones as levels"))
        else:
            loader.err(loc.error(f'quiet_hours customer_time_zone: unknown attribute "{name}"',
                                 suggest(name, schema.categorical) or
                                 "declare it in domain.yaml, e.g. time_zone: {type: category, "
                                 "levels: [unknown, Europe/Amsterdam, Europe/London], default: unknown}"))
        return "", {}
    default = str(schema.defaults.get(name, ""))
    level_locs = _level_locs(loader, name)
    clocks = {}
    for level in schema.categorical[name]:
        tz = find_zone(level)
        if tz is not None:
            clocks[level] = LocalClock(level, tz)
        elif level != default:
            at = level_locs.get(level, loc)
            loader.err(at.error(f'attribute "{name}" level "{level}" is not an IANA time zone '
                                "(contact.yaml quiet_hours customer_time_zone names the attribute)",
                                suggest(level, zone_names()) or
                                "only the attribute's default level may stand for an unknown zone"))
    return name, clocks


def _level_locs(loader, attribute: str) -> dict[str, Any]:
    """Where each level of ``attribute`` is written in domain.yaml (for errors at file:line:col)."""
    from engine.rules.domain import DOMAIN_FILE

    out: dict[str, Any] = {}
    try:
        levels = loader.yaml(DOMAIN_FILE).value["attributes"].value[attribute].value["levels"]
    except (AttributeError, KeyError, TypeError):
        return out
    for item in [levels] if levels.is_scalar else levels.value if levels.is_seq else []:
        out.setdefault(str(item.value), item)
    return out


def load_contact(loader, rules_dir: Path, actions: Sequence[Action]) -> ContactRules:
    """``contact.yaml`` (optional) through the rule loader's validators; errors go to ``loader``."""
    if not loader.has(CONTACT_FILE):
        return ContactRules()
    tree = loader.yaml(CONTACT_FILE)
    top = loader.keys(tree, CONTACT_KEYS, CONTACT_FILE) if tree is not None else None
    if not top:
        return ContactRules()
    limits, seen = [], set()
    for item in loader.sequence(top["contact_policies"], "contact_policies") if "contact_policies" in top else []:
        fields = loader.keys(item, LIMIT_KEYS, "contact policy")
        if fields is None:
            continue
        name = loader.ident(fields.get("name"), "contact policy name")
        if name and name in seen:  # "": no name, reported by keys()
            loader.err(fields["name"].error(f'duplicate contact policy name "{name}"'))
        seen.add(name)
        what = f'contact policy "{name}"'
        days = loader.number(fields.get("days"), f"{what} days", positive=True)
        maximum = loader.number(fields.get("max"), f"{what} max", positive=True) if "max" in fields else 1
        if maximum is not None and int(maximum) != maximum:
            loader.err(fields["max"].error(f"{what} max must be a whole number"))
            maximum = None
        per = loader.text(fields.get("per"), f"{what} per", "action")
        if per not in PERS:
            loader.err(fields["per"].error(f'{what} per "{per}" is not one of: {", ".join(PERS)}', suggest(per, PERS)))
        counts = loader.text(fields.get("counts"), f"{what} counts", "impressions")
        if counts not in KINDS:
            loader.err(fields["counts"].error(f'{what} counts "{counts}" is not one of: {", ".join(KINDS)}',
                                              suggest(counts, KINDS)))
        channels = _names(loader, fields.get("channels"), "channels", loader.schema.channel_names)
        types = _names(loader, fields.get("types"), "types", loader.schema.type_names)
        scoped_ids = _names(loader, fields.get("actions"), "actions", [a.id for a in actions])
        groups = _names(loader, fields.get("groups"), "groups", sorted({a.group for a in actions}))
        if days is not None and maximum is not None and per in PERS and counts in KINDS:
            reason = loader.text(fields.get("reason"), f"{what} reason") or (
                f"{int(maximum)} {counts} per {per} in {days:g} days")
            limits.append(ContactLimit(name, int(maximum), float(days), per, counts, channels, types, reason,
                                       item.where(), scoped_ids, groups,
                                       _description(fields.get("description"))))
    quiet = None
    if "quiet_hours" in top:
        q = loader.keys(top["quiet_hours"], QUIET_KEYS, "quiet_hours", {"channels": "[email, sms]"})
        if q is not None:
            channels = _quiet_channels(loader, q)
            start = _time_of_day(loader, q.get("from"), "quiet_hours from")
            end = _time_of_day(loader, q.get("to"), "quiet_hours to")
            clock = _quiet_clock(loader, q)
            customer_zone, clocks = _customer_zones(loader, q.get("customer_time_zone"))
            if start is not None and end is not None:
                quiet = QuietHours(channels, start, end, clock, customer_zone, clocks)
    control = ControlGroup()
    if "control_group" in top:
        c = loader.keys(top["control_group"], CONTROL_KEYS, "control_group")
        if c is not None:
            share = loader.number(c.get("share"), "control_group share", minimum=0)
            if share is not None and share > 0.5:
                loader.err(c["share"].error("control_group share must be at most 0.5", "e.g. 0.05 for 5%"))
            policy = loader.text(c.get("policy"), "control_group policy", "random_eligible")
            if policy not in ("random_eligible", "generic"):
                loader.err(c["policy"].error(f'control_group policy "{policy}" is not random_eligible or generic'))
            generic = loader.text(c.get("generic"), "control_group generic")
            ids = [a.id for a in actions]
            if generic and generic not in ids:
                loader.ref_err("action", c["generic"].error(f'unknown action "{generic}" in control_group generic',
                                                            suggest(generic, ids)))
            if policy == "generic" and not generic:
                at = c["share"] if "share" in c else c["policy"]  # share may be missing too (reported by keys())
                loader.err(at.error('control_group policy "generic" needs "generic: <action id>"'))
            control = ControlGroup(float(share or 0), policy, generic)
    return ContactRules(tuple(limits), quiet, control, _interactions(loader, top))


def _interactions(loader, top: dict) -> Interactions:
    """The ``impressions``, ``interactions`` and ``responses`` sections of contact.yaml."""
    values: dict[str, Any] = {}
    sections = (("impressions", IMPRESSION_KEYS), ("interactions", INTERACTION_KEYS), ("responses", RESPONSE_KEYS))
    for section, keys in sections:
        fields = loader.keys(top[section], keys, section) if section in top else None
        for key in keys:
            if fields is None or key not in fields or key == "counted":
                continue
            number = loader.number(fields[key], f"{section} {key}", positive=True)
            if number is not None:
                values[key] = float(number)
        if section == "impressions" and fields is not None and "counted" in fields:
            counted = loader.keys(fields["counted"], {c: False for c in loader.schema.channel_names}, "impressions counted")
            on_impression = set()
            for channel, node in (counted or {}).items():
                mode = loader.text(node, f"impressions counted {channel}")
                if mode not in (ON_DECIDE, ON_IMPRESSION):
                    loader.err(node.error(f'impressions counted {channel} "{mode}" is not {ON_DECIDE} or {ON_IMPRESSION}',
                                          suggest(mode, (ON_DECIDE, ON_IMPRESSION))))
                elif mode == ON_IMPRESSION:
                    on_impression.add(channel)
            values["on_impression"] = frozenset(on_impression)
    return replace(Interactions(), **values)
