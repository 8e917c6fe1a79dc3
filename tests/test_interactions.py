"""Interactions: retry-safe decisions, impressions counted when the customer sees them, previews,
responses checked against their decision, the control group on every path; real gRPC server, real Redis."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from engine import metrics
from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.config import Config
from engine.decision.contact import RESERVATIONS_KEY, new_decision_id
from engine.decision.history import counted, read_history
from engine.decision.request import DecideInput
from engine.decision.reservations import ReservationReleaser
from engine.decision.responses import DECISIONS_SINCE
from engine.events.processor import OUTBOUND_STREAM
from engine.rules.contact import ControlGroup
from engine.serving.app import App
from engine.serving.client import CLIENT_OPTIONS
from engine.serving.server import build_server
from engine.sim.telco import SCHEMA
from engine.store.profiles import DECISIONS_STREAM, META_KEY, RESPONSES_STREAM
from engine.store.slots import shard_keys

from . import shards
from .clock import Clock, at
from .conftest import RULES_DIR, AroundDecide
from .test_contact import budget_rules, make_engine
from .test_quiet_hours import _app, _profile
from .test_scenarios import NOON

pytestmark = pytest.mark.both_redis

CONTROL = ControlGroup(0.1)  # the demo rules' control group


def customers(control: bool, n: int = 1, start: int = 0) -> list[str]:
    """Seeded demo customers in (or out of) the control group."""
    return [c for c in (f"C{i:07d}" for i in range(start, 1000)) if CONTROL.contains(c) == control][:n]


class FailFirstDecide(AroundDecide):
    """Runs Decide, then loses the answer of each interaction's first attempt (UNAVAILABLE): the server
    decided, the caller never heard, as with a timeout on the way back."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    def around(self, decide, request, context):
        reply = decide(request, context)
        key = f"{request.customer_id}/{request.interaction_id}"
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost on the way back")
        return reply


@contextlib.contextmanager
def served(redis_url: str, models_dir: Path, rules_dir: Path,
           interceptors: tuple = ()) -> Iterator[tuple[App, grpc.Channel]]:
    app = App(Config(redis_url=redis_url, rules_dir=rules_dir, models_dir=models_dir, demo_customers=1_000,
                     metrics_port=0, rules_watch_seconds=0)).start()
    server, port, _ = build_server(app, "127.0.0.1:0", interceptors=interceptors)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)
    try:
        yield app, channel
    finally:
        channel.close()
        server.stop(0).wait()
        app.close()


@pytest.fixture()
def budgeted(redis_url: str, models_dir: Path, tmp_path: Path):
    """A served copy of the demo rules with a daily budget of 50 on every offer."""
    with served(redis_url, models_dir, budget_rules(tmp_path, 50, quiet_hours=False)) as s:
        yield s


def decide(channel: grpc.Channel, customer: str, ch: int = pb.CHANNEL_WEB, **kw) -> pb.DecideResponse:
    return pb_grpc.DecisionServiceStub(channel).Decide(
        pb.DecideRequest(customer_id=customer, channel=ch, max_actions=kw.pop("max_actions", 3), **kw), timeout=10)


def respond(channel: grpc.Channel, decision_id: str, action_id: str, outcome: int = pb.OUTCOME_IMPRESSION,
            at: float | None = None) -> pb.RecordResponseResponse:
    ts = None
    if at is not None:
        ts = Timestamp()
        ts.FromNanoseconds(int(at * 1e9))
    return pb_grpc.DecisionServiceStub(channel).RecordResponse(
        pb.RecordResponseRequest(decision_id=decision_id, action_id=action_id, outcome=outcome, timestamp=ts), timeout=10)


def impressions(client: redis.Redis, customer: str) -> list[list[str]]:
    """One [kind, action, group, type, channel] per impression counted in the customer's history."""
    return [[c.kind, c.action, c.group, c.type, c.channel] for c in read_history(client, customer) if c.kind == "i"
            for _ in range(c.count)]


