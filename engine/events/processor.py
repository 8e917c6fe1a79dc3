"""Processing one event: the same path for ``PublishEvent``, the ingest stream and absence timers.

1. One Lua script on the customer's keys: idempotency by event id (per customer), append to the
   customer's bounded history (``nba:{c:<id>}:events``, a sorted set by event time, trimmed by age per
   event type and by count; only types a pattern reads), and read back the history the patterns need:
   one round trip. On one Redis node the same script appends the event to the ``nba:stream:events``
   log; on a Redis Cluster the log is sharded (``engine.store.slots``: another slot than the
   customer's) and the entry is written after the event's other effects (steps 3 and 4).
   Before it, a ``consent_withdrawn`` event (declared in events.yaml with a ``channel`` attribute;
   ``all`` for every channel) removes that channel from the profile's ``consent`` in one script (a
   replay does it again: idempotent, so a retry of a call that failed half-way still withdraws), so every
   later decision on it (inbound, outbound, a postponed outbound at the end of quiet hours) gets no
   marketing (the built-in policy ``marketing_needs_consent``); a repeat of an interaction's stored decision
   with offers is not served on a channel without consent (``engine.decision.funnel``).
2. The patterns (``CompiledPatterns``, part of the live rule set) evaluate that history in a
   short-lived durable session.
3. One more script: triggers the event resolves are cleared, triggers of matched patterns are raised
   (with their time to live); then absence timers are added to ``nba:timers`` (the customer's shard).
   When ``publish`` returns, the next Decide on any channel sees the triggers.
4. A matched pattern with ``outbound`` runs a real decision for that customer on the outbound channel,
   aimed at that action (rules, consent, contact policies, quiet hours, budgets: the decision
   funnel's own), and writes what was presented to ``nba:stream:outbound``, or counts why not.
   Quiet hours postpone it rather than drop it: a timer in ``nba:timers`` (``"k": "outbound"``)
   re-runs the decision at the window's end with the rules, consent, policies and budgets of then,
   unless the pattern's trigger expires first (then it is suppressed and nothing is scheduled).

Every script here touches one hash slot (the customer's), so all of this runs on a Redis Cluster.

Applied once, effects at least once. The ingest script records the event id (a replay is a
duplicate) and, when the event has effects after it (patterns react to its type; on a cluster also
the log entry), marks them pending in ``nba:{c:<id>}:events:pending``; the mark is cleared after the
last effect. A call that dies in between and is retried finds the mark and does the effects again:
clearing and raising triggers and adding a timer are idempotent; the log entry, written last, is
written twice only when the call died between writing it and clearing the mark (at least once: its
``event_id`` field tells the copies apart, consumers of ``nba:stream:events`` deduplicate by it); an
outbound is guarded by its state key, below. On one node, without patterns for the type, the log entry
is written by the ingest script itself: one round trip, no mark; on a cluster such an event costs three
(ingest script, XADD, HDEL of the mark), as the writes to two slots cannot share a script.

An outbound's state key goes ``1`` (first run) to ``sent``, ``done`` (suppressed) or ``postponed``,
each change a compare-and-set in a script on the customer's slot. At most once per (pattern, event):
the stream entry is written after the change to ``sent`` succeeded and only by the caller whose change
it was, so a process dying between the two loses that outbound rather than sending it twice (a message
to a customer is worse sent twice than not at all). A postponement adds its timer *before* the change
to ``postponed``: a timer whose change then failed finds the state moved on and does nothing, and a
process dying between the two leaves a state that is not ``postponed`` (lost, not doubled). A postponed
run leaves ``postponed`` only by such a change, so it sends at most once however often its timer runs,
and a run that dies before it leaves ``postponed`` for the timer's retry. A run claim (``:run``,
``OUTBOUND_RUN_MS``) keeps two pollers from deciding it at the same time.

Key layout added here (all customer keys carry the customer's hash tag):

- ``nba:{c:<id>}:events``    sorted set: the events the patterns can read, by event time (ms); member
                             ``<type>\\x1f<id tag>\\x1f<attributes JSON>`` (``Event.member``: the id as an
                             11-character digest, ``id_tag``; the time is the score), short enough for
                             the compact listpack encoding. An event type stays as long as a pattern can
                             read it plus a day (``EventRules.keeps``): a 30-day sequence keeps its
                             ``first`` events 31 days, a threshold's 1 day; a type no pattern names is
                             not stored (it is in the log). The newest ``MAX_HISTORY_EVENTS`` at most;
                             the key lives as long as the longest keep. Members of the earlier layout
                             (event JSON with id and time) are still read and trimmed by their type.
- ``nba:{c:<id>}:event_ids`` sorted set: event ids seen, by arrival time (dedupe window)
- ``nba:{c:<id>}:outbound:<pattern>:<event id>``  an outbound's state: 1 | sent | done | postponed
- ``nba:{c:<id>}:outbound:<pattern>:<event id>:run``  the claim of a postponed run (short-lived)
- ``nba:{c:<id>}:events:pending``  hash: event id -> 1 while the event's effects are being applied
- ``nba:timers``             sorted set: absence timers and postponed outbound actions by due time
                             (see ``engine/events/timers.py``); on a cluster ``nba:timers:{shard:<k>}``
- ``nba:stream:outbound``    outbound actions for sending systems; on a cluster sharded as the timers
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from engine import metrics
from engine.decision.request import MAX_ID_LENGTH, DecideInput, InvalidRequest, check_not_ahead
from engine.errors import NbaError
from engine.rules.patterns import (
    ALL_CHANNELS,
    CONSENT_WITHDRAWN,
    MAX_HISTORY_EVENTS,
    Event,
    Firing,
    InvalidEvent,
    Outbound,
    Pattern,
    Timer,
)
from engine.store import streams
from engine.store.erasure import INDEX_LUA, customer_index_key, own_member
from engine.store.profiles import EVENTS_STREAM, META_KEY, STREAM_MAXLEN, profile_key, triggers_key
from engine.store.pseudonym import pseudonym
from engine.store.redis_tuning import COMPACT_VALUE_BYTES
from engine.store.slots import customer_shard_key, shard_count
from engine.store.updates import InvalidAttribute, apply_update, check_update

if TYPE_CHECKING:
    from engine.decision.funnel import Decision, DecisionEngine
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
OUTBOUND_TIMER = "outbound"  # the "k" of a postponed outbound's timer member (absence timers have none)
# an outbound's state key lives this long after its last change: past the dedupe window a replay of its
# event is a new event (its triggers are raised again too), so a longer guard would only cost memory
OUTBOUND_KEEP_MS = DEDUPE_MS + 86_400_000
OUTBOUND_RUN_MS = 30_000  # a postponed run's claim; a run that died is retried after the timer's lease
STARTED, SENT, DONE, POSTPONED = "1", "sent", "done", "postponed"  # an outbound's state key
# nba:meta field: when outbound state keys began to be indexed (epoch ms; erasure scans for older ones)
OUTBOUND_INDEXED_SINCE = "outbound_indexed_since"

# KEYS: history, ids, effects pending, and (one node only) the log stream. ARGV: event id, event time
# ms, history member ('' when no pattern reads its type: not stored), now ms, keeps (JSON: event type ->
# ms its events stay; a type not in it is not kept), max events, dedupe ms, read from ms, stream maxlen,
# '1' when the event's effects are pending until ``publish`` clears the mark (a pattern reacts to its
# type, or the log entry is written after this script: on a cluster), then the log entry's fields. A
# call that failed in between and is retried applies the pending effects again. Returns {0} for a
# duplicate, {2, '', history} for a duplicate whose effects are pending, else {1, log entry id ('' without
# KEYS[4]), history since ARGV[8]}; a history is (member, score) pairs, flat.
# Trimming reads every member's type: the compact layout starts with it, the earlier JSON one has it
# under "t" (the id before it is JSON text: an escaped quote cannot make '"t":"'). The set is small
# (listpack-sized in the common case, MAX_HISTORY_EVENTS at most).
_INGEST = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return {0} end
  return {2, '', redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[8], '+inf', 'WITHSCORES')}
end
if ARGV[10] == '1' then
  redis.call('HSET', KEYS[3], ARGV[1], '1')
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
local now = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[7]))
redis.call('PEXPIRE', KEYS[2], ARGV[7])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3]) end
local keeps, longest, gone, long_gone, long_left = cjson.decode(ARGV[5]), 0, {}, false, false
for _, ms in pairs(keeps) do if ms > longest then longest = ms end end
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local m, kind = all[i], nil
  if string.byte(m, 1) == 123 then kind = string.match(m, '"t":"([^"]*)"') else kind = string.match(m, '^[%w_]+') end
  local keep = keeps[kind or ''] or 0
  if keep <= 0 or tonumber(all[i + 1]) < now - keep then
    gone[#gone + 1] = m
    long_gone = long_gone or #m > COMPACT
  else
    long_left = long_left or #m > COMPACT
  end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
if long_gone and not long_left then
  -- the last member over COMPACT bytes (zset-max-listpack-value as store/redis_tuning.py sets it: an
  -- earlier-layout member, a long text attribute) went: written anew, the set is listpack-encoded again
  -- if it fits (Redis does not convert a skiplist back as it shrinks)
  local left = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  if #left > 0 then
    local args = {}
    for i = 1, #left, 2 do args[#args + 1] = left[i + 1]; args[#args + 1] = left[i] end
    redis.call('DEL', KEYS[1])
    redis.call('ZADD', KEYS[1], unpack(args))
  end
end
local n = redis.call('ZCARD', KEYS[1])
if n > tonumber(ARGV[6]) then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - tonumber(ARGV[6]) - 1) end
if longest > 0 then redis.call('PEXPIRE', KEYS[1], longest) end
local entry = ''
if #KEYS > 3 then entry = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', unpack(ARGV, 11)) end
return {1, entry, redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[8], '+inf', 'WITHSCORES')}
""".replace("COMPACT", str(COMPACT_VALUE_BYTES))

