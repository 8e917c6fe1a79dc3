"""Every error status carries google.rpc details (engine/serving/error_details.py): an ErrorInfo with a stable
reason, a BadRequest naming the field for INVALID_ARGUMENT, a RetryInfo where the wait is known; decoded
as a client does (``grpc_status.rpc_status.from_call``) from a real server on a real port."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.config import Config
from engine.serving.admission import Admission
from engine.serving.app import App
from engine.serving.security import load_auth, token_hash
from engine.serving.server import build_server

from .conftest import RULES_DIR, AroundDecide

DAY = 86_400


class Details:
    """What a client reads from an error: the status in the trailer and the details packed in it."""

    def __init__(self, exc: grpc.RpcError) -> None:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        assert status is not None, f"{exc.code()}: {exc.details()} came without details"
        assert status.code == exc.code().value[0] and status.message == exc.details()
        self.code, self.message = exc.code(), exc.details()
        self.info = self.bad_request = self.retry = None
        for any_pb in status.details:
            for kind, name in ((error_details_pb2.ErrorInfo, "info"), (error_details_pb2.BadRequest, "bad_request"),
                               (error_details_pb2.RetryInfo, "retry")):
                if any_pb.Is(kind.DESCRIPTOR):
                    message = kind()
                    any_pb.Unpack(message)
                    assert getattr(self, name) is None, f"two {name}"
                    setattr(self, name, message)
        assert self.info is not None and self.info.domain == "nba.v1" and self.info.reason.isupper()

    def retry_seconds(self) -> float:
        assert self.retry is not None
        return self.retry.retry_delay.ToNanoseconds() / 1e9


def _error(call: Callable[[], object]) -> Details:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return Details(err.value)


def _ts(seconds: float, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=int(seconds), nanos=nanos)


def _decided(channel: grpc.Channel) -> pb.DecideResponse:
    return pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(customer_id="C0000042", channel=pb.CHANNEL_WEB),
                                                       timeout=10)


# Each call a bad request can make, by the raise site it reaches: (id, call(app, channel), field, reason)
def _decide(**kw: object) -> Callable[[App, grpc.Channel], object]:
    kw.setdefault("channel", pb.CHANNEL_WEB)
    return lambda app, ch: pb_grpc.DecisionServiceStub(ch).Decide(pb.DecideRequest(**kw), timeout=10)


def _respond(**kw: object) -> Callable[[App, grpc.Channel], object]:
    def call(app: App, ch: grpc.Channel) -> object:
        fields = {"decision_id": "d", "action_id": "a", "outcome": pb.OUTCOME_CLICKED, **kw}
        if callable(fields.get("timestamp")):
            fields["timestamp"] = fields["timestamp"](app)  # type: ignore[operator]
        return pb_grpc.DecisionServiceStub(ch).RecordResponse(pb.RecordResponseRequest(**fields), timeout=10)
    return call


def _publish(**kw: object) -> Callable[[App, grpc.Channel], object]:
    def call(app: App, ch: grpc.Channel) -> object:
        fields = {"event_id": "ev-1", "customer_id": "C0000042", "type": "payment_failed",
                  "attributes": {"amount": "1"}, **kw}
        if callable(fields.get("timestamp")):
            fields["timestamp"] = fields["timestamp"](app)  # type: ignore[operator]
        return pb_grpc.DecisionServiceStub(ch).PublishEvent(pb.PublishEventRequest(**fields), timeout=10)
    return call


def _update(customer_id: str = "P-1", **attributes: pb.AttributeValue) -> Callable[[App, grpc.Channel], object]:
    return lambda app, ch: pb_grpc.ProfileServiceStub(ch).UpdateProfile(
        pb.UpdateProfileRequest(customer_id=customer_id, attributes=attributes), timeout=10)


def _before_the_decision(app: App, ch: grpc.Channel) -> object:
    decision = _decided(ch)
    return pb_grpc.DecisionServiceStub(ch).RecordResponse(pb.RecordResponseRequest(
        decision_id=decision.decision_id, action_id=decision.actions[0].action_id, outcome=pb.OUTCOME_CLICKED,
        timestamp=_ts(decision.decided_at.seconds - 3600)), timeout=10)


def _undecodable(app: App, ch: grpc.Channel) -> object:
    # field 1 (customer_id), 1 byte that is not UTF-8
    return ch.unary_unary("/nba.v1.DecisionService/Decide")(b"\x0a\x01\xff", timeout=10)


def _health_without_a_message(app: App, ch: grpc.Channel) -> object:
    check = ch.stream_unary("/grpc.health.v1.Health/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                            response_deserializer=health_pb2.HealthCheckResponse.FromString)
    return check(iter(()), timeout=10)


def _admin(name: str, request: object) -> Callable[[App, grpc.Channel], object]:
    return lambda app, ch: getattr(pb_grpc.AdminServiceStub(ch), name)(request, timeout=10)


def _ahead(app: App) -> Timestamp:
    return _ts(app.clock() + 10 * DAY)


def _bad_nanos(app: App) -> Timestamp:
    return _ts(app.clock(), nanos=-5)


def _after_9999(app: App) -> Timestamp:
    return _ts(253_402_300_800)

INVALID = [
    # Decide: engine/decision/request.py validate, engine/serving/server.py _channel, DecodeGuard
    ("decide-customer-empty", _decide(customer_id=""), "customer_id", "INVALID_FIELD"),
    ("decide-customer-space", _decide(customer_id="a b"), "customer_id", "INVALID_FIELD"),
    ("decide-channel-unset", _decide(customer_id="C1", channel=pb.CHANNEL_UNSPECIFIED), "channel", "INVALID_FIELD"),
    ("decide-channel-name-unknown",  # a message that is not ASCII
     _decide(customer_id="C1", channel=pb.CHANNEL_UNSPECIFIED, channel_name="guichet-é"),
     "channel_name", "INVALID_FIELD"),
    ("decide-channel-name-disagrees", _decide(customer_id="C1", channel=pb.CHANNEL_SMS, channel_name="web"),
     "channel_name", "INVALID_FIELD"),
    ("decide-max-actions", _decide(customer_id="C1", max_actions=21), "max_actions", "INVALID_FIELD"),
    ("decide-interaction", _decide(customer_id="C1", interaction_id="a|b"), "interaction_id", "INVALID_FIELD"),
    ("decide-touchpoint", _decide(customer_id="C1", touchpoint="t" * 257), "touchpoint", "INVALID_FIELD"),
    ("decide-context", _decide(customer_id="C1", context={f"k{i}": "v" for i in range(65)}), "context",
     "INVALID_FIELD"),
    ("decide-undecodable", _undecodable, "request", "MALFORMED_REQUEST"),
    # RecordResponse: server.py, engine/decision/responses.py record
    ("respond-decision-empty", _respond(decision_id=""), "decision_id", "INVALID_FIELD"),
    ("respond-decision-long", _respond(decision_id="d" * 257), "decision_id", "INVALID_FIELD"),
    ("respond-action-empty", _respond(action_id=" "), "action_id", "INVALID_FIELD"),
    ("respond-outcome-unset", _respond(outcome=pb.OUTCOME_UNSPECIFIED), "outcome", "INVALID_FIELD"),
    ("respond-timestamp-nanos", _respond(timestamp=_bad_nanos), "timestamp", "INVALID_FIELD"),
    ("respond-timestamp-seconds", _respond(timestamp=_after_9999), "timestamp", "INVALID_FIELD"),
    ("respond-decision-malformed", _respond(decision_id="d"), "decision_id", "DECISION_ID_MALFORMED"),
    ("respond-timestamp-ahead", _respond(timestamp=_ahead), "timestamp", "INVALID_FIELD"),
    ("respond-before-the-decision", _before_the_decision, "timestamp", "INVALID_FIELD"),
    # PublishEvent: engine/events/processor.py _publish and _check_id, events.yaml validation
    ("event-id-empty", _publish(event_id=""), "event_id", "INVALID_FIELD"),
    ("event-id-space", _publish(event_id="e 1"), "event_id", "INVALID_FIELD"),
    ("event-customer-empty", _publish(customer_id=""), "customer_id", "INVALID_FIELD"),
    ("event-customer-long", _publish(customer_id="c" * 129), "customer_id", "INVALID_FIELD"),
    ("event-type-empty", _publish(type=""), "type", "INVALID_FIELD"),
    ("event-type-unknown", _publish(type="payment_faild"), "type", "INVALID_FIELD"),
    ("event-attribute-bad", _publish(attributes={"amount": "lots"}), "attributes.amount", "INVALID_FIELD"),
    ("event-attribute-missing", _publish(attributes={}), "attributes.amount", "INVALID_FIELD"),
    ("event-timestamp-nanos", _publish(timestamp=_bad_nanos), "timestamp", "INVALID_FIELD"),
    ("event-timestamp-seconds", _publish(timestamp=_after_9999), "timestamp", "INVALID_FIELD"),
    ("event-timestamp-ahead", _publish(timestamp=_ahead), "timestamp", "INVALID_FIELD"),
    # UpdateProfile: engine/serving/privacy.py check_customer_id, server.py, engine/store/updates.py check_update
    ("profile-customer-empty", _update(""), "customer_id", "INVALID_FIELD"),
    ("profile-customer-space", _update("has space"), "customer_id", "INVALID_FIELD"),
    ("profile-no-value", _update(plan=pb.AttributeValue()), "attributes.plan", "INVALID_FIELD"),
    ("profile-bad-date", _update(plan=pb.AttributeValue(date=_ts(0, nanos=-1))), "attributes.plan.date",
     "INVALID_FIELD"),
    ("profile-unknown-attribute", _update(shoe_size=pb.AttributeValue(number=42)), "attributes.shoe_size",
     "INVALID_FIELD"),
    ("profile-out-of-range", _update(churn_risk=pb.AttributeValue(number=1.5)), "attributes.churn_risk",
     "INVALID_FIELD"),
    # AdminService privacy calls; health (admission: a unary call needs its one message)
    ("forget-customer-empty", _admin("ForgetCustomer", pb.ForgetCustomerRequest(customer_id="")), "customer_id",
     "INVALID_FIELD"),
    ("export-customer-space", _admin("ExportCustomer", pb.ExportCustomerRequest(customer_id="a b")), "customer_id",
     "INVALID_FIELD"),
    ("job-id-empty", _admin("GetCustomerJob", pb.GetCustomerJobRequest(job_id="")), "job_id", "INVALID_FIELD"),
    ("health-without-a-message", _health_without_a_message, "request", "MALFORMED_REQUEST"),
]


@pytest.mark.parametrize("call, field, reason", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_each_invalid_argument_names_its_field_in_bad_request(service, call, field: str, reason: str) -> None:
    app, channel = service
    error = _error(lambda: call(app, channel))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == reason and error.info.metadata["field"] == field
    assert error.bad_request is not None
    (violation,) = error.bad_request.field_violations
    assert violation.field == field and violation.description
    # the message as before (``<field>: <what>``); the description is the message without the field
    if error.message.startswith(f"{field}: "):
        assert violation.description == error.message.removeprefix(f"{field}: ")
    else:
        assert reason == "MALFORMED_REQUEST" and violation.description == error.message
    assert error.retry is None


def test_an_event_setting_an_attribute_names_the_event_attribute(service) -> None:
    app, channel = service
    events = app.config.rules_dir / "events.yaml"
    events.write_text(events.read_text().replace("event_types:\n", """event_types:
  plan_changed:
    attributes: {bill: number}
    sets: {churn_risk: bill}
    description: A bill that sets a score (for the test).
