"""A background thread that runs one pass of work every few seconds until stopped (timers, reservations)."""

from __future__ import annotations

import logging
import threading
from typing import Self

import redis
from redis.exceptions import RedisClusterException

from engine.metrics import REDIS_ERRORS

log = logging.getLogger(__name__)


class Poller:
    """Calls ``poll_once`` every ``interval`` seconds on a daemon thread. A Redis error is counted
    (``nba_redis_errors_total{operation=<label>}``) and logged, and the next pass tries again."""

    label = "poller"  # the thread's name and the metric's operation label

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=self.label, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except (redis.exceptions.RedisError, RedisClusterException) as exc:
                if self._stop.is_set():  # shutting down: Redis may already be gone
                    return
                REDIS_ERRORS.labels(self.label).inc()
                log.warning("%s: %s", self.label, exc)
