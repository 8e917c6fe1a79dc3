"""The archive: every entry of the decision, response and event streams, copied into Parquet files that
reports (and later training) read through DuckDB, so history outlives the streams' length cap.

Layout (``<data dir>/archive`` by default, or a URL: ``engine/store/archive_fs.py``)::

    <root>/<stream>/day=YYYY-MM-DD/s<shard>_<first id>_<last id>.parquet

``<stream>`` is ``decisions``, ``responses`` or ``events`` (``STREAMS``); ``day`` is the UTC day of the
entries' ids (a batch that spans midnight becomes one file per day); ``<shard>`` the stream shard's index
(``engine.store.slots``: 0 on one node, 0..15 on a cluster); the ids are the first and last Redis entry
ids in the file (``<ms>-<seq>``).

Schema, version ``SCHEMA_VERSION`` (1), in each file's metadata as ``nba.schema_version`` (with
``nba.stream``, the base stream key): ``_id`` (string, the entry id), ``_ms`` and ``_seq`` (int64, its two
halves: ``_ms`` is the entry's time in ms since the epoch, Redis's clock), ``_shard`` (int32), then one
nullable string column per field of the entries, named and valued as in the stream (a field an entry does
not have is null). Files of one stream may differ in their field columns: read them by name
(``union_by_name`` in DuckDB, ``mergeSchema`` in Spark).

Exactly once as readers see it: a file is written under a temporary name (``.tmp-*``), fsynced, renamed
and its directory fsynced; the files' names are the checkpoint (the writer resumes after the highest last
id per stream shard), so a crash at any point loses nothing still in Redis and duplicates nothing;
temporary files left by a crash are removed when a writer opens the archive. On object storage a file is
one PUT of the whole object under its final name (atomic there). One writer per archive, and one process
at a time changing files (``engine/store/archive_lock.py``). Redis ids only grow within a stream, so
nothing can appear behind an archived id.

A file's name is its id range, kept when its content changes: an erasure
(``engine/store/archive_erasure.py``) rewrites a file without the erased customers' rows under the same
name (an empty file when none is left), so the checkpoint stays. Compaction
(``engine/store/archive_compact.py``) merges a day's files of a shard into one named by the first's first
id and the last's last id, then removes the parts: a reader ignores a file whose id range lies inside
another file's of the same shard (``archived_files``), so a crash between the two steps doubles nothing.

Trimming: after writing, the writer trims each shard it archived to the first id not archived
(``XTRIM MINID``), keeping ``keep_seconds`` of the newest entries for live readers and every entry a
consumer group (exploration counts) has not read yet. ``STREAM_MAXLEN`` stays on every ``XADD`` as the
memory safety cap: if the archive falls behind by more than that (a stopped writer), the entries past it
are trimmed unarchived and lost to the archive; the lag alerts fire long before.

``read_entries`` is ``streams.xrange_all`` over the archive plus the not yet archived tail in Redis.
"""

from __future__ import annotations

import heapq
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from engine.errors import NbaError
from engine.metrics import ARCHIVE_FILES, ARCHIVE_LAG_ENTRIES, ARCHIVE_LAG_SECONDS, ARCHIVED_ENTRIES
from engine.store.archive_fs import (
    TMP_PREFIX,
    Root,
    connect_duckdb,
    isdir,
    join,
    listdir,
    local_path,
    name_of,
    open_read,
    write_atomic,
)
from engine.store.archive_lock import ArchiveLocked, Lock, erasures, files_lock, writer_lock
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, RESPONSES_STREAM, StreamEntries
from engine.store.slots import shard_keys
from engine.store.streams import Entry, id_order

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STREAMS: dict[str, str] = {DECISIONS_STREAM: "decisions", RESPONSES_STREAM: "responses", EVENTS_STREAM: "events"}
RESERVED = ("_id", "_ms", "_seq", "_shard")
_FILE = re.compile(r"^s(\d+)_(\d+)-(\d+)_(\d+)-(\d+)\.parquet$")
_MAX = 2**63 - 1
_MAX_DAY_MS = 253_402_300_800_000  # 10000-01-01: an upper bound past it is no bound on the days

