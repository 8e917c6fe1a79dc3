"""Training rows from recorded traffic (``nba train --from-stream``, ``nba simulate``'s history): the decisions
and responses recorded in a date range, from the archive plus the streams' unarchived tails
(``analytics/recorded.py``), joined and labelled in DuckDB; the rows are ``models/training.TrainingSet``'s,
for the plain trainer in ``models/training.py`` (labels: see that module's docstring).

Per (decision, presented action): positive when an outcome of ``positive`` was recorded within the label
window of the decision (the earliest such response decides it), negative when a ``rejected`` or ``ignored``
response was, or the window has closed by ``as_of``; otherwise pending and left out.

The *organic* arm (``arm="organic"``, ``nba train --uplift``: the second model of uplift arbitration) reads
what was not shown: per exploring decision (``candidates`` and ``choice_sets`` logged, epsilon > 0) and
each candidate that could have been shown at its first slot but was shown at no slot, positive when the
customer took that action anyway, an ``offer_accepted`` event (``attr.action_id``) of the customer within
the label window after the decision, negative once the window has closed without one. A showing of that
action to the customer within the window before the decision (its effect is not over) or after it (the
rest is a treated outcome) leaves only the span from the earlier showing's window end to the later
showing untreated: the label counts events in that span alone, ``exposure`` is its share of the window
(the organic model's offset), and a row with no span left is dropped. The logging
policy's randomisation is what makes these rows an untreated arm of the same customers: which candidate
was shown was drawn, not chosen by anything the outcome depends on beyond the logged features. Customer blocks are
decoded in bulk (base64 in SQL, one ``numpy`` view of all of them); those logged under an older feature
schema are read by name (``models/model_input.Adapter``), one by one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.analytics.recorded import Recorded
from engine.features import FeatureSchema
from engine.models.model_input import Adapter, decode_block, model_input
from engine.models.training import FINAL_NEGATIVE, POSITIVE, TrainingSet, read_feature_layouts
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, RESPONSES_STREAM

_COLUMNS = ("decision_id", "ts", "channel", "feature_schema", "features", "actions", "types", "values", "campaigns")
_CHOICE = ("customer_id", "epsilon", "candidates", "choice_sets")
ORGANIC_EVENT = "offer_accepted"
ARMS = ("treated", "organic")


def _literals(items: Sequence[str]) -> str:
    return ", ".join("'" + s.replace("'", "''") + "'" for s in items) or "NULL"


def _codes(rec: Recorded, name: str, levels: Sequence[str]) -> None:
    """A table ``name`` (level, code) of ``levels`` in order."""
    import pyarrow as pa

    rec.con.register(name, pa.table({"level": pa.array(list(levels), pa.string()),
                                     "code": pa.array(np.arange(len(levels), dtype=np.float64))}))


def _blocks(table: Any, width: int) -> np.ndarray:
    """The decoded customer blocks (a binary column of little-endian float32) as float64 rows of ``width``."""
    import pyarrow as pa

    column = table.column(0).combine_chunks() if table.num_rows else pa.array([], pa.binary())
    if len(column) == 0:
        return np.empty((0, width))
    lengths = np.diff(np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset: column.offset + len(column) + 1])
    if (lengths != 4 * width).any():
        raise ValueError(f"features hold {int(lengths[lengths != 4 * width][0]) // 4} values, want {width}")
    start = int(np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset])
    data = np.frombuffer(column.buffers()[2], dtype="<f4", count=len(column) * width, offset=start)
    return data.reshape(len(column), width).astype(np.float64)


def from_streams(client: Any, schema: FeatureSchema, catalog: Sequence[str] = (), window_days: float = 7.0,
                 as_of: float | None = None, positive: Sequence[str] = POSITIVE, decisions_stream: str | None = None,
                 responses_stream: str | None = None, campaigns: Sequence[str] = (),
                 campaign_weights: dict[str, float] | None = None, archive: Path | str | None = None,
                 since: str = "-", until: str = "+", arm: str = "treated",
                 actions: dict[str, tuple[str, float]] | None = None) -> TrainingSet:
    """Training rows from the decisions recorded from ``since`` to ``until`` (stream ids or UTC days) and every
    response recorded (the archive at ``archive`` plus the streams' tails; without one, the streams).
    ``campaigns``: only the rows of actions presented for these campaigns (the decision stream's ``campaigns``
    field; "-" stands for actions of no campaign); ``campaign_weights``: campaign -> row weight in training
    ("-" for no campaign; others weigh 1)."""
    import pyarrow as pa

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {arm!r}")
    organic = arm == "organic"
    as_of = time.time() if as_of is None else as_of
    window = window_days * 86400.0
    fingerprint = schema.fingerprint()
    layout = model_input(schema)
    width = len(layout.customer_features)
    only = sorted(set(campaigns))
    weights_given = dict(campaign_weights or {})
    with Recorded(client, archive, since, until) as rec:
        rec.view(decisions_stream or DECISIONS_STREAM, _COLUMNS + _CHOICE if organic else _COLUMNS, name="decisions")
        rec.view(responses_stream or RESPONSES_STREAM, ("decision_id", "action_id", "outcome", "ts"), name="responses",
                 until="+")  # the responses to those decisions come after them
        rec.sql(f"""
CREATE TEMP TABLE dec AS
SELECT row_number() OVER (ORDER BY _ms, _seq, _shard) - 1 AS rn, coalesce(decision_id, '') AS did,
       CAST(coalesce(nullif(ts, ''), '0') AS DOUBLE) AS ts, coalesce(channel, '') AS channel,
       coalesce(feature_schema, '') AS fschema, features, actions, types, "values", campaigns
       {", coalesce(customer_id, '') AS cust, candidates, choice_sets" if organic else ""}
FROM decisions WHERE coalesce(actions, '') <> '' AND coalesce(features, '') <> '';
CREATE TEMP TABLE outcomes AS
SELECT coalesce(decision_id, '') AS did, coalesce(action_id, '') AS aid,
       min(CAST(coalesce(nullif(ts, ''), '0') AS DOUBLE)) FILTER (WHERE outcome IN ({_literals(positive)})) AS pos_ts,
       bool_or(outcome IN ({_literals(FINAL_NEGATIVE)})) AS neg
FROM responses GROUP BY ALL;
""")
        n_decisions, without = rec.sql(
            "SELECT count(*), count(*) FILTER (WHERE coalesce(actions, '') <> '' AND coalesce(features, '') = '') "
            "FROM decisions").fetchone()
        n_responses = rec.sql("SELECT count(*) FROM responses").fetchone()[0]
        # decisions logged under another feature schema: read by name where that layout is known
        older_blocks: dict[int, np.ndarray] = {}
        excluded: list[int] = []
        other = rec.sql("SELECT rn, fschema, features FROM dec WHERE fschema <> ? ORDER BY rn", [fingerprint]).fetchall()
        if other:
            older = read_feature_layouts(client)
            adapters: dict[str, Adapter | None] = {}
            for rn, recorded, features in other:
                if recorded not in adapters:
                    known = older.get(recorded)
                    adapters[recorded] = None if known is None else Adapter(
                        known["features"], known["levels"], layout.customer_features, layout.feature_levels())
                adapter = adapters[recorded]
                raw = decode_block(features)
                if adapter is None or len(raw) != adapter.width:
                    excluded.append(rn)
                else:
                    older_blocks[rn] = adapter(raw)
        rec.con.register("excluded", pa.table({"rn": pa.array(excluded, pa.int64())}))
        weights = {k: float(v) for k, v in weights_given.items()}
        rec.con.register("weights", pa.table({"campaign": pa.array(list(weights), pa.string()),
                                              "weight": pa.array(list(weights.values()), pa.float64())}))
        if organic:
            _organic_rows(rec, window, as_of, actions or {})
        else:
            _treated_rows(rec, window, as_of)
        rec.sql(f"""
CREATE TEMP TABLE kept AS
SELECT * FROM presented WHERE {"campaign IN (" + _literals(only) + ")" if only else "true"} AND label IS NOT NULL;
""")
        other_campaigns, pending = rec.sql(
            f"SELECT count(*) FILTER (WHERE NOT ({'campaign IN (' + _literals(only) + ')' if only else 'true'})), "
            f"count(*) FILTER (WHERE ({'campaign IN (' + _literals(only) + ')' if only else 'true'}) AND label IS NULL) "
            "FROM presented").fetchone()
        levels = list(dict.fromkeys(catalog))
        in_catalog = set(levels)
        levels += [a for a, _ in rec.sql("SELECT action, min((rn, i)) AS seen FROM kept GROUP BY action ORDER BY seen")
                   .fetchall() if a not in in_catalog]
        _codes(rec, "action_codes", levels)
        _codes(rec, "kind_codes", schema.type_names)
        _codes(rec, "channel_codes", schema.channel_names)
        rows = rec.con.sql(f"""
SELECT k.rn, a.code AS action, t.code AS kind, coalesce(k.value, 'NaN'::DOUBLE) AS value, c.code AS channel, k.ts,
       k.label, coalesce(w.weight, 1.0) AS weight, {"k.exposure" if organic else "1.0"} AS exposure, k.did
FROM kept k JOIN action_codes a ON a.level = k.action LEFT JOIN kind_codes t ON t.level = k.kind
LEFT JOIN channel_codes c ON c.level = k.channel LEFT JOIN weights w ON w.campaign = k.campaign
ORDER BY k.rn, k.i""").to_arrow_table()  # to_arrow_table: the relation's, without the DB-API copy
        current = rec.con.sql("SELECT from_base64(features) FROM dec WHERE fschema = $1 AND rn NOT IN "
                              "(SELECT rn FROM excluded) ORDER BY rn", params=[fingerprint]).to_arrow_table()
        current_rn = rec.sql("SELECT rn FROM dec WHERE fschema = ? AND rn NOT IN (SELECT rn FROM excluded) ORDER BY rn",
                             [fingerprint]).fetchnumpy()["rn"]
    blocks = _blocks(current, width)
    block_of = np.full(int(max([*current_rn, *older_blocks, -1])) + 1, -1, dtype=np.int64)
    block_of[np.asarray(current_rn, dtype=np.int64)] = np.arange(len(current_rn))
    if older_blocks:
        block_of[list(older_blocks)] = len(current_rn) + np.arange(len(older_blocks))
        blocks = np.vstack([blocks, np.stack(list(older_blocks.values()))])
    n = rows.num_rows
    x = np.empty((n, len(layout.features)), dtype=np.float64)
    column = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names if name != "did"}
    if n:
        x[:, :width] = blocks[block_of[column["rn"].astype(np.int64)]]
        for target, name in zip([*layout.row_features, layout.channel_index], ("action", "kind", "value", "channel")):
            x[:, target] = np.asarray(column[name], dtype=np.float64)  # nulls (unknown kind, channel): NaN
    t = np.asarray(column["ts"], dtype=np.float64) if n else np.empty(0)
    y = np.asarray(column["label"], dtype=np.float64) if n else np.empty(0)
    w = np.asarray(column["weight"], dtype=np.float64) if n else np.empty(0)
    counts = {"decisions": int(n_decisions), "other_campaigns": int(other_campaigns), "without_features": int(without),
              "other_schema": len(excluded), "pending": int(pending), "responses": int(n_responses),
              "older_schema": len(older_blocks), "rows": n, "positives": int(y.sum())}
    weighted = bool(weights_given) and bool((w != 1.0).any())
    return TrainingSet(x, y, t, levels, None, rows.column("did").to_pylist(),
                       summary={"source": "recorded decisions and responses", "label_window_days": window_days,
                                **({"arm": "organic: candidates not shown; offer_accepted events"} if organic else {}),
                                "as_of": round(as_of, 3), "positive_outcomes": list(positive), **counts,
                                **({"campaigns": only} if only else {}),
                                **({"campaign_weights": weights_given} if weighted else {})},
                       w=w if weighted else None, schema=schema,
                       exposure=np.asarray(column["exposure"], dtype=np.float64) if organic and n else None)



def organic_events(rec: Recorded, table: str) -> None:
    """A temp table ``table`` (cust, action, ts) of the ``offer_accepted`` events recorded from the range's
    start to the stream's end, one row per event id: the outcomes of what was not shown."""
    view = rec.view(EVENTS_STREAM, ("event_id", "customer_id", "type", "ts", "attr.action_id"), name=f"{table}__events",
                    until="+")
    rec.sql(f"""
CREATE OR REPLACE TEMP TABLE {table} AS
SELECT coalesce(customer_id, '') AS cust, "attr.action_id" AS action, TRY_CAST(ts AS DOUBLE) AS ts
FROM {view} WHERE type = '{ORGANIC_EVENT}' AND coalesce("attr.action_id", '') <> ''
QUALIFY row_number() OVER (PARTITION BY coalesce(nullif(event_id, ''), _id) ORDER BY _ms, _seq, _shard) = 1;
""")


def _treated_rows(rec: Recorded, window: float, as_of: float) -> None:
    """The ``presented`` table of the treated arm: per decision, each presented action and its label."""
    rec.sql(f"""
CREATE TEMP TABLE presented AS
WITH d AS (
    SELECT rn, did, ts, channel, string_split(actions, ',') AS acts, string_split(coalesce(types, ''), ',') AS kinds,
           string_split(coalesce("values", ''), ',') AS vals, string_split(coalesce(campaigns, ''), ',') AS tags
    FROM dec WHERE rn NOT IN (SELECT rn FROM excluded)),
r AS (
    SELECT rn, did, ts, channel, unnest(range(1, len(acts) + 1)) AS i, acts, kinds, vals, tags FROM d)
SELECT r.rn, r.i, r.did, r.ts, r.channel, r.acts[r.i] AS action,
       CASE WHEN r.i <= len(r.kinds) THEN r.kinds[r.i] ELSE '' END AS kind,
       CASE WHEN r.i <= len(r.vals) AND r.vals[r.i] <> '' THEN CAST(r.vals[r.i] AS DOUBLE) END AS value,
       coalesce(nullif(CASE WHEN r.i <= len(r.tags) THEN r.tags[r.i] ELSE '' END, ''), '-') AS campaign,
       CASE WHEN o.pos_ts IS NOT NULL AND o.pos_ts - r.ts <= {window!r} THEN 1.0
            WHEN coalesce(o.neg, false) OR r.ts + {window!r} <= {as_of!r} THEN 0.0 END AS label
FROM r LEFT JOIN outcomes o ON o.did = r.did AND o.aid = r.acts[r.i];
""")


def _organic_rows(rec: Recorded, window: float, as_of: float, actions: dict[str, tuple[str, float]]) -> None:
    """The ``presented`` table of the organic arm: per exploring decision, the first slot's feasible
    candidates that no slot showed, labelled by the customer's ``offer_accepted`` events."""
    import pyarrow as pa

    organic_events(rec, "organic")
    rec.con.register("catalog_rows", pa.table({
        "action": pa.array(list(actions), pa.string()),
        "kind": pa.array([k for k, _ in actions.values()], pa.string()),
        "value": pa.array([float(v) for _, v in actions.values()], pa.float64())}))
    rec.sql(f"""
CREATE TEMP TABLE presented AS
WITH d AS (
    SELECT rn, did, ts, channel, cust, string_split(actions, ',') AS acts, string_split(candidates, ',') AS cands,
           string_split(split_part(choice_sets, ';', 1), ' ') AS first
    FROM dec WHERE rn NOT IN (SELECT rn FROM excluded) AND coalesce(candidates, '') <> ''
      AND coalesce(choice_sets, '') <> ''),
r AS (SELECT rn, did, ts, channel, cust, acts, cands, unnest(first) AS j FROM d),
c AS (
    SELECT rn, did, ts, channel, cust, CAST(j AS INTEGER) + 1 AS i,
           split_part(cands[CAST(j AS INTEGER) + 1], ':', 1) AS action, acts
    FROM r WHERE j <> ''),
u AS (SELECT * FROM c WHERE NOT list_contains(acts, action)),
shown AS (SELECT cust, unnest(string_split(actions, ',')) AS action, ts FROM dec),
near AS (
    SELECT u.rn, u.i, max(s.ts) FILTER (WHERE s.ts < u.ts) AS before, min(s.ts) FILTER (WHERE s.ts > u.ts) AS after
    FROM u JOIN shown s ON s.cust = u.cust AND s.action = u.action
    WHERE s.ts > u.ts - {window!r} AND s.ts <= u.ts + {window!r} GROUP BY ALL),
e AS (
    SELECT u.*, greatest(u.ts, coalesce(n.before + {window!r}, u.ts)) AS t0,
           least(u.ts + {window!r}, coalesce(n.after, u.ts + {window!r})) AS t1
    FROM u LEFT JOIN near n ON n.rn = u.rn AND n.i = u.i),
hit AS (
    SELECT e.rn, e.i FROM e JOIN organic o ON o.cust = e.cust AND o.action = e.action
    WHERE o.ts > e.t0 AND o.ts <= e.t1 AND o.ts <= {as_of!r} GROUP BY ALL)
SELECT e.rn, e.i, e.did, e.ts, e.channel, e.action, coalesce(k.kind, '') AS kind, k.value, '-' AS campaign,
       CASE WHEN h.rn IS NOT NULL THEN 1.0 WHEN e.t1 <= {as_of!r} THEN 0.0 END AS label,
       (e.t1 - e.t0) / {window!r} AS exposure
FROM e LEFT JOIN hit h ON h.rn = e.rn AND h.i = e.i LEFT JOIN catalog_rows k ON k.action = e.action
WHERE e.t1 > e.t0;
""")
