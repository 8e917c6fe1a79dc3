"""``nba report``: outcomes per action and action type, and the lift of the decision policy over the
control group, from the decision and response streams.

A decision's value is the summed value of its accepted actions (each (decision, action) accepted once,
however often the acceptance was recorded). Lift compares the accepted value per decision of the decision
policy with the control group's: ratio - 1.

The unit of assignment to the control group is the customer (a stable hash of the customer id), and one
customer's decisions are correlated, so the interval treats customers, not decisions, as independent:

- decisions are grouped into clusters by (customer, arm); a customer found in both arms (the control share
  changed) is two clusters, one per arm;
- each arm's value per decision is the ratio estimator r = sum(v_i) / sum(n_i) over its K customers
  (v_i: customer i's accepted value, n_i: its decisions), with the cluster-robust linearised variance
  var(r) = s^2(v_i - r n_i) / (mean(n)^2 K) (s^2: sample variance over customers, ddof 1);
- the 95% CI of the lift is the delta method on log(r_policy / r_control), the two arms independent
  (normal approximation); the difference per 1,000 decisions gets the same clustered variances;
- optionally (``bootstrap`` > 0, ``nba report --bootstrap N``) a cross-check: customers resampled with
  replacement within each arm, percentile 95% CI of the lift.

With one decision per customer this is the usual two-sample interval; with m identical decisions per
customer it is sqrt(m) wider than treating the decisions as independent would give. Decisions logged
without a customer id count as their own customer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from engine.analytics.recorded import Recorded
from engine.analytics.uplift_curve import DECISION_COLUMNS as UPLIFT_COLUMNS
from engine.analytics.uplift_curve import format_qini, qini_recorded
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM

Z95 = 1.959964


@dataclass
class Tally:
    presented: int = 0
    accepted: int = 0
    value: float = 0.0

    def row(self) -> dict:
        rate = self.accepted / self.presented if self.presented else 0.0
        return {"presented": self.presented, "accepted": self.accepted, "acceptance_rate": round(rate, 4),
                "value": round(self.value, 2)}


def cluster_totals(values: np.ndarray, customers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-customer totals (value, decisions) of per-decision ``values`` grouped by ``customers`` (any codes or
    ids, one per decision; None: every decision is its own customer). Customers are in the order of np.unique."""
    values = np.asarray(values, dtype=float)
    if customers is None:
        return values, np.ones(len(values))
    _, codes = np.unique(np.asarray(customers), return_inverse=True)
    codes = codes.ravel()
    k = int(codes.max()) + 1 if len(codes) else 0
    return np.bincount(codes, weights=values, minlength=k), np.bincount(codes, minlength=k).astype(float)


