"""Champion / challenger and exploration: which model decides for a customer, read from the registry.

``models/<name>/CHAMPION`` names the champion. An optional ``models/<name>/experiment.yaml`` adds a
challenger and an exploration strategy (format in ``models/README.md``)::

    challenger:
      version: v20261123-101500-123456   # a version in this registry
      mode: split                        # split: it decides for `share` of customers; shadow: it only
      share: 0.2                         #   scores alongside the champion, logged, never shown
    exploration:
      strategy: thompson                 # none | thompson | epsilon (see below)
      share: 0.1                         # thompson: share of customers whose decisions explore, per period;
                                         #   epsilon: each slot's chance of a uniform pick (choice.py)
      period_hours: 24                   # draws and posterior are fixed per customer and period
      weight: 0.3                        # ranking propensity = (1 - weight) x model + weight x sample
      prior_mean: 0.1                    # Beta prior per action: mean and strength (pseudo-decisions)
      prior_strength: 20
      control: false                     # the control group never explores unless this is true
    arbitration: propensity              # propensity | uplift (below)

``arbitration: uplift`` ranks by expected *incremental* value, (P(take | shown) - P(take | not shown)) x
value x weight, with the two models of a version trained by ``nba train --uplift`` (``organic.txt``
beside ``model.txt``), and drops offers whose estimate is not above zero (an offer that only reaches
customers who would buy anyway, or that pushes them away, earns nothing or less). Every model it names
must carry its organic half, or the file is refused and the running set stays.

Customers are split by a stable hash of their id (the same customer always lands on the same side of
a given challenger), so one customer never flips between models from one decision to the next.

``ModelWatcher`` polls the pointer and the file (every second by default) from a background thread:
a change loads and compiles the new models aside (JIT, catalog binding), then swaps them in
atomically; in-flight decisions finish on the set they started with. A model or file that cannot go
live is refused with a log line and a metric, and the running set stays.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine import metrics
from engine.errors import NbaError
from engine.models.registry import LoadedModel, ModelRefused, ModelRegistry

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.yaml"
MODES = ("split", "shadow")
STRATEGIES = ("none", "thompson", "epsilon")
ARBITRATIONS = ("propensity", "uplift")


def bucket(customer_id: str, salt: str) -> float:
    """A stable number in [0, 1) for a customer id (blake2b, as the control group uses)."""
    digest = hashlib.blake2b(f"{salt}:{customer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class ExperimentError(NbaError, ValueError):
    """experiment.yaml is malformed; the message names the key."""


@dataclass(frozen=True)
class Challenger:
    version: str
    mode: str = "split"
    share: float = 0.0


@dataclass(frozen=True)
class ExplorationConfig:
    strategy: str = "none"
    share: float = 0.0
    weight: float = 0.3
    prior_mean: float = 0.1
    prior_strength: float = 20.0
    period_hours: float = 24.0
    control: bool = False

    @property
    def enabled(self) -> bool:
        return self.strategy != "none" and self.share > 0 and (self.strategy == "epsilon" or self.weight > 0)


GATES = ("none", "above_champion", "not_below_champion")


@dataclass(frozen=True)
class PromotionGate:
    """When ``nba models promote`` lets a version become the champion, judged by off-policy evaluation on
    the recorded decisions of the last ``days`` (``engine.analytics.evaluate``): ``above_champion``, the
    95% CI of its value less the champion's lies above 0; ``not_below_champion``, that CI reaches 0 or
    above; in both, the estimate must rest on at least ``min_effective_sample_size`` decisions."""

    require: str = "none"
    days: float = 30.0
    min_effective_sample_size: float = 100.0

    def verdict(self, versus: dict | None, effective_sample_size: float | None) -> str | None:
        """Why the gate refuses (None: it lets the version through)."""
        if self.require == "none":
            return None
        if versus is None or versus.get("ci95") is None:
            return "no estimate of its value against the champion"
        if (effective_sample_size or 0.0) < self.min_effective_sample_size:
            return (f"effective sample size {effective_sample_size or 0:,.1f} is below "
                    f"{self.min_effective_sample_size:,.0f}")
        low, high = versus["ci95"]
        if self.require == "above_champion" and low <= 0:
            return f"its value less the champion's, 95% CI {low:+,.1f}..{high:+,.1f}, does not lie above 0"
        if self.require == "not_below_champion" and high < 0:
            return f"its value less the champion's, 95% CI {low:+,.1f}..{high:+,.1f}, lies below 0"
        return None


@dataclass(frozen=True)
class Experiment:
    challenger: Challenger | None = None
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    fingerprint: str = ""
    promotion: PromotionGate = field(default_factory=PromotionGate)
    arbitration: str = "propensity"


def _number(section: str, data: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ExperimentError(f"{section}.{key}: must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _keys(section: str, data: object, allowed: set[str]) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExperimentError(f"{section}: must be a mapping")
    unknown = set(data) - allowed
    if unknown:
        raise ExperimentError(f"{section}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                              f"(allowed: {', '.join(sorted(allowed))})")
    return data


def parse_experiment(text: str) -> Experiment:
    """Parse experiment.yaml contents; raises ExperimentError naming the offending key."""
    try:
        data = yaml.safe_load(text) or {}
    # RecursionError: nested too deeply for the parser; ValueError: a date that is none (2026-13-01)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise ExperimentError(f"not valid YAML: {exc}") from exc
    data = _keys("experiment.yaml", data, {"challenger", "exploration", "promotion", "arbitration"})
    arbitration = data.get("arbitration", "propensity")
    if arbitration not in ARBITRATIONS:
        raise ExperimentError(f"arbitration: must be one of {', '.join(ARBITRATIONS)}, got {arbitration!r}")
    challenger = None
    c = _keys("challenger", data.get("challenger"), {"version", "mode", "share"})
    if c:
        version = c.get("version")
        if not isinstance(version, str) or not version.strip():
            raise ExperimentError("challenger.version: must name a model version")
        mode = c.get("mode", "split")
        if mode not in MODES:
            raise ExperimentError(f"challenger.mode: must be one of {', '.join(MODES)}, got {mode!r}")
        share = _number("challenger", c, "share", 0.0 if mode == "shadow" else 0.1, 0.0, 1.0)
        challenger = Challenger(version.strip(), mode, share)
    e = _keys("exploration", data.get("exploration"),
              {"strategy", "share", "weight", "prior_mean", "prior_strength", "period_hours", "control"})
    strategy = e.get("strategy", "none")
    if strategy not in STRATEGIES:
        raise ExperimentError(f"exploration.strategy: must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    control = e.get("control", False)
    if not isinstance(control, bool):
        raise ExperimentError("exploration.control: must be true or false")
    exploration = ExplorationConfig(
        strategy=strategy,
        share=_number("exploration", e, "share", 0.1 if strategy != "none" else 0.0, 0.0, 1.0),
        weight=_number("exploration", e, "weight", 0.3, 0.0, 1.0),
        prior_mean=_number("exploration", e, "prior_mean", 0.1, 1e-6, 1 - 1e-6),
        prior_strength=_number("exploration", e, "prior_strength", 20.0, 1e-6, 1e9),
        period_hours=_number("exploration", e, "period_hours", 24.0, 1 / 60, 24 * 366),
        control=control,
    )
    g = _keys("promotion", data.get("promotion"), {"require", "days", "min_effective_sample_size"})
    require = g.get("require", "none")
    if require not in GATES:
        raise ExperimentError(f"promotion.require: must be one of {', '.join(GATES)}, got {require!r}")
    gate = PromotionGate(require, _number("promotion", g, "days", 30.0, 1 / 24, 3660.0),
                         _number("promotion", g, "min_effective_sample_size", 100.0, 0.0, 1e12))
    return Experiment(challenger, exploration, hashlib.sha256(text.encode()).hexdigest()[:12], gate, arbitration)


@dataclass(frozen=True)
class ModelSet:
    """The live models: what ``Live`` swaps atomically. ``version`` / ``loaded_at`` are the champion's."""

    champion: LoadedModel
    challenger: LoadedModel | None = None
    mode: str = "none"  # none | split | shadow
    share: float = 0.0
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    experiment: str = ""  # fingerprint of experiment.yaml ("" without one)
    arbitration: str = "propensity"  # propensity | uplift (every model then has its ``organic`` half)

    @property
    def version(self) -> str:
        return self.champion.version

    @property
    def loaded_at(self) -> float:
        return self.champion.loaded_at

    @property
    def models(self) -> tuple[LoadedModel, ...]:
        return (self.champion,) if self.challenger is None else (self.champion, self.challenger)

    def for_customer(self, customer_id: str) -> tuple[LoadedModel, str, LoadedModel | None]:
        """(deciding model, its role "champion" / "challenger", shadow model or None)."""
        if self.challenger is None:
            return self.champion, "champion", None
        if self.mode == "shadow":
            return self.champion, "champion", self.challenger
        if bucket(customer_id, f"challenger:{self.challenger.version}") < self.share:
            return self.challenger, "challenger", None
        return self.champion, "champion", None

    def describe(self) -> str:
        text = f"champion {self.champion.version}"
        if self.challenger is not None:
            text += f", challenger {self.challenger.version} ({self.mode}" + (
                f" {self.share:.0%})" if self.mode == "split" else ")")
        if self.exploration.enabled:
            text += f", exploration {self.exploration.strategy} {self.exploration.share:.0%}"
        if self.arbitration != "propensity":
            text += f", {self.arbitration} arbitration"
        return text


