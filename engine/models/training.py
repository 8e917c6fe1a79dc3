"""Training LightGBM propensity models: from the synthetic world or from recorded decisions and responses.

**Sources.**
- The synthetic world (``engine.sim.training_data.simulate_responses``): random actions shown to world customers on
  random channels, responses drawn from the hidden ground truth, which is kept for evaluation only.
- Recorded traffic (``analytics/training_rows.from_streams``, which assembles the rows in DuckDB over the
  archive and the streams): every decision logged to ``nba:stream:decisions`` carries the
  model input it was decided on (``features``: the customer block as base64 float32, in
  ``ModelInput.customer_features`` order, with the feature-schema fingerprint, the channel, and each presented
  action's id, type and value), so a training row is the customer *as they were at decision time*:
  nothing recorded later (profile updates, later responses) leaks into it. Rows are the presented
  actions joined with ``nba:stream:responses`` on (decision id, action id). Labels:
    * positive: an ``accepted`` response within the label window (default 7 days) of the decision;
    * negative: a ``rejected`` or ``ignored`` response, or no acceptance once the window has closed
      (``impression`` and ``clicked`` alone are not an acceptance);
    * pending, left out: no acceptance and no rejection yet while the window is still open.
  Control-group and exploring decisions are included (they are the least biased rows there are);
  records written under another feature schema are skipped and counted.
- A file written by ``export_csv`` (``--export``), read back by ``read_csv`` (``--from-file``).

**One model across actions**, with the action id, its type, value and the channel as features,
rather than one model per action type. Measured on the synthetic world (``loadtest/bench_models.py --shapes``,
figures in ``models/README.md``): higher holdout AUC (0.884 vs 0.869), lower log loss and a much
better rank correlation with the hidden truth (0.937 vs 0.872), which is what arbitration across
action types needs; per-type AUC is higher for every type too, since customer traits shared by all
actions are learned from all the data. Serving stays one scorer call per decision instead of up to
six. Per-type models are better calibrated and rank never-seen actions better; exploration is what
brings a new action the traffic to learn it from.

**Evaluation** is on a time-based holdout: the latest 20% of decisions by decision time. Metrics:
AUC, log loss, per action type (rows, acceptance, mean prediction, AUC, log loss) with a calibration
table (predicted vs observed per probability bin), the current champion scored on the same holdout,
and, for the synthetic world, the rank correlation between predicted and true acceptance probability.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import lightgbm as lgb
import numpy as np

from engine.features import FeatureSchema
from engine.models.model_input import ModelInput, model_input

PARAMS = {
    "objective": "binary",
    "learning_rate": 0.1,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "cat_smooth": 10,
    "verbose": -1,
    "num_threads": 2,
    "seed": 11,
}
HOLDOUT_SHARE = 0.2
POSITIVE = ("accepted",)
FINAL_NEGATIVE = ("rejected", "ignored")
CALIBRATION_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass
class TrainingSet:
    """Rows in the model's layout; the ``action`` column holds codes into ``actions``."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray  # decision time, seconds
    actions: list[str]
    p_true: np.ndarray | None = None  # hidden ground truth (synthetic world only, never a feature)
    decision_ids: list[str] | None = None
    summary: dict = field(default_factory=dict)
    w: np.ndarray | None = None  # row weights (e.g. per campaign); None: every row weighs 1
    schema: FeatureSchema = field(kw_only=True)  # the rows' layout: ``model_input(schema)``
    exposure: np.ndarray | None = field(default=None, kw_only=True)  # organic rows: share of the window untreated

    def __len__(self) -> int:
        return len(self.y)

    @property
    def rows(self) -> ModelInput:
        return model_input(self.schema)

    def action_ids(self) -> np.ndarray:
        codes = self.x[:, self.rows.row_features[0]]
        ids = np.array(self.actions + [""], dtype=object)
        return ids[np.where(np.isnan(codes), len(self.actions), codes).astype(int)]

    def recoded(self, levels: Sequence[str]) -> np.ndarray:
        """Rows with the action column re-coded for a model trained with other action ``levels``."""
        index = {a: i for i, a in enumerate(levels)}
        x = self.x.copy()
        x[:, self.rows.row_features[0]] = [index.get(a, np.nan) for a in self.action_ids()]
        return x

    def split(self, holdout_share: float = HOLDOUT_SHARE) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks (train, holdout): the holdout is the latest ``holdout_share`` by time."""
        cut = np.quantile(self.t, 1.0 - holdout_share)
        hold = self.t >= cut
        if hold.all() or not hold.any():  # all at one instant: fall back to the last rows
            hold = np.zeros(len(self.t), dtype=bool)
            hold[np.argsort(self.t, kind="stable")[int(len(self.t) * (1 - holdout_share)):]] = True
        return ~hold, hold


# --- recorded decisions and responses ---------------------------------------------------------------

def read_feature_layouts(client) -> dict[str, dict]:
    """Every feature schema decisions were logged under (``nba:feature_layouts``): fingerprint ->
    {"features": the customer block's names, "levels": categorical levels}."""
    out = {}
    from engine.store.profiles import FEATURE_LAYOUTS_KEY

    for key, value in (client.hgetall(FEATURE_LAYOUTS_KEY) or {}).items():
        try:
            layout = json.loads(value)
        except ValueError:
            continue
        if isinstance(layout, dict) and isinstance(layout.get("features"), list) and isinstance(layout.get("levels"), dict):
            out[key.decode() if isinstance(key, bytes) else str(key)] = layout
    return out


def export_csv(data: TrainingSet, path: str | Path) -> int:
    """One row per (decision, presented action): ids, time, label, then every model feature by name
    (the action column holds the action id; categorical features hold integer codes). ``.gz`` compresses."""
    path = Path(path)
    ids = data.action_ids()
    header = (["decision_id", "action_id", "ts", "label"] + (["p_true"] if data.p_true is not None else [])
              + list(data.rows.features))
    # derived from customers' data: owner only, whatever the umask, also when the file was there before
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    raw = os.fdopen(fd, "wb")
    fh_ctx = (gzip.open(raw, "wt", newline="") if path.suffix == ".gz"
              else open(raw.fileno(), "w", newline="", closefd=False))
    with raw, fh_ctx as fh:
        out = csv.writer(fh)
        out.writerow(header)
        for i in range(len(data.y)):
            row = data.x[i].tolist()
            row[data.rows.row_features[0]] = ids[i]
            lead = [data.decision_ids[i] if data.decision_ids else "", ids[i], repr(float(data.t[i])),
                    int(data.y[i])] + ([repr(float(data.p_true[i]))] if data.p_true is not None else [])
            out.writerow(lead + [v if isinstance(v, str) else repr(v) for v in row])
    return len(data.y)


def read_csv(path: str | Path, schema: FeatureSchema, catalog: Sequence[str] = ()) -> TrainingSet:
    path = Path(path)
    layout = model_input(schema)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        lead = ["decision_id", "action_id", "ts", "label"]
        has_truth = header[4:5] == ["p_true"]
        features = header[len(lead) + has_truth:]
        if header[:4] != lead or features != list(layout.features):
            missing = [f for f in layout.features if f not in features]
            raise ValueError(f"{path}: columns do not match the live feature schema"
                             + (f" (missing {', '.join(missing[:5])})" if missing else " (order differs)"))
        body = list(reader)
    levels = list(dict.fromkeys(catalog))
    index = {a: i for i, a in enumerate(levels)}
    for row in body:
        if row[1] not in index:
            index[row[1]] = len(levels)
            levels.append(row[1])
    start = len(lead) + has_truth
    x = np.empty((len(body), len(layout.features)), dtype=np.float64)
    for i, row in enumerate(body):
        values: list[str | int] = list(row[start:])
        values[layout.row_features[0]] = index[row[1]]
        x[i] = [float(v) for v in values]
    return TrainingSet(
        x, np.array([float(r[3]) for r in body]), np.array([float(r[2]) for r in body]), levels,
        np.array([float(r[4]) for r in body]) if has_truth else None, [r[0] for r in body],
        summary={"source": f"file {path.name}"}, schema=schema,
    )


# --- fitting and evaluation -------------------------------------------------------------------------

def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (ties get the average rank); NaN when only one class is present."""
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def _r(v: float, digits: int = 4) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), digits)


def calibration(y: np.ndarray, p: np.ndarray, bins: Sequence[float] = CALIBRATION_BINS) -> list[dict]:
    """Predicted vs observed acceptance per probability bin (only bins with rows)."""
    edges = np.asarray(bins)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    table = []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            table.append({"bin": f"{edges[b]:.2f}-{edges[b + 1]:.2f}", "rows": int(sel.sum()),
                          "predicted": _r(p[sel].mean()), "observed": _r(y[sel].mean())})
    return table


def evaluate(p: np.ndarray, data: TrainingSet, hold: np.ndarray) -> dict:
    """Holdout metrics of predictions ``p`` (for the holdout rows), overall and per action type."""
    y = data.y[hold]
    metrics: dict[str, object] = {
        "holdout_auc": _r(auc(y, p)),
        "holdout_logloss": _r(logloss(y, p)),
        "holdout_rows": int(hold.sum()),
        "holdout_acceptance_rate": _r(y.mean()) if len(y) else None,
        "holdout_mean_prediction": _r(p.mean()) if len(p) else None,
    }
    if data.p_true is not None:
        truth = data.p_true[hold]
        metrics["oracle_auc"] = _r(auc(y, truth))
        metrics["rank_correlation_with_truth"] = _r(spearman(p, truth))
    types = data.x[hold, data.rows.row_features[1]]
    by_type, tables = {}, {}
    for code, name in enumerate(data.schema.type_names):
        sel = types == code
        if not sel.any():
            continue
        by_type[name] = {"rows": int(sel.sum()), "acceptance_rate": _r(y[sel].mean()),
                         "mean_prediction": _r(p[sel].mean()), "auc": _r(auc(y[sel], p[sel])),
                         "logloss": _r(logloss(y[sel], p[sel]))}
        if data.p_true is not None:
            by_type[name]["rank_correlation_with_truth"] = _r(spearman(p[sel], data.p_true[hold][sel]))
        tables[name] = calibration(y[sel], p[sel])
    metrics["by_action_type"] = by_type
    metrics["calibration"] = {"all": calibration(y, p), **tables}
    return metrics


def fit(data: TrainingSet, rounds: int = 200, params: dict | None = None,
        offset: np.ndarray | None = None) -> tuple[lgb.Booster, dict, dict]:
    """Train on the earliest 80% of the rows by time; metrics on the latest 20%. ``offset``: a raw score
    (logit) per row that the model learns on top of (LightGBM's ``init_score``; the booster then scores
    only the shift, and the metrics judge offset + shift)."""
    if len(data) < 50 or data.y.min() == data.y.max():
        raise ValueError(f"not enough to train on: {len(data)} labelled rows, {int(data.y.sum())} positive")
    started = time.perf_counter()
    train_mask, hold = data.split()
    features = data.rows.features
    cat_idx = [features.index(c) for c in data.rows.categorical_features]
    params = {**PARAMS, **(params or {})}
    dtrain = lgb.Dataset(data.x[train_mask], data.y[train_mask], feature_name=list(features),
                         weight=data.w[train_mask] if data.w is not None else None,
                         init_score=offset[train_mask] if offset is not None else None,
                         categorical_feature=cat_idx, free_raw_data=True)
    booster = lgb.train(params, dtrain, num_boost_round=rounds)
    if offset is None:
        p = cast(np.ndarray, booster.predict(data.x[hold]))
    else:
        p = 1.0 / (1.0 + np.exp(-(offset[hold] + cast(np.ndarray, booster.predict(data.x[hold], raw_score=True)))))
    metrics = evaluate(p, data, hold)
    summary = {
        **data.summary, "rows": int(len(data.y)), "train_rows": int(train_mask.sum()),
        "positive_rate": _r(data.y.mean()), "actions": len(data.actions),
        "holdout": f"latest {HOLDOUT_SHARE:.0%} by decision time (from t={float(data.t[hold].min()):.0f})",
        "rounds": rounds, "params": params, "seconds": round(time.perf_counter() - started, 1),
    }
    return booster, metrics, summary


def fit_organic(treated: lgb.Booster, organic: TrainingSet, rounds: int = 200) -> tuple[lgb.Booster, dict, dict]:
    """Uplift arbitration's second model: on the untreated rows, the shift of the logit from the treated
    model's (its raw score is the offset), so P(take | not shown) = sigmoid(logit P(take | shown) + shift).
    Learning the shift, not a second probability from scratch, lets the treated model's errors cancel in
    the difference: what is left to learn is how much of an offer's effect a customer would have had
    anyway (about as much for a sure thing, more for a sleeping dog, little for the rest)."""
    offset = cast(np.ndarray, treated.predict(organic.x, raw_score=True))
    if organic.exposure is not None:  # a row seen untreated for part of the window: odds in proportion (rare events)
        offset = offset + np.log(organic.exposure)
    booster, metrics, summary = fit(organic, rounds, offset=offset)
    return booster, metrics, {**summary, "learns": "the logit shift from the treated model (offset)"}


def fit_version(data: TrainingSet, rounds: int = 200, organic: TrainingSet | None = None
                ) -> tuple[lgb.Booster, dict, dict, list[str], tuple[str, dict, dict] | None]:
    """The models of one version: the propensity model on ``data`` (booster, metrics, summary), the action
    levels both score by, and with ``organic`` (uplift's untreated rows, whose levels must begin with
    ``data``'s) the organic model (text, metrics, summary)."""
    booster, metrics, summary = fit(data, rounds)
    if organic is None:
        return booster, metrics, summary, list(data.actions), None
    if list(organic.actions[: len(data.actions)]) != list(data.actions):
        raise ValueError("the organic rows' action levels must begin with the treated rows'")
    organic_booster, organic_metrics, organic_summary = fit_organic(booster, organic, rounds)
    return (booster, metrics, summary, list(organic.actions),
            (organic_booster.model_to_string(), organic_metrics, organic_summary))


def champion_on_holdout(registry, data: TrainingSet) -> dict | None:
    """The current champion scored on the same holdout (None without a usable champion)."""
    from engine.models.registry import ModelRefused

    if registry.champion() is None:
        return None
    try:
        champion = registry.load()
    except ModelRefused as exc:
        return {"version": registry.champion(), "refused": str(exc)}
    _, hold = data.split()
    p = champion.scorer.predict(data.recoded(champion.action_levels)[hold])
    m = evaluate(p, data, hold)
    out = {"version": champion.version, "holdout_auc": m["holdout_auc"], "holdout_logloss": m["holdout_logloss"]}
    if "rank_correlation_with_truth" in m:
        out["rank_correlation_with_truth"] = m["rank_correlation_with_truth"]
    return out


def train_and_register(registry, data: TrainingSet, rounds: int = 200, promote: str = "if-better",
                       organic: TrainingSet | None = None) -> tuple[str, dict, bool]:
    """Fit, compare with the champion on the same holdout, store; promote "always", "never" or
    "if-better" (no champion, or holdout AUC at least the champion's). Returns (version, metrics, promoted).
    ``organic``: the untreated rows of uplift arbitration (``arm="organic"``), fitted as the version's
    second model; its action levels must begin with ``data``'s."""
    booster, metrics, summary, levels, second = fit_version(data, rounds, organic)
    champion = champion_on_holdout(registry, data)
    if champion is not None:
        metrics["champion"] = champion
    version = registry.save(booster.model_to_string(), levels, metrics, summary, organic=second)
    better = (champion is None or "holdout_auc" not in champion or champion["holdout_auc"] is None
              or (metrics["holdout_auc"] or 0) >= champion["holdout_auc"])
    promoted = promote == "always" or (promote == "if-better" and better)
    if promoted:
        registry.promote(version)
    return version, metrics, promoted


def format_metrics(metrics: dict) -> str:
    """A readable summary: headline metrics, per action type, the calibration table."""
    lines = []
    for key in ("holdout_auc", "holdout_logloss", "oracle_auc", "rank_correlation_with_truth", "holdout_rows",
                "holdout_acceptance_rate", "holdout_mean_prediction"):
        if key in metrics:
            lines.append(f"  {key:30} {metrics[key]}")
    if "champion" in metrics:
        c = metrics["champion"]
        lines.append(f"  {'champion on same holdout':30} {c.get('version')}: auc {c.get('holdout_auc')} "
                     f"logloss {c.get('holdout_logloss')}" + (f" REFUSED {c['refused']}" if "refused" in c else ""))
    if metrics.get("by_action_type"):
        lines.append(f"  {'action type':12} {'rows':>7} {'accept':>7} {'mean p':>7} {'auc':>7} {'logloss':>8}")
        for name, m in metrics["by_action_type"].items():
            lines.append(f"  {name:12} {m['rows']:>7} {m['acceptance_rate']!s:>7} {m['mean_prediction']!s:>7} "
                         f"{m['auc']!s:>7} {m['logloss']!s:>8}")
    cal = metrics.get("calibration", {})
    if cal:
        bins = list(dict.fromkeys(b["bin"] for table in cal.values() for b in table))
        lines.append("  calibration, observed (predicted) acceptance per bin of predicted probability:")
        lines.append(f"  {'':12}" + "".join(f"{b:>16}" for b in bins))
        for name, table in cal.items():
            cells = {b["bin"]: f"{b['observed']:.3f} ({b['predicted']:.3f})" for b in table}
            lines.append(f"  {name:12}" + "".join(f"{cells.get(b, '-'):>16}" for b in bins))
    return "\n".join(lines)

