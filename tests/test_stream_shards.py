"""Streams and timers split over shards on a Redis Cluster (one shard, the base key, on one node): a
customer's entries stay on one shard in order, readers see every shard, the events path is single-slot,
and privacy finds a customer in every shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from engine.analytics.recorded import Recorded
from engine.config import Config
from engine.events.processor import OUTBOUND_STREAM, TIMERS_KEY, effects_key
from engine.serving.app import App
from engine.serving.privacy import export_customer, forget_customers
from engine.store.decision_log import DecisionLog
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, redis_client, triggers_key
from engine.store.slots import customer_shard_key, shard_count, shard_of
from engine.store.streams import id_order, last_entry, length, xrange_all

from . import shards
from .clock import Clock, at
from .conftest import RULES_DIR
from .test_quiet_hours import _profile

pytestmark = pytest.mark.both_redis


def _on_different_shards(client: redis.Redis, n: int, prefix: str = "SH") -> list[str]:
    """``n`` customer ids on ``n`` different shards (on one node: all on the one shard)."""
    count, found, seen = shard_count(client), [], set()
    i = 0
    while len(found) < n:
        c = f"{prefix}{i}"
        if count == 1 or shard_of(c, count) not in seen:
            seen.add(shard_of(c, count))
            found.append(c)
        i += 1
    return found


def test_a_customers_entries_land_in_one_shard_in_order_and_readers_see_every_shard(
        redis_url: str, redis_mode: str) -> None:
    client = redis_client(redis_url)
    customers = _on_different_shards(client, 4)
    log = DecisionLog(client, linger=0)
    for i in range(5):
        for c in customers:
            log.write({"decision_id": f"{c}-{i}", "customer_id": c, "seq": str(i), "actions": ""})
    log.close()
    keys = {c: customer_shard_key(DECISIONS_STREAM, c, client) for c in customers}
    assert len(set(keys.values())) == (4 if redis_mode == "cluster" else 1)
    if redis_mode == "node":
        assert set(keys.values()) == {DECISIONS_STREAM}  # one node: the names the service always used
    for c, key in keys.items():
        mine = [f for _, f in client.xrange(key) if f[b"customer_id"] == c.encode()]
        assert [f[b"seq"] for f in mine] == [str(i).encode() for i in range(5)]  # all there, in order
    everything = list(xrange_all(client, DECISIONS_STREAM, chunk=3))  # pages of 3 per shard
    assert len(everything) == 20 == length(client, DECISIONS_STREAM)
    assert [id_order(e[0]) for e in everything] == sorted(id_order(e[0]) for e in everything)
    with Recorded(client, chunk=2) as recorded:  # the analytics' reader, in pages of 2 per shard
        view = recorded.view(DECISIONS_STREAM, ["decision_id"])
        seen = [row[0] for row in recorded.con.sql(f"SELECT decision_id FROM {view}").fetchall()]
    assert sorted(seen) == sorted(f"{c}-{i}" for c in customers for i in range(5))
    last = last_entry(client, DECISIONS_STREAM)
    assert last is not None and id_order(last[0]) == max(id_order(e[0]) for e in everything)
    assert last_entry(client, "nba:stream:nothing") is None


def _app(redis_url: str, models_dir: Path, clock: Clock) -> App:
    # contact policies off: the Decide path's presenting script (decision/contact.py) is not single-slot
    # yet, and an outbound decision would use it
    return App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=models_dir, demo=False, metrics_port=0,
                      rules_watch_seconds=0, events_poll_seconds=0, contact_policies=False), clock=clock).start()


def test_the_events_path_on_shards_and_a_retry_after_a_failure_half_way(
        redis_url: str, redis_mode: str, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(at(0, "10:00"))
    app = _app(redis_url, models_dir, clock)
    try:
        client = app.store.client
        customers = _on_different_shards(client, 3, "EV")
        for c in customers:
            _profile(app, c)
            assert app.events.publish(f"{c}-cr", c, "contact_request", {"topic": "billing"}).raised == [
                "callback_requested"]
            (out,) = app.events.publish(f"{c}-du", c, "data_usage", {"used_ratio": "0.95"}).outbound
            assert out.status == "sent", out.reason
        for c in customers:
            events = [f for _, f in client.xrange(customer_shard_key(EVENTS_STREAM, c, client))
                      if f[b"customer_id"] == c.encode()]
            assert [f[b"event_id"].decode() for f in events] == [f"{c}-cr", f"{c}-du"]
            assert len([m for m in client.zrange(customer_shard_key(TIMERS_KEY, c, client), 0, -1)
                        if f'"c":"{c}"'.encode() in m]) == 1
            (sent,) = [f for _, f in client.xrange(customer_shard_key(OUTBOUND_STREAM, c, client))
                       if f[b"customer_id"] == c.encode()]
            assert sent[b"event_id"] == f"{c}-du".encode()
            assert not client.exists(effects_key(c))  # every effect done
        assert len(shards.entries(client, EVENTS_STREAM)) == 6 and shards.zcard(client, TIMERS_KEY) == 3
        assert len(shards.entries(client, OUTBOUND_STREAM)) == 3

        # a call dies after the customer's script, before its effects: the retry applies them
        c = customers[0]
        apply = app.events._apply
        monkeypatch.setattr(app.events, "_apply", lambda *a: (_ for _ in ()).throw(redis.ConnectionError("gone")))
        with pytest.raises(redis.ConnectionError):
            app.events.publish("co-1", c, "complaint_opened", {"severity": "high"})
        assert client.hexists(effects_key(c), "co-1") and not client.hexists(triggers_key(c), "complaint_opened")
        monkeypatch.setattr(app.events, "_apply", apply)
        retried = app.events.publish("co-1", c, "complaint_opened", {"severity": "high"})
        assert retried.duplicate and retried.raised == ["complaint_opened"]
        assert client.hexists(triggers_key(c), "complaint_opened") and not client.hexists(effects_key(c), "co-1")
        logged = [f for f in shards.entries(client, EVENTS_STREAM) if f[b"event_id"] == b"co-1"]
        assert len(logged) == 1  # one node: with the customer's script; a cluster: the last effect, once
        again = app.events.publish("co-1", c, "complaint_opened", {"severity": "high"})
        assert again.duplicate and not again.raised
        assert len(shards.entries(client, EVENTS_STREAM)) == 7
    finally:
        app.close()


def test_privacy_finds_and_erases_a_customer_in_every_shard(
        redis_url: str, redis_mode: str, models_dir: Path) -> None:
    clock = Clock(at(0, "10:00"))
    app: App = _app(redis_url, models_dir, clock)
    try:
        client = app.store.client
        anna, bert = _on_different_shards(client, 2, "PV")
        for c in (anna, bert):
            _profile(app, c)
            app.events.publish(f"{c}-cr", c, "contact_request", {"topic": "billing"})
            assert app.events.publish(f"{c}-du", c, "data_usage", {"used_ratio": "0.95"}).outbound[0].status == "sent"
        app.decision_log.close()  # flushed: the outbound decisions are in the decision stream
        exported = export_customer(client, anna, who=None)
        assert [e["event_id"] for e in exported["events"]] == [f"{anna}-cr", f"{anna}-du"]
        assert len(exported["outbound"]) == 1 and len(exported["decisions"]) == 1
        (timer,) = exported["scheduled"]
        assert timer["kind"] == "absence timer"
        bert_before = export_customer(client, bert, who=None)
        streams = {key: shards.entries(client, key) for key in (DECISIONS_STREAM, EVENTS_STREAM, OUTBOUND_STREAM)}
        mine = sum(1 for entries in streams.values() for f in entries if f[b"customer_id"] == anna.encode())

        erased = forget_customers(client, [anna], who="test")[anna]
        assert erased.stream_entries_deleted == mine == 4 and erased.failures == []
        if redis_mode == "cluster":  # found in the customer's shard only, by computation
            assert {k for k, n in erased.places.items() if n and ":stream:" in k} == {
                customer_shard_key(s, anna, client) for s in (DECISIONS_STREAM, EVENTS_STREAM, OUTBOUND_STREAM)}
        assert erased.members_removed == 1
        after = export_customer(client, anna, who=None)
        assert not after["attributes"] and not after["scheduled"] and not after["events"] and not after["decisions"]
        changing = ("exported_at", "privacy_requests")
        assert {k: v for k, v in export_customer(client, bert, who=None).items() if k not in changing} == {
            k: v for k, v in bert_before.items() if k not in changing}
    finally:
        app.close()
