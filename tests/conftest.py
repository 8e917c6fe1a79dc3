"""Shared fixtures: a real redis-server on an ephemeral loopback port, rules, a small trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from engine.redis_embedded import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "rules"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedRedis:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: EmbeddedRedis) -> str:
    """A clean database for each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding a small demo model trained on the demo catalog (a few seconds)."""
    from engine import demo
    from engine.registry import ModelRegistry
    from engine.rules.check import load_and_compile

    root = tmp_path_factory.mktemp("models")
    rules = load_and_compile(RULES_DIR)
    try:
        demo.train_demo(ModelRegistry(root), rules.ruleset.actions, customers=6_000, rounds=60)
    finally:
        rules.close()
    return root
