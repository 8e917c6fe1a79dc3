"""Events end to end: a real redis-server, a real gRPC server, the demo rules/events.yaml."""

from __future__ import annotations

import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.events.processor import OUTBOUND_STREAM, TIMERS_KEY, events_key
from engine.events.stream import INGEST_STREAM, INVALID_STREAM
from engine.sim.telco import NUMERIC, SCHEMA
from engine.store.profiles import Profile, redis_client
from engine.store.slots import shard_keys

from . import shards
from .conftest import RULES_DIR

pytestmark = pytest.mark.both_redis

HOUR = 3600.0


def _quiet_hours(rules_dir: Path, quiet_now: bool) -> None:
    """Quiet hours on email and sms that include now (quiet_now) or are two hours away."""
    minute = datetime.now(UTC).hour * 60 + datetime.now(UTC).minute
    start = (minute - 60) % 1440 if quiet_now else (minute + 120) % 1440
    end = (start + 120) % 1440
    path = rules_dir / "contact.yaml"
    text = path.read_text()
    text = text.replace('from: "21:00"', f'from: "{start // 60:02d}:{start % 60:02d}"')
    text = text.replace('to: "08:00"', f'to: "{end // 60:02d}:{end % 60:02d}"')
    path.write_text(text)


class Service:
    """A real server on an ephemeral port that can be stopped and started again on the same Redis."""

    def __init__(self, redis_url: str, models_dir: Path, rules_dir: Path, poll: float = 0.2) -> None:
        self.redis_url, self.models_dir, self.rules_dir, self.poll = redis_url, models_dir, rules_dir, poll
        self.app = self.server = self.channel = None

    def start(self) -> Service:
        from engine.config import Config
        from engine.serving.app import App
        from engine.serving.server import build_server

        self.app = App(Config(redis_url=self.redis_url, rules_dir=self.rules_dir, models_dir=self.models_dir,
                              demo_customers=200, metrics_port=0, rules_watch_seconds=0,
                              events_poll_seconds=self.poll)).start()
        # 16 concurrent callers below: gRPC frees a call's admission slot only after its caller has the
        # answer, so a client with as many callers as the limit is shed now and then
        self.server, port, _ = build_server(self.app, "127.0.0.1:0", max_in_flight=32)
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.DecisionServiceStub(self.channel)
        return self

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.app.close()

    def publish(self, customer: str, kind: str, event_id: str | None = None, at: float | None = None,
                **attributes) -> pb.PublishEventResponse:
        request = pb.PublishEventRequest(event_id=event_id or uuid.uuid4().hex, customer_id=customer, type=kind,
                                         attributes={k: str(v) for k, v in attributes.items()})
        if at is not None:
            ts = Timestamp()
            ts.FromNanoseconds(int(at * 1e9))
            request.timestamp.CopyFrom(ts)
        return self.stub.PublishEvent(request, timeout=10)

    def decide(self, customer: str, channel=pb.CHANNEL_CALL_CENTER) -> pb.DecideResponse:
        return self.stub.Decide(pb.DecideRequest(customer_id=customer, channel=channel, explain=True), timeout=10)

    def triggers(self, customer: str) -> set[str]:
        return set(self.app.store.fetch(customer, SCHEMA).triggers)


@pytest.fixture()
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES_DIR, target)
    _quiet_hours(target, quiet_now=False)
    return target


@pytest.fixture()
def svc(redis_url: str, models_dir: Path, rules_dir: Path):
    service = Service(redis_url, models_dir, rules_dir).start()
    yield service
    service.stop()


def _profile(svc: Service, customer: str, consent=("web", "call_center", "email", "sms", "mobile_app"),
             plan: str = "standard", **numbers) -> None:
    numeric = np.zeros(len(NUMERIC), dtype=np.float32)
    values = {"tenure_months": 24, "monthly_spend": 40, "data_allowance_gb": 20, "data_usage_gb": 8,
              "credit_score": 700, **numbers}
    for name, value in values.items():
        numeric[NUMERIC.index(name)] = value
    svc.app.store.save([Profile(customer, numeric, {"plan": plan, "segment": "consumer", "lifecycle_stage": "satisfied",
                                                    "value_tier": "B", "region": "north", "device_os": "ios"},
                                {"products": frozenset({"mobile"}), "consent": frozenset(consent)})], SCHEMA)


