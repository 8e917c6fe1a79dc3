"""Responses drawn from the synthetic world's hidden truth: what the demo model is trained on.

Each customer is shown random actions on random channels and answers with the probability the world
(never the model) knows; ``engine.models.training.fit`` then trains on these rows as on recorded ones.
In the realistic world (``generate``'s default) that probability includes the customers' unobserved
traits, so the model's holdout AUC stays below the oracle's (``oracle_auc``, from ``p_true``).

This is the demo model's bootstrap (fully observed, uniformly random, no fatigue or late responses).
``nba simulate`` does not use it: its model learns only from traffic recorded through the funnel by
another population (``engine.sim.simulate``).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightgbm as lgb
import numpy as np

from engine.models.model_input import model_input
from engine.models.training import TrainingSet, fit
from engine.sim.telco import CHANNELS, SCHEMA
from engine.sim.world import ActionLike, World


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
    layout = model_input(SCHEMA)
    table = layout.action_table(actions, [a.id for a in actions])
    customers = layout.customer_blocks(world.numeric.astype(np.float64), world.categorical, world.products)
    x = np.empty((n, len(layout.features)), dtype=np.float64)
    x[:, : customers.shape[1]] = customers[rows]
    x[:, customers.shape[1]: -1] = table.rows[action_idx]
    x[:, -1] = channel_idx
    t = rng.uniform(0, days * 86400, n)
    return TrainingSet(x, y, t, [a.id for a in actions], p_true,
                       summary={"source": "synthetic world", "customers": world.size, "world_seed": world.seed,
                                "per_customer": per_customer}, schema=SCHEMA)


def train(world: World, actions: Sequence[ActionLike], rounds: int = 200,
          per_customer: int = 6) -> tuple[lgb.Booster, dict, dict]:
    """Train on simulated responses from the synthetic world."""
    return fit(simulate_responses(world, actions, per_customer), rounds)
