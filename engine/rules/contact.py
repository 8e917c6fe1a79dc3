"""Contact policies, quiet hours and the control group as loaded from ``rules/contact.yaml``.

The limits are data here; ``engine.decision.contact`` applies them atomically in Redis when a
decision presents its actions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.rules.model import Action

CONTACT_FILE = "contact.yaml"
DAY_MS = 86_400_000
KINDS = {"impressions": "i", "rejections": "r", "acceptances": "a"}
PERS = {"action": "a", "group": "g", "customer": "c"}


@dataclass(frozen=True)
class ContactLimit:
    """At most ``max`` contacts of kind ``counts`` per ``per`` within ``days``, counted over
    ``channels`` (all when empty) and action ``types`` (all when empty); it applies to actions of those
    types decided on those channels."""

    name: str
    max: int
    days: float
    per: str = "action"  # action | group | customer
    counts: str = "impressions"  # impressions | rejections | acceptances
    channels: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    reason: str = ""
    source: str = ""

    def applies(self, action: Action, channel: str) -> bool:
        return (not self.types or action.type in self.types) and (not self.channels or channel in self.channels)

    def spec(self, now_ms: int) -> list:
        """The limit as the Lua script reads it."""
        return [KINDS[self.counts], PERS[self.per], self.max, now_ms - int(self.days * DAY_MS),
                {c: 1 for c in self.channels} if self.channels else 0,
                {t: 1 for t in self.types} if self.types else 0]


@dataclass(frozen=True)
class QuietHours:
    """No contact on ``channels`` from ``start`` to ``end`` (minutes after midnight, UTC offset applied)."""

    channels: frozenset[str]
    start: int
    end: int
    utc_offset_minutes: int = 0

    def quiet(self, channel: str, now: float) -> bool:
        if channel not in self.channels:
            return False
        minute = int((now // 60 + self.utc_offset_minutes) % 1440)
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def ends_after(self, now: float) -> float:
        """When the quiet window that ``now`` falls in ends (epoch seconds); ``now`` if it is not quiet."""
        minute_of_day = (now / 60 + self.utc_offset_minutes) % 1440
        if self.start <= self.end:
            if not self.start <= minute_of_day < self.end:
                return now
        elif self.end <= minute_of_day < self.start:
            return now
        return now + ((self.end - minute_of_day) % 1440) * 60

    def describe(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


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
              "types": False, "reason": False, "description": False}
QUIET_KEYS = {"channels": False, "from": True, "to": True, "utc_offset_minutes": False}
CONTROL_KEYS = {"share": True, "policy": False, "generic": False}


def _clock(loader, loc, what: str) -> int | None:
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
    from engine.rules.errors import suggest

    out = set()
    for value, item in loader.names(loc, what):
        if value not in known:
            loader.err(item.error(f'unknown {what[:-1] if what.endswith("s") else what} "{value}"',
                                  suggest(value, known) or "one of: " + ", ".join(known)))
        out.add(value)
    return frozenset(out)


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


def load_contact(loader, rules_dir: Path, actions: Sequence[Action]) -> ContactRules:
    """``contact.yaml`` (optional) through the rule loader's validators; errors go to ``loader``."""
    from engine.rules.errors import suggest

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
        if days is not None and maximum is not None and per in PERS and counts in KINDS:
            reason = loader.text(fields.get("reason"), f"{what} reason") or (
                f"{int(maximum)} {counts} per {per} in {days:g} days")
            limits.append(ContactLimit(name, int(maximum), float(days), per, counts, channels, types, reason,
                                       item.where()))
    quiet = None
    if "quiet_hours" in top:
        q = loader.keys(top["quiet_hours"], QUIET_KEYS, "quiet_hours", {"channels": "[email, sms]"})
        if q is not None:
            channels = _quiet_channels(loader, q)
            start, end = _clock(loader, q.get("from"), "quiet_hours from"), _clock(loader, q.get("to"), "quiet_hours to")
            offset = loader.number(q.get("utc_offset_minutes"), "quiet_hours utc_offset_minutes") or 0
            if start is not None and end is not None:
                quiet = QuietHours(channels, start, end, int(offset))
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
                loader.err(c["generic"].error(f'unknown action "{generic}" in control_group generic',
                                              suggest(generic, ids)))
            if policy == "generic" and not generic:
                at = c["share"] if "share" in c else c["policy"]  # share may be missing too (reported by keys())
                loader.err(at.error('control_group policy "generic" needs "generic: <action id>"'))
            control = ControlGroup(float(share or 0), policy, generic)
    return ContactRules(tuple(limits), quiet, control, _interactions(loader, top))


def _interactions(loader, top: dict) -> Interactions:
    """The ``impressions``, ``interactions`` and ``responses`` sections of contact.yaml."""
    from engine.rules.errors import suggest

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
