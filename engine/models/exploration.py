"""Exploration: Thompson sampling on a per-action Beta posterior, blended with the model.

A pure exploit policy shows each customer the actions the model already rates highest, so it stops
learning about the others. In an exploring decision each admitted action's ranking propensity is

    (1 - weight) x model propensity + weight x theta,   theta ~ Beta(alpha_a, beta_a)

with ``alpha_a = prior_mean x prior_strength + accepted_a`` and ``beta_a = (1 - prior_mean) x
prior_strength + shown_a - accepted_a``: an action shown rarely has a wide posterior and now and then
draws a high theta, so it gets shown and its posterior narrows. The propensity reported to the caller
stays the model's; the priority (and so the order) uses the blend.

One voice: which decisions explore is stable per customer and period (``period_hours``, default a
UTC day: a hash of both below ``share``), the draws are seeded by the same hash (drawn for the whole
catalog in catalog order), and the posterior is pinned for the period: the first process to need it
copies the live counts to ``nba:explore:posterior:<period>`` (atomically, one Lua call) and every
process uses that copy. So the same customer in the same state gets the same answer on every channel
and server process within a period, and the posterior learns from one period to the next. The control
group never explores unless configured (``exploration.control``), so it stays a clean baseline.
Configuration: ``models/<name>/experiment.yaml`` (see ``engine.models.experiment``).

Counts come from the streams the service already writes: a Redis consumer group reads
``nba:stream:decisions`` (each presented action: shown) and ``nba:stream:responses`` (outcome
``accepted``) (every shard of each on a Redis Cluster: ``engine.store.streams.read_group``) so that
every entry is counted once whatever the number of server processes, into one
hash ``nba:explore:counts`` (fields ``<action>|shown`` and ``<action>|accepted``); every process
re-reads the hash each second. Counting is at-most-once (NOACK): a process dying mid-batch loses a
few counts, which a posterior can afford.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading

import numba
import numpy as np
import redis

from engine.models.experiment import ExplorationConfig, bucket
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM
from engine.store.slots import key_slot, shard_keys, slot_tag
from engine.store.streams import base_of, read_group

log = logging.getLogger(__name__)

COUNTS_KEY = "nba:explore:counts"
# on the counts' slot (tag), so the pinning script touches one slot on a cluster too
POSTERIOR_KEY = "nba:explore:posterior:{{" + slot_tag(key_slot(COUNTS_KEY)) + "}}:{period}"
GROUP = "nba-exploration"

# The counts as of the period's first use, shared by all processes for the whole period.
_PIN = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  local counts = redis.call('HGETALL', KEYS[1])
  counts[#counts + 1] = '_pinned'
  counts[#counts + 1] = ARGV[2]
  redis.call('HSET', KEYS[2], unpack(counts))
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return redis.call('HGETALL', KEYS[2])
"""


@numba.njit(cache=True, nogil=True)
def _beta_draws(seed: int, alpha: np.ndarray, beta: np.ndarray, out: np.ndarray) -> None:
    np.random.seed(seed)
    for i in range(alpha.shape[0]):
        out[i] = np.random.beta(alpha[i], beta[i])


