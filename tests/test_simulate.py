"""`nba simulate`: its JSON, its private Redis (live streams untouched), honest training; `nba report`'s lift CI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from engine.analytics.report import lift_interval
from engine.cli import main
from engine.models.model_input import model_input
from engine.rules.loader import load_rules
from engine.sim.simulate import POLICIES, Settings, mean_ci, simulate
from engine.sim.telco import SCHEMA
from engine.sim.world import generate, population_seeds

from .conftest import RULES_DIR

ROWS = model_input(SCHEMA)
CUSTOMER_FEATURES, FEATURES, customer_blocks = ROWS.customer_features, ROWS.features, ROWS.customer_blocks

SMALL = ["--customers", "60", "--rounds", "3", "--seeds", "2", "--history-customers", "300", "--history-days", "3",
         "--trees", "10"]


def _snapshot(client: redis.Redis) -> dict:
    """Every key of the database with its type and content (streams: every entry)."""
    out = {}
    for key in sorted(client.scan_iter(count=1000)):
        kind = client.type(key)
        out[key] = (kind, client.xrange(key) if kind == b"stream" else client.dump(key))
    return out


def test_simulate_json_and_png_and_the_live_redis_is_untouched(redis_url: str, redis_admin_url: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    live = redis.Redis.from_url(redis_admin_url)  # every key, DUMP and DBSIZE: the admin user
    live.xadd("nba:stream:decisions", {"decision_id": "d1", "customer_id": "C0000001", "actions": "x"})
    live.xadd("nba:stream:responses", {"decision_id": "d1", "action_id": "x", "outcome": "accepted"})
    live.hset("nba:{c:C0000001}:profile", mapping={"v": b"\x00\x01"})
    live.set("nba:budget:retention_discount_20:20300107", 3)
    live.hset("nba:{c:C0000001}:contacts", "i|x|g|upsell|web|23741", "1:0:0")
    before = _snapshot(live)
    png = tmp_path / "curve.png"
    assert main(["simulate", "--redis-url", redis_url, "--rules-dir", str(RULES_DIR), *SMALL, "--json",
                 "--png", str(png)]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(POLICIES) <= set(table) and table["world"] == "realistic" and table["seeds"] == [11, 12]
    for name in POLICIES:
        row = table[name]
        lo, hi = row["ci95"]
        assert lo <= row["value_per_1000"] <= hi and len(row["per_seed"]) == 2
        assert row["x_generic"] is not None and row["pct_of_constrained_oracle"] is not None
    assert table["generic"]["x_generic"] == 1.0 and table["constrained_oracle"]["pct_of_constrained_oracle"] == 100.0
    assert table["model"]["holdout_auc"] is not None and table["model"]["oracle_auc"] is not None
    assert len(table["curves"]["nba"]) == 3 and table["events"]["new_actions_round"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _snapshot(live) == before  # simulate ran on its own redis-server: not one key or stream entry here
    assert live.dbsize() == len(before)


def test_training_sees_only_recorded_traffic_never_the_evaluated_populations_truth() -> None:
    histories = {population_seeds(s)[0] for s in range(500)}
    assert not histories & {population_seeds(s)[1] for s in range(500)}  # seeds disjoint, whatever the world seed

    ruleset, errors = load_rules(RULES_DIR)
    assert ruleset is not None, errors
    settings = Settings(customers=50, rounds=3, seeds=(4,), history_customers=300, history_days=3, trees=10,
                        policies=("nba", "generic", "constrained_oracle"))
    evaluated = generate(settings.customers, population_seeds(4)[1], laws=4)
    blocks = {tuple(np.round(b, 3)) for b in customer_blocks(evaluated.numeric.astype(np.float64),
                                                             evaluated.categorical, evaluated.products)}
    seen: list[str] = []

    def check(stage: str, data, store) -> None:
        seen.append(stage)
        assert data.x.shape[1] == len(FEATURES)  # the model's features only: no truth, no unobserved trait
        client = store.client
        customer = {f[b"decision_id"].decode(): f[b"customer_id"].decode()
                    for _, f in client.xrange("nba:stream:decisions")}
        accepted = {(f[b"decision_id"].decode(), f[b"action_id"].decode())
                    for _, f in client.xrange("nba:stream:responses") if f[b"outcome"] == b"accepted"}
        ids = data.decision_ids
        recorded = range(len(ids)) if stage == "history" else range(data.summary["history_rows"], len(ids))
        actions = data.action_ids()
        for k in recorded:  # rows of this stage's streams: labels are what was recorded, nothing else
            assert ids[k] in customer
            assert data.y[k] == float((ids[k], actions[k]) in accepted)
        if stage == "history":
            assert all(customer[d].startswith("H") for d in ids)  # the other population only
            rows = {tuple(np.round(x[:len(CUSTOMER_FEATURES)], 3)) for x in data.x}
            assert not rows & blocks  # no evaluated customer's features
        else:
            assert {customer[ids[k]][0] for k in recorded} == {"C"}  # the run's own recorded decisions

    sim = simulate(ruleset, settings, on_training=check)
    assert seen == ["history", "retrain", "retrain"]
    result = sim.seeds[0]
    assert (result.history_seed, result.evaluated_seed) == population_seeds(4)
    assert result.model["trained_on"]["population_seed"] != result.evaluated_seed
    for name in settings.policies:  # the same customers and interactions for every policy
        assert result.runs[name].round_decisions == result.runs["generic"].round_decisions


def test_mean_ci_is_a_student_t_interval() -> None:
    m, (lo, hi) = mean_ci([10.0, 12.0, 11.0, 9.0, 13.0])
    assert m == 11.0 and hi - m == pytest.approx(2.776 * np.std([10, 12, 11, 9, 13], ddof=1) / np.sqrt(5), rel=1e-3)
    assert mean_ci([5.0]) == (5.0, [5.0, 5.0])


def test_lift_interval_covers_the_true_lift() -> None:
    rng = np.random.default_rng(1)
    treated = rng.binomial(1, 0.3, 20_000) * 100.0
    control = rng.binomial(1, 0.15, 5_000) * 100.0
    lift = lift_interval(treated, control)
    lo, hi = lift["ci95"]
    assert lo < 1.0 < hi and hi - lo < 0.3


def test_the_off_policy_check_scores_every_estimator_against_the_truth_of_the_logged_decisions() -> None:
    """``nba simulate --off-policy`` on a small world: every candidate has a truth and every estimator an error
    and a coverage; the logging policy's truth lies below the greedy champion's by the exploration's cost;
    the estimators never see the truth (the truths differ from every estimate)."""
    from engine.sim.offpolicy_check import CheckSettings, check, format_check

    ruleset, errors = load_rules(RULES_DIR)
    assert ruleset is not None, errors
    result = check(ruleset, CheckSettings(seeds=(4,), customers=600, history_customers=400, history_days=2, trees=10,
                                          epsilon=0.3))
    table = result["table"]
    assert list(table) == ["greedy champion", "rules only", "retention x3", "cross-sell x0.2", "weaker model"]
    seed = result["seeds"][0]
    assert seed["decisions"] > 150
    for name, row in table.items():
        assert row["truth_mean"] > 0
        for est in ("ips", "snips", "dr"):
            assert row[est]["seeds"] == 1 and row[est]["covered"] in (0, 1)
            assert row[est]["relative_error"] is not None and row[est]["relative_error"] < 0.6, (name, est, row)
    assert result["exploration_cost"]["per_1000"] > 0
    assert seed["logging_policy_truth"] < seed["candidates"]["greedy champion"]["truth"]
    assert "exploration (epsilon 0.3 per slot) costs" in format_check(result)
