"""Decision records in the compact layout (engine/decision/records.py), and records written in the earlier
layout read and moved by the first response to them."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.decision import records
from engine.decision.codes import Codes, UnknownCode
from engine.decision.funnel import DecisionEngine
from engine.decision.records import decision_key
from engine.decision.request import DecideInput
from engine.decision.responses import OutcomeConflict
from engine.sim.telco import SCHEMA
from engine.store.profiles import RESPONSES_STREAM, redis_client
from engine.store.streams import xrange_all

from .clock import Clock
from .test_contact import make_engine, not_control
from .test_scenarios import NOON, customer


@pytest.fixture()
def engine(redis_url: str, models_dir: Path):
    e = make_engine(redis_url, models_dir, clock=Clock(NOON))
    yield e
    e.rules.current.close()


def _web(engine: DecisionEngine, prefix: str):
    cid = not_control(prefix)
    engine.store.save([customer(cid)], SCHEMA)
    d = engine.decide(DecideInput(customer_id=cid, channel="web", max_actions=3))
    assert len(d.actions) >= 2, d.actions
    return cid, d


@pytest.mark.both_redis
def test_the_service_redis_keeps_records_of_several_responses_compact(engine: DecisionEngine,
                                                                       redis_admin_url: str) -> None:
    """The embedded Redis and every node of the local cluster take ``redis_tuning``'s limit: a record with
    an impression and a final outcome for each of its actions (over Redis's default 64 bytes) leaves its
    bucket compact."""
    from engine.store.redis_tuning import COMPACT_VALUE_BYTES

    cid, d = _web(engine, "T")
    for a in d.actions:
        engine.responses.record(d.decision_id, a.action_id, "impression")
        engine.responses.record(d.decision_id, a.action_id, "rejected")
    key, field = records.location(d.decision_id)
    admin = redis_client(redis_admin_url)
    value = admin.hget(key, field)
    assert value is not None and 64 < len(value) <= COMPACT_VALUE_BYTES, value
    assert admin.object("encoding", key) in (b"listpack", b"ziplist")


@pytest.mark.both_redis
def test_a_record_is_one_short_field_of_a_listpack_bucket(engine: DecisionEngine, redis_admin_url: str) -> None:
    cid, d = _web(engine, "K")
    for a in d.actions:  # every action's impression reported: three marks on the record
        engine.responses.record(d.decision_id, a.action_id, "impression")
    key, field = records.location(d.decision_id)
    admin = redis_client(redis_admin_url)
    value = admin.hget(key, field)
    assert value is not None and len(value) <= 64, value  # listpack-encoded within the default 64 B values
    assert admin.object("encoding", key) in (b"listpack", b"ziplist")  # ziplist: Redis 6
    assert admin.exists(decision_key(d.decision_id)) == 0  # no key per record
    rec = records.read(engine.store.client, Codes(engine.store.client), [d.decision_id])[d.decision_id][1]
    assert rec["customer"] == cid and rec["actions"].split(",") == [a.action_id for a in d.actions]
    assert rec["ts"] == f"{d.decided_at:.3f}" and rec["counted"] == "0" and rec["channel"] == "web"
    marks = {k: v for k, v in rec.items() if k.startswith("r:")}
    stream = {e[b"action_id"].decode(): i.decode() if isinstance(i, bytes) else i
              for i, e in xrange_all(engine.store.client, RESPONSES_STREAM)}
    assert marks == {f"r:{a}:impression": stream[a] for a in stream}  # the stream ids, as RecordResponse returns


@pytest.mark.both_redis
def test_a_record_in_the_earlier_layout_is_answered_and_moved(engine: DecisionEngine) -> None:
    client = engine.store.client
    cid, d = _web(engine, "M")
    key, field = records.location(d.decision_id)
    where, old = records.read(client, Codes(client), [d.decision_id])[d.decision_id]
    assert where == "new"
    first = engine.responses.record(d.decision_id, d.actions[0].action_id, "impression")
    old = records.read(client, Codes(client), [d.decision_id])[d.decision_id][1]
    # the same record as the earlier layout stored it: one hash of named fields, a key of its own
    client.hdel(key, field)
    client.hset(decision_key(d.decision_id), mapping=old)
    client.pexpire(decision_key(d.decision_id), 7 * 86_400_000)
    again = engine.responses.record(d.decision_id, d.actions[0].action_id, "impression")
    assert not again.first and again.response_id == first.response_id  # its recorded response kept
    assert client.exists(decision_key(d.decision_id)) == 0 and client.hget(key, field) is not None  # moved
    accepted = engine.responses.record(d.decision_id, d.actions[1].action_id, "accepted")
    assert accepted.first
    with pytest.raises(OutcomeConflict):
        engine.responses.record(d.decision_id, d.actions[1].action_id, "rejected")
    entries = [e for _, e in xrange_all(client, RESPONSES_STREAM)]
    last = {k.decode(): v.decode() for k, v in entries[-1].items()}
    assert last["customer_id"] == cid and last["decided_at"] == old["ts"] and last["action_id"] == d.actions[1].action_id
    assert last["group"] == old["groups"].split(",")[1] and last["value"] == old["values"].split(",")[1]
    assert records.read(client, Codes(client), [d.decision_id])[d.decision_id][1] == {
        **old, f"r:{d.actions[1].action_id}:accepted": accepted.response_id}


def test_codes_are_stable_across_processes(redis_url: str) -> None:
    a, b = Codes(redis_client(redis_url)), Codes(redis_client(redis_url))
    x = a.code("first")
    assert b.code("second") != x and b.code("first") == x and a.text(b.code("second")) == "second"
    with pytest.raises(UnknownCode):
        a.text("999999")


@pytest.mark.both_redis
def test_a_response_is_marked_on_a_master_that_lost_its_scripts(engine: DecisionEngine, redis_admin_url: str) -> None:
    """On a cluster the mark is set by digest (EVALSHA): a master without the script (restarted, promoted)
    gets it loaded and the response still lands on the record."""
    cid, d = _web(engine, "N")
    redis_client(redis_admin_url).script_flush()
    got = engine.responses.record(d.decision_id, d.actions[0].action_id, "clicked")
    rec = records.read(engine.store.client, Codes(engine.store.client), [d.decision_id])[d.decision_id][1]
    assert got.first and rec[f"r:{d.actions[0].action_id}:clicked"] == got.response_id


@pytest.mark.both_redis
def test_the_customer_s_record_minutes_find_its_records_and_drop_only_gone_buckets(engine: DecisionEngine) -> None:
    """Erasure finds a customer's records through 4 bytes a minute (``store.erasure.customer_minutes_key``),
    also when its decision-stream entries are gone; the script that appends drops old minutes whose
    bucket expired and keeps one whose bucket still holds records."""
    from engine.serving.privacy import forget_customers
    from engine.store.erasure import customer_minutes_key
    from engine.store.profiles import DECISIONS_STREAM
    from engine.store.slots import customer_shard_key

    client = engine.store.client
    cid, d = _web(engine, "P")
    key, _ = records.location(d.decision_id)
    minute = int(key.rsplit(":", 1)[1])
    assert client.get(customer_minutes_key(cid)) == minute.to_bytes(4, "big")
    assert records.customer_record_ids(client, cid) == {d.decision_id}
    # two minutes before the record window: one bucket gone, one (copied) still there
    prefix = key.rsplit(":", 1)[0] + ":"
    gone, kept = minute - 50 * 24 * 60, minute - 40 * 24 * 60
    client.hset(f"{prefix}{kept}", "x", "someone else")
    client.set(customer_minutes_key(cid), b"".join(m.to_bytes(4, "big") for m in (gone, kept, minute)), keepttl=True)
    engine.clock.now += 120  # the next decision in another minute
    d2 = engine.decide(DecideInput(customer_id=cid, channel="web", max_actions=3))
    minute2 = int(records.location(d2.decision_id)[0].rsplit(":", 1)[1])
    stored = client.get(customer_minutes_key(cid))
    assert [int.from_bytes(stored[i:i + 4], "big") for i in range(0, len(stored), 4)] == [kept, minute, minute2]
    assert records.customer_record_ids(client, cid) == {d.decision_id, d2.decision_id}
    client.delete(customer_shard_key(DECISIONS_STREAM, cid, client))  # the stream entries lost
    erased = forget_customers(client, [cid])[cid]
    assert not erased.failures, erased.failures
    assert not client.hexists(*records.location(d.decision_id)) and not client.hexists(*records.location(d2.decision_id))
    assert client.exists(customer_minutes_key(cid)) == 0 and client.hget(f"{prefix}{kept}", "x") == b"someone else"