def _ratio_and_variance(v: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """Ratio estimator sum(v) / sum(n) over customers and its customer-clustered (linearised) variance."""
    k = len(v)
    r = float(v.sum() / n.sum())
    residual = v - r * n
    return r, float(residual.var(ddof=1) / (n.mean() ** 2 * k))


def bootstrap_lifts(treated: tuple[np.ndarray, np.ndarray], control: tuple[np.ndarray, np.ndarray],
                    resamples: int, seed: int = 0, chunk: int = 1_000_000) -> np.ndarray:
    """Lifts (ratio - 1) of ``resamples`` bootstrap replicates: the customers of each arm (per-customer totals
    (value, decisions)) resampled with replacement within the arm. Vectorised over blocks of replicates of about
    ``chunk`` drawn customers each (memory stays ~ 8 * chunk bytes per array)."""
    rng = np.random.default_rng(seed)
    ratios = []
    for v, n in (treated, control):
        k = len(v)
        per_block = max(1, chunk // max(k, 1))
        r = np.empty(resamples)
        for start in range(0, resamples, per_block):
            stop = min(resamples, start + per_block)
            idx = rng.integers(0, k, size=(stop - start, k))
            with np.errstate(divide="ignore", invalid="ignore"):
                r[start:stop] = v[idx].sum(axis=1) / n[idx].sum(axis=1)
        ratios.append(r)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ratios[0] / ratios[1] - 1


def lift_from_totals(treated: tuple[np.ndarray, np.ndarray], control: tuple[np.ndarray, np.ndarray],
                     bootstrap: int = 0, seed: int = 0) -> dict:
    """Lift of the policy's value per decision over control's, from per-customer totals (value, decisions) of
    each arm: ratio - 1 with a customer-clustered 95% CI (delta method on the log of the ratio of two ratio
    estimators), the difference per 1,000 decisions with its CI, and optionally a customer bootstrap CI."""
    (tv, tn), (cv, cn) = ((np.asarray(a, dtype=float), np.asarray(b, dtype=float)) for a, b in (treated, control))
    kt, kc = len(tv), len(cv)
    base: dict = {"customers": {"decision_policy": kt, "control": kc}, "unit": "customer"}
    if kt < 2 or kc < 2:
        return {"lift": None, "ci95": None, "note": "needs at least 2 customers in each arm"} | base
    (mt, var_t), (mc, var_c) = _ratio_and_variance(tv, tn), _ratio_and_variance(cv, cn)
    if mt <= 0 or mc <= 0:
        return {"lift": None, "ci95": None, "note": "no accepted value in one arm"} | base
    se = math.sqrt(var_t / (mt * mt) + var_c / (mc * mc))
    ratio = mt / mc
    diff_se = math.sqrt(var_t + var_c)
    out = {
        "lift": round(ratio - 1, 4),
        "ci95": [round(ratio * math.exp(-Z95 * se) - 1, 4), round(ratio * math.exp(Z95 * se) - 1, 4)],
        "ratio": round(ratio, 3),
        "value_per_1000_difference": round(1000 * (mt - mc), 1),
        "value_per_1000_difference_ci95": [round(1000 * (mt - mc - Z95 * diff_se), 1),
                                           round(1000 * (mt - mc + Z95 * diff_se), 1)],
    } | base
    if bootstrap > 0:
        lifts = bootstrap_lifts((tv, tn), (cv, cn), bootstrap, seed)
        # a replicate whose control drew no value has an infinite lift (kept: it is the top of the distribution,
        # so an infinite upper bound shows as None); one where neither arm drew value has none (dropped)
        lifts = lifts[~np.isnan(lifts)]
        if len(lifts):
            ends = np.quantile(lifts, [0.025, 0.975], method="inverted_cdf")
            out["bootstrap_ci95"] = [round(float(e), 4) if np.isfinite(e) else None for e in ends]
        else:
            out["bootstrap_ci95"] = None
        out["bootstrap_resamples"] = bootstrap
    return out


def lift_interval(treated: np.ndarray, control: np.ndarray, treated_customers: np.ndarray | None = None,
                  control_customers: np.ndarray | None = None, bootstrap: int = 0, seed: int = 0) -> dict:
    """Lift of the policy's value per decision over control's from per-decision values of each arm and the
    customer (any id or code) of each decision: ratio - 1 with a 95% CI clustered by customer (see the module
    docstring). Without customers every decision counts as its own customer (the independent-decisions CI)."""
    return lift_from_totals(cluster_totals(treated, treated_customers), cluster_totals(control, control_customers),
                            bootstrap=bootstrap, seed=seed)


_DECISION_COLUMNS = ("decision_id", "customer_id", "actions", "types", "values", "control", "model_version",
                     "model_role", "explored")

# A decision recorded twice (one id) counts once with its last record, where it first appeared (as the dict
# the report was kept in before); its presented actions are the first n of the actions (empty ones dropped),
# of ``types`` (else the catalog's type, else "?") and ``values`` (else the catalog's, else 0), n the
# shortest of the three, as zip() paired them. ``$types``/``$values``: the catalog as SQL maps. Entries are
# ordered as read_entries merges the shards: (_ms, _seq, _shard).
_REPORT_SQL = """
CREATE TEMP TABLE d AS
SELECT (_ms, _seq, _shard) AS k, decision_id, customer_id, actions, types, "values", control, model_version,
       model_role, explored
FROM decisions WHERE starts_with(coalesce(customer_id, ''), $prefix);
CREATE TEMP TABLE twice AS
SELECT decision_id, min(k) AS first, max(k) AS last FROM d GROUP BY decision_id HAVING count(*) > 1;
CREATE TEMP TABLE accepted AS
SELECT decision_id, list(action_id) AS accs FROM (
    SELECT DISTINCT decision_id, action_id FROM responses WHERE outcome = 'accepted' AND decision_id IS NOT NULL)
GROUP BY decision_id;
CREATE TEMP TABLE x AS
WITH one AS (
    SELECT coalesce(t.first, d.k) AS first, d.decision_id, d.control = '1' AS is_control,
           coalesce(nullif(d.customer_id, ''), 'decision:' || d.decision_id) AS customer,
           list_filter(string_split(coalesce(d.actions, ''), ','), lambda a: a <> '') AS acts,
           CASE WHEN coalesce(d.types, '') <> '' THEN string_split(d.types, ',') END AS kinds,
           CASE WHEN coalesce(d."values", '') <> ''
                THEN list_transform(string_split(d."values", ','), lambda v: CAST(v AS DOUBLE)) END AS vals
    FROM d LEFT JOIN twice t ON t.decision_id = d.decision_id
    WHERE t.decision_id IS NULL OR d.k = t.last),
sized AS (
    SELECT *, least(len(acts), coalesce(len(kinds), len(acts)), coalesce(len(vals), len(acts))) AS n FROM one),
listed AS (
    SELECT s.first, s.decision_id, s.is_control, s.customer, s.n, coalesce(a.accs, []) AS accs, s.acts[1:s.n] AS acts,
           CASE WHEN s.kinds IS NULL THEN list_transform(s.acts[1:s.n], lambda a: coalesce($types[a], '?'))
                ELSE s.kinds[1:s.n] END AS kinds,
           CASE WHEN s.vals IS NULL THEN list_transform(s.acts[1:s.n], lambda a: coalesce($values[a], 0.0))
                ELSE s.vals[1:s.n] END AS vals
    FROM sized s LEFT JOIN accepted a ON a.decision_id = s.decision_id)
SELECT first, decision_id, is_control, customer, acts, kinds, vals, len(accs) AS n_accepted,
       CASE WHEN len(accs) = 0 THEN list_resize([]::BOOLEAN[], n, false)
            ELSE list_transform(acts, lambda a: list_contains(accs, a)) END AS hits,
       CASE WHEN len(accs) = 0 THEN 0.0
            ELSE coalesce(list_sum(list_transform(range(1, n + 1), lambda i: CASE WHEN list_contains(accs, acts[i])
                 THEN vals[i] ELSE 0.0 END)), 0.0) END AS total
FROM listed;
"""
# presented actions, one row each, tallied per action, per type and per arm in one pass
_TALLY_SQL = """
WITH p AS (
    SELECT first, is_control, unnest(range(1, len(acts) + 1)) AS i, unnest(acts) AS action, unnest(kinds) AS kind,
           unnest(vals) AS value, unnest(hits) AS hit
    FROM x)
SELECT action, kind, is_control, count(*), count(*) FILTER (WHERE hit),
       coalesce(sum(value) FILTER (WHERE hit), 0.0), min((first, i)) AS seen
FROM p GROUP BY GROUPING SETS ((action), (kind), (is_control)) ORDER BY seen
"""


def _sql_map(items: dict, value_type: str) -> str:
    """A DuckDB MAP literal of ``items`` (string keys)."""
    keys = "[" + ", ".join("'" + str(k).replace("'", "''") + "'" for k in items) + "]"
    values = "[" + ", ".join("'" + str(v).replace("'", "''") + "'" for v in items.values()) + "]"
    return f"MAP(CAST({keys} AS VARCHAR[]), CAST({values} AS {value_type}[]))"


def build_report(client: redis.Redis, since: str = "-", customer_prefix: str = "",
                 values: dict[str, float] | None = None, types: dict[str, str] | None = None,
                 bootstrap: int = 0, seed: int = 0, archive: Path | str | None = None, until: str = "+") -> dict:
    """The report over decisions logged from stream id ``since`` to ``until`` (ids or UTC days, see
    ``analytics/recorded.py``) and responses to them; ``bootstrap`` > 0 adds a customer-bootstrap CI of the
    lift from that many resamples (seeded with ``seed``); ``archive``: read the archive at that root plus the
    streams' unarchived tails (``engine/store/archive.py``). Aggregated in DuckDB. With decisions ranked by
    uplift (``arbitration`` = uplift) it adds ``uplift``: their Qini curves, AUUC and uplift estimates per
    action (``analytics/uplift_curve.py``, 7-day window, as of now)."""

    values, types = values or {}, types or {}
    uplift: dict | None = None
    with Recorded(client, archive, since, until) as rec:
        rec.view(DECISIONS_STREAM, (*_DECISION_COLUMNS, "arbitration"))
        rec.view(RESPONSES_STREAM, ("decision_id", "action_id", "outcome"))
        prefix = "'" + customer_prefix.replace("'", "''") + "'"
        rec.sql(_REPORT_SQL.replace("$prefix", prefix)
                .replace("$types", _sql_map(types, "VARCHAR"))
                .replace("$values", _sql_map({k: float(v) for k, v in values.items()}, "DOUBLE")))
        models = {f"{name} ({role})": {"decisions": int(n), "explored": int(explored)} for name, role, n, explored, _ in rec.sql(
            "SELECT coalesce(model_version, '?'), coalesce(nullif(model_role, ''), 'champion'), count(*), "
            "count(*) FILTER (WHERE explored = '1'), min(k) AS seen FROM d GROUP BY ALL ORDER BY seen").fetchall()}
        n_decisions, n_accepted = (int(v or 0) for v in rec.sql("SELECT count(*), sum(n_accepted) FROM x").fetchone())
        by_action: dict[str, Tally] = {}
        by_type: dict[str, Tally] = {}
        by_arm: dict[bool, Tally] = {}
        for action, kind, is_control, presented, hits, value, _ in rec.sql(_TALLY_SQL).fetchall():
            tally = Tally(int(presented), int(hits), float(value))
            if action is not None:
                by_action[action] = tally
            elif kind is not None:
                by_type[kind] = tally
            else:
                by_arm[bool(is_control)] = tally
        arms: dict[str, dict] = {}
        clusters: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, is_control in (("decision_policy", False), ("control", True)):
            n, mean = rec.sql(f"SELECT count(*), avg(total) FROM x WHERE is_control = {is_control}").fetchone()
            arms[name] = by_arm.get(is_control, Tally()).row() | {
                "decisions": int(n), "value_per_1000_decisions": round(1000 * float(mean), 1) if n else 0.0}
            per = rec.sql(f"SELECT sum(total) AS v, count(*) AS n FROM x WHERE is_control = {is_control} "
                          "GROUP BY customer ORDER BY customer").fetchnumpy()  # np.unique's order
            clusters[name] = (np.asarray(per["v"], dtype=float), np.asarray(per["n"], dtype=float))
        if rec.sql("SELECT count(*) FROM decisions WHERE arbitration = 'uplift' AND "
                   f"starts_with(coalesce(customer_id, ''), {prefix})").fetchall()[0][0]:
            rec.view(DECISIONS_STREAM, UPLIFT_COLUMNS, name="uplift_decisions")
            uplift = qini_recorded(rec, "uplift_decisions", customer_prefix=customer_prefix)
    by_action = dict(sorted(by_action.items(), key=lambda kv: -kv[1].value))
    by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1].value))
    lift = lift_from_totals(clusters["decision_policy"], clusters["control"], bootstrap=bootstrap, seed=seed)
    return {
        "since": since,
        **({"until": until} if until != "+" else {}),
        "decisions": n_decisions,
        "responses_accepted": n_accepted,
        "by_action": {a: t.row() for a, t in by_action.items()},
        "by_type": {k: t.row() for k, t in by_type.items()},
        "policy": arms,
        "lift": lift,
        "models": models,
        "exploration": {"decisions": (explored := sum(m["explored"] for m in models.values())),
                        "share": explored / n_decisions if n_decisions else 0.0},
        **({"uplift": uplift} if uplift is not None else {}),
    }


