"""Bulk import of customers from CSV or Parquet into profile hashes (``nba import customers FILE``).

The rule directory's domain.yaml (a ``FeatureSchema``) says what a column may hold. The file is read in
chunks (CSV: 4 MiB blocks, Parquet: 65,536 rows), each chunk is checked column by column with pyarrow
and numpy (no Python per cell unless a cell is bad) and its good rows are written at once:

- **Columns.** A column named like an attribute feeds it (exact name first, else the same name up to
  case and surrounding spaces); the id column is ``customer_id`` unless named otherwise; explicit
  ``COLUMN=ATTRIBUTE`` pairs come first (a column of an attribute's own name that an explicit pair has
  taken is then ignored). Columns that feed nothing are reported once as ignored; attributes no column
  feeds take their default for every customer.
- **Cells.** Surrounding spaces are trimmed. An empty cell (or a Parquet null) takes the attribute's
  default: a number its declared default (else 0), a category its default level (else ""), a date
  unknown (NaN), a set no member. Numbers must parse, be finite and lie within the declared bounds
  (bounds included). Categories must be a declared level (exact spelling). Dates are ISO 8601 dates or
  date-times: ``2024-05-31``, ``2024-05-31T14:30``, ``2024-05-31 14:30:00.5+02:00``; a date-time with
  an offset (or ``Z``) is converted to UTC, one without is taken as UTC; stored as days since
  1970-01-01 (fractional). Parquet date and timestamp columns are taken as they are (naive = UTC).
- **Sets** (``products``, ``consent``): a cell lists members separated by ``,`` ``;`` or ``|`` (any of
  them, mixed; spaces around members ignored; a member listed twice counts once). A separator that
  is part of a declared member's name does not separate for that attribute (members never contain
  ``,``). A Parquet list<string> column is taken as the members. ``consent`` members are channel names.
- **Ids**: at most 128 characters, no spaces, tabs, newlines or braces (as ``Decide`` accepts them). An
  id seen again in the file is rejected on every later row ("duplicate of row N"): the first row of
  an id is the one that counts, whether or not it loads itself.
- **Rows** are numbered as data records: the header is row 0, the first customer row 1 (for a CSV
  without quoted line breaks, row N is line N + 1); a Parquet row i (from 0) is row i + 1. A CSV line
  that is empty (or whose every cell is) is skipped, and counted in the numbering; a CSV row with too
  many or too few cells is rejected as a whole (column ``*``).

A row with any bad cell is rejected with every bad cell reported (``Rejected``: file, row, column,
value, why) and writes nothing; good rows are written whole: each customer's hash is replaced at once
by the same script as ``ProfileStore.save`` (``_SAVE_PROFILE``: DEL + HSET), so a decision never reads
a half-written profile and importing a file again writes the same hashes (idempotent). Fields not in
domain.yaml are not kept: open case ids (``cases``) are written empty, as for any profile saved whole.
On one Redis node the EVALSHA commands of a chunk's good rows are assembled at once by pyarrow
(``binary_join_element_wise`` of the packed float32 matrix, the ids and the level and member tables)
and sent pre-packed in batches of 2,000 customers on a connection of the client's pool; up to 16,000
customers stay unanswered, so Redis works while the next chunk is checked, and the replies are parsed
by a hiredis reader of our own (``read_response`` would cost as much Python per customer as Redis
spends running the script). On a Redis Cluster they go through the client's cluster pipeline, which
routes each customer to its node (slower, the same hashes).

A file that cannot be used (missing, unknown suffix, no id column, a header naming a column twice, a
map naming an unknown column or attribute) is an ``ImportRefused`` before anything is written; a file
that breaks off mid-way (e.g. a truncated gzip) stops the import there with an ``ImportRefused`` that
says how many profiles before it were written.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import hiredis
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import redis

from engine.errors import NbaError
from engine.features import SCHEMA_VERSION, FeatureSchema
from engine.store.profiles import _SAVE_PROFILE, _SAVE_SHA, ProfileStore, is_cluster

ID_COLUMN = "customer_id"
BATCH = 2_000  # customers per pipeline
MAX_ID_LENGTH = 128  # as engine/decision/request.py (which the store layer may not import)
SEPARATORS = ",;|"  # between the members of a set in one cell
ROW = "*"  # Rejected.column of a CSV row that has the wrong number of cells
SHOWN = 20  # rejections render() lists
JSON_REJECTIONS = 1_000  # rejections as_dict() lists (the count is always there)
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")

_CSV_BLOCK = 4 << 20
_PARQUET_ROWS = 65_536
_IN_FLIGHT = 16_000  # customers sent and not answered yet, at most (plus one batch)
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(?i:nan|inf|infinity)$"
_ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d{1,9})?)?)?([zZ]|[+-]\d{2}(:?\d{2})?)?)?$"
_ZONED = r"[T ]\d{2}.*([zZ]|[+-]\d{2}(:?\d{2})?)$"
_BAD_ID = r"[{}\t\n\r ]"
_F32_MAX = float(np.finfo(np.float32).max)
_US_PER_DAY = 86_400_000_000


class ImportRefused(NbaError, ValueError):
    """The file cannot be imported: missing, unreadable, no id column (nothing written), or it broke off
    mid-way (the message says how many profiles before that were written)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """One bad cell (``column`` "*": a CSV row with the wrong number of cells); its row is not loaded."""

    file: str
    row: int  # data row, 1-based; the header is row 0
    column: str
    value: str
    why: str

    def render(self) -> str:
        return f"{self.file}:{self.row}:{self.column}: {self.why} (value {self.value!r})"


