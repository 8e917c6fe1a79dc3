"""Processing one event: the same path for ``PublishEvent``, the ingest stream and absence timers.

1. One Lua script: idempotency by event id (per customer), append to the customer's bounded history
   (``nba:{c:<id>}:events``, a sorted set by event time, trimmed by age and count), append to the
   ``nba:stream:events`` log, and read back the history the patterns need: one round trip.
2. The patterns (``CompiledPatterns``, part of the live rule set) evaluate that history in a
   short-lived durable session.
3. One more script: triggers the event resolves are cleared, triggers of matched patterns are raised
   (with their time to live), absence timers are scheduled in ``nba:timers``. When ``publish``
   returns, the next Decide on any channel sees the triggers.
4. A matched pattern with ``outbound`` runs a real decision for that customer on the outbound channel,
   aimed at that action (rules, consent, contact policies, quiet hours, budgets: the decision
   funnel's own), and writes what was presented to ``nba:stream:outbound``, or counts why not.

Key layout added here (all customer keys carry the customer's hash tag):

- ``nba:{c:<id>}:events``    sorted set: event JSON by event time (ms); newest ``MAX_HISTORY_EVENTS``
                             within the longest pattern window (at least a day)
- ``nba:{c:<id>}:event_ids`` sorted set: event ids seen, by arrival time (dedupe window)
- ``nba:{c:<id>}:outbound:<pattern>:<event id>``  an outbound already started (timers may re-run)
- ``nba:timers``             sorted set: absence timers by due time (see ``engine/events/timers.py``)
- ``nba:stream:outbound``    outbound actions for sending systems
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from engine import metrics
from engine.decision.request import MAX_ID_LENGTH, DecideInput, InvalidRequest
from engine.rules.patterns import MAX_HISTORY_EVENTS, Event, Firing, InvalidEvent, Outbound, Pattern, Timer
from engine.store.profiles import EVENTS_STREAM, STREAM_MAXLEN, triggers_key

if TYPE_CHECKING:
    from engine.decision.funnel import DecisionEngine
    from engine.live import Live
    from engine.rules.runtime import CompiledRules
    from engine.store.profiles import ProfileStore

log = logging.getLogger(__name__)

OUTBOUND_STREAM = "nba:stream:outbound"
TIMERS_KEY = "nba:timers"
DEDUPE_MS = 7 * 86_400_000  # a replay within a week of the first arrival counts once
FUTURE_SKEW_MS = 5 * 60_000  # event times may be at most this far ahead of the server clock
OUTBOUND_CONTEXT = "outbound_action"  # DecideInput.context key: the action an outbound decision aims at
OUTBOUND_RANKING = "outbound"

# KEYS: history, ids, log stream. ARGV: event id, event time ms, history member, now ms, keep ms,
# max events, dedupe ms, read from ms, stream maxlen, then the log entry's fields.
# Returns {0} for a duplicate, else {1, log entry id, history since ARGV[8]}.
_INGEST = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {0} end
local now = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[7]))
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[5])))
local n = redis.call('ZCARD', KEYS[1])
if n > tonumber(ARGV[6]) then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - tonumber(ARGV[6]) - 1) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local entry = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[9], '*', unpack(ARGV, 10))
return {1, entry, redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[8], '+inf')}
"""

# The effects of one event in one call. KEYS: triggers hash, timers. ARGV: number of triggers to
# clear, their names, number of triggers to raise, (name, expiry ms) pairs, then (timer member, due
# ms) pairs. Keeps the hash alive until its latest trigger expires (as store._SET_TRIGGER). Returns
# the names it cleared that were set. Like decision/contact.py, this assumes one Redis node (the timers key
# is not the customer's).
_APPLY = """
local cleared, i = {}, 2
for _ = 1, tonumber(ARGV[1]) do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then table.insert(cleared, ARGV[i]) end
  i = i + 1
end
local raise = tonumber(ARGV[i])
i = i + 1
for _ = 1, raise do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if raise > 0 then
  local latest = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
    if tonumber(v) > latest then latest = tonumber(v) end
  end
  redis.call('PEXPIREAT', KEYS[1], latest)
end
while i <= #ARGV do
  redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
  i = i + 2
end
return cleared
"""


def events_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:events"


def event_ids_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:event_ids"


