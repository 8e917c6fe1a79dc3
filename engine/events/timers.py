"""The timer poller: one thread per server process fires absence patterns at their due time and runs
outbound actions postponed by quiet hours when the window ends.

Timers live in Redis (``nba:timers``, a sorted set of timer members by due time in epoch ms; on a Redis
Cluster split into shards, a customer's timers on the customer's shard, ``engine.store.slots``), written
when the opening event arrives (or when quiet hours postpone an outbound action), so a restart between
an event and its due time loses nothing. A Lua claim (per shard) hands each due timer to one poller
and pushes its due time ``LEASE_MS`` ahead; the poller removes it once handled. A poller that dies
mid-way leaves the timer to be claimed again after the lease (at least once; the effects are
idempotent: a trigger set twice is one trigger, an outbound action is sent at most once per
(pattern, event), also when it was postponed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from engine.events.processor import TIMERS_KEY
from engine.store.polling import Poller
from engine.store.slots import shard_keys

log = logging.getLogger(__name__)

LEASE_MS = 60_000
BATCH = 100

# KEYS[1] timers; ARGV: now ms, batch, lease ms. Returns the claimed members.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local leased = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], leased, m) end
return due
"""


class TimerPoller(Poller):
    label = "event_timers"

    def __init__(self, client: redis.Redis, handle: Callable[[str], object], interval: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(interval)
        self.client = client
        self.handle = handle
        self.clock = clock
        self._claim = client.register_script(_CLAIM)

    def poll_once(self) -> int:
        """Handle every timer due now, from every shard of the timers; returns how many were handled."""
        return sum(self._poll_shard(key) for key in shard_keys(TIMERS_KEY, self.client))

    def _poll_shard(self, key: str) -> int:
        handled = 0
        while not self._stop.is_set():
            members = self._claim(keys=[key], args=[int(self.clock() * 1000), BATCH, LEASE_MS])
            for member in members:
                member = member.decode() if isinstance(member, bytes) else member
                try:
                    self.handle(member)
                except Exception:  # left claimed: retried after the lease
                    log.exception("timer %s failed; retried in %ds", member, LEASE_MS // 1000)
                    continue
                self.client.zrem(key, member)
                handled += 1
            if len(members) < BATCH:
                return handled
        return handled
