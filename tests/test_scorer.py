"""CompiledModel must score exactly like lightgbm.Booster.predict."""

from __future__ import annotations

import math
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine.models.scorer import CompiledModel, _score_batch

from .properties import examples

ATOL = 1e-6
HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values that probe LightGBM's edge handling: tiny values the C API rounds to 0, signed zeros,
# infinities, int32 overflow of categorical casts, fractions that truncate to category 0.
SPECIAL = np.array([
    0.0, -0.0, 1e-36, -1e-36, 1e-35, 2e-35, 1e-300, np.inf, -np.inf, np.nan,
    -0.5, -0.99, -1.0, -7.0, 0.5, 2.7, 2.0**31 - 1, 2.0**31, 2.0**32 + 1, 2.0**32 + 3, 1e10, -2.0**31,
])


def _make_data(rng: np.random.Generator, n: int, n_num: int, n_cat: int, card: int,
               nan_frac: float, zero_frac: float) -> np.ndarray:
    X = np.empty((n, n_num + n_cat))
    X[:, :n_num] = rng.normal(size=(n, n_num)) * rng.choice([0.01, 1.0, 100.0], size=n_num)
    num = X[:, :n_num]
    num[rng.random(num.shape) < zero_frac] = 0.0
    num[rng.random(num.shape) < nan_frac] = np.nan
    if n_cat:
        cat = rng.integers(0, card, size=(n, n_cat)).astype(np.float64)
        cat[rng.random(cat.shape) < nan_frac] = np.nan
        X[:, n_num:] = cat
    return X


def _make_target(rng: np.random.Generator, X: np.ndarray, n_num: int, card: int, binary: bool) -> np.ndarray:
    Xf = np.nan_to_num(X)
    score = Xf[:, :n_num] @ rng.normal(size=n_num) / (1.0 + np.abs(Xf[:, :n_num]).mean(axis=0)).sum()
    score += (np.isnan(X[:, :n_num]) * rng.normal(size=n_num)).sum(axis=1)
    effects = rng.normal(size=card + 1)
    for j in range(n_num, X.shape[1]):
        codes = np.where(np.isnan(X[:, j]), card, X[:, j]).astype(int)
        score += effects[codes]
    score += rng.normal(scale=0.3, size=len(X))
    if binary:
        return (score > np.median(score)).astype(np.float64)
    return score


def _prediction_input(rng: np.random.Generator, model: CompiledModel, n_num: int, n_cat: int,
                      card: int, n: int) -> np.ndarray:
    """Fresh rows plus unseen/negative/NaN categories, special values and thresholds +- 1 ulp."""
    X = _make_data(rng, n, n_num, n_cat, card + 5, nan_frac=0.15, zero_frac=0.15)
    mask = rng.random(X.shape) < 0.15
    X[mask] = rng.choice(SPECIAL, size=int(mask.sum()))
    numerical = (model._decision_type & 1) == 0
    feats, thresholds = model._split_feature[numerical], model._threshold[numerical]
    if len(thresholds):
        for _ in range(3 * n):
            k = rng.integers(len(thresholds))
            t = thresholds[k]
            X[rng.integers(n), feats[k]] = rng.choice([t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf)])
    return X


def _lgb(booster: lgb.Booster, X: np.ndarray, raw_score: bool = False) -> np.ndarray:
    # One OpenMP thread: on a busy 2-core box multi-threaded predict spends milliseconds in barriers.
    return booster.predict(X, raw_score=raw_score, num_threads=1)


def _assert_same(model: CompiledModel, booster: lgb.Booster, X: np.ndarray) -> None:
    with np.errstate(over="ignore"):  # values beyond float32 range become +-inf, as intended
        X32 = X.astype(np.float32)
    for data in (X, X32):
        np.testing.assert_allclose(model.predict(data), _lgb(booster, data), rtol=0, atol=ATOL)
        np.testing.assert_allclose(model.predict_raw(data), _lgb(booster, data, raw_score=True),
                                   rtol=0, atol=ATOL)


