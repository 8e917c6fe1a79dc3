"""Composition of the service: Redis (embedded or REDIS_URL), demo data, rules, model, engine."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine import metrics
from engine.authoring.check import RuleError, RuleErrors, prepare
from engine.authoring.contactscope import unkept_contacts
from engine.authoring.watch import RuleWatcher, files_digest
from engine.config import Config
from engine.decision.campaigns import CampaignGauges
from engine.decision.funnel import DecisionEngine
from engine.decision.reservations import ReservationReleaser
from engine.events.processor import EventProcessor
from engine.events.stream import EventStreamConsumer
from engine.events.timers import TimerPoller
from engine.live import Live
from engine.models.experiment import ModelSet, ModelWatcher, load_model_set
from engine.models.exploration import ExplorationCounts, Explorer
from engine.models.registry import NO_MODEL, ModelRefused, ModelRegistry, no_model
from engine.rules.domain import DOMAIN_FILE
from engine.rules.loader import rules_version
from engine.rules.model import RuleSet
from engine.rules.runtime import CompiledRules
from engine.serving.health import RedisOutage, outage_or_raise
from engine.sim import demo
from engine.store.audit import audit
from engine.store.decision_log import DecisionLog
from engine.store.profiles import ProfileStore, RedisUnavailable
from engine.store.redis_acl import ADMIN_USER, SERVICE_USER
from engine.store.redis_embedded import EmbeddedRedis, redis_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RulesRefused:
    """A reload of the rule files that was refused: the previous rules stayed live."""

    at: float  # time.time()
    version: str  # the version the refused files would have had
    files_digest: str  # engine.authoring.watch.files_digest of them
    errors: tuple[str, ...]  # file:line:col: message


def open_redis(cfg: Config) -> tuple[EmbeddedRedis | None, str]:
    """REDIS_URL when configured, else an embedded redis-server (ACL users with passwords) in the data
    directory, whose admin URL becomes ``cfg.redis_admin_url``. The URL returned is the service user's;
    clients on it: ``ProfileStore.open(url, cfg)``, which checks that Redis accepts us."""
    server, url = redis_for(cfg)
    if server is not None:
        log.info("embedded redis-server pid %s on 127.0.0.1:%s (data in %s; service user %r, password in "
                 "redis.password; admin user %r, password in redis.admin.password)",
                 server.pid, server.port, server.data_dir, SERVICE_USER, ADMIN_USER)
    elif cfg.redis_admin_url is None:
        log.info("no REDIS_ADMIN_URL: persistence steps after an erasure (AOF rewrite) are left to the operator")
    return server, url


def ensure_demo(store: ProfileStore, registry: ModelRegistry, ruleset: RuleSet, customers: int) -> None:
    """Seed demo customers and train the demo model when they are missing: the telco world for the telco
    demo's domain.yaml, generated customers and history for any other."""
    if demo.seeded_customers(store, ruleset.schema) == 0:
        log.info("no demo customers: seeding %d", customers)
        seconds = demo.seed_for(store, ruleset, customers)
        log.info("seeded %d customers in %.1fs", customers, seconds)
    problem = registry.champion_problem()
    if problem is not None:
        log.info("%s: training the demo model", problem)
        version, scores = demo.train_for(registry, store, ruleset, customers)
        log.info("trained %s: %s", version, {k: v for k, v in scores.items() if not isinstance(v, dict)})