def read_experiment(registry: ModelRegistry) -> Experiment:
    path = registry.dir / EXPERIMENT_FILE
    if not path.is_file():
        return Experiment()
    try:
        return parse_experiment(path.read_text())
    except ExperimentError as exc:
        raise ExperimentError(f"{path}: {exc}") from None


def load_model_set(registry: ModelRegistry, previous: ModelSet | None = None,
                   prepare: Callable[[LoadedModel], None] | None = None) -> ModelSet:
    """Load champion (+ challenger) per the pointer and experiment.yaml, reusing models ``previous``
    already compiled. ``prepare`` runs on every newly loaded model before it can go live.
    Raises ModelRefused / ExperimentError; nothing changes then."""
    experiment = read_experiment(registry)
    loaded = {m.version: m for m in previous.models} if previous is not None else {}

    def get(version: str | None) -> LoadedModel:
        if version is not None and version in loaded:
            return loaded[version]
        model = registry.load(version)
        if prepare is not None:
            prepare(model)
        loaded[model.version] = model
        return model

    champion = get(registry.champion())
    challenger, mode, share = None, "none", 0.0
    if experiment.challenger is not None and experiment.challenger.version != champion.version:
        try:
            challenger = get(experiment.challenger.version)
        except ModelRefused as exc:
            raise ModelRefused(f"challenger refused: {exc}") from exc
        mode, share = experiment.challenger.mode, experiment.challenger.share
    if experiment.arbitration == "uplift":
        for model in (champion, challenger):
            if model is not None and model.organic is None:
                raise ExperimentError(f"arbitration: uplift needs models trained with `nba train --uplift`; "
                                      f"{model.version} has no organic model (organic.txt)")
    return ModelSet(champion, challenger, mode, share, experiment.exploration, experiment.fingerprint,
                    experiment.arbitration)