@dataclass
class ImportReport:
    """What an import did: ``rows`` data rows read, ``loaded`` of them written, ``rejected`` bad cells."""

    file: str
    rows: int = 0
    loaded: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    ignored: tuple[str, ...] = ()  # columns that feed no attribute
    mapping: dict[str, str] = field(default_factory=dict)  # column -> attribute
    defaulted: tuple[str, ...] = ()  # attributes no column feeds: their default for every customer
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Profiles written per second, reading and checking included."""
        return self.loaded / self.seconds if self.seconds > 0 else 0.0

    @property
    def rejected_rows(self) -> int:
        return len({r.row for r in self.rejected})

    def render(self, shown: int = SHOWN) -> str:
        lines = [f"{self.file}: {self.loaded:,} of {self.rows:,} rows loaded in {self.seconds:.2f}s "
                 f"({self.rate:,.0f} profiles/s); {self.rejected_rows:,} rows rejected"]
        if self.ignored:
            lines.append("ignored columns (no attribute of domain.yaml; map one with --map COLUMN=ATTRIBUTE): "
                         + ", ".join(self.ignored))
        if self.defaulted:
            lines.append("attributes not in the file (their default for every customer): " + ", ".join(self.defaulted))
        if self.rejected:
            lines.append(f"rejected cells (first {min(shown, len(self.rejected))} of {len(self.rejected):,}):")
            lines += ["  " + r.render() for r in self.rejected[:shown]]
            if len(self.rejected) > shown:
                lines.append(f"  ... and {len(self.rejected) - shown:,} more (--report FILE writes them all)")
        return "\n".join(lines)

    def as_dict(self, rejections: int = JSON_REJECTIONS) -> dict[str, Any]:
        return {
            "file": self.file, "rows": self.rows, "loaded": self.loaded, "rejected_rows": self.rejected_rows,
            "rejected_cells": len(self.rejected),
            "rejected": [{"row": r.row, "column": r.column, "value": r.value, "why": r.why}
                         for r in self.rejected[:rejections]],
            "ignored_columns": list(self.ignored), "mapping": dict(self.mapping), "defaulted": list(self.defaulted),
            "seconds": round(self.seconds, 3), "profiles_per_second": round(self.rate, 1),
        }

    def write_rejections(self, path: str | Path) -> None:
        """Every rejection as CSV: file,row,column,value,reason."""
        with open(path, "w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(("file", "row", "column", "value", "reason"))
            writer.writerows((r.file, r.row, r.column, r.value, r.why) for r in self.rejected)


# ---- the file ---------------------------------------------------------------------------------------

def _duplicates(names: list[str], file: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ImportRefused(f"{file}: the header names column {name!r} twice")
        seen.add(name)


class _Csv:
    """A CSV file (``.csv.gz``: gzip), every column read as bytes so that a bad cell is a rejection."""

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label
        self.gzip = path.name.lower().endswith(".gz")
        self.size = max(_gzip_size(path) if self.gzip else path.stat().st_size, 1)
        self.invalid: list[tuple[int, int, int, str]] = []  # (record number, expected, actual, text)
        self._text_bytes = 0
        raw, stream = self._open()
        try:
            reader = pcsv.open_csv(stream, read_options=pcsv.ReadOptions(use_threads=False, block_size=1 << 20),
                                   parse_options=pcsv.ParseOptions(newlines_in_values=True,
                                                                   invalid_row_handler=lambda _row: "skip"))
            self.columns: list[str] = list(reader.schema.names)
        except (pa.ArrowException, OSError) as exc:
            raise ImportRefused(f"{label}: cannot read a CSV header: {exc}") from None
        finally:
            raw.close()
        _duplicates(self.columns, label)

    def _open(self) -> tuple[Any, Any]:
        raw = pa.OSFile(str(self.path))
        return raw, (pa.CompressedInputStream(raw, "gzip") if self.gzip else raw)

    def fraction(self) -> float:
        """About how far through the file the rows handed out are (the reader reads far ahead, so
        its position says little): their cells' bytes plus a separator each, over the file's size."""
        return min(self._text_bytes / self.size, 0.99)

    def _skip(self, row: Any) -> str:
        self.invalid.append((row.number, row.expected_columns, row.actual_columns, row.text))
        return "skip"

    def batches(self, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        """(record batch, the data row number of each of its rows); blank lines dropped but counted."""
        raw, stream = self._open()
        try:
            reader = pcsv.open_csv(
                stream,
                read_options=pcsv.ReadOptions(use_threads=False, block_size=_CSV_BLOCK),
                parse_options=pcsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False,
                                                invalid_row_handler=self._skip),
                convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in self.columns},
                                                    include_columns=self.columns, strings_can_be_null=False,
                                                    quoted_strings_can_be_null=False))
            kept = 0
            for batch in reader:
                n = batch.num_rows
                if not n:
                    continue
                # a kept row's record number: its place among kept rows plus the invalid rows before it
                skipped = np.array(sorted(r[0] - 1 for r in self.invalid), dtype=np.int64)
                before = skipped - np.arange(len(skipped)) - 1  # kept rows before each skipped one
                place = np.arange(kept + 1, kept + n + 1, dtype=np.int64)
                rows = place + np.searchsorted(before, place - 1, side="right")
                kept += n
                self._text_bytes += batch.nbytes - 3 * n * batch.num_columns  # less 4-byte offsets, plus a separator
                blank = _blank(batch)
                if blank is not None:
                    keep = ~blank
                    batch, rows = batch.filter(pa.array(keep)), rows[keep]
                yield batch.select(columns), rows
        except pa.ArrowException as exc:
            raise ImportRefused(f"{self.label}: cannot read on: {exc}") from None
        finally:
            raw.close()


def _gzip_size(path: Path) -> int:
    """The uncompressed size a gzip file records (modulo 4 GiB; one member), for the progress bar."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 4:
            return 0
        f.seek(-4, 2)
        return int.from_bytes(f.read(4), "little")


