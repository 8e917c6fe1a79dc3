"""`nba report`'s lift: a CI clustered by customer (the unit assigned to control), and its bootstrap cross-check.
Pure numpy; build_report runs on an in-memory stand-in for the two streams (no Redis)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from engine.analytics.report import (
    bootstrap_lifts,
    build_report,
    cluster_totals,
    format_report,
    lift_from_totals,
    lift_interval,
)
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM


def log_width(lift: dict) -> float:
    """Width of the CI on the log-ratio scale: 2 * 1.96 * se (the CI is symmetric there)."""
    lo, hi = lift["ci95"]
    return math.log1p(hi) - math.log1p(lo)


def copies(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each customer decides m times with the same value: per-decision values and customer codes."""
    return np.repeat(x, m), np.repeat(np.arange(len(x)), m)


def test_identical_copies_give_the_one_decision_per_customer_ci_and_are_sqrt_m_wider_than_naive() -> None:
    rng = np.random.default_rng(5)
    xt = rng.binomial(1, 0.3, 800) * rng.choice([50.0, 100.0, 200.0], 800)
    xc = rng.binomial(1, 0.2, 600) * rng.choice([50.0, 100.0, 200.0], 600)
    m = 6
    (tv, tc), (cv, cc) = copies(xt, m), copies(xc, m)
    one_each = lift_interval(xt, xc)  # one decision per customer: no clustering needed
    clustered = lift_interval(tv, cv, tc, cc)
    naive = lift_interval(tv, cv)  # every decision its own customer: what the report did before
    assert clustered["lift"] == one_each["lift"] == naive["lift"]
    assert clustered["customers"] == {"decision_policy": 800, "control": 600} and clustered["unit"] == "customer"
    assert naive["customers"] == {"decision_policy": 800 * m, "control": 600 * m}
    assert log_width(clustered) == pytest.approx(log_width(one_each), rel=0.05)
    assert log_width(clustered) / log_width(naive) == pytest.approx(math.sqrt(m), rel=0.05)
    d1, d2 = clustered["value_per_1000_difference_ci95"], one_each["value_per_1000_difference_ci95"]
    dn = naive["value_per_1000_difference_ci95"]
    assert d1[1] - d1[0] == pytest.approx(d2[1] - d2[0], rel=0.05)
    assert (d1[1] - d1[0]) / (dn[1] - dn[0]) == pytest.approx(math.sqrt(m), rel=0.05)


def test_cluster_totals_and_ratio_estimator() -> None:
    values = np.array([10.0, 0.0, 5.0, 0.0, 1.0])
    v, n = cluster_totals(values, np.array(["b", "a", "b", "c", "a"]))
    assert v.tolist() == [1.0, 15.0, 0.0] and n.tolist() == [2.0, 2.0, 1.0]  # a, b, c
    v, n = cluster_totals(values)
    assert v.tolist() == values.tolist() and n.tolist() == [1.0] * 5
    # the lift is value per decision, not the mean over customers of their value per decision
    lift = lift_from_totals((np.array([10.0, 0.0]), np.array([1.0, 9.0])), (np.array([1.0, 1.0]), np.array([1.0, 1.0])))
    assert lift["lift"] == pytest.approx(10 / 10 / 1.0 - 1)


def test_variance_is_of_the_linearised_ratio_not_of_the_customer_totals() -> None:
    # every decision of the policy earns 30, of control 20; customers differ only in how often they decide:
    # the value per decision is known exactly, however the totals vary
    rng = np.random.default_rng(1)
    nt, nc = rng.integers(1, 20, 300).astype(float), rng.integers(1, 20, 200).astype(float)
    lift = lift_from_totals((30 * nt, nt), (20 * nc, nc))
    assert lift["lift"] == 0.5 and lift["ci95"] == [0.5, 0.5]
    assert lift["value_per_1000_difference_ci95"] == [10_000.0, 10_000.0]
    # by hand: treated customers (v, n) = (10, 1), (0, 3), (20, 2): r = 5, residuals 5, -15, 10
    v, n = np.array([10.0, 0.0, 20.0]), np.array([1.0, 3.0, 2.0])
    var_t = np.var([5.0, -15.0, 10.0], ddof=1) / (2.0**2 * 3)
    lift = lift_from_totals((v, n), (np.array([4.0, 6.0]), np.array([2.0, 2.0])))  # control: r = 2.5, residuals -1, 1
    var_c = np.var([-1.0, 1.0], ddof=1) / (2.0**2 * 2)
    se = math.sqrt(var_t / 25 + var_c / 6.25)
    assert lift["ci95"] == pytest.approx([2 * math.exp(-1.959964 * se) - 1, 2 * math.exp(1.959964 * se) - 1], abs=1e-4)
    half = 1000 * 1.959964 * math.sqrt(var_t + var_c)
    assert lift["value_per_1000_difference_ci95"] == pytest.approx([2500 - half, 2500 + half], abs=0.1)