class ExplorationCounts:
    """Per-action presentations and acceptances, counted once across processes, snapshotted here."""

    def __init__(self, client: redis.Redis, interval: float = 1.0, batch: int = 2_000) -> None:
        self.client = client
        self.interval = interval
        self.batch = batch
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.counts: dict[str, tuple[int, int]] = {}  # live, refreshed every interval
        self._pinned: dict[int, dict[str, tuple[int, int]]] = {}  # period -> posterior counts
        self._pin_lock = threading.Lock()
        self._pin = client.register_script(_PIN)
        self._groups_ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for stream in (*shard_keys(DECISIONS_STREAM, self.client), *shard_keys(RESPONSES_STREAM, self.client)):
            try:  # from the start of the stream: history counts once, by whoever creates the group
                self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    def step(self) -> int:
        """Count what arrived since the last step (any process's), then refresh the snapshot."""
        self.ensure_groups()
        consumed = 0
        while True:
            reply = read_group(self.client, GROUP, self.consumer, (DECISIONS_STREAM, RESPONSES_STREAM), self.batch,
                               noack=True)
            increments: dict[str, int] = {}
            n = 0
            for name, entries in reply or []:
                stream = base_of(name, (DECISIONS_STREAM, RESPONSES_STREAM))
                for _, fields in entries:
                    n += 1
                    if stream == DECISIONS_STREAM:
                        for action in (fields.get(b"actions") or b"").decode().split(","):
                            if action:
                                increments[f"{action}|shown"] = increments.get(f"{action}|shown", 0) + 1
                    elif fields.get(b"outcome") == b"accepted":
                        action = (fields.get(b"action_id") or b"").decode()
                        if action:
                            increments[f"{action}|accepted"] = increments.get(f"{action}|accepted", 0) + 1
            if increments:
                pipe = self.client.pipeline(transaction=False)
                for key, value in increments.items():
                    pipe.hincrby(COUNTS_KEY, key, value)
                pipe.execute()
            consumed += n
            if all(len(entries) < self.batch for _, entries in reply or []):  # no stream (shard) had more
                break
        self.refresh()
        return consumed

    @staticmethod
    def _parse(raw: dict | list) -> dict[str, tuple[int, int]]:
        items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2])
        counts: dict[str, list[int]] = {}
        for key, value in items:
            action, _, kind = (key.decode() if isinstance(key, bytes) else key).rpartition("|")
            if kind in ("shown", "accepted"):
                counts.setdefault(action, [0, 0])[0 if kind == "shown" else 1] = int(value)
        return {a: (shown, accepted) for a, (shown, accepted) in counts.items()}

    def refresh(self) -> None:
        self.counts = self._parse(self.client.hgetall(COUNTS_KEY))

    def pinned(self, period: int, period_seconds: float) -> dict[str, tuple[int, int]]:
        """The posterior counts of ``period`` (pinned in Redis by the first process that asks)."""
        counts = self._pinned.get(period)
        if counts is None:
            with self._pin_lock:
                counts = self._pinned.get(period)
                if counts is None:
                    raw = self._pin(keys=[COUNTS_KEY, POSTERIOR_KEY.format(period=period)],
                                    args=[int(3 * period_seconds) + 60, period])
                    counts = self._pinned[period] = self._parse(raw)
                    for old in [p for p in self._pinned if p < period - 1]:
                        del self._pinned[old]
        return counts

    def start(self) -> ExplorationCounts:
        self._thread = threading.Thread(target=self._run, name="exploration-counts", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except redis.exceptions.RedisError as exc:
                log.warning("exploration counts not updated: %s", exc)
            except Exception:
                log.exception("exploration counts step failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


class Explorer:
    """Blends Thompson draws into the ranking of exploring decisions."""

    def __init__(self, counts: ExplorationCounts) -> None:
        self.counts = counts
        self._posterior: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def warmup(self) -> None:
        out = np.empty(1)
        _beta_draws(1, np.ones(1), np.ones(1), out)

    @staticmethod
    def period(config: ExplorationConfig, now: float) -> int:
        return int(now // (config.period_hours * 3600.0))

    def posterior(self, config: ExplorationConfig, action_ids: tuple[str, ...],
                  now: float) -> tuple[np.ndarray, np.ndarray]:
        """Beta parameters for every catalog action in the period of ``now`` (cached)."""
        period = self.period(config, now)
        key = (action_ids, period, config.period_hours, config.prior_mean, config.prior_strength)
        cached = self._posterior.get(key)
        if cached is None:
            counts = self.counts.pinned(period, config.period_hours * 3600.0)
            if len(self._posterior) > 16:
                self._posterior.clear()
            shown = np.array([counts.get(a, (0, 0))[0] for a in action_ids], dtype=np.float64)
            accepted = np.array([counts.get(a, (0, 0))[1] for a in action_ids], dtype=np.float64)
            accepted = np.minimum(accepted, shown)
            alpha = config.prior_mean * config.prior_strength + accepted
            beta = (1.0 - config.prior_mean) * config.prior_strength + shown - accepted
            cached = self._posterior[key] = (alpha, beta)
        return cached

    @classmethod
    def explores(cls, config: ExplorationConfig, customer_id: str, now: float) -> bool:
        return config.enabled and bucket(customer_id, f"explore:{cls.period(config, now)}") < config.share

    def blend(self, config: ExplorationConfig, customer_id: str, now: float, action_ids: tuple[str, ...],
              admitted: np.ndarray, propensity: np.ndarray) -> np.ndarray:
        """Ranking propensities of the admitted catalog rows for an exploring decision."""
        alpha, beta = self.posterior(config, action_ids, now)
        seed = int.from_bytes(hashlib.blake2b(f"theta:{self.period(config, now)}:{customer_id}".encode(),
                                              digest_size=4).digest(), "little")
        theta = np.empty(len(action_ids))
        _beta_draws(seed, alpha, beta, theta)
        return (1.0 - config.weight) * propensity + config.weight * theta[admitted]