# The trigger changes of one event. KEYS[1] triggers hash. ARGV: number of triggers to clear, their
# names, number of triggers to raise, (name, expiry ms) pairs. Keeps the hash alive until its latest
# trigger expires (as store._SET_TRIGGER). Returns the names it cleared that were set. (The timers are
# another slot: ``_apply`` adds them in their own command.)
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
return cleared
"""

# An outbound's first run. KEYS: state, the customer's index. ARGV: state, keep ms, its index member
# (``store.erasure.own_member``). Claims the outbound (SET NX) and indexes its state key for erasure and
# export. Returns 1, or 0 (it ran before).
_START = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local ikey, member, ttl = KEYS[2], ARGV[3], ARGV[2]
""" + INDEX_LUA + """
return 1
"""

# An outbound's state change, only from the state the caller saw. KEYS: state, run claim, the customer's
# index. ARGV: expected state, new state, keep ms, run token ('' none), index member. Returns 1, or 0 (state changed
# meanwhile: nothing done). The run claim is released if it is ours. The stream entry or timer that goes
# with the change is another slot: see ``EventProcessor._change`` for the order.
_SETTLE = """
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
local ikey, member, ttl = KEYS[3], ARGV[5], ARGV[3]
""" + INDEX_LUA + """
return 1
"""

