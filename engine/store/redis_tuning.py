"""The Redis settings the key layout is sized for (CAPACITY.md): the compact encodings' value limit.

A hash (a minute's bucket of decision records, a contact history) or a sorted set (an event history, a
customer's index) stays one compact listpack while it has at most 128 entries of at most
``COMPACT_VALUE_BYTES`` bytes each; past either it becomes a hash table or a skiplist, two to three times
the memory, and stays so. Redis's default value limit, 64 bytes, is shorter than a decision record with
two responses or an event with a longer text attribute. A listpack is scanned linearly: 128 entries of
128 bytes is 16 KB at most per lookup.
"""

from __future__ import annotations

COMPACT_VALUE_BYTES = 128


def encoding_directives() -> str:
    """``redis.conf`` lines (the ``ziplist`` names: Redis 6.2 knows only them, 7.x takes them as aliases of
    ``listpack``)."""
    return (f"hash-max-ziplist-value {COMPACT_VALUE_BYTES}\n"
            f"zset-max-ziplist-value {COMPACT_VALUE_BYTES}\n")
