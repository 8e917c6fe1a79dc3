"""End to end through a real gRPC server on a real port, a real channel and a real Redis."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.store.profiles import EVENTS_STREAM, RESPONSES_STREAM, redis_client
from engine.store.streams import xrange_all

pytestmark = pytest.mark.both_redis


def decide(grpc_channel: grpc.Channel, **kw) -> pb.DecideResponse:
    kw.setdefault("channel", pb.CHANNEL_WEB)
    return pb_grpc.DecisionServiceStub(grpc_channel).Decide(pb.DecideRequest(**kw), timeout=10)


def test_health_answers_and_reflection_is_off_by_default(service) -> None:
    _, channel = service
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as off:  # nba serve --reflection: tests/test_admission.py
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_decide_returns_ranked_actions_with_versions(service) -> None:
    app, channel = service
    reply = decide(channel, customer_id="C0000042", touchpoint="web.home.hero", max_actions=3)
    assert reply.decision_id
    assert reply.ruleset_version == app.rules.current.version
    assert reply.model_version == app.model.current.version
    assert not reply.cold_start and not reply.degraded
    assert 1 <= len(reply.actions) <= 3
    assert [a.rank for a in reply.actions] == list(range(1, len(reply.actions) + 1))
    priorities = [a.priority for a in reply.actions]
    assert priorities == sorted(priorities, reverse=True)
    assert len({a.group for a in reply.actions}) == len(reply.actions)
    for a in reply.actions:
        assert a.treatment.channel == pb.CHANNEL_WEB and a.treatment.content
        assert 0 < a.propensity < 1 and a.value > 0 and a.reasons
        assert a.priority == pytest.approx(a.propensity * a.value, rel=1e-9) or any("lever" in r or "weight" in r for r in a.reasons)


def test_unknown_customer_gets_a_cold_start_decision(service) -> None:
    _, channel = service
    reply = decide(channel, customer_id="never-seen-before")
    assert reply.cold_start and reply.actions


def test_explain_accounts_for_every_catalog_action(service) -> None:
    app, channel = service
    reply = decide(channel, customer_id="C0000007", explain=True)
    assert {f.action_id for f in reply.funnel} == {a.id for a in app.rules.current.ruleset.actions}
    ranked = [f.action_id for f in reply.funnel if f.stage == "ranked"]
    assert sorted(ranked) == sorted(a.action_id for a in reply.actions)


@pytest.mark.parametrize("request_fields, field", [
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": "   "}, "customer_id"),
    ({"customer_id": "C1", "channel": pb.CHANNEL_UNSPECIFIED}, "channel"),
    ({"customer_id": "C1", "channel": 99}, "channel"),
    ({"customer_id": "C1", "max_actions": 21}, "max_actions"),
    ({"customer_id": "C1", "max_actions": -1}, "max_actions"),
])
def test_bad_decide_requests_are_invalid_argument_naming_the_field(service, request_fields, field) -> None:
    _, channel = service
    with pytest.raises(grpc.RpcError) as err:
        decide(channel, **request_fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


def test_responses_and_events_are_stored_in_streams(service, redis_url: str) -> None:
    _, channel = service
    stub = pb_grpc.DecisionServiceStub(channel)
    reply = decide(channel, customer_id="C0000003")
    r = stub.RecordResponse(pb.RecordResponseRequest(decision_id=reply.decision_id,
                                                     action_id=reply.actions[0].action_id,
                                                     outcome=pb.OUTCOME_ACCEPTED), timeout=5)
    e = stub.PublishEvent(pb.PublishEventRequest(event_id="ev-1", customer_id="C0000003", type="payment_failed",
                                                 attributes={"amount": "42.50"}), timeout=5)
    client = redis_client(redis_url, decode_responses=True)
    (rid, response), = xrange_all(client, RESPONSES_STREAM)
    assert rid == r.response_id and response["outcome"] == "accepted"
    assert response["decision_id"] == reply.decision_id
    (eid, event), = xrange_all(client, EVENTS_STREAM)
    assert eid == e.stream_id and event["attr.amount"] == "42.50"
    with pytest.raises(grpc.RpcError) as err:
        stub.RecordResponse(pb.RecordResponseRequest(decision_id="d", action_id="a"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outcome" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.PublishEvent(pb.PublishEventRequest(event_id="ev-2", type="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("customer_id")


def test_status_reports_versions_and_redis(service) -> None:
    app, channel = service
    status = pb_grpc.AdminServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
    assert status.ruleset_version == app.rules.current.version
    assert status.model_version == app.model.current.version
    assert status.redis_ok and status.catalog_size >= 30
    assert status.model_loaded_at.seconds > 0 and status.ruleset_loaded_at.seconds > 0


def test_a_broken_rule_file_is_refused_and_the_live_rules_stay(service) -> None:
    app, channel = service
    admin = pb_grpc.AdminServiceStub(channel)
    before = app.rules.current.version
    catalog = app.config.rules_dir / "catalog.yaml"
    good = catalog.read_text()
    catalog.write_text(good.replace("eligible: '", "eligible: 'tenure_monthz > 3 and ", 1))
    reply = admin.ReloadRules(pb.ReloadRulesRequest(), timeout=10)
    assert not reply.applied and reply.ruleset_version == before
    assert any("catalog.yaml:" in e and "tenure_months" in e for e in reply.errors), reply.errors
    assert decide(channel, customer_id="C0000001").ruleset_version == before

    catalog.write_text(good + "\n# a harmless edit changes the version\n")
    reply = admin.ReloadRules(pb.ReloadRulesRequest(), timeout=10)
    assert reply.applied and reply.ruleset_version != before
    assert decide(channel, customer_id="C0000001").ruleset_version == reply.ruleset_version
