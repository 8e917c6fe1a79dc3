"""Composition of the service: Redis (embedded or REDIS_URL), demo data, rules, model, engine."""

from __future__ import annotations

import logging
import threading

from engine import demo, metrics
from engine.config import Config
from engine.decision import DecisionEngine
from engine.decision_log import DecisionLog
from engine.live import Live
from engine.redis_embedded import EmbeddedRedis
from engine.registry import ModelRegistry
from engine.rules.check import RuleErrors, load_and_compile
from engine.store import ProfileStore

log = logging.getLogger(__name__)


class App:
    """Owns the long-lived parts; ``start`` brings them up, ``close`` tears them down."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.redis: EmbeddedRedis | None = None
        self.store: ProfileStore
        self.registry = ModelRegistry(config.models_dir)
        self._reload_lock = threading.Lock()

    def start(self) -> "App":
        cfg = self.config
        url = cfg.redis_url
        if url is None:
            self.redis = EmbeddedRedis(cfg.data_dir / "redis").start()
            url = self.redis.url
            log.info("embedded redis-server pid %s on %s (data in %s)", self.redis.pid, url, cfg.data_dir / "redis")
        self.store = ProfileStore.from_url(url)
        rules = load_and_compile(cfg.rules_dir)
        if cfg.demo:
            self._ensure_demo(rules.ruleset.actions)
        self.rules = Live(rules, retire=lambda r: r.close())
        self.model = Live(self.registry.load())
        self.decision_log = DecisionLog(self.store.client)
        self.engine = DecisionEngine(self.store, self.rules, self.model, self.decision_log)
        self.engine.warmup()
        self._publish_versions()
        return self

    def _ensure_demo(self, catalog: list) -> None:
        if demo.seeded_customers(self.store) == 0:
            log.info("no demo customers: seeding %d", self.config.demo_customers)
            seconds = demo.seed(self.store, self.config.demo_customers)
            log.info("seeded %d customers in %.1fs", self.config.demo_customers, seconds)
        if self.registry.champion() is None:
            log.info("no champion model in %s: training the demo model", self.registry.dir)
            version, scores = demo.train_demo(self.registry, catalog)
            log.info("trained %s: %s", version, scores)

    def _publish_versions(self) -> None:
        rules, model = self.rules.current, self.model.current
        metrics.RULESET_INFO.info({"version": rules.version})
        metrics.MODEL_INFO.info({"version": model.version})
        metrics.CATALOG_SIZE.set(len(rules.ruleset.actions))

    def reload_rules(self) -> tuple[bool, str, list[str]]:
        """Compile the rule files aside and swap them in; on errors the live set stays."""
        with self._reload_lock:
            try:
                new = load_and_compile(self.config.rules_dir)
            except RuleErrors as exc:
                metrics.RULE_RELOADS.labels("refused").inc()
                errors = [str(e) for e in exc.errors]
                log.warning("rules refused, %s stays live:\n%s", self.rules.current.version, "\n".join(errors))
                return False, self.rules.current.version, errors
            self.rules.swap(new)
            metrics.RULE_RELOADS.labels("applied").inc()
            self._publish_versions()
            log.info("rules %s live", new.version)
            return True, new.version, []

    def close(self) -> None:
        if getattr(self, "decision_log", None):
            self.decision_log.close()
        if getattr(self, "store", None):
            self.store.client.close()
        if self.redis:
            self.redis.stop()
            self.redis = None