def offer_ids(actions) -> list[str]:
    """The presented actions whose impressions the history keeps: those a contact limit counts (in the
    demo's contact.yaml, no_repeats counts every marketing type on every channel; service actions are
    counted by no impression limit)."""
    return sorted(a.action_id for a in actions if a.type != pb.ACTION_TYPE_SERVICE)


def with_offer(channel: grpc.Channel, start: int, ch: int = pb.CHANNEL_WEB) -> str:
    """A customer outside the control group whose decision on ``ch`` has an offer (found by previews)."""
    return next(c for c in customers(control=False, n=40, start=start)
                if any(a.type != pb.ACTION_TYPE_SERVICE for a in decide(channel, c, ch, preview=True).actions))


def budget_used(client: redis.Redis) -> int:
    return sum(int(client.get(k) or 0) for k in client.scan_iter("nba:budget:*"))


def ids(reply: pb.DecideResponse) -> list[str]:
    return [a.action_id for a in reply.actions]


def test_web_refreshes_do_not_use_up_an_offer_until_impressions_are_reported(budgeted) -> None:
    app, channel = budgeted
    client = app.store.client
    cid = with_offer(channel, 40)
    replies = [decide(channel, cid) for _ in range(20)]
    assert len({r.decision_id for r in replies}) == 20  # no interaction id: each call is a new decision
    assert all(ids(r) == ids(replies[0]) for r in replies)  # ... with the same answer
    assert impressions(client, cid) == []
    top = next(a for a in replies[0].actions if a.type != pb.ACTION_TYPE_SERVICE)
    for r in replies[:3]:  # the page reports that the customer saw it, three times
        respond(channel, r.decision_id, top.action_id)
    respond(channel, replies[0].decision_id, top.action_id)  # a repeated report counts once
    assert sum(i[1] == top.action_id for i in impressions(client, cid)) == 3
    after = decide(channel, cid, explain=True)
    assert top.action_id not in ids(after)
    (why,) = [f for f in after.funnel if f.action_id == top.action_id]
    assert why.stage == "contact" and "no_repeats" in why.detail


def test_one_interaction_on_web_then_the_call_center_is_one_voice_and_one_impression(budgeted) -> None:
    app, channel = budgeted
    client = app.store.client
    cid = with_offer(channel, 80)
    web = decide(channel, cid, interaction_id="call-77", touchpoint="hero")
    assert not web.repeat and web.actions
    assert impressions(client, cid) == []  # web counts the impression when it is reported
    reserved = budget_used(client)
    assert reserved == sum(a.type != pb.ACTION_TYPE_SERVICE for a in web.actions)  # ... but holds the budget
    again = decide(channel, cid, pb.CHANNEL_CALL_CENTER, interaction_id="call-77", touchpoint="hero")
    assert again.repeat and again.decision_id == web.decision_id and ids(again) == ids(web)
    assert (again.ruleset_version, again.model_version) == (web.ruleset_version, web.model_version)
    assert all(a.treatment.channel == pb.CHANNEL_CALL_CENTER for a in again.actions)
    seen = impressions(client, cid)  # the agent showed it: counted now, once per action
    assert sorted(i[1] for i in seen) == offer_ids(web.actions) != []
    for a in web.actions:  # and the web page's late report does not count it again
        respond(channel, web.decision_id, a.action_id)
    decide(channel, cid, pb.CHANNEL_CALL_CENTER, interaction_id="call-77", touchpoint="hero")
    assert len(impressions(client, cid)) == len(seen) and budget_used(client) == reserved
    # another placement in the same interaction is a new decision that keeps the top action's family
    other = decide(channel, cid, interaction_id="call-77", touchpoint="sidebar", max_actions=5, explain=True)
    assert not other.repeat and other.decision_id != web.decision_id
    top = web.actions[0]
    rivals = [a for a in other.actions if a.group == top.group]
    assert all(a.action_id == top.action_id for a in rivals)
    for f in other.funnel:
        if f.stage == "one_voice":
            assert top.action_id in f.detail and app.rules.current.ruleset.action(f.action_id).group == top.group


