"""A real local Redis Cluster (3 masters, 3 replicas, ``redis-cli --cluster create``): the client builder,
the per-customer keys on one slot, and a master's failover under the same client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from engine.features import NUMERIC
from engine.store.profiles import Profile, ProfileStore, RedisUnavailable, is_cluster, profile_key, triggers_key
from engine.store.redis_cluster import LocalCluster

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def _profile(i: int) -> Profile:
    p = Profile.cold(f"K{i:05d}")
    p.numeric[:] = [float(i % 7)] * len(NUMERIC)
    p.categorical["segment"] = "consumer"
    return p


def test_a_customer_s_keys_share_a_slot_and_the_store_works_on_the_cluster(cluster: LocalCluster) -> None:
    store = ProfileStore.open(cluster.url)
    assert is_cluster(store.client)
    store.save([_profile(i) for i in range(300)])
    slots = {store.client.keyslot(profile_key(f"K{i:05d}")) for i in range(300)}
    assert len(slots) > 100  # spread over the nodes
    for i in range(300):
        cid = f"K{i:05d}"
        assert store.client.keyslot(profile_key(cid)) == store.client.keyslot(triggers_key(cid))
        store.set_trigger(cid, "callback_requested", 60)
        assert store.fetch(cid).numeric[0] == pytest.approx(i % 7)
        assert "callback_requested" in store.fetch(cid).triggers


def test_a_killed_master_s_replica_takes_over_under_the_same_client(cluster: LocalCluster) -> None:
    store = ProfileStore.open(cluster.url)
    store.save([_profile(i) for i in range(300, 400)])
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
            assert store.fetch(on_victim[0]).numeric[0] == pytest.approx(int(on_victim[0][1:]) % 7)
            break
        except redis.exceptions.RedisError:
            assert time.monotonic() < deadline, "no replica took over"
            time.sleep(0.2)
    for cid in on_victim:
        assert store.fetch(cid).categorical["segment"] == "consumer"


def _slots(node: redis.Redis) -> set[int]:
    me = next(n for n in node.cluster("nodes").values() if "myself" in n["flags"])
    return {s for lo, hi in (r if len(r) == 2 else (r[0], r[0]) for r in me["slots"]) for s in range(int(lo), int(hi) + 1)}


def test_a_cluster_url_without_nodes_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RedisUnavailable, match="no host:port"):
        ProfileStore.open("redis+cluster://:secret@")
    with pytest.raises(RedisUnavailable, match=r"\*\*\*"):
        ProfileStore.open("redis+cluster://:secret@127.0.0.1:1")
