"""Qini curves and AUUC per action, from the decisions that ranked offers by estimated uplift and explored
(``nba report``'s ``uplift`` section).

**What is read.** Every decision recorded from ``since`` to ``until`` with ``arbitration`` = ``uplift`` that
explored (epsilon > 0; ``engine.decision.choice``) and is not in the control group. Each candidate j of its
first slot's choice set S (``choice_sets``, indexes into ``candidates``) is one row: its score is the
model's estimated uplift at decision time (``candidate_uplifts``, aligned with ``candidates``); it is
*treated* when it is the action presented at slot 1, with the logging policy's probability
p = (1 - eps) [j = S[0]] + eps / |S| (``choice.slot_probability``), else *untreated*, with probability 1 - p.
Its outcome Y is 1 when the decision's offer of j was accepted (a response to (decision, j) within the
window) or the customer took j's product anyway (an ``offer_accepted`` event of that customer naming j,
``attr.action_id``, after the decision and within the window; events deduplicated by ``event_id``).
Outcomes recorded after ``as_of`` do not count; rows whose window has not closed by ``as_of`` are left out
and counted as ``pending``. With several slots an untreated row may still have been shown at a later slot:
the comparison is "offered first" against "not offered first".

**Why inverse propensity weights.** The logging policy shows the top-ranked candidate far more often than
the others ((1 - eps) + eps / |S| against eps / |S|), so the treated rows are mostly high-score rows and the
untreated ones mostly low-score ones: comparing raw rates would mix the offer's effect with who gets it.
Weighting each treated row by 1/p and each untreated one by 1/(1 - p) makes both arms stand for every row
(the exploration share guarantees both probabilities are positive), so their weighted rates compare like
with like (the Hajek form: weighted means, each arm normalised by its own weight).

**The curve.** Rows sorted by score, highest first; at each cut k (the top k rows, tied scores taken
together and interpolated linearly within the tie),
Q(k) = sum_treated(top k) Y/p - sum_untreated(top k) Y/(1-p) x W_t(k) / W_u(k), with W_t(k), W_u(k) the
arms' weights in the top k (0 while either is 0): Radcliffe's Qini, inverse-propensity weighted, i.e. the
incremental conversions among the top k scaled to the treated weight. It is divided by the treated weight
of all rows (an estimate of the number of rows) so that it reads "incremental conversions per customer
(row) when the top x% by score get the offer"; at x = 100% it is the overall uplift estimate. AUUC is the
area under it over the share 0..1 (trapezoid), random targeting the straight line from 0 to Q(all), and the
Qini coefficient AUUC - Q(all)/2: positive when the scores put the customers the offer sways first, about 0
when they rank no better than chance, negative when they rank them last.

**The uplift estimate** per action (weighted rate treated - weighted rate untreated) has a 95% CI that
treats customers as independent (one customer's rows share the customer): the linearised (delta-method)
variance of the difference of the two ratio estimators over per-customer totals, as ``report.py`` does
for the lift. Actions with fewer than ``MIN_ARM`` treated or untreated rows get no curve.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.analytics.recorded import Recorded
from engine.analytics.training_rows import organic_events
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM

Z95 = 1.959964
MIN_ARM = 30  # treated and untreated rows an action needs for a curve
DECISION_COLUMNS = ("decision_id", "customer_id", "ts", "actions", "control", "epsilon", "candidates",
                    "choice_sets", "arbitration", "candidate_uplifts")
RESPONSE_COLUMNS = ("decision_id", "action_id", "outcome", "ts")
EXPLAINED = ("Qini: incremental conversions per customer when the top x% by the model's uplift score get the "
             "offer; AUUC: the area under it; Qini coefficient: AUUC less random targeting's (> 0: the score "
             "finds the customers the offer sways).")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_DECISIONS_SQL = """
CREATE OR REPLACE TEMP TABLE q_dec AS
WITH raw AS (
    SELECT decision_id AS did, coalesce(customer_id, '') AS cid,
           coalesce(nullif(customer_id, ''), 'decision:' || decision_id) AS customer,
           TRY_CAST(ts AS DOUBLE) AS ts, coalesce(TRY_CAST(nullif(epsilon, '') AS DOUBLE), 0.0) AS eps,
           coalesce(control, '') = '1' AS is_control,
           list_transform(list_filter(string_split(coalesce(candidates, ''), ','), lambda c: c <> ''),
                          lambda c: regexp_extract(c, '^(.*):[^:]*$', 1)) AS names,
           list_transform(list_filter(string_split(coalesce(candidate_uplifts, ''), ','), lambda u: u <> ''),
                          lambda u: TRY_CAST(trim(u) AS DOUBLE)) AS ups,
           list_transform(list_filter(string_split(split_part(coalesce(choice_sets, ''), ';', 1), ' '), lambda s: s <> ''),
                          lambda s: TRY_CAST(s AS INTEGER)) AS s1,
           split_part(coalesce(actions, ''), ',', 1) AS shown
    FROM $decisions
    WHERE arbitration = 'uplift' AND starts_with(coalesce(customer_id, ''), $prefix)
    QUALIFY row_number() OVER (PARTITION BY decision_id ORDER BY _ms DESC, _seq DESC, _shard DESC) = 1)
