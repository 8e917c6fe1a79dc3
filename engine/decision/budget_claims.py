"""Budgets on a Redis Cluster: a unit is claimed from each counter by its own single-slot script.

On one node ``PRESENT`` checks and consumes budgets in the same atomic script as the contact limits.
On a cluster the counters (``nba:budget:<action>:<day>``, a campaign's ``spent`` and ``day`` keys) sit
on other slots than the customer, so a decision presents in steps (``engine.decision.contact``):

1. ``PRESENT`` walks the candidates on the customer's slot and names those it would show whose budgets
   are not claimed yet (``need``); it writes nothing then.
2. ``claim`` takes one unit of each of their counters: ``CLAIM`` never takes a unit past the budget, so
   any number of processes together never over-spend; a candidate whose second counter is used up gives
   the first one's unit back at once.
3. ``PRESENT`` again, with the claims' outcomes, and so on until it presents (each round settles at
   least one candidate). The units of claimed candidates that were not shown in the end are given back.

The trade-off: a budget may be *under*-spent, never over-spent. A unit claimed by a decision that is
then not shown is unavailable until it is given back (microseconds later); a process that dies between
claiming and presenting, or a presenting call that fails ambiguously (a timeout: it may have
presented), keeps its units, so that day's budget ends short by at most the decisions in flight then.
And a budgeted decision costs 2 + (counters claimed) round trips on a cluster instead of one.

Reservations (``on_impression`` channels) are listed in the customer's shard of ``nba:reservations``
after the decision presented, and released counter by counter (``RELEASE_CLUSTER``, then ``give_back``).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from engine.decision.contact import RESERVATIONS_KEY, reservation_member
from engine.store.slots import customer_shard_key

# KEYS[1] a budget counter; ARGV: budget, TTL s. One unit if the budget allows: 1, else 0.
CLAIM = r"""
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] a budget counter: one unit back (unless the counter expired meanwhile): 1, else 0.
UNCLAIM = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DECR', KEYS[1])
return 1
"""

# KEYS[1] one shard of the reservations; ARGV: now ms, batch. Takes the due reservations off the set and
# returns them; the caller gives their units back (counters are on other slots).
RELEASE_CLUSTER = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

CLAIMED = 1
NOT_CLAIMED = 2


class BudgetClaims:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = client.register_script(CLAIM)
        self._unclaim = client.register_script(UNCLAIM)

    def claim(self, specs: Sequence[tuple[str, int, str, int]]) -> int | str:
        """One unit of every counter of ``specs`` (``(key, budget, verdict, ttl)``), or none: ``CLAIMED``,
        or the verdict of the first counter used up."""
        taken: list[str] = []
        for key, budget, verdict, ttl in specs:
            if not int(self._claim(keys=[key], args=[budget, ttl])):
                self.give_back(taken)
                return verdict
            taken.append(key)
        return CLAIMED

    def peek(self, specs: Sequence[tuple[str, int, str, int]]) -> int | str:
        """What ``claim`` would say now, taking nothing (for previews)."""
        for key, budget, verdict, _ttl in specs:
            if int(self.client.get(key) or 0) >= budget:
                return verdict
        return CLAIMED

    def settle(self, claims: Sequence[int | str], specs: Sequence[Sequence[tuple[str, int, str, int]]],
               verdicts: Sequence[bytes], reserve: bool, decision_id: str, action_ids: Sequence[str],
               customer_id: str, expires_ms: int) -> None:
        """After ``PRESENT``: the units of claimed candidates that were not shown go back; with ``reserve``
        (an ``on_impression`` channel) those shown are listed for release unless their impression comes."""
        for i, state in enumerate(claims):
            if state != CLAIMED:
                continue
            keys = [spec[0] for spec in specs[i]]
            if i >= len(verdicts) or verdicts[i] != b"ok":
                self.give_back(keys)
            elif reserve:
                member = reservation_member(decision_id, action_ids[i], " ".join(keys))
                self.client.zadd(customer_shard_key(RESERVATIONS_KEY, customer_id, self.client), {member: expires_ms})

    def give_back_reserved(self, member: str | bytes) -> int:
        """The units of a reservation (``contact.reservation_member``) back to its counters."""
        text = member.decode() if isinstance(member, bytes) else member
        return self.give_back(text.split("|", 2)[2].split())

    def give_back(self, keys: Sequence[str]) -> int:
        """One unit back to each counter of ``keys``; how many still existed."""
        return sum(int(self._unclaim(keys=[key])) for key in keys)