Id = tuple[int, int]


class ArchiveError(NbaError):
    """The archive cannot be written (another writer holds it, a field name clashes with a column)."""


@dataclass(frozen=True)
class ArchivedFile:
    """A file of the archive: its shard, the id range its name gives (the entries it covers; it may hold
    fewer, after an erasure) and its path (a ``Path``, or a URL string on object storage: ``str(path)``
    is what DuckDB reads through ``connect_duckdb``)."""

    shard: int
    first: Id
    last: Id
    path: Path | str


def default_root(data_dir: Path) -> Path:
    return data_dir / "archive"


def stream_dir(root: Root, base: str) -> Path | str:
    return join(root, STREAMS.get(base, base.replace(":", "_")))


def _id_text(pair: Id) -> str:
    return f"{pair[0]}-{pair[1]}"


def bound(text: str, low: bool = True) -> Id:
    """A stream id bound as XRANGE takes it (``-``, ``+``, ``<ms>`` or ``<ms>-<seq>``) as a pair; a bare
    ``<ms>`` is the ms's first id as a lower bound, its last as an upper one."""
    if text in ("-", "+"):
        return (0, 0) if text == "-" else (_MAX, _MAX)
    ms, sep, seq = text.partition("-")
    return int(ms), int(seq) if sep else (0 if low else _MAX)


def _days(root: Root, base: str, low: Id | None = None, high: Id | None = None) -> list[Path | str]:
    """The stream's day directories, oldest first; with bounds, only the days they can hold entries of."""
    first = _day(low[0]) if low is not None else ""
    last = _day(high[0]) if high is not None and high[0] < _MAX_DAY_MS else "~"
    days = [(name_of(d), d) for d, is_dir in listdir(stream_dir(root, base)) if is_dir]
    return [d for name, d in sorted(days) if name.startswith("day=") and first <= name[4:] <= last]


def _files(day: Path | str, shard: int | None = None) -> Iterator[ArchivedFile]:
    for path, is_dir in listdir(day):
        match = _FILE.match(name_of(path))
        if match and not is_dir:
            s, a, b, c, d = (int(g) for g in match.groups())
            if shard is None or s == shard:
                yield ArchivedFile(s, (a, b), (c, d), path)


def _covering(files: list[ArchivedFile]) -> tuple[list[ArchivedFile], list[ArchivedFile]]:
    """One shard's files split into those a reader reads, in id order, and those whose id range lies inside
    another's (parts a compaction merged and has not removed yet)."""
    read: list[ArchivedFile] = []
    covered: list[ArchivedFile] = []
    for f in sorted(files, key=lambda f: (f.first, -f.last[0], -f.last[1])):
        if read and f.last <= read[-1].last:
            covered.append(f)
        else:
            read.append(f)
    return read, covered


def shard_files(root: Root, base: str, shard: int, covered: bool = False) -> list[ArchivedFile]:
    """Every file of one shard of ``base`` (all days), in id order; with ``covered``, those a reader
    ignores too."""
    found = [f for day in _days(root, base) for f in _files(day, shard)]
    read, ignored = _covering(found)
    return sorted(read + ignored, key=lambda f: f.first) if covered else read


def archived_files(root: Root, base: str, low: Id | None = None, high: Id | None = None) -> dict[int, list[ArchivedFile]]:
    """The archive's files of ``base`` per shard, in id order (found by name: no file is opened); with bounds,
    those of the days from ``low``'s to ``high``'s. A file whose id range lies inside another's of its
    shard is left out (see the module's docstring)."""
    found: dict[int, list[ArchivedFile]] = {}
    for day in _days(root, base, low, high):
        for f in _files(day):
            found.setdefault(f.shard, []).append(f)
    return {shard: _covering(files)[0] for shard, files in found.items()}


def checkpoints(root: Root, base: str, shards: int | None = None) -> dict[int, Id]:
    """Per shard of ``base``, the highest entry id archived: the newest days are read until ``shards``
    shards are found (all days when None, or when some shard has no file)."""
    found: dict[int, Id] = {}
    for day in reversed(_days(root, base)):
        for f in _files(day):
            if f.last > found.get(f.shard, (-1, -1)):
                found[f.shard] = f.last
        if shards is not None and len(found) >= shards:
            break
    return found


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000))