def format_report(report: dict) -> str:
    lines = [f"{report['decisions']} decisions since {report['since']}, {report['responses_accepted']} accepted"]
    header = f"{'':32} {'presented':>10} {'accepted':>9} {'rate':>7} {'value':>12}"
    for title, rows in (("action", report["by_action"]), ("action type", report["by_type"])):
        lines += ["", f"{'by ' + title:32} {header[33:]}"]
        for name, r in rows.items():
            lines.append(f"{name:32} {r['presented']:>10} {r['accepted']:>9} {r['acceptance_rate']:>7.2%} "
                         f"{r['value']:>12,.0f}")
    customers = report["lift"].get("customers", {})
    lines += ["", f"{'policy':32} {'customers':>10} {'decisions':>10} {'accepted':>9} {'rate':>7} {'value/1000 dec':>15}"]
    for name, r in report["policy"].items():
        lines.append(f"{name:32} {customers.get(name, ''):>10} {r['decisions']:>10} {r['accepted']:>9} "
                     f"{r['acceptance_rate']:>7.2%} {r['value_per_1000_decisions']:>15,.1f}")
    lines += ["", f"{'model (role)':32} {'decisions':>10} {'explored':>9}"]
    for name, m in report["models"].items():
        lines.append(f"{name:32} {m['decisions']:>10} {m['explored']:>9}")
    lines.append(f"exploration: {report['exploration']['share']:.1%} of decisions ranked with a Thompson sample")
    lift = report["lift"]
    if lift.get("lift") is None:
        lines.append(f"lift over control: n/a ({lift.get('note')})")
    else:
        lo, hi = lift["ci95"]
        dlo, dhi = lift["value_per_1000_difference_ci95"]
        lines.append(f"lift over control: {lift['lift']:+.1%} accepted value per decision "
                     f"(95% CI {lo:+.1%} .. {hi:+.1%}); x{lift['ratio']:.2f}; "
                     f"{lift['value_per_1000_difference']:+,.1f} per 1,000 decisions (95% CI {dlo:+,.1f} .. {dhi:+,.1f}); "
                     f"CIs clustered by customer")
        if lift.get("bootstrap_resamples"):
            ci = lift.get("bootstrap_ci95") or [None, None]
            text = " .. ".join("n/a" if end is None else f"{end:+.1%}" for end in ci)
            lines.append(f"  customer bootstrap ({lift['bootstrap_resamples']:,} resamples): 95% CI {text}")
    if report.get("uplift") is not None:
        lines += ["", format_qini(report["uplift"])]
    return "\n".join(lines)