def _blank(batch: pa.RecordBatch) -> np.ndarray | None:
    """Rows of ``batch`` whose every cell is empty (empty lines), or None when there are none."""
    empty = np.ones(batch.num_rows, dtype=bool)
    for column in batch.columns:
        empty &= _empty(column)
        if not empty.any():
            return None
    return empty


class _Parquet:
    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        try:
            self.file = pq.ParquetFile(str(path))
        except (pa.ArrowException, OSError) as exc:
            raise ImportRefused(f"{label}: not a readable Parquet file: {exc}") from None
        self.columns: list[str] = list(self.file.schema_arrow.names)
        _duplicates(self.columns, label)
        self.total = self.file.metadata.num_rows
        self.invalid: list[tuple[int, int, int, str]] = []
        self._done = 0

    def fraction(self) -> float:
        return self._done / self.total if self.total else 1.0

    def batches(self, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
        try:
            for batch in self.file.iter_batches(batch_size=_PARQUET_ROWS, columns=columns):
                rows = np.arange(self._done + 1, self._done + batch.num_rows + 1, dtype=np.int64)
                self._done += batch.num_rows
                yield batch, rows
        except (pa.ArrowException, OSError) as exc:
            raise ImportRefused(f"{self.label}: cannot read on: {exc}") from None


def _source(path: Path, label: str) -> _Csv | _Parquet:
    name = path.name.lower()
    if not path.is_file():
        raise ImportRefused(f"{label}: no such file")
    if name.endswith(CSV_SUFFIXES):
        return _Csv(path, label)
    if name.endswith(PARQUET_SUFFIXES):
        return _Parquet(path, label)
    raise ImportRefused(f"{label}: unknown file type; name it {', '.join('*' + s for s in CSV_SUFFIXES + PARQUET_SUFFIXES)}")


# ---- which column feeds which attribute ---------------------------------------------------------------

@dataclass
class ColumnPlan:
    """Which column of a file feeds which attribute."""

    id_column: str
    attributes: dict[str, str]  # column -> attribute
    ignored: tuple[str, ...]
    defaulted: tuple[str, ...]

    @property
    def read(self) -> list[str]:
        return [self.id_column, *self.attributes]


def plan_columns(columns: list[str], schema: FeatureSchema, id_column: str = ID_COLUMN,
                 mapping: Mapping[str, str] | None = None, file: str = "") -> ColumnPlan:
    """Which column feeds which attribute (see the module's docstring); ``ImportRefused`` when the id
    column is missing or ``mapping`` names a column or attribute that does not exist."""
    attributes = (*schema.numeric, *schema.categorical, *schema.sets)
    where = f"{file}: " if file else ""
    if id_column not in columns:
        raise ImportRefused(f"{where}no id column {id_column!r} (name it with --id-column); columns: "
                            + ", ".join(columns[:40]) + (" ..." if len(columns) > 40 else ""))
    fed: dict[str, str] = {}
    for column, attribute in (mapping or {}).items():
        if column not in columns:
            raise ImportRefused(f"{where}--map {column}={attribute}: no column {column!r} in the file")
        if column == id_column:
            raise ImportRefused(f"{where}--map {column}={attribute}: {column!r} is the id column")
        if attribute not in attributes:
            raise ImportRefused(f"{where}--map {column}={attribute}: domain.yaml has no attribute {attribute!r}; "
                                "attributes: " + ", ".join(attributes))
        if attribute in fed.values():
            raise ImportRefused(f"{where}--map: two columns feed {attribute!r}")
        fed[column] = attribute
    taken = set(fed.values())
    loose = {a.lower(): a for a in attributes}
    ignored = []
    for column in columns:
        if column == id_column or column in fed:
            continue
        match = column if column in attributes else loose.get(column.strip().lower())
        if match is None or match in taken or (match != column and match in columns):
            ignored.append(column)
            continue
        fed[column] = match
        taken.add(match)
    return ColumnPlan(id_column, fed, tuple(ignored), tuple(a for a in attributes if a not in taken))


# ---- cells --------------------------------------------------------------------------------------------

def _mask(values: Any) -> np.ndarray:
    """A boolean pyarrow array as numpy (null: False)."""
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _empty(values: Any) -> np.ndarray:
    """Null or empty cells."""
    if pa.types.is_string(values.type) or pa.types.is_binary(values.type):
        return np.asarray(pc.fill_null(pc.equal(pc.binary_length(values), 0), True).to_numpy(zero_copy_only=False),
                          dtype=bool)
    return np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _cast_cells(values: Any, to: Any) -> tuple[Any, np.ndarray]:
    """``values`` cast to ``to`` cell by cell: (the cast array, null where it failed; failed cells). One cast
    when every cell casts; halves otherwise, so k bad cells cost about k * log(n) small casts."""
    try:
        return pc.cast(values, to), np.zeros(len(values), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if len(values) <= 1:
            return pa.nulls(len(values), to), np.ones(len(values), dtype=bool)
    half = len(values) // 2
    left, bad_left = _cast_cells(values.slice(0, half), to)
    right, bad_right = _cast_cells(values.slice(half), to)
    return pa.concat_arrays([left, right]), np.concatenate([bad_left, bad_right])


def _text(values: Any, column: str) -> tuple[Any, np.ndarray | None]:
    """The cells as UTF-8 strings (nulls kept), and which cells are not UTF-8 (None: all are)."""
    kind = values.type
    if pa.types.is_dictionary(kind):
        return _text(values.dictionary_decode(), column)
    if pa.types.is_string(kind):
        return values, None
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        text, bad = _cast_cells(values, pa.string())
        return text, bad if bad.any() else None
    try:
        return pc.cast(values, pa.string()), None
    except pa.ArrowException:
        raise ImportRefused(f"column {column!r} holds {kind}, which cannot be read as text") from None


def _show(values: Any, i: int) -> str:
    """A cell as the file has it, for a rejection."""
    value = values[i].as_py()
    if value is None:
        text = ""
    elif isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, list):
        text = ";".join(map(str, value))
    else:
        text = str(value)
    return text if len(text) <= 200 else text[:199] + "…"


class _Chunk:
    """One batch of rows being checked: the rejections of its bad cells and which rows are bad."""

    def __init__(self, file: str, rows: np.ndarray, rejected: list[Rejected]) -> None:
        self.file, self.rows, self.rejected = file, rows, rejected
        self.bad = np.zeros(len(rows), dtype=bool)

    def reject(self, mask: np.ndarray, column: str, raw: Any, why: str | Callable[[int], str]) -> None:
        for i in np.flatnonzero(mask).tolist():
            self.rejected.append(Rejected(self.file, int(self.rows[i]), column, _show(raw, i),
                                          why(i) if callable(why) else why))
        self.bad |= mask

    def text(self, raw: Any, column: str) -> tuple[Any, np.ndarray]:
        """Trimmed text cells, and which are empty. Cells that are not UTF-8 are rejected here and come
        back null (empty), so that nothing else rejects them again."""
        text, undecodable = _text(raw, column)
        if undecodable is not None:
            self.reject(undecodable, column, raw, "not UTF-8 text")
        text = pc.utf8_trim_whitespace(text)
        return text, _empty(text)


def _numbers(chunk: _Chunk, raw: Any, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 values, which cells hold one); cells that are not numbers are rejected."""
    kind = raw.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind) or pa.types.is_boolean(kind):
        present = ~_empty(raw)
        values = pc.cast(pc.fill_null(raw, 0) if raw.null_count else raw, pa.float32(), safe=False)
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32), present
    if pa.types.is_binary(kind) or pa.types.is_string(kind):
        empty = _empty(raw)
        try:  # the usual case: every cell a number as written, or empty
            filled = pc.if_else(pa.array(empty), pa.scalar(b"0", kind), raw) if empty.any() else raw
            values = pc.cast(pc.cast(filled, pa.string()), pa.float32())
            return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32), ~empty
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    text, empty = chunk.text(raw, column)
    looks = _mask(pc.match_substring_regex(text, _NUMBER)) & ~empty
    values, failed = _cast_cells(pc.if_else(pa.array(looks), text, "0"), pa.float32())
    chunk.reject((~looks & ~empty) | (failed & looks), column, raw, "not a number")
    out = np.asarray(pc.fill_null(values, 0).to_numpy(zero_copy_only=False), dtype=np.float32)
    return out, looks & ~failed


def _dates(chunk: _Chunk, raw: Any, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 days since 1970-01-01 UTC, which cells hold a date); other cells are rejected."""
    kind = raw.type
    present = ~_empty(raw)
    if pa.types.is_date32(kind):
        return np.asarray(pc.fill_null(raw.cast(pa.int32()), 0).to_numpy(zero_copy_only=False), dtype=np.float64), present
    if pa.types.is_date64(kind) or pa.types.is_timestamp(kind):  # a timestamp counts from 1970 UTC, zoned or not
        per_day = 86_400 * {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[
            "ms" if pa.types.is_date64(kind) else kind.unit]
        ticks = np.asarray(pc.fill_null(raw.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.float64)
        return ticks / per_day, present
    if pa.types.is_binary(kind) or pa.types.is_string(kind):
        try:  # the usual case: dates or date-times without an offset, or empty
            filled = pc.if_else(pa.array(~present), pa.scalar(b"1970-01-01", kind), raw) if not present.all() else raw
            micros = pc.cast(pc.cast(filled, pa.string()), pa.timestamp("us")).cast(pa.int64())
            return np.asarray(micros.to_numpy(zero_copy_only=False), dtype=np.float64) / _US_PER_DAY, present
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    text, empty = chunk.text(raw, column)
    looks = _mask(pc.match_substring_regex(text, _ISO)) & ~empty
    zoned = looks & _mask(pc.match_substring_regex(text, _ZONED))
    naive = looks & ~zoned
    local, bad_local = _cast_cells(pc.if_else(pa.array(naive), text, "1970-01-01"), pa.timestamp("us"))
    utc, bad_utc = _cast_cells(pc.if_else(pa.array(zoned), text, "1970-01-01T00:00Z"), pa.timestamp("us", tz="UTC"))
    micros = np.where(zoned, np.asarray(pc.fill_null(utc.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)),
                      np.asarray(pc.fill_null(local.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)))
    failed = (naive & bad_local) | (zoned & bad_utc)
    chunk.reject((~looks & ~empty) | failed, column, raw,
                 "not an ISO date or date-time (e.g. 2024-05-31 or 2024-05-31T14:30:00+02:00)")
    return micros.astype(np.float64) / _US_PER_DAY, looks & ~failed


def _category(chunk: _Chunk, raw: Any, column: str, levels: tuple[str, ...], default: int) -> np.ndarray:
    """Level codes (``default`` for empty cells; ``len(levels)`` stands for ""); unknown levels are rejected."""
    text, empty = chunk.text(raw, column)
    found = pc.index_in(text, value_set=pa.array(levels, pa.string()))
    codes = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    unknown = (codes < 0) & ~empty
    shown = ", ".join(levels[:30]) + (" ..." if len(levels) > 30 else "")
    chunk.reject(unknown, column, raw, f"unknown level; levels: {shown}")
    codes[codes < 0] = default
    return codes


def _separators(members: tuple[str, ...]) -> str:
    return "".join(s for s in SEPARATORS if not any(s in m for m in members)) or ","


def _members(chunk: _Chunk, raw: Any, column: str, members: tuple[str, ...]) -> tuple[list[bytes], np.ndarray]:
    """(the distinct stored values, members sorted and joined by ","; each row's index into them);
    unknown members are rejected."""
    n = len(raw)
    kind = raw.type
    undecodable = None
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lists = raw
        flat, undecodable = _text(pc.list_flatten(lists), column)
    else:
        text, _empty_cells = chunk.text(raw, column)
        pattern = "[" + "".join("\\" + s for s in _separators(members)) + "]"
        lists = pc.split_pattern_regex(text, pattern)
        flat = pc.list_flatten(lists)
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), dtype=np.int64)
    if undecodable is not None:  # a list column's member that is not UTF-8: its row is rejected
        bad_rows = np.zeros(n, dtype=bool)
        bad_rows[parents[undecodable]] = True
        chunk.reject(bad_rows, column, raw, "a member that is not UTF-8 text")
    flat = pc.utf8_trim_whitespace(flat)
    named = ~_empty(flat)
    index = np.asarray(pc.fill_null(pc.index_in(flat, value_set=pa.array(members, pa.string())), -1)
                       .to_numpy(zero_copy_only=False), dtype=np.int64)
    unknown = named & (index < 0)
    if unknown.any():
        strays: dict[int, list[str]] = {}
        for k in np.flatnonzero(unknown).tolist():
            strays.setdefault(int(parents[k]), []).append(flat[k].as_py())
        shown = ", ".join(members[:30]) + (" ..." if len(members) > 30 else "")
        bad = np.zeros(n, dtype=bool)
        bad[list(strays)] = True
        chunk.reject(bad, column, raw, lambda i: f"unknown member {', '.join(map(repr, strays[i]))}; members: {shown}")
    known = named & ~unknown
    held = np.zeros((n, len(members)), dtype=bool)
    held[parents[known], index[known]] = True
    packed = np.packbits(held, axis=1, bitorder="little")
    width = max(packed.shape[1], 1)
    if width <= 8:
        wide = np.zeros((n, 8), dtype=np.uint8)
        wide[:, :packed.shape[1]] = packed
        patterns, inverse = np.unique(wide.view(np.uint64).ravel(), return_inverse=True)
        rows_of = [np.frombuffer(np.uint64(p).tobytes(), dtype=np.uint8) for p in patterns]
    else:
        keys = np.ascontiguousarray(packed).view(np.dtype((np.void, width))).ravel()
        patterns, inverse = np.unique(keys, return_inverse=True)
        rows_of = [np.frombuffer(p.tobytes(), dtype=np.uint8) for p in patterns]
    values = []
    for bits in rows_of:
        mask = np.unpackbits(bits, bitorder="little")[:len(members)].astype(bool)
        values.append(",".join(sorted(m for m, h in zip(members, mask) if h)).encode())
    return values, np.asarray(inverse, dtype=np.int64).ravel()


# ---- a checked chunk, ready to write ----------------------------------------------------------------------

@dataclass
class _Good:
    """The good rows of a chunk: ids, the packed vectors, and per categorical and set attribute its
    stored values with each row's index into them (the field order of ``encode_profile``)."""

    ids: Any  # pyarrow string array
    numbers: np.ndarray  # (rows, len(schema.numeric)) float32
    fields: list[tuple[str, list[bytes], np.ndarray]]

    def __len__(self) -> int:
        return len(self.ids)


def _check(batch: pa.RecordBatch, rows: np.ndarray, plan: ColumnPlan, schema: FeatureSchema, file: str,
           seen: dict[str, int], rejected: list[Rejected]) -> _Good:
    """Check every cell of ``batch`` (rejections appended to ``rejected``); its good rows."""
    n = batch.num_rows
    chunk = _Chunk(file, rows, rejected)
    raw_ids = batch.column(plan.id_column)
    ids, missing = chunk.text(raw_ids, plan.id_column)
    undecodable = chunk.bad.copy()
    chunk.reject(missing & ~undecodable, plan.id_column, raw_ids, "missing customer id")
    invalid = (_mask(pc.greater(pc.utf8_length(ids), MAX_ID_LENGTH)) | _mask(pc.match_substring_regex(ids, _BAD_ID)))
    invalid &= ~missing
    chunk.reject(invalid, plan.id_column, raw_ids,
                 f"invalid customer id: at most {MAX_ID_LENGTH} characters, no spaces, tabs, newlines or braces")
    first: dict[int, int] = {}
    id_list = ids.to_pylist()
    row_list = rows.tolist()
    for i in np.flatnonzero(~(missing | invalid | undecodable)).tolist():
        row = row_list[i]
        earlier = seen.setdefault(id_list[i], row)
        if earlier != row:
            first[i] = earlier
    if first:
        dup = np.zeros(n, dtype=bool)
        dup[list(first)] = True
        chunk.reject(dup, plan.id_column, raw_ids, lambda i: f"duplicate of row {first[i]} (the first row of an id counts)")

    numbers = np.empty((n, len(schema.numeric)), dtype=np.float32)
    numbers[:] = np.array(schema.default_vector(), dtype=np.float32)
    position = {name: j for j, name in enumerate(schema.numeric)}
    by_attribute = {attribute: column for column, attribute in plan.attributes.items()}
    for name in schema.numeric:
        column = by_attribute.get(name)
        if column is None:
            continue
        raw = batch.column(column)
        if name in schema.dates:
            days, present = _dates(chunk, raw, column)
            numbers[:, position[name]] = np.where(present, days, np.nan)
            continue
        values, present = _numbers(chunk, raw, column)
        infinite = present & ~np.isfinite(values)
        chunk.reject(infinite, column, raw, f"not a finite number (at most {_F32_MAX:.3g} in size)")
        low, high = schema.bounds.get(name, (None, None))
        if low is not None:
            chunk.reject(present & ~infinite & (values < low), column, raw, f"below the minimum {low:g}")
        if high is not None:
            chunk.reject(present & ~infinite & (values > high), column, raw, f"above the maximum {high:g}")
        numbers[:, position[name]] = np.where(present, values, numbers[:, position[name]])

    fields: list[tuple[str, list[bytes], np.ndarray]] = []
    for name, levels in schema.categorical.items():
        default = str(schema.defaults.get(name, ""))
        table = [level.encode() for level in levels] + [b""]
        default_code = levels.index(default) if default in levels else len(levels)
        column = by_attribute.get(name)
        codes = (np.full(n, default_code, dtype=np.int64) if column is None
                 else _category(chunk, batch.column(column), column, levels, default_code))
        fields.append((name, table, codes))
    for name, members in schema.sets.items():
        column = by_attribute.get(name)
        if column is None:
            fields.append((name, [b""], np.zeros(n, dtype=np.int64)))
        else:
            fields.append((name, *_members(chunk, batch.column(column), column, members)))

    good = np.flatnonzero(~chunk.bad)
    return _Good(ids=ids.take(pa.array(good)), numbers=numbers[good],
                 fields=[(name, table, codes[good]) for name, table, codes in fields])


# ---- writing -------------------------------------------------------------------------------------------

def _bulk(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _binary(value: bytes) -> Any:
    return pa.scalar(value, pa.binary())


def pack_saves(good: _Good, schema: FeatureSchema) -> tuple[Any, np.ndarray]:
    """The EVALSHA of ``_SAVE_PROFILE`` for every good row as RESP, assembled by pyarrow for all rows at
    once: (the bytes, offsets: row i is bytes[offsets[i]:offsets[i + 1]])."""
    width = 4 * len(schema.numeric)
    argc = 4 + 2 * (4 + len(good.fields))
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n1\r\n" % (argc, _SAVE_SHA.encode())
    ids = good.ids.cast(pa.binary())
    key_length = pc.cast(pc.add(pc.binary_length(ids), len("nba:{c:}:profile")), pa.string()).cast(pa.binary())
    numbers = (_bulk("schema") + _bulk(str(SCHEMA_VERSION)) + _bulk("layout") + _bulk(schema.layout())
               + _bulk("num") + b"$%d\r\n" % width)
    parts: list[Any] = [_binary(head + b"$"), key_length, _binary(b"\r\nnba:{c:"), ids, _binary(b"}:profile\r\n" + numbers)]
    if width:
        matrix = np.ascontiguousarray(good.numbers, dtype="<f4")
        parts.append(pa.Array.from_buffers(pa.binary(width), len(good), [None, pa.py_buffer(matrix)]).cast(pa.binary()))
    parts.append(_binary(b"\r\n" + _bulk("cases") + _bulk("")))
    for name, table, codes in good.fields:
        packed = pa.array([_bulk(name) + _bulk(value) for value in table], pa.binary())
        parts.append(packed.take(pa.array(codes)))
    joined = pc.binary_join_element_wise(*parts, _binary(b""))
    buffers = joined.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=len(joined) + 1, offset=4 * joined.offset)
    return buffers[2], offsets


def _args(good: _Good, schema: FeatureSchema, start: int, stop: int) -> Iterator[tuple[str, list[bytes | str]]]:
    """(key, the fields of encode_profile flattened) of rows start..stop, for the cluster pipeline."""
    ids = good.ids.slice(start, stop - start).to_pylist()
    layout = schema.layout()
    columns = [[table[c] for c in codes[start:stop].tolist()] for _name, table, codes in good.fields]
    names = [name for name, _table, _codes in good.fields]
    for k, cid in enumerate(ids):
        args: list[bytes | str] = ["schema", str(SCHEMA_VERSION), "layout", layout,
                                   "num", good.numbers[start + k].astype("<f4").tobytes(), "cases", ""]
        for name, values in zip(names, columns):
            args += (name, values[k])
        yield f"nba:{{c:{cid}}}:profile", args


class _Writer:
    """Writes checked chunks in batches; counts what Redis acknowledged."""

    def __init__(self, store: ProfileStore, schema: FeatureSchema, batch: int) -> None:
        self.store, self.schema, self.batch = store, schema, max(int(batch), 1)
        self.client = store.client
        self.cluster = is_cluster(self.client)
        self.loaded = 0
        store.register_layout(schema)
        self.client.script_load(_SAVE_PROFILE)
        self._conn: Any = None
        self._reader: Any = None
        self._buffer = bytearray(1 << 16)
        self._pending: list[tuple[memoryview, int]] = []  # sent, replies not read yet

    def write(self, good: _Good) -> None:
        if not len(good):
            return
        if self.cluster:
            for start in range(0, len(good), self.batch):
                self._cluster(good, start, min(start + self.batch, len(good)))
            return
        data, offsets = pack_saves(good, self.schema)
        view = memoryview(data)
        for start in range(0, len(good), self.batch):
            stop = min(start + self.batch, len(good))
            self._send(view[offsets[start]:offsets[stop]], stop - start)

    def _cluster(self, good: _Good, start: int, stop: int) -> None:
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for key, args in _args(good, self.schema, start, stop):
                pipe.execute_command("EVALSHA", _SAVE_SHA, 1, key, *args)
            try:
                pipe.execute()
                break
            except redis.exceptions.NoScriptError:  # a node restarted: writing a profile twice is writing it once
                if attempt:
                    raise
                self.client.script_load(_SAVE_PROFILE)
        self.loaded += stop - start

    def _connection(self) -> Any:
        """A connection of the client's pool, ours until ``close``: its replies are parsed here by a
        hiredis reader of our own (a few hundred ns a reply; ``read_response`` costs ~8 us, as much as
        Redis spends running the script), so it goes back to the pool disconnected."""
        if self._conn is None:
            self._conn = self.client.connection_pool.get_connection()
            self._reader = hiredis.Reader()
        return self._conn

    def _send(self, payload: memoryview, count: int) -> None:
        """Send one batch, then read the replies of the oldest ones until at most ``_IN_FLIGHT`` customers
        are unanswered: Redis works through them while we read replies and check the next chunk."""
        self._put(payload)
        self._pending.append((payload, count))
        while len(self._pending) > 1 and sum(c for _p, c in self._pending) > _IN_FLIGHT:
            self._read(*self._pending.pop(0))

    def _put(self, payload: memoryview) -> None:
        try:
            self._connection().send_packed_command([payload], check_health=False)
        except redis.exceptions.RedisError as exc:
            raise NbaError(f"Redis stopped taking writes after {self.loaded:,} profiles were written ({exc}); "
                           "importing the file again is safe") from None

    def _replies(self, count: int) -> bool:
        """Read ``count`` replies: True when all were written, False when Redis did not know the script;
        any other error reply raises (after every reply is read)."""
        conn = self._connection()
        reader, buffer = self._reader, self._buffer
        noscript = False
        error = None
        got = 0
        try:
            while got < count:
                reply = reader.gets()
                if reply is False:
                    size = conn._sock.recv_into(buffer)
                    if not size:
                        raise ConnectionError("Redis closed the connection")
                    reader.feed(buffer, 0, size)
                    continue
                got += 1
                if isinstance(reply, hiredis.ReplyError):
                    if str(reply).startswith("NOSCRIPT"):
                        noscript = True
                    else:
                        error = error or reply
        except OSError as exc:
            raise NbaError(f"Redis stopped answering after {self.loaded:,} profiles were written ({exc}); "
                           "importing the file again is safe") from None
        if error is not None:
            raise NbaError(f"Redis refused a profile write after {self.loaded:,} profiles: {error}")
        return not noscript

    def _read(self, payload: memoryview, count: int) -> None:
        if self._replies(count):
            self.loaded += count
            return
        # scripts flushed or Redis restarted mid-import: the batches sent since are read out, the script
        # loaded, and all of them sent again, one at a time (writing a profile twice is writing it once)
        later, self._pending = self._pending, []
        for _payload, sent in later:
            self._replies(sent)
        self.client.script_load(_SAVE_PROFILE)
        for again, sent in [(payload, count), *later]:
            self._put(again)
            if not self._replies(sent):
                raise NbaError("Redis does not keep the profile script (NOSCRIPT right after SCRIPT LOAD)")
            self.loaded += sent

    def finish(self) -> None:
        while self._pending:
            self._read(*self._pending.pop(0))
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()  # our reader, not the connection's parser, holds what it had read
            self.client.connection_pool.release(self._conn)
            self._conn = None
        self._pending.clear()


# ---- progress ------------------------------------------------------------------------------------------

class _Progress:
    """A one-line progress bar on a terminal (redrawn 5 times a second), a line a second elsewhere."""

    def __init__(self, out: TextIO | None, label: str) -> None:
        self.out, self.label = out, label
        self.tty = bool(out is not None and out.isatty())
        self.started = self.last = time.perf_counter()

    def update(self, fraction: float, rows: int, loaded: int, final: bool = False) -> None:
        if self.out is None:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.2 if self.tty else 1.0):
            return
        self.last = now
        fraction = min(max(fraction, 0.0), 1.0)
        bar = "#" * int(fraction * 30) + "-" * (30 - int(fraction * 30))
        rate = loaded / max(now - self.started, 1e-9)
        text = f"{self.label} [{bar}] {fraction:4.0%}  {rows:,} rows  {loaded:,} loaded  {rate:,.0f}/s"
        self.out.write(("\r" + text + ("\n" if final else "")) if self.tty else text + "\n")
        self.out.flush()