def write_table(path: Path | str, table: Any) -> None:
    """``table`` as the Parquet file ``path``, atomically (``archive_fs.write_atomic``)."""
    import pyarrow.parquet as pq

    write_atomic(path, lambda out: pq.write_table(table, out, compression="zstd"))


def read_table(path: Path | str, columns: list[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    with open_read(path) as f:
        return pq.read_table(f, columns=columns)


def file_name(shard: int, first: Id, last: Id) -> str:
    return f"s{shard}_{_id_text(first)}_{_id_text(last)}.parquet"


def write_file(root: Root, base: str, shard: int, entries: StreamEntries) -> Path | str:
    """One file of ``entries`` (one shard, one day, in id order), atomically."""
    import pyarrow as pa

    ids = [e[0].decode() for e in entries]
    pairs = [id_order(i) for i in ids]
    columns: dict[str, list[str | None]] = {}
    for row, (_, fields) in enumerate(entries):
        for key, value in fields.items():
            name = key.decode()
            column = columns.get(name)
            if column is None:
                if name in RESERVED:
                    raise ArchiveError(f"{base}: field {name!r} clashes with the archive's column of that name")
                column = columns[name] = [None] * len(entries)
            column[row] = value.decode()
    table = pa.table(
        {"_id": pa.array(ids, pa.string()), "_ms": pa.array([p[0] for p in pairs], pa.int64()),
         "_seq": pa.array([p[1] for p in pairs], pa.int64()), "_shard": pa.array([shard] * len(ids), pa.int32())}
        | {name: pa.array(values, pa.string()) for name, values in columns.items()})
    table = table.replace_schema_metadata({"nba.schema_version": str(SCHEMA_VERSION), "nba.stream": base})
    path = join(root, name_of(stream_dir(root, base)), f"day={_day(pairs[0][0])}", file_name(shard, pairs[0], pairs[-1]))
    write_table(path, table)
    return path


@dataclass
class _Shard:
    base: str
    index: int
    key: str
    after: Id | None  # the last archived id (None: nothing yet)
    buffer: StreamEntries = field(default_factory=list)  # read, not yet written (in id order)
    at_end: bool = False  # the last read reached the stream's head: the buffer is all that waits
    since_flush: float = field(default_factory=time.monotonic)
    generation: int = 0  # the erasure generation noted before the buffer's first entry was read
    trimmed: Id | None = None  # the MINID of the last trim


class ArchiveWriter:
    """Copies ``streams`` (base keys; all their shards) into the archive at ``root``. ``step`` writes a file
    per shard once ``file_entries`` entries wait or ``flush_seconds`` passed since its last file; ``once``
    archives everything up to the streams' heads; ``run`` steps until stopped. Open it (``with``) first.
    At most ``file_entries`` entries per shard are held in memory. With ``trim``, each shard is trimmed
    after its files are written (see the module's docstring), keeping ``keep_seconds`` of its newest
    entries."""

    def __init__(self, client: redis.Redis, root: Root, streams: Iterable[str] = tuple(STREAMS),
                 file_entries: int = 20_000, flush_seconds: float = 60.0, chunk: int = 5_000,
                 trim: bool = True, keep_seconds: float = 0.0) -> None:
        self.client = client
        self.root: Root = local_path(root) or root
        self.streams = tuple(streams)
        self.file_entries, self.flush_seconds, self.chunk = max(1, file_entries), flush_seconds, max(1, chunk)
        self.trim, self.keep_seconds = trim, max(0.0, keep_seconds)
        self._lock: Lock | None = None
        self._shards: list[_Shard] = []

    def __enter__(self) -> ArchiveWriter:
        self.open()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def open(self) -> None:
        """Take the archive's lock, remove what a crashed writer left half-written, find the checkpoints."""
        here = local_path(self.root)
        if here is not None:
            here.mkdir(parents=True, exist_ok=True)
        try:
            lock = writer_lock(self.root, self.client).acquire()
        except ArchiveLocked:
            raise ArchiveError(f"another archive writer holds {self.root}") from None
        self._lock = lock
        try:
            if here is not None:
                with files_lock(self.root, self.client).acquire(wait=600.0):  # an erasure's own are in use
                    for tmp in here.glob(f"*/day=*/{TMP_PREFIX}*"):
                        log.info("archive: removing %s, left by a writer that stopped mid-file", tmp)
                        tmp.unlink(missing_ok=True)
            self._shards = []
            for base in self.streams:
                keys = shard_keys(base, self.client)
                done = checkpoints(self.root, base, len(keys))
                self._shards += [_Shard(base, i, key, done.get(i)) for i, key in enumerate(keys)]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _fill(self, shard: _Shard, head: str = "+", generation: int | None = None) -> None:
        """Read the shard's next entries (up to ``head``) into its buffer until it holds ``file_entries``;
        ``generation``: the erasure generation noted before this read."""
        if not shard.buffer:
            shard.generation = erasures(self.client) if generation is None else generation
        last = shard.buffer[-1][0].decode() if shard.buffer else None
        start = "(" + last if last else "-" if shard.after is None else "(" + _id_text(shard.after)
        while len(shard.buffer) < self.file_entries:
            want = min(self.chunk, self.file_entries - len(shard.buffer))
            batch = cast(StreamEntries, self.client.xrange(shard.key, min=start, max=head, count=want))
            shard.buffer += batch
            shard.at_end = len(batch) < want
            if shard.at_end:
                return
            start = "(" + batch[-1][0].decode()

    def _write(self, shard: _Shard) -> int:
        with files_lock(self.root, self.client).acquire(wait=600.0):
            if erasures(self.client) != shard.generation:  # an erasure ran since these were read: read again
                shard.buffer, shard.at_end = [], False
                return 0
            entries, shard.buffer = shard.buffer[:self.file_entries], shard.buffer[self.file_entries:]
            start = 0
            try:
                for i in range(1, len(entries) + 1):  # one file per UTC day
                    if i == len(entries) or _day(id_order(entries[i][0])[0]) != _day(id_order(entries[start][0])[0]):
                        write_file(self.root, shard.base, shard.index, entries[start:i])
                        shard.after = id_order(entries[i - 1][0])
                        ARCHIVE_FILES.labels(STREAMS.get(shard.base, shard.base)).inc()
                        start = i
            except BaseException:
                shard.buffer, shard.at_end = [], False  # read again from the last file written
                raise
        shard.since_flush = time.monotonic()
        ARCHIVED_ENTRIES.labels(STREAMS.get(shard.base, shard.base)).inc(len(entries))
        self._trim(shard)
        return len(entries)

    def _trim(self, shard: _Shard) -> None:
        """``XTRIM MINID`` the shard to its first entry not archived, keeping ``keep_seconds`` of its newest
        entries and every entry a consumer group has not read yet."""
        if not self.trim or shard.after is None:
            return
        minid: Id = (shard.after[0], shard.after[1] + 1)
        if self.keep_seconds > 0:
            head = cast(StreamEntries, self.client.xrevrange(shard.key, count=1))
            if head:
                minid = min(minid, (id_order(head[0][0])[0] - int(self.keep_seconds * 1000), 0))
        try:
            groups: list[dict[str, Any]] = self.client.xinfo_groups(shard.key)
        except redis.ResponseError:  # no such stream
            return
        for group in groups:
            read = id_order(group["last-delivered-id"])
            minid = min(minid, (read[0], read[1] + 1))
        if shard.trimmed is not None and minid <= shard.trimmed:
            return
        self.client.xtrim(shard.key, minid=_id_text(minid), approximate=False)
        shard.trimmed = minid

    def _opened(self) -> None:
        if self._lock is None:
            raise ArchiveError("open the archive writer first")
        if not self._lock.renew():
            raise ArchiveError(f"the archive writer's lease on {self.root} ran out: another writer may hold it")

    def step(self, final: bool = False, budget: float = 30.0) -> int:
        """Write every file that is due (all that waits when ``final``), for at most about ``budget``
        seconds; the entries archived. Updates the lag gauges."""
        self._opened()
        deadline = time.monotonic() + budget
        written = 0
        generation = erasures(self.client)
        for shard in self._shards:
            while time.monotonic() < deadline:
                self._fill(shard, generation=generation)
                due = len(shard.buffer) >= self.file_entries or bool(shard.buffer) and (
                    final or time.monotonic() - shard.since_flush >= self.flush_seconds)
                if not due:
                    break
                done = self._write(shard)
                if not done and not shard.buffer:  # dropped after an erasure: read again
                    generation = erasures(self.client)
                written += done
            if shard.trimmed is None:
                self._trim(shard)  # what an earlier writer archived
        self._measure()
        return written

    def once(self) -> int:
        """Archive every entry up to each shard's head as it is now, in files of at most ``file_entries``."""
        self._opened()
        written = 0
        for shard in self._shards:
            last = cast(StreamEntries, self.client.xrevrange(shard.key, count=1))
            if not last:
                continue
            head = last[0][0].decode()
            while True:
                self._fill(shard, head)
                if not shard.buffer:
                    break
                written += self._write(shard)
            shard.at_end = False  # read up to the head as it was, not as it is
            self._trim(shard)
        self._measure()
        return written

    def run(self, stop: threading.Event, poll: float = 1.0) -> None:
        """``step`` every ``poll`` seconds until ``stop`` is set, then archive what waits. A failure (Redis
        unreachable, a full disk) is logged and retried: the lag metrics and alerts show one that lasts. A
        lost lease (object storage) ends the run: ``nba archive run`` exits, and its supervisor restarts it."""
        while not stop.is_set():
            try:
                self.step()
            except ArchiveError as exc:  # the lease ran out: writing on could double what another writer writes
                log.error("archive: %s; this writer stops (a restart takes the lock again once it is free)", exc)
                return
            except redis.RedisError as exc:
                log.warning("archive: %s (retrying in %.0f s)", exc, poll)
            except Exception:  # the thread must not end quietly in nba serve
                log.exception("archive: writing failed (retrying in %.0f s)", poll)
            stop.wait(poll)
        try:
            self.step(final=True, budget=10.0)
        except Exception as exc:
            log.warning("archive: last flush failed: %s", exc)

    def _measure(self) -> dict[str, tuple[int, float]]:
        """Lag per stream: entries not archived and seconds from the last archived entry to the head. A shard
        whose unarchived entries were not all read (more than a file's worth waits) is estimated from its
        length, as if its entries arrived evenly between its first entry and its head."""
        lag: dict[str, tuple[int, float]] = {}
        for shard in self._shards:
            entries, seconds = 0, 0.0
            try:
                info: dict[str, Any] = self.client.xinfo_stream(shard.key)
            except redis.ResponseError:  # no such stream yet
                info = {}
            head, first = info.get("last-entry"), info.get("first-entry")
            if head and first:
                head_id, first_id = id_order(head[0]), id_order(first[0])
                after = shard.after if shard.after is not None and shard.after >= first_id else None
                if after is None or after < head_id:
                    oldest = id_order(shard.buffer[0][0]) if shard.buffer else after or first_id
                    seconds = max(0.0, (head_id[0] - oldest[0]) / 1000)
                    length = int(info.get("length", 0))
                    if shard.at_end:
                        entries = len(shard.buffer)
                    elif after is None:
                        entries = length
                    else:
                        share = (head_id[0] - after[0]) / max(1, head_id[0] - first_id[0])
                        entries = max(len(shard.buffer), min(length, round(length * share)))
            name = STREAMS.get(shard.base, shard.base)
            total, worst = lag.get(name, (0, 0.0))
            lag[name] = (total + entries, max(worst, seconds))
        for name, (entries, seconds) in lag.items():
            ARCHIVE_LAG_ENTRIES.labels(name).set(entries)
            ARCHIVE_LAG_SECONDS.labels(name).set(seconds)
        return lag

    def lag(self) -> dict[str, tuple[int, float]]:
        """Entries and seconds behind the head per stream, measured now (reads what waits, up to one file's
        worth per shard)."""
        self._opened()
        for shard in self._shards:
            self._fill(shard)
        return self._measure()


# --- reading -------------------------------------------------------------------------------------------

def sql_list(paths: Iterable[Path | str]) -> str:
    """``paths`` as a DuckDB list literal (for ``read_parquet``)."""
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


@dataclass(frozen=True)
class ShardPart:
    """Where a shard's entries of a range are: the archived ``files`` that hold some, then the Redis
    stream ``key`` from ``start`` (XRANGE) on, after the shard's last archived id (``key`` None: the shard
    is gone from Redis)."""

    shard: int
    files: list[ArchivedFile]
    key: str | None
    start: str


def shard_parts(client: Any, base: str, low: Id, high: Id, root: Root | None) -> list[ShardPart]:
    """Per shard of ``base``, what to read so that each entry from ``low`` to ``high`` comes once."""
    files = archived_files(root, base, low, high) if root is not None else {}
    keys = shard_keys(base, client)
    parts = []
    for shard in sorted(set(range(len(keys))) | set(files)):
        mine = files.get(shard, [])
        after = mine[-1].last if mine else None
        parts.append(ShardPart(
            shard, [f for f in mine if f.last >= low and f.first <= high], keys[shard] if shard < len(keys) else None,
            "(" + _id_text(after) if after is not None and after >= low else _id_text(low)))
    return parts


def _from_files(root: Root, files: list[ArchivedFile], low: Id, high: Id, batch: int = 10_000) -> Iterator[Entry]:
    con = connect_duckdb(root)
    try:
        reader = con.sql(
            f"SELECT * FROM read_parquet({sql_list(f.path for f in files)}, union_by_name = true, hive_partitioning = false) "
            f"WHERE (_ms, _seq) >= ({low[0]}, {low[1]}) AND (_ms, _seq) <= ({high[0]}, {high[1]}) ORDER BY _ms, _seq"
        ).to_arrow_reader(batch)
        for record_batch in reader:
            columns = record_batch.to_pydict()
            ids = columns.pop("_id")
            for name in RESERVED[1:]:
                columns.pop(name, None)
            named = [(name.encode(), values) for name, values in columns.items()]
            for row, entry_id in enumerate(ids):
                yield entry_id.encode(), {key: values[row].encode() for key, values in named
                                          if values[row] is not None}
    finally:
        con.close()


def _from_redis(client: Any, key: str, start: str, high: Id, chunk: int) -> Iterator[Entry]:
    while True:
        batch = cast(StreamEntries, client.xrange(key, min=start, max="+", count=chunk))
        for entry in batch:
            if id_order(entry[0]) > high:
                return
            yield entry
        if len(batch) < chunk:
            return
        start = "(" + batch[-1][0].decode()


def read_entries(client: Any, base: str, since: str = "-", root: Root | None = None, until: str = "+",
                 chunk: int = 5_000) -> Iterator[Entry]:
    """Every entry of ``base`` with an id from ``since`` to ``until`` (XRANGE bounds; a bare ms is that
    whole ms), as ``streams.xrange_all`` yields them (id, fields as bytes; all shards merged in id order):
    from the archive at ``root`` and, per shard, from Redis after the shard's last archived id, so each
    entry comes once (by shard and entry id). Without an archive, the streams alone."""
    low, high = bound(since, True), bound(until, False)
    parts: list[Iterator[Entry]] = []
    for where in shard_parts(client, base, low, high, root):
        part: list[Iterator[Entry]] = [_from_files(root, where.files, low, high)] if where.files and root is not None else []
        if where.key is not None:
            part.append(_from_redis(client, where.key, where.start, high, chunk))
        parts.append(_chain(part))
    if len(parts) == 1:
        return parts[0]
    return heapq.merge(*parts, key=lambda e: id_order(e[0]))


def _chain(parts: list[Iterator[Entry]]) -> Iterator[Entry]:
    for part in parts:
        yield from part


def has_archive(root: Root | None) -> bool:
    """Whether ``root`` holds an archive (any stream's directory)."""
    return root is not None and any(isdir(stream_dir(root, base)) for base in STREAMS)