def small_world(rng: np.random.Generator, kt: int = 150, kc: int = 100, mut: float = 0.3, muc: float = 0.2,
                concentration: float = 2.0) -> list[np.ndarray]:
    """Customers with their own acceptance rate (Beta, mean mu of the arm: a strong customer effect) and
    1 + Poisson(4) decisions each; true lift = mut / muc - 1."""
    out = []
    for k, mu in ((kt, mut), (kc, muc)):
        p = rng.beta(mu * concentration, (1 - mu) * concentration, k)
        customer = np.repeat(np.arange(k), 1 + rng.poisson(4, k))
        out += [(rng.random(len(customer)) < p[customer]) * 100.0, customer]
    return out


def test_clustered_ci_covers_the_true_lift_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(3)
    truth, repetitions = 0.3 / 0.2 - 1, 400
    covered = covered_naive = 0
    start = time.perf_counter()
    for _ in range(repetitions):
        tv, tc, cv, cc = small_world(rng)
        lo, hi = lift_interval(tv, cv, tc, cc)["ci95"]
        covered += lo <= truth <= hi
        lo, hi = lift_interval(tv, cv)["ci95"]
        covered_naive += lo <= truth <= hi
    assert 0.90 <= covered / repetitions <= 0.99
    assert covered_naive / repetitions < 0.88  # the independent-decisions CI is too narrow in this world
    assert time.perf_counter() - start < 2.0


def test_bootstrap_agrees_with_the_delta_ci_on_a_large_sample() -> None:
    rng = np.random.default_rng(8)
    tv, tc, cv, cc = small_world(rng, kt=6000, kc=3000)
    lift = lift_interval(tv, cv, tc, cc, bootstrap=2000, seed=4)
    assert lift["bootstrap_resamples"] == 2000
    (lo, hi), (blo, bhi) = lift["ci95"], lift["bootstrap_ci95"]
    width = hi - lo
    assert abs(blo - lo) < 0.15 * width and abs(bhi - hi) < 0.15 * width
    assert lift_interval(tv, cv, tc, cc, bootstrap=2000, seed=4)["bootstrap_ci95"] == [blo, bhi]  # seeded
    assert "bootstrap_ci95" not in lift_interval(tv, cv, tc, cc)


def test_bootstrap_resamples_customers_not_decisions() -> None:
    rng = np.random.default_rng(2)
    m = 8
    (tv, tc), (cv, cc) = copies(rng.binomial(1, 0.3, 1500) * 100.0, m), copies(rng.binomial(1, 0.2, 1000) * 100.0, m)
    clustered = lift_interval(tv, cv, tc, cc, bootstrap=1000, seed=1)
    blo, bhi = clustered["bootstrap_ci95"]
    boot_width = math.log1p(bhi) - math.log1p(blo)
    assert boot_width == pytest.approx(log_width(clustered), rel=0.15)
    assert boot_width > 2 * log_width(lift_interval(tv, cv))  # sqrt(8) ~ 2.8 times the naive width


def test_bootstrap_is_vectorised() -> None:
    rng = np.random.default_rng(0)
    treated = (rng.binomial(3, 0.3, 90_000) * 100.0, 1.0 + rng.poisson(2, 90_000))
    control = (rng.binomial(3, 0.2, 10_000) * 100.0, 1.0 + rng.poisson(2, 10_000))
    start = time.perf_counter()
    lifts = bootstrap_lifts(treated, control, 2000, seed=0)
    assert time.perf_counter() - start < 5.0
    assert lifts.shape == (2000,) and np.isfinite(lifts).all()


