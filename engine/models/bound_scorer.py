"""The decision-shaped fast path: one customer against many catalog actions in one numba call.

In a decision every row shares the customer block and the channel; only the action's own features
(id, type, value) differ, and those come from a catalog that changes only when the rules or the
model change. ``CompiledModel.bind(row_features, catalog)`` splits the work accordingly, after
QuickScorer (Lucchese et al., SIGIR 2015):

* leaves of each tree are numbered left to right; every internal node has a 64-bit mask with zeros
  for the leaves of its left subtree. A row's exit leaf is the lowest set bit of the AND of the masks
  of all nodes whose test sends that row right ("false" nodes), whether or not they are on its path;
* at bind time (model load, rules reload), for every tree and catalog action, the AND over the
  action's own false nodes (``action_bits[tree, action]``);
* per decision, the AND over the customer's false nodes, once for all rows (``shared[tree]``):
  numerical nodes of a feature are sorted by threshold, so the false ones (``value > threshold``)
  are a prefix and the scan stops at the first true node; categorical nodes look up their bitset;
* per row and tree, one AND, one count-trailing-zeros and one leaf load.

Nothing walks a tree on the request path: no data-dependent branch per node, no chain of dependent
loads, and the work per extra row is one table lookup per tree. Missing values follow LightGBM
exactly (``trees.go_left``): NaN and zero handling by each node's missing type and default
direction, values within kZeroThreshold read as 0, negative / NaN / beyond-int32 categories go
right. Trees are summed in model order, so scores equal ``CompiledModel.predict`` on the assembled
rows bit for bit. Models with a tree of more than 64 leaves fall back to assembling rows for the
tree walker (same answers, no speed-up).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.models.trees import (
    CATEGORICAL_MASK,
    DEFAULT_LEFT_MASK,
    INT32_LIMIT,
    MISSING_NAN,
    MISSING_ZERO,
    ZERO_THRESHOLD,
    FlatForest,
    convert_output,
    go_left,
)

__all__ = ["DecisionScorer", "MAX_LEAVES"]

MAX_LEAVES = 64  # leaves of a tree must fit one 64-bit mask
_F8, _I8 = np.dtype(np.float64), np.dtype(np.int64)


# The model blob: int64 words, a header of region offsets then struct-of-arrays regions. Kernels index
# it with unsigned integers (numba adds a negative-index fix-up to every signed subscript).
(_H_TREES, _H_FEATURES, _H_SEG, _H_NUM_THR, _H_NUM_MASK, _H_NUM_TREE, _H_DEF_MASK, _H_DEF_TREE,
 _H_CAT_MASK, _H_CAT_TREE, _H_CAT_START, _H_CAT_WORDS, _H_BITS, _H_LEAF, _H_TRANSFORM, _H_PARAM,
 _H_DIVISOR, _H_LEAF_STRIDE) = range(18)
_HEADER = 24
# Per feature: numerical entries [start, end) for missing types None/Zero/NaN, then their
# default-right entries [start, end), then categorical entries [start, end).
_SEG = 14
_U = np.uint64


@intrinsic
def _cttz(typingctx, x):
    """Count trailing zeros (tzcnt) of a 64-bit integer, as uint64; 64 for 0."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:  # type: ignore[attr-defined]  # numba's stubs omit it
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], cgutils.false_bit)

    return types.uint64(x), codegen


