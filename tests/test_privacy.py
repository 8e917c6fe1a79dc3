"""Privacy: a customer's data exported (plain fields) and erased everywhere after a full day of activity,
as jobs the caller polls; nothing left in DUMP of any key or in the AOF and RDB files of any node; other
customers' entries and consumer groups intact; the audit trail under a pseudonym; the ``nba customer``
commands; consent withdrawn by event across inbound and outbound decisions. Real gRPC server, real
Redis (one node and the cluster), a clock the test moves."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.decision import records
from engine.decision.contact import RESERVATIONS_KEY
from engine.events.processor import OUTBOUND_INDEXED_SINCE, OUTBOUND_STREAM, TIMERS_KEY
from engine.events.stream import GROUP, INGEST_STREAM, INVALID_STREAM, EventStreamConsumer
from engine.rules.contact import ControlGroup
from engine.serving.app import App
from engine.serving.privacy import forget_customers
from engine.serving.server import build_server
from engine.store.audit import AUDIT_STREAM
from engine.store.profiles import DECISIONS_STREAM, META_KEY, profile_key
from engine.store.pseudonym import pseudonym
from engine.store.slots import shard_keys
from engine.store.streams import length

from . import shards
from .clock import Clock, at
from .conftest import ADMIN_TOKEN, REPO, as_admin, local_auth
from .test_contact import budget_rules
from .test_quiet_hours import _app, _profile

pytestmark = pytest.mark.both_redis

CONTROL = ControlGroup(0.1)  # the demo rules' control group
SERVICE = pb.ACTION_TYPE_SERVICE


def _customers(prefix: str, n: int) -> list[str]:
    """Ids outside the control group (they get offers), none a substring of another."""
    return [c for c in (f"{prefix}-{i:03d}" for i in range(100)) if not CONTROL.contains(c)][:n]


@contextlib.contextmanager
def _served(redis_url: str, models_dir: Path, rules_dir: Path, clock: Clock,
            admin_url: str | None = None) -> Iterator[tuple[App, grpc.Channel, int]]:
    app = _app(redis_url, models_dir, rules_dir, clock)
    app.config.redis_admin_url = admin_url  # read by the privacy jobs on the first privacy call
    server, port, _ = build_server(app, "127.0.0.1:0", auth=local_auth())
    server.start()
    channel = as_admin(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        yield app, channel, port
    finally:
        channel.close()
        server.stop(0).wait()
        app.close()


def _decide(channel: grpc.Channel, customer: str, ch: int, **kw) -> pb.DecideResponse:
    return pb_grpc.DecisionServiceStub(channel).Decide(
        pb.DecideRequest(customer_id=customer, channel=ch, max_actions=kw.pop("max_actions", 3), **kw), timeout=10)


def _respond(channel: grpc.Channel, decision_id: str, action_id: str, outcome: int) -> None:
    pb_grpc.DecisionServiceStub(channel).RecordResponse(
        pb.RecordResponseRequest(decision_id=decision_id, action_id=action_id, outcome=outcome), timeout=10)


def _event(channel: grpc.Channel, event_id: str, customer: str, kind: str, /, **attrs: str) -> pb.PublishEventResponse:
    return pb_grpc.DecisionServiceStub(channel).PublishEvent(
        pb.PublishEventRequest(event_id=event_id, customer_id=customer, type=kind, attributes=attrs), timeout=10)


def _admin(channel: grpc.Channel) -> pb_grpc.AdminServiceStub:
    return pb_grpc.AdminServiceStub(channel)


def _job(channel: grpc.Channel, job_id: str, timeout: float = 120.0) -> pb.CustomerJob:
    """Poll the job until it ends (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        job = _admin(channel).GetCustomerJob(pb.GetCustomerJobRequest(job_id=job_id), timeout=10)
        if job.state in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        time.sleep(0.05)


def _export(channel: grpc.Channel, customer: str) -> dict:
    reply = _admin(channel).ExportCustomer(pb.ExportCustomerRequest(customer_id=customer), timeout=10)
    assert reply.job_id and not reply.json
    job = _job(channel, reply.job_id)
    assert (job.kind, job.state, list(job.failures)) == ("export", "succeeded", []), job
    return json.loads(job.json)


def _forget(channel: grpc.Channel, customer: str) -> pb.CustomerJob:
    reply = _admin(channel).ForgetCustomer(pb.ForgetCustomerRequest(customer_id=customer), timeout=10)
    assert reply.job_id and reply.keys_deleted == 0  # the counts come with the job
    return _job(channel, reply.job_id)


def _wait_logged(client: redis.Redis, decision_ids: set[str]) -> None:
    """The decision log writes off the request path: wait until every decision is in the stream."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen = {f[b"decision_id"].decode() for f in shards.entries(client, DECISIONS_STREAM)}
        if decision_ids <= seen:
            return
        time.sleep(0.02)
    raise AssertionError(f"decisions not logged: {sorted(decision_ids - seen)}")


def mentions(client: redis.Redis, needle: str) -> dict[str, list[str]]:
    """Every place in the whole keyspace holding ``needle``: key -> where (its name, a hash field or value,
    a zset/set/list member, a string value, a stream entry's field or value)."""
    n = needle.encode()
    hits: dict[str, list[str]] = {}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if n in key:
            hits.setdefault(name, []).append("key name")
        kind = client.type(key).decode()
        values: list[bytes]
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = [x for kv in client.hgetall(key).items() for x in kv]
        elif kind == "zset":
            values = list(client.zrange(key, 0, -1))
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "list":
            values = list(client.lrange(key, 0, -1))
        elif kind == "stream":
            values = [x for _, fields in client.xrange(key) for kv in fields.items() for x in kv]
        else:
            raise AssertionError(f"{name}: unexpected type {kind}")
        hits.setdefault(name, []).extend(v[:120].decode("utf-8", "replace") for v in values if n in v)
    return {k: v for k, v in hits.items() if v}


def _budget_used(client: redis.Redis) -> int:
    return sum(int(client.get(k) or 0) for k in client.scan_iter("nba:budget:*"))


def _comparable(export: dict) -> dict:
    """An export without what changes by itself: the time and the privacy requests (exports are audited)."""
    return {k: v for k, v in export.items() if k not in ("exported_at", "privacy_requests")}


def _stream_entries(client: redis.Redis, customer: str) -> int:
    """The customer's entries in every stream of the keyspace (scanned: the test checks the service's list)."""
    n = 0
    for key in client.scan_iter(_type="stream", count=1000):
        n += sum(1 for _, f in client.xrange(key) if customer.encode() in (f.get(b"customer_id"), f.get(b"customer")))
    return n


def _full_day(app: App, channel: grpc.Channel, clock: Clock, people: list[str]) -> set[str]:
    """A day of everything the service stores for each customer; returns the decision ids made."""
    client = app.store.client
    decided: set[str] = set()
    clock.now = at(0, "09:00")  # a Monday
    for c in people:
        web = _decide(channel, c, pb.CHANNEL_WEB, interaction_id=f"web-{c}", touchpoint="web.home.hero")
        assert any(a.type != SERVICE for a in web.actions)
        _respond(channel, web.decision_id, web.actions[0].action_id, pb.OUTCOME_IMPRESSION)  # the page saw one
        assert _decide(channel, c, pb.CHANNEL_WEB, interaction_id=f"web-{c}", touchpoint="web.home.hero").repeat
        app_ = _decide(channel, c, pb.CHANNEL_MOBILE_APP, interaction_id=f"app-{c}")  # never reported: reserved
        branch = _decide(channel, c, pb.CHANNEL_BRANCH)
        _decide(channel, c, pb.CHANNEL_WEB, preview=True)
        decided |= {web.decision_id, app_.decision_id, branch.decision_id}
    clock.now = at(0, "09:05")
    for c in people:
        cc = _decide(channel, c, pb.CHANNEL_CALL_CENTER)  # no interaction id, counted on decide
        assert len(cc.actions) >= 2
        _respond(channel, cc.decision_id, cc.actions[0].action_id, pb.OUTCOME_ACCEPTED)
        _respond(channel, cc.decision_id, cc.actions[-1].action_id, pb.OUTCOME_REJECTED)
        decided.add(cc.decision_id)
    clock.now = at(0, "09:15")
    for c in people:  # raises callback_requested and opens the callback_overdue absence timer
        assert _event(channel, f"{c}-cr", c, "contact_request", topic="billing").triggers_raised == ["callback_requested"]
    clock.now = at(0, "10:00")
    for c in people:  # an SMS offer sent at once
        (out,) = _event(channel, f"{c}-du", c, "data_usage", used_ratio="0.95").outbound
        assert out.status == "sent", out.reason
        decided.add(out.decision_id)
    clock.now = at(0, "11:00")
    for c in people:
        assert _event(channel, f"{c}-co", c, "complaint_opened", severity="high").triggers_raised == ["complaint_opened"]
    clock.now = at(0, "12:00")
    try:
        client.xgroup_create(INGEST_STREAM, GROUP, id="0", mkstream=True)
    except redis.exceptions.ResponseError:
        pass
    for c in people:  # the ingest stream: one valid event, one refused (copied to the invalid stream)
        client.xadd(INGEST_STREAM, {"event_id": f"{c}-cc", "customer_id": c, "type": "call_completed"})
        client.xadd(INGEST_STREAM, {"event_id": f"{c}-bad", "customer_id": c, "type": "no_such_event"})
    assert EventStreamConsumer(client, app.events, block_ms=10).read_once() == 2 * len(people)
    assert client.xlen(INVALID_STREAM) == len(people)
    for c in people:  # two failed payments in quiet hours: the payment plan e-mail is postponed to 08:00
        clock.now = at(0, "21:30")
        app.events.publish(f"{c}-pf1", c, "payment_failed", {"amount": "20"})
        clock.now = at(0, "22:00")
        (out,) = app.events.publish(f"{c}-pf2", c, "payment_failed", {"amount": "35"}).outbound
        assert out.status == "postponed", out.reason
    # every decision, the outbound ones decided by the events too (their records exist at once)
    _wait_logged(client, decided | {d for c in people for d in records.customer_record_ids(client, c)})
    return decided


def test_forget_erases_a_customer_everywhere_after_a_full_day_and_leaves_the_others(
        redis_url: str, redis_admin_url: str, models_dir: Path, tmp_path: Path) -> None:
    clock = Clock(at(0, "08:00"))
    anna, bert = _customers("PRIVACY-ANNA", 1) + _customers("PRIVACY-BERT", 1)
    with _served(redis_url, models_dir, budget_rules(tmp_path, 50), clock, redis_admin_url) as (app, channel, port):
        client = app.store.client
        _profile(app, anna)
        _profile(app, bert)
        decided = _full_day(app, channel, clock, [anna, bert])
        clock.now = at(0, "22:30")

        # --- export: everything about anna in plain fields, nothing about bert, no internal names or blobs
        exported = _export(channel, anna)
        text = json.dumps(exported)
        assert bert not in text and "nba:" not in text and "|" not in text
        assert exported["customer_id"] == anna and exported["exported_at"].endswith("T22:30:00.000Z")
        day = exported["exported_at"][:10]
        assert exported["attributes"]["tenure_months"] == 24 and exported["attributes"]["plan"] == "standard"
        assert exported["attributes"]["products"] == ["mobile"] and "consent" not in exported["attributes"]
        assert exported["consents"] == ["call_center", "email", "mobile_app", "sms", "web"]
        assert {t["name"] for t in exported["triggers"]} == {"complaint_opened", "payment_failed", "data_cap_near",
                                                             "retention_save"}
        history = exported["contact_history"]
        assert {h["kind"] for h in history} == {"shown", "accepted", "rejected"}
        assert all(h["date"] == day and h["channel"] and h["action"] and h["count"] >= 1 for h in history)
        decisions = {d["decision_id"]: d for d in exported["decisions"]}
        mine = decided & set(decisions)
        assert len(mine) == 5 and all(decisions[d]["channel"] and decisions[d]["decided_at"] for d in mine)
        assert sum(len(d["responses"]) for d in decisions.values()) == 3
        assert {r["outcome"] for d in decisions.values() for r in d["responses"]} == {"impression", "accepted",
                                                                                       "rejected"}
        events = exported["events"]
        assert {e["type"] for e in events} >= {"contact_request", "data_usage", "call_completed", "complaint_opened"}
        assert any(e["attributes"] == {"topic": "billing"} for e in events)
        assert [e["type"] for e in events if e["refused"]] == ["no_such_event"]
        assert len(exported["outbound"]) == 1 and exported["outbound"][0]["channel"] == "sms"
        assert sorted(t["kind"] for t in exported["scheduled"]) == ["absence timer", "postponed message"]
        reservations = exported["budget_reservations"]
        assert reservations and all(r["decision_id"] in mine and r["expires_at"] for r in reservations)
        assert {i["interaction_id"] for i in exported["interactions"]} == {f"web-{anna}", f"app-{anna}"}
        bert_before = _export(channel, bert)
        assert anna not in json.dumps(bert_before)

        # --- forget anna: a job the caller polls, with its counts
        places = mentions(client, anna)
        shared = {k for k in places if k.startswith(("nba:timers", "nba:reservations", "nba:{privacy}"))}
        # keys of anna's own, and her decision records: fields of the shared per-minute buckets
        own = [k for k in places if client.type(k) != b"stream" and k not in shared and not k.startswith("nba:decisions:")]
        own_records = sum(v.startswith(f"{anna}\t".encode()) for k in places if k.startswith("nba:decisions:")
                          for v in client.hvals(k))
        assert own_records >= 5
        entries = _stream_entries(client, anna)
        used = _budget_used(client)
        client.hset(META_KEY, OUTBOUND_INDEXED_SINCE, 0)  # long indexed: the outbound keys only through the index
        job = _forget(channel, anna)
        assert (job.kind, job.state, list(job.failures)) == ("forget", "succeeded", []), job
        assert job.customer_pseudonym == pseudonym(anna) and anna not in str(job)
        assert job.persistence.startswith("aof rewritten (where on) and rdb saved on")
        assert job.keys_deleted == len(own) + own_records and job.stream_entries_deleted == entries
        assert job.members_removed == len(exported["scheduled"]) + len(reservations)
        assert job.budget_units_returned == len(reservations)
        assert _budget_used(client) == used - len(reservations)  # the unreported impressions' units given back
        assert mentions(client, anna) == {}  # the whole keyspace, the audit trail and the jobs included

        # bert's data is intact
        assert _comparable(_export(channel, bert)) == _comparable(bert_before)
        assert shards.zcard(client, TIMERS_KEY) == 2 and shards.zcard(client, RESERVATIONS_KEY) > 0

        # twice: nothing left, nothing deleted, audited again (under the pseudonym)
        again = _forget(channel, anna)
        assert (again.state, again.keys_deleted, again.stream_entries_deleted, again.members_removed) == (
            "succeeded", 0, 0, 0)
        audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(AUDIT_STREAM)]
        assert not any(anna in v for a in audit for v in a.values())
        forgets = [a for a in audit if a["action"] == "forget_customer" and a["customer"] == pseudonym(anna)]
        assert [a["keys_deleted"] for a in forgets] == [str(job.keys_deleted), "0"]
        assert all(a["who"].startswith("local-admin via ") and float(a["ts"]) > 0 for a in forgets)
        assert [a["action"] for a in audit if a.get("customer") == pseudonym(anna)] == [
            "export_customer_requested", "export_customer", "forget_customer_requested", "forget_customer",
            "forget_customer_done", "forget_customer_requested", "forget_customer", "forget_customer_done"]
        after = _export(channel, anna)  # an export after the erasure finds nothing but the privacy requests
        assert not any(after[k] for k in ("attributes", "consents", "triggers", "contact_history", "decisions",
                                          "events", "outbound", "scheduled", "budget_reservations", "interactions"))
        assert [r["action"] for r in after["privacy_requests"]][-2:] == ["forget_customer_done",
                                                                         "export_customer_requested"]

        # bad ids are refused naming the field; an unknown job is NOT_FOUND
        for bad, message in (("", "customer_id: must not be empty"), ("a b", "customer_id: at most")):
            with pytest.raises(grpc.RpcError) as err:
                _admin(channel).ForgetCustomer(pb.ForgetCustomerRequest(customer_id=bad), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(message)
        with pytest.raises(grpc.RpcError) as err:
            _admin(channel).ExportCustomer(pb.ExportCustomerRequest(customer_id=""), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            _admin(channel).GetCustomerJob(pb.GetCustomerJobRequest(job_id="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details().startswith("job_id")

        # --- the commands, against the served port: they wait for the job and print its result
        out = tmp_path / "bert.json"
        env = {**{k: v for k, v in os.environ.items() if k != "NBA_TOKEN"}, "NBA_TOKEN": ADMIN_TOKEN}
        cli = [sys.executable, "-m", "engine.cli", "customer"]
        done = subprocess.run([*cli, "export", bert, "--address", f"127.0.0.1:{port}", "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert _comparable(json.loads(out.read_text())) == _comparable(bert_before)
        bert_keys = [k for k in mentions(client, bert) if client.type(k) != b"stream" and not k.startswith(
            ("nba:timers", "nba:reservations", "nba:{privacy}", "nba:decisions:"))]
        bert_keys += [v for k in mentions(client, bert) if k.startswith("nba:decisions:") for v in client.hvals(k)
                      if v.startswith(f"{bert}\t".encode())]  # his records: fields of shared buckets
        done = subprocess.run([*cli, "forget", bert, "--address", f"127.0.0.1:{port}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"forgot {bert}: {len(bert_keys)} keys"), done.stdout
        assert pseudonym(bert) in done.stdout and "rdb saved" in done.stdout
        assert mentions(client, bert) == {}
        assert shards.zcard(client, TIMERS_KEY) == 0 and shards.zcard(client, RESERVATIONS_KEY) == 0
        done = subprocess.run([*cli, "forget", "", "--address", f"127.0.0.1:{port}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "INVALID_ARGUMENT: customer_id" in done.stderr


def test_forget_erases_decision_records_the_streams_no_longer_name(redis_url: str, models_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Decision records live up to 7 days; the stream may be trimmed sooner: the records are found by the
    customer's index. A customer id with glob characters matches only itself. Without an admin user the
    job says the persistence step is the operator's, and fails."""
    clock = Clock(at(0, "09:00"))
    with _served(redis_url, models_dir, budget_rules(tmp_path, 50), clock) as (app, channel, _):
        client = app.store.client
        odd, other = "PRIVACY*[x]", "PRIVACY-x"
        for c in (odd, other):
            _profile(app, c)
            _wait_logged(client, {_decide(channel, c, pb.CHANNEL_CALL_CENTER).decision_id})
        client.delete(*shard_keys(DECISIONS_STREAM, client), f"nba:{{c:{odd}}}:contacts")  # trimmed stream, expired history
        erased = forget_customers(client, [odd], who="test")[odd]
        assert erased.places["decision_records"] == 1 and erased.failures == []
        assert mentions(client, odd) == {}
        assert client.exists(profile_key(other)) and client.exists(f"nba:{{c:{other}}}:contacts")
        job = _forget(channel, other)
        assert job.state == "failed" and job.keys_deleted > 0
        assert [f for f in job.failures if f.startswith("persistence rewrite pending: operator step")]
        assert job.persistence == "persistence rewrite pending: operator step"


def _stream_state(client: redis.Redis, customer: str) -> dict[str, object]:
    """Every stream's consumer groups (last-delivered id, consumers, the customer's pending entries) and the
    customer's entries: what erasing someone else must leave as it was."""
    out: dict[str, object] = {}
    for key in sorted(k.decode() for k in client.scan_iter(_type="stream", count=1000)):
        if key == AUDIT_STREAM:  # appended to by the erasure
            continue
        entries = [(i, f) for i, f in client.xrange(key) if f.get(b"customer_id", f.get(b"customer")) == customer.encode()]
        mine = {i for i, _ in entries}
        groups = {}
        for g in client.xinfo_groups(key):
            pending = client.xpending_range(key, g["name"], "-", "+", 10_000)
            groups[g["name"]] = (g["last-delivered-id"], sorted(c["name"] for c in client.xinfo_consumers(key, g["name"])),
                                 [(p["message_id"], p["consumer"], p["times_delivered"]) for p in pending
                                  if p["message_id"] in mine])
        out[key] = (entries, groups, client.xinfo_stream(key)["last-generated-id"])
    return out


def test_forget_leaves_no_trace_in_dump_or_the_files_of_any_node_and_keeps_the_others_groups(
        redis_mode: str, redis_url: str, request: pytest.FixtureRequest, models_dir: Path, tmp_path: Path) -> None:
    """After forget: DUMP of every key on every node (replicas included) and a byte scan of every AOF and
    RDB file find neither the customer's id nor a value only the customer had; the other customer's
    entries, the consumer groups (last-delivered ids, consumers, pending entries with their delivery
    counts) and the streams' top ids are as they were."""
    from engine.store.redis_embedded import EmbeddedRedis

    marker = "MARKER-7f3a9c"  # in an event id and an event attribute only anna has
    server: EmbeddedRedis | None = None
    if redis_mode == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        url, admin_url = cluster.url, cluster.admin_url
        dirs = [cluster.data_dir / str(port) for port in cluster.ports]
        nodes = [cluster.node(port) for port in cluster.ports]
        for node in nodes:
            node.execute_command("READONLY")  # DUMP on a replica
    else:  # the suite's node keeps no files: one that does
        server = EmbeddedRedis(tmp_path / "redis", persist=True).start()
        url, admin_url, dirs = server.url, server.admin_url, [tmp_path / "redis"]
        nodes = [redis.Redis.from_url(server.admin_url)]
    try:
        clock = Clock(at(0, "09:00"))
        anna, bert = "DISK-ANNA-01", "DISK-BERT-01"
        with _served(url, models_dir, budget_rules(tmp_path, 50), clock, admin_url) as (app, channel, _):
            client = app.store.client
            decided = set()
            for c in (anna, bert):
                _profile(app, c)
                cc = _decide(channel, c, pb.CHANNEL_CALL_CENTER)
                _respond(channel, cc.decision_id, cc.actions[0].action_id, pb.OUTCOME_ACCEPTED)
                web = _decide(channel, c, pb.CHANNEL_WEB, interaction_id=f"web-{c}", touchpoint="web.home.hero")
                decided |= {cc.decision_id, web.decision_id}
                _event(channel, f"{marker if c == anna else c}-cr", c, "contact_request", topic="billing")
            try:
                client.xgroup_create(INGEST_STREAM, GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError:
                pass
            for c in (anna, bert):  # read by a consumer that then dies: pending, delivered once
                client.xadd(INGEST_STREAM, {"event_id": f"{c}-in", "customer_id": c, "type": "call_completed",
                                            "attr.note": marker if c == anna else "plain"})
            assert len(client.xreadgroup(GROUP, "dead-reader", {INGEST_STREAM: ">"}, count=10)[0][1]) == 2
            _wait_logged(client, decided)
            app.exploration.stop()  # its group reads on by itself: the groups are compared before and after
            app.exploration.step()
            assert any(anna.encode() in (node.dump(k) or b"") for node in nodes for k in node.scan_iter(count=1000))
            bert_before = _stream_state(client, bert)
            assert any(groups for _, groups, _ in bert_before.values())  # the exploration and ingest groups

            job = _forget(channel, anna)
            assert (job.state, list(job.failures)) == ("succeeded", []), job
            assert job.stream_entries_deleted >= 5 and job.keys_deleted >= 5

            for node in nodes:
                for key in node.scan_iter(count=1000):
                    dumped = node.dump(key) or b""
                    assert anna.encode() not in dumped and marker.encode() not in dumped, key
            files = [f for d in dirs for f in d.rglob("*") if f.is_file() and f.suffix != ".log"]
            assert {f.name for f in files} >= {"appendonly.aof", "dump.rdb"}
            for f in files:
                data = f.read_bytes()
                assert anna.encode() not in data and marker.encode() not in data, f
            assert _stream_state(client, bert) == bert_before
            assert app.events.publish("after", bert, "call_completed", {}).stream_id  # the streams take writes
    finally:
        for node in nodes:
            node.close()
        if server is not None:
            server.stop()


def test_a_job_outlives_the_worker_that_took_it_and_reports_every_failure(redis_url: str, models_dir: Path,
                                                                          tmp_path: Path) -> None:
    """A worker takes a forget job and dies (its lease runs out): another worker's runner takes it over and
    says so. A persistence step the Redis user may not run (here: the service user as "admin") is a
    failure the caller sees, not a log line."""
    from engine.serving.privacy_jobs import PrivacyJobs, job_key

    clock = Clock(at(0, "09:00"))
    with _served(redis_url, models_dir, budget_rules(tmp_path, 50), clock) as (app, channel, _):
        client = app.store.client
        _profile(app, "JOB-ANNA")
        _wait_logged(client, {_decide(channel, "JOB-ANNA", pb.CHANNEL_CALL_CENTER).decision_id})
        dead = PrivacyJobs(client, None, lambda: None)  # never started: it takes a job by hand, then "dies"
        job_id = dead.submit("forget", "JOB-ANNA", who="test")
        assert dead._claim() == [(job_id, "queued")]
        assert client.hget(job_key(job_id), "state") == b"running"
        other = PrivacyJobs(client, client, lambda: None, persistence_timeout=5)  # never started: run by hand
        other._stop.set()
        assert other.run_once() == 0  # the lease still holds
        client.hset(job_key(job_id), "lease", 0)  # ... and runs out
        assert other.run_once() == 1
        job = _job(channel, job_id)
        assert job.state == "failed" and job.keys_deleted > 0 and not client.exists(profile_key("JOB-ANNA"))
        failures = list(job.failures)
        assert any("taken over from a worker that stopped" in f for f in failures)
        assert any(f.startswith("persistence on ") and "no permissions" in f for f in failures), failures
        assert mentions(client, "JOB-ANNA") == {}


def test_outbound_keys_written_before_the_index_are_scanned_for_until_none_can_be_left(redis_url: str) -> None:
    from engine.events.processor import OUTBOUND_KEEP_MS
    from engine.serving.privacy import LEGACY_OUTBOUND_KEEP_MS
    from engine.store.profiles import redis_client

    client = redis_client(redis_url)
    legacy = "nba:{c:OLD-OUTBOUND}:outbound:data_cap:e1"  # as a version before the index wrote it
    now_ms = int(time.time() * 1000)
    # keys written before the index lived 30 days, longer than an outbound's state lives now
    assert LEGACY_OUTBOUND_KEEP_MS > OUTBOUND_KEEP_MS
    for since, scanned in ((None, True), (now_ms, True), (now_ms - LEGACY_OUTBOUND_KEEP_MS - 2 * 86_400_000, False)):
        client.delete(META_KEY)
        if since is not None:
            client.hset(META_KEY, OUTBOUND_INDEXED_SINCE, since)
        client.set(legacy, "sent")
        forget_customers(client, ["OLD-OUTBOUND"], who="test")
        assert (client.exists(legacy) == 0) == scanned, since


def test_one_pass_per_stream_erases_a_batch_and_keeps_writes_made_during_it(redis_url: str) -> None:
    """One rewrite drops the entries of every customer of a batch; entries written between its chunks
    (the stream keeps taking writes) are kept, or dropped when they are the batch's; the top id stays."""
    from engine.store import erasure
    from engine.store.profiles import redis_client

    client = redis_client(redis_url)
    key = "nba:stream:test:{shard:1}"
    people = ["B-1", "B-2", "B-3", "KEEP"]
    for i in range(2 * erasure.CHUNK + 10):
        client.xadd(key, {"customer_id": people[i % 4], "n": str(i)})
    client.xgroup_create(key, "g", id="0")
    client.xreadgroup("g", "c1", {key: ">"}, count=8)  # 2 pending of each
    written: list[str] = []

    def meanwhile() -> None:  # between chunks: another writer
        written.append(client.xadd(key, {"customer_id": "KEEP" if len(written) % 2 else "B-2", "late": "1"}).decode())

    top_before = client.xinfo_stream(key)["last-generated-id"]
    done = erasure.rewrite_stream(client, key, ["B-1", "B-2", "B-3"], on_chunk=meanwhile)
    assert len(written) == 2
    assert done.by_customer == {"B-1": 503, "B-2": 503 + 1, "B-3": 502}
    assert done.kept == 502 + 1 and done.groups == 1 and (done.pending_restored, done.pending_dropped) == (2, 6)
    fields = [f for _, f in client.xrange(key)]
    assert {f[b"customer_id"] for f in fields} == {b"KEEP"} and len(fields) == 503
    assert client.xinfo_stream(key)["last-generated-id"] == written[-1].encode() > top_before
    assert [p["consumer"] for p in client.xpending_range(key, "g", "-", "+", 10)] == [b"c1", b"c1"]
    assert not client.exists(erasure.copy_key(key))
    client.delete(key)
    client.close()


def test_consent_withdrawn_by_event_stops_offers_on_that_channel_inbound_and_outbound(
        redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    import shutil

    from .conftest import RULES_DIR

    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    clock = Clock(at(0, "12:00"))
    carl, dora = _customers("PRIVACY-CARL", 1) + _customers("PRIVACY-DORA", 1)
    with _served(redis_url, models_dir, rules_dir, clock) as (app, channel, _):
        client = app.store.client
        for c in (carl, dora):
            _profile(app, c)

        # inbound: offers on the web until the customer withdraws web consent; call center unaffected
        before = _decide(channel, carl, pb.CHANNEL_WEB, interaction_id="w1")
        assert any(a.type != SERVICE for a in before.actions)
        clock.now = at(0, "12:01")
        _event(channel, "cw-web", carl, "consent_withdrawn", channel="web")
        assert client.hget(profile_key(carl), "consent") == b"call_center,email,mobile_app,sms"
        after = _decide(channel, carl, pb.CHANNEL_WEB, interaction_id="w1", explain=True)
        assert not after.repeat  # the stored offers are not repeated on a channel without consent: decided anew
        assert all(a.type == SERVICE for a in after.actions)  # here: nothing (no service action fits)
        assert any("marketing_needs_consent" in f.detail for f in after.funnel)
        again = _decide(channel, carl, pb.CHANNEL_WEB, interaction_id="w1")  # the new decision replaced the old
        assert again.repeat and again.decision_id == after.decision_id
        assert any(a.type != SERVICE for a in _decide(channel, carl, pb.CHANNEL_CALL_CENTER).actions)

        # outbound postponed by quiet hours, then consent withdrawn: suppressed when the window ends
        clock.now = at(0, "22:00")
        (out,) = app.events.publish("du-1", carl, "data_usage", {"used_ratio": "0.95"}).outbound
        assert (out.action_id, out.channel, out.status) == ("upsell_extra_data", "sms", "postponed")
        clock.now = at(0, "22:10")
        done = app.events.publish("cw-sms", carl, "consent_withdrawn", {"channel": "sms"})
        assert done.consent_withdrawn == ["sms"]
        assert app.events.publish("cw-sms", carl, "consent_withdrawn", {"channel": "sms"}).duplicate
        clock.now = at(1, "08:00:01")
        ((member, _),) = shards.zrange(client, TIMERS_KEY)
        (late,) = app.events.on_timer(member.decode()).outbound
        assert late.status == "suppressed" and "marketing_needs_consent" in late.reason
        assert length(client, OUTBOUND_STREAM) == 0

        # "all" withdraws every channel at once: an outbound right after it is suppressed, not sent
        clock.now = at(1, "12:00")
        gone = app.events.publish("cw-all", dora, "consent_withdrawn", {"channel": "all"}).consent_withdrawn
        assert set(gone) == {"call_center", "email", "mobile_app", "sms", "web"}
        assert client.hget(profile_key(dora), "consent") == b""
        (now,) = app.events.publish("du-2", dora, "data_usage", {"used_ratio": "0.95"}).outbound
        assert now.status == "suppressed" and "marketing_needs_consent" in now.reason
        assert all(a.type == SERVICE for a in _decide(channel, dora, pb.CHANNEL_CALL_CENTER).actions)
        assert length(client, OUTBOUND_STREAM) == 0

        # an unknown customer has nothing to withdraw (and gets no profile); a bad channel is refused
        assert app.events.publish("cw-x", "PRIVACY-NOBODY", "consent_withdrawn", {"channel": "sms"}).consent_withdrawn == []
        assert not client.exists(profile_key("PRIVACY-NOBODY"))
        with pytest.raises(grpc.RpcError) as err:
            _event(channel, "cw-fax", carl, "consent_withdrawn", channel="fax")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("attributes.channel")


def test_exported_attributes_read_as_given() -> None:
    from engine.serving.privacy import _attribute

    assert _attribute(float(np.float32(0.037)), False) == 0.037  # not 0.03700000047683716
    assert _attribute(20_000.0, True) == "2024-10-04" and _attribute(float("nan"), True) is None
    assert _attribute(float("nan"), False) is None and _attribute(24.0, False) == 24.0
