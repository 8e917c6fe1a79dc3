"""Derived features computed by numba from the packed numeric vector (never row-by-row Python)."""

from __future__ import annotations

import numba
import numpy as np

from engine.features import DERIVED, NUMERIC

_I = {name: i for i, name in enumerate(NUMERIC)}
_USAGE, _ALLOWANCE = _I["data_usage_gb"], _I["data_allowance_gb"]
_DAYS, _PURCHASES, _REVENUE, _MARGIN = (
    _I["days_since_last_purchase"], _I["purchases_12m"], _I["revenue_12m"], _I["margin_12m"],
)
assert DERIVED == (
    "data_usage_ratio", "recency_score", "frequency_score", "monetary_score", "rfm_score",
    "recency_decay", "value_score",
), "derive_rows writes DERIVED in this order"

# Quintile-style cut points for RFM scores 1..5 (telecom demo scale).
_RECENCY_DAYS = np.array([365.0, 180.0, 90.0, 30.0])  # fewer days -> higher score
_FREQUENCY = np.array([1.0, 3.0, 5.0, 8.0])
_MONETARY = np.array([200.0, 500.0, 900.0, 1500.0])


@numba.njit(cache=True, nogil=True)
def _score_up(x: float, cuts: np.ndarray) -> float:
    s = 1.0
    for c in cuts:
        if x >= c:
            s += 1.0
    return s


@numba.njit(cache=True, nogil=True)
def _score_down(x: float, cuts: np.ndarray) -> float:
    s = 1.0
    for c in cuts:
        if x <= c:
            s += 1.0
    return s


@numba.njit(cache=True, nogil=True)
def derive_rows(num: np.ndarray, out: np.ndarray) -> None:
    """Fill ``out[i, :]`` with DERIVED features of the stored vector ``num[i, :]``."""
    for i in range(num.shape[0]):
        allowance = num[i, _ALLOWANCE]
        out[i, 0] = num[i, _USAGE] / allowance if allowance > 0 else 0.0
        r = _score_down(num[i, _DAYS], _RECENCY_DAYS)
        f = _score_up(num[i, _PURCHASES], _FREQUENCY)
        m = _score_up(num[i, _REVENUE], _MONETARY)
        out[i, 1] = r
        out[i, 2] = f
        out[i, 3] = m
        out[i, 4] = r + f + m
        out[i, 5] = np.exp(-max(num[i, _DAYS], 0.0) / 90.0)
        out[i, 6] = (r + f + m) / 15.0 * 0.5 + min(max(num[i, _MARGIN], 0.0) / 1000.0, 1.0) * 0.5


def derive(num: np.ndarray) -> np.ndarray:
    """Derived features for one stored vector (1-D) or many (2-D); float64."""
    rows = np.atleast_2d(np.asarray(num, dtype=np.float64))
    out = np.empty((rows.shape[0], len(DERIVED)), dtype=np.float64)
    derive_rows(rows, out)
    return out[0] if np.ndim(num) == 1 else out