@numba.njit(inline="always", nogil=True)
def _shared_masks(x, blob, feats, shared) -> None:
    """``shared[t]`` = AND of the leaf masks of tree t's nodes that the shared row sends right."""
    ub = blob.view(np.uint64)
    fb = blob.view(np.float64)
    for t in range(shared.shape[0]):
        shared[t] = -1
    seg0 = ub[_H_SEG]
    thr0, nmask0, ntree0 = ub[_H_NUM_THR], ub[_H_NUM_MASK], ub[_H_NUM_TREE]
    dmask0, dtree0 = ub[_H_DEF_MASK], ub[_H_DEF_TREE]
    cmask0, ctree0, cstart0, cwords0, bits0 = (ub[_H_CAT_MASK], ub[_H_CAT_TREE], ub[_H_CAT_START],
                                               ub[_H_CAT_WORDS], ub[_H_BITS])
    for fi in range(feats.shape[0]):
        f = _U(feats[fi])
        v: float = np.float64(x[f])
        isnan = math.isnan(v)
        if not isnan and math.fabs(v) <= ZERO_THRESHOLD:
            v = 0.0  # the C API drops |v| <= kZeroThreshold from a row: the tree sees 0
        s = seg0 + f * _U(_SEG)
        for kind in range(3):
            k2 = _U(2 * kind)
            j, end = ub[s + k2], ub[s + k2 + _U(1)]
            if j == end:
                continue
            if (kind == MISSING_ZERO and (isnan or v == 0.0)) or (kind == MISSING_NAN and isnan):
                # missing for this kind of node: each takes its default direction
                j, end = ub[s + _U(6) + k2], ub[s + _U(7) + k2]
                while j < end:
                    shared[ub[dtree0 + j]] &= blob[dmask0 + j]
                    j += _U(1)
            else:
                vv = 0.0 if isnan else v  # NaN reads as 0 where NaN is not the missing value
                while j < end:
                    if not fb[thr0 + j] < vv:  # sorted by threshold: the rest go left
                        break
                    shared[ub[ntree0 + j]] &= blob[nmask0 + j]
                    j += _U(1)
        j, end = ub[s + _U(12)], ub[s + _U(13)]
        if j < end:
            valid = not isnan and v > -1.0 and v < INT32_LIMIT
            cat = _U(np.int64(v)) if valid else _U(0)  # truncation: (-1, 0) is category 0
            word = cat >> _U(5)
            bit = cat & _U(31)
            while j < end:
                left = False
                if valid and word < ub[cwords0 + j]:
                    left = ((ub[bits0 + ub[cstart0 + j] + word] >> bit) & _U(1)) == _U(1)
                if not left:
                    shared[ub[ctree0 + j]] &= blob[cmask0 + j]
                j += _U(1)


@numba.njit(inline="always", nogil=True)
def _row_sums(shared, act, lo, hi, out, blob, action_bits) -> int:
    """``out[lo:hi]`` = raw scores of catalog rows ``act[lo:hi]``; -1 if an index is out of range.

    Eight rows at a time, each summed in tree order (so the sum equals the tree walker's bit for
    bit) but as eight independent chains, so the additions overlap.
    """
    n_actions = action_bits.shape[0]
    for r in range(lo, hi):
        if act[r] < 0 or act[r] >= n_actions:
            return -1
    if hi <= lo:
        return 0
    fb = blob.view(np.float64)
    leaf0 = blob.view(np.uint64)[_H_LEAF]
    stride = blob.view(np.uint64)[_H_LEAF_STRIDE]
    n_trees = _U(shared.shape[0])
    start = lo
    while start < hi:
        if start + 8 > hi:
            start = max(lo, hi - 8)  # the last block overlaps (rows are recomputed identically)
        last = hi - 1
        r0, r1, r2, r3 = start, min(start + 1, last), min(start + 2, last), min(start + 3, last)
        r4, r5, r6, r7 = min(start + 4, last), min(start + 5, last), min(start + 6, last), min(start + 7, last)
        a0, a1, a2, a3 = _U(act[r0]), _U(act[r1]), _U(act[r2]), _U(act[r3])
        a4, a5, a6, a7 = _U(act[r4]), _U(act[r5]), _U(act[r6]), _U(act[r7])
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        t = _U(0)
        base = leaf0
        while t < n_trees:
            m = shared[t]
            s0 += fb[base + _cttz(m & action_bits[a0, t])]  # type: ignore[call-arg]  # numba's stubs: the typer's (typingctx, x)
            s1 += fb[base + _cttz(m & action_bits[a1, t])]
            s2 += fb[base + _cttz(m & action_bits[a2, t])]
            s3 += fb[base + _cttz(m & action_bits[a3, t])]
            s4 += fb[base + _cttz(m & action_bits[a4, t])]
            s5 += fb[base + _cttz(m & action_bits[a5, t])]
            s6 += fb[base + _cttz(m & action_bits[a6, t])]
            s7 += fb[base + _cttz(m & action_bits[a7, t])]
            t += _U(1)
            base += stride
        out[r0], out[r1], out[r2], out[r3] = s0, s1, s2, s3
        out[r4], out[r5], out[r6], out[r7] = s4, s5, s6, s7
        start += 8
    return 0


@numba.njit(inline="always", nogil=True)
def _finish(out, lo, hi, blob, raw) -> None:
    if raw:
        return
    transform = blob[_H_TRANSFORM]
    fb = blob.view(np.float64)
    param, divisor = fb[_H_PARAM], fb[_H_DIVISOR]
    for r in range(lo, hi):
        out[r] = convert_output(out[r], divisor, transform, param)


