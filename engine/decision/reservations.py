"""Gives back the budget units reserved for impressions that were not reported in time.

On an ``on_impression`` channel (web, app) a decision reserves a unit of each presented action's daily
budget (so concurrent decisions never over-spend it) and lists the reservation in ``nba:reservations``
by its expiry. The reported impression keeps the unit; without one, this poller releases it at the
expiry. Every server process runs one; the release script is atomic, so two pollers never release a
unit twice. On a cluster the reservations are split into shards by customer and the counters live on
other slots: a shard's script takes the due reservations off it, then their units go back counter by
counter (``engine.decision.budget_claims``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from engine import metrics
from engine.decision.budget_claims import RELEASE_CLUSTER, BudgetClaims
from engine.decision.contact import RELEASE, RESERVATIONS_KEY
from engine.store.polling import Poller
from engine.store.profiles import is_cluster
from engine.store.slots import shard_keys

BATCH = 500


class ReservationReleaser(Poller):
    label = "reservations"

    def __init__(self, client: redis.Redis, interval: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        super().__init__(interval)
        self.client = client
        self.clock = clock
        self._release = client.register_script(RELEASE)
        self._take_due = client.register_script(RELEASE_CLUSTER)
        self._budgets = BudgetClaims(client) if is_cluster(client) else None

    def poll_once(self) -> int:
        """Release every reservation expired by now; returns how many."""
        released = 0
        for key in shard_keys(RESERVATIONS_KEY, self.client):
            while not self._stop.is_set():
                n = self._release_some(key)
                released += n
                if n < BATCH:
                    break
        if released:
            metrics.RESERVATIONS.labels("released").inc(released)
        return released

    def _release_some(self, key: str) -> int:
        now_ms = int(self.clock() * 1000)
        if self._budgets is None:
            return int(self._release(keys=[key], args=[now_ms, BATCH]))
        due = self._take_due(keys=[key], args=[now_ms, BATCH])
        for member in due:
            self._budgets.give_back_reserved(member)
        return len(due)