def test_a_retried_call_whose_answer_was_lost_counts_one_impression_and_one_budget_unit(
        redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    lossy = FailFirstDecide()
    with served(redis_url, models_dir, budget_rules(tmp_path, 50, quiet_hours=False), (lossy,)) as (app, channel):
        client = app.store.client
        first, second = customers(control=False, n=2, start=120)
        reply = decide(channel, first, pb.CHANNEL_CALL_CENTER, interaction_id="ivr-1")  # the client retries
        assert lossy.attempts[f"{first}/ivr-1"] == 2 and reply.repeat
        offers = sum(a.type != pb.ACTION_TYPE_SERVICE for a in reply.actions)
        assert len(impressions(client, first)) == offers == budget_used(client)
        # the same lost answer without an interaction id: the retry is a second decision, counted twice
        reply = decide(channel, second, pb.CHANNEL_CALL_CENTER)
        assert lossy.attempts[f"{second}/"] == 2 and not reply.repeat
        assert len(impressions(client, second)) == 2 * len(offer_ids(reply.actions))


def test_concurrent_calls_of_one_interaction_make_one_decision(budgeted) -> None:
    app, channel = budgeted
    (cid,) = customers(control=False, start=160)
    replies: list[pb.DecideResponse] = []
    start = threading.Barrier(8)

    def call() -> None:
        start.wait()
        replies.append(decide(channel, cid, pb.CHANNEL_CALL_CENTER, interaction_id="race"))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.decision_id for r in replies}) == 1 and sum(not r.repeat for r in replies) == 1
    assert len(impressions(app.store.client, cid)) == len(offer_ids(replies[0].actions))


def _contents(client: redis.Redis) -> dict:
    """Every key's value (streams: their entries; TTLs left out, they tick)."""
    read = {b"string": client.get, b"hash": client.hgetall, b"set": client.smembers, b"list": lambda k: client.lrange(k, 0, -1),
            b"zset": lambda k: client.zrange(k, 0, -1, withscores=True), b"stream": client.xrange}
    return {k: read[client.type(k)](k) for k in client.scan_iter()}


