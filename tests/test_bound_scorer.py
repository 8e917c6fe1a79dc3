"""The decision-shaped scorer (one shared row x catalog rows) must equal Booster.predict on the
assembled rows, for random models, random catalogs and hostile inputs (NaN, zeros, tiny values,
infinities, unseen / negative / huge categories)."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.models.bound_scorer import MAX_LEAVES, DecisionScorer, _score_decision, _score_pairs
from engine.models.scorer import CompiledModel

from .properties import examples
from .test_scorer import ATOL, HYPOTHESIS, _handmade_model_text, _lgb, _prediction_input, _train, model_specs


def _assemble(shared: np.ndarray, row_features: np.ndarray, catalog: np.ndarray, cust: np.ndarray,
              act: np.ndarray) -> np.ndarray:
    rows = np.array(shared[cust], dtype=np.float64)
    rows[:, row_features] = catalog[act]
    return rows


def _check(model: CompiledModel, booster: lgb.Booster, row_features: np.ndarray, catalog: np.ndarray,
           shared: np.ndarray, rng: np.random.Generator) -> None:
    scorer = model.bind(row_features, catalog)
    n_actions = len(catalog)
    for i in range(len(shared)):
        act = rng.choice(n_actions, size=rng.integers(0, n_actions + 3), replace=True).astype(np.int64)
        rows = _assemble(shared, row_features, catalog, np.full(len(act), i), act)
        expected = model.predict(rows)
        with np.errstate(over="ignore"):
            shared32 = shared.astype(np.float32)
        for x in (shared[i], shared32[i]):
            if x.dtype == np.float32:
                rows32 = _assemble(shared32, row_features, catalog, np.full(len(act), i), act)
                expected32 = model.predict(rows32)
                np.testing.assert_array_equal(scorer.predict(x, act), expected32)
            else:
                got = scorer.predict(x, act)
                np.testing.assert_array_equal(got, expected)  # same trees, same order: bit for bit
                np.testing.assert_allclose(got, _lgb(booster, rows), rtol=0, atol=ATOL)
                np.testing.assert_allclose(scorer.predict(x, act, raw=True), _lgb(booster, rows, raw_score=True),
                                           rtol=0, atol=ATOL)
    # a batch of decisions: rows grouped by customer, plus a customer that comes back later
    cust = np.repeat(np.arange(len(shared)), 3)
    cust = np.concatenate([cust, cust[:2]])
    act = rng.integers(0, n_actions, len(cust))
    rows = _assemble(shared, row_features, catalog, cust, act)
    np.testing.assert_array_equal(scorer.predict_pairs(shared, cust, act), model.predict(rows))
    np.testing.assert_allclose(scorer.predict_pairs(shared, cust, act), _lgb(booster, rows), rtol=0, atol=ATOL)


@settings(HYPOTHESIS, max_examples=examples(120))
@given(model_specs(), st.data())
def test_matches_booster_on_random_models_and_catalogs(spec: dict, data: st.DataObject) -> None:
    booster, rng = _train(spec)
    model = CompiledModel.from_booster(booster)
    n_features = model.num_features
    n_row = data.draw(st.integers(0, min(4, n_features)), label="catalog columns")
    row_features = np.array(data.draw(st.permutations(range(n_features)), label="columns")[:n_row], dtype=np.int64)
    n_actions = data.draw(st.sampled_from([1, 2, 7, 40, 64, 65, 130]), label="catalog size")
    pool = _prediction_input(rng, model, spec["n_num"], spec["n_cat"], spec["card"], n=n_actions + 12)
    catalog = pool[:n_actions][:, row_features]
    _check(model, booster, row_features, catalog, np.ascontiguousarray(pool[n_actions:]), rng)


@pytest.mark.parametrize("num_leaves", [MAX_LEAVES, MAX_LEAVES + 1, 200])
def test_wide_trees(num_leaves: int) -> None:
    """64 leaves still fit one mask; wider trees fall back to the tree walker with the same answers."""
    spec = {"seed": num_leaves, "n": 6000, "n_num": 5, "n_cat": 2, "card": 30, "nan_frac": 0.1,
            "zero_frac": 0.2, "objective": "binary", "boosting": "gbdt", "num_trees": 8,
            "num_leaves": num_leaves, "zero_as_missing": False, "use_missing": True, "max_cat_to_onehot": 4,
            "max_bin": 255, "sigmoid": 1.0}
    booster, rng = _train(spec)
    model = CompiledModel.from_booster(booster)
    widest = max(t["num_leaves"] for t in booster.dump_model()["tree_info"])
    assert widest == num_leaves  # the edge is really exercised
    pool = _prediction_input(rng, model, 5, 2, 30, n=60)
    row_features = np.array([6, 0], dtype=np.int64)
    scorer = model.bind(row_features, pool[:40][:, row_features])
    assert scorer.fast == (widest <= MAX_LEAVES)
    _check(model, booster, row_features, pool[:40][:, row_features], np.ascontiguousarray(pool[40:]), rng)


def test_handmade_edge_semantics(tmp_path: Path) -> None:
    """Every missing type, default direction, tiny value and category edge, catalog and shared side."""
    path = tmp_path / "handmade.txt"
    path.write_text(_handmade_model_text())
    booster = lgb.Booster(model_file=str(path))
    model = CompiledModel.from_file(path)
    from .test_scorer import SPECIAL

    values = np.concatenate([SPECIAL, [1e-37, 5e-36, 0.25, -0.5, 1.5, -1.0, 0.0, 1.0, 2.0, 3.0, 5.0,
                                       5.9, 33.0, 33.5, 34.0, 64.0, 2.0**32 + 5, 2.0**32 + 33,
                                       np.nextafter(0.5, 1), np.nextafter(-0.25, -1)]])
    grid = np.array(np.meshgrid(values, values)).reshape(2, -1).T.copy()
    for row_features in ([1, 3], [0, 2], [3, 2]):
        rf = np.array(row_features, dtype=np.int64)
        scorer = model.bind(rf, grid)
        shared_features = [f for f in range(4) if f not in row_features]
        for a, b in grid[::37]:
            x = np.zeros(4)
            x[shared_features] = (a, b)
            act = np.arange(len(grid), dtype=np.int64)
            rows = np.tile(x, (len(grid), 1))
            rows[:, rf] = grid
            np.testing.assert_array_equal(scorer.predict(x, act), _lgb(booster, rows))


def test_out_of_range_and_bad_shapes_are_refused() -> None:
    booster, rng = _train({"seed": 1, "n": 500, "n_num": 3, "n_cat": 1, "card": 5, "nan_frac": 0.0,
                           "zero_frac": 0.0, "objective": "binary", "boosting": "gbdt", "num_trees": 5,
                           "num_leaves": 7, "zero_as_missing": False, "use_missing": True,
                           "max_cat_to_onehot": 4, "max_bin": 63, "sigmoid": 1.0})
    model = CompiledModel.from_booster(booster)
    scorer = model.bind([3], np.array([[0.0], [1.0], [2.0]]))
    x = np.zeros(4)
    for bad in ([3], [-1], [0, 5]):
        with pytest.raises(IndexError):
            scorer.predict(x, bad)
    with pytest.raises(IndexError):
        scorer.predict_pairs(x[None, :], [1], [0])
    with pytest.raises(ValueError):
        scorer.predict(np.zeros(5), [0])
    with pytest.raises(ValueError):
        model.bind([3, 3], np.zeros((2, 2)))
    with pytest.raises(ValueError):
        model.bind([4], np.zeros((2, 1)))
    assert scorer.predict(x, []).shape == (0,)


def test_warmup_covers_every_input_layout() -> None:
    """After warmup() no input a request can send triggers another JIT compilation."""
    booster, rng = _train({"seed": 2, "n": 800, "n_num": 4, "n_cat": 1, "card": 6, "nan_frac": 0.1,
                           "zero_frac": 0.1, "objective": "binary", "boosting": "gbdt", "num_trees": 10,
                           "num_leaves": 15, "zero_as_missing": False, "use_missing": True,
                           "max_cat_to_onehot": 4, "max_bin": 63, "sigmoid": 1.0})
    model = CompiledModel.from_booster(booster)
    scorer: DecisionScorer = model.bind([4, 0], np.array([[0.0, 1.0], [3.0, -2.0], [np.nan, 0.0]]))
    scorer.warmup()
    compiled = (len(_score_decision.signatures), len(_score_pairs.signatures))
    base = np.linspace(-2, 8, 4 * model.num_features).reshape(4, -1)
    readonly = np.frombuffer(base.astype(np.float32).tobytes(), dtype=np.float32).reshape(base.shape)
    for X in (base, base.astype(np.float32), np.asfortranarray(base), base[::2], readonly, base.astype(np.int32)):
        for act in ([0, 2, 1], np.array([2], dtype=np.int32), np.arange(3)[::2], np.zeros(0, np.int64)):
            scorer.predict(X[1], act)
            scorer.predict(X[1], act, raw=True)
            scorer.predict_pairs(X, np.zeros(len(act), np.int64), act)
    assert (len(_score_decision.signatures), len(_score_pairs.signatures)) == compiled