class App:
    """Owns the long-lived parts; ``start`` brings them up, ``close`` tears them down. ``clock``: the
    time of decisions, events and timers (tests move it)."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.redis: EmbeddedRedis | None = None
        self.store: ProfileStore
        self.registry: ModelRegistry
        self._reload_lock = threading.Lock()
        self.privacy_jobs: Any = None  # serving.privacy_jobs.PrivacyJobs, made on the first privacy call
        self.watcher: RuleWatcher | None = None
        self.rules_digest = ""  # files_digest of the rule files as the live rules were read
        self.rules_refused: RulesRefused | None = None  # the last refused reload since rules last went live
        self.redis_outage: RedisOutage | None = None  # REDIS_URL could not be reached at start
        self._after_redis: list[Callable[[], object]] = []  # what waits for Redis to answer (redis_reachable)

    def start(self, redis_outage_ok: bool = False) -> App:
        """``redis_outage_ok``: an external REDIS_URL that cannot be reached does not stop the start (a wrong
        password, a failed TLS handshake or a bad URL still do): decisions are answered degraded, and what
        needs Redis to start waits for ``redis_reachable``. The embedded redis-server must always answer."""
        cfg = self.config
        self.redis, url = open_redis(cfg)
        self.redis_url = url  # the service user's, for the archive writer's own client (serve.py)
        # the one client of this process (decisions, events, timers, streams): a wrong password, an
        # unreachable Redis or a failed TLS handshake stops the start here with one RedisUnavailable line
        name = "REDIS_URL" if self.redis is None else "embedded redis-server"
        try:
            self.store = ProfileStore.open(url, cfg, name)
        except RedisUnavailable as exc:
            if not redis_outage_ok or self.redis is not None:
                raise
            self.redis_outage = outage_or_raise(exc)
            log.warning("%s: starting anyway, answering degraded until Redis answers", self.redis_outage)
            try:  # a cluster client needs a node's slot map to exist at all: RedisOutage, the caller waits
                self.store = ProfileStore.from_url(url, cfg)
            except RedisUnavailable as again:
                raise outage_or_raise(again) from None
        files = files_digest(cfg.rules_dir)
        rules = prepare(cfg.rules_dir)  # loads, compiles and passes its rule tests, or raises
        self.rules_digest = files
        self.registry = ModelRegistry(cfg.models_dir, rules.schema)
        if cfg.demo and self.redis_outage is not None:
            log.warning("demo data and model not checked: Redis is unreachable (restart once it answers)")
        elif cfg.demo:
            ensure_demo(self.store, self.registry, rules.ruleset, cfg.demo_customers)
        self.rules = Live(rules, retire=lambda r: r.close())
        self.model = Live(self._first_models(rules))
        self.decision_log = DecisionLog(self.store.client)
        self.engine = DecisionEngine(self.store, self.rules, self.model, self.decision_log,
                                     contacts=cfg.contact_policies, clock=self.clock)
        self.responses = self.engine.responses
        self.exploration = ExplorationCounts(self.store.client, interval=cfg.model_poll_seconds)
        self.engine.explorer = Explorer(self.exploration)
        self.engine.explorer.warmup()
        self.engine.prepare()
        self.engine.warmup()
        self._after_redis.append(self.exploration.ensure_groups)  # its consumer groups exist once the service is up
        self.events = EventProcessor(self.store, self.rules, self.engine, clock=self.clock)
        if cfg.events_poll_seconds > 0:
            self.timers = TimerPoller(self.store.client, self.events.on_timer, cfg.events_poll_seconds,
                                      clock=self.clock).start()
            self.event_stream = EventStreamConsumer(self.store.client, self.events)
            self._after_redis.append(self.event_stream.start)  # creates its consumer group in Redis
        if self.redis_outage is None:
            self.redis_reachable()
        self.reservations = ReservationReleaser(self.store.client).start()
        self.campaign_gauges = CampaignGauges(self.store.client, lambda: list(self.rules.current.ruleset.campaigns.values()),
                                              clock=self.clock).start()
        self._publish_versions()
        self.exploration.start()
        self.model_watcher = ModelWatcher(self.registry, lambda: self.model.current, self._swap_models,
                                          interval=cfg.model_poll_seconds).start()
        if cfg.rules_watch_seconds > 0:
            self.watcher = RuleWatcher(cfg.rules_dir, cfg.rules_watch_seconds, self.reload_rules, files).start()
        return self

    def redis_reachable(self) -> None:
        """Redis answers: start what an outage at start held back (``RedisHealth`` calls this). A Redis
        error leaves the rest waiting for the next call."""
        while self._after_redis:
            self._after_redis[0]()
            self._after_redis.pop(0)
        if self.redis_outage is not None:
            log.info("Redis answers: the outage at start is over")
            self.redis_outage = None

    def _first_models(self, rules: CompiledRules) -> ModelSet:
        """The registry's models; with none promoted yet (an empty production start), decisions go on
        without propensities until ``nba train`` promotes one, which the model watcher then picks up."""
        if self.registry.champion() is None:
            log.warning("no champion model in %s: deciding without propensities (ranked by value, weights and "
                        "levers) until one is trained and promoted", self.registry.dir)
            return ModelSet(no_model(rules.schema))
        return load_model_set(self.registry)

    def _swap_models(self, models: ModelSet) -> None:
        """A new champion / experiment from the watcher: bind it to the catalog, then swap it in."""
        self.engine.prepare(models)
        old = self.model.swap(models)
        self._publish_versions()
        audit(self.store.client, "model watch", "models_swapped", model=models.version, previous=old.version,
              mode=models.mode)

    def _publish_versions(self) -> None:
        rules, model = self.rules.current, self.model.current
        metrics.set_version(metrics.RULESET_VERSION, rules.version)
        metrics.set_version(metrics.MODEL_VERSION, model.version)
        metrics.CATALOG_SIZE.set(len(rules.ruleset.actions))

    def reload_rules(self, who: str = "rule file watch") -> tuple[bool, str, list[str]]:
        """Compile the rule files aside, run their rule tests, and swap them in; on errors or failed
        tests the live set stays. Returns (live now, live version, errors). Decisions in flight
        finish on the set they started with; the old set's durable rulesets are freed after them."""
        with self._reload_lock:
            live = self.rules.current.version
            files = files_digest(self.config.rules_dir)
            try:
                new = prepare(self.config.rules_dir)
                models = self._models_for(new)
            except RuleErrors as exc:
                metrics.RULE_RELOADS.labels("refused").inc()
                metrics.RULE_RELOAD_ERRORS.set(len(exc.errors))
                errors = [str(e) for e in exc.errors]
                log.warning("rules refused, %s stays live:\n%s", live, "\n".join(errors))
                audit(self.store.client, who, "rules_refused", live=live, errors=len(errors),
                      first_error=errors[0] if errors else "")
                self.rules_refused = RulesRefused(time.time(), rules_version(self.config.rules_dir), files,
                                                  tuple(errors))
                return False, live, errors
            metrics.RULE_RELOAD_ERRORS.set(0)
            self.rules_digest, self.rules_refused = files, None
            if new.version == live:
                new.close()
                metrics.RULE_RELOADS.labels("unchanged").inc()
                log.info("rules %s unchanged", live)
                audit(self.store.client, who, "rules_unchanged", ruleset=live)
                return True, live, []
            self.engine.prepare(models, rules=new)  # bind the models to the new catalog before it goes live
            for why in unkept_contacts(new.ruleset, self.rules.current.ruleset):
                log.warning("contact policy %s", why)
            self.rules.swap(new)
            self.registry.schema = new.schema  # the model watcher takes models that fit the live schema
            if models is not self.model.current:  # a model trained on the new domain.yaml goes live with it
                self.model.swap(models)
            metrics.RULE_RELOADS.labels("applied").inc()
            self._publish_versions()
            log.info("rules %s live (was %s)", new.version, live)
            audit(self.store.client, who, "rules_applied", ruleset=new.version, previous=live)
            return True, new.version, []

    def _models_for(self, new: CompiledRules) -> ModelSet:
        """The models to decide with under ``new``'s domain.yaml; ``RuleErrors`` (closing ``new``) when
        there are none. A model reads its input by name: when domain.yaml drops or retypes what the live
        models use, they serve on until a champion trained on the new schema is in the registry."""
        models = self.model.current
        if models.version == NO_MODEL:
            return ModelSet(no_model(new.schema))
        registry = ModelRegistry(self.config.models_dir, new.schema)
        problems = [f"{m.version}: {problem}" for m in models.models if (problem := registry.problem(m.version))]
        if not problems:
            return models
        try:
            return load_model_set(registry)  # a champion trained on the new domain.yaml is waiting
        except ModelRefused:
            new.close()
            path = self.config.rules_dir / DOMAIN_FILE
            try:  # located like every rule error: at the attributes the model needs
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                line = next((i for i, text in enumerate(lines, 1) if text.startswith("attributes:")), 1)
            except OSError:
                line = 1
            raise RuleErrors([RuleError(str(path), line, 1, "the live model cannot read the new schema ("
                                        + "; ".join(problems) + "); train and promote a model on it first, or "
                                        "keep what the model uses")]) from None

    def close(self) -> None:
        for part in ("event_stream", "timers", "reservations", "campaign_gauges", "watcher", "model_watcher",
                     "exploration", "privacy_jobs"):
            if getattr(self, part, None):
                getattr(self, part).stop()
        if getattr(self, "decision_log", None):
            self.decision_log.close()
        if getattr(self, "store", None):
            self.store.hot.close()
            self.store.client.close()
        if self.redis:
            self.redis.stop()
            self.redis = None