def test_a_preview_changes_nothing_in_redis(budgeted) -> None:
    app, channel = budgeted
    client = app.store.client
    assert all(client.exists(k) for k in shard_keys(RESPONSES_STREAM, client))  # made by a group at start, not later
    cid, other = with_offer(channel, 200), with_offer(channel, 240, pb.CHANNEL_CALL_CENTER)
    decide(channel, other, pb.CHANNEL_CALL_CENTER, interaction_id="earlier")  # some state to keep as it is
    app.decision_log.close(), app.__setattr__("decision_log", None)  # flushed: nothing pending that could land later
    before = _contents(client)
    previews = [decide(channel, cid, ch, preview=True, explain=True, interaction_id=iid)
                for ch in (pb.CHANNEL_CALL_CENTER, pb.CHANNEL_WEB) for iid in ("", "p-1")]
    previews.append(decide(channel, other, pb.CHANNEL_CALL_CENTER, interaction_id="earlier", preview=True))
    assert all(p.preview and p.actions for p in previews)
    assert previews[-1].repeat  # a preview of a decided placement shows that decision
    assert _contents(client) == before
    real = decide(channel, cid, pb.CHANNEL_CALL_CENTER)  # the preview showed what a decision would do
    assert not real.preview and ids(real) == ids(previews[0])
    with pytest.raises(grpc.RpcError) as err:
        respond(channel, previews[0].decision_id, previews[0].actions[0].action_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_record_response_checks_the_timestamp_and_the_response_window(service) -> None:
    app, channel = service
    cid = with_offer(channel, 240, pb.CHANNEL_CALL_CENTER)  # an offer's impression is kept (a limit counts it)
    reply = decide(channel, cid, pb.CHANNEL_CALL_CENTER)
    action = reply.actions[0].action_id
    for when, words in ((time.time() + 3600, "ahead of the server clock"), (time.time() - 3600, "before the decision")):
        with pytest.raises(grpc.RpcError) as err:
            respond(channel, reply.decision_id, action, pb.OUTCOME_REJECTED, at=when)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("timestamp:") and words in err.value.details()
    assert impressions(app.store.client, cid) and not counted(read_history(app.store.client, cid), "r")  # nothing recorded
    respond(channel, reply.decision_id, action, pb.OUTCOME_REJECTED, at=time.time() + 10)  # within the skew
    app.store.client.hset(META_KEY, DECISIONS_SINCE, int((time.time() - 30 * 86_400) * 1000))  # a month of service
    with pytest.raises(grpc.RpcError) as err:
        respond(channel, new_decision_id(time.time() - 8 * 86_400, "C0000001"), action)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        respond(channel, new_decision_id(time.time(), "C0000001"), action)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no decision" in err.value.details()


def test_what_a_customer_accepted_or_rejected_is_not_offered_again_on_any_channel(service) -> None:
    _, channel = service
    for outcome, policy in ((pb.OUTCOME_ACCEPTED, "no_offer_after_acceptance"),
                            (pb.OUTCOME_REJECTED, "cool_down_after_rejection")):
        cid = with_offer(channel, 280 if outcome == pb.OUTCOME_ACCEPTED else 320)
        web = decide(channel, cid)
        offer = next(a for a in web.actions if a.type != pb.ACTION_TYPE_SERVICE)
        offered_on = [ch for ch in (pb.CHANNEL_CALL_CENTER, pb.CHANNEL_MOBILE_APP, pb.CHANNEL_WEB, pb.CHANNEL_BRANCH)
                      if offer.action_id in ids(decide(channel, cid, ch, preview=True))]
        assert len(offered_on) >= 2
        respond(channel, web.decision_id, offer.action_id, outcome)
        for ch in offered_on:
            after = decide(channel, cid, ch, explain=True)
            assert offer.action_id not in ids(after)
            (why,) = [f for f in after.funnel if f.action_id == offer.action_id]
            assert why.stage == "contact" and policy in why.detail, (ch, why)


def test_decide_response_says_control_group(service) -> None:
    _, channel = service
    control, treated = customers(control=True)[0], customers(control=False)[0]
    assert decide(channel, control).control_group and not decide(channel, treated).control_group


def test_an_unreported_web_impression_gives_its_budget_unit_back(redis_url: str, models_dir: Path,
                                                                  tmp_path: Path) -> None:
    clock = Clock(NOON)
    engine = make_engine(redis_url, models_dir, budget_rules(tmp_path, 1), clock)
    releaser = ReservationReleaser(engine.store.client, clock=clock)
    client = engine.store.client
    try:
        from .test_scenarios import customer

        a, b = "RES-A", "RES-B"
        engine.store.save([customer(a), customer(b)], SCHEMA)
        first = engine.decide(DecideInput(customer_id=a, channel="web"))
        offers = [x.action_id for x in first.actions if x.type != "service"]
        assert offers and budget_used(client) == len(offers)
        second = engine.decide(DecideInput(customer_id=b, channel="web", explain=True))
        assert not set(offers) & set(ids(second))  # the reserved units are the whole budget
        assert {f.stage for f in second.funnel if f.action_id in offers} == {"budget"}
        released = budget_used(client) - len(offers)
        assert releaser.poll_once() == 0  # not yet: the page may still report it
        engine.responses.record(first.decision_id, offers[0], "impression")  # one was seen: its unit is spent
        clock.now += 15 * 60 + 1
        assert releaser.poll_once() == len(offers) - 1 + released
        assert budget_used(client) == 1 and shards.zcard(client, RESERVATIONS_KEY) == 0
        late = metrics.RESERVATIONS.labels("late")._value.get()
        if len(offers) > 1:  # seen after its unit went back: counted as an impression, not charged again
            engine.responses.record(first.decision_id, offers[1], "impression")
            assert metrics.RESERVATIONS.labels("late")._value.get() == late + 1 and budget_used(client) == 1
            assert offers[1] in [i[1] for i in impressions(client, a)]
        third = engine.decide(DecideInput(customer_id=b, channel="web"))
        assert set(offers[1:]) & set(ids(third)) or len(offers) == 1
    finally:
        engine.rules.current.close()


def test_event_triggered_offers_follow_the_control_group(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    app = _app(redis_url, models_dir, rules_dir, Clock(at(0, "12:00")))
    try:
        control = next(c for c in (f"OB{i}" for i in range(200)) if CONTROL.contains(c))
        treated = next(c for c in (f"OB{i}" for i in range(200)) if not CONTROL.contains(c))
        results = {}
        for cid in (control, treated):
            _profile(app, cid)
            done = app.events.publish(f"{cid}-usage", cid, "data_usage", {"used_ratio": "0.95"})
            (results[cid],) = done.outbound
        assert results[treated].status == "sent"
        assert results[control].status == "suppressed" and results[control].reason.startswith("control_group")
        app.decision_log.close()
        logged = {f[b"customer_id"].decode(): f for f in shards.entries(app.store.client, DECISIONS_STREAM)}
        assert logged[control][b"control"] == b"1" and logged[control][b"actions"] == b""
        assert logged[treated][b"control"] == b"0"
        assert [f[b"customer_id"] for f in shards.entries(app.store.client, OUTBOUND_STREAM)] == [treated.encode()]
    finally:
        app.close()


def test_a_served_web_reservation_is_released_after_its_time(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    rules_dir = budget_rules(tmp_path, 1, quiet_hours=False)
    contact = rules_dir / "contact.yaml"
    contact.write_text(contact.read_text().replace("reservation_minutes: 15", "reservation_minutes: 0.03"))
    with served(redis_url, models_dir, rules_dir) as (app, channel):
        holder = with_offer(channel, 400)
        offers = [a.action_id for a in decide(channel, holder).actions if a.type != pb.ACTION_TYPE_SERVICE]
        assert budget_used(app.store.client) == len(offers)  # budget 1: each offer's only unit is held
        blocked = decide(channel, holder, explain=True)
        assert {f.stage for f in blocked.funnel if f.action_id in offers} == {"budget"}
        deadline = time.monotonic() + 15  # 1.8 s reservation, released by the server's poller (every second)
        while budget_used(app.store.client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert budget_used(app.store.client) == 0 and shards.zcard(app.store.client, RESERVATIONS_KEY) == 0
        assert set(offers) <= set(ids(decide(channel, holder)))


def test_the_index_names_an_interaction_briefly_and_still_reads_the_earlier_members(service, redis_admin_url) -> None:
    """Erasure and export find a customer's interaction hashes through the customer's index: a member
    ``c:<key less the customer's prefix>`` keeps the index a compact listpack; an index written before
    (``k:<key>``) is read as well."""
    from engine.decision.contact import interaction_key
    from engine.serving.privacy import export_customer
    from engine.store.erasure import customer_index_key
    from engine.store.profiles import redis_client

    app, channel = service
    client = app.store.client
    admin = redis_client(redis_admin_url)
    (cid,) = customers(control=False, start=340)
    decide(channel, cid, pb.CHANNEL_CALL_CENTER, interaction_id="visit-1")
    index = customer_index_key(cid)
    assert client.zrange(index, 0, -1) == [b"c:ix:visit-1"]
    assert admin.object("encoding", index) == b"ziplist"  # compact (Redis 7 names it listpack)
    assert [i["interaction_id"] for i in export_customer(client, cid, who=None)["interactions"]] == ["visit-1"]
    expiry = client.zscore(index, "c:ix:visit-1")
    client.zrem(index, "c:ix:visit-1")
    client.zadd(index, {"k:" + interaction_key(cid, "visit-1"): expiry})
    assert [i["interaction_id"] for i in export_customer(client, cid, who=None)["interactions"]] == ["visit-1"]
    admin.close()
