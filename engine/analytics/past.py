"""Offers and outcomes from before the engine: a file of past presentations (``nba import history``).

Each row is one presentation: ``customer_id, action_id, channel, ts, outcome`` (CSV or Parquet; ``ts`` an
ISO timestamp or epoch seconds; outcome impression, clicked, accepted, rejected or ignored: the last the
customer gave). Every row is checked against the rule set (a catalog action, a declared channel, a time
not ahead of now); bad rows are reported with their row and column and left out. The good ones serve

- the contact history: presentations a contact policy counts, within its window, are added to
  each customer's counters, so limits such as "2 e-mails a week" count the campaigns run before;
- a first model: ``training_set`` joins them with the customers' stored profiles. Those are the profiles
  as they are now, not as they were at the offer (the file has no features), so an attribute that an
  acceptance changed (a product now held) can leak the outcome: the summary says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import redis

from engine.analytics.campaign_plan import fetch_profiles
from engine.decision.history import LUA as HISTORY_LUA
from engine.decision.history import contact_head, contacts_key
from engine.decision.request import MAX_ID_LENGTH
from engine.errors import NbaError
from engine.features import FeatureSchema
from engine.models.model_input import model_input
from engine.models.training import TrainingSet
from engine.rules.model import RuleSet
from engine.store.bulk import Rejected
from engine.store.profiles import ProfileStore

COLUMNS = ("customer_id", "action_id", "channel", "ts", "outcome")
OUTCOMES = ("impression", "clicked", "accepted", "rejected", "ignored")
DAY_MS = 86_400_000
FUTURE_SKEW_SECONDS = 300

# KEYS[1]: a customer's contact history; ARGV: keep ms, then (field, count, first, last) per field.
_MERGE = HISTORY_LUA + """
local keep = tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local f, n, lo, hi = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local v = hist_call('HGET', KEYS[1], f)
  if v then
    local n0, lo0, hi0 = string.match(v, '^(%d+):(%d+):(%d+)$')
    if n0 then n, lo, hi = n + tonumber(n0), math.min(lo, tonumber(lo0)), math.max(hi, tonumber(hi0)) end
  end
  redis.call('HSET', KEYS[1], f, n .. ':' .. lo .. ':' .. hi)
