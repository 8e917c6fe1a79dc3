"""Demo data and the demo model: created on first ``nba serve`` when missing."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import cast

from engine.config import DEMO_CUSTOMERS
from engine.models.registry import ModelRegistry
from engine.sim.telco import SCHEMA
from engine.sim.training_data import train
from engine.sim.world import ActionLike, generate, population_seeds
from engine.store.profiles import META_KEY, ProfileStore

log = logging.getLogger(__name__)

TRAIN_CUSTOMERS = 50_000
WORLD_SEED = 7


def seed(store: ProfileStore, customers: int = DEMO_CUSTOMERS, world_seed: int = WORLD_SEED,
         batch: int = 2_000) -> float:
    """Write ``customers`` synthetic profiles (C0000000...) to Redis; returns seconds taken."""
    started = time.perf_counter()
    world = generate(customers, world_seed)
    profiles = list(world.profiles())
    for i in range(0, len(profiles), batch):
        store.save(profiles[i: i + batch], SCHEMA)
    store.client.hset(META_KEY, mapping={
        "schema": SCHEMA.version, "schema_fingerprint": SCHEMA.fingerprint(),
        "seeded_customers": customers, "world_seed": world_seed,
    })
    return time.perf_counter() - started


def seeded_customers(store: ProfileStore) -> int:
    meta = cast("dict[bytes, bytes]", store.client.hgetall(META_KEY))
    if meta.get(b"schema_fingerprint", b"").decode() != SCHEMA.fingerprint():
        return 0
    return int(meta.get(b"seeded_customers", 0))


def train_demo(registry: ModelRegistry, actions: Sequence[ActionLike], customers: int = TRAIN_CUSTOMERS,
               world_seed: int = WORLD_SEED, rounds: int = 200, promote: bool = True) -> tuple[str, dict]:
    """Train on simulated responses from the synthetic world, store the model, make it champion. The
    training customers are another population of the same world (same response laws) than the demo
    customers that ``seed`` writes, so the model is never trained on the customers it decides for."""
    world = generate(customers, population_seeds(world_seed)[0], laws=world_seed)
    booster, metrics, summary = train(world, actions, rounds=rounds)
    version = registry.save(booster.model_to_string(), [a.id for a in actions], metrics, summary)
    if promote:
        registry.promote(version)
    return version, metrics
