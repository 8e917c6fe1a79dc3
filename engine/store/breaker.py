"""A circuit breaker per Redis server, shared by every connection of this process to it.

A stalled Redis (``CLIENT PAUSE``, a long fork, a slow disk under ``appendfsync always``) would otherwise
hold every call's thread until that call's deadline, so the worker runs out of threads and sheds or
misses calls it could have answered degraded at once. A reply that stays out ``STALL_SECONDS`` or a
refused connection opens the breaker: while it is open, commands fail at once with
``BreakerOpen`` (a ``ConnectionError``, so every caller's existing degraded path applies), except one
probe every ``PROBE_SECONDS`` that goes through and waits at most ``PROBE_WAIT_SECONDS`` for its reply.
Any reply closes it again.
"""

from __future__ import annotations

import threading
import time

import redis

from engine import metrics

# A healthy Redis answers in well under a millisecond; a reply still out after this long is a stall.
STALL_SECONDS = 0.05
PROBE_SECONDS = 0.05
PROBE_WAIT_SECONDS = 0.02


class BreakerOpen(redis.exceptions.ConnectionError):
    """Redis stalled or refused recently; this command was not sent."""


class Breaker:
    def __init__(self, name: str, stall_seconds: float = STALL_SECONDS, probe_seconds: float = PROBE_SECONDS) -> None:
        self.name = name
        self.stall_seconds = stall_seconds
        self.probe_seconds = probe_seconds
        self.open_since = 0.0  # monotonic; 0: closed
        self._next_probe = 0.0
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.open_since > 0.0

    def before_send(self) -> bool:
        """Raise ``BreakerOpen`` unless the breaker is closed (False) or this command is the next probe (True)."""
        if not self.open_since:
            return False
        now = time.monotonic()
        with self._lock:
            if now >= self._next_probe:
                self._next_probe = now + self.probe_seconds
                return True
        metrics.REDIS_BREAKER.labels("refused").inc()
        raise BreakerOpen(f"Redis at {self.name} stalled or refused {now - self.open_since:.2f} s ago; "
                          "not sent (circuit open)")

    def replied(self) -> None:
        if self.open_since:
            with self._lock:
                if self.open_since:
                    self.open_since = 0.0
                    metrics.REDIS_BREAKER.labels("closed").inc()

    def failed(self, waited: float | None) -> None:
        """A command failed: ``waited`` seconds for a reply that did not come (None: no connection)."""
        if waited is not None and waited < self.stall_seconds:
            return  # the caller's own deadline was short: no evidence that Redis is stalled
        with self._lock:
            if not self.open_since:
                self.open_since = time.monotonic()
                self._next_probe = self.open_since + self.probe_seconds
                metrics.REDIS_BREAKER.labels("opened").inc()


_breakers: dict[str, Breaker] = {}
_registry_lock = threading.Lock()


def breaker_for(name: str) -> Breaker:
    """The process's breaker for the Redis server ``name`` (``host:port`` or a socket path)."""
    breaker = _breakers.get(name)
    if breaker is None:
        with _registry_lock:
            breaker = _breakers.setdefault(name, Breaker(name))
    return breaker
