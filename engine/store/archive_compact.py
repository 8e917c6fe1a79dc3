"""Compaction: a closed day's files of a stream shard merged into one (``nba archive compact``); retention:
the days before a date removed (``nba archive prune``).

The writer writes a file per shard per flush, so a day holds up to thousands of small files. Compaction
merges a day's files of one shard into one file named by the first file's first id and the last file's
last id, written atomically, and then removes the parts. Between the two steps the merged file's id range
covers every part's: a reader ignores a file whose range lies inside another's of its shard
(``archive.archived_files``), so a crash there doubles nothing, and the next compaction removes the
parts it left. Each merge holds the archive's files lock (``archive_lock.py``), so it never races an
erasure or the writer.

Pruning removes every file of the days before the date, except each stream shard's newest file: the
files' names are the writer's checkpoint (``archive.checkpoints``), so a shard whose last entry is older
than the date keeps that one file (emptied of rows, so nothing older than the date is read, but named as
it was), and the writer resumes after it instead of archiving the shard's stream from its start again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.store.archive import (
    SCHEMA_VERSION,
    STREAMS,
    ArchivedFile,
    ArchiveError,
    _covering,
    _days,
    _files,
    checkpoints,
    file_name,
    read_table,
    write_table,
)
from engine.store.archive_fs import Root, listdir, local_path, name_of, parent_of, remove
from engine.store.archive_lock import files_lock

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass
class Compacted:
    """Files of the compacted days before and after, and the merges done."""

    files_before: int = 0
    files_after: int = 0
    merged: int = 0


def parse_day(text: str) -> str:
    if not _DAY.match(text):
        raise ArchiveError(f"--before: {text!r} is not a day (YYYY-MM-DD)")
    return text


def merge(root: Root, files: list[ArchivedFile], base: str, remove_parts: bool = True) -> ArchivedFile:
    """One file of ``files`` (one shard and day, the files a reader reads, in id order); the parts removed
    after it is written unless not ``remove_parts`` (a crash's state, for tests)."""
    import pyarrow as pa

    tables = [read_table(f.path) for f in files]
    table = pa.concat_tables(tables, promote_options="default")
    table = table.replace_schema_metadata({"nba.schema_version": str(SCHEMA_VERSION), "nba.stream": base})
    first, last = files[0].first, max(f.last for f in files)
    parent, name = parent_of(files[0].path), file_name(files[0].shard, first, last)
    path = parent / name if isinstance(parent, Path) else f"{parent}/{name}"
    write_table(path, table)
    if remove_parts:
        for f in files:
            if name_of(f.path) != name_of(path):
                remove(f.path)
    return ArchivedFile(files[0].shard, first, last, path)


def compact(client: object, root: Root, before: str, streams: tuple[str, ...] = tuple(STREAMS)) -> Compacted:
    """Merge every day before ``before`` (``YYYY-MM-DD``): one file per stream shard and day."""
    parse_day(before)
    out = Compacted()
    for base in streams:
        for day in _days(root, base):
            if name_of(day)[4:] >= before:
                continue
            shards = sorted({f.shard for f in _files(day)})
            for shard in shards:
                with files_lock(root, client).acquire(wait=600.0):
                    found = list(_files(day, shard))  # as they are now, under the lock
                    read, covered = _covering(found)
                    out.files_before += len(found)
                    if len(read) > 1:
                        merge(root, read, base)
                        out.merged += 1
                    for f in covered:  # left by a compaction that stopped before removing them
                        remove(f.path)
                    out.files_after += 1 if read else 0
    return out


@dataclass
class Pruned:
    """Day directories and files removed, and the shards' newest files kept as emptied checkpoints."""

    days: int = 0
    files: int = 0
    checkpoints_kept: int = 0


def prune(client: object, root: Root, before: str, streams: tuple[str, ...] = tuple(STREAMS)) -> Pruned:
    """Remove the archive's days before ``before`` (``YYYY-MM-DD``), keeping each shard's newest file as an
    empty checkpoint (see the module's docstring)."""
    parse_day(before)
    out = Pruned()
    for base in streams:
        with files_lock(root, client).acquire(wait=600.0):
            newest = checkpoints(root, base)
            for day in _days(root, base):
                if name_of(day)[4:] >= before:
                    break
                kept = False
                for f in list(_files(day)):
                    if f.last == newest.get(f.shard):
                        table = read_table(f.path)
                        if table.num_rows:
                            write_table(f.path, table.slice(0, 0))
                        out.checkpoints_kept += 1
                        kept = True
                    else:
                        remove(f.path)
                        out.files += 1
                if not kept:
                    _remove_dir(day)
                    out.days += 1
    return out


def _remove_dir(day: Path | str) -> None:
    """An emptied day directory (on object storage a prefix with no files left is gone already)."""
    local = local_path(day)
    if local is not None and not any(True for _ in listdir(day)):
        local.rmdir()