SELECT *, CASE
    WHEN is_control THEN 'control'
    WHEN eps <= 0 THEN 'not_exploring'
    WHEN len(names) = 0 OR len(s1) = 0 THEN 'no_candidates'
    WHEN ts IS NULL OR len(ups) <> len(names)
         OR len(list_filter(ups, lambda u: u IS NULL OR isnan(u))) > 0
         OR len(list_filter(s1, lambda i: i IS NULL OR i < 0 OR i >= len(names))) > 0
         OR NOT list_contains(list_transform(s1, lambda i: names[i + 1]), shown) THEN 'unreadable'
    ELSE 'read' END AS kind
FROM raw;
CREATE OR REPLACE TEMP TABLE q_rows AS
WITH e AS (
    SELECT did, cid, customer, ts, eps, names, ups, s1, shown, unnest(range(1, len(s1) + 1)) AS pos
    FROM q_dec WHERE kind = 'read')
SELECT row_number() OVER (ORDER BY did, pos) AS rid, did, cid, customer, ts, names[s1[pos] + 1] AS action,
       ups[s1[pos] + 1] AS score, names[s1[pos] + 1] = shown AS treated,
       CASE WHEN pos = 1 THEN 1.0 - eps ELSE 0.0 END + eps / len(s1) AS p_shown
FROM e;
"""

_OUTCOMES_SQL = """
CREATE OR REPLACE TEMP TABLE q_closed AS
SELECT * FROM q_rows WHERE ts + $window <= $as_of;
CREATE OR REPLACE TEMP TABLE q_hits AS
SELECT q.rid FROM q_closed q JOIN $responses r ON r.decision_id = q.did AND r.action_id = q.action
WHERE r.outcome = 'accepted' AND (TRY_CAST(r.ts AS DOUBLE) IS NULL OR
      (TRY_CAST(r.ts AS DOUBLE) - q.ts <= $window AND TRY_CAST(r.ts AS DOUBLE) <= $as_of))
