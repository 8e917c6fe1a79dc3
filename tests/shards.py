"""Reading streams and timer sets the way the service writes them: every shard on a Redis Cluster
(``engine.store.slots``), the one base key on one node."""

from __future__ import annotations

from typing import Any

from engine.store.slots import shard_keys
from engine.store.streams import xrange_all


def entries(client: Any, base: str) -> list[dict]:
    """The fields of every entry of every shard of stream ``base``, in entry id order."""
    return [fields for _, fields in xrange_all(client, base)]


def zcard(client: Any, base: str) -> int:
    return sum(int(client.zcard(key)) for key in shard_keys(base, client))


def zrange(client: Any, base: str) -> list[tuple[Any, float]]:
    """(member, score) of every shard of sorted set ``base``, by score."""
    out = [m for key in shard_keys(base, client) for m in client.zrange(key, 0, -1, withscores=True)]
    return sorted(out, key=lambda m: m[1])
