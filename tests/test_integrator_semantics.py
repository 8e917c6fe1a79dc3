"""What integrators rely on (issue 28): unknown, malformed and expired decision ids told apart; outcomes of
one presented action that contradict each other refused; a changed context decided anew within an
interaction; one wording for every bad timestamp; the nba command's JSON with the proto names, and quiet
under a closed pipe. Real gRPC server on a real port, real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.decision.contact import new_decision_id
from engine.decision.history import read_history
from engine.decision.responses import DECISIONS_SINCE
from engine.serving.app import App
from engine.store.profiles import META_KEY, RESPONSES_STREAM

from .conftest import REPO, served_app
from .test_interactions import customers, decide, ids, impressions, offer_ids, respond

DAY = 86_400


@pytest.fixture()
def served(redis_url: str, models_dir: Path, tmp_path: Path) -> Iterator[tuple[App, grpc.Channel, str]]:
    """The demo rules served as ``nba serve`` does on loopback: (app, channel, address)."""
    with served_app(redis_url, models_dir, tmp_path / "rules", rules_watch_seconds=0) as (app, address):
        channel = grpc.insecure_channel(address)
        yield app, channel, address
        channel.close()


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo")


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _respond(channel: grpc.Channel, decision_id: str, action_id: str = "x",
             outcome: int = pb.OUTCOME_CLICKED) -> grpc.RpcError:
    return _refused(lambda: respond(channel, decision_id, action_id, outcome))


# --- decision ids ------------------------------------------------------------------------------------

def test_malformed_unknown_and_expired_decision_ids_are_told_apart(served) -> None:
    app, channel, _ = served
    now = time.time()
    for malformed in ("nope", "0" * 31, "z" * 32):
        err = _respond(channel, malformed)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _reason(err) == "DECISION_ID_MALFORMED"
        assert err.details().startswith("decision_id: ") and "not a decision id of this service" in err.details()
    unknown = {
        "0" * 32: "is before this service's first decision",  # 1970: before the store held any decision
        new_decision_id(now + 3 * DAY, "C0000001"): "is ahead of the server clock",
        new_decision_id(now, "C0000001"): "within the response window",  # never issued, yet recent
    }
    for decision_id, words in unknown.items():
        err = _respond(channel, decision_id)
        assert err.code() == grpc.StatusCode.NOT_FOUND and _reason(err) == "DECISION_UNKNOWN", err.details()
        assert err.details().startswith(f"decision_id: no decision {decision_id} was issued") and words in err.details()
    old = new_decision_id(now - 8 * DAY, "C0000001")
    err = _respond(channel, old)  # this store began deciding just now: no decision of 8 days ago was issued
    assert err.code() == grpc.StatusCode.NOT_FOUND and _reason(err) == "DECISION_UNKNOWN"
    # a store that has served decisions for a month: the same id is one that has expired
    app.store.client.hset(META_KEY, DECISIONS_SINCE, int((now - 30 * DAY) * 1000))
    err = _respond(channel, old)
    assert err.code() == grpc.StatusCode.NOT_FOUND and _reason(err) == "DECISION_EXPIRED"
    assert err.details() == (f"decision_id: decision {old} of "
                             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(int(old[:12], 16) / 1000))} has "
                             "expired: responses are accepted for 7 days (contact.yaml responses.accept_days)")
    assert _reason(_respond(channel, new_decision_id(now - 40 * DAY, "C0000001"))) == "DECISION_UNKNOWN"
    decided = decide(channel, "C0000042", pb.CHANNEL_CALL_CENTER)
    err = _respond(channel, decided.decision_id, "never-offered")  # a real decision: the action is at fault
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details().startswith("action_id:")


# --- contradicting outcomes --------------------------------------------------------------------------

def _responses(app: App, decision_id: str) -> list[tuple[str, str]]:
    client = app.store.client
    keys = [k.decode() for k in client.scan_iter(f"{RESPONSES_STREAM}*", _type="stream")]
    return sorted((f[b"action_id"].decode(), f[b"outcome"].decode()) for k in keys
                  for _, f in client.xrange(k) if f[b"decision_id"].decode() == decision_id)


@pytest.mark.both_redis
def test_outcomes_of_one_action_progress_to_one_final_outcome(served) -> None:
    app, channel, _ = served
    cid = next(c for c in customers(control=False, n=100, start=400)
               if len(acts := decide(channel, c, pb.CHANNEL_CALL_CENTER, preview=True).actions) >= 3
               and acts[0].type != pb.ACTION_TYPE_SERVICE)  # an offer's acceptance is kept (a limit counts it)
    reply = decide(channel, cid, pb.CHANNEL_CALL_CENTER)
    first, second, third = (a.action_id for a in reply.actions[:3])
    did = reply.decision_id
    # a progression: clicked, then accepted; the same outcome again is the same response
    respond(channel, did, first, pb.OUTCOME_CLICKED)
    accepted = respond(channel, did, first, pb.OUTCOME_ACCEPTED)
    assert respond(channel, did, first, pb.OUTCOME_ACCEPTED).response_id == accepted.response_id
    recorded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(accepted.response_id.split("-")[0]) / 1000))
    for contradicting in (pb.OUTCOME_REJECTED, pb.OUTCOME_IGNORED):
        err = _respond(channel, did, first, contradicting)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and _reason(err) == "OUTCOME_CONFLICT"
        name = pb.Outcome.Name(contradicting).removeprefix("OUTCOME_")
        assert err.details() == (f"outcome: {name} contradicts ACCEPTED, which was recorded at {recorded_at} "
                                 f"(response {accepted.response_id}) for action {first} of decision {did}; accepted "
                                 "and rejected are final and exclude each other, and ignored cannot follow them")
    respond(channel, did, first, pb.OUTCOME_IMPRESSION)  # a late impression report contradicts nothing
    # ignored, then a late final outcome: recorded; then the other final outcome is refused
    respond(channel, did, second, pb.OUTCOME_IGNORED)
    respond(channel, did, second, pb.OUTCOME_REJECTED)
    err = _respond(channel, did, second, pb.OUTCOME_ACCEPTED)
    assert _reason(err) == "OUTCOME_CONFLICT" and "ACCEPTED contradicts REJECTED" in err.details()
    assert _responses(app, did) == sorted([(first, "clicked"), (first, "accepted"), (first, "impression"),
                                           (second, "ignored"), (second, "rejected")])
    kinds = {(c.kind, c.action) for c in read_history(app.store.client, cid)}
    assert ("a", first) in kinds and ("r", first) not in kinds and ("a", second) not in kinds
    # racing final outcomes: one is recorded, the other refused
    answers: dict[int, object] = {}

    def send(outcome: int) -> None:
        try:
            answers[outcome] = respond(channel, did, third, outcome)
        except grpc.RpcError as exc:
            answers[outcome] = exc

    racers = [threading.Thread(target=send, args=(o,)) for o in (pb.OUTCOME_ACCEPTED, pb.OUTCOME_REJECTED)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    refused = [a for a in answers.values() if isinstance(a, grpc.RpcError)]
    assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len([o for a, o in _responses(app, did) if a == third]) == 1


# --- a changed context within an interaction --------------------------------------------------------

def test_a_changed_context_is_decided_anew_within_the_interaction(served) -> None:
    app, channel, _ = served
    client = app.store.client
    plans = {a.id for a in app.rules.current.ruleset.actions if a.group == "mobile_plan"}
    cid = next(c for c in customers(control=False, n=200, start=500)
               if set(ids(decide(channel, c, pb.CHANNEL_CALL_CENTER, preview=True))) & plans)
    ask = {"touchpoint": "agent.desktop", "interaction_id": "call-28", "explain": True}
    first = decide(channel, cid, pb.CHANNEL_CALL_CENTER, **ask)
    assert not first.repeat and set(ids(first)) & plans  # an up-sell of a plan
    counted = len(impressions(client, cid))
    assert counted == len(offer_ids(first.actions))
    cancel = decide(channel, cid, pb.CHANNEL_CALL_CENTER, context={"intent": "cancel"}, **ask)
    assert not cancel.repeat and cancel.decision_id != first.decision_id
    assert not set(ids(cancel)) & plans  # no up-sell for a caller who wants to cancel
    assert not [f for f in cancel.funnel if f.stage == "one_voice"]  # the earlier context does not hold it back
    # the new decision is presented like any other: its actions count
    assert len(impressions(client, cid)) == counted + len(offer_ids(cancel.actions))
    again = decide(channel, cid, pb.CHANNEL_CALL_CENTER, context={"intent": "cancel"}, **ask)
    assert again.repeat and again.decision_id == cancel.decision_id and ids(again) == ids(cancel)
    earlier = decide(channel, cid, pb.CHANNEL_CALL_CENTER, **ask)
    assert earlier.repeat and earlier.decision_id == first.decision_id and ids(earlier) == ids(first)
    assert len(impressions(client, cid)) == counted + len(offer_ids(cancel.actions))  # repeats count nothing
    two = {"intent": "cancel", "reason": "price"}
    one = decide(channel, cid, pb.CHANNEL_CALL_CENTER, context=two, **ask)
    other = decide(channel, cid, pb.CHANNEL_CALL_CENTER, context=dict(reversed(two.items())), **ask)
    assert not one.repeat and other.repeat and other.decision_id == one.decision_id


# --- timestamps --------------------------------------------------------------------------------------

def test_every_rpc_words_a_bad_timestamp_the_same_way(served) -> None:
    _, channel, _ = served
    stub, profiles = pb_grpc.DecisionServiceStub(channel), pb_grpc.ProfileServiceStub(channel)
    reply = decide(channel, "C0000042", pb.CHANNEL_CALL_CENTER)
    ahead = int(time.time()) + 3600
    ahead_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ahead))

    def response(ts: Timestamp) -> object:
        return stub.RecordResponse(pb.RecordResponseRequest(decision_id=reply.decision_id,
                                                            action_id=reply.actions[0].action_id,
                                                            outcome=pb.OUTCOME_CLICKED, timestamp=ts), timeout=10)

    def event(ts: Timestamp) -> object:
        return stub.PublishEvent(pb.PublishEventRequest(event_id=f"ts-{ts.seconds}-{ts.nanos}", customer_id="C0000042",
                                                        type="payment_failed", attributes={"amount": "1"},
                                                        timestamp=ts), timeout=10)

    def profile(ts: Timestamp) -> object:
        return profiles.UpdateProfile(pb.UpdateProfileRequest(
            customer_id="TS-1", attributes={"last_visit": pb.AttributeValue(date=ts)}), timeout=10)

    bad_nanos = "nanos 1,000,000,000 is not within 0 to 999,999,999"
    bad_seconds = ("seconds 253,402,300,800 is not within years 0001 to 9999 "
                   "(-62,135,596,800 to 253,402,300,799)")
    cases = [(rpc, field, ts, words) for rpc, field in ((response, "timestamp"), (event, "timestamp"),
                                                        (profile, "attributes.last_visit.date"))
             for ts, words in ((Timestamp(seconds=ahead - 3600, nanos=1_000_000_000), bad_nanos),
                               (Timestamp(seconds=253_402_300_800), bad_seconds))]
    cases += [(rpc, "timestamp", Timestamp(seconds=ahead), f"{ahead_text} is ")
              for rpc in (response, event)]
    for rpc, field, ts, words in cases:
        err = _refused(lambda rpc=rpc, ts=ts: rpc(ts))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith(f"{field}: {words}"), err.details()
    for rpc in (response, event):  # ahead of the clock: one wording, the allowance named
        err = _refused(lambda rpc=rpc: rpc(Timestamp(seconds=ahead)))
        assert err.details().endswith(" s ahead of the server clock (at most 300 s)"), err.details()
        assert "3,5" in err.details() or "3,6" in err.details()


# --- the nba command ---------------------------------------------------------------------------------

def _nba(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, env=env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def test_nba_json_uses_the_proto_names_and_a_closed_pipe_ends_quietly(served) -> None:
    _, channel, address = served
    out = _nba("decide", "C0000042", "--channel", "call_center", "--address", address, "--json", "--explain")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert {"decision_id", "ruleset_version", "model_version", "decided_at"} <= set(reply), sorted(reply)
    assert {"action_id", "type_name"} <= set(reply["actions"][0]) and "action_id" in reply["funnel"][0]
    assert not [k for k in _keys(reply) if any(c.isupper() for c in k)]
    event = _nba("event", "C0000042", "contact_request", "topic=billing", "--address", address, "--json")
    assert event.returncode == 0 and "stream_id" in json.loads(event.stdout), event.stderr
    # a reader that went away before the command wrote: no traceback, the exit status of SIGPIPE
    for args in (("decide", "C0000042", "--channel", "call_center", "--address", address, "--json"),
                 ("decide", "--help")):
        read, write = os.pipe()
        os.close(read)
        try:
            done = _nba(*args, stdout=write)
        finally:
            os.close(write)
        # argparse's help swallows the error itself (and exits 0)
        assert done.returncode == (0 if "--help" in args else 141), (args, done.returncode, done.stderr)
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    # and one that closes after the first line, as head -1 does
    with subprocess.Popen([sys.executable, "-m", "engine.cli", "decide", "C0000042", "--channel", "call_center",
                           "--address", address, "--json", "--explain"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().strip() == b"{"
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) in (0, 141) and "Traceback" not in err, err


def _keys(value: object) -> list[str]:
    """Every key of a JSON document, nested (not those of free-form maps: treatment content)."""
    keys: list[str] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            keys += [key, *([] if key == "content" else _keys(inner))]
    elif isinstance(value, list):
        for inner in value:
            keys += _keys(inner)
    return keys