def _outbound(redis_url: str) -> list[dict]:
    client = redis_client(redis_url, decode_responses=True)
    return shards.entries(client, OUTBOUND_STREAM)


def _wait(predicate, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


# --- scenario 5 and clearing --------------------------------------------------------------------------

def test_contact_request_tops_the_call_center_list_until_the_call(svc: Service) -> None:
    _profile(svc, "E1")
    assert svc.decide("E1").actions[0].action_id != "callback_customer"
    reply = svc.publish("E1", "contact_request", topic="billing")
    assert "callback_request" in reply.patterns and list(reply.triggers_raised) == ["callback_requested"]
    decision = svc.decide("E1")  # right after PublishEvent returned, on another channel
    assert decision.actions[0].action_id == "callback_customer"
    assert "callback_due" in decision.situations
    done = svc.publish("E1", "call_completed")
    assert list(done.triggers_cleared) == ["callback_requested"]
    assert "callback_customer" not in [a.action_id for a in svc.decide("E1").actions]


def test_an_accepted_call_back_response_clears_the_trigger(svc: Service) -> None:
    _profile(svc, "E2")
    svc.publish("E2", "contact_request", topic="technical")
    decision = svc.decide("E2")
    assert decision.actions[0].action_id == "callback_customer"
    svc.stub.RecordResponse(pb.RecordResponseRequest(decision_id=decision.decision_id, action_id="callback_customer",
                                                     outcome=pb.OUTCOME_ACCEPTED), timeout=5)
    assert "callback_requested" not in svc.triggers("E2")
    assert "callback_customer" not in [a.action_id for a in svc.decide("E2").actions]


# --- count, replay, restart ---------------------------------------------------------------------------

def test_count_pattern_needs_two_distinct_failures_and_a_replay_counts_once(svc: Service, redis_url: str) -> None:
    _profile(svc, "E3")
    first = svc.publish("E3", "payment_failed", event_id="pay-1", amount=20)
    assert not first.duplicate and not first.patterns
    replay = svc.publish("E3", "payment_failed", event_id="pay-1", amount=20)
    assert replay.duplicate and not replay.patterns and not replay.stream_id
    assert "payment_failed" not in svc.triggers("E3")
    assert redis_client(redis_url).zcard(events_key("E3")) == 1
    second = svc.publish("E3", "payment_failed", event_id="pay-2", amount=35)
    assert list(second.patterns) == ["repeated_payment_failure"]
    assert "payment_failed" in svc.triggers("E3")
    (out,) = second.outbound
    assert out.status == "sent" and out.action_id == "payment_help_plan" and out.channel == pb.CHANNEL_EMAIL
    (sent,) = _outbound(redis_url)
    assert sent["decision_id"] == out.decision_id and sent["action_id"] == "payment_help_plan"
    # the outbound decision is a real one: its response can be recorded, and it clears the trigger
    svc.stub.RecordResponse(pb.RecordResponseRequest(decision_id=out.decision_id, action_id="payment_help_plan",
                                                     outcome=pb.OUTCOME_ACCEPTED), timeout=5)
    assert "payment_failed" not in svc.triggers("E3")
    # a replay of the completing event does nothing again
    assert svc.publish("E3", "payment_failed", event_id="pay-2", amount=35).duplicate
    assert len(_outbound(redis_url)) == 1


def test_failures_further_apart_than_the_window_do_not_count(svc: Service) -> None:
    now = time.time()
    svc.publish("E4", "payment_failed", at=now - 8 * 24 * HOUR, amount=10)
    assert not svc.publish("E4", "payment_failed", amount=10).patterns
    assert not svc.publish("E4b", "payment_failed", amount=0).patterns  # where: amount > 0
    assert not svc.publish("E4b", "payment_failed", amount=0).patterns


def test_a_restart_between_two_events_of_a_count_pattern(redis_url: str, models_dir: Path, rules_dir: Path) -> None:
    svc = Service(redis_url, models_dir, rules_dir).start()
    try:
        assert not svc.publish("E5", "payment_failed", amount=12).patterns
    finally:
        svc.stop()
    svc = Service(redis_url, models_dir, rules_dir).start()
    try:
        assert list(svc.publish("E5", "payment_failed", amount=13).patterns) == ["repeated_payment_failure"]
        assert "payment_failed" in svc.triggers("E5")
    finally:
        svc.stop()


# --- threshold, outbound, consent ---------------------------------------------------------------------

def test_threshold_pattern_and_a_consent_withdrawal_stops_the_outbound_sms(svc: Service, redis_url: str) -> None:
    _profile(svc, "E6")
    assert not svc.publish("E6", "data_usage", used_ratio=0.5).patterns
    reply = svc.publish("E6", "data_usage", used_ratio=0.93)
    assert list(reply.patterns) == ["data_cap_near"] and "data_cap_near" in svc.triggers("E6")
    (out,) = reply.outbound
    assert (out.status, out.action_id, out.channel) == ("sent", "upsell_extra_data", pb.CHANNEL_SMS)
    assert [o["action_id"] for o in _outbound(redis_url)] == ["upsell_extra_data"]

    _profile(svc, "E6", consent=("web", "call_center", "email", "mobile_app"))  # SMS consent withdrawn
    again = svc.publish("E6", "data_usage", used_ratio=0.97)
    (out,) = again.outbound
    assert out.status == "suppressed" and not out.decision_id
    assert "marketing_needs_consent" in out.reason
    assert len(_outbound(redis_url)) == 1
    assert "data_cap_near" in again.triggers_raised  # the trigger still changes the next inbound decision


def test_quiet_hours_postpone_an_outbound_email(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    rules = tmp_path / "quiet"
    shutil.copytree(RULES_DIR, rules)
    _quiet_hours(rules, quiet_now=True)
    svc = Service(redis_url, models_dir, rules).start()
    try:
        svc.publish("E7", "payment_failed", amount=10)
        (out,) = svc.publish("E7", "payment_failed", amount=11).outbound
        assert out.status == "postponed" and out.reason.startswith("quiet hours"), out
        assert _outbound(redis_url) == []  # sent at the window's end (tests/test_quiet_hours.py)
    finally:
        svc.stop()


# --- sequence -------------------------------------------------------------------------------------

def test_sequence_pattern_complaint_then_payment_failure(svc: Service) -> None:
    now = time.time()
    svc.publish("E8", "complaint_opened", at=now - 10 * 24 * HOUR, severity="high")
    reply = svc.publish("E8", "payment_failed", amount=30)
    assert "complaint_then_payment_failure" in reply.patterns and "retention_save" in reply.triggers_raised
    # the order matters: a failure before the complaint is not the sequence
    svc.publish("E9", "payment_failed", at=now - HOUR, amount=30)
    assert "complaint_then_payment_failure" not in svc.publish("E9", "complaint_opened", severity="high").patterns
    # and the condition on the first event: a low-severity complaint does not open it
    svc.publish("E10", "complaint_opened", severity="low")
    assert not svc.publish("E10", "payment_failed", amount=30).patterns


# --- absence, timers, restart ----------------------------------------------------------------------

def test_absence_fires_at_the_due_time_unless_the_call_came(svc: Service) -> None:
    now = time.time()
    svc.publish("E11", "contact_request", at=now - 24 * HOUR + 1.0, topic="sales")  # due in about a second
    svc.publish("E12", "contact_request", at=now - 24 * HOUR + 1.0, topic="sales")
    svc.publish("E12", "call_completed", at=now - 12 * HOUR)
    assert "callback_overdue" not in svc.triggers("E11")
    assert _wait(lambda: "callback_overdue" in svc.triggers("E11"), 10)
    assert _wait(lambda: shards.zcard(svc.app.store.client, TIMERS_KEY) == 0, 5)
    assert "callback_overdue" not in svc.triggers("E12")
    top = svc.decide("E11").actions[0]
    assert top.action_id == "callback_customer"


def test_absence_with_outbound_renewal_email(svc: Service, redis_url: str) -> None:
    _profile(svc, "E13", contract_months_left=1)
    now = time.time()
    svc.publish("E13", "contract_end_notice", at=now - 7 * 24 * HOUR + 0.5, days_left=25)
    svc.publish("E14", "contract_end_notice", at=now - 7 * 24 * HOUR + 0.5, days_left=25)
    svc.publish("E14", "offer_accepted", at=now - HOUR, action_id="retention_contract_renewal")
    assert _wait(lambda: "retention_save" in svc.triggers("E13"), 10)
    sent = _wait(lambda: _outbound(redis_url), 5)
    assert [(o["customer_id"], o["action_id"], o["channel"]) for o in sent] == [
        ("E13", "retention_contract_renewal", "email")]
    assert _wait(lambda: shards.zcard(svc.app.store.client, TIMERS_KEY) == 0, 5)
    assert "retention_save" not in svc.triggers("E14")


def test_a_restart_between_the_event_and_its_due_time(redis_url: str, models_dir: Path, rules_dir: Path) -> None:
    svc = Service(redis_url, models_dir, rules_dir).start()
    try:
        svc.publish("E15", "contact_request", at=time.time() - 24 * HOUR + 2.0, topic="other")
    finally:
        svc.stop()
    assert shards.zcard(redis_client(redis_url), TIMERS_KEY) == 1  # the timer is in Redis, not the server
    svc = Service(redis_url, models_dir, rules_dir).start()
    try:
        assert _wait(lambda: "callback_overdue" in svc.triggers("E15"), 10)
    finally:
        svc.stop()


# --- validation, stream ingestion ---------------------------------------------------------------------

@pytest.mark.parametrize("kind, attributes, field, words", [
    ("payment_faild", {"amount": "1"}, "type", ['did you mean "payment_failed"', "known:"]),
    ("payment_failed", {"amount": "lots"}, "attributes.amount", ["expected a number"]),
    ("payment_failed", {"amont": "1"}, "attributes.amont", ['did you mean "amount"']),
    ("payment_failed", {}, "attributes.amount", ["needs attribute amount"]),
    ("contact_request", {"topic": "biling"}, "attributes.topic", ['did you mean "billing"']),
])
def test_invalid_events_name_the_field(svc: Service, kind: str, attributes: dict, field: str, words: list[str]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        svc.publish("E16", kind, **attributes)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")
    for word in words:
        assert word in err.value.details()


def test_the_ingest_stream_feeds_the_same_path(svc: Service, redis_url: str) -> None:
    client = redis_client(redis_url, decode_responses=True)
    client.xadd(INGEST_STREAM, {"event_id": "s-1", "customer_id": "E17", "type": "contact_request", "attr.topic": "billing"})
    client.xadd(INGEST_STREAM, {"event_id": "s-1", "customer_id": "E17", "type": "contact_request", "attr.topic": "billing"})
    client.xadd(INGEST_STREAM, {"event_id": "s-2", "customer_id": "E17", "type": "nonsense"})
    assert _wait(lambda: "callback_requested" in svc.triggers("E17"), 10)
    (bad,) = _wait(lambda: client.xrange(INVALID_STREAM), 5)
    assert bad[1]["error"].startswith("type:")
    assert _wait(lambda: client.xpending(INGEST_STREAM, "nba-events")["pending"] == 0, 5)
    assert client.zcard(events_key("E17")) == 1  # the duplicate counted once


# --- many customers -----------------------------------------------------------------------------------

def test_events_for_5000_customers_leave_no_durable_state(svc: Service) -> None:
    """Each evaluation's durable session is deleted: 5,000 distinct customers (durable holds 1,024
    live sessions per ruleset), 16 concurrent callers, no error."""
    patterns = svc.app.rules.current.patterns

    def one(i: int) -> int:
        kind = ("contact_request", "payment_failed", "data_usage")[i % 3]
        attrs = ({"topic": "billing"}, {"amount": 5}, {"used_ratio": 0.5})[i % 3]
        reply = svc.publish(f"M{i:05d}", kind, **attrs)
        return len(reply.triggers_raised)

    with ThreadPoolExecutor(16) as pool:
        raised = list(pool.map(one, range(5_100)))
    assert sum(raised) == 1_700  # every contact request raised its trigger
    assert patterns.sessions_open == 0 and patterns.engine_errors == 0
    assert svc.triggers("M05097") == {"callback_requested"}
    assert svc.app.rules.current.engine_errors == 0


def test_a_reload_swaps_the_patterns_and_frees_the_old_ones(svc: Service) -> None:
    old = svc.app.rules.current.patterns
    events = svc.rules_dir / "events.yaml"
    events.write_text(events.read_text().replace("at_least: 2, within: 7d", "at_least: 2, within: 10d"))
    applied, _, errors = svc.app.reload_rules()  # the pattern's own rule test (8 days apart) now fails
    assert not applied and any("eight days apart" in e for e in errors)
    assert svc.app.rules.current.patterns is old and not old.closed
    tests = svc.rules_dir / "tests" / "events.yaml"
    tests.write_text(tests.read_text().replace("- {at: 8d, event: payment_failed", "- {at: 11d, event: payment_failed"))
    applied, _, errors = svc.app.reload_rules()
    assert applied and not errors
    assert old.closed and svc.app.rules.current.patterns is not old
    svc.publish("E18", "payment_failed", at=time.time() - 9 * 24 * HOUR, amount=1)
    assert svc.publish("E18", "payment_failed", amount=1).patterns


# --- timers and the stream under several processes ----------------------------------------------------

def test_two_pollers_claim_each_due_timer_once(redis_url: str) -> None:
    """Two pollers (as in two worker processes) on one Redis: every due timer is handled exactly once."""
    from engine.events.timers import TimerPoller

    client = redis_client(redis_url)
    now_ms = int(time.time() * 1000)
    keys = shard_keys(TIMERS_KEY, client)  # spread over every shard on a cluster
    for i in range(500):
        client.zadd(keys[i % len(keys)], {f"t{i}": now_ms - i})
    client.zadd(keys[-1], {"later": now_ms + 3_600_000})
    handled: list[str] = []
    pollers = [TimerPoller(redis_client(redis_url), handled.append) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda p: p.poll_once(), pollers))
    assert sorted(handled) == sorted(f"t{i}" for i in range(500)) and sum(counts) == 500
    assert [m.decode() for m, _ in shards.zrange(client, TIMERS_KEY)] == ["later"]


def test_a_failed_timer_is_claimed_again_after_its_lease(redis_url: str) -> None:
    from engine.events import timers

    client = redis_client(redis_url)
    key = shard_keys(TIMERS_KEY, client)[-1]
    client.zadd(key, {"x": int(time.time() * 1000) - 1})

    def fail(member: str) -> None:
        raise RuntimeError("worker died")

    assert timers.TimerPoller(client, fail).poll_once() == 0
    (member, due), = client.zrange(key, 0, -1, withscores=True)
    assert member == b"x" and due > time.time() * 1000 + timers.LEASE_MS - 5_000  # leased, not lost
    seen: list[str] = []
    later = timers.TimerPoller(client, seen.append, clock=lambda: time.time() + timers.LEASE_MS / 1000 + 1)
    assert later.poll_once() == 1 and seen == ["x"] and client.zcard(key) == 0


def test_entries_a_dead_consumer_left_pending_are_taken_over(svc: Service, redis_url: str) -> None:
    from engine.events.stream import GROUP, EventStreamConsumer

    client = redis_client(redis_url, decode_responses=True)
    svc.app.event_stream.stop()  # only the consumers below read from here on
    client.xadd(INGEST_STREAM, {"event_id": "d-1", "customer_id": "E19", "type": "contact_request", "attr.topic": "other"})
    client.xreadgroup(GROUP, "dead-worker", {INGEST_STREAM: ">"}, count=10)  # read, never acknowledged
    assert client.xpending(INGEST_STREAM, GROUP)["pending"] == 1
    time.sleep(0.2)
    alive = EventStreamConsumer(redis_client(redis_url), svc.app.events, claim_idle_ms=100,
                                block_ms=10, consumer="alive")
    assert alive.read_once() == 1
    assert client.xpending(INGEST_STREAM, GROUP)["pending"] == 0
    assert "callback_requested" in svc.triggers("E19")


def test_nba_event_command(svc: Service, capsys) -> None:
    from engine.cli import main

    address = svc.address
    assert main(["event", "E20", "contact_request", "topic=billing", "--event-id", "cli-1", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "patterns callback_request; raised callback_requested" in out
    assert main(["event", "E20", "contact_request", "topic=billing", "--event-id", "cli-1", "--address", address]) == 0
    assert "duplicate" in capsys.readouterr().out
    assert main(["event", "E20", "contact_requst", "--address", address]) == 1
    assert 'type: unknown event type "contact_requst"; did you mean "contact_request"?' in capsys.readouterr().err