""", 1))
    applied, _, errors = app.reload_rules()
    assert applied, errors
    error = _error(lambda: _publish(type="plan_changed", attributes={"bill": "7"})(app, channel))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.info.reason == "INVALID_FIELD"
    assert [v.field for v in error.bad_request.field_violations] == ["attributes.bill"]


def test_not_found_and_failed_precondition_carry_their_reasons(service) -> None:
    app, channel = service
    stub = pb_grpc.DecisionServiceStub(channel)
    missing = _error(lambda: stub.RecordResponse(pb.RecordResponseRequest(
        decision_id="0" * 32, action_id="a", outcome=pb.OUTCOME_CLICKED), timeout=10))
    # never issued (dated before this store's first decision): engine/decision/responses.py UnknownDecision
    assert missing.code == grpc.StatusCode.NOT_FOUND and missing.info.reason == "DECISION_UNKNOWN"
    assert missing.info.metadata["field"] == "decision_id" and missing.info.metadata["method"] == "RecordResponse"
    assert missing.bad_request is None and missing.retry is None
    decision = _decided(channel)
    not_shown = _error(lambda: stub.RecordResponse(pb.RecordResponseRequest(
        decision_id=decision.decision_id, action_id="never-offered", outcome=pb.OUTCOME_CLICKED), timeout=10))
    assert not_shown.code == grpc.StatusCode.NOT_FOUND and not_shown.info.reason == "ACTION_NOT_FOUND"
    job = _error(lambda: _admin("GetCustomerJob", pb.GetCustomerJobRequest(job_id="nope"))(app, channel))
    assert job.code == grpc.StatusCode.NOT_FOUND and job.info.reason == "JOB_NOT_FOUND"
    assert job.message.startswith("job_id: no privacy job")

    profiles = pb_grpc.ProfileServiceStub(channel)
    once = pb.UpdateProfileRequest(customer_id="ONCE-1", create_only=True,
                                   attributes={"age": pb.AttributeValue(number=50)})
    assert profiles.UpdateProfile(once, timeout=10).created
    exists = _error(lambda: profiles.UpdateProfile(once, timeout=10))
    assert exists.code == grpc.StatusCode.FAILED_PRECONDITION and exists.info.reason == "PROFILE_EXISTS"
    assert exists.message == "customer ONCE-1 already has a profile"


DESK_TOKEN = "a-desk-token-for-the-error-details-tests"


@contextlib.contextmanager
def _served(redis_url: str, models_dir: Path, tmp_path: Path, **server: object) -> Iterator[tuple[App, str]]:
    app = App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=models_dir, demo_customers=200,
                     metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0)).start()
    grpc_server, port, _ = build_server(app, "127.0.0.1:0", **server)  # type: ignore[arg-type]
    grpc_server.start()
    try:
        yield app, f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(0).wait()
        app.close()


def test_refusals_carry_their_reasons_and_a_rate_limit_its_retry_delay(redis_url: str, models_dir: Path,
                                                                       tmp_path: Path) -> None:
    auth = tmp_path / "auth.yaml"
    auth.write_text(f"rate_limit: {{per_second: 0.1, burst: 1}}\ncallers:\n  - name: desk\n"
                    f"    token_sha256: {token_hash(DESK_TOKEN)}\n    roles: [decide]\n")
    with _served(redis_url, models_dir, tmp_path, auth=load_auth(auth)) as (_, address), \
            grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DecisionServiceStub(channel)
        request = pb.DecideRequest(customer_id="C0000042", channel=pb.CHANNEL_WEB, preview=True)

        def bearer(token: str) -> tuple:
            return (("authorization", f"Bearer {token}"),)

        unknown = _error(lambda: stub.Decide(request, metadata=bearer("guessed"), timeout=10))
        assert unknown.code == grpc.StatusCode.UNAUTHENTICATED and unknown.info.reason == "UNAUTHENTICATED"
        assert unknown.message.startswith("unknown token") and unknown.info.metadata["method"] == "Decide"
        denied = _error(lambda: pb_grpc.AdminServiceStub(channel).GetStatus(
            pb.GetStatusRequest(), metadata=bearer(DESK_TOKEN), timeout=10))
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED and denied.info.reason == "PERMISSION_DENIED"
        assert denied.info.metadata["caller"] == "desk" and "may not call GetStatus" in denied.message
        stub.Decide(request, metadata=bearer(DESK_TOKEN), timeout=10)  # the burst of 1
        limited = _error(lambda: stub.Decide(request, metadata=bearer(DESK_TOKEN), timeout=10))
        assert limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED and limited.info.reason == "RATE_LIMITED"
        assert "over its rate limit" in limited.message and limited.retry_seconds() == pytest.approx(10.0)


class Hold(AroundDecide):
    """Decide for customer HOLD waits until ``release`` is set, keeping its call slot."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def around(self, decide, request, context):
        if getattr(request, "customer_id", "") == "HOLD":
            self.release.wait(30)
        return decide(request, context)


def test_a_shed_call_is_overloaded_with_a_retry_delay(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    hold, admission = Hold(), Admission(1)
    with _served(redis_url, models_dir, tmp_path, admission=admission, interceptors=(hold,)) as (_, address), \
            grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DecisionServiceStub(channel)
        held = stub.Decide.future(pb.DecideRequest(customer_id="HOLD", channel=pb.CHANNEL_WEB), timeout=30)
        try:
            deadline = time.monotonic() + 20
            while not admission.calls.full():
                assert time.monotonic() < deadline, "the held call never took its slot"
                time.sleep(0.01)
            shed = _error(lambda: stub.Decide(pb.DecideRequest(customer_id="C1", channel=pb.CHANNEL_WEB), timeout=10))
        finally:
            hold.release.set()
        assert held.result().actions
    assert shed.code == grpc.StatusCode.RESOURCE_EXHAUSTED and shed.message.startswith("server busy: 1 calls")
    assert shed.info.reason == "OVERLOADED" and shed.info.metadata["limit"] == "1"
    assert shed.retry_seconds() > 0
