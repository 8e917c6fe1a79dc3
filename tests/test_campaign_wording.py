"""What ``nba campaign plan`` and ``nba campaign report`` say to a marketer: warnings about thin recorded
traffic (naming the fix), the plan's defaults equal to the service's, counts in named units, progress on
stderr, and a report read without help (significance, pacing and over/under plan in words, percent on the
charts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.analytics.campaign_report import (
    format_campaign_report,
    pacing_words,
    significance,
    versus_plan,
)
from engine.analytics.report import Tally
from engine.decision.request import DEFAULT_MAX_ACTIONS, DecideInput, validate
from engine.models.registry import ModelRegistry
from engine.sim.telco import SCHEMA
from engine.store.profiles import ProfileStore

from .clock import Clock, at
from .conftest import REPO, RULES_DIR
from .test_campaigns import INSIDE, START, blitz, decide, engine_for, flushed, rules_with, shown


def _plan_cli(redis_url: str, models_dir: Path, rules_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {"REDIS_URL": redis_url}
    return subprocess.run([sys.executable, "-m", "engine.cli", "campaign", "plan",
                           str(rules_dir / "campaigns" / "test_blitz.yaml"), "--rules-dir", str(rules_dir),
                           "--models-dir", str(models_dir), "--days", "3", "--json", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_plan_on_missing_or_thin_recorded_traffic_says_so_and_how_to_fix_it(
        redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    from engine.sim import demo

    store = ProfileStore.from_url(redis_url)
    demo.seed(store, 60)
    rules_dir = rules_with(tmp_path, blitz(total=100, daily=100))

    fresh = _plan_cli(redis_url, models_dir, rules_dir, "--quiet")  # a fresh install: nothing recorded
    assert fresh.returncode == 1 and "--decisions-per-day CHANNEL=N" in fresh.stderr
    assert "nba serve" in fresh.stderr and "plan: " not in fresh.stderr  # --quiet: no progress

    engine = engine_for(redis_url, models_dir, rules_dir, Clock(INSIDE))
    try:
        for cid in [f"C{i:07d}" for i in range(12)]:  # a dozen decisions: far too few to measure traffic
            decide(engine, cid)
        flushed(engine)
    finally:
        engine.rules.current.close()
    thin = _plan_cli(redis_url, models_dir, rules_dir, "--traffic-days", "2")
    assert thin.returncode == 0, thin.stderr
    plan = json.loads(thin.stdout)
    assert plan["traffic_recorded"] == {"call_center": 12}
    thin_warning = next(w for w in plan["warnings"] if "call_center" in w)
    assert "only 12 decisions recorded on call_center" in thin_warning and "--decisions-per-day" in thin_warning
    assert any("span only 0.0 of the 2 days" in w and "--decisions-per-day" in w for w in plan["warnings"])  # 12 at once, over 2 days
    assert f"warning: {thin_warning}" in thin.stderr  # on stderr too, for a reader of the text
    assert "plan: ranking and replaying 60 customers" in thin.stderr and "(100%)" in thin.stderr  # progress
    # the service's default number of actions per decision, as a Decide without max_actions gets
    assert plan["max_actions"] == validate(DecideInput(customer_id="C0000000", channel="call_center"), SCHEMA)
    assert plan["units"]["displaced"].startswith("customers") and plan["units"]["presentations"].startswith(
        "presentations")


def test_the_plans_default_shows_as_many_actions_as_the_service(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    """Without ``max_actions`` the plan ranks the service's default top (not a copy of the number): its shown
    customers are those a Decide without max_actions shows the campaign's action to."""
    from engine.analytics.campaign_plan import Traffic, format_plan, plan_campaign, what_if_rules
    from engine.decision.funnel import DecisionEngine
    from engine.live import Live
    from engine.sim import demo

    store = ProfileStore.from_url(redis_url)
    demo.seed(store, 150)
    rules_dir = tmp_path / "live"
    shutil.copytree(RULES_DIR, rules_dir)
    campaign_file = tmp_path / "blitz.yaml"
    campaign_file.write_text(blitz(total=1000, daily=500).replace("value: 5000", "value: 150"))
    live, planned, campaign = what_if_rules(rules_dir, campaign_file)
    try:
        model = ModelRegistry(models_dir, SCHEMA).load()
        customers = [f"C{i:07d}" for i in range(150)]
        moment = at(0, "10:00")
        plan = plan_campaign(store, model, live, planned, campaign, customers, Traffic.given({"call_center": 0.5}),
                             days=2, at=moment)
        assert plan.max_actions == DEFAULT_MAX_ACTIONS and plan.warnings == []  # given traffic: nothing to warn
        engine = DecisionEngine(store, Live(planned), Live(model), clock=lambda: moment)
        served = sum(shown(engine.decide(DecideInput(customer_id=cid, channel="call_center", preview=True)))
                     for cid in customers)
        assert sum(plan.shown["call_center"].values()) == served > 0
        text = format_plan(plan)
        assert f"top {DEFAULT_MAX_ACTIONS} per decision" in text
        assert "customers at the campaign's start" in text and "call_center 0.5 (given)" in text
        if plan.displaced:
            assert "(customers, not presentations" in text
    finally:
        live.close()
        planned.close()


# --- the report's words --------------------------------------------------------------------------------