@numba.njit(cache=True, nogil=True)
def _score_decision(x, act, out, blob, action_bits, feats, raw) -> int:
    """One shared row against catalog rows ``act``; returns -1 on an out-of-range index."""
    shared = np.empty(blob[_H_TREES], dtype=np.int64)
    _shared_masks(x, blob, feats, shared)
    if _row_sums(shared, act, 0, act.shape[0], out, blob, action_bits) < 0:
        return -1
    _finish(out, 0, act.shape[0], blob, raw)
    return 0


@numba.njit(cache=True, nogil=True)
def _score_pairs(X, cust, act, out, blob, action_bits, feats, raw) -> int:
    """Row r is shared row ``X[cust[r]]`` with catalog row ``act[r]``; consecutive rows of the same
    shared row share its masks. Returns -1 on an out-of-range index."""
    n = cust.shape[0]
    shared = np.empty(blob[_H_TREES], dtype=np.int64)
    lo = 0
    while lo < n:
        c = cust[lo]
        if c < 0 or c >= X.shape[0]:
            return -1
        hi = lo + 1
        while hi < n and cust[hi] == c:
            hi += 1
        _shared_masks(X[c], blob, feats, shared)
        if _row_sums(shared, act, lo, hi, out, blob, action_bits) < 0:
            return -1
        _finish(out, lo, hi, blob, raw)
        lo = hi
    return 0


@numba.njit(cache=True, nogil=True)
def _bind_actions(catalog, columns, nodes, split_feature, threshold, decision_type, cat_start,
                  cat_words, cat_bits, node_tree, node_mask, action_bits) -> None:
    """``action_bits[a, t]`` &= mask of every catalog-feature node of tree t that sends action ``a``
    right."""
    for k in range(nodes.shape[0]):
        node = nodes[k]
        col = columns[split_feature[node]]
        for a in range(catalog.shape[0]):
            if not go_left(node, np.float64(catalog[a, col]), threshold, decision_type, cat_start,
                            cat_words, cat_bits):
                action_bits[a, node_tree[node]] &= node_mask[node]


