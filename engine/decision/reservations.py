"""Gives back the budget units reserved for impressions that were not reported in time.

On an ``on_impression`` channel (web, app) a decision reserves a unit of each presented action's daily
budget (so concurrent decisions never over-spend it) and lists the reservation in ``nba:reservations``
by its expiry. The reported impression keeps the unit; without one, this poller releases it at the
expiry. Every server process runs one; the release script is atomic, so two pollers never release a
unit twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from engine import metrics
from engine.decision.contact import RELEASE, RESERVATIONS_KEY
from engine.store.polling import Poller

BATCH = 500


class ReservationReleaser(Poller):
    label = "reservations"

    def __init__(self, client: redis.Redis, interval: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        super().__init__(interval)
        self.client = client
        self.clock = clock
        self._release = client.register_script(RELEASE)

    def poll_once(self) -> int:
        """Release every reservation expired by now; returns how many."""
        released = 0
        while not self._stop.is_set():
            n = int(self._release(keys=[RESERVATIONS_KEY], args=[int(self.clock() * 1000), BATCH]))
            released += n
            if n < BATCH:
                break
        if released:
            metrics.RESERVATIONS.labels("released").inc(released)
        return released
