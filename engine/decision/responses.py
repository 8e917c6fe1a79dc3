"""Recording a response: checked against the decision that presented the action, stored once.

``record`` reads the decision record (``nba:decision:<id>``, written when the decision presented its
actions, kept for the contact configuration's ``responses: accept_days``), checks the timestamp (at
most ``future_skew_seconds`` ahead of the server clock, not before the decision), then one Lua script
appends the response to ``nba:stream:responses`` (what training and ``nba report`` read) and updates
the customer's contact history (a rejection starts the cool-down; on an ``on_impression`` channel the
impression is counted now and its reserved budget unit kept), unless the same (decision, action,
outcome) was recorded before: then it returns the first recording's stream id and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

import redis

from engine import metrics
from engine.decision.contact import (
    RESERVATIONS_KEY,
    RESPOND,
    RESPOND_CUSTOMER,
    decided_at,
    decision_key,
    legacy_decision_key,
    reservation_member,
)
from engine.decision.history import contact_head, contacts_key
from engine.decision.request import InvalidRequest
from engine.errors import NbaError
from engine.rules.contact import DAY_MS, ContactRules
from engine.store.profiles import RESPONSES_STREAM, STREAM_MAXLEN, is_cluster, replicated
from engine.store.slots import customer_shard_key, shard_maxlen

if TYPE_CHECKING:
    from engine.live import Live
    from engine.rules.runtime import CompiledRules

OUTCOMES = ("impression", "clicked", "accepted", "rejected", "ignored")
# Outcomes that enter the contact history (impressions: on on_impression channels; elsewhere deciding counted them).
_CONTACT_KIND = {"rejected": "r", "accepted": "a", "impression": "i"}
BEFORE_DECISION_TOLERANCE = 1.0  # seconds a response may seem to precede its decision (clocks of two systems)


class NotFound(NbaError, LookupError):
    """The decision or the action is unknown; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class Recorded:
    response_id: str
    first: bool  # False when the same response had been recorded before
    customer_id: str = ""


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # past year 9999 (a Timestamp's last nanosecond rounds up)
        return f"{ts:.0f} s after 1970"


class ResponseRecorder:
    """``rules``: the live rule set, whose contact.yaml says how long responses are accepted and how far
    ahead they may be dated (defaults without it)."""

    def __init__(self, client: redis.Redis, rules: Live[CompiledRules] | None = None, stream: str = RESPONSES_STREAM,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.rules = rules
        self.stream = stream
        self.clock = clock
        self._script = client.register_script(RESPOND)
        self.cluster = is_cluster(client)
        self._customer_script = client.register_script(RESPOND_CUSTOMER)

    def _contact(self) -> ContactRules:
        contact = self.rules.current.ruleset.contact if self.rules is not None else None
        return contact or ContactRules()

    def record(self, decision_id: str, action_id: str, outcome: str, ts: float | None = None) -> Recorded:
        if outcome not in OUTCOMES:
            raise InvalidRequest("outcome", f"must be one of {', '.join(OUTCOMES)}")
        contact, now = self._contact(), self.clock()
        ix = contact.interactions
        ts = now if ts is None else ts
        if ts > now + ix.future_skew_seconds:
            raise InvalidRequest("timestamp", f"{_iso(ts)} is {ts - now:,.0f} s ahead of the server clock "
                                              f"(at most {ix.future_skew_seconds:g} s)")
        key = decision_key(decision_id)
        raw = self._record_of(key)
        if not raw and not self.cluster and key != legacy_decision_key(decision_id):  # decided before ids had slots
            key = legacy_decision_key(decision_id)
            raw = self._record_of(key)
        if not raw or "customer" not in raw:
            made = decided_at(decision_id)
            if made is not None and now - made > ix.accept_days * 86_400:
                raise NotFound("decision_id", f"decision {decision_id} of {_iso(made)} has expired: responses are "
                                              f"accepted for {ix.accept_days:g} days (contact.yaml responses.accept_days)")
            raise NotFound("decision_id", f"no decision {decision_id}")
        if ts < float(raw.get("ts") or 0) - BEFORE_DECISION_TOLERANCE:
            raise InvalidRequest("timestamp", f"{_iso(ts)} is before the decision ({_iso(float(raw['ts']))})")
        actions = raw.get("actions", "").split(",") if raw.get("actions") else []
        if action_id not in actions:
            raise NotFound("action_id", f"{action_id} was not presented in decision {decision_id}")
        i = actions.index(action_id)

        def at(name: str) -> str:
            values = raw.get(name, "").split(",")
            return values[i] if i < len(values) else ""

        group, kind, value = at("groups"), at("types"), at("values")
        customer, channel = raw["customer"], raw.get("channel", "")
        member, reserved = "", ""
        if outcome in _CONTACT_KIND and not (outcome == "impression" and raw.get("counted", "1") == "1"):
            member = contact_head(_CONTACT_KIND[outcome], action_id, group, kind, channel)
        if outcome == "impression" and raw.get("counted") == "0" and at("budgets"):
            reserved = reservation_member(decision_id, action_id, at("budgets"))
        fields = {
            "decision_id": decision_id, "action_id": action_id, "outcome": outcome, "ts": f"{ts:.3f}",
            "customer_id": customer, "channel": channel, "action_type": kind, "group": group, "value": value,
            "control": raw.get("control", "0"), "decided_at": raw.get("ts", ""),
            "ruleset_version": raw.get("ruleset", ""), "model_version": raw.get("model", ""),
        }
        flat = [x for kv in fields.items() for x in kv]
        keep_ms = max(int(contact.history_days * DAY_MS), DAY_MS)
        field = f"r:{action_id}:{outcome}"
        stream = customer_shard_key(self.stream, customer, self.client)
        if self.cluster:
            first, entry, late = self._record_on_cluster(key, customer, field, member, int(ts * 1000), keep_ms,
                                                         stream, reserved, fields)
        else:
            first, entry, late = self._script(
                keys=[key, contacts_key(customer), stream, RESERVATIONS_KEY],
                args=[field, member, int(ts * 1000), keep_ms, STREAM_MAXLEN, reserved, *flat],
            )
        if late:
            metrics.RESERVATIONS.labels("late").inc()
        return Recorded(entry.decode() if isinstance(entry, bytes) else str(entry), bool(first), customer)

    def _record_of(self, key: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in cast("dict[bytes, bytes]", self.client.hgetall(key)).items()}

    def _record_on_cluster(self, key: str, customer: str, field: str, member: str, ts_ms: int, keep_ms: int,
                           stream: str, reserved: str, fields: dict[str, str]) -> tuple[int, bytes | str, int]:
        """``RESPOND`` in steps that each touch one slot (``RESPOND_CUSTOMER``): a call that dies half-way
        is completed by its retry; an entry may then be in the stream twice (at least once). The answer
        waits until a replica has the stream entry and the record (``replicated``)."""
        first, entry = self._customer_script(keys=[key, contacts_key(customer)], args=[field, member, ts_ms, keep_ms])
        if not first:
            return 0, entry, 0
        late = 1 if reserved and not self.client.zrem(customer_shard_key(RESERVATIONS_KEY, customer, self.client),
                                                      reserved) else 0
        flat = [x for kv in fields.items() for x in kv]
        maxlen = shard_maxlen(STREAM_MAXLEN, self.client)
        entry = replicated(self.client, stream, "XADD", stream, "MAXLEN", "~", maxlen, "*", *flat, operation="response")
        replicated(self.client, key, "HSET", key, field, entry, operation="response")
        return 1, entry, late
