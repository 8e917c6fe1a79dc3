import time

import numpy as np
import redis

from engine.sim.telco import NUMERIC, SCHEMA
from engine.sim.world import generate
from engine.store.profiles import ProfileStore, SchemaMismatch, profile_key, triggers_key


def test_profile_round_trip_in_one_pipeline(redis_url: str) -> None:
    store = ProfileStore.from_url(redis_url)
    original = generate(5).profile(3)
    store.save([original], SCHEMA)
    back = store.fetch(original.customer_id, SCHEMA)
    assert back.found
    np.testing.assert_array_equal(back.numeric, original.numeric)
    assert back.categorical == original.categorical
    assert back.sets == original.sets
    assert back.open_cases == original.open_cases


def test_unknown_customer_is_a_cold_start(redis_url: str) -> None:
    profile = ProfileStore.from_url(redis_url).fetch("nobody", SCHEMA)
    assert not profile.found
    assert profile.numeric.shape == (len(NUMERIC),) and not profile.numeric.any()


def test_keys_of_a_customer_share_a_hash_tag() -> None:
    for key in (profile_key("C1"), triggers_key("C1")):
        assert "{c:C1}" in key


def test_only_unexpired_triggers_are_active(redis_url: str) -> None:
    store = ProfileStore.from_url(redis_url)
    store.set_trigger("C9", "callback_requested", ttl_seconds=60)
    store.set_trigger("C9", "old", ttl_seconds=0.05)
    time.sleep(0.1)
    assert store.fetch("C9", SCHEMA).triggers == frozenset({"callback_requested"})
    assert store.client.pttl(triggers_key("C9")) > 50_000  # kept alive by the latest trigger


def test_profile_of_another_schema_version_is_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(profile_key("C2"), mapping={"schema": 999, "num": b"\0" * 8})
    try:
        ProfileStore(client).fetch("C2", SCHEMA)
    except SchemaMismatch as exc:
        assert "packing version 999" in str(exc)
    else:
        raise AssertionError("a profile of another schema version was read")
