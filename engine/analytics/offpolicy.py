"""Off-policy evaluation: what a candidate policy would have earned on the recorded decisions, from the
probabilities with which the logging policy chose what it presented.

One row per logged decision (its first slot): the customer, the reward observed for the logged action
(its accepted value, else 0), the logging policy's probability ``p`` of that action, and the candidate's
probability ``pi`` of the same action in the same situation (1 or 0 for a deterministic candidate). With
``w = pi / p``:

- **IPS** (inverse propensity scoring): ``mean(w r)``; unbiased when ``p > 0`` wherever ``pi > 0``;
- **SNIPS** (self-normalised): ``sum(w r) / sum(w)``; a little biased, much less variance when ``w`` is large;
- **DR** (doubly robust): ``mean(q_pi + w (r - q))`` with a reward model's estimate ``q`` for the logged
  action and ``q_pi``, its expected reward under the candidate; unbiased if either the propensities or the
  reward model are right.

Every interval is a 95% normal interval with customers as the unit (the decisions of one customer are
correlated): each estimator is a ratio of per-customer sums, with the clustered linearised variance of
``engine.analytics.report``. The effective sample size ``(sum w)^2 / sum w^2`` says how many decisions the
estimate is worth. **Support**: where the candidate puts probability on actions the logging policy could not
have chosen (``p = 0``), no reweighting can recover their value; ``unsupported`` is that probability mass per
row, and an estimate whose mean unsupported mass exceeds ``max_unsupported`` is refused with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.analytics.report import Z95, _ratio_and_variance, cluster_totals
from engine.errors import NbaError


class EvaluationError(NbaError):
    """Logged data the estimators cannot read (the message names the column)."""


MAX_UNSUPPORTED = 0.01  # share of the candidate's decisions the logs cannot speak for before we refuse


@dataclass(frozen=True)
class Logged:
    """Logged decisions as the estimators read them (arrays of one length, one row per decision)."""

    customers: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray  # the logging policy's probability of the logged action, > 0
    target: np.ndarray  # the candidate's probability of the logged action
    q_logged: np.ndarray | None = None  # a reward model's estimate for the logged action (DR)
    q_target: np.ndarray | None = None  # the same model's expected reward under the candidate (DR)
    unsupported: np.ndarray | None = None  # the candidate's probability on actions the logger gave p = 0

    def __post_init__(self) -> None:
        n = len(self.rewards)
        for name in ("customers", "propensities", "target", "q_logged", "q_target", "unsupported"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise EvaluationError(f"{name}: {len(column)} rows, rewards has {n}")
        if n and float(np.min(self.propensities)) <= 0:
            raise EvaluationError("propensities: every logged action needs a probability above 0")


def _interval(v: np.ndarray, n: np.ndarray, per: float) -> dict:
    if len(v) < 2 or n.sum() == 0:
        return {"value": None, "ci95": None}
    r, var = _ratio_and_variance(v, n)
    half = Z95 * math.sqrt(max(var, 0.0))
    return {"value": round(per * r, 2), "ci95": [round(per * (r - half), 2), round(per * (r + half), 2)]}


def _codes(logged: Logged) -> np.ndarray:
    """Each row's customer as a cluster code."""
    return np.unique(np.asarray(logged.customers), return_inverse=True)[1].ravel()


def _weights(logged: Logged) -> np.ndarray:
    return np.asarray(logged.target, dtype=float) / np.asarray(logged.propensities, dtype=float)


def _dr_rows(logged: Logged, w: np.ndarray) -> np.ndarray | None:
    """Each row's doubly robust term ``q_pi + w (r - q)``; None without reward estimates."""
    if logged.q_logged is None or logged.q_target is None:
        return None
    r = np.asarray(logged.rewards, dtype=float)
    return np.asarray(logged.q_target, dtype=float) + w * (r - np.asarray(logged.q_logged, dtype=float))


def estimate(logged: Logged, per: float = 1000.0, max_unsupported: float = MAX_UNSUPPORTED) -> dict:
    """IPS, SNIPS and (with reward estimates) DR of the candidate's value per ``per`` decisions, each with a
    customer-clustered 95% CI; the effective sample size, and the support check."""
    rows = len(logged.rewards)
    codes = _codes(logged)
    w = _weights(logged)
    r = np.asarray(logged.rewards, dtype=float)
    ones = cluster_totals(np.ones(rows), codes)[0]
    out: dict = {"decisions": rows, "customers": len(ones), "per": per, "unit": "customer"}
    unsupported = float(np.mean(logged.unsupported)) if logged.unsupported is not None and rows else 0.0
    out["unsupported_share"] = round(unsupported, 4)
    if unsupported > max_unsupported:
        out["refused"] = (f"{unsupported:.1%} of the candidate's choices were never possible under the logging "
                          f"policy (over {max_unsupported:.0%}): the logs cannot support an estimate")
        return out
    out["effective_sample_size"] = round(float(w.sum() ** 2 / (w * w).sum()), 1) if (w * w).sum() else 0.0
    out["ips"] = _interval(cluster_totals(w * r, codes)[0], ones, per)
    out["snips"] = _interval(cluster_totals(w * r, codes)[0], cluster_totals(w, codes)[0], per)
    dr = _dr_rows(logged, w)
    if dr is not None:
        out["dr"] = _interval(cluster_totals(dr, codes)[0], ones, per)
    return out


def difference(candidate: Logged, baseline: Logged, per: float = 1000.0) -> dict:
    """The candidate's value less the baseline's on the same logged decisions (rows aligned), by DR where
    both have reward estimates, else IPS, with a customer-clustered 95% CI: paired, so the decisions both
    policies would have taken alike cancel out."""
    codes = _codes(candidate)
    r = np.asarray(candidate.rewards, dtype=float)
    wc, wb = _weights(candidate), _weights(baseline)
    dc, db = _dr_rows(candidate, wc), _dr_rows(baseline, wb)
    dr = dc is not None and db is not None
    v = dc - db if dc is not None and db is not None else (wc - wb) * r
    return {"estimator": "dr" if dr else "ips",
            **_interval(cluster_totals(v, codes)[0], cluster_totals(np.ones(len(r)), codes)[0], per)}
