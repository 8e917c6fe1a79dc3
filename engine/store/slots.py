"""Where keys live on a Redis Cluster: hash slots, slot tags and stream shards.

Every per-customer key carries the customer's hash tag ``{c:<id>}``, so a customer's keys share one
slot and a script touching only them is single-slot. Keys found by something other than the customer
id also have to land on that slot: a decision record is looked up by decision id alone, so a decision
id carries its customer's slot (``engine.decision.contact.new_decision_id``) and its key the slot's
*tag*, a short string that hashes to that slot (``slot_tag``).

Streams and timer sets shared by all customers are split into ``shard_count(client)`` keys
(``<base>:{shard:<k>}``) on a cluster, a customer always on the shard ``shard_of`` names, so the order
of one customer's entries is kept; readers read every shard. On one node there is one shard, the base
key itself (the names the service has always used).
"""

from __future__ import annotations

import binascii
import functools

from redis.cluster import RedisCluster

SLOTS = 16_384
CLUSTER_SHARDS = 16  # per stream and timer set on a cluster: spread over up to 16 masters


def key_slot(key: str) -> int:
    """The hash slot of ``key`` as Redis Cluster computes it (CRC16/XMODEM of the hash tag, if any)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key.encode(), 0) % SLOTS


def customer_slot(customer_id: str) -> int:
    return key_slot(f"{{c:{customer_id}}}")


@functools.cache
def _tags() -> tuple[str, ...]:
    """For each slot the shortest base-36 counter string that hashes to it (built once, ~0.1 s)."""
    tags: list[str | None] = [None] * SLOTS
    missing, i = SLOTS, 0
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    while missing:
        n, s = i, ""
        while True:
            n, r = divmod(n, 36)
            s = digits[r] + s
            if n == 0:
                break
        slot = binascii.crc_hqx(s.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = s
            missing -= 1
        i += 1
    return tuple(t for t in tags if t is not None)


def slot_tag(slot: int) -> str:
    """A hash tag (without braces) whose keys land on ``slot``."""
    return _tags()[slot]


def shard_count(client: object) -> int:
    return CLUSTER_SHARDS if isinstance(client, RedisCluster) else 1


def shard_maxlen(total: int, client: object) -> int:
    """A shard's share of a stream's length cap, so the shards together keep about ``total`` entries."""
    return max(1_000, total // shard_count(client))


def shard_of(customer_id: str, shards: int) -> int:
    return customer_slot(customer_id) % shards if shards > 1 else 0


def shard_key(base: str, shard: int, shards: int) -> str:
    return base if shards <= 1 else f"{base}:{{shard:{shard}}}"


def shard_keys(base: str, client: object) -> list[str]:
    """Every shard of ``base`` on ``client``'s deployment."""
    n = shard_count(client)
    return [shard_key(base, k, n) for k in range(n)]


def customer_shard_key(base: str, customer_id: str, client: object) -> str:
    """The shard of ``base`` that holds ``customer_id``'s entries."""
    n = shard_count(client)
    return shard_key(base, shard_of(customer_id, n), n)
