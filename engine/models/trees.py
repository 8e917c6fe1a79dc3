"""LightGBM's tree semantics, shared by the tree walker (``scorer``) and the decision-shaped scorer
(``bound_scorer``): decision-type bits, missing-value types, output transforms, one node's decision,
and the flattened arrays both read.
"""

from __future__ import annotations

import math
from typing import Protocol

import numba
import numpy as np

# LightGBM's kZeroThreshold is declared `const double kZeroThreshold = 1e-35f;` (a float literal).
ZERO_THRESHOLD = float(np.float32(1e-35))
INT32_LIMIT = 2147483648.0

# decision_type bits (tree.h): kCategoricalMask=1, kDefaultLeftMask=2, missing type in bits 2-3.
CATEGORICAL_MASK = 1
DEFAULT_LEFT_MASK = 2
MISSING_ZERO = 1
MISSING_NAN = 2

# Output transforms (ObjectiveFunction::ConvertOutput).
T_IDENTITY = 0
T_SIGMOID = 1  # 1 / (1 + exp(-param * x)): binary (param = sigmoid), cross_entropy (param = 1)
T_EXP = 2  # poisson, gamma, tweedie
T_LOG1P_EXP = 3  # cross_entropy_lambda
T_SQUARE = 4  # regression / regression_l1 / quantile / mape with `sqrt`: sign(x) * x * x


class FlatForest(Protocol):
    """A LightGBM model flattened to arrays (``scorer.CompiledModel``): nodes numbered across trees,
    a child < 0 is leaf ``~child``."""

    num_features: int
    num_trees: int
    _roots: np.ndarray
    _split_feature: np.ndarray
    _threshold: np.ndarray
    _decision_type: np.ndarray
    _left_child: np.ndarray
    _right_child: np.ndarray
    _cat_start: np.ndarray
    _cat_words: np.ndarray
    _cat_bits: np.ndarray
    _leaf_value: np.ndarray
    _transform: int
    _param: float
    _divisor: float

    def predict(self, X: np.ndarray) -> np.ndarray: ...

    def predict_raw(self, X: np.ndarray) -> np.ndarray: ...

    def warmup(self) -> None: ...


@numba.njit(inline="always", nogil=True)
def go_left(node: int, fval: float, threshold: np.ndarray, decision_type: np.ndarray,
            cat_start: np.ndarray, cat_words: np.ndarray, cat_bits: np.ndarray) -> bool:
    """One node's decision for one value (``NumericalDecision`` / ``CategoricalDecision``), for the bound
    scorer's catalog splits at bind time. ``scorer._score_batch`` spells the same test out in its loop:
    calling this there made the walker 5.8x slower (loadtest/bench_models.py, 30 rows: p50 1,131 us
    against 195 us)."""
    isnan = math.isnan(fval)
    # The C API drops |v| <= kZeroThreshold from a dense row, so the tree sees exactly 0.0.
    if not isnan and math.fabs(fval) <= ZERO_THRESHOLD:
        fval = 0.0
    dt = decision_type[node]
    if dt & CATEGORICAL_MASK:
        # NaN, values that truncate to a negative int and values beyond int32 go right
        # (static_cast<int> yields INT_MIN on x86, INT_MAX on ARM: both miss the bitset);
        # (-1, 0) truncates to category 0.
        if not isnan and fval > -1.0 and fval < INT32_LIMIT:
            cat = np.int64(fval)
            word = cat >> 5
            if word < cat_words[node]:
                return ((cat_bits[cat_start[node] + word] >> (cat & 31)) & 1) == 1
        return False
    missing_type = (dt >> 2) & 3
    if isnan and missing_type != MISSING_NAN:
        fval = 0.0
        isnan = False
    if (missing_type == MISSING_ZERO and fval >= -ZERO_THRESHOLD
            and fval <= ZERO_THRESHOLD) or (missing_type == MISSING_NAN and isnan):
        return (dt & DEFAULT_LEFT_MASK) != 0
    return fval <= threshold[node]


@numba.njit(inline="always", nogil=True)
def convert_output(total: float, divisor: float, transform: int, param: float) -> float:
    """A summed raw score as ``Booster.predict`` returns it: averaged (rf), then the objective's
    ``ConvertOutput``."""
    if divisor != 1.0:
        total /= divisor
    if transform == T_SIGMOID:
        return 1.0 / (1.0 + math.exp(-param * total))
    if transform == T_EXP:
        return math.exp(total)
    if transform == T_LOG1P_EXP:
        return math.log1p(math.exp(total))
    if transform == T_SQUARE:
        sign = 1.0 if total > 0.0 else (-1.0 if total < 0.0 else 0.0)
        return sign * total * total
    return total