@st.composite
def model_specs(draw: st.DrawFn) -> dict:
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "n": draw(st.integers(200, 2000)),
        "n_num": draw(st.integers(1, 6)),
        "n_cat": draw(st.integers(0, 3)),
        "card": draw(st.integers(2, 40)),
        "nan_frac": draw(st.sampled_from([0.0, 0.05, 0.3])),
        "zero_frac": draw(st.sampled_from([0.0, 0.1, 0.4])),
        "objective": draw(st.sampled_from(["regression", "binary"])),
        "boosting": draw(st.sampled_from(["gbdt", "gbdt", "rf", "dart"])),
        "num_trees": draw(st.integers(5, 30)),
        "num_leaves": draw(st.integers(2, 31)),
        "zero_as_missing": draw(st.booleans()),
        "use_missing": draw(st.booleans()),
        "max_cat_to_onehot": draw(st.sampled_from([1, 4, 64])),
        "max_bin": draw(st.sampled_from([7, 63, 255])),
        "sigmoid": draw(st.sampled_from([1.0, 0.37, 2.5, 0.123456789])),
    }


def _train(spec: dict) -> tuple[lgb.Booster, np.random.Generator]:
    rng = np.random.default_rng(spec["seed"])
    X = _make_data(rng, spec["n"], spec["n_num"], spec["n_cat"], spec["card"],
                   spec["nan_frac"], spec["zero_frac"])
    y = _make_target(rng, X, spec["n_num"], spec["card"], spec["objective"] == "binary")
    params = {
        "objective": spec["objective"],
        "boosting": spec["boosting"],
        "num_leaves": spec["num_leaves"],
        "learning_rate": 0.3,
        "min_data_in_leaf": 5,
        "min_data_per_group": 5,
        "cat_smooth": 1.0,
        "max_cat_to_onehot": spec["max_cat_to_onehot"],
        "max_bin": spec["max_bin"],
        "zero_as_missing": spec["zero_as_missing"],
        "use_missing": spec["use_missing"],
        "seed": spec["seed"] % 10_000,
        "num_threads": 1,
        "verbose": -1,
    }
    if spec["objective"] == "binary":
        params["sigmoid"] = spec["sigmoid"]
    if spec["boosting"] == "rf":
        params.update(bagging_freq=1, bagging_fraction=0.7)
    cats = list(range(spec["n_num"], spec["n_num"] + spec["n_cat"]))
    booster = lgb.train(params, lgb.Dataset(X, y, categorical_feature=cats), spec["num_trees"])
    return booster, rng


@settings(HYPOTHESIS, max_examples=examples(150))
@given(model_specs())
def test_matches_booster_on_random_models(spec: dict) -> None:
    booster, rng = _train(spec)
    model = CompiledModel.from_booster(booster)
    assert model.num_features == spec["n_num"] + spec["n_cat"]
    X = _prediction_input(rng, model, spec["n_num"], spec["n_cat"], spec["card"], n=300)
    _assert_same(model, booster, X)


@pytest.fixture(scope="module")
def mixed_model() -> tuple[CompiledModel, lgb.Booster]:
    spec = {"seed": 7, "n": 2000, "n_num": 4, "n_cat": 2, "card": 12, "nan_frac": 0.1, "zero_frac": 0.2,
            "objective": "binary", "boosting": "gbdt", "num_trees": 30, "num_leaves": 31,
            "zero_as_missing": False, "use_missing": True, "max_cat_to_onehot": 4, "max_bin": 63,
            "sigmoid": 1.0}
    booster, _ = _train(spec)
    return CompiledModel.from_booster(booster), booster


@settings(HYPOTHESIS, max_examples=examples(300))
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.just(6)),
              elements=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                 st.floats(-3, 15), st.integers(-3, 20).map(float),
                                 st.sampled_from(list(SPECIAL)))))
def test_matches_booster_on_arbitrary_inputs(mixed_model: tuple[CompiledModel, lgb.Booster],
                                             X: np.ndarray) -> None:
    model, booster = mixed_model
    _assert_same(model, booster, X)


