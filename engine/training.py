"""Training a LightGBM propensity model on simulated responses from the synthetic world.

One model across all actions (the action, its type and value are features): actions share what they
have in common (a customer's general responsiveness, channel effects) and a new action starts from
its type's behaviour. Holdout is by time: the last 20% of simulated decisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import lightgbm as lgb
import numpy as np

from engine.features import CHANNELS
from engine.model_input import CATEGORICAL_FEATURES, FEATURES, ActionTable, customer_blocks
from engine.world import ActionLike, World

PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
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


@dataclass
class TrainingSet:
    x: np.ndarray
    y: np.ndarray
    t: np.ndarray  # simulated decision time, seconds
    p_true: np.ndarray  # hidden ground truth (for evaluation only, never a feature)


def simulate_responses(world: World, actions: Sequence[ActionLike], per_customer: int = 6,
                       days: float = 90.0, seed: int = 3) -> TrainingSet:
    """Show each customer random actions on random channels; responses drawn from the ground truth."""
    rng = np.random.default_rng(seed)
    n = world.size * per_customer
    rows = np.repeat(np.arange(world.size), per_customer)
    action_idx = rng.integers(0, len(actions), n)
    channel_idx = rng.integers(0, len(CHANNELS), n)
    p_true = world.true_propensity(rows, actions, action_idx, channel_idx)
    y = (rng.random(n) < p_true).astype(np.float64)
    table = ActionTable.build(actions, [a.id for a in actions])
    customers = customer_blocks(world.numeric.astype(np.float64), world.categorical, world.products)
    x = np.empty((n, len(FEATURES)), dtype=np.float64)
    x[:, : customers.shape[1]] = customers[rows]
    x[:, customers.shape[1]: -1] = table.rows[action_idx]
    x[:, -1] = channel_idx
    t = rng.uniform(0, days * 86400, n)
    return TrainingSet(x, y, t, p_true)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def train(world: World, actions: Sequence[ActionLike], rounds: int = 200,
          per_customer: int = 6) -> tuple[lgb.Booster, dict, dict]:
    """Train on the earliest 80% of simulated decisions; metrics on the latest 20%."""
    started = time.perf_counter()
    data = simulate_responses(world, actions, per_customer)
    cut = np.quantile(data.t, 0.8)
    train_mask, hold = data.t < cut, data.t >= cut
    cat_idx = [FEATURES.index(c) for c in CATEGORICAL_FEATURES]
    dtrain = lgb.Dataset(data.x[train_mask], data.y[train_mask], feature_name=list(FEATURES),
                         categorical_feature=cat_idx, free_raw_data=True)
    booster = lgb.train(PARAMS, dtrain, num_boost_round=rounds)
    p = booster.predict(data.x[hold])
    y = data.y[hold]
    eps = 1e-12
    metrics = {
        "holdout_auc": round(auc(y, p), 4),
        "holdout_logloss": round(float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))), 4),
        "oracle_auc": round(auc(y, data.p_true[hold]), 4),
        "rank_correlation_with_truth": round(spearman(p, data.p_true[hold]), 4),
        "holdout_rows": int(hold.sum()),
        "holdout_acceptance_rate": round(float(y.mean()), 4),
    }
    summary = {
        "source": "synthetic world", "customers": world.size, "world_seed": world.seed,
        "rows": int(len(data.y)), "train_rows": int(train_mask.sum()), "rounds": rounds,
        "params": PARAMS, "seconds": round(time.perf_counter() - started, 1),
    }
    return booster, metrics, summary