def test_fewer_than_two_customers_in_an_arm_gives_the_note() -> None:
    many = np.arange(40, dtype=float)
    lift = lift_interval(many, many, np.zeros(40, dtype=int), np.arange(40))  # 40 decisions, 1 customer
    assert lift["lift"] is None and lift["ci95"] is None
    assert lift["note"] == "needs at least 2 customers in each arm"
    assert lift["customers"] == {"decision_policy": 1, "control": 40} and lift["unit"] == "customer"
    assert lift_interval(many, many[:1])["note"] == "needs at least 2 customers in each arm"
    assert lift_interval(many, np.array([]))["customers"]["control"] == 0
    assert lift_interval(many, np.zeros(5), bootstrap=100)["note"] == "no accepted value in one arm"


class Streams:
    """Enough of redis.Redis for build_report: xrange over two in-memory streams."""

    def __init__(self, decisions: list[dict[str, str]], responses: list[dict[str, str]]) -> None:
        self.streams = {
            name: [(f"{i + 1}-0".encode(), {k.encode(): v.encode() for k, v in e.items()}) for i, e in enumerate(entries)]
            for name, entries in ((DECISIONS_STREAM, decisions), (RESPONSES_STREAM, responses))
        }

    def xrange(self, stream: str, min: str = "-", max: str = "+", count: int | None = None) -> list:
        low = 0 if min == "-" else int(min.split("-")[0])
        return [e for e in self.streams[stream] if int(e[0].split(b"-")[0]) >= low][:count]


def test_build_report_clusters_by_customer_and_arm() -> None:
    decisions, responses = [], []
    for i in range(60):
        customer = f"C{i % 20:03d}"  # 20 customers, 3 decisions each
        control = i % 20 < 8 or i == 59  # C000..C007 in control; C019 also once in control (share changed)
        decisions.append({"decision_id": f"d{i}", "customer_id": customer, "actions": "a,b", "values": "10,30",
                          "types": "upsell,bundle", "control": "1" if control else "0"})
        if i % 3 == 0 or (not control and i % 2 == 0):
            responses.append({"decision_id": f"d{i}", "action_id": "b" if i % 2 else "a", "outcome": "accepted"})
    decisions.append({"decision_id": "x1", "actions": "a", "values": "10", "control": "1"})  # no customer id
    decisions.append({"decision_id": "x2", "actions": "a", "values": "10", "control": "1"})
    report = build_report(Streams(decisions, responses), bootstrap=200, seed=3)  # type: ignore[arg-type]
    lift = report["lift"]
    assert lift["customers"] == {"decision_policy": 12, "control": 8 + 1 + 2}
    assert report["policy"]["decision_policy"]["decisions"] == 60 - 24 - 1
    assert report["policy"]["control"]["decisions"] == 24 + 1 + 2
    t, c = report["policy"]["decision_policy"], report["policy"]["control"]
    ratio = (t["value"] / t["decisions"]) / (c["value"] / c["decisions"])
    assert lift["lift"] == pytest.approx(ratio - 1, abs=1e-4)
    assert lift["bootstrap_resamples"] == 200 and len(lift["bootstrap_ci95"]) == 2
    text = format_report(report)
    assert "CIs clustered by customer" in text and "customer bootstrap (200 resamples)" in text
    policy_rows = [line.split() for line in text.splitlines() if line.startswith(("decision_policy", "control "))]
    assert [row[1] for row in policy_rows] == ["12", "11"]  # customers per arm
    assert "lift over control: n/a (needs at least 2 customers in each arm)" in format_report(
        build_report(Streams(decisions[:1], []))  # type: ignore[arg-type]
    )


def test_bootstrap_with_a_control_that_rarely_draws_value() -> None:
    treated = (np.full(50, 10.0), np.ones(50))
    control = (np.array([10.0] + [0.0] * 19), np.ones(20))  # one customer in 20 has value: often none resampled
    lift = lift_from_totals(treated, control, bootstrap=500, seed=0)
    assert lift["lift"] == pytest.approx(19.0) and lift["bootstrap_ci95"][1] is None  # unbounded above
    assert "95% CI" in format_report({"decisions": 70, "since": "-", "responses_accepted": 0, "by_action": {}, "by_type": {},
                                      "policy": {}, "models": {}, "exploration": {"share": 0.0}, "lift": lift})
