"""The realistic synthetic world: unobserved traits, holdings that change, fatigue, late responses, drift."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.models.training import auc
from engine.rules.loader import load_rules
from engine.sim.dynamics import IDEAL, REALISTIC, Draws, Population, drift_of, event_round, response
from engine.sim.telco import CATEGORICAL, CHANNELS, SETS
from engine.sim.world import generate, true_logit

from .conftest import RULES_DIR


@pytest.fixture(scope="module")
def actions():
    ruleset, errors = load_rules(RULES_DIR)
    assert ruleset is not None, errors
    return ruleset.actions


def test_unobserved_traits_move_acceptance_but_not_the_observed_customer(actions) -> None:
    real, ideal = generate(3000, 5), generate(3000, 5, "ideal")
    assert np.array_equal(real.numeric, ideal.numeric) and np.array_equal(real.products, ideal.products)
    assert real.latent.std() > 0.9 and not ideal.latent.any()
    seen_real, seen_ideal = real.profile(7), ideal.profile(7)  # what the service can see is the same
    assert np.array_equal(seen_real.numeric, seen_ideal.numeric) and seen_real.sets == seen_ideal.sets
    rng = np.random.default_rng(1)
    n = 60_000
    rows, a, c = rng.integers(0, 3000, n), rng.integers(0, len(actions), n), rng.integers(0, len(CHANNELS), n)
    p_real = 1 / (1 + np.exp(-true_logit(real, rows, actions, a, c)))
    seen = true_logit(ideal, rows, actions, a, c)  # the best any model of the observed features can do
    y = (rng.random(n) < p_real).astype(float)
    assert auc(y, p_real) - auc(y, seen) > 0.03  # the gap the unobserved traits leave


def test_two_populations_of_one_world_share_its_laws(actions) -> None:
    """The truth depends on the customer and the laws only, not on who else is in the population."""
    a, b = generate(50, 1, laws=9), generate(5000, 2, laws=9)
    same = replace(b, numeric=a.numeric, categorical=a.categorical, products=a.products, latent=a.latent)
    rows, idx, ch = np.arange(50), np.arange(50) % len(actions), np.zeros(50, dtype=int)
    assert np.array_equal(true_logit(a, rows, actions, idx, ch), true_logit(same, rows, actions, idx, ch))
    other = replace(same, laws=10)
    assert not np.allclose(true_logit(a, rows, actions, idx, ch), true_logit(other, rows, actions, idx, ch))


def test_acceptance_changes_holdings_and_is_earned_once(actions) -> None:
    world = generate(400, 3)
    pop = Population(world, actions, REALISTIC)
    products = SETS["products"]
    i = next(k for k in range(400) if not world.products[k, products.index("tv")] and world.products[k, 0])
    web = CHANNELS.index("web")
    before = pop.probability(i, ["cross_sell_tv", "cross_sell_streaming"], web, 0.0, False)
    assert before.min() > 0
    pop.accepted(i, "cross_sell_tv")
    assert pop.probability(i, ["cross_sell_tv"], web, 0.0, False)[0] == 0.0  # the value is earned once
    profile = pop.apply(i, "cross_sell_tv")
    assert profile is not None and "tv" in profile.sets["products"]  # the service sees the product held
    assert not world.products[i, products.index("tv")]  # each policy plays its own copy
    ideal = Population(generate(400, 3, "ideal"), actions, IDEAL)
    ideal.accepted(i, "cross_sell_tv")
    assert ideal.apply(i, "cross_sell_tv") is None and ideal.probability(i, ["cross_sell_tv"], web, 0.0, False)[0] > 0


def test_fatigue_and_drift(actions) -> None:
    world = generate(500, 2)
    pop = Population(world, actions, REALISTIC, drift_of(2, REALISTIC))
    drift = pop.drift
    assert drift is not None and drift.up != drift.down
    i = int(np.flatnonzero(world.categorical["segment"] == drift.segment)[0])
    ids = [a.id for a in actions if a.type in (drift.up, drift.down)]
    web = CHANNELS.index("web")
    fresh = pop.probability(i, ids, web, 10 * 86400.0, False)
    for day in range(3):
        pop.presented(i, ids[0], (8 + day) * 86400.0)
    tired = pop.probability(i, ids, web, 10 * 86400.0, False)
    assert (tired < fresh).all()
    assert np.allclose(pop.probability(i, ids, web, 30 * 86400.0, False), fresh)  # a week later: rested
    drifted = pop.probability(i, ids, web, 30 * 86400.0, True)
    kinds = np.array([a.type for a in actions if a.type in (drift.up, drift.down)])
    assert (drifted[kinds == drift.up] > fresh[kinds == drift.up]).all()
    assert (drifted[kinds == drift.down] < fresh[kinds == drift.down]).all()
    other = int(np.flatnonzero(world.categorical["segment"] != drift.segment)[0])
    assert np.allclose(pop.probability(other, ids, web, 30 * 86400.0, True),
                       pop.probability(other, ids, web, 30 * 86400.0, False))
    assert CATEGORICAL["segment"][drift.segment] in drift.describe()
    assert (event_round(8, 1 / 3), event_round(8, 0.5), event_round(30, 0.5), event_round(1, 0.5)) == (3, 4, 15, None)


def test_responses_arrive_late_or_never() -> None:
    rng = np.random.default_rng(4)
    accepted = [response(REALISTIC, True, u, v, 0.0) for u, v in rng.random((4000, 2))]
    at = np.array([r.at if r.at is not None else np.nan for r in accepted])
    assert 0.5 < np.mean(at < 3600) < 0.6 and 0.3 < np.mean(at >= 86400) < 0.4 and 0.07 < np.isnan(at).mean() < 0.13
    assert all(r.lands is not None and r.lands <= 6 * 86400 for r in accepted)  # the customer changes anyway
    others = [response(REALISTIC, False, u, v, 0.0) for u, v in rng.random((4000, 2))]
    assert 0.35 < np.mean([r.at is None for r in others]) < 0.45
    assert all(response(IDEAL, True, u, 0.5, 0.0).at == 600.0 for u in rng.random(100))
    draws = Draws.draw(1000, 4, 1, REALISTIC)
    assert 0.3 < draws.active.mean() < 0.5 and Draws.draw(1000, 4, 1, IDEAL).active.all()
