"""`nba simulate` and `nba report` on a real Redis with the session's small model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.decision.report import build_report, lift_interval

from .conftest import RULES_DIR


def test_simulate_json_is_keyed_by_policy_and_report_shows_lift(redis_url: str, models_dir: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    args = ["--redis-url", redis_url, "--rules-dir", str(RULES_DIR), "--models-dir", str(models_dir)]
    assert main(["simulate", *args, "--customers", "80", "--rounds", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    table = json.loads(out)
    assert set(table) == {"nba", "rules_only", "generic", "random_eligible", "oracle"}
    for row in table.values():
        assert row["decisions"] > 0 and 0 <= row["acceptance_rate"] <= 1 and row["value_per_1000_decisions"] >= 0
    assert table["oracle"]["value_per_1000_decisions"] >= table["random_eligible"]["value_per_1000_decisions"]
    since = err.split("--since ")[1].split()[0]

    import redis

    report = build_report(redis.Redis.from_url(redis_url), since=since)
    assert report["policy"]["control"]["decisions"] > 0  # the control group decided part of the nba run
    assert report["policy"]["decision_policy"]["decisions"] == table["nba"]["decisions"]
    assert report["policy"]["decision_policy"]["value_per_1000_decisions"] == table["nba"]["value_per_1000_decisions"]
    assert set(report["by_type"]) <= {"upsell", "cross_sell", "bundle", "retention", "acquisition", "service"}
    assert main(["report", *args, "--since", since]) == 0
    text = capsys.readouterr().out
    assert "lift over control" in text and "by action type" in text


def test_lift_interval_covers_the_true_lift() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    treated = rng.binomial(1, 0.3, 20_000) * 100.0
    control = rng.binomial(1, 0.15, 5_000) * 100.0
    lift = lift_interval(treated, control)
    lo, hi = lift["ci95"]
    assert lo < 1.0 < hi and hi - lo < 0.3
