"""A numba-compiled LightGBM tree walker whose output equals ``lightgbm.Booster.predict``.

The model is read from LightGBM's text format (``Booster.model_to_string`` or a saved model file), the
same representation LightGBM itself loads, and flattened into a handful of numpy arrays. One
``@njit(nogil=True)`` kernel walks a batch of rows through all trees. Decision semantics follow
LightGBM's ``tree.h`` (``NumericalDecision``, ``CategoricalDecision``) and the C API row conversion;
transforms follow each objective's ``ConvertOutput``.

LightGBM is needed only to build a model (``from_booster``); ``from_file`` and scoring never call it.
``CompiledModel.bind`` gives the decision-shaped scorer the service uses (``engine.models.bound_scorer``): one
customer against many catalog actions per call, equal to this walker bit for bit, tens of times faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np

from engine.models.bound_scorer import DecisionScorer
from engine.models.trees import (
    CATEGORICAL_MASK,
    DEFAULT_LEFT_MASK,
    INT32_LIMIT,
    MISSING_NAN,
    MISSING_ZERO,
    T_EXP,
    T_IDENTITY,
    T_LOG1P_EXP,
    T_SIGMOID,
    T_SQUARE,
    ZERO_THRESHOLD,
    convert_output,
)

if TYPE_CHECKING:
    import lightgbm

__all__ = ["CompiledModel"]

# Canonical objective names (config.h ParseObjectiveAlias); the model file stores canonical names.
_OBJECTIVE_ALIASES = {
    "regression_l2": "regression",
    "mean_squared_error": "regression",
    "mse": "regression",
    "l2": "regression",
    "l2_root": "regression",
    "root_mean_squared_error": "regression",
    "rmse": "regression",
    "mean_absolute_error": "regression_l1",
    "l1": "regression_l1",
    "mae": "regression_l1",
    "softmax": "multiclass",
    "multiclass_ova": "multiclassova",
    "ova": "multiclassova",
    "ovr": "multiclassova",
    "xentropy": "cross_entropy",
    "xentlambda": "cross_entropy_lambda",
    "mean_absolute_percentage_error": "mape",
    "xendcg": "rank_xendcg",
    "xe_ndcg": "rank_xendcg",
    "xe_ndcg_mart": "rank_xendcg",
    "xendcg_mart": "rank_xendcg",
    "none": "custom",
    "null": "custom",
    "na": "custom",
}
_SQRT_CAPABLE = {"regression", "regression_l1", "quantile", "mape"}  # others reset sqrt_ to false
_IDENTITY_OBJECTIVES = {"regression", "regression_l1", "quantile", "mape", "huber", "fair",
                        "lambdarank", "rank_xendcg", "custom"}


@numba.njit(cache=True, nogil=True)
def _score_batch(
    X: np.ndarray,
    roots: np.ndarray,
    split_feature: np.ndarray,
    threshold: np.ndarray,
    decision_type: np.ndarray,
    left_child: np.ndarray,
    right_child: np.ndarray,
    cat_start: np.ndarray,
    cat_words: np.ndarray,
    cat_bits: np.ndarray,
    leaf_value: np.ndarray,
    divisor: float,
    transform: int,
    param: float,
    out: np.ndarray,
) -> None:
    """Walk every row of ``X`` through all trees; write transformed scores into ``out``.

    Node ids are global: ``>= 0`` is an internal node, ``< 0`` is leaf ``~id``.
    """
    n_rows = X.shape[0]
    n_trees = roots.shape[0]
    for i in range(n_rows):
        total = 0.0
        for t in range(n_trees):
            node = roots[t]
            while node >= 0:
                fval: float = np.float64(X[i, split_feature[node]])
                isnan = math.isnan(fval)
                # The C API drops |v| <= kZeroThreshold from a dense row, so the tree sees exactly 0.0.
                if not isnan and math.fabs(fval) <= ZERO_THRESHOLD:
                    fval = 0.0
                dt = decision_type[node]
                if dt & CATEGORICAL_MASK:
                    go_left = False
                    # NaN, values that truncate to a negative int and values beyond int32 go right
                    # (static_cast<int> yields INT_MIN on x86, INT_MAX on ARM: both miss the bitset);
                    # (-1, 0) truncates to category 0.
                    if not isnan and fval > -1.0 and fval < INT32_LIMIT:
                        cat = np.int64(fval)
                        word = cat >> 5
                        if word < cat_words[node]:
                            go_left = ((cat_bits[cat_start[node] + word] >> (cat & 31)) & 1) == 1
                    node = left_child[node] if go_left else right_child[node]
                else:
                    missing_type = (dt >> 2) & 3
                    if isnan and missing_type != MISSING_NAN:
                        fval = 0.0
                        isnan = False
                    if (missing_type == MISSING_ZERO and fval >= -ZERO_THRESHOLD
                            and fval <= ZERO_THRESHOLD) or (missing_type == MISSING_NAN and isnan):
                        node = left_child[node] if dt & DEFAULT_LEFT_MASK else right_child[node]
                    elif fval <= threshold[node]:
                        node = left_child[node]
                    else:
                        node = right_child[node]
            total += leaf_value[~node]
        out[i] = convert_output(total, divisor, transform, param)


@dataclass
class _Tree:
    num_leaves: int
    split_feature: list[int]
    threshold: list[float]
    decision_type: list[int]
    left_child: list[int]
    right_child: list[int]
    leaf_value: list[float]
    cat_boundaries: list[int]
    cat_threshold: list[int]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split()]


def _parse_model_text(text: str) -> tuple[dict[str, str], list[_Tree], dict[str, str]]:
    """Split a LightGBM text model into header key/values, trees and the ``parameters:`` section."""
    lines = text.splitlines()
    header: dict[str, str] = {}
    pos = 0
    while pos < len(lines) and not lines[pos].startswith("Tree="):
        line = lines[pos].strip()
        if line == "end of trees":
            break
        if line:
            key, _, value = line.partition("=")
            header[key] = value
        pos += 1

    trees: list[_Tree] = []
    while pos < len(lines) and lines[pos].startswith("Tree="):
        pos += 1
        kv: dict[str, str] = {}
        while pos < len(lines) and lines[pos].strip():
            key, _, value = lines[pos].strip().partition("=")
            kv[key] = value
            pos += 1
        while pos < len(lines) and not lines[pos].strip():
            pos += 1
        trees.append(_tree_from_kv(kv))

    params: dict[str, str] = {}
    in_params = False
    for line in lines[pos:]:
        line = line.strip()
        if line == "parameters:":
            in_params = True
        elif line == "end of parameters":
            break
        elif in_params and line.startswith("[") and line.endswith("]") and ": " in line:
            key, _, value = line[1:-1].partition(": ")
            params[key] = value
    return header, trees, params


def _tree_from_kv(kv: dict[str, str]) -> _Tree:
    if kv.get("is_linear", "0").strip() not in ("", "0"):
        raise ValueError("linear_tree models are not supported")
    num_leaves = int(kv["num_leaves"])
    leaf_value = _floats(kv["leaf_value"])
    if len(leaf_value) != num_leaves:
        raise ValueError("malformed tree: leaf_value length != num_leaves")
    if num_leaves <= 1:
        if num_leaves < 1 or not math.isfinite(leaf_value[0]):
            raise ValueError("malformed tree: no leaf, or a leaf_value that is not a finite number")
        return _Tree(1, [], [], [], [], [], leaf_value[:1], [0], [])
    n = num_leaves - 1
    tree = _Tree(
        num_leaves=num_leaves,
        split_feature=_ints(kv["split_feature"]),
        threshold=_floats(kv["threshold"]),
        decision_type=_ints(kv["decision_type"]) if "decision_type" in kv else [0] * n,
        left_child=_ints(kv["left_child"]),
        right_child=_ints(kv["right_child"]),
        leaf_value=leaf_value,
        cat_boundaries=_ints(kv["cat_boundaries"]) if int(kv.get("num_cat", "0")) > 0 else [0],
        cat_threshold=_ints(kv["cat_threshold"]) if int(kv.get("num_cat", "0")) > 0 else [],
    )
    for name in ("split_feature", "threshold", "decision_type", "left_child", "right_child"):
        if len(getattr(tree, name)) != n:
            raise ValueError(f"malformed tree: {name} length != num_leaves - 1")
    _check_tree(tree)
    return tree


def _check_tree(tree: _Tree) -> None:
    """Refuse what no LightGBM writes and the kernels cannot walk safely (they do not bound-check):
    children that do not form one binary tree from node 0 (a cycle would loop forever, an index out of
    range would read another tree's or no array's memory), decision types outside LightGBM's bits, NaN
    thresholds (the walker and the decision scorer would send NaN splits different ways) and
    non-finite leaf values (NaN or certain propensities)."""
    n = tree.num_leaves - 1
    if not all(math.isfinite(v) for v in tree.leaf_value):
        raise ValueError("malformed tree: a leaf_value is not a finite number")
    for j, (dt, thr) in enumerate(zip(tree.decision_type, tree.threshold)):
        if not 0 <= dt <= 15 or (dt >> 2) & 3 == 3:
            raise ValueError(f"malformed tree: node {j} has decision_type {dt}")
        if math.isnan(thr):
            raise ValueError(f"malformed tree: node {j} has a NaN threshold")
    node_seen, leaf_seen = [False] * n, [False] * tree.num_leaves
    node_seen[0] = True
    stack = [0]
    while stack:
        node = stack.pop()
        for child in (tree.left_child[node], tree.right_child[node]):
            if child >= 0:
                if child >= n or node_seen[child]:
                    raise ValueError(f"malformed tree: node {node} has child node {child} (nodes 1..{n - 1}, each once)")
                node_seen[child] = True
                stack.append(child)
            else:
                if ~child >= tree.num_leaves or leaf_seen[~child]:
                    raise ValueError(f"malformed tree: node {node} has child leaf {~child} "
                                     f"(leaves 0..{tree.num_leaves - 1}, each once)")
                leaf_seen[~child] = True
    if not all(node_seen) or not all(leaf_seen):
        raise ValueError("malformed tree: some nodes or leaves are not reached from node 0")


def _objective_transform(objective: str, sigmoid_override: float | None) -> tuple[int, float]:
    """Map a model file ``objective=`` string to a transform code and its parameter."""
    tokens = objective.split()
    if not tokens:
        return T_IDENTITY, 0.0
    name = _OBJECTIVE_ALIASES.get(tokens[0], tokens[0])
    if name in ("multiclass", "multiclassova"):
        raise ValueError(f"multiclass models are not supported (objective={name})")
    if name == "binary":
        sigmoid = None
        for tok in tokens[1:]:
            key, _, value = tok.partition(":")
            if key == "sigmoid" and value:
                sigmoid = float(value)
        if sigmoid is None or not 0.0 < sigmoid < math.inf:
            raise ValueError(f"binary objective without a positive sigmoid: {objective!r}")
        # The model text prints sigmoid with 6 significant digits; an in-memory booster keeps the exact
        # value, so prefer it when it is the same number at that precision.
        if sigmoid_override is not None and f"{sigmoid_override:g}" == f"{sigmoid:g}":
            sigmoid = sigmoid_override
        return T_SIGMOID, sigmoid
    if name == "cross_entropy":
        return T_SIGMOID, 1.0
    if name == "cross_entropy_lambda":
        return T_LOG1P_EXP, 0.0
    if name in ("poisson", "gamma", "tweedie"):
        return T_EXP, 0.0
    if name in _SQRT_CAPABLE and "sqrt" in tokens[1:]:
        return T_SQUARE, 0.0
    if name in _IDENTITY_OBJECTIVES:
        return T_IDENTITY, 0.0
    raise ValueError(f"unsupported objective: {objective!r}")


class CompiledModel:
    """A LightGBM model flattened to numpy arrays and scored by a numba kernel."""

    num_features: int
    feature_names: list[str]
    objective: str
    average_output: bool
    num_trees: int

    def __init__(self, model_text: str, *, sigmoid_override: float | None = None) -> None:
        """Build from LightGBM text-model contents; prefer ``from_booster`` / ``from_file``."""
        header, trees, params = _parse_model_text(model_text)
        if "num_class" not in header or "max_feature_idx" not in header:
            raise ValueError("not a LightGBM text model (num_class / max_feature_idx missing)")
        num_class = int(header["num_class"])
        per_iter = int(header.get("num_tree_per_iteration", num_class))
        if num_class != 1 or per_iter != 1:
            raise ValueError(f"multiclass models are not supported (num_class={num_class})")
        if params.get("linear_tree", "0").strip() not in ("", "0"):
            raise ValueError("linear_tree models are not supported")
        if not trees:
            raise ValueError("model has no trees")

        self.num_features = int(header["max_feature_idx"]) + 1
        self.feature_names = header.get("feature_names", "").split()
        if len(self.feature_names) != self.num_features:
            raise ValueError("feature_names does not match max_feature_idx")
        self.objective = header.get("objective", "")
        self.average_output = "average_output" in header
        self.num_trees = len(trees)
        self._transform, self._param = _objective_transform(self.objective, sigmoid_override)
        # GBDT::Predict divides by the number of iterations; PredictRaw (raw_score=True) does not.
        self._divisor = float(len(trees)) if self.average_output else 1.0
        self._flatten(trees)

    @classmethod
    def from_booster(cls, booster: lightgbm.Booster) -> CompiledModel:
        """Compile a trained booster (its best iteration, as ``Booster.predict`` uses by default)."""
        sigmoid = booster.params.get("sigmoid") if isinstance(booster.params, dict) else None
        try:
            sigmoid_override = float(sigmoid) if sigmoid is not None else None
        except (TypeError, ValueError):
            sigmoid_override = None
        return cls(booster.model_to_string(), sigmoid_override=sigmoid_override)

    @classmethod
    def from_file(cls, path: str | Path) -> CompiledModel:
        """Compile a LightGBM text model file (as written by ``Booster.save_model``)."""
        return cls(Path(path).read_text(encoding="utf-8"))

    def _flatten(self, trees: list[_Tree]) -> None:
        n_nodes = sum(t.num_leaves - 1 for t in trees)
        n_leaves = sum(t.num_leaves for t in trees)
        n_words = sum(len(t.cat_threshold) for t in trees)
        roots = np.empty(len(trees), dtype=np.int32)
        split_feature = np.zeros(n_nodes, dtype=np.int32)
        threshold = np.zeros(n_nodes, dtype=np.float64)
        decision_type = np.zeros(n_nodes, dtype=np.int8)
        left_child = np.zeros(n_nodes, dtype=np.int32)
        right_child = np.zeros(n_nodes, dtype=np.int32)
        cat_start = np.zeros(n_nodes, dtype=np.int32)
        cat_words = np.zeros(n_nodes, dtype=np.int32)
        cat_bits = np.zeros(max(n_words, 1), dtype=np.uint32)
        leaf_value = np.empty(n_leaves, dtype=np.float64)

        def global_child(child: int, node_off: int, leaf_off: int) -> int:
            return node_off + child if child >= 0 else ~(leaf_off + ~child)

        node_off = leaf_off = word_off = 0
        for t_idx, tree in enumerate(trees):
            n = tree.num_leaves - 1
            leaf_value[leaf_off:leaf_off + tree.num_leaves] = tree.leaf_value
            if n == 0:
                roots[t_idx] = ~leaf_off
            else:
                roots[t_idx] = node_off
                for j in range(n):
                    g = node_off + j
                    feat = tree.split_feature[j]
                    if not 0 <= feat < self.num_features:
                        raise ValueError(f"split on feature {feat} outside 0..{self.num_features - 1}")
                    split_feature[g] = feat
                    dt = tree.decision_type[j]
                    decision_type[g] = dt
                    left_child[g] = global_child(tree.left_child[j], node_off, leaf_off)
                    right_child[g] = global_child(tree.right_child[j], node_off, leaf_off)
                    if dt & CATEGORICAL_MASK:
                        # For categorical nodes the threshold holds the index into cat_boundaries.
                        thr = tree.threshold[j]
                        if not (math.isfinite(thr) and thr == int(thr) and 0 <= thr < len(tree.cat_boundaries) - 1):
                            raise ValueError(f"categorical split {j} names bitset {thr!r}, "
                                             f"not one of 0..{len(tree.cat_boundaries) - 2}")
                        cat_idx = int(thr)
                        lo, hi = tree.cat_boundaries[cat_idx], tree.cat_boundaries[cat_idx + 1]
                        if not 0 <= lo <= hi <= len(tree.cat_threshold):
                            raise ValueError(f"categorical split {j}: cat_boundaries {lo}..{hi} outside "
                                             f"cat_threshold (0..{len(tree.cat_threshold)})")
                        cat_start[g] = word_off + lo
                        cat_words[g] = hi - lo
                    else:
                        threshold[g] = tree.threshold[j]
            cat_bits[word_off:word_off + len(tree.cat_threshold)] = tree.cat_threshold
            node_off += n
            leaf_off += tree.num_leaves
            word_off += len(tree.cat_threshold)

        self._roots = roots
        self._split_feature = split_feature
        self._threshold = threshold
        self._decision_type = decision_type
        self._left_child = left_child
        self._right_child = right_child
        self._cat_start = cat_start
        self._cat_words = cat_words
        self._cat_bits = cat_bits
        self._leaf_value = leaf_value

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"expected a 2D array, got {X.ndim}D")
        if X.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {X.shape[1]}")
        if X.dtype != np.float32 and X.dtype != np.float64:
            X = X.astype(np.float32)  # what LightGBM's Python package does with other dtypes
        X = np.ascontiguousarray(X)
        if not X.flags.writeable:
            # numba compiles a separate specialization for read-only arrays (e.g. np.frombuffer);
            # copying keeps requests on the two signatures warmup() compiled.
            X = X.copy()
        return X

    def _run(self, X: np.ndarray, raw: bool) -> np.ndarray:
        X = self._check(X)
        out = np.empty(X.shape[0], dtype=np.float64)
        _score_batch(
            X, self._roots, self._split_feature, self._threshold, self._decision_type,
            self._left_child, self._right_child, self._cat_start, self._cat_words, self._cat_bits,
            self._leaf_value,
            1.0 if raw else self._divisor,
            T_IDENTITY if raw else self._transform,
            self._param,
            out,
        )
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Transformed scores, equal to ``Booster.predict(X)``; X is 2D float32/float64."""
        return self._run(X, raw=False)

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """Raw scores, equal to ``Booster.predict(X, raw_score=True)`` (not averaged for rf)."""
        return self._run(X, raw=True)

    def bind(self, row_features: list[int] | tuple[int, ...] | np.ndarray, catalog: np.ndarray):
        """A scorer for decision-shaped batches: one shared row (customer, channel) against rows of
        ``catalog`` whose own values fill the ``row_features`` columns (see ``engine.models.bound_scorer``)."""
        return DecisionScorer(self, row_features, catalog)

    @property
    def probabilities(self) -> bool:
        """Its scores are probabilities (a binary or cross-entropy objective), as a propensity must be."""
        return self._transform == T_SIGMOID

    def warmup(self) -> None:
        """Compile (or load from cache) the kernel for float32 and float64 input."""
        for dtype in (np.float64, np.float32):
            self.predict(np.zeros((1, self.num_features), dtype=dtype))