# Consent withdrawn, in one step. KEYS[1] the profile; ARGV the channels. Removes them from the
# profile's ``consent`` (members joined by "," in sorted order, as store/profiles.encode_profile writes
# them, so the rest stays sorted). Returns the channels removed (none without a stored profile).
_WITHDRAW = """
local removed, keep, drop = {}, {}, {}
local consent = redis.call('HGET', KEYS[1], 'consent')
if not consent then return removed end
for _, ch in ipairs(ARGV) do drop[ch] = true end
for ch in string.gmatch(consent, '[^,]+') do
  if drop[ch] then removed[#removed + 1] = ch else keep[#keep + 1] = ch end
end
if #removed > 0 then redis.call('HSET', KEYS[1], 'consent', table.concat(keep, ',')) end
return removed
"""

# KEYS[1] a run claim; ARGV[1] its token. Releases the claim if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class OutboundBusy(NbaError):
    """Another worker is running this postponed outbound right now; the timer is retried after its lease."""


def events_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:events"


def effects_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:events:pending"


def event_ids_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:event_ids"


def outbound_key(customer_id: str, pattern: str, event_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:outbound:{pattern}:{event_id}"


@dataclass
class OutboundResult:
    action_id: str
    channel: str
    pattern: str
    status: str  # sent | suppressed | postponed (quiet hours: a timer re-runs it when they end)
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
    consent_withdrawn: list[str] = field(default_factory=list)  # channels removed from the profile's consent


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
        self._settle_script = self.client.register_script(_SETTLE)
        self._start_script = self.client.register_script(_START)
        self._index_marked = False
        self._release_script = self.client.register_script(_RELEASE)
        self._withdraw_script = self.client.register_script(_WITHDRAW)
        engine.rankings.setdefault(OUTBOUND_RANKING, _outbound_ranking)
        engine.controlled_rankings.add(OUTBOUND_RANKING)  # outbound serves customers: the control group applies

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
        metrics.events_processed(self._type_label(event_type), "duplicate" if result.duplicate else "accepted",
                                 source).inc()
        metrics.event_seconds(source).observe(time.perf_counter() - started)
        return result

    def _type_label(self, event_type: str) -> str:
        """A metric label: a type declared in events.yaml, else ``unknown`` (free text never becomes a label)."""
        events = self.rules.current.ruleset.events
        return event_type if events is not None and event_type in events.types else "unknown"

    def _publish(self, event_id: str, customer_id: str, event_type: str, attributes: Mapping[str, str],
                 ts: float | None, source: str) -> Processed:
        _check_id(event_id, "event_id", 256)
        _check_id(customer_id, "customer_id", MAX_ID_LENGTH)
        if not event_type:
            raise InvalidRequest("type", "must not be empty")
        now_ms = int(self.clock() * 1000)
        ts_ms = now_ms if ts is None or ts <= 0 else int(ts * 1000)
        check_not_ahead(ts_ms / 1000, now_ms / 1000, FUTURE_SKEW_MS / 1000)
        with self.rules.use() as rules:
            events, patterns = rules.ruleset.events, rules.patterns
            if events is None:  # no events.yaml: events are only logged
                attrs: dict = dict(attributes)
            else:
                try:
                    attrs = events.validate(event_type, dict(attributes))
                except InvalidEvent as err:
                    raise InvalidRequest(err.field, str(err).split(": ", 1)[1]) from None
            withdrawn: list[str] = []
            if event_type == CONSENT_WITHDRAWN and events is not None:
                # before the event is recorded, and again for a replay (it is idempotent): a call that
                # failed half-way and is retried still withdraws; the patterns already see the new consent
                withdrawn = self.withdraw_consent(customer_id, _withdrawn_channels(attrs, rules.schema.channel_names))
            if events is not None and events.types[event_type].sets:
                # like a withdrawal: before the event is recorded, and again for a replay (idempotent)
                declared = events.types[event_type].sets
                try:
                    change = check_update(rules.schema, {target: attrs[source] for target, source in declared.items()})
                except InvalidAttribute as exc:
                    source = declared[exc.field.split(".", 1)[1]]
                    raise InvalidRequest(f"attributes.{source}", str(exc).split(": ", 1)[1]) from None
                apply_update(self.store, customer_id, change, rules.schema)
            event = Event(event_id, event_type, ts_ms, attrs)
            since = ts_ms - (events.window_ms if events is not None else 0)
            log_fields = {"event_id": event_id, "customer_id": customer_id, "type": event_type,
                          "ts": f"{ts_ms / 1000:.3f}", "source": source,
                          **{f"attr.{k}": str(v) for k, v in attributes.items()}}
            reactive = events is not None and patterns is not None and (
                event_type in patterns.types or event_type in events.clears_by_event)
            # one node: the log entry is written in the ingest script; a cluster: after it (another slot),
            # as a pending effect
            inline = shard_count(self.client) == 1
            keys = [events_key(customer_id), event_ids_key(customer_id), effects_key(customer_id)]
            reply = self._ingest(
                keys=keys + [EVENTS_STREAM] if inline else keys,
                args=[event_id, ts_ms, event.member() if events is not None and events.keep_ms(event_type) else "",
                      now_ms, events.keeps_json if events is not None else "{}", MAX_HISTORY_EVENTS, DEDUPE_MS, since,
                      STREAM_MAXLEN, "1" if reactive or not inline else "0",
                      *[x for kv in log_fields.items() for x in kv]])
            if not reply[0]:
                return Processed(duplicate=True, consent_withdrawn=withdrawn)
            if reply[0] == 1:
                metrics.events(self._type_label(event_type)).inc()
            stream_id = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
            out = Processed(stream_id=stream_id, duplicate=reply[0] == 2, consent_withdrawn=withdrawn)
            if reactive:
                assert events is not None and patterns is not None
                history = history_events(reply[2])
                firings, timers = patterns.on_event(history, event)
                cleared = sorted(events.clears_by_event.get(event_type, ()))
                self._apply(customer_id, firings, cleared, timers, out, now_ms)
            if not inline:  # the last effect, so only a death between it and the mark's removal writes it twice
                out.stream_id = streams.append(self.client, EVENTS_STREAM, customer_id, log_fields)
            if reactive or not inline:
                self.client.hdel(effects_key(customer_id), event_id)
        return out

    def _apply(self, customer_id: str, firings: list[Firing], cleared: list[str], timers: list[Timer],
               out: Processed, now_ms: int) -> None:
        """Clear and raise (one script), schedule, then the outbound decisions."""
        raised = {f.pattern.trigger: now_ms + f.pattern.ttl_ms for f in firings if f.pattern.trigger}
        cleared = [t for t in cleared if t not in raised]
        if raised or cleared:
            args: list = [len(cleared), *cleared, len(raised), *[x for kv in raised.items() for x in kv]]
            reply = self._apply_script(keys=[triggers_key(customer_id)], args=args)
            cleared = [n.decode() if isinstance(n, bytes) else n for n in reply]
        if timers:
            self.client.zadd(customer_shard_key(TIMERS_KEY, customer_id, self.client),
                             {timer_member(customer_id, t): t.due_ms for t in timers})
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
                out.outbound.append(self.outbound(customer_id, f.pattern, f.event_id, now_ms))

    def withdraw_consent(self, customer_id: str, channels: list[str]) -> list[str]:
        """Remove ``channels`` from the customer's consent (one atomic update of the profile, which every
        following decision reads: inbound, outbound and postponed outbound on those channels then get
        service actions only, the built-in ``marketing_needs_consent``). Returns the channels removed:
        none when the profile had none of them or there is no stored profile (a cold start never has
        e-mail or SMS consent)."""
        reply = self._withdraw_script(keys=[profile_key(customer_id)], args=channels)
        removed = [c.decode() if isinstance(c, bytes) else c for c in reply]
        if removed:
            log.info("consent withdrawn for %s on %s", pseudonym(customer_id), ", ".join(removed))
        else:
            log.info("consent withdrawal for %s on %s: no stored profile with that consent", pseudonym(customer_id),
                     ", ".join(channels))
        return removed

    # --- responses and timers -----------------------------------------------------------------------
    def on_response(self, customer_id: str, action_id: str, outcome: str) -> list[str]:
        """Clear the triggers a recorded response resolves (events.yaml ``cleared_by: responses``)."""
        events = self.rules.current.ruleset.events
        names = sorted(events.clears_by_response.get((action_id, outcome), ())) if events is not None else []
        if names and customer_id:
            reply = self._apply_script(keys=[triggers_key(customer_id)], args=[len(names), *names, 0])
            names = [n.decode() for n in reply]
            for name in names:
                metrics.TRIGGER_CHANGES.labels(name, "cleared").inc()
        return names

    def on_timer(self, member: str) -> Processed:
        """A timer at its due time: an absence timer fires its pattern unless the missing event came; a
        postponed outbound is decided again (``OutboundBusy`` when another worker is deciding it)."""
        started = time.perf_counter()
        fields = json.loads(member)
        if fields.get("k") == OUTBOUND_TIMER:
            out = self._postponed(fields)
            metrics.EVENT_SECONDS.labels("timer").observe(time.perf_counter() - started)
            return out
        customer_id, timer = parse_timer(member)
        out = Processed()
        with self.rules.use() as rules:
            patterns = rules.patterns
            if patterns is None:
                return out
            raw = cast("list[tuple[bytes, float]]", self.client.zrangebyscore(
                events_key(customer_id), timer.opened_ms, timer.due_ms, withscores=True))
            firing = patterns.on_timer([Event.decode(m, score) for m, score in raw], timer)
            metrics.EVENT_TIMERS.labels("fired" if firing else "resolved").inc()
            if firing is not None:
                self._apply(customer_id, [firing], [], [], out, int(self.clock() * 1000))
        metrics.EVENT_SECONDS.labels("timer").observe(time.perf_counter() - started)
        return out

    # --- outbound -----------------------------------------------------------------------------------
    def outbound(self, customer_id: str, pattern: Pattern, event_id: str, fired_ms: int | None = None) -> OutboundResult:
        """Decide for ``customer_id`` on the pattern's outbound channel, aimed at its action; write what
        was presented to the outbound stream, or postpone it to the end of quiet hours. At most once per
        (pattern, event); ``pattern.outbound`` is set. ``fired_ms``: when the pattern matched (its
        trigger expires ``pattern.ttl_ms`` later; default now)."""
        spec = cast(Outbound, pattern.outbound)
        result = OutboundResult(spec.action, spec.channel, pattern.name, "suppressed")
        key = outbound_key(customer_id, pattern.name, event_id)
        if not self._index_marked:
            self.client.hsetnx(META_KEY, OUTBOUND_INDEXED_SINCE, int(time.time() * 1000))
            self._index_marked = True
        index: list[str | int] = [STARTED, OUTBOUND_KEEP_MS, own_member(customer_id, key)]
        if not self._start_script(keys=[key, customer_index_key(customer_id)], args=index):
            result.reason = ("already postponed for this event" if self._state(key) == POSTPONED
                             else "already sent for this event")
            return result
        fired_ms = int(self.clock() * 1000) if fired_ms is None else fired_ms
        expires_ms = fired_ms + pattern.ttl_ms if pattern.trigger and pattern.ttl_ms > 0 else 0
        try:
            decision = self._decide_outbound(customer_id, pattern.name, spec)
        except Exception:  # not decided: a later run of the same timer may try again
            self.client.delete(key)
            raise
        return self._settle(customer_id, pattern.name, event_id, spec, decision, result, STARTED, expires_ms, 1)

    def _trigger_live(self, customer_id: str, trigger: str, now_ms: int) -> bool:
        expiry = self.client.hget(triggers_key(customer_id), trigger)
        return expiry is not None and int(expiry) > now_ms

    def _state(self, key: str) -> str | None:
        value = self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    def _decide_outbound(self, customer_id: str, pattern: str, spec: Outbound) -> Decision:
        return self.engine.decide(DecideInput(
            customer_id=customer_id, channel=spec.channel, touchpoint=f"outbound:{pattern}",
            context={OUTBOUND_CONTEXT: spec.action}, max_actions=1, explain=True,
            ranking=OUTBOUND_RANKING, fallback=False))

    def _settle(self, customer_id: str, pattern: str, event_id: str, spec: Outbound, decision: Decision,
                result: OutboundResult, expected: str, expires_ms: int, attempt: int, token: str = "") -> OutboundResult:
        """Send, postpone or suppress what ``decision`` says, moving the outbound's state from ``expected``."""
        if decision.actions and decision.actions[0].action_id == spec.action:
            action = decision.actions[0]
            entry = {"decision_id": decision.decision_id, "customer_id": customer_id, "action_id": spec.action,
                     "channel": spec.channel, "pattern": pattern, "event_id": event_id,
                     "treatment": json.dumps(action.treatment, sort_keys=True), "ts": f"{decision.decided_at:.3f}",
                     "ruleset_version": decision.ruleset_version}
            if not self._change(customer_id, pattern, event_id, expected, SENT, token, entry=entry):
                result.reason = "already sent for this event"
                return result
            result.status, result.decision_id = "sent", decision.decision_id
            metrics.OUTBOUND.labels(pattern, "sent", "").inc()
            return result
        found = next((f for f in decision.funnel if f.action_id == spec.action and f.stage != "ranked"), None)
        stage = found.stage if found is not None else "not_ranked"
        result.reason = f"{stage}: {found.detail}" if found is not None else "not ranked"
        if found is not None and found.stage == "quiet_hours":
            window = found.detail  # "quiet hours 21:00-08:00 <zone> on email", on the customer's clock
            # the decision's own rules and clock found it quiet and said when that window ends
            due_ms = round((decision.quiet_until or decision.decided_at) * 1000)
            if expires_ms and expires_ms <= due_ms:
                result.reason = (f"{window} until {_utc(due_ms)}: the trigger's time to live ends first "
                                 f"({_utc(expires_ms)}), not postponed")
                stage = "quiet_hours_ttl"
            else:
                member = outbound_timer_member(customer_id, pattern, event_id, expires_ms, due_ms, attempt)
                if not self._change(customer_id, pattern, event_id, expected, POSTPONED, token, member, due_ms):
                    result.reason = "already sent for this event"
                    return result
                result.status, result.reason = "postponed", f"{window}: postponed to {_utc(due_ms)}"
                metrics.OUTBOUND.labels(pattern, "postponed", "quiet_hours").inc()
                log.info("outbound %s for %s %s", spec.action, pseudonym(customer_id), result.reason)
                return result
        if not self._change(customer_id, pattern, event_id, expected, DONE, token):
            result.reason = "already sent for this event"
            return result
        metrics.OUTBOUND.labels(pattern, "suppressed", stage).inc()
        log.info("outbound %s for %s suppressed (%s)", spec.action, pseudonym(customer_id), result.reason)
        return result

    def _change(self, customer_id: str, pattern: str, event_id: str, expected: str, state: str, token: str,
                member: str = "", due_ms: int = 0, entry: dict[str, str] | None = None) -> bool:
        """Move the outbound's state from ``expected`` to ``state``; a postponement's timer is added before
        (a timer whose change then fails finds the state moved on and does nothing), a sent outbound's
        stream entry after, and only by the caller whose change succeeded (at most once)."""
        key = outbound_key(customer_id, pattern, event_id)
        if member:
            self.client.zadd(customer_shard_key(TIMERS_KEY, customer_id, self.client), {member: due_ms})
        if not self._settle_script(keys=[key, f"{key}:run", customer_index_key(customer_id)],
                                   args=[expected, state, OUTBOUND_KEEP_MS, token, own_member(customer_id, key)]):
            return False
        if entry is not None:
            streams.append(self.client, OUTBOUND_STREAM, customer_id, entry)
        return True

    def _postponed(self, timer: dict[str, Any]) -> Processed:
        """A postponed outbound at the end of its quiet hours: decide again, on the rules of now."""
        customer_id, name, event_id = timer["c"], timer["p"], timer["e"]
        expires_ms, attempt = int(timer.get("x") or 0), int(timer.get("n") or 1)
        out = Processed()
        key = outbound_key(customer_id, name, event_id)
        if self._state(key) != POSTPONED:
            return out  # sent, suppressed or expired meanwhile (an earlier run of this timer)
        token = uuid.uuid4().hex
        if not self.client.set(f"{key}:run", token, nx=True, px=OUTBOUND_RUN_MS):
            raise OutboundBusy(f"postponed outbound {name} for {customer_id} ({event_id}) is being decided elsewhere")
        try:
            with self.rules.use() as rules:
                events = rules.ruleset.events
                pattern = next((p for p in events.patterns if p.name == name), None) if events is not None else None
            spec = pattern.outbound if pattern is not None else None
            if spec is None:
                result = OutboundResult("", "", name, "suppressed", reason=f"pattern {name} has no outbound action any more")
                stage = "pattern"
            else:
                result = OutboundResult(spec.action, spec.channel, name, "suppressed")
                now_ms = int(self.clock() * 1000)
                if expires_ms and now_ms >= expires_ms:
                    result.reason = f"the trigger's time to live ended ({_utc(expires_ms)}) before the postponed send"
                    stage = "expired"
                elif pattern is not None and pattern.trigger and not self._trigger_live(customer_id, pattern.trigger, now_ms):
                    result.reason = f"trigger {pattern.trigger} was cleared before the postponed send"
                    stage = "cleared"
                else:
                    decision = self._decide_outbound(customer_id, name, spec)
                    out.outbound.append(self._settle(customer_id, name, event_id, spec, decision, result, POSTPONED,
                                                     expires_ms, attempt + 1, token))
                    return out
            if self._change(customer_id, name, event_id, POSTPONED, DONE, token):
                metrics.OUTBOUND.labels(name, "suppressed", stage).inc()
                log.info("postponed outbound %s for %s suppressed (%s)", name, pseudonym(customer_id), result.reason)
                out.outbound.append(result)
            return out
        finally:
            self._release_script(keys=[f"{key}:run"], args=[token])


def outbound_timer_member(customer_id: str, pattern: str, event_id: str, expires_ms: int, due_ms: int,
                          attempt: int) -> str:
    """A postponed outbound's timer: who, which pattern and event, when its trigger expires (0: never),
    when it is due and which postponement this is (a member never repeats, so re-postponing while the
    poller holds the previous one cannot be undone by the poller removing that one)."""
    return json.dumps({"k": OUTBOUND_TIMER, "c": customer_id, "p": pattern, "e": event_id, "x": expires_ms,
                       "d": due_ms, "n": attempt}, separators=(",", ":"))


def _utc(ms: int) -> str:
    """``2026-12-01T08:00Z`` (seconds only when there are any)."""
    at = datetime.fromtimestamp(ms / 1000, UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ" if at.second else "%Y-%m-%dT%H:%MZ")


def history_events(flat: Sequence[bytes | str]) -> list[Event]:
    """The events of a history read back as flat (member, score) pairs, of either layout."""
    return [Event.decode(flat[i], float(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]


def timer_member(customer_id: str, timer: Timer) -> str:
    return json.dumps({"c": customer_id, "p": timer.pattern, "e": timer.opened_by, "o": timer.opened_ms,
                       "d": timer.due_ms}, separators=(",", ":"))


def parse_timer(member: bytes | str) -> tuple[str, Timer]:
    d = json.loads(member)
    return d["c"], Timer(d["p"], d["e"], int(d["o"]), int(d["d"]))


def _withdrawn_channels(attrs: Mapping[str, Any], channels: Sequence[str]) -> list[str]:
    """The channels a ``consent_withdrawn`` event names (its ``channel`` attribute; ``all``: every one)."""
    channel = attrs.get("channel")
    if channel == ALL_CHANNELS:
        return list(channels)
    if channel not in channels:
        raise InvalidRequest("attributes.channel", f"{CONSENT_WITHDRAWN} needs a channel: one of "
                                                   f"{', '.join(channels)} or {ALL_CHANNELS}")
    return [str(channel)]



def _check_id(value: str, name: str, limit: int) -> None:
    if not value or not value.strip():
        raise InvalidRequest(name, "must not be empty")
    if len(value) > limit or any(c in value for c in "{}\n\r\t "):
        raise InvalidRequest(name, f"at most {limit} characters, no spaces or braces")


__all__ = ["EventProcessor", "OUTBOUND_STREAM", "OutboundBusy", "Processed", "TIMERS_KEY", "events_key",
           "history_events"]