@pytest.mark.parametrize("params", [
    {"zero_as_missing": True},
    {"use_missing": False},
    {"zero_as_missing": False, "use_missing": True},
])
def test_missing_types_are_exercised(params: dict) -> None:
    """The random models above are only meaningful if every decision kind actually occurs."""
    rng = np.random.default_rng(3)
    X = _make_data(rng, 2000, 4, 2, 10, nan_frac=0.2, zero_frac=0.3)
    y = _make_target(rng, X, 4, 10, binary=False)
    booster = lgb.train({"objective": "regression", "num_leaves": 31, "min_data_in_leaf": 5,
                         "min_data_per_group": 5, "cat_smooth": 1.0, "verbose": -1, "num_threads": 1,
                         **params}, lgb.Dataset(X, y, categorical_feature=[4, 5]), 20)
    model = CompiledModel.from_booster(booster)
    dt = model._decision_type
    numerical_missing = set(((dt[(dt & 1) == 0] >> 2) & 3).tolist())
    assert (dt & 1).any(), "no categorical split"
    if params.get("zero_as_missing"):
        assert 1 in numerical_missing
    elif params.get("use_missing") is False:
        assert numerical_missing == {0}
    else:
        assert 2 in numerical_missing
    _assert_same(model, booster, _prediction_input(rng, model, 4, 2, 10, n=500))


_HANDMADE_TREES = [
    # numerical, missing None, threshold below kZeroThreshold: tiny inputs are rounded to 0 first
    dict(num_leaves=2, num_cat=0, split_feature="0", threshold="1e-37", decision_type="0",
         left_child="-1", right_child="-2", leaf_value="1 2"),
    # missing Zero: 0 / tiny / NaN take the default direction (right, then left) against the comparison
    dict(num_leaves=3, num_cat=0, split_feature="1 1", threshold="0.5 -0.25", decision_type="4 6",
         left_child="-1 -2", right_child="1 -3", leaf_value="4 8 16"),
    # missing NaN, default left then default right
    dict(num_leaves=3, num_cat=0, split_feature="2 2", threshold="1.5 -1", decision_type="10 8",
         left_child="1 -2", right_child="-1 -3", leaf_value="32 64 128"),
    # categorical {0, 5, 33} (missing None) then categorical {2} (missing NaN) under it
    dict(num_leaves=3, num_cat=2, split_feature="3 3", threshold="0 1", decision_type="1 9",
         left_child="1 -2", right_child="-1 -3", leaf_value="256 512 1024",
         cat_boundaries="0 2 3", cat_threshold="33 2 4"),
    # single leaf
    dict(num_leaves=1, num_cat=0, leaf_value="0.125"),
]


def _handmade_model_text() -> str:
    lines = ["tree", "version=v4", "num_class=1", "num_tree_per_iteration=1", "label_index=0",
             "max_feature_idx=3", "objective=regression", "feature_names=a b c d",
             "feature_infos=none none none none", ""]
    for i, tree in enumerate(_HANDMADE_TREES):
        lines.append(f"Tree={i}")
        lines += [f"{k}={v}" for k, v in tree.items()]
        lines += ["is_linear=0", "shrinkage=1", "", ""]
    lines += ["end of trees", ""]
    return "\n".join(lines)


def test_handmade_edge_semantics(tmp_path: Path) -> None:
    """Hand-built trees pin down every decision rule against LightGBM itself."""
    path = tmp_path / "handmade.txt"
    path.write_text(_handmade_model_text())
    booster = lgb.Booster(model_file=str(path))
    model = CompiledModel.from_file(path)
    values = np.concatenate([SPECIAL, [1e-37, 5e-36, 0.25, -0.5, 1.5, -1.0, 0.0, 1.0, 2.0, 3.0, 5.0,
                                       5.9, 33.0, 33.5, 34.0, 64.0, 2.0**32 + 5, 2.0**32 + 33,
                                       np.nextafter(0.5, 1), np.nextafter(-0.25, -1)]])
    X = np.array(np.meshgrid(values, values, values, values)).reshape(4, -1).T.copy()
    expected = _lgb(booster, X)
    # leaf values are powers of two, so any wrong turn shows up as an exact mismatch
    np.testing.assert_array_equal(model.predict(X), expected)
    np.testing.assert_array_equal(model.predict(X.astype(np.float32)), _lgb(booster, X.astype(np.float32)))