class _Layout:
    """Catalog-independent flat form of a model for the kernels above (built once per model)."""

    def __init__(self, model: FlatForest) -> None:
        n_trees, n_features = model.num_trees, model.num_features
        n_nodes = len(model._split_feature)
        left, right, roots = model._left_child, model._right_child, model._roots
        node_tree = np.zeros(n_nodes, dtype=np.int64)
        node_mask = np.zeros(n_nodes, dtype=np.int64)
        leaf_lists: list[np.ndarray] = []
        self.supported = True
        for t in range(n_trees):
            order: list[int] = []
            spans: dict[int, tuple[int, int]] = {}
            self._inorder(int(roots[t]), left, right, order, spans, node_tree, t)
            if len(order) > MAX_LEAVES:
                self.supported = False
                break
            leaf_lists.append(model._leaf_value[order])
            for node, (lo, mid) in spans.items():
                left_bits = ((1 << mid) - 1) ^ ((1 << lo) - 1)  # leaves lo..mid-1: the left subtree
                node_mask[node] = ~left_bits  # as int64: ones everywhere but the left subtree
        self.node_tree, self.node_mask = node_tree, node_mask
        if not self.supported:
            return
        # Leaf values per tree, left to right, padded to a power of two (32 for 31-leaf trees): small
        # enough to stay in cache between decisions.
        stride = 1 << max(0, max(len(v) for v in leaf_lists) - 1).bit_length()
        leaves = np.zeros((n_trees, stride), dtype=np.float64)
        for t, values in enumerate(leaf_lists):
            leaves[t, : len(values)] = values

        feat, dt, thr = model._split_feature, model._decision_type, model._threshold
        categorical = (dt & CATEGORICAL_MASK) != 0
        missing = (dt.astype(np.int64) >> 2) & 3
        default_right = (dt & DEFAULT_LEFT_MASK) == 0
        seg = np.zeros((n_features, _SEG), dtype=np.int64)
        num_nodes: list[np.ndarray] = []
        def_nodes: list[np.ndarray] = []
        cat_nodes: list[np.ndarray] = []
        n_num = n_def = n_cat = 0
        for f in range(n_features):
            on_f = feat == f
            for kind in range(3):
                sel = np.flatnonzero(on_f & ~categorical & (missing == kind))
                sel = sel[np.argsort(thr[sel], kind="stable")]
                seg[f, 2 * kind: 2 * kind + 2] = (n_num, n_num + len(sel))
                num_nodes.append(sel)
                n_num += len(sel)
                d = sel[default_right[sel]]
                seg[f, 6 + 2 * kind: 8 + 2 * kind] = (n_def, n_def + len(d))
                def_nodes.append(d)
                n_def += len(d)
            sel = np.flatnonzero(on_f & categorical)
            seg[f, 12:14] = (n_cat, n_cat + len(sel))
            cat_nodes.append(sel)
            n_cat += len(sel)
        num = np.concatenate(num_nodes).astype(np.int64) if num_nodes else np.zeros(0, np.int64)
        dfl = np.concatenate(def_nodes).astype(np.int64) if def_nodes else np.zeros(0, np.int64)
        cat = np.concatenate(cat_nodes).astype(np.int64) if cat_nodes else np.zeros(0, np.int64)

        leaf_bits = leaves.ravel().view(np.int64)
        parts = {
            _H_SEG: seg.ravel(),
            _H_NUM_THR: thr[num].astype(np.float64).view(np.int64),
            _H_NUM_MASK: node_mask[num],
            _H_NUM_TREE: node_tree[num],
            _H_DEF_MASK: node_mask[dfl],
            _H_DEF_TREE: node_tree[dfl],
            _H_CAT_MASK: node_mask[cat],
            _H_CAT_TREE: node_tree[cat],
            _H_CAT_START: model._cat_start[cat].astype(np.int64),
            _H_CAT_WORDS: model._cat_words[cat].astype(np.int64),
            _H_BITS: model._cat_bits.astype(np.int64),
            _H_LEAF: leaf_bits,
        }
        blob = np.zeros(_HEADER + sum(len(p) for p in parts.values()), dtype=np.int64)
        offset = _HEADER
        for slot, part in parts.items():
            blob[slot] = offset
            blob[offset: offset + len(part)] = part
            offset += len(part)
        blob[_H_TREES], blob[_H_FEATURES], blob[_H_LEAF_STRIDE] = n_trees, n_features, stride
        blob[_H_TRANSFORM] = model._transform
        blob[_H_PARAM: _H_DIVISOR + 1] = np.array([model._param, model._divisor], dtype=np.float64).view(np.int64)
        self.blob = blob
        # features with at least one node, for the per-decision scan
        self.used = np.unique(feat).astype(np.int64)

    @staticmethod
    def _inorder(root: int, left: np.ndarray, right: np.ndarray, order: list[int],
                 spans: dict[int, tuple[int, int]], node_tree: np.ndarray, t: int) -> None:
        """Leaves left to right into ``order``; ``spans[node] = (first leaf, first right leaf)``."""
        stack: list[tuple[int, int]] = [(root, 0)]
        starts: dict[int, int] = {}
        while stack:
            node, state = stack.pop()
            if node < 0:
                order.append(~node)
            elif state == 0:
                node_tree[node] = t
                starts[node] = len(order)
                stack.append((node, 1))
                stack.append((int(left[node]), 0))
            else:  # left subtree done
                spans[node] = (starts[node], len(order))
                stack.append((int(right[node]), 0))


_LAYOUTS: weakref.WeakKeyDictionary[FlatForest, _Layout] = weakref.WeakKeyDictionary()


def _layout(model: FlatForest) -> _Layout:
    layout = _LAYOUTS.get(model)
    if layout is None:
        layout = _LAYOUTS[model] = _Layout(model)
    return layout