# ---- the import ----------------------------------------------------------------------------------------

def import_customers(store: ProfileStore, path: str | Path, schema: FeatureSchema, *, id_column: str = ID_COLUMN,
                     mapping: Mapping[str, str] | None = None, batch: int = BATCH,
                     progress: TextIO | None = None) -> ImportReport:
    """Load the customers of ``path`` (CSV, CSV.gz or Parquet) into ``store`` under ``schema``: every good
    row written, every bad cell in the report (see the module's docstring). ``progress``: a stream for
    the progress bar (None: quiet). Raises ``ImportRefused`` when the file cannot be used at all."""
    started = time.perf_counter()
    label = str(path)
    source = _source(Path(path), label)
    plan = plan_columns(source.columns, schema, id_column, mapping, label)
    report = ImportReport(file=label, ignored=plan.ignored, mapping=dict(plan.attributes), defaulted=plan.defaulted)
    bar = _Progress(progress, Path(path).name)
    writer = _Writer(store, schema, batch)
    seen: dict[str, int] = {}
    rows = 0
    try:
        for chunk, numbers in source.batches(plan.read):
            good = _check(chunk, numbers, plan, schema, label, seen, report.rejected)
            rows += chunk.num_rows
            writer.write(good)
            bar.update(source.fraction(), rows + len(source.invalid), writer.loaded)
        writer.finish()
    except ImportRefused as exc:  # the file broke off: what was sent before is written
        writer.finish()
        raise ImportRefused(f"{exc} (stopped there; {writer.loaded:,} profiles before it were written)") from None
    except BaseException:
        writer.close()
        raise
    for number, expected, actual, text in source.invalid:
        report.rejected.append(Rejected(label, number - 1, ROW, text if len(text) <= 200 else text[:199] + "…",
                                        f"{actual} cells, the header has {expected}"))
    report.rejected.sort(key=lambda r: r.row)  # stable: a row's cells stay in column order
    report.rows = rows + len(source.invalid)
    report.loaded = writer.loaded
    report.seconds = time.perf_counter() - started
    bar.update(1.0, report.rows, report.loaded, final=True)
    return report
