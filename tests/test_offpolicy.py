"""Off-policy estimators against a bandit whose true values are known: each estimate's interval covers the
candidate's true value about as often as it claims, and the support check refuses what the logs cannot
speak for."""

from __future__ import annotations

import numpy as np
import pytest

from engine.analytics.offpolicy import EvaluationError, Logged, estimate

K = 4  # actions


def _world(rng: np.random.Generator, customers: int, per_customer: int, epsilon: float):
    """Decisions of customers with a taste each (correlated decisions); the logging policy is
    epsilon-uniform around a greedy choice; rewards are Bernoulli with known means."""
    taste = rng.integers(0, K, customers)
    who = np.repeat(np.arange(customers), per_customer)
    means = np.full((len(who), K), 0.05)
    means[np.arange(len(who)), taste[who]] = 0.30
    greedy = (taste[who] + 1) % K  # the logger's model is wrong for every customer
    probs = np.full((len(who), K), epsilon / K)
    probs[np.arange(len(who)), greedy] += 1 - epsilon
    logged = np.array([rng.choice(K, p=p) for p in probs])
    rewards = (rng.random(len(who)) < means[np.arange(len(who)), logged]).astype(float)
    return who, means, probs, logged, rewards


def _candidate(name: str, who: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The candidate's probabilities over the actions per decision."""
    rows = np.arange(len(who))
    pi = np.zeros_like(means)
    if name == "oracle":
        pi[rows, means.argmax(axis=1)] = 1
    elif name == "uniform":
        pi[:] = 1 / K
    else:  # "first": always action 0
        pi[:, 0] = 1
    return pi


@pytest.mark.parametrize("candidate", ["oracle", "uniform", "first"])
def test_the_intervals_cover_the_true_value_about_95_times_in_100(candidate: str) -> None:
    covered = {"ips": 0, "snips": 0, "dr": 0}
    widths: dict[str, list[float]] = {name: [] for name in covered}
    errors: dict[str, list[float]] = {name: [] for name in covered}
    runs = 60
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        who, means, probs, logged, rewards = _world(rng, 300, 5, epsilon=0.3)
        pi = _candidate(candidate, who, means)
        rows = np.arange(len(who))
        truth = 1000 * float((pi * means).sum(axis=1).mean())
        q = np.full_like(means, rewards.mean())  # a poor reward model: DR must still be right
        result = estimate(Logged(customers=who, rewards=rewards, propensities=probs[rows, logged],
                                 target=pi[rows, logged], q_logged=q[rows, logged], q_target=(pi * q).sum(axis=1)))
        for name in covered:
            low, high = result[name]["ci95"]
            covered[name] += low <= truth <= high
            widths[name].append(high - low)
            errors[name].append(result[name]["value"] - truth)
    for name, hits in covered.items():
        assert 0.85 * runs <= hits <= runs, f"{name}: the interval covered the truth {hits} of {runs} times"
        spread = 2 * 1.96 * float(np.std(errors[name]))  # what a right 95% interval's width is
        assert 0.7 * spread <= float(np.mean(widths[name])) <= 1.5 * spread, (name, np.mean(widths[name]), spread)


def test_a_candidate_equal_to_the_logger_is_the_logged_mean_with_full_effective_size() -> None:
    rng = np.random.default_rng(7)
    who, means, probs, logged, rewards = _world(rng, 200, 3, epsilon=0.2)
    rows = np.arange(len(who))
    result = estimate(Logged(customers=who, rewards=rewards, propensities=probs[rows, logged],
                             target=probs[rows, logged]))
    assert result["ips"]["value"] == result["snips"]["value"] == pytest.approx(1000 * rewards.mean(), abs=0.01)
    assert result["effective_sample_size"] == len(who)
    assert result["customers"] == 200 and result["decisions"] == 600


def test_the_estimate_is_refused_where_the_logs_cannot_support_it() -> None:
    rng = np.random.default_rng(3)
    who, means, probs, logged, rewards = _world(rng, 100, 2, epsilon=0.0)  # no exploration at all
    rows = np.arange(len(who))
    pi = _candidate("first", who, means)
    unsupported = (pi * (probs == 0)).sum(axis=1)
    result = estimate(Logged(customers=who, rewards=rewards, propensities=probs[rows, logged],
                             target=pi[rows, logged], unsupported=unsupported))
    assert "ips" not in result and "cannot support" in result["refused"]
    assert result["unsupported_share"] > 0.5


def test_bad_columns_are_named() -> None:
    with pytest.raises(EvaluationError, match="target: 2 rows"):
        Logged(customers=np.arange(3), rewards=np.zeros(3), propensities=np.ones(3), target=np.ones(2))
    with pytest.raises(EvaluationError, match="propensities"):
        Logged(customers=np.arange(2), rewards=np.zeros(2), propensities=np.array([0.5, 0.0]), target=np.ones(2))
