"""A customer's rows in the archive: erased (``erase_customers``) and exported (``customer_entries``).

Only the customer's shard is read: a stream entry of a customer is always on the shard
``engine.store.slots.shard_of`` names (0 on one node), so the files of the other shards cannot hold it.
Of that shard's files, those whose row-group statistics (the Parquet footer: min and max of the
customer columns) exclude every customer of the batch are not read further; the others are read and
filtered on the customer columns (``CUSTOMER_COLUMNS``) with pyarrow.

Erasure rewrites a file that holds some of the customers' rows without them, atomically and under the
same name (the name is the writer's checkpoint): an empty file when no row is left. It runs after the
streams were rewritten (``privacy.forget_customers``), holding the archive's files lock for the whole
pass, and increments the erasure generation before releasing it (``engine/store/archive_lock.py``): a
writer drops entries it read before and reads them again from the rewritten streams. Files a
compaction covered but has not removed yet are rewritten too. One pass serves a batch of customers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from engine.store.archive import RESERVED, STREAMS, ArchivedFile, read_table, shard_files, write_table
from engine.store.archive_fs import Root, local_path, open_read
from engine.store.archive_lock import ArchiveLocked, erased, files_lock
from engine.store.slots import shard_count, shard_of
from engine.store.streams import id_order

CUSTOMER_COLUMNS = ("customer_id", "customer")  # as engine/store/erasure.py CUSTOMER_FIELDS
LOCK_WAIT_SECONDS = 600.0


@dataclass
class ArchiveErasure:
    """What an erasure of the archive did: rows removed per customer, files read and rewritten, and every
    failure (a file named in each)."""

    rows: Counter[str] = field(default_factory=Counter)
    files_read: int = 0
    files_rewritten: int = 0
    failures: list[str] = field(default_factory=list)


def _may_hold(metadata: Any, columns: list[int], ids: list[str]) -> bool:
    """Whether a file's row-group statistics allow a row of ``ids`` in one of the ``columns``."""
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in columns:
            stats = group.column(c).statistics
            if stats is None or not stats.has_min_max:
                return True
            low, high = stats.min, stats.max
            low = low.decode() if isinstance(low, bytes) else str(low)
            high = high.decode() if isinstance(high, bytes) else str(high)
            if any(low <= i <= high for i in ids):
                return True
    return False


def _matches(path: Path | str, ids: list[str]) -> tuple[Any, Any] | None:
    """The file's table and the mask of the rows of ``ids``, or None when it holds none (often decided by
    the footer alone)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with open_read(path) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        columns = [c for c in CUSTOMER_COLUMNS if c in names]
        if not columns:
            return None
        leaves = [parquet.metadata.schema.names.index(c) for c in columns]
        if not _may_hold(parquet.metadata, leaves, ids):
            return None
    table = read_table(path)
    wanted = pa.array(ids, pa.string())
    mask = None
    for c in columns:
        hit = pc.fill_null(pc.is_in(table[c], value_set=wanted), False)
        mask = hit if mask is None else pc.or_(mask, hit)
    if mask is None or not pc.any(mask).as_py():
        return None
    return table, mask


def _owner(table: Any, mask: Any) -> list[str]:
    """Per masked row, the customer it is of."""
    rows = table.filter(mask)
    out: list[str] = []
    for i in range(rows.num_rows):
        for c in CUSTOMER_COLUMNS:
            if c in rows.column_names and rows[c][i].as_py() is not None:
                out.append(rows[c][i].as_py())
                break
    return out


def _by_shard(client: Any, ids: list[str]) -> dict[int, list[str]]:
    shards = shard_count(client)
    grouped: dict[int, list[str]] = {}
    for c in ids:
        grouped.setdefault(shard_of(c, shards), []).append(c)
    return grouped


def erase_customers(client: Any, root: Root | None, customers: Iterable[str],
                    heartbeat: Callable[[], None] | None = None) -> ArchiveErasure:
    """Remove every archived row of ``customers`` (see the module's docstring). Failures are collected,
    never raised. Run it after the streams were rewritten without the customers' entries."""
    out = ArchiveErasure()
    ids = sorted(set(customers))
    if root is None or not ids:
        return out
    here = local_path(root)
    if here is not None and not here.is_dir():
        return out  # no archive: a writer that starts now reads the streams as they are after their rewrite
    try:
        lock = files_lock(root, client).acquire(wait=LOCK_WAIT_SECONDS)
    except (ArchiveLocked, OSError, redis.exceptions.RedisError) as exc:
        out.failures.append(f"archive {root} not erased: its files lock: {exc}")
        return out
    try:
        for base in STREAMS:
            for shard, mine in sorted(_by_shard(client, ids).items()):
                try:
                    files = shard_files(root, base, shard, covered=True)
                except (OSError, ValueError) as exc:
                    out.failures.append(f"archive {root}: {STREAMS[base]} shard {shard} not listed: {exc}")
                    continue
                for f in files:
                    _erase_file(f, mine, out)
                    if heartbeat is not None:
                        heartbeat()
                    if not lock.renew():
                        out.failures.append(f"archive {root}: the files lock's lease ran out during the erasure")
                        return out
    finally:
        try:
            erased(client)  # before the lock is released: a writer drops what it read before (see above)
        except redis.exceptions.RedisError as exc:
            out.failures.append(f"archive {root}: erasure generation not incremented ({exc}): restart the "
                                f"archive writer")
        lock.release()
    return out


def _erase_file(f: ArchivedFile, ids: list[str], out: ArchiveErasure) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        out.files_read += 1
        found = _matches(f.path, ids)
        if found is None:
            return
        table, mask = found
        kept = table.filter(pc.invert(mask)).replace_schema_metadata(table.schema.metadata)
        owners = _owner(table, mask)
        write_table(f.path, kept)
    except (OSError, ValueError, pa.ArrowException) as exc:
        out.failures.append(f"archive file {f.path} not rewritten: {exc}")
        return
    out.files_rewritten += 1
    out.rows.update(owners)


def customer_entries(client: Any, root: Root | None, base: str, customer_id: str) -> list[tuple[str, dict[str, str]]]:
    """The archived entries of ``customer_id`` in stream ``base``, in id order: (entry id, its fields)."""
    if root is None or base not in STREAMS:
        return []
    shard = shard_of(customer_id, shard_count(client))
    found: list[tuple[str, dict[str, str]]] = []
    for f in shard_files(root, base, shard):
        match = _matches(f.path, [customer_id])
        if match is None:
            continue
        table, mask = match
        for row in table.filter(mask).to_pylist():
            entry_id = row.pop("_id")
            found.append((entry_id, {k: v for k, v in row.items() if v is not None and k not in RESERVED}))
    found.sort(key=lambda e: id_order(e[0]))
    return found
