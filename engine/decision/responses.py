"""Recording a response: checked against the decision that presented the action, stored once.

``record_response`` reads the decision record (``nba:decision:<id>``, written when the decision
presented its actions), then one Lua script appends the response to ``nba:stream:responses`` (what
training and ``nba report`` read) and updates the customer's contact history (a rejection starts the
cool-down), unless the same (decision, action, outcome) was recorded before: then it returns the first
recording's stream id and changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import redis

from engine.decision.contact import RESPOND, contacts_key, decision_key
from engine.errors import NbaError
from engine.rules.contact import DAY_MS
from engine.store.profiles import RESPONSES_STREAM, STREAM_MAXLEN

OUTCOMES = ("impression", "clicked", "accepted", "rejected", "ignored")
# Outcomes that enter the contact history (impressions are recorded when the decision presents).
_CONTACT_KIND = {"rejected": "r", "accepted": "a"}
HISTORY_KEEP_MS = 90 * DAY_MS


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


class ResponseRecorder:
    def __init__(self, client: redis.Redis, stream: str = RESPONSES_STREAM) -> None:
        self.client = client
        self.stream = stream
        self._script = client.register_script(RESPOND)

    def record(self, decision_id: str, action_id: str, outcome: str, ts: float | None = None) -> Recorded:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}")
        ts = time.time() if ts is None else ts
        key = decision_key(decision_id)
        raw = {k.decode(): v.decode() for k, v in cast("dict[bytes, bytes]", self.client.hgetall(key)).items()}
        if not raw or "customer" not in raw:
            raise NotFound("decision_id", f"no decision {decision_id} (unknown or older than its retention)")
        actions = raw.get("actions", "").split(",") if raw.get("actions") else []
        if action_id not in actions:
            raise NotFound("action_id", f"{action_id} was not presented in decision {decision_id}")
        i = actions.index(action_id)

        def at(name: str) -> str:
            values = raw.get(name, "").split(",")
            return values[i] if i < len(values) else ""

        group, kind, value = at("groups"), at("types"), at("values")
        customer, channel = raw["customer"], raw.get("channel", "")
        member = ""
        if outcome in _CONTACT_KIND:
            member = f"{_CONTACT_KIND[outcome]}|{action_id}|{group}|{kind}|{channel}|{decision_id}"
        fields = {
            "decision_id": decision_id, "action_id": action_id, "outcome": outcome, "ts": f"{ts:.3f}",
            "customer_id": customer, "channel": channel, "action_type": kind, "group": group, "value": value,
            "control": raw.get("control", "0"), "decided_at": raw.get("ts", ""),
            "ruleset_version": raw.get("ruleset", ""), "model_version": raw.get("model", ""),
        }
        flat = [x for kv in fields.items() for x in kv]
        first, entry = self._script(
            keys=[key, contacts_key(customer), self.stream],
            args=[f"r:{action_id}:{outcome}", member, int(ts * 1000), HISTORY_KEEP_MS, STREAM_MAXLEN, *flat],
        )
        return Recorded(entry.decode() if isinstance(entry, bytes) else str(entry), bool(first), customer)