class ModelWatcher:
    """Polls the registry; on a change of CHAMPION or experiment.yaml loads the new set aside and
    hands it to ``swap``. ``check()`` does one poll (the thread calls it every ``interval`` seconds)."""

    def __init__(self, registry: ModelRegistry, current: Callable[[], ModelSet],
                 swap: Callable[[ModelSet], None], prepare: Callable[[LoadedModel], None] | None = None,
                 interval: float = 1.0) -> None:
        self.registry = registry
        self.current = current
        self.swap = swap
        self.prepare = prepare
        self.interval = interval
        self._seen = self._state()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def _state(self) -> tuple:
        """What a poll compares: the pointer's and the experiment file's contents."""
        def read(path: Path) -> str | None:
            try:
                return path.read_text()
            except OSError:
                return None

        return read(self.registry.dir / "CHAMPION"), read(self.registry.dir / EXPERIMENT_FILE)

    def check(self) -> bool:
        """One poll: True when a new model set went live."""
        with self._lock:
            state = self._state()
            if state == self._seen:
                return False
            self._seen = state
            started = time.perf_counter()
            try:
                new = load_model_set(self.registry, self.current(), self.prepare)
            except (ModelRefused, ExperimentError) as exc:
                self.last_error = str(exc)
                metrics.MODEL_RELOADS.labels("refused").inc()
                log.warning("model change refused, %s stays live: %s", self.current().describe(), exc)
                return False
            old = self.current()
            if (new.champion is old.champion and new.challenger is old.challenger and new.mode == old.mode
                    and new.share == old.share and new.exploration == old.exploration
                    and new.arbitration == old.arbitration):
                return False
            self.swap(new)
            self.last_error = None
            metrics.MODEL_RELOADS.labels("applied").inc()
            log.info("models live in %.0f ms: %s", (time.perf_counter() - started) * 1e3, new.describe())
            return True

    def start(self) -> ModelWatcher:
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let the watcher die: the next poll retries
                log.exception("model watcher poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def resolve(models: ModelSet | LoadedModel, customer_id: str) -> tuple[LoadedModel, str, LoadedModel | None]:
    """(deciding model, role, shadow) for a customer; a bare LoadedModel decides alone."""
    if isinstance(models, ModelSet):
        return models.for_customer(customer_id)
    return models, "champion", None


def arbitration_of(models: ModelSet | LoadedModel) -> str:
    return models.arbitration if isinstance(models, ModelSet) else "propensity"


def exploration_of(models: ModelSet | LoadedModel) -> ExplorationConfig:
    return models.exploration if isinstance(models, ModelSet) else ExplorationConfig()