end
if keep > 0 and redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
"""


class HistoryRefused(NbaError, ValueError):
    """The file cannot be read at all: missing, unreadable, or without the columns it needs."""


@dataclass(frozen=True)
class PastOffer:
    customer_id: str
    action_id: str
    channel: str
    ts: float  # epoch seconds
    outcome: str


@dataclass
class HistoryReport:
    file: str
    rows: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    offers: list[PastOffer] = field(default_factory=list)
    contacts: int = 0  # presentations added to contact histories (those within their reach)

    def render(self, shown: int = 20) -> str:
        bad = len({r.row for r in self.rejected})
        lines = [f"{self.file}: {len(self.offers):,} of {self.rows:,} rows read; {bad:,} rows rejected; "
                 f"{self.contacts:,} presentations added to contact histories"]
        lines += ["  " + r.render() for r in self.rejected[:shown]]
        if len(self.rejected) > shown:
            lines.append(f"  ... and {len(self.rejected) - shown:,} more")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "rows": self.rows, "offers": len(self.offers), "contacts": self.contacts,
                "rejected_rows": len({r.row for r in self.rejected}),
                "rejected": [{"row": r.row, "column": r.column, "value": r.value, "why": r.why}
                             for r in self.rejected[:1000]]}


def _table(path: Path) -> pa.Table:
    if not path.is_file():
        raise HistoryRefused(f"{path}: no such file")
    try:
        if path.suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        names = pacsv.read_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 20)).column_names
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as exc:
        raise HistoryRefused(f"{path}: cannot read it: {exc}") from exc


def _seconds(value: object) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()  # Parquet timestamps are UTC
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("a timestamp needs its UTC offset (e.g. 2026-03-01T09:30:00Z)")
    return moment.timestamp()


def read_past(path: str | Path, ruleset: RuleSet, now: float) -> HistoryReport:
    """Every row of the file checked against ``ruleset``: the good ones as ``offers``, the bad ones rejected."""
    path = Path(path)
    table = _table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise HistoryRefused(f"{path}: no column {', '.join(missing)} (a history file has {', '.join(COLUMNS)})")
    report = HistoryReport(str(path), rows=table.num_rows)
    channels = ruleset.schema.channel_names
    columns = {c: table.column(c).to_pylist() for c in COLUMNS}
    for i in range(table.num_rows):
        row = {c: columns[c][i] for c in COLUMNS}
        why: list[tuple[str, str]] = []
        cid = "" if row["customer_id"] is None else str(row["customer_id"])
        if not cid.strip() or len(cid) > MAX_ID_LENGTH or any(c in cid for c in "{}\n\r\t "):
            why.append(("customer_id", f"not a customer id (at most {MAX_ID_LENGTH} characters, no spaces or braces)"))
        action = str(row["action_id"] or "")
        if action not in ruleset.by_id:
            why.append(("action_id", "not an action of the catalog"))
        channel = str(row["channel"] or "")
        if channel not in channels:
            why.append(("channel", "not a channel of domain.yaml: " + ", ".join(channels)))
        ts = math.nan
        try:
            ts = _seconds(row["ts"])
            if not math.isfinite(ts) or ts > now + FUTURE_SKEW_SECONDS:
                why.append(("ts", "in the future" if math.isfinite(ts) else "not a time"))
        except (ValueError, OverflowError, OSError) as exc:
            why.append(("ts", f"not a time: {exc}"))
        outcome = str(row["outcome"] or "")
        if outcome not in OUTCOMES:
            why.append(("outcome", "not one of " + ", ".join(OUTCOMES)))
        if why:
            report.rejected += [Rejected(str(path), i + 1, col, str(row[col])[:80], reason) for col, reason in why]
        else:
            report.offers.append(PastOffer(cid, action, channel, ts, outcome))
    return report


def fill_contacts(client: redis.Redis, ruleset: RuleSet, offers: list[PastOffer], now: float) -> int:
    """Add the offers a contact policy counts, within its reach, to the customers' contact histories
    (``ContactRules.keep_ms``); returns how many presentations were added. Importing the same file twice
    counts twice."""
    contact = ruleset.contact
    history_ms = max(int((contact.history_days if contact is not None else 0) * DAY_MS), DAY_MS)
    now_ms = int(now * 1000)
    fields: dict[str, dict[str, list[int]]] = defaultdict(dict)
    latest: dict[str, int] = {}
    added = 0
    for offer in offers:
        ts = int(offer.ts * 1000)
        if ts < now_ms - history_ms:
            continue
        action = ruleset.by_id[offer.action_id]
        kinds = ["i"] + (["r"] if offer.outcome == "rejected" else ["a"] if offer.outcome == "accepted" else [])
        day, off = divmod(ts, DAY_MS)
        kept = False
        for kind in kinds:
            keep = contact.keep_ms(kind, action.id, action.group, action.type, offer.channel) if contact else 0
            if ts < now_ms - keep:
                continue  # the history keeps only what a contact limit counts, as long as one counts it
            name = f"{contact_head(kind, action.id, action.group, action.type, offer.channel)}|{day}"
            got = fields[offer.customer_id].get(name)
            fields[offer.customer_id][name] = [1, off, off] if got is None else [got[0] + 1, min(got[1], off),
                                                                                  max(got[2], off)]
            kept = True
        if kept:
            latest[offer.customer_id] = max(latest.get(offer.customer_id, 0), ts)
            added += 1
    script = client.register_script(_MERGE)
    pipe = client.pipeline(transaction=False)
    for k, (cid, counts) in enumerate(fields.items()):
        args: list[Any] = [max(latest[cid] + history_ms - now_ms, DAY_MS)]
        for name, (n, lo, hi) in counts.items():
            args += (name, n, lo, hi)
        script(keys=[contacts_key(cid)], args=args, client=pipe)
        if k % 500 == 499:
            pipe.execute()
            pipe = client.pipeline(transaction=False)
    pipe.execute()
    return added


def training_set(store: ProfileStore, ruleset: RuleSet, offers: list[PastOffer], now: float) -> TrainingSet:
    """Training rows: each offer on its customer's stored profile (a cold one for a customer not stored),
    labelled 1 when the outcome is ``accepted``."""
    schema: FeatureSchema = ruleset.schema
    layout = model_input(schema)
    customers = sorted({o.customer_id for o in offers})
    profiles = {p.customer_id: p for p in fetch_profiles(store, customers, now, schema)}
    blocks = {cid: layout.customer_block(p) for cid, p in profiles.items()}
    actions = [a.id for a in ruleset.actions]
    table = layout.action_table(ruleset.actions, actions)
    row_of = {a: i for i, a in enumerate(table.action_ids)}
    block = np.array([blocks[o.customer_id] for o in offers]).reshape(len(offers), len(layout.customer_features))
    rows = np.array([row_of[o.action_id] for o in offers], dtype=np.intp)
    channels = np.array([o.channel for o in offers])
    x = np.empty((len(offers), len(layout.features)), dtype=np.float64)
    for channel in set(channels.tolist()):  # one assembly per channel: the rows' customers and actions at once
        on = channels == channel
        x[on] = layout.assemble(block[on], table, rows[on], channel)
    y = np.array([o.outcome == "accepted" for o in offers], dtype=np.float64)
    t = np.array([o.ts for o in offers], dtype=np.float64)
    stored = sum(p.found for p in profiles.values())
    return TrainingSet(x, y, t, actions, summary={
        "source": "imported history", "offers": len(offers), "customers": len(customers),
        "customers_stored": stored, "features": "the customers' profiles as stored now, not at the time of "
        "each offer: attributes an acceptance changed can leak the outcome"}, schema=schema)
