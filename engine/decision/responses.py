"""Recording a response: checked against the decision that presented the action, stored once.

``record`` reads the decision record (``engine.decision.records``, written when the decision presented its
actions, kept for the contact configuration's ``responses: accept_days``), checks the timestamp (at
most ``future_skew_seconds`` ahead of the server clock, not before the decision), then one Lua script
appends the response to ``nba:stream:responses`` (what training and ``nba report`` read) and updates
the customer's contact history (a rejection starts the cool-down; on an ``on_impression`` channel the
impression is counted now and its reserved budget unit kept), unless the same (decision, action,
outcome) was recorded before: then it returns the first recording's stream id and changes nothing.

The outcomes of one presented action form a progression: impression, clicked and ignored may come
before one final outcome, accepted or rejected. The final outcomes exclude each other, and ignored
(no final outcome came) cannot follow one; such a contradicting response is refused
(``OutcomeConflict``) in the same script that would store it. A final outcome after ignored is
recorded (responses come late), and impression and clicked never contradict anything.

A decision id that finds no record is told apart by the time it carries (``contact.decided_at``):
older than ``accept_days`` it has expired (``ExpiredDecision``); dated ahead of the server clock,
before the store's first decision (``nba:meta`` ``decisions_since``) or within the window but absent,
this service never issued it, or it was erased (``UnknownDecision``). One that is no 32 hex digits is
malformed (INVALID_ARGUMENT).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis

from engine import metrics
from engine.decision import records
from engine.decision.codes import Codes
from engine.decision.contact import (
    RESERVATIONS_KEY,
    RESPOND,
    RESPOND_CUSTOMER,
    decided_at,
    reservation_member,
)
from engine.decision.history import contact_head, contacts_key
from engine.decision.request import InvalidRequest, check_not_ahead, utc_text
from engine.errors import NbaError
from engine.rules.contact import ContactRules
from engine.store.profiles import META_KEY, RESPONSES_STREAM, STREAM_MAXLEN, is_cluster, replicated
from engine.store.slots import customer_shard_key, shard_maxlen

if TYPE_CHECKING:
    from engine.live import Live
    from engine.rules.runtime import CompiledRules

log = logging.getLogger(__name__)

OUTCOMES = ("impression", "clicked", "accepted", "rejected", "ignored")
# Outcomes that enter the contact history (impressions: on on_impression channels; elsewhere deciding counted them).
_CONTACT_KIND = {"rejected": "r", "accepted": "a", "impression": "i"}
BEFORE_DECISION_TOLERANCE = 1.0  # seconds a response may seem to precede its decision (clocks of two systems)
# a recorded outcome -> the outcomes it refuses afterwards for the same decision and action (both ways)
CONTRADICTS = {"accepted": ("rejected", "ignored"), "rejected": ("accepted", "ignored")}
# nba:meta field: epoch ms of the first start of a service on this store; no decision id is older
DECISIONS_SINCE = "decisions_since"


class NotFound(NbaError, LookupError):
    """The decision or the action is unknown; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownDecision(NotFound):
    """No decision with this id was issued by this service (or its record was erased)."""

    reason = "DECISION_UNKNOWN"


class ExpiredDecision(NotFound):
    """The decision is older than the response window (contact.yaml ``responses.accept_days``)."""

    reason = "DECISION_EXPIRED"


class OutcomeConflict(NbaError):
    """A response that contradicts the outcome recorded for the same decision and action (FAILED_PRECONDITION)."""

    reason = "OUTCOME_CONFLICT"
    field = "outcome"


def contradicted_by(outcome: str) -> tuple[str, ...]:
    """The recorded outcomes that ``outcome`` contradicts (``CONTRADICTS`` read the other way round)."""
    return tuple(o for o, refused in CONTRADICTS.items() if outcome in refused)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conflict(decision_id: str, action_id: str, outcome: str, recorded: str, entry: str) -> OutcomeConflict:
    """``recorded``: the contradicted response's field (``r:<action>:<outcome>``), ``entry`` its stream id
    (whose first part is when it was recorded, epoch ms) or ``pending`` while another call records it."""
    earlier = recorded.rsplit(":", 1)[-1]
    when = "is being recorded now" if entry == "pending" else \
        f"was recorded at {utc_text(int(entry.split('-')[0]) / 1000)} (response {entry})"
    return OutcomeConflict(f"outcome: {outcome.upper()} contradicts {earlier.upper()}, which {when} for action "
                           f"{action_id} of decision {decision_id}; accepted and rejected are final and exclude each "
                           "other, and ignored cannot follow them")


