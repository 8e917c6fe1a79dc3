"""Privacy: a customer's data exported and erased everywhere after a full day of activity, the audit
record of each erasure, the ``nba customer`` commands, and consent withdrawn by event across inbound and
outbound decisions; real gRPC server, real Redis, a clock the test moves."""

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
import pytest
import redis

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.decision.contact import RESERVATIONS_KEY
from engine.events.processor import OUTBOUND_STREAM, TIMERS_KEY
from engine.events.stream import GROUP, INGEST_STREAM, INVALID_STREAM, EventStreamConsumer
from engine.rules.contact import ControlGroup
from engine.serving.app import App
from engine.serving.privacy import forget_customer
from engine.serving.server import build_server
from engine.store.audit import AUDIT_STREAM
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, RESPONSES_STREAM, is_cluster, profile_key
from engine.store.slots import shard_keys
from engine.store.streams import length

from . import shards
from .clock import Clock, at
from .conftest import REPO
from .test_contact import budget_rules
from .test_quiet_hours import _app, _profile

pytestmark = pytest.mark.both_redis

CONTROL = ControlGroup(0.1)  # the demo rules' control group
SERVICE = pb.ACTION_TYPE_SERVICE


def _customers(prefix: str, n: int) -> list[str]:
    """Ids outside the control group (they get offers), none a substring of another."""
    return [c for c in (f"{prefix}-{i:03d}" for i in range(100)) if not CONTROL.contains(c)][:n]


