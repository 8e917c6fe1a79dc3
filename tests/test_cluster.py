"""A real local Redis Cluster (3 masters, 3 replicas, ``redis-cli --cluster create``): the client builder,
the per-customer keys on one slot, and a master's failover under the same client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from engine.sim.telco import NUMERIC, SCHEMA
from engine.store.profiles import Profile, ProfileStore, RedisUnavailable, is_cluster, profile_key, triggers_key
from engine.store.redis_cluster import LocalCluster

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def _profile(i: int) -> Profile:
    p = Profile.cold(f"K{i:05d}", SCHEMA)
    p.numeric[:] = [float(i % 7)] * len(NUMERIC)
    p.categorical["segment"] = "consumer"
    return p


def test_a_customer_s_keys_share_a_slot_and_the_store_works_on_the_cluster(cluster: LocalCluster) -> None:
    store = ProfileStore.open(cluster.url)
    assert is_cluster(store.client)
    store.save([_profile(i) for i in range(300)], SCHEMA)
    slots = {store.client.keyslot(profile_key(f"K{i:05d}")) for i in range(300)}
    assert len(slots) > 100  # spread over the nodes
    for i in range(300):
        cid = f"K{i:05d}"
        assert store.client.keyslot(profile_key(cid)) == store.client.keyslot(triggers_key(cid))
        store.set_trigger(cid, "callback_requested", 60)
        assert store.fetch(cid, SCHEMA).numeric[0] == pytest.approx(i % 7)
        assert "callback_requested" in store.fetch(cid, SCHEMA).triggers


def test_a_killed_master_s_replica_takes_over_under_the_same_client(cluster: LocalCluster) -> None:
    store = ProfileStore.open(cluster.url)
    store.save([_profile(i) for i in range(300, 400)], SCHEMA)
    victim = cluster.master_ports()[0]
    node = cluster.node(victim)
    on_victim = [f"K{i:05d}" for i in range(300, 400)
                 if node.cluster("keyslot", profile_key(f"K{i:05d}")) in _slots(node)]
    assert on_victim
    node.execute_command("WAIT", 1, 2000)  # its replica has every write before the kill
    cluster.kill(victim)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert store.fetch(on_victim[0], SCHEMA).numeric[0] == pytest.approx(int(on_victim[0][1:]) % 7)
            break
        except redis.exceptions.RedisError:
            assert time.monotonic() < deadline, "no replica took over"
            time.sleep(0.2)
    for cid in on_victim:
        assert store.fetch(cid, SCHEMA).categorical["segment"] == "consumer"


def _slots(node: redis.Redis) -> set[int]:
    me = next(n for n in node.cluster("nodes").values() if "myself" in n["flags"])
    return {s for lo, hi in (r if len(r) == 2 else (r[0], r[0]) for r in me["slots"]) for s in range(int(lo), int(hi) + 1)}


def test_a_cluster_url_without_nodes_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RedisUnavailable, match="no host:port"):
        ProfileStore.open("redis+cluster://:secret@")
    with pytest.raises(RedisUnavailable, match=r"\*\*\*"):
        ProfileStore.open("redis+cluster://:secret@127.0.0.1:1")


def test_a_master_killed_under_load_the_service_recovers_and_keeps_every_acknowledged_response(
        tmp_path: Path, models_dir: Path) -> None:
    """Decide + RecordResponse calls go on while a master is SIGKILLed: calls fail or degrade (within their
    deadline) until its replica is promoted, then the same server answers normally again; every response
    it acknowledged is in its decision record and in the responses stream."""
    import random
    import shutil

    import grpc
    from grpc_health.v1 import health_pb2

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.config import Config
    from engine.decision.contact import decision_key
    from engine.serving.app import App
    from engine.serving.server import build_server
    from engine.store.profiles import RESPONSES_STREAM
    from engine.store.streams import xrange_all

    from .conftest import RULES_DIR

    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    with LocalCluster(tmp_path / "cluster") as cluster:
        app = App(Config(redis_url=cluster.url, rules_dir=rules_dir, models_dir=models_dir, demo_customers=300,
                         metrics_port=0)).start()
        server, port, health = build_server(app, "127.0.0.1:0")
        server.start()
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.DecisionServiceStub(channel)
        victim = cluster.master_ports()[0]
        victim_slots = _slots(cluster.node(victim))
        customers = [f"C{i:07d}" for i in range(300)]
        on_victim = [c for c in customers if cluster.node(victim).cluster("keyslot", f"{{c:{c}}}") in victim_slots]
        acked: list[tuple[str, str, str, str]] = []
        outcomes: dict[str, int] = {}
        rng = random.Random(7)

        def one_call(cid: str) -> pb.DecideResponse | None:
            """A decision and a response to its first action (retried like a client would, within 2 s)."""
            try:
                reply = stub.Decide(pb.DecideRequest(customer_id=cid, channel=pb.CHANNEL_CALL_CENTER), timeout=0.5)
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                outcomes[exc.code().name] = outcomes.get(exc.code().name, 0) + 1
                return None
            outcomes["degraded" if reply.degraded else "ok"] = outcomes.get("degraded" if reply.degraded else "ok", 0) + 1
            if not reply.actions or reply.degraded:
                return reply
            action, outcome = reply.actions[0].action_id, rng.choice([pb.OUTCOME_ACCEPTED, pb.OUTCOME_REJECTED])
            give_up = time.monotonic() + 2
            while time.monotonic() < give_up:
                try:
                    r = stub.RecordResponse(pb.RecordResponseRequest(decision_id=reply.decision_id, action_id=action,
                                                                     outcome=outcome), timeout=0.5)
                    acked.append((reply.decision_id, action, pb.Outcome.Name(outcome), r.response_id))
                    break
                except grpc.RpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                    time.sleep(0.05)
            return reply

        try:
            for cid in customers[:40]:  # before
                one_call(cid)
            before = len(acked)
            assert before > 20
            cluster.kill(victim)
            killed = time.monotonic()
            recovered, troubled = None, 0
            while time.monotonic() - killed < 40:
                reply = one_call(rng.choice(on_victim))
                if reply is not None and reply.actions and not reply.degraded and len(acked) > before:
                    recovered = time.monotonic() - killed
                    break
                troubled += 1
            assert recovered is not None, "the service did not recover within 40 s of the kill"
            assert troubled > 0  # the kill was felt: calls failed or degraded until the promotion
            print(f"recovered {recovered:.2f} s after the kill; {troubled} calls failed or degraded meanwhile; "
                  f"Decide outcomes {outcomes}")
            for cid in customers[40:120]:  # after: everything normal again, on every master
                reply = one_call(cid)
                assert reply is not None and not reply.degraded, cid
            client = app.store.client
            streamed = {e[0].decode() for e in xrange_all(client, RESPONSES_STREAM)}
            for decision_id, action, outcome, response_id in acked:
                field = f"r:{action}:{outcome.removeprefix('OUTCOME_').lower()}"
                assert client.hget(decision_key(decision_id), field) == response_id.encode(), (decision_id, field)
                assert response_id in streamed, response_id
        finally:
            channel.close()
            server.stop(0).wait()
            app.close()