@dataclass
class Recorded:
    response_id: str
    first: bool  # False when the same response had been recorded before
    customer_id: str = ""


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
        self._migrate = client.register_script(records.MIGRATE)
        self._set_mark = client.register_script(records.SET_MARK)
        self.codes = Codes(client)
        try:
            client.hsetnx(META_KEY, DECISIONS_SINCE, int(self.clock() * 1000))
        except redis.exceptions.RedisError as exc:  # not up yet: a later recorder (or restart) sets it
            log.warning("cannot mark when this store's decisions begin: %s", exc)

    def _contact(self) -> ContactRules:
        contact = self.rules.current.ruleset.contact if self.rules is not None else None
        return contact or ContactRules()

    def record(self, decision_id: str, action_id: str, outcome: str, ts: float | None = None) -> Recorded:
        if outcome not in OUTCOMES:
            raise InvalidRequest("outcome", f"must be one of {', '.join(OUTCOMES)}")
        contact, now = self._contact(), self.clock()
        ix = contact.interactions
        ts = now if ts is None else ts
        check_not_ahead(ts, now, ix.future_skew_seconds)
        made = decided_at(decision_id)
        if made is None:
            bad = InvalidRequest("decision_id", f"{decision_id[:64]!r} is not a decision id of this service "
                                                "(32 hexadecimal digits, as Decide returns them)")
            bad.reason = "DECISION_ID_MALFORMED"
            raise bad
        key, rfield = records.location(decision_id)
        raw = self._record_of(decision_id, key, rfield, ix.accept_ms)
        if not raw or "customer" not in raw:
            raise self._missing(decision_id, made, now, ix.accept_days, ix.future_skew_seconds)
        if ts < float(raw.get("ts") or 0) - BEFORE_DECISION_TOLERANCE:
            raise InvalidRequest("timestamp", f"{utc_text(ts)} is before the decision ({utc_text(float(raw['ts']))})")
        actions = raw.get("actions", "").split(",") if raw.get("actions") else []
        if action_id not in actions:
            raise NotFound("action_id", f"{action_id} was not presented in decision {decision_id}")
        i = actions.index(action_id)

        def at(name: str) -> str:
            values = raw.get(name, "").split(",")
            return values[i] if i < len(values) else ""

        group, kind, value = at("groups"), at("types"), at("values")
        customer, channel = raw["customer"], raw.get("channel", "")
        member, reserved, keep_ms = "", "", 0
        if outcome in _CONTACT_KIND and not (outcome == "impression" and raw.get("counted", "1") == "1"):
            keep_ms = contact.keep_ms(_CONTACT_KIND[outcome], action_id, group, kind, channel)
            if keep_ms:  # the history keeps only what a contact limit counts
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
        mark = f"{i}{records.OUTCOME_LETTERS[outcome]}"
        refused = {f"{i}{records.OUTCOME_LETTERS[o]}": f"r:{action_id}:{o}" for o in contradicted_by(outcome)}
        stream = customer_shard_key(self.stream, customer, self.client)
        id_ms = int(decision_id[:12], 16)
        if self.cluster:
            first, entry, late = self._record_on_cluster(key, rfield, customer, mark, member, int(ts * 1000), keep_ms,
                                                         id_ms, stream, reserved, fields, list(refused))
        else:
            first, entry, late = self._script(
                keys=[key, contacts_key(customer), stream, RESERVATIONS_KEY],
                args=[rfield, mark, member, int(ts * 1000), keep_ms, STREAM_MAXLEN, reserved, id_ms, len(refused),
                      *refused, *flat],
            )
        if first == -2:  # the record expired or was erased since it was read
            raise self._missing(decision_id, made, now, ix.accept_days, ix.future_skew_seconds)
        if first == -1:  # ``late`` names the contradicted response's mark, ``entry`` its stream id
            raise _conflict(decision_id, action_id, outcome, refused.get(_text(late), _text(late)), _text(entry))
        if late:
            metrics.RESERVATIONS.labels("late").inc()
        return Recorded(entry.decode() if isinstance(entry, bytes) else str(entry), bool(first), customer)

    def _missing(self, decision_id: str, made: float, now: float, accept_days: float, skew: float) -> NotFound:
        """Why no record answers to a well-formed ``decision_id`` decided at ``made``."""
        window = f"responses are accepted for {accept_days:g} days (contact.yaml responses.accept_days)"
        if made > now + skew:
            return UnknownDecision("decision_id", f"no decision {decision_id} was issued: its time {utc_text(made)} "
                                                  "is ahead of the server clock")
        since = self.client.hget(META_KEY, DECISIONS_SINCE)
        if since is not None and made * 1000 < int(since):
            return UnknownDecision("decision_id", f"no decision {decision_id} was issued: its time {utc_text(made)} is "
                                                  f"before this service's first decision ({utc_text(int(since) / 1000)})")
        if now - made > accept_days * 86_400:
            return ExpiredDecision("decision_id", f"decision {decision_id} of {utc_text(made)} has expired: {window}")
        return UnknownDecision("decision_id", f"no decision {decision_id} was issued (or it was erased); "
                                              f"its time {utc_text(made)} is within the response window")

    def _record_of(self, decision_id: str, key: str, field: str, accept_ms: int) -> dict[str, str]:
        """The record's fields (``records.decode``); one in the earlier layout is moved into the compact
        one first (``records.MIGRATE``), so the scripts below see one layout."""
        raw = self.client.hget(key, field)
        if raw is not None:
            return records.decode(self.codes, decision_id, _text(raw))
        old = [records.decision_key(decision_id)]
        if not self.cluster and old[0] != records.legacy_decision_key(decision_id):  # decided before ids had slots
            old.append(records.legacy_decision_key(decision_id))
        for old_key in old:
            fields = {k.decode(): v.decode()
                      for k, v in cast("dict[bytes, bytes]", self.client.hgetall(old_key)).items()}
            if fields and "customer" in fields:
                value = records.encode(self.codes, decision_id, fields)
                self._migrate(keys=[old_key, key], args=[field, value, records.ttl_ms(decision_id, accept_ms)])
                raw = self.client.hget(key, field)
                return records.decode(self.codes, decision_id, _text(raw)) if raw is not None else {}
        return {}

    def _record_on_cluster(self, key: str, field: str, customer: str, mark: str, member: str, ts_ms: int,
                           keep_ms: int, id_ms: int, stream: str, reserved: str, fields: dict[str, str],
                           refused: list[str]) -> tuple[int, bytes | str, int | bytes]:
        """``RESPOND`` in steps that each touch one slot (``RESPOND_CUSTOMER``): a call that dies half-way
        is completed by its retry; an entry may then be in the stream twice (at least once). The answer
        waits until a replica has the stream entry and the record (``replicated``)."""
        answer = self._customer_script(keys=[key, contacts_key(customer)],
                                       args=[field, mark, member, ts_ms, keep_ms, id_ms, len(refused), *refused])
        first, entry = answer[0], answer[1]
        if first == -1:
            return -1, entry, answer[2]
        if first == -2:
            return -2, "", 0
        if not first:
            return 0, entry, 0
        late = 1 if reserved and not self.client.zrem(customer_shard_key(RESERVATIONS_KEY, customer, self.client),
                                                      reserved) else 0
        flat = [x for kv in fields.items() for x in kv]
        maxlen = shard_maxlen(STREAM_MAXLEN, self.client)
        entry = replicated(self.client, stream, "XADD", stream, "MAXLEN", "~", maxlen, "*", *flat, operation="response")
        self._set_mark_replicated(key, field, mark, _text(entry), id_ms)
        return 1, entry, late

    def _set_mark_replicated(self, key: str, field: str, mark: str, entry: str, id_ms: int) -> None:
        """``records.SET_MARK`` by its digest (``replicated``), loading it where the master does not know it
        (a new or promoted node)."""
        command = ("EVALSHA", self._set_mark.sha, 1, key, field, mark, entry, id_ms)
        try:
            replicated(self.client, key, *command, operation="response")
        except redis.exceptions.NoScriptError:
            self.client.script_load(records.SET_MARK)
            replicated(self.client, key, *command, operation="response")