def outbound_key(customer_id: str, pattern: str, event_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:outbound:{pattern}:{event_id}"


@dataclass
class OutboundResult:
    action_id: str
    channel: str
    pattern: str
    status: str  # sent | suppressed
    decision_id: str = ""
    reason: str = ""


@dataclass
class Processed:
    """What one event (or one due timer) did."""

    duplicate: bool = False
    stream_id: str = ""
    patterns: list[str] = field(default_factory=list)
    raised: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    outbound: list[OutboundResult] = field(default_factory=list)
    timers: int = 0


def _outbound_ranking(candidates: list, req: DecideInput, profile, now: float) -> list:
    """An outbound decision considers only the action its pattern names (after every rule)."""
    target = req.context.get(OUTBOUND_CONTEXT)
    return [c for c in candidates if c[2].action.id == target]


class EventProcessor:
    def __init__(self, store: ProfileStore, rules: Live[CompiledRules], engine: DecisionEngine,
                 clock=time.time) -> None:
        self.store = store
        self.client = store.client
        self.rules = rules
        self.engine = engine
        self.clock = clock
        self._ingest = self.client.register_script(_INGEST)
        self._apply_script = self.client.register_script(_APPLY)
        engine.rankings.setdefault(OUTBOUND_RANKING, _outbound_ranking)

    # --- ingestion --------------------------------------------------------------------------------
    def publish(self, event_id: str, customer_id: str, event_type: str, attributes: Mapping[str, str],
                ts: float | None = None, source: str = "grpc") -> Processed:
        """Validate, dedupe, record and evaluate one event. Raises ``InvalidRequest`` naming the field."""
        started = time.perf_counter()
        try:
            result = self._publish(event_id, customer_id, event_type, attributes, ts, source)
        except InvalidRequest:
            metrics.events_processed(self._type_label(event_type), "invalid", source).inc()
            raise
        metrics.events_processed(event_type, "duplicate" if result.duplicate else "accepted", source).inc()
        metrics.event_seconds(source).observe(time.perf_counter() - started)
        return result

    def _type_label(self, event_type: str) -> str:
        events = self.rules.current.ruleset.events
        return event_type if events is None or event_type in events.types else "unknown"

    def _publish(self, event_id: str, customer_id: str, event_type: str, attributes: Mapping[str, str],
                 ts: float | None, source: str) -> Processed:
        _check_id(event_id, "event_id", 256)
        _check_id(customer_id, "customer_id", MAX_ID_LENGTH)
        if not event_type:
            raise InvalidRequest("type", "must not be empty")
        now_ms = int(self.clock() * 1000)
        ts_ms = now_ms if ts is None or ts <= 0 else int(ts * 1000)
        if ts_ms > now_ms + FUTURE_SKEW_MS:
            raise InvalidRequest("timestamp", "is in the future")
        with self.rules.use() as rules:
            events, patterns = rules.ruleset.events, rules.patterns
            if events is None:  # no events.yaml: events are only logged
                attrs: dict = dict(attributes)
            else:
                try:
                    attrs = events.validate(event_type, dict(attributes))
                except InvalidEvent as err:
                    raise InvalidRequest(err.field, str(err).split(": ", 1)[1]) from None
            event = Event(event_id, event_type, ts_ms, attrs)
            keep_ms = events.history_ms if events is not None else 86_400_000
            since = ts_ms - (events.window_ms if events is not None else 0)
            log_fields = {"event_id": event_id, "customer_id": customer_id, "type": event_type,
                          "ts": f"{ts_ms / 1000:.3f}", "source": source,
                          **{f"attr.{k}": str(v) for k, v in attributes.items()}}
            reply = self._ingest(
                keys=[events_key(customer_id), event_ids_key(customer_id), EVENTS_STREAM],
                args=[event_id, ts_ms, event.encode(), now_ms, keep_ms, MAX_HISTORY_EVENTS, DEDUPE_MS, since,
                      STREAM_MAXLEN, *[x for kv in log_fields.items() for x in kv]])
            if not reply[0]:
                return Processed(duplicate=True)
            metrics.events(event_type).inc()
            out = Processed(stream_id=reply[1].decode())
            if events is None or patterns is None:
                return out
            history = [Event.decode(m) for m in reply[2]]
            firings, timers = patterns.on_event(history, event)
            cleared = sorted(events.clears_by_event.get(event_type, ()))
            self._apply(customer_id, firings, cleared, timers, out, now_ms)
        return out

    def _apply(self, customer_id: str, firings: list[Firing], cleared: list[str], timers: list[Timer],
               out: Processed, now_ms: int) -> None:
        """Clear, raise, schedule (one script), then the outbound decisions."""
        raised = {f.pattern.trigger: now_ms + f.pattern.ttl_ms for f in firings if f.pattern.trigger}
        cleared = [t for t in cleared if t not in raised]
        if raised or cleared or timers:
            args: list = [len(cleared), *cleared, len(raised), *[x for kv in raised.items() for x in kv]]
            for timer in timers:
                args += [timer_member(customer_id, timer), timer.due_ms]
            reply = self._apply_script(keys=[triggers_key(customer_id), TIMERS_KEY], args=args)
            cleared = [n.decode() if isinstance(n, bytes) else n for n in reply]
        out.patterns += [f.pattern.name for f in firings]
        out.raised += sorted(raised)
        out.cleared += cleared
        out.timers += len(timers)
        for f in firings:
            metrics.pattern_firings(f.pattern.name).inc()
        for name in raised:
            metrics.trigger_changes(name, "raised").inc()
        for name in cleared:
            metrics.trigger_changes(name, "cleared").inc()
        for f in firings:
            if f.pattern.outbound is not None:
                out.outbound.append(self.outbound(customer_id, f.pattern, f.event_id))

    # --- responses and timers -----------------------------------------------------------------------
    def on_response(self, customer_id: str, action_id: str, outcome: str) -> list[str]:
        """Clear the triggers a recorded response resolves (events.yaml ``cleared_by: responses``)."""
        events = self.rules.current.ruleset.events
        names = sorted(events.clears_by_response.get((action_id, outcome), ())) if events is not None else []
        if names and customer_id:
            reply = self._apply_script(keys=[triggers_key(customer_id), TIMERS_KEY], args=[len(names), *names, 0])
            names = [n.decode() for n in reply]
            for name in names:
                metrics.TRIGGER_CHANGES.labels(name, "cleared").inc()
        return names

    def on_timer(self, member: str) -> Processed:
        """An absence timer at its due time: fire its pattern unless the missing event came."""
        started = time.perf_counter()
        customer_id, timer = parse_timer(member)
        out = Processed()
        with self.rules.use() as rules:
            patterns = rules.patterns
            if patterns is None:
                return out
            raw = cast("list[bytes]", self.client.zrangebyscore(events_key(customer_id), timer.opened_ms, timer.due_ms))
            firing = patterns.on_timer([Event.decode(m) for m in raw], timer)
            metrics.EVENT_TIMERS.labels("fired" if firing else "resolved").inc()
            if firing is not None:
                self._apply(customer_id, [firing], [], [], out, int(self.clock() * 1000))
        metrics.EVENT_SECONDS.labels("timer").observe(time.perf_counter() - started)
        return out

    # --- outbound -----------------------------------------------------------------------------------
    def outbound(self, customer_id: str, pattern: Pattern, event_id: str) -> OutboundResult:
        """Decide for ``customer_id`` on the pattern's outbound channel, aimed at its action; write what
        was presented to the outbound stream. At most once per (pattern, event); ``pattern.outbound`` is set."""
        spec = cast(Outbound, pattern.outbound)
        result = OutboundResult(spec.action, spec.channel, pattern.name, "suppressed")
        if not self.client.set(outbound_key(customer_id, pattern.name, event_id), "1", nx=True, px=30 * 86_400_000):
            result.reason = "already sent for this event"
            return result
        try:
            decision = self.engine.decide(DecideInput(
                customer_id=customer_id, channel=spec.channel, touchpoint=f"outbound:{pattern.name}",
                context={OUTBOUND_CONTEXT: spec.action}, max_actions=1, explain=True,
                ranking=OUTBOUND_RANKING, fallback=False))
        except Exception:  # not decided: a later run of the same timer may try again
            self.client.delete(outbound_key(customer_id, pattern.name, event_id))
            raise
        if decision.actions and decision.actions[0].action_id == spec.action:
            action = decision.actions[0]
            self.store.append(OUTBOUND_STREAM, {
                "decision_id": decision.decision_id, "customer_id": customer_id, "action_id": spec.action,
                "channel": spec.channel, "pattern": pattern.name, "event_id": event_id,
                "treatment": json.dumps(action.treatment, sort_keys=True), "ts": f"{decision.decided_at:.3f}",
                "ruleset_version": decision.ruleset_version,
            })
            result.status, result.decision_id = "sent", decision.decision_id
            metrics.OUTBOUND.labels(pattern.name, "sent", "").inc()
            return result
        entry = next((f for f in decision.funnel if f.action_id == spec.action and f.stage != "ranked"), None)
        stage = entry.stage if entry is not None else "not_ranked"
        result.reason = f"{stage}: {entry.detail}" if entry is not None else "not ranked"
        metrics.OUTBOUND.labels(pattern.name, "suppressed", stage).inc()
        log.info("outbound %s for %s suppressed (%s)", spec.action, customer_id, result.reason)
        return result


def timer_member(customer_id: str, timer: Timer) -> str:
    return json.dumps({"c": customer_id, "p": timer.pattern, "e": timer.opened_by, "o": timer.opened_ms,
                       "d": timer.due_ms}, separators=(",", ":"))


def parse_timer(member: bytes | str) -> tuple[str, Timer]:
    d = json.loads(member)
    return d["c"], Timer(d["p"], d["e"], int(d["o"]), int(d["d"]))


def _check_id(value: str, name: str, limit: int) -> None:
    if not value or not value.strip():
        raise InvalidRequest(name, "must not be empty")
    if len(value) > limit or any(c in value for c in "{}\n\r\t "):
        raise InvalidRequest(name, f"at most {limit} characters, no spaces or braces")


__all__ = ["EventProcessor", "OUTBOUND_STREAM", "Processed", "TIMERS_KEY", "events_key"]
