"""The customer's event history (``nba:{c:<id>}:events``): only the event types a pattern reads, each as
long as a pattern can read it plus a day, in a compact member that keeps the key listpack-encoded;
members of the earlier JSON layout read and trimmed; the patterns fire as they did when the history kept
every event; the rule tests' mirror agrees. A real App on a real Redis with a clock the test moves."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from engine.authoring.eventtests import _Simulation
from engine.events.processor import TIMERS_KEY, events_key
from engine.events.timers import TimerPoller
from engine.rules.facts import FactInputs
from engine.rules.patterns import MIN_HISTORY_MS, CompiledPatterns, Event, EventRules, id_tag
from engine.rules.runtime import load_and_compile
from engine.serving.app import App
from engine.serving.privacy import export_customer
from engine.store.profiles import EVENTS_STREAM, redis_client
from engine.store.redis_tuning import COMPACT_VALUE_BYTES

from . import shards
from .clock import Clock, at
from .conftest import RULES_DIR
from .test_quiet_hours import _app, _profile

DAY, HOUR = 86_400_000, 3_600_000
MIX = ("data_usage", "payment_failed", "payment_received", "contact_request", "call_completed", "complaint_opened")
COMPACT = (b"listpack", b"ziplist")  # ziplist: Redis 6


@pytest.fixture()
def clock() -> Clock:
    return Clock(at(0, "09:00"))


@pytest.fixture()
def app(redis_url: str, models_dir: Path, tmp_path: Path, clock: Clock):
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    served = _app(redis_url, models_dir, rules, clock)
    yield served
    served.close()


@pytest.fixture(scope="module")
def demo():
    rules = load_and_compile(RULES_DIR)
    yield rules
    rules.close()


def _stored(app: App, customer: str) -> list[Event]:
    members = app.store.client.zrange(events_key(customer), 0, -1, withscores=True)
    return [Event.decode(m, score) for m, score in members]


def _publish(app: App, clock: Clock, ms: int, event_id: str, customer: str, kind: str, **attrs: str) -> list[str]:
    clock.now = ms / 1000
    return app.events.publish(event_id, customer, kind, attrs).patterns


# --- what is kept, and how ---------------------------------------------------------------------------

def test_each_demo_type_is_kept_as_long_as_a_pattern_reads_it_plus_a_day(demo) -> None:
    events: EventRules = demo.ruleset.events
    assert events.keeps == {
        "contact_request": 2 * DAY,      # callback_request counts 1d; callback_overdue's after: the arriving event
        "call_completed": 2 * DAY,       # callback_overdue's missing: 24h
        "payment_failed": 8 * DAY,       # repeated_payment_failure: 7d; the sequence's then: the arriving event
        "complaint_opened": 31 * DAY,    # complaint_then_payment_failure's first: 30d
        "data_usage": DAY,               # a threshold reads the arriving event only
        "contract_end_notice": DAY,      # an absence's after likewise
        "offer_accepted": 8 * DAY,       # renewal_not_taken's missing: 7d
    }
    for kind in ("payment_received", "complaint_resolved", "consent_withdrawn"):  # only cleared_by, or nothing
        assert events.keep_ms(kind) == 0
    assert MIN_HISTORY_MS == DAY


def test_a_member_is_short_and_reads_back_in_both_layouts(demo) -> None:
    events: EventRules = demo.ruleset.events
    for name, declared in events.types.items():
        if not events.keep_ms(name) or any(a.kind == "str" for a in declared.attributes.values()):
            continue  # not stored; a free-text attribute (offer_accepted) is as long as its text
        attrs = {a.name: max(a.levels, key=len) if a.kind == "cat" else 12345.678 for a in declared.attributes.values()}
        event = Event("x" * 256, name, 1_796_645_849_929, attrs)
        member = event.member()
        assert len(member.encode()) <= 64, member
        assert Event.decode(member.encode(), float(event.ts_ms)) == Event(id_tag(event.id), name, event.ts_ms, attrs)
        assert Event.decode(event.encode()) == event == Event.decode(event.encode(), 0.0)  # the earlier layout
    assert len(id_tag("sim-15-1-100-0")) == 11 and id_tag("a") != id_tag("b")
    bare = Event("k", "call_completed", 5)
    assert bare.member() == f"call_completed\x1f{id_tag('k')}\x1f" and Event.decode(bare.member(), 5) == Event(
        id_tag("k"), "call_completed", 5)


def test_the_arriving_event_is_found_by_its_tag_and_firings_keep_its_id(demo) -> None:
    p: CompiledPatterns = demo.patterns

    def stored(e: Event) -> Event:
        return Event.decode(e.member(), e.ts_ms)

    a = Event("pay-a", "payment_failed", 0, {"amount": 5.0})
    b = Event("pay-b", "payment_failed", 6 * DAY, {"amount": 5.0})
    assert p.on_event([stored(b)], b) == ([], [])  # b once, not its stored copy and itself: no count of 2
    firings, _ = p.on_event([stored(a), stored(b)], b)
    assert [(f.pattern.name, f.event_id) for f in firings] == [("repeated_payment_failure", "pay-b")]
    request = Event("req-1", "contact_request", 0, {"topic": "sales"})
    _, (timer,) = p.on_event([stored(request)], request)
    assert timer.opened_by == "req-1"
    fired = p.on_timer([stored(request)], timer)
    assert fired is not None and fired.event_id == "req-1"


# --- on Redis -----------------------------------------------------------------------------------------

def _before(patterns: CompiledPatterns, events: EventRules, sequence: list[Event], until_ms: int) -> list[str]:
    """What the patterns fired when the history kept every event for the longest window (at least a day)."""
    keep = max(events.window_ms, MIN_HISTORY_MS)
    history: list[Event] = []
    timers: list = []
    fired: list[str] = []

    def due(to_ms: int) -> None:
        for t in sorted((t for t in timers if t.due_ms <= to_ms), key=lambda t: t.due_ms):
            timers.remove(t)
            firing = patterns.on_timer([e for e in history if t.opened_ms <= e.ts_ms <= t.due_ms], t)
            fired.extend([firing.pattern.name] if firing else [])

    for e in sequence:
        due(e.ts_ms)
        history = [x for x in history if x.ts_ms >= e.ts_ms - keep] + [e]
        firings, opened = patterns.on_event([x for x in history if x.ts_ms >= e.ts_ms - events.window_ms], e)
        fired += [f.pattern.name for f in firings]
        timers += opened
    due(until_ms)
    return fired


def _attributes(kind: str, rng: random.Random) -> dict[str, str]:
    return {"data_usage": {"used_ratio": f"{rng.uniform(0.3, 0.99):.2f}"},
            "payment_failed": {"amount": f"{rng.uniform(5, 120):.2f}"},
            "payment_received": {"amount": f"{rng.uniform(5, 120):.2f}"},
            "contact_request": {"topic": rng.choice(["billing", "technical", "sales", "cancellation", "other"])},
            "call_completed": {},
            "complaint_opened": {"severity": rng.choice(["low", "medium", "high"])}}[kind]


@pytest.mark.both_redis
def test_the_demo_mix_keeps_a_small_listpack_history_and_fires_as_before(
        app: App, clock: Clock, redis_admin_url: str) -> None:
    """2 events a day over 31 days of the demo mix: the patterns fire as with the whole history (and as the
    rule tests' mirror says), the key holds only what a pattern can still read, every member in 64 bytes
    (Redis's default limit of the compact encoding; the service's Redis has 128, ``store/redis_tuning.py``)."""
    client, admin = app.store.client, redis_client(redis_admin_url)
    rules = app.rules.current
    events: EventRules = rules.ruleset.events
    customer, rng, start = "HIST-MIX", random.Random(7), int(clock.now * 1000)
    _profile(app, customer)
    raw = [(kind, _attributes(kind, rng)) for kind in (rng.choice(MIX) for _ in range(62))]
    sequence = [Event(f"ev-{n}", kind, start + (n // 2) * DAY + (n % 2) * 8 * HOUR, events.validate(kind, attrs))
                for n, (kind, attrs) in enumerate(raw)]
    until = sequence[-1].ts_ms + 2 * DAY

    fired: list[str] = []
    poller = TimerPoller(client, lambda member: fired.extend(app.events.on_timer(member).patterns), clock=clock)
    for e, (_, attrs) in zip(sequence, raw):
        clock.now = e.ts_ms / 1000
        poller.poll_once()
        fired += app.events.publish(e.id, customer, e.type, attrs).patterns
    clock.now = until / 1000
    poller.poll_once()

    assert fired == _before(rules.patterns, events, sequence, until)
    assert {"repeated_payment_failure", "complaint_then_payment_failure", "callback_request", "callback_overdue",
            "data_cap_near", "complaint"} <= set(fired)
    simulation = _Simulation(rules, FactInputs())  # the rule tests' mirror of the server
    for e in sequence:
        simulation.advance(e.ts_ms)
        simulation.event(e)
    simulation.advance(until)
    assert simulation.fired == fired
    assert sorted(simulation.history, key=lambda e: (e.ts_ms, e.id)) == sorted(_stored(app, customer),
                                                                                key=lambda e: (e.ts_ms, e.id))

    key, last = events_key(customer), sequence[-1].ts_ms
    kept = [e for e in sequence if events.keep_ms(e.type) and e.ts_ms >= last - events.keep_ms(e.type)]
    assert 0 < len(kept) < 30
    assert sorted(_stored(app, customer), key=lambda e: e.ts_ms) == [
        Event(id_tag(e.id), e.type, e.ts_ms, e.attrs) for e in kept]
    assert all(len(m) <= 64 for m in client.zrange(key, 0, -1))  # compact even at Redis's default limit
    assert admin.object("encoding", key) in COMPACT
    assert 30 * DAY < client.pttl(key) <= 31 * DAY  # the longest keep

    # the same customer's history in the earlier layout: every event of the longest window, as JSON
    earlier = events_key("HIST-MIX-EARLIER")
    admin.zadd(earlier, {e.encode(): e.ts_ms for e in sequence if e.ts_ms >= last - events.window_ms})
    assert admin.memory_usage(key) * 3 < admin.memory_usage(earlier), (admin.memory_usage(key), admin.memory_usage(earlier))


@pytest.mark.both_redis
def test_a_type_no_pattern_reads_is_logged_and_clears_but_is_not_kept(app: App, clock: Clock, redis_url: str) -> None:
    customer, t = "HIST-PAID", int(clock.now * 1000)
    _publish(app, clock, t, "pf-1", customer, "payment_failed", amount="20")
    assert _publish(app, clock, t + HOUR, "pf-2", customer, "payment_failed", amount="25") == ["repeated_payment_failure"]
    clock.now = (t + 2 * HOUR) / 1000
    out = app.events.publish("pr-1", customer, "payment_received", {"amount": "45"})
    assert out.cleared == ["payment_failed"] and out.stream_id and not out.duplicate
    assert [e.type for e in _stored(app, customer)] == ["payment_failed", "payment_failed"]
    logged = shards.entries(redis_client(redis_url, decode_responses=True), EVENTS_STREAM)
    assert [(f["type"], f["attr.amount"]) for f in logged if f["event_id"] == "pr-1"] == [("payment_received", "45")]
    assert app.events.publish("pr-1", customer, "payment_received", {"amount": "45"}).duplicate  # deduped all the same
    app.events.publish("pr-2", "HIST-ONLY-PAID", "payment_received", {"amount": "5"})
    assert app.store.client.exists(events_key("HIST-ONLY-PAID")) == 0


@pytest.mark.both_redis
def test_each_type_goes_after_its_own_keep(app: App, clock: Clock) -> None:
    customer, t = "HIST-TRIM", int(clock.now * 1000)
    _publish(app, clock, t, "c-1", customer, "complaint_opened", severity="high")
    _publish(app, clock, t, "p-1", customer, "payment_failed", amount="5")
    _publish(app, clock, t + 8 * DAY - 60_000, "u-1", customer, "data_usage", used_ratio="0.5")
    assert sorted(e.type for e in _stored(app, customer)) == ["complaint_opened", "data_usage", "payment_failed"]
    _publish(app, clock, t + 8 * DAY + 60_000, "u-2", customer, "data_usage", used_ratio="0.5")
    assert sorted(e.type for e in _stored(app, customer)) == ["complaint_opened", "data_usage", "data_usage"]
    _publish(app, clock, t + 31 * DAY + 60_000, "u-3", customer, "data_usage", used_ratio="0.5")
    assert [e.id for e in _stored(app, customer)] == [id_tag("u-3")]


@pytest.mark.both_redis
def test_members_of_the_earlier_layout_are_read_trimmed_and_replaced(
        app: App, clock: Clock, redis_admin_url: str) -> None:
    client, admin = app.store.client, redis_client(redis_admin_url)
    customer, t = "HIST-OLD", int(clock.now * 1000)
    key = events_key(customer)
    _profile(app, customer)
    o1 = "o1-" + "x" * COMPACT_VALUE_BYTES  # a long id: an earlier-layout member too long for the compact encoding
    old = [Event(o1, "complaint_opened", t - 20 * DAY, {"severity": "high"}),
           Event("o2", "payment_failed", t - 3 * DAY, {"amount": 15.0}),
           Event("o3", "payment_received", t - 2 * DAY, {"amount": 15.0}),   # a type no pattern reads
           Event("o4", "data_usage", t - 2 * DAY, {"used_ratio": 0.5}),       # older than its keep (1d)
           Event("o5", "contact_request", t - 5 * DAY, {"topic": "sales"})]   # likewise (2d)
    client.zadd(key, {e.encode(): e.ts_ms for e in old})

    # a count with an old member, a sequence opened by an old member
    assert sorted(_publish(app, clock, t, "p1", customer, "payment_failed", amount="30")) == [
        "complaint_then_payment_failure", "repeated_payment_failure"]
    assert sorted(e.id for e in _stored(app, customer)) == sorted([o1, "o2", id_tag("p1")])
    assert _publish(app, clock, t + HOUR, "u1", customer, "data_usage", used_ratio="0.95") == ["data_cap_near"]
    assert _publish(app, clock, t + 2 * HOUR, "r1", customer, "contact_request", topic="billing") == ["callback_request"]
    assert _publish(app, clock, t + 5 * HOUR // 2, "k1", customer, "call_completed") == []
    assert _publish(app, clock, t + 3 * HOUR, "r2", customer, "contact_request", topic="billing") == ["callback_request"]
    client.zadd(key, {Event("o6", "call_completed", t + 4 * HOUR).encode(): t + 4 * HOUR})  # an old-layout call
    assert _publish(app, clock, t + 5 * HOUR, "c1", customer, "complaint_opened", severity="low") == ["complaint"]
    assert _publish(app, clock, t + 30 * HOUR, "r3", customer, "contact_request", topic="other") == ["callback_request"]

    # the absence timers read both layouts: r1's window has k1 (compact), r2's o6 (old); r3's has no call
    clock.now = (t + 55 * HOUR) / 1000
    timers = [m.decode() for m, _ in shards.zrange(client, TIMERS_KEY)]
    assert [app.events.on_timer(m).patterns for m in timers] == [[], [], ["callback_overdue"]]

    exported = {e["event_id"] or e["id_tag"]: e for e in export_customer(client, customer, who=None)["event_history"]}
    assert exported[o1] == {"event_id": o1, "id_tag": "", "type": "complaint_opened", "at": exported[o1]["at"],
                            "attributes": {"severity": "high"}}
    assert exported["c1"]["id_tag"] == id_tag("c1") and exported["c1"]["attributes"] == {"severity": "low"}
    assert exported["c1"]["at"].endswith("T14:00:00.000Z")

    # o1 (31d, over the compact limit) still there: the key stays a skiplist; once it goes, the key is written anew
    assert admin.object("encoding", key) == b"skiplist"
    _publish(app, clock, t + 12 * DAY, "u2", customer, "data_usage", used_ratio="0.5")
    assert sorted(e.id for e in _stored(app, customer)) == sorted([id_tag("c1"), id_tag("u2")])
    assert admin.object("encoding", key) in COMPACT
    assert 30 * DAY < client.pttl(key) <= 31 * DAY


@pytest.mark.both_redis
def test_a_long_member_makes_a_skiplist_until_it_goes(app: App, clock: Clock, redis_admin_url: str) -> None:
    admin, customer, t = redis_client(redis_admin_url), "HIST-LONG", int(clock.now * 1000)
    key = events_key(customer)
    _publish(app, clock, t, "c-1", customer, "complaint_opened", severity="medium")
    _publish(app, clock, t, "a-1", customer, "offer_accepted", action_id="renewal-" + "x" * 120)
    assert max(len(m) for m in app.store.client.zrange(key, 0, -1)) > COMPACT_VALUE_BYTES  # a long text attribute
    assert admin.object("encoding", key) == b"skiplist"
    _publish(app, clock, t + 8 * DAY + 60_000, "u-1", customer, "data_usage", used_ratio="0.5")  # offer_accepted: 8d
    assert sorted(e.type for e in _stored(app, customer)) == ["complaint_opened", "data_usage"]
    assert admin.object("encoding", key) in COMPACT


def test_the_export_shows_a_compact_member_without_a_logged_event_by_its_tag(app: App, clock: Clock) -> None:
    client, t = app.store.client, int(clock.now * 1000)
    lost = Event("lost-1", "complaint_opened", t, {"severity": "medium"})
    client.zadd(events_key("HIST-EXPORT"), {lost.member(): t})
    (shown,) = export_customer(client, "HIST-EXPORT", who=None)["event_history"]
    assert shown == {"event_id": "", "id_tag": id_tag("lost-1"), "type": "complaint_opened",
                     "at": shown["at"], "attributes": {"severity": "medium"}}
    assert shown["at"].endswith("T09:00:00.000Z")