class DecisionScorer:
    """A model bound to a catalog: ``predict(shared_row, actions)`` scores catalog rows ``actions``
    for one shared row, equal to ``model.predict`` on the assembled rows.

    ``row_features[j]`` is the model column that catalog column ``j`` fills; every other column comes
    from the shared row (whose ``row_features`` columns are ignored).
    """

    def __init__(self, model: FlatForest, row_features: Sequence[int] | np.ndarray,
                 catalog: np.ndarray) -> None:
        self.model = model
        self.row_features = np.asarray(row_features, dtype=np.int64).ravel()
        catalog = np.asarray(catalog, dtype=np.float64)
        if catalog.ndim != 2 or catalog.shape[1] != len(self.row_features):
            raise ValueError(f"catalog must be (actions, {len(self.row_features)}), got {catalog.shape}")
        if len(set(self.row_features.tolist())) != len(self.row_features) or (
                len(self.row_features) and not (0 <= self.row_features.min() and self.row_features.max() < model.num_features)):
            raise ValueError(f"row_features must be distinct columns in 0..{model.num_features - 1}")
        self.catalog = np.ascontiguousarray(catalog)
        self.num_actions = catalog.shape[0]
        self.num_features = model.num_features
        self._row_shape = (model.num_features,)
        layout = _layout(model)
        self.fast = layout.supported
        if not self.fast:
            return
        self._blob = layout.blob
        is_row = np.zeros(model.num_features, dtype=bool)
        is_row[self.row_features] = True
        self._feats = np.ascontiguousarray(layout.used[~is_row[layout.used]])
        columns = np.full(model.num_features, -1, dtype=np.int64)
        columns[self.row_features] = np.arange(len(self.row_features))
        nodes = np.flatnonzero(is_row[model._split_feature]).astype(np.int64)
        self._action_bits = np.full((self.num_actions, model.num_trees), -1, dtype=np.int64)
        _bind_actions(self.catalog, columns, nodes, model._split_feature, model._threshold,
                      model._decision_type, model._cat_start, model._cat_words, model._cat_bits,
                      layout.node_tree, layout.node_mask, self._action_bits)

    def _shared(self, x: np.ndarray, ndim: int) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != ndim or x.shape[-1] != self.num_features:
            raise ValueError(f"expected shared row(s) of {self.num_features} features, got shape {x.shape}")
        if x.dtype != np.float64 and x.dtype != np.float32:
            x = x.astype(np.float32)  # as LightGBM's Python package does
        if not x.flags.c_contiguous or not x.flags.writeable:
            x = np.array(x, order="C")  # keep requests on the signatures warmup() compiled
        return x

    def _assemble(self, X: np.ndarray, cust: np.ndarray, act: np.ndarray) -> np.ndarray:
        rows = np.array(X[cust], dtype=np.float64)  # catalog values are float64 on both paths
        rows[:, self.row_features] = self.catalog[act]
        return rows

    def predict(self, x: np.ndarray, actions: np.ndarray | Sequence[int], raw: bool = False) -> np.ndarray:
        """Scores of catalog rows ``actions`` (int indices) for one shared row ``x`` (1-D)."""
        if (type(x) is not np.ndarray or x.dtype is not _F8 or x.shape != self._row_shape
                or not (flags := x.flags).c_contiguous or not flags.writeable):  # the service's rows skip all this
            x = self._shared(x, 1)
        act = actions
        if type(act) is not np.ndarray or act.dtype is not _I8 or not act.flags.c_contiguous:
            act = np.ascontiguousarray(actions, dtype=np.int64)
        if not self.fast:
            return self._fallback(x[None, :], np.zeros(len(act), np.int64), act, raw)
        out = np.empty(act.shape[0])
        if _score_decision(x, act, out, self._blob, self._action_bits, self._feats, raw) < 0:
            raise IndexError(f"action index out of range 0..{self.num_actions - 1}")
        return out

    def predict_pairs(self, X: np.ndarray, customers: np.ndarray, actions: np.ndarray,
                      raw: bool = False) -> np.ndarray:
        """Row r = shared row ``X[customers[r]]`` with catalog row ``actions[r]`` (a batch of
        decisions; keep each customer's rows together so its shared masks are computed once)."""
        X = self._shared(X, 2)
        cust = np.ascontiguousarray(customers, dtype=np.int64)
        act = np.ascontiguousarray(actions, dtype=np.int64)
        if cust.shape != act.shape or cust.ndim != 1:
            raise ValueError("customers and actions must be 1-D and of equal length")
        if not self.fast:
            return self._fallback(X, cust, act, raw)
        out = np.empty(len(act), dtype=np.float64)
        if _score_pairs(X, cust, act, out, self._blob, self._action_bits, self._feats, raw) < 0:
            raise IndexError("customer or action index out of range")
        return out

    def _fallback(self, X: np.ndarray, cust: np.ndarray, act: np.ndarray, raw: bool) -> np.ndarray:
        if len(act) and (cust.min() < 0 or cust.max() >= len(X) or act.min() < 0 or act.max() >= self.num_actions):
            raise IndexError("customer or action index out of range")
        rows = self._assemble(X, cust, act)
        return self.model.predict_raw(rows) if raw else self.model.predict(rows)

    def warmup(self) -> None:
        """Compile (or load from cache) both kernels for float64 and float32 shared rows."""
        if not self.fast:
            self.model.warmup()
            return
        one = np.zeros(min(1, self.num_actions), dtype=np.int64)
        for dtype in (np.float64, np.float32):
            x = np.zeros(self.num_features, dtype=dtype)
            for raw in (False, True):
                self.predict(x, one, raw=raw)
                self.predict_pairs(x[None, :], np.zeros(len(one), np.int64), one, raw=raw)
