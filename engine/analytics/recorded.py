"""Recorded traffic as DuckDB relations: the archive's Parquet files of a stream plus, per shard, the tail
Redis holds after the shard's last archived id (``engine/store/archive.py``'s rule, as ``read_entries``
reads it: each entry once), so reports and training aggregate in SQL instead of entry by entry in Python.

``Recorded(client, archive, since, until)`` opens one DuckDB connection (``archive.connect_duckdb``: it
knows the archive's filesystem); ``view(stream, columns)`` makes a view named after the stream with the
archive's reserved columns (``_id``, ``_ms``, ``_seq``, ``_shard``) and ``columns`` (strings; null where an
entry lacks the field, also where no entry has it). Without an archive the streams alone fill it (as an
Arrow table read from Redis). Ranges: ``since``/``until`` are XRANGE bounds (``-``, ``+``, ``<ms>``,
``<ms>-<seq>``) or UTC days (``YYYY-MM-DD``: ``since`` from the day's start, ``until`` to its end).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from engine.errors import NbaError
from engine.store.archive import ArchivedFile, bound, connect_duckdb, shard_parts, sql_list
from engine.store.profiles import StreamEntries
from engine.store.streams import id_order

RESERVED = ("_id", "_ms", "_seq", "_shard")
_BOUND = re.compile(r"^(-|\+|\d+(-\d+)?)$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
Id = tuple[int, int]


class RangeError(NbaError, ValueError):
    """A --since/--until that is neither a stream id bound nor a day."""


def stream_bound(text: str, low: bool, name: str = "--since") -> str:
    """``text`` as an XRANGE bound: stream ids pass as they are; a day ``YYYY-MM-DD`` (UTC) becomes its first
    ms as a lower bound, its last as an upper one."""
    text = (text or "").strip() or ("-" if low else "+")
    if _BOUND.match(text):
        return text
    if _DAY.match(text):
        try:
            start = calendar.timegm(time.strptime(text, "%Y-%m-%d")) * 1000
        except ValueError:
            raise RangeError(f"{name} {text}: not a calendar day") from None
        return str(start) if low else str(start + 86_400_000 - 1)
    raise RangeError(f"{name} {text!r}: expected a day (YYYY-MM-DD), a stream id (<ms> or <ms>-<seq>), - or +")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _tail(client: Any, key: str, start: str, high: Id, shard: int, columns: Sequence[str], chunk: int) -> dict:
    """The shard's entries from ``start`` up to ``high`` as columns (``columns`` only; missing: None)."""
    out: dict[str, list] = {name: [] for name in (*RESERVED, *columns)}
    wanted = [(name, name.encode()) for name in columns]
    while True:
        batch = cast(StreamEntries, client.xrange(key, min=start, max="+", count=chunk))
        for entry_id, fields in batch:
            pair = id_order(entry_id)
            if pair > high:
                return out
            out["_id"].append(entry_id.decode())
            out["_ms"].append(pair[0])
            out["_seq"].append(pair[1])
            out["_shard"].append(shard)
            for name, raw in wanted:
                value = fields.get(raw)
                out[name].append(None if value is None else value.decode())
        if len(batch) < chunk:
            return out
        start = "(" + batch[-1][0].decode()


class Recorded:
    """One DuckDB connection over recorded streams (see the module docstring). Close it (``with``)."""

    def __init__(self, client: Any, archive: Path | str | None = None, since: str = "-", until: str = "+",
                 chunk: int = 10_000) -> None:
        import duckdb

        self.client, self.archive, self.chunk = client, archive, chunk
        self.since, self.until = stream_bound(since, True), stream_bound(until, False, "--until")
        self.low, self.high = bound(self.since, True), bound(self.until, False)
        self.con = connect_duckdb(archive) if archive is not None else duckdb.connect()
        self.files: dict[str, list[ArchivedFile]] = {}  # per view: the archive's files it reads

    def __enter__(self) -> Recorded:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def view(self, base: str, columns: Sequence[str], name: str | None = None, since: str | None = None,
             until: str | None = None) -> str:
        """A view (named ``name``, default the stream's archive name) of ``base``'s entries in the range (or
        from ``since`` to ``until`` when given)."""
        import pyarrow as pa

        from engine.store.archive import STREAMS

        name = name or STREAMS.get(base, base.replace(":", "_"))
        low = self.low if since is None else bound(stream_bound(since, True), True)
        high = self.high if until is None else bound(stream_bound(until, False, "--until"), False)
        inside: list[ArchivedFile] = []
        tails: list[dict] = []
        for where in shard_parts(self.client, base, low, high, self.archive):
            inside += where.files
            if where.key is not None:
                tails.append(_tail(self.client, where.key, where.start, high, where.shard, columns, self.chunk))
        types = {"_id": pa.string(), "_ms": pa.int64(), "_seq": pa.int64(), "_shard": pa.int32()}
        tail = pa.table({c: pa.array([v for t in tails for v in t[c]], types.get(c, pa.string()))
                         for c in (*RESERVED, *columns)})
        self.con.register(f"{name}__tail", tail)
        empty = ", ".join(f"NULL::{t} AS {_quote(c)}" for c, t in
                          [("_id", "VARCHAR"), ("_ms", "BIGINT"), ("_seq", "BIGINT"), ("_shard", "INTEGER")]
                          + [(c, "VARCHAR") for c in columns])
        parts = [f"SELECT * FROM {_quote(name + '__tail')}", f"SELECT {empty} WHERE false"]
        if inside:
            parts.insert(0, f"SELECT * FROM read_parquet({sql_list(f.path for f in inside)}, union_by_name = true, "
                            f"hive_partitioning = false) WHERE (_ms, _seq) >= ({low[0]}, {low[1]}) "
                            f"AND (_ms, _seq) <= ({high[0]}, {high[1]})")
        wanted = ", ".join(_quote(c) for c in (*RESERVED, *columns))
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {_quote(name)} AS SELECT {wanted} FROM ("
                         + " UNION ALL BY NAME ".join(parts) + ")")
        self.files[name] = inside
        return name

    def sql(self, query: str, params: Sequence[Any] | None = None) -> Any:
        """Run ``query`` (statements separated by ``;``: the last one's result), ``params`` bound to ``?``."""
        return self.con.execute(query, params) if params is not None else self.con.execute(query)