@contextlib.contextmanager
def _served(redis_url: str, models_dir: Path, rules_dir: Path, clock: Clock) -> Iterator[tuple[App, grpc.Channel, int]]:
    app = _app(redis_url, models_dir, rules_dir, clock)
    server, port, _ = build_server(app, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
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


def _export(channel: grpc.Channel, customer: str) -> dict:
    return json.loads(_admin(channel).ExportCustomer(pb.ExportCustomerRequest(customer_id=customer), timeout=30).json)


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
    """An export without what changes by itself: the time, key TTLs, the audit stream (exports are audited)."""
    out = {k: v for k, v in export.items() if k not in ("exported_at", "key_ttl_ms")}
    out["streams"] = {s: e for s, e in export["streams"].items() if s != AUDIT_STREAM}
    return out


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
    _wait_logged(client, decided | {k.decode().rsplit(":", 1)[1] for k in client.scan_iter("nba:decision:*")})
    return decided


def test_forget_erases_a_customer_everywhere_after_a_full_day_and_leaves_the_others(
        redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    clock = Clock(at(0, "08:00"))
    anna, bert = _customers("PRIVACY-ANNA", 1) + _customers("PRIVACY-BERT", 1)
    with _served(redis_url, models_dir, budget_rules(tmp_path, 50), clock) as (app, channel, port):
        client = app.store.client
        _profile(app, anna)
        _profile(app, bert)
        decided = _full_day(app, channel, clock, [anna, bert])
        clock.now = at(0, "22:30")

        # --- export: everything about anna, nothing about bert
        exported = _export(channel, anna)
        assert bert not in json.dumps(exported)
        keys = exported["keys"]
        tag = f"nba:{{c:{anna}}}"
        assert {f"{tag}:profile", f"{tag}:triggers", f"{tag}:contacts", f"{tag}:events", f"{tag}:event_ids",
                f"{tag}:ix:web-{anna}", f"{tag}:ix:app-{anna}"} <= set(keys)
        assert any(k.startswith(f"{tag}:outbound:") for k in keys)
        profile = keys[f"{tag}:profile"]
        assert profile["numeric"]["tenure_months"] == 24 and profile["categorical"]["plan"] == "standard"
        assert "sms" in profile["sets"]["consent"]
        assert set(keys[f"{tag}:triggers"]) == {"complaint_opened", "payment_failed", "data_cap_near", "retention_save"}
        assert {m["member"]["t"] for m in keys[f"{tag}:events"]} >= {"contact_request", "data_usage", "call_completed"}
        kinds = {field.split("|")[0] for field in keys[f"{tag}:contacts"]}
        assert kinds == {"i", "a", "r"}  # impressions, an acceptance, a rejection
        records = exported["decision_records"]
        mine = {d for d in decided if records.get(d, {}).get("customer") == anna}
        assert len(mine) == 5 and all(r["customer"] == anna for r in records.values())
        timers = exported["timers"]
        assert sorted(t["member"].get("k", "absence") for t in timers) == ["absence", "outbound"]
        reservations = exported["budget_reservations"]
        assert reservations and all(r["member"].split("|")[0] in mine for r in reservations)
        streams = exported["streams"]
        for stream in (DECISIONS_STREAM, RESPONSES_STREAM, EVENTS_STREAM, INGEST_STREAM, INVALID_STREAM,
                       OUTBOUND_STREAM):
            assert streams.get(stream), stream
            assert all(e["fields"]["customer_id"] == anna for e in streams[stream])
        assert len(streams[RESPONSES_STREAM]) == 3 and len(streams[OUTBOUND_STREAM]) == 1
        # the 5 decisions above, and the outbound decided in quiet hours (postponed, nothing presented)
        assert {e["fields"]["decision_id"] for e in streams[DECISIONS_STREAM]} == set(records) == mine | {
            e["fields"]["decision_id"] for e in streams[DECISIONS_STREAM] if e["fields"]["actions"] == ""}
        bert_before = _export(channel, bert)
        assert anna not in json.dumps(bert_before)

        # --- forget anna through the admin RPC
        assert mentions(client, anna)  # everywhere, before
        used = _budget_used(client)
        reply = _admin(channel).ForgetCustomer(pb.ForgetCustomerRequest(customer_id=anna), timeout=30)
        assert reply.keys_deleted == len(keys) + len(records)
        assert reply.stream_entries_deleted == sum(len(e) for s, e in streams.items() if s != AUDIT_STREAM)
        assert reply.members_removed == len(timers) + len(reservations)
        assert _budget_used(client) == used - len(reservations)  # the unreported impressions' units given back
        assert set(mentions(client, anna)) == {AUDIT_STREAM}  # the whole keyspace: only the legal record

        # bert's data is intact
        assert _comparable(_export(channel, bert)) == _comparable(bert_before)
        assert shards.zcard(client, TIMERS_KEY) == 2 and shards.zcard(client, RESERVATIONS_KEY) > 0

        # twice: nothing left, nothing deleted, audited again
        again = _admin(channel).ForgetCustomer(pb.ForgetCustomerRequest(customer_id=anna), timeout=30)
        assert (again.keys_deleted, again.stream_entries_deleted, again.members_removed) == (0, 0, 0)
        audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(AUDIT_STREAM)]
        forgets = [a for a in audit if a["action"] == "forget_customer" and a["customer_id"] == anna]
        assert [a["keys_deleted"] for a in forgets] == [str(reply.keys_deleted), "0"]
        assert all(a["who"].startswith("anonymous via ") and float(a["ts"]) > 0 and a["stream_entries_deleted"]
                   for a in forgets)
        assert [a["action"] for a in audit if a["customer_id"] == anna] == [
            "export_customer", "forget_customer", "forget_customer"]
        assert _export(channel, anna)["keys"] == {}  # an export after the erasure finds nothing but the audit

        # bad ids are refused naming the field
        for bad, message in (("", "customer_id: must not be empty"), ("a b", "customer_id: at most")):
            with pytest.raises(grpc.RpcError) as err:
                _admin(channel).ForgetCustomer(pb.ForgetCustomerRequest(customer_id=bad), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(message)
        with pytest.raises(grpc.RpcError) as err:
            _admin(channel).ExportCustomer(pb.ExportCustomerRequest(customer_id=""), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # --- the commands, against the served port
        out = tmp_path / "bert.json"
        env = {k: v for k, v in os.environ.items() if k != "NBA_TOKEN"}
        cli = [sys.executable, "-m", "engine.cli", "customer"]
        done = subprocess.run([*cli, "export", bert, "--address", f"127.0.0.1:{port}", "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert _comparable(json.loads(out.read_text())) == _comparable(bert_before)
        done = subprocess.run([*cli, "forget", bert, "--address", f"127.0.0.1:{port}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"forgot {bert}: {len(bert_before['keys']) + len(bert_before['decision_records'])} keys")
        assert set(mentions(client, bert)) == {AUDIT_STREAM}
        assert shards.zcard(client, TIMERS_KEY) == 0 and shards.zcard(client, RESERVATIONS_KEY) == 0
        done = subprocess.run([*cli, "forget", "", "--address", f"127.0.0.1:{port}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "INVALID_ARGUMENT: customer_id" in done.stderr


def test_forget_erases_decision_records_the_streams_no_longer_name(redis_url: str, models_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Decision records live up to 7 days; the stream may be trimmed sooner: the records are found by
    their customer field too. And a customer id with glob characters matches only itself."""
    clock = Clock(at(0, "09:00"))
    with _served(redis_url, models_dir, budget_rules(tmp_path, 50), clock) as (app, channel, _):
        client = app.store.client
        odd, other = "PRIVACY*[x]", "PRIVACY-x"
        for c in (odd, other):
            _profile(app, c)
            _wait_logged(client, {_decide(channel, c, pb.CHANNEL_CALL_CENTER).decision_id})
        client.delete(*shard_keys(DECISIONS_STREAM, client), f"nba:{{c:{odd}}}:contacts")  # trimmed stream, expired history
        erased = forget_customer(client, odd, who="test", rewrite_aof=True)
        # the test's single node keeps no append-only file; the cluster's nodes do
        assert erased.places["decision_records"] == 1 and erased.aof_rewrite == ("started" if is_cluster(client) else "off")
        assert not mentions(client, odd).keys() - {AUDIT_STREAM}
        assert client.exists(profile_key(other)) and client.exists(f"nba:{{c:{other}}}:contacts")


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