def test_a_lift_whose_interval_includes_zero_is_called_not_significant_yet() -> None:
    lift = {"lift": -0.184, "ci95": [-0.651, 0.909], "customers": {"treated": 900, "control": 100}}
    words = significance(lift)
    assert words["significant"] is False
    assert words["in_words"].startswith("not significant yet: the 95% interval includes 0")
    # the CI's log-scale SE is 0.434 and the log lift -0.203: (1.96 + 0.84)^2 (0.434 / 0.203)^2 = 35.7 times
    # the customers for 80% power if the lift were really -18.4%
    needed = words["more_customers_needed"]
    assert needed["treated"] == pytest.approx(900 * 34.7, rel=0.02)
    assert needed["control"] == pytest.approx(100 * 34.7, rel=0.02)
    assert f"{needed['treated']:,} more treated" in words["in_words"]

    above = significance({"lift": 0.30, "ci95": [0.05, 0.60], "customers": {"treated": 900, "control": 100}})
    assert above["significant"] is True and "above 0" in above["in_words"] and above["more_customers_needed"] is None
    below = significance({"lift": -0.30, "ci95": [-0.50, -0.05], "customers": {"treated": 900, "control": 100}})
    assert "below 0" in below["in_words"] and "worse" in below["in_words"]
    none = significance({"lift": None, "ci95": None, "note": "needs at least 2 customers in each arm"})
    assert none["significant"] is None and "needs at least 2 customers" in none["in_words"]


def _report(spent: int, even: float, plan_rows: list[dict] | None = None) -> dict:
    lift = {"lift": -0.184, "ci95": [-0.651, 0.909], "customers": {"treated": 900, "control": 100},
            "outcome_per_customer": {"treated": 0.8, "control": 0.98}, "objective": "value"}
    lift |= significance(lift)
    row = {"presented": spent, "accepted": 4, "acceptance_rate": 4 / spent, "value": 400.0}
    report = {"campaign": "test_blitz", "objective": "value", "owner": "tests@example.com", "dates": "d",
              "total_budget": 1000, "daily_budget": 100, "totals": row | {"customers": spent},
              "by_channel": {"call_center": row}, "by_segment": {"family": row, "student": row},
              "by_action": {"blitz_offer": row}, "lift": lift,
              "spend": [{"day": "2030-03-01", "presented": spent, "cumulative": spent, "even_spend": even}],
              "pacing": {"as_of": START + 86_400, "spent": spent, "even_spend": even, "ratio": spent / even},
              "versus_plan": plan_rows}
    report["pacing"]["in_words"] = pacing_words(report)
    return report


def test_pacing_is_the_share_of_an_even_spend_in_words() -> None:
    words = pacing_words(_report(8, 200.0))
    assert words.startswith("8 of the 1,000 presentations of the total budget spent: 4.0% of what an even spend")
    assert "(200), behind pace" in words
    assert "about on pace" in pacing_words(_report(200, 200.0))
    assert "ahead of pace" in pacing_words(_report(300, 200.0))
    text = format_campaign_report(_report(8, 200.0))
    assert "x0.04" not in text and "budget: 8 of the 1,000 presentations" in text
    assert "not significant yet" in text


def test_a_segment_says_whether_its_rate_or_its_volume_is_over_plan() -> None:
    plan = {"days": 10, "by_segment": {"student": {"presentations": 1000, "acceptance_rate": 0.3},
                                       "family": {"presentations": 100, "acceptance_rate": 0.3}}}
    # student: half the planned volume, a higher rate; family: the planned rate, five times the volume
    actual = {"student": Tally(100, 50, 0.0), "family": Tally(100, 30, 0.0)}
    rows = {r["segment"]: r for r in versus_plan(actual, plan, ["2030-03-01", "2030-03-02"])}
    assert (rows["student"]["verdict"], rows["student"]["volume_verdict"]) == ("over", "under")
    assert rows["student"]["in_words"] == ("acceptance rate above plan (50.0% vs 30.0% planned); "
                                           "volume below plan (50 vs 100 presentations/day planned)")
    assert (rows["family"]["verdict"], rows["family"]["volume_verdict"]) == ("as planned", "over")
    assert rows["family"]["in_words"].startswith("acceptance rate as planned (30.0% vs 30.0% planned); volume above")
    text = format_campaign_report(_report(100, 100.0, list(rows.values())))
    assert "acceptance rate above plan (50.0% vs 30.0% planned); volume below plan" in text


def test_the_charts_show_rates_and_lift_in_percent() -> None:
    pytest.importorskip("matplotlib")
    from engine.analytics.campaign_html import figures, render_html

    report = _report(8, 200.0)
    figs = figures(report)
    try:
        for name, axis in (("lift", "x"), ("segments", "y")):
            ax = figs[name].axes[0]
            figs[name].canvas.draw()
            labels = [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")() if t.get_text()]
            assert labels and all(label.endswith("%") for label in labels), (name, labels)
        lift_ax = figs["lift"].axes[0]
        assert "-18.4%" in lift_ax.get_title() and "not significant yet" in lift_ax.get_title()
    finally:
        import matplotlib.pyplot as plt

        for fig in figs.values():
            plt.close(fig)
    page = render_html(report)
    assert "not significant yet" in page and "4.0% of what an even spend" in page
