"""The customer situations of shared/scenarios, decided by the real funnel on a real Redis."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from engine.decision.funnel import DecisionEngine
from engine.decision.request import DecideInput
from engine.live import Live
from engine.models.registry import ModelRegistry
from engine.rules.runtime import load_and_compile
from engine.sim.telco import NUMERIC, SCHEMA
from engine.sim.world import generate
from engine.store.profiles import Profile, ProfileStore

from .clock import at
from .conftest import RULES_DIR

pytestmark = pytest.mark.both_redis

SALES = {"upsell", "cross_sell", "bundle", "acquisition"}
NOON = at(0, "12:00")  # outside the demo rules' quiet hours for e-mail and SMS
MARKETING = SALES | {"retention"}


@pytest.fixture()
def engine(redis_url: str, models_dir: Path):
    rules = load_and_compile(RULES_DIR)
    store = ProfileStore.from_url(redis_url)
    yield DecisionEngine(store, Live(rules, retire=lambda r: r.close()), Live(ModelRegistry(models_dir, SCHEMA).load()),
                         clock=lambda: NOON)
    rules.close()


def customer(cid: str, **changes) -> Profile:
    """A satisfied tier-B mobile+broadband customer with every consent, then ``changes``."""
    base = generate(1, seed=5).profile(0)
    numeric = base.numeric.copy()
    defaults = {"tenure_months": 40, "age": 38, "open_cases": 0, "new_lines_30d": 0, "churn_risk": 0.1,
                "failed_payments_90d": 0, "complaints_90d": 0, "support_calls_90d": 0,
                "data_usage_gb": 10, "data_allowance_gb": 40, "device_age_months": 12, "contract_months_left": 12}
    for name, value in (defaults | {k: v for k, v in changes.items() if k in NUMERIC}).items():
        numeric[NUMERIC.index(name)] = value
    categorical = base.categorical | {"plan": "standard", "segment": "consumer", "lifecycle_stage": "satisfied",
                                      "value_tier": "B"} | changes.get("categorical", {})
    sets = {"products": frozenset(changes.get("products", {"mobile", "broadband"})),
            "consent": frozenset(changes.get("consent", {"call_center", "web", "mobile_app", "email", "sms",
                                                          "branch", "pos"}))}
    cases = tuple(f"CASE-{k}" for k in range(int(numeric[NUMERIC.index("open_cases")])))
    return replace(base, customer_id=cid, numeric=numeric, categorical=categorical, sets=sets, open_cases=cases)


def decide(engine: DecisionEngine, cid: str, channel: str, **kw):
    return engine.decide(DecideInput(customer_id=cid, channel=channel, max_actions=kw.pop("max_actions", 5), **kw))


def test_1_service_before_sales_on_every_channel(engine: DecisionEngine) -> None:
    engine.store.save([customer("S1", open_cases=1)], SCHEMA)
    for channel in ("call_center", "web", "mobile_app", "email", "sms", "branch"):
        d = decide(engine, "S1", channel)
        assert d.actions[0].action_id == "resolve_open_case", (channel, d.actions)
        assert not {a.type for a in d.actions} & MARKETING, (channel, d.actions)
        assert "service_first" in d.situations
    engine.store.save([customer("S1", open_cases=0)], SCHEMA)
    assert {a.type for a in decide(engine, "S1", "web").actions} & SALES


def test_1_a_retention_save_trigger_allows_retention_during_a_case(engine: DecisionEngine) -> None:
    engine.store.save([customer("S1b", open_cases=1, churn_risk=0.8,
                                categorical={"value_tier": "A"})], SCHEMA)
    assert "retention" not in {a.type for a in decide(engine, "S1b", "call_center").actions}
    engine.store.set_trigger("S1b", "retention_save", 3600, now=NOON)
    types = [a.type for a in decide(engine, "S1b", "call_center").actions]
    assert "retention" in types and not set(types) & SALES


def test_2_consent_withdrawal_applies_to_the_very_next_decision(engine: DecisionEngine) -> None:
    engine.store.save([customer("S2")], SCHEMA)
    assert {a.type for a in decide(engine, "S2", "email").actions} & MARKETING
    everything_but_email = {"call_center", "web", "mobile_app", "sms", "branch", "pos"}
    engine.store.save([customer("S2", consent=everything_but_email)], SCHEMA)
    d = decide(engine, "S2", "email", explain=True)
    assert not {a.type for a in d.actions} & MARKETING
    assert any(f.stage == "blocked" and "marketing_needs_consent" in f.detail for f in d.funnel)
    assert {a.type for a in decide(engine, "S2", "web").actions} & MARKETING  # other channels unaffected


def test_3_one_voice_same_state_same_decision_from_any_engine(engine: DecisionEngine, models_dir: Path) -> None:
    engine.store.save([customer("S3", churn_risk=0.6, categorical={"value_tier": "A"})], SCHEMA)
    other_rules = load_and_compile(RULES_DIR)
    other = DecisionEngine(ProfileStore(engine.store.client), Live(other_rules), Live(ModelRegistry(models_dir, SCHEMA).load()),
                           clock=lambda: NOON)

    def same_state_decision(e: DecisionEngine):
        engine.store.client.delete("nba:{c:S3}:contacts")  # presenting changes the state: reset it
        return [(a.action_id, a.priority, a.treatment) for a in decide(e, "S3", "web").actions]

    try:
        answers = [same_state_decision(e) for e in (engine, other, engine, other)]
    finally:
        other_rules.close()
    assert all(a == answers[0] for a in answers)


def test_5_requested_call_back_tops_the_call_center_list_until_it_expires(engine: DecisionEngine) -> None:
    engine.store.save([customer("S5", open_cases=1)], SCHEMA)
    engine.store.set_trigger("S5", "callback_requested", 3600, now=NOON)
    assert decide(engine, "S5", "call_center").actions[0].action_id == "callback_customer"
    engine.store.client.delete("nba:{c:S5}:triggers")
    assert "callback_customer" not in {a.action_id for a in decide(engine, "S5", "call_center").actions}


def test_7_many_new_lines_block_sales_and_raise_a_review(engine: DecisionEngine) -> None:
    engine.store.save([customer("S7", new_lines_30d=48)], SCHEMA)
    d = decide(engine, "S7", "call_center")
    assert d.actions[0].action_id == "review_new_lines"
    assert not {a.type for a in d.actions} & MARKETING
    for channel in ("web", "mobile_app", "branch", "pos"):
        assert not {a.type for a in decide(engine, "S7", channel).actions} & MARKETING


def test_8_retention_for_valuable_customers_at_risk_outranks_cross_sell(engine: DecisionEngine) -> None:
    engine.store.save([customer("S8", churn_risk=0.75, categorical={"value_tier": "A"})], SCHEMA)
    d = decide(engine, "S8", "call_center", max_actions=10)
    types = [a.type for a in d.actions]
    assert types[0] == "retention", d.actions
    if "cross_sell" in types:
        assert types.index("retention") < types.index("cross_sell")
    assert "retention_priority" in d.situations


@pytest.mark.parametrize("stage, allowed, forbidden", [
    ("prospect", {"acquisition", "service"}, {"upsell", "cross_sell", "bundle", "retention"}),
    ("satisfied", {"upsell", "cross_sell", "bundle", "service", "retention"}, {"acquisition"}),
    ("declining", {"service", "retention"}, {"upsell", "cross_sell", "bundle", "acquisition"}),
])
def test_9_lifecycle_stages_get_their_strategy(engine: DecisionEngine, stage, allowed, forbidden) -> None:
    products = set() if stage == "prospect" else {"mobile", "broadband", "tv"}
    engine.store.save([customer("S9", categorical={"lifecycle_stage": stage}, products=products,
                                tenure_months=0 if stage == "prospect" else 30, tv_hours_week=20,
                                churn_risk=0.35 if stage == "declining" else 0.1)], SCHEMA)
    seen = set()
    for channel in ("web", "call_center", "mobile_app", "branch"):
        seen |= {a.type for a in decide(engine, "S9", channel, max_actions=10).actions}
    assert not seen & forbidden
    assert seen & (allowed - {"service"})
    if stage == "declining":  # cost-aware care comes first
        assert decide(engine, "S9", "call_center").actions[0].type == "service"


def test_unknown_customer_is_a_cold_start_treated_as_a_prospect(engine: DecisionEngine) -> None:
    d = decide(engine, "nobody-yet", "web")
    assert d.cold_start and not d.degraded
    assert "acquisition" in {a.type for a in d.actions} and "prospect" in d.situations
    assert not {a.type for a in decide(engine, "nobody-yet", "email").actions} & MARKETING


def test_redis_down_gives_a_degraded_answer_not_an_error(engine: DecisionEngine) -> None:
    broken = DecisionEngine(ProfileStore.from_url("redis://127.0.0.1:1/0"), engine.rules, engine.model)
    d = decide(broken, "C0000001", "web")
    assert d.degraded and d.actions


def test_fallback_when_nothing_survives_but_never_past_a_policy(redis_url: str, models_dir: Path,
                                                                tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    catalog = rules_dir / "catalog.yaml"
    # A switch that makes the web fallback ineligible too, so that nothing survives for a cold customer.
    catalog.write_text(catalog.read_text().replace(
        "  - id: brand_newsletter_signup\n",
        "  - id: brand_newsletter_signup\n    eligible: 'context.test != \"nothing\"'\n", 1))
    rules = load_and_compile(rules_dir)
    try:
        engine = DecisionEngine(ProfileStore.from_url(redis_url), Live(rules), Live(ModelRegistry(models_dir, SCHEMA).load()),
                                clock=lambda: NOON)  # outside the e-mail quiet hours, whenever the test runs
        engine.store.save([customer("S0", products=set(), tv_hours_week=0, roaming_days_90d=0,
                                    categorical={"device_os": "none"})], SCHEMA)
        assert [a.action_id for a in decide(engine, "S0", "web").actions] == ["brand_newsletter_signup"]
        d = decide(engine, "S0", "web", context={"test": "nothing"}, explain=True)
        assert [a.action_id for a in d.actions] == ["brand_newsletter_signup"]
        assert "fallback" in d.actions[0].reasons[0]
        assert not [f for f in d.funnel if f.stage == "ranked"]
        # Without e-mail consent even the fallback newsletter is not sent: the answer is empty on purpose.
        engine.store.save([customer("S0", consent={"web"}, products=set(), tv_hours_week=0, roaming_days_90d=0,
                                    categorical={"device_os": "none"})], SCHEMA)
        d = decide(engine, "S0", "email", context={"test": "nothing"}, explain=True)
        assert d.actions == []
        assert any(f.action_id == "brand_newsletter_signup" and "newsletter_needs_consent" in f.detail
                   for f in d.funnel)
    finally:
        rules.close()