UNION
SELECT q.rid FROM q_closed q JOIN q_events e ON e.cust = q.cid AND e.action = q.action
WHERE q.cid <> '' AND e.ts > q.ts AND e.ts <= q.ts + $window AND e.ts <= $as_of;
"""


def qini(client: Any, archive: Path | str | None = None, since: str = "-", until: str = "+", window_days: float = 7.0,
         as_of: float | None = None, points: int = 20, customer_prefix: str = "") -> dict:
    """Qini curves, AUUC and the IPW uplift estimate per action (and ``all`` pooled) from the uplift-ranked
    exploring decisions recorded from ``since`` to ``until`` (stream ids or UTC days; the archive at
    ``archive`` plus the streams' tails), outcomes within ``window_days`` up to ``as_of`` (default now);
    ``points`` + 1 evenly spaced points of each curve (see the module docstring)."""
    with Recorded(client, archive, since, until) as rec:
        rec.view(DECISIONS_STREAM, DECISION_COLUMNS, name="uplift_decisions")
        return qini_recorded(rec, "uplift_decisions", window_days=window_days, as_of=as_of, points=points,
                             customer_prefix=customer_prefix)


def qini_recorded(rec: Recorded, decisions: str, window_days: float = 7.0, as_of: float | None = None,
                  points: int = 20, customer_prefix: str = "") -> dict:
    """``qini`` on an open ``Recorded`` whose view ``decisions`` holds ``DECISION_COLUMNS``; the response and
    event views it needs are made here (from the range's start to the streams' ends)."""
    as_of = time.time() if as_of is None else float(as_of)
    window = float(window_days) * 86_400.0
    rec.sql(_DECISIONS_SQL.replace("$decisions", decisions).replace("$prefix", _literal(customer_prefix)))
    counts = {"uplift_arbitrated": 0, "control": 0, "not_exploring": 0, "no_candidates": 0, "unreadable": 0, "read": 0}
    for kind, n in rec.sql("SELECT kind, count(*) FROM q_dec GROUP BY kind").fetchall():
        counts["uplift_arbitrated"] += int(n)
        counts[kind] = int(n)
    out: dict = {"window_days": window_days, "as_of": round(as_of, 3), "decisions": counts, "rows": 0, "pending": 0,
                 "actions": {}, "all": None, "explanation": EXPLAINED}
    if not counts["read"]:
        return out
    responses = rec.view(RESPONSES_STREAM, RESPONSE_COLUMNS, name="uplift_responses", until="+")
    organic_events(rec, "q_events")
    rec.sql(_OUTCOMES_SQL.replace("$window", repr(window)).replace("$as_of", repr(as_of))
            .replace("$responses", responses))
    total, closed = rec.sql("SELECT (SELECT count(*) FROM q_rows), (SELECT count(*) FROM q_closed)").fetchall()[0]
    out["rows"], out["pending"] = int(closed), int(total - closed)
    names = [a for a, in rec.sql("SELECT action FROM q_closed GROUP BY action ORDER BY count(*) DESC, action").fetchall()]
    data = rec.sql("""
SELECT q.action, dense_rank() OVER (ORDER BY q.customer) - 1 AS customer,
       q.score, q.treated, q.p_shown, h.rid IS NOT NULL AS y
FROM q_closed q LEFT JOIN (SELECT DISTINCT rid FROM q_hits) h ON h.rid = q.rid ORDER BY q.rid""").fetchnumpy()
    coded, action = np.unique(np.asarray(data["action"], dtype=object).astype(str), return_inverse=True)
    action = action.ravel()
    customer = np.asarray(data["customer"], dtype=np.int64)
    score = np.asarray(data["score"], dtype=float)
    treated = np.asarray(data["treated"], dtype=bool)
    propensity = np.asarray(data["p_shown"], dtype=float)
    y = np.asarray(data["y"], dtype=float)
    index = {str(a): i for i, a in enumerate(coded)}
    for name in names:
        mine = action == index[name]
        out["actions"][name] = summary(score[mine], treated[mine], propensity[mine], y[mine], customer[mine], points)
    if len(y):
        out["all"] = summary(score, treated, propensity, y, customer, points)
    return out


def ipw_uplift(treated: np.ndarray, propensity: np.ndarray, y: np.ndarray, customers: np.ndarray) -> dict:
    """Weighted rate treated - weighted rate untreated (weights 1/p, 1/(1-p); ``propensity`` = p of being
    shown) with a 95% CI clustered by ``customers`` (integer codes): the delta-method variance of the
    difference of two ratio estimators over per-customer totals."""
    t = np.asarray(treated, dtype=bool)
    w = np.where(t, 1.0 / propensity, 1.0 / (1.0 - np.where(t, 0.0, propensity)))
    _, codes = np.unique(customers, return_inverse=True)
    codes = codes.ravel()
    k = int(codes.max()) + 1 if len(codes) else 0
    a = np.bincount(codes, weights=np.where(t, w * y, 0.0), minlength=k)
    b = np.bincount(codes, weights=np.where(t, w, 0.0), minlength=k)
    c = np.bincount(codes, weights=np.where(t, 0.0, w * y), minlength=k)
    d = np.bincount(codes, weights=np.where(t, 0.0, w), minlength=k)
    if b.sum() <= 0 or d.sum() <= 0:
        return {"estimate": None, "ci95": None, "treated_rate": None, "untreated_rate": None, "customers": k,
                "note": "needs rows in both arms"}
    mt, mc = float(a.sum() / b.sum()), float(c.sum() / d.sum())
    out: dict = {"estimate": round(mt - mc, 4), "ci95": None, "treated_rate": round(mt, 4),
                 "untreated_rate": round(mc, 4), "customers": k}
    if k < 2:
        return out | {"note": "needs at least 2 customers"}
    z = (a - mt * b) / b.mean() - (c - mc * d) / d.mean()
    se = math.sqrt(float(z.var(ddof=1)) / k)
    out["ci95"] = [round(mt - mc - Z95 * se, 4), round(mt - mc + Z95 * se, 4)]
    return out


def qini_curve(score: np.ndarray, treated: np.ndarray, propensity: np.ndarray, y: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The IPW Qini curve (see the module docstring) at every tie boundary of the scores: the share of rows
    targeted (from 0) and Q / the treated weight of all rows."""
    score, y = np.asarray(score, dtype=float), np.asarray(y, dtype=float)
    t = np.asarray(treated, dtype=bool)
    p = np.asarray(propensity, dtype=float)
    n = len(score)
    order = np.argsort(-score, kind="stable")
    s, tt, pp, yy = score[order], t[order], p[order], y[order]
    wt = np.where(tt, 1.0 / np.where(tt, pp, 1.0), 0.0)
    wu = np.where(tt, 0.0, 1.0 / (1.0 - np.where(tt, 0.0, pp)))
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if n else np.empty(0, dtype=np.int64)
    big_t, big_yt = np.cumsum(wt)[ends], np.cumsum(wt * yy)[ends]
    big_u, big_yu = np.cumsum(wu)[ends], np.cumsum(wu * yy)[ends]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where((big_t > 0) & (big_u > 0), big_yt - big_yu * big_t / big_u, 0.0)
    total = big_t[-1] if n and big_t[-1] > 0 else 1.0
    return np.r_[0.0, (ends + 1) / max(n, 1)], np.r_[0.0, q / total]


def summary(score: np.ndarray, treated: np.ndarray, propensity: np.ndarray, y: np.ndarray, customers: np.ndarray,
            points: int = 20, min_arm: int = MIN_ARM) -> dict:
    """One action's (or the pool's) rows: counts per arm, the IPW uplift estimate and its CI, and, with at
    least ``min_arm`` rows in each arm, the Qini curve at ``points`` + 1 evenly spaced shares, AUUC, the random
    line's area and the Qini coefficient."""
    t = np.asarray(treated, dtype=bool)
    y = np.asarray(y, dtype=float)
    nt, nu = int(t.sum()), int((~t).sum())
    out: dict = {"rows": len(t), "treated": nt, "untreated": nu,
                 "conversions": {"treated": int(y[t].sum()), "untreated": int(y[~t].sum())},
                 "uplift": ipw_uplift(t, propensity, y, customers)}
    if nt < min_arm or nu < min_arm:
        return out | {"curve": None, "auuc": None, "random_auuc": None, "qini_coefficient": None,
                      "reason": f"fewer than {min_arm} treated or untreated rows ({nt} treated, {nu} untreated)"}
    share, q = qini_curve(score, t, propensity, y)
    auuc = float(np.sum((share[1:] - share[:-1]) * (q[1:] + q[:-1]) / 2))
    random_auuc = float(q[-1]) / 2
    grid = np.linspace(0.0, 1.0, max(int(points), 1) + 1)
    best = int(np.argmax(q))
    return out | {
        "curve": {"share": [round(float(x), 4) for x in grid],
                  "incremental": [round(float(v), 5) for v in np.interp(grid, share, q)]},
        "auuc": round(auuc, 5), "random_auuc": round(random_auuc, 5), "qini_coefficient": round(auuc - random_auuc, 5),
        "peak": {"share": round(float(share[best]), 4), "incremental": round(float(q[best]), 5)},
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1%}"


def format_qini(result: dict) -> str:
    """A short table per action: rows, treated, the uplift estimate and its CI, AUUC and the Qini coefficient."""
    counts = result["decisions"]
    if not counts.get("read"):
        return (f"uplift: no uplift-arbitrated exploring decisions ({counts.get('uplift_arbitrated', 0)} "
                f"uplift-arbitrated: {counts.get('control', 0)} control, {counts.get('not_exploring', 0)} not "
                f"exploring, {counts.get('no_candidates', 0)} without candidates at slot 1, "
                f"{counts.get('unreadable', 0)} unreadable)")
    lines = [f"uplift of offering first, from {counts['read']} uplift-arbitrated exploring decisions "
             f"({result['rows']} rows, {result['window_days']:g}-day window; {result['pending']} rows pending "
             f"and left out; weighted by the logging policy's probabilities)",
             f"{'action':24} {'rows':>7} {'treated':>8} {'uplift':>8} {'95% CI':>19} {'AUUC':>9} {'Qini':>9}"]
    groups = list(result["actions"].items()) + ([("all", result["all"])] if result.get("all") else [])
    for name, g in groups:
        u = g["uplift"]
        ci = "n/a" if u.get("ci95") is None else f"{u['ci95'][0]:+.1%} .. {u['ci95'][1]:+.1%}"
        if g["curve"] is None:
            tail = f"  (no curve: {g['reason']})"
            auuc = qc = "n/a"
        else:
            tail, auuc, qc = "", f"{g['auuc']:.4f}", f"{g['qini_coefficient']:+.4f}"
        lines.append(f"{name:24} {g['rows']:>7} {g['treated']:>8} {_pct(u.get('estimate')):>8} {ci:>19} "
                     f"{auuc:>9} {qc:>9}{tail}")
    lines.append(result.get("explanation", EXPLAINED))
    return "\n".join(lines)