def test_from_file_scores_identically(mixed_model: tuple[CompiledModel, lgb.Booster], tmp_path: Path) -> None:
    model, booster = mixed_model
    path = tmp_path / "model.txt"
    booster.save_model(str(path))
    loaded = CompiledModel.from_file(path)
    assert loaded.feature_names == model.feature_names == booster.feature_name()
    rng = np.random.default_rng(11)
    X = _prediction_input(rng, loaded, 4, 2, 12, n=1000)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    _assert_same(loaded, booster, X)
    _assert_same(loaded, lgb.Booster(model_file=str(path)), X)


@pytest.mark.parametrize("params", [
    {"objective": "cross_entropy"},
    {"objective": "cross_entropy_lambda"},
    {"objective": "poisson"},
    {"objective": "tweedie"},
    {"objective": "huber"},
    {"objective": "regression", "reg_sqrt": True},
    {"objective": "binary", "sigmoid": 0.123456789},  # the model text keeps only 6 digits of it
    {"objective": "binary", "boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.6},
])
def test_other_objective_transforms(params: dict) -> None:
    rng = np.random.default_rng(5)
    X = _make_data(rng, 500, 3, 1, 5, nan_frac=0.1, zero_frac=0.1)
    y = (rng.random(500) < 0.4).astype(float) * (3.0 if params.get("reg_sqrt") else 1.0)
    booster = lgb.train({"verbose": -1, "num_threads": 1, "min_data_in_leaf": 5, **params},
                        lgb.Dataset(X, y, categorical_feature=[3]), 8)
    model = CompiledModel.from_booster(booster)
    _assert_same(model, booster, _prediction_input(rng, model, 3, 1, 5, 200))


def test_best_iteration_is_respected() -> None:
    rng = np.random.default_rng(9)
    X = _make_data(rng, 1000, 3, 0, 2, nan_frac=0.0, zero_frac=0.0)
    y = _make_target(rng, X, 3, 2, binary=False)
    train, valid = lgb.Dataset(X[:700], y[:700]), lgb.Dataset(X[700:], y[700:])
    booster = lgb.train({"objective": "regression", "verbose": -1, "num_threads": 1, "learning_rate": 0.8,
                         "num_leaves": 31, "min_data_in_leaf": 2}, train, 200, valid_sets=[valid],
                        callbacks=[lgb.early_stopping(3, verbose=False)], keep_training_booster=True)
    assert 0 < booster.best_iteration < booster.current_iteration()
    model = CompiledModel.from_booster(booster)
    assert model.num_trees == booster.best_iteration
    _assert_same(model, booster, X)


def test_multiclass_is_refused() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = rng.integers(0, 3, 300)
    booster = lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1},
                        lgb.Dataset(X, y), 3)
    with pytest.raises(ValueError, match="multiclass"):
        CompiledModel.from_booster(booster)


def test_warmup_covers_every_input_layout(mixed_model: tuple[CompiledModel, lgb.Booster]) -> None:
    """After warmup() no input a request can send triggers another JIT compilation."""
    model, booster = mixed_model
    model.warmup()
    compiled = len(_score_batch.signatures)
    assert compiled >= 2
    base = np.linspace(-2, 8, 4 * model.num_features).reshape(4, -1)
    readonly = np.frombuffer(base.astype(np.float32).tobytes(), dtype=np.float32).reshape(base.shape)
    for X in (base, base.astype(np.float32), np.asfortranarray(base), base[::2], readonly,
              base.astype(np.int32), base[:1], base[:0]):
        np.testing.assert_allclose(model.predict(X), _lgb(booster, X), rtol=0, atol=ATOL)
        model.predict_raw(X)
    assert len(_score_batch.signatures) == compiled


def test_input_validation(mixed_model: tuple[CompiledModel, lgb.Booster]) -> None:
    model, _ = mixed_model
    with pytest.raises(ValueError, match="2D"):
        model.predict(np.zeros(model.num_features))
    with pytest.raises(ValueError, match="features"):
        model.predict(np.zeros((2, model.num_features + 1)))
    assert model.predict(np.zeros((0, model.num_features))).shape == (0,)
    assert not math.isnan(float(model.predict(np.full((1, model.num_features), np.nan))[0]))
