"""Reading a stream that ``engine.store.slots`` splits into shards on a Redis Cluster, as one stream.

Writers append a customer's entries to ``customer_shard_key(base, customer, client)``; readers here
read every shard of ``base``. Ranges are merged by entry id (each shard's ids are Redis's clock on that
shard's node, so the merge is in time order up to clock skew between nodes; one customer's entries are
on one shard, so their order is exact). On one node the only shard is ``base`` and nothing changes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import Any, cast

from engine.store.profiles import STREAM_MAXLEN, StreamEntries, StreamReadReply
from engine.store.slots import customer_shard_key, shard_count, shard_keys, shard_maxlen

Entry = tuple[bytes, dict[bytes, bytes]]  # (entry id, fields) as the service's clients return them


def id_order(entry_id: bytes | str) -> tuple[int, int]:
    """An entry id as a sortable pair (``<ms>-<seq>``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _one_shard(client: Any, key: str, since: str, chunk: int) -> Iterator[Entry]:
    start = since
    while True:
        batch = cast(StreamEntries, client.xrange(key, min=start, max="+", count=chunk))
        yield from batch
        if len(batch) < chunk:
            return
        last = batch[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else last)


def append(client: Any, base: str, customer_id: str, fields: dict[str, str]) -> str:
    """``XADD`` to the customer's shard of ``base``, trimmed to the shard's share of ``STREAM_MAXLEN``;
    the entry id."""
    entry = client.xadd(customer_shard_key(base, customer_id, client), fields,
                        maxlen=shard_maxlen(STREAM_MAXLEN, client), approximate=True)
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def xrange_all(client: Any, base: str, since: str = "-", chunk: int = 5_000) -> Iterator[Entry]:
    """Every entry of every shard of ``base`` from stream id ``since`` on, in entry id order, read in
    pages of ``chunk`` per shard."""
    shards = [_one_shard(client, key, since, chunk) for key in shard_keys(base, client)]
    if len(shards) == 1:
        return shards[0]
    return heapq.merge(*shards, key=lambda e: id_order(e[0]))


def last_entry(client: Any, base: str) -> Entry | None:
    """The entry with the highest id over every shard of ``base`` (None: all empty)."""
    found: list[Entry] = []
    for key in shard_keys(base, client):
        found += cast(StreamEntries, client.xrevrange(key, count=1))
    return max(found, key=lambda e: id_order(e[0]), default=None)


def length(client: Any, base: str) -> int:
    """Entries over every shard of ``base``."""
    return sum(int(client.xlen(key)) for key in shard_keys(base, client))


def base_of(key: str | bytes, bases: Iterable[str]) -> str:
    """The base stream a shard key (or a base key) belongs to; the key itself when none matches."""
    name = key.decode() if isinstance(key, bytes) else key
    for base in bases:
        if name == base or name.startswith(base + ":{shard:"):
            return base
    return name


def read_group(client: Any, group: str, consumer: str, bases: Iterable[str], count: int,
               noack: bool = False) -> StreamReadReply:
    """``XREADGROUP ... STREAMS <every shard of bases> >`` (no blocking): one call on one node, one call
    per shard on a cluster (keys of different slots cannot share a command). Stream names in the reply
    are shard keys; ``base_of`` maps them back."""
    keys = [key for base in bases for key in shard_keys(base, client)]
    if shard_count(client) == 1:
        return cast(StreamReadReply, client.xreadgroup(group, consumer, {k: ">" for k in keys}, count=count,
                                                       noack=noack)) or []
    reply: StreamReadReply = []
    for key in keys:
        reply += cast(StreamReadReply, client.xreadgroup(group, consumer, {key: ">"}, count=count, noack=noack)) or []
    return reply
