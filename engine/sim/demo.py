"""Demo data and the demo model: created on first ``nba serve`` when missing.

The telco demo (``rules/``) has its synthetic world (``engine.sim.world``); any other domain.yaml gets
customers and a history from the domain-agnostic generator (``engine.sim.datagen``), imported and trained
on the way a business's own files would be (``nba import customers``, ``nba train --from-history``)."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pyarrow as pa

from engine.config import DEMO_CUSTOMERS
from engine.errors import NbaError
from engine.features import FeatureSchema
from engine.models.registry import ModelRegistry
from engine.rules.model import RuleSet
from engine.sim import datagen
from engine.sim.telco import SCHEMA
from engine.sim.training_data import train
from engine.sim.world import ActionLike, generate, population_seeds
from engine.store.profiles import META_KEY, ProfileStore

log = logging.getLogger(__name__)

TRAIN_CUSTOMERS = 50_000
WORLD_SEED = 7
GENERATED_AT = 1_780_000_000.0  # 2026-05-28: generated dates and histories lie before it, whatever today is


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


def seeded_customers(store: ProfileStore, schema: FeatureSchema = SCHEMA) -> int:
    meta = cast("dict[bytes, bytes]", store.client.hgetall(META_KEY))
    if meta.get(b"schema_fingerprint", b"").decode() != schema.fingerprint():
        return 0
    return int(meta.get(b"seeded_customers", 0))


def is_telco(ruleset: RuleSet) -> bool:
    """Whether ``ruleset`` declares the telco demo's domain (its synthetic world applies)."""
    return ruleset.schema.fingerprint() == SCHEMA.fingerprint()


def seed_for(store: ProfileStore, ruleset: RuleSet, customers: int = DEMO_CUSTOMERS,
             world_seed: int = WORLD_SEED) -> float:
    """Demo customers of ``ruleset``'s domain: the telco world's, or generated ones; seconds taken."""
    return (seed(store, customers, world_seed) if is_telco(ruleset)
            else seed_generated(store, ruleset, customers, world_seed))


def train_for(registry: ModelRegistry, store: ProfileStore, ruleset: RuleSet,
              customers: int = DEMO_CUSTOMERS) -> tuple[str, dict]:
    """The demo model of ``ruleset``'s domain, promoted: on the telco world, or on a generated history."""
    return (train_demo(registry, ruleset.actions) if is_telco(ruleset)
            else train_generated(registry, store, ruleset, customers))


def _generated(schema: FeatureSchema, customers: int, world_seed: int) -> pa.Table:
    return datagen.customers(schema, customers, world_seed, now=GENERATED_AT)


def seed_generated(store: ProfileStore, ruleset: RuleSet, customers: int = DEMO_CUSTOMERS,
                   world_seed: int = WORLD_SEED) -> float:
    """Generated customers of ``ruleset``'s domain.yaml (C0000000...), imported like a business's file."""
    from engine.store.bulk import import_customers

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nba-demo-") as tmp:
        path = datagen.write(_generated(ruleset.schema, customers, world_seed), Path(tmp) / "customers.parquet")
        report = import_customers(store, path, ruleset.schema)
    if report.rejected:
        raise NbaError("generated customers were rejected:\n" + report.render())
    store.client.hset(META_KEY, mapping={"schema": ruleset.schema.version,
                                         "schema_fingerprint": ruleset.schema.fingerprint(),
                                         "seeded_customers": customers, "world_seed": world_seed})
    return time.perf_counter() - started


def train_generated(registry: ModelRegistry, store: ProfileStore, ruleset: RuleSet, customers: int = DEMO_CUSTOMERS,
                    world_seed: int = WORLD_SEED, rounds: int = 100) -> tuple[str, dict]:
    """A first model of ``ruleset``'s domain from a generated history of the seeded customers (a demo: it
    learns on the customers it then decides for, so its metrics are no evaluation), promoted."""
    from engine.analytics.past import read_past, training_set
    from engine.models.training import fit

    table = _generated(ruleset.schema, customers, world_seed)
    with tempfile.TemporaryDirectory(prefix="nba-demo-") as tmp:
        path = datagen.write(datagen.history(ruleset.schema, ruleset.actions, table, 6, world_seed + 1, GENERATED_AT),
                             Path(tmp) / "history.parquet")
        past = read_past(path, ruleset, GENERATED_AT)
    booster, metrics, summary = fit(training_set(store, ruleset, past.offers, GENERATED_AT), rounds)
    version = registry.save(booster.model_to_string(), [a.id for a in ruleset.actions], metrics, summary)
    registry.promote(version)
    return version, metrics


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


def play_traffic(store: ProfileStore, rules_dir: Path, registry: ModelRegistry, decisions: int,
                 customers: int = DEMO_CUSTOMERS, world_seed: int = WORLD_SEED, seed: int = 0) -> dict[str, int]:
    """Demo traffic on ``store`` (``nba seed --decisions``): ``decisions`` one-action decisions for random
    demo customers on random channels through the real funnel, with the registry's models and
    experiment.yaml (its exploration included), recorded like production traffic; each presented action
    answered as the synthetic customer would, accepted with its true probability, else rejected."""
    import numpy as np

    from engine.decision.funnel import DecisionEngine
    from engine.decision.request import DecideInput
    from engine.live import Live
    from engine.models.experiment import load_model_set
    from engine.rules.runtime import load_and_compile
    from engine.sim.dynamics import REALISM, Population
    from engine.sim.telco import CHANNELS
    from engine.sim.world import customer_id
    from engine.store.decision_log import DecisionLog

    rules = load_and_compile(rules_dir)
    log = DecisionLog(store.client)
    accepted = 0
    try:
        engine = DecisionEngine(store, Live(rules), Live(load_model_set(registry)), log)
        pop = Population(generate(customers, world_seed), rules.ruleset.actions, REALISM["realistic"])
        rng = np.random.default_rng(seed)
        for _ in range(decisions):
            i, c = int(rng.integers(customers)), int(rng.integers(len(CHANNELS)))
            d = engine.decide(DecideInput(customer_id=customer_id(i), channel=CHANNELS[c], max_actions=1))
            for a in d.actions:
                p = float(pop.probability(i, [a.action_id], c, time.time(), False)[0])
                outcome = "accepted" if rng.random() < p else "rejected"
                engine.responses.record(d.decision_id, a.action_id, outcome)
                accepted += outcome == "accepted"
    finally:
        log.close()
        rules.close()
    return {"decisions": decisions, "accepted": accepted}
