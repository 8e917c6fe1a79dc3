"""durable-rules at run time: agreement with the Python evaluator, state cleanup, handles, scenarios."""

from __future__ import annotations

import gc
import random
import threading
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from engine.rules import runtime as runtime_module
from engine.rules.checker import Scope
from engine.rules.errors import RuleErrors
from engine.rules.facts import FactInputs
from engine.rules.lang import compile_condition
from engine.rules.loader import load_rules
from engine.rules.model import RuleSet, Situation
from engine.rules.runtime import compile_rules, load_and_compile
from engine.sim.telco import CATEGORICAL, CHANNELS, SCHEMA

REPO = Path(__file__).resolve().parent.parent
PRODUCTS = SCHEMA.sets["products"]
TRIGGERS = ("callback_requested", "retention_save", "payment_failed", "data_cap_near", "complaint_opened",
            "callback_overdue")  # the triggers declared in rules/policies.yaml


@pytest.fixture(scope="module")
def demo():
    rules = load_and_compile(REPO / "rules")
    yield rules
    rules.close()


# --- random inputs --------------------------------------------------------------------------------
# Values near the thresholds used in the demo rules and the random conditions, plus 0 and negatives,
# so equality and boundary cases are hit often.
NUMBER_POOL = (0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 12.0, 24.0, -1.0, 0.3, 0.4, 0.5, 0.6, 0.8, 0.85, 0.9,
               10.0, 15.0, 25.0, 26.0, 600.0, 1.5, 0.25)
TEXT_POOL = ("", "upgrade", "cancel", 'say "hi"', "back\\slash", "café", "line\nbreak")


def random_inputs(rng: random.Random) -> FactInputs:
    numbers = {}
    for name in SCHEMA.numbers:
        numbers[name] = rng.choice(NUMBER_POOL) if rng.random() < 0.85 else rng.uniform(-2, 30)
    categories = {name: rng.choice(levels + ("",)) for name, levels in CATEGORICAL.items() if rng.random() < 0.95}
    return FactInputs(
        numbers=numbers,
        categories=categories,
        products=[p for p in PRODUCTS if rng.random() < 0.4],
        consents=[c for c in CHANNELS if rng.random() < 0.6],
        channel=rng.choice(CHANNELS),
        touchpoint=rng.choice(TEXT_POOL),
        context={key: rng.choice(TEXT_POOL) for key in ("intent", "note") if rng.random() < 0.7},
        triggers=[t for t in TRIGGERS if rng.random() < 0.25],
    )


NUM_FIELDS = ("tenure_months", "churn_risk", "nps", "open_cases", "data_usage_ratio", "age")
CONSTANTS = ("0", "1", "2", "3", "0.5", "12", "-1", "0.3", "1.5")


class ConditionGenerator:
    """Random, well-typed condition texts (which may reference earlier situations)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def number(self, depth: int = 2) -> str:
        r = self.rng.random()
        if depth <= 0 or r < 0.45:
            return self.rng.choice(NUM_FIELDS)
        if r < 0.6:
            return self.rng.choice(CONSTANTS)
        if r < 0.9:
            op = self.rng.choice("+-*")
            return f"({self.number(depth - 1)} {op} {self.number(depth - 1)})"
        if r < 0.95:
            return f"-{self.rng.choice(NUM_FIELDS)}"
        return f"{self.rng.choice(NUM_FIELDS)} / {self.rng.choice(('2', '4', '0.5'))}"

    def atom(self, situations: list[str]) -> str:
        rng = self.rng
        kind = rng.randrange(11)
        if kind <= 2:
            return f"{self.number()} {rng.choice(['==', '!=', '<', '<=', '>', '>='])} {self.number()}"
        if kind == 3:
            name = rng.choice(list(CATEGORICAL))
            return f'{name} {rng.choice(["==", "!="])} "{rng.choice(CATEGORICAL[name])}"'
        if kind == 4:
            name = rng.choice(list(CATEGORICAL))
            levels = rng.sample(CATEGORICAL[name], rng.randint(1, 3))
            return f'{name} {rng.choice(["in", "not in"])} [{", ".join(repr(v) for v in levels)}]'
        if kind == 5:
            return rng.choice([f'holds("{rng.choice(PRODUCTS)}")', f'consent("{rng.choice(CHANNELS)}")',
                               "has_consent", f'trigger("{rng.choice(TRIGGERS)}")'])
        if kind == 6:
            value = rng.choice(TEXT_POOL).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            left = rng.choice(["context.intent", "context.note", "touchpoint"])
            return f'{left} {rng.choice(["==", "!="])} "{value}"'
        if kind == 7:
            return f'channel in [{", ".join(repr(c) for c in rng.sample(CHANNELS, 2))}]'
        if kind == 8:
            return f"{rng.choice(NUM_FIELDS)} in [{', '.join(rng.sample(CONSTANTS, 3))}]"
        if kind == 9 and situations:
            return rng.choice(situations)
        return f'context.intent {rng.choice(["==", "!="])} touchpoint'

    def condition(self, situations: list[str], depth: int = 3) -> str:
        r = self.rng.random()
        if depth <= 0 or r < 0.3:
            return self.atom(situations)
        if r < 0.55:
            parts = [self.condition(situations, depth - 1) for _ in range(self.rng.randint(2, 3))]
            return "(" + " and ".join(parts) + ")"
        if r < 0.85:
            parts = [self.condition(situations, depth - 1) for _ in range(self.rng.randint(2, 3))]
            return "(" + " or ".join(parts) + ")"
        return f"not {self.condition(situations, depth - 1)}"


def ruleset_of_situations(conditions: dict[str, str]) -> RuleSet:
    scope = Scope(SCHEMA, situations=set(conditions))
    situations = {}
    for name, text in conditions.items():
        tree, errors = compile_condition(text, scope)
        assert not errors, (text, [str(e) for e in errors])
        situations[name] = Situation(name, tree, text, source="test:1:1")
    return RuleSet(version="rules-test", loaded_at=datetime.now(UTC), actions=(), fallback={},
                   situations=situations, policies=(), levers=(), context_weights={}, schema=SCHEMA)


def fired_through_durable(rules, outcome) -> int:
    """How many logical rules held without being constant (each must fire exactly once)."""
    always = rules.plan.always
    in_durable = 0
    if rules.plan.eligibility is None:  # actions and levers too (the naive compilation)
        in_durable = len(outcome.eligible - always["action"]) + len(outcome.levers - always["lever"])
    return len(outcome.situations - always["situation"]) + len(outcome.policies - always["policy"]) + in_durable


# --- durable agrees with the Python evaluator -------------------------------------------------------
def test_demo_rules_agree_with_python_evaluator(demo):
    rng = random.Random(7)
    seen = set()
    for _ in range(3000):
        fact = demo.build_fact(random_inputs(rng))
        got, want = demo.evaluate(fact), demo.evaluate_python(fact)
        assert not got.degraded
        assert (got.situations, got.policies, got.levers, got.eligible) == (
            want.situations, want.policies, want.levers, want.eligible), fact
        assert got.fired == fired_through_durable(demo, got), "a rule fired more than once"
        seen |= got.situations | got.policies | got.levers
    assert not demo.plan.may_repeat
    # the random profiles exercise every situation, policy and lever of the demo
    rs = demo.ruleset
    assert seen == set(rs.situations) | {p.name for p in rs.policies} | {lv.name for lv in rs.levers}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_conditions_agree_with_python_evaluator(seed):
    rng = random.Random(seed)
    gen = ConditionGenerator(rng)
    conditions: dict[str, str] = {}
    for i in range(60):  # plain conditions
        conditions[f"s{i}"] = gen.condition([])
    for i in range(60, 100):  # conditions using the plain ones
        conditions[f"s{i}"] = gen.condition([f"s{j}" for j in rng.sample(range(60), 5)], depth=2)
    for i in range(100, 110):  # two levels of situations
        conditions[f"s{i}"] = gen.condition([f"s{j}" for j in rng.sample(range(60, 100), 3)], depth=2)
    rules = compile_rules(ruleset_of_situations(conditions))
    assert not rules.plan.may_repeat  # every condition compiled to exclusive pieces
    try:
        sizes = set()
        for _ in range(600):
            fact = rules.build_fact(random_inputs(rng))
            got, want = rules.evaluate(fact), rules.evaluate_python(fact)
            assert not got.degraded
            if got.situations != want.situations:
                diff = sorted(got.situations ^ want.situations, key=lambda n: int(n[1:]))
                pytest.fail(f"{diff[0]}: {conditions[diff[0]]!r} differs for {fact}")
            assert got.fired == fired_through_durable(rules, got), "a rule fired more than once"
            sizes.add(len(got.situations))
        assert len(sizes) > 10  # conditions are neither all true nor all false
    finally:
        rules.close()


def test_boundaries_and_arithmetic_edge_cases():
    conditions = {
        "eq": "tenure_months == 12", "gte": "tenure_months >= 12", "gt": "tenure_months > 12",
        "ratio": "data_usage_ratio >= 0.85", "tiny": "churn_risk > 0.00001", "big": "age < 100000000000000000000",
        "both_sides": "tenure_months * 3 > age + 1", "const_left": "12 <= tenure_months",
        "neg": "-nps >= 2", "div": "tenure_months / 4 == 3", "not_in": 'plan not in ["none", "prepaid"]',
        "empty_text": 'context.intent == ""', "same_text": "context.intent == touchpoint",
        "constant_true": "1 < 2 or nps > 1", "constant_false": "nps > 1 and nps < 0",
    }
    rules = compile_rules(ruleset_of_situations(conditions))
    try:
        assert rules.plan.always["situation"] == {"constant_true"}
        assert not any(name.endswith("constant_false") for name in rules.plan.definition)
        cases = [
            ({"tenure_months": 12.0, "data_usage_ratio": 0.85, "churn_risk": 0.00001, "age": 34.5, "nps": -2.0},
             {"eq", "gte", "ratio", "both_sides", "const_left", "neg", "div", "not_in", "empty_text",
              "same_text", "constant_true", "big"}),
            ({"tenure_months": 12.5, "data_usage_ratio": 0.8499999, "churn_risk": 0.00002, "age": 36.5, "nps": -1.9},
             {"gte", "gt", "tiny", "const_left", "not_in", "empty_text", "same_text", "constant_true", "big"}),
        ]
        for numbers, expected in cases:
            fact = rules.build_fact(numbers=numbers, categories={"plan": "standard"})
            assert rules.evaluate(fact).situations == expected
            assert rules.evaluate_python(fact).situations == expected
    finally:
        rules.close()


def test_large_conditions_are_split_to_fit_durable():
    # 12 alternatives of 2 each: 2 + 12 * 4 markers, beyond durable's 31 per rule.
    text = " and ".join(f"(nps > {i} or tenure_months < {i})" for i in range(12))
    rules = compile_rules(ruleset_of_situations({"wide": text}))
    try:
        assert len([n for n in rules.plan.definition if n.startswith("sit$wide")]) > 1
        rng = random.Random(5)
        for _ in range(300):
            fact = rules.build_fact(random_inputs(rng))
            got = rules.evaluate(fact)
            assert got.situations == rules.evaluate_python(fact).situations
            assert got.fired == len(got.situations)
    finally:
        rules.close()


def test_too_complex_condition_is_a_rule_error():
    pairs = [(p, f"t{i}") for i, p in enumerate(PRODUCTS)] + [(p, f"u{i}") for i, p in enumerate(PRODUCTS)]
    text = " and ".join(f'(holds("{p}") or trigger("{t}"))' for p, t in pairs[:20])  # 2^20 combinations
    with pytest.raises(RuleErrors) as err:
        compile_rules(ruleset_of_situations({"huge": text}))
    assert "too complex" in str(err.value) and str(err.value).startswith("test:1:1:")


# --- state, handles, threads ------------------------------------------------------------------------
def test_thousands_of_evaluations_leave_no_state(demo):
    fact = demo.build_fact(channel="web", consents=["web"], products=["mobile"],
                           categories={"lifecycle_stage": "loyal"})
    first = demo.evaluate(fact)
    for _ in range(3000):  # more than durable's 1024 live states
        assert demo.evaluate(fact) == first


def test_engine_failures_fall_back_without_leaking_state(demo, monkeypatch):
    fact = demo.build_fact(channel="web", products=["mobile", "broadband"], numbers={"churn_risk": 0.9})
    expected = demo.evaluate(fact)
    assert expected.fired > 1 and not expected.degraded
    with pytest.raises(ValueError):
        demo.evaluate({**fact, "churn_risk": float("nan")})  # refused before reaching the engine

    def broken(handle, state):
        raise RuntimeError("boom")

    errors_before = demo.engine_errors
    with monkeypatch.context() as patch:
        patch.setattr(runtime_module.durable_rules_engine, "complete_and_start_action", broken)
        for _ in range(20):
            got = demo.evaluate(fact)
            assert got.degraded and got.eligible == expected.eligible and got.policies == expected.policies
    assert demo.engine_errors == errors_before + 20
    for _ in range(1100):  # more than durable's 1024 live sessions: nothing leaked
        assert demo.evaluate(fact) == expected


def many_true_rules(n: int) -> dict[str, str]:
    return {f"s{i}": f"nps > {-i - 1}" for i in range(n)}  # all hold for nps = 0


def test_many_simultaneous_rules_are_grouped_under_guards():
    rules = compile_rules(ruleset_of_situations(many_true_rules(300)))
    try:
        assert "g__" in rules.fact_fields  # grouped: durable's 64-node matching stack would overflow
        fact = rules.build_fact(numbers={"nps": 0.0})
        got = rules.evaluate(fact)
        assert not got.degraded and len(got.situations) == 300 and got.fired == 300
    finally:
        rules.close()


def test_durable_stack_overflow_is_survived():
    """What the guards prevent: durable error 303, after which deleting the session would crash."""
    ruleset = ruleset_of_situations(many_true_rules(70))
    good = compile_rules(ruleset)
    raw = runtime_module.Plan(rule_names=dict(good.plan.rule_names), fields=dict(good.plan.fields),
                              sources=dict(good.plan.sources))
    raw.definition = {rule: {"all": [{"m": {"$gt": {"nps": float(-int(rule[5:]) - 1)}}}]}
                      for rule in good.plan.rule_names if rule.startswith("sit$")}  # without guards
    raw.definition["nba$all"] = good.plan.definition["nba$all"]
    good.close()
    bad = runtime_module.CompiledRules(ruleset, raw)
    try:
        fact = bad.build_fact(numbers={"nps": 0.0})
        for _ in range(1100):
            got = bad.evaluate(fact)
            assert got.degraded and len(got.situations) == 70
        assert bad.engine_errors == 1100
    finally:
        bad.close()


def test_compile_and_close_many_times():
    ruleset, errors = load_rules(REPO / "rules")
    assert not errors
    compiled = compile_rules(ruleset)
    fact = compiled.build_fact(channel="web")
    expected = compiled.evaluate(fact)
    compiled.close()
    names = set()
    for _ in range(2000):
        rules = runtime_module.CompiledRules(ruleset, compiled.plan)
        names.add(rules.name)
        rules.close()
    assert len(names) == 2000
    for _ in range(20):  # the full compile too
        with compile_rules(ruleset) as rules:
            assert rules.evaluate(fact) == expected


def test_closed_rules_refuse_and_collected_rules_free_their_handle():
    ruleset, _ = load_rules(REPO / "rules")
    old, new = compile_rules(ruleset), compile_rules(ruleset)  # a reload builds aside
    fact = old.build_fact(channel="web")
    assert old.name != new.name and old.evaluate(fact) == new.evaluate(fact)
    old.close()
    old.close()  # idempotent
    assert old.closed
    with pytest.raises(RuntimeError, match="closed"):
        old.evaluate(fact)
    assert new.evaluate(fact).eligible  # the other ruleset is untouched
    finalizer = new._finalizer
    del new
    gc.collect()
    assert not finalizer.alive


def test_concurrent_evaluations(demo):
    rng = random.Random(11)
    facts = [demo.build_fact(random_inputs(rng)) for _ in range(50)]
    expected = [demo.evaluate_python(f) for f in facts]
    errors = []

    def work():
        try:
            for _ in range(8):
                for fact, want in zip(facts, expected):
                    got = demo.evaluate(fact)
                    assert got.eligible == want.eligible and got.policies == want.policies
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_build_fact_keywords_and_defaults(demo):
    fact = demo.build_fact(channel="email", touchpoint="newsletter", consents=["email"], context={"x": "1"},
                           numbers={"open_cases": 2}, categories={"plan": "prepaid"}, triggers=["retention_save"])
    assert fact["has_consent"] is True and fact["open_cases"] == 2.0 and fact["plan"] == "prepaid"
    assert fact["trg__retention_save"] is True and fact["trg__callback_requested"] is False
    empty = demo.build_fact()
    assert set(empty) == set(demo.fact_fields)
    assert empty["tenure_months"] == 0.0 and empty["segment"] == "" and empty["has_consent"] is False
    assert empty["holds__tv"] is False and empty["g__"] == 0.0


def test_profile_adapter_rounds_float32_values(demo):
    import numpy as np

    from engine.sim.telco import DERIVED, NUMERIC

    class Profile:  # the shape of engine.store.profiles.Profile
        numeric = np.zeros(len(NUMERIC), dtype=np.float32)
        categorical = {"value_tier": "A", "lifecycle_stage": "loyal"}
        sets = {"products": frozenset({"mobile"}), "consent": frozenset({"call_center"})}
        triggers = frozenset({"callback_requested"})

    Profile.numeric[NUMERIC.index("churn_risk")] = 0.7  # 0.699999988 as float32
    fact = demo.build_fact(Profile(), np.zeros(len(DERIVED)), "call_center", "inbound", {})
    assert fact["churn_risk"] == 0.7 and fact["has_consent"] and fact["trg__callback_requested"]
    assert "retention_priority" in demo.evaluate(fact).situations


# --- demo scenarios at the rule-outcome level --------------------------------------------------------
TODAY = date(2026, 6, 1)
SALES = {"upsell", "cross_sell", "bundle", "acquisition"}
MARKETING = SALES | {"retention"}


def customer(**overrides) -> FactInputs:
    """A loyal tier-B family customer with mobile + broadband who consents to every channel."""
    numbers = {"tenure_months": 36, "churn_risk": 0.35, "data_usage_ratio": 0.9, "num_lines": 3,
               "device_age_months": 30, "credit_score": 700, "tv_hours_week": 12, "contract_months_left": 2,
               "roaming_days_90d": 4, "age": 41}
    numbers.update(overrides.pop("numbers", {}))
    categories = {"plan": "standard", "segment": "family", "lifecycle_stage": "loyal", "value_tier": "B",
                  "device_os": "android", "region": "north"}
    categories.update(overrides.pop("categories", {}))
    base = dict(numbers=numbers, categories=categories, products={"mobile", "broadband"},
                consents=set(CHANNELS), channel="call_center", touchpoint="inbound_call", context={}, triggers=())
    base.update(overrides)
    return FactInputs(**base)


def decide(rules, inputs: FactInputs):
    fact = rules.build_fact(inputs)
    outcome = rules.evaluate(fact)
    assert outcome.situations == rules.evaluate_python(fact).situations
    verdicts = {v.action.id: v for v in rules.verdicts(outcome, inputs.channel, TODAY)}
    return outcome, verdicts


def admitted(verdicts, types=None) -> set[str]:
    return {aid for aid, v in verdicts.items() if v.admitted and (types is None or v.action.type in types)}


def test_scenario_1_service_before_sales(demo):
    for channel in ("call_center", "web", "mobile_app", "email", "sms", "branch"):
        outcome, verdicts = decide(demo, customer(numbers={"open_cases": 1}, channel=channel))
        assert "service_first" in outcome.situations
        assert verdicts["resolve_open_case"].admitted
        assert not admitted(verdicts, MARKETING), channel
        blocked = [v for v in verdicts.values() if v.stage == "policy" and v.action.type in SALES]
        assert blocked and all("service_before_sales" in v.blocked_by for v in blocked)
    # the service action outranks everything else on the call center
    _, verdicts = decide(demo, customer(numbers={"open_cases": 1}))
    best = max((v for v in verdicts.values() if v.admitted), key=lambda v: v.weight * v.action.value)
    assert best.action.id == "resolve_open_case"
    # an explicit retention save lets retention through, but still no sales
    _, verdicts = decide(demo, customer(numbers={"open_cases": 1, "churn_risk": 0.6}, triggers={"retention_save"}))
    assert admitted(verdicts, {"retention"}) and not admitted(verdicts, SALES)
    # once the case is closed, sales come back
    _, verdicts = decide(demo, customer(numbers={"open_cases": 0}))
    assert admitted(verdicts, SALES)


def test_scenario_2_consent_is_immediate(demo):
    with_consent = customer(channel="email")
    _, verdicts = decide(demo, with_consent)
    assert admitted(verdicts, MARKETING)
    opted_out = customer(channel="email", consents=set(CHANNELS) - {"email"})
    outcome, verdicts = decide(demo, opted_out)
    assert "marketing_needs_consent" in outcome.policies
    assert not admitted(verdicts, MARKETING)
    assert all(v.blocked_by == ("marketing_needs_consent",) for v in verdicts.values()
               if v.stage == "policy" and v.action.type in MARKETING)
    assert admitted(verdicts, {"service"})  # service messages still go out
    # other channels keep their consent
    _, verdicts = decide(demo, customer(channel="sms", consents=set(CHANNELS) - {"email"}))
    assert admitted(verdicts, MARKETING)


def test_scenario_5_callback_tops_the_call_center_list(demo):
    _, verdicts = decide(demo, customer(triggers={"callback_requested"},
                                        numbers={"churn_risk": 0.7}, categories={"value_tier": "A"}))
    ranked = sorted((v for v in verdicts.values() if v.admitted), key=lambda v: -v.weight * v.action.value)
    assert ranked[0].action.id == "callback_customer"
    assert "callback_first" in ranked[0].levers
    # ahead of the next action by far more than propensities can differ
    assert ranked[0].weight * ranked[0].action.value > 20 * ranked[1].weight * ranked[1].action.value
    _, verdicts = decide(demo, customer())
    assert verdicts["callback_customer"].stage == "eligibility"
    _, verdicts = decide(demo, customer(channel="web", triggers={"callback_requested"}))
    assert verdicts["callback_customer"].stage == "channel"


def test_scenario_7_fraud_hold(demo):
    outcome, verdicts = decide(demo, customer(numbers={"new_lines_30d": 48}))
    assert "fraud_hold" in outcome.situations
    assert verdicts["review_new_lines"].admitted and "fraud_review_first" in verdicts["review_new_lines"].levers
    assert not admitted(verdicts, MARKETING)
    assert all("fraud_hold_stops_sales" in v.blocked_by for v in verdicts.values()
               if v.stage == "policy" and v.action.type in MARKETING)
    outcome, verdicts = decide(demo, customer(numbers={"new_lines_30d": 4}))
    assert "fraud_hold" not in outcome.situations and verdicts["review_new_lines"].stage == "eligibility"
    assert admitted(verdicts, SALES)


def test_scenario_8_value_tier_a_retention_outranks_cross_sell(demo):
    at_risk = dict(numbers={"churn_risk": 0.6}, products={"mobile", "fiber"})
    outcome, verdicts = decide(demo, customer(categories={"value_tier": "A"}, **at_risk))
    assert "retention_priority" in outcome.situations and "save_high_value" in outcome.levers
    retention = [v for v in verdicts.values() if v.admitted and v.action.type == "retention"]
    cross_sell = [v for v in verdicts.values() if v.admitted and v.action.type == "cross_sell"]
    assert retention and cross_sell
    assert min(v.weight for v in retention) == pytest.approx(1.5 * 3.0)  # call center x lever
    assert max(v.weight for v in cross_sell) == pytest.approx(1.3)  # growth lever only
    assert max(v.weight * v.action.value for v in retention) > max(v.weight * v.action.value for v in cross_sell)
    # tier B at the same risk: no save lever; tier C: no costly retention offers at all
    outcome, verdicts = decide(demo, customer(categories={"value_tier": "B"}, **at_risk))
    assert "save_high_value" not in outcome.levers
    _, verdicts = decide(demo, customer(categories={"value_tier": "C"}, channel="mobile_app", **at_risk))
    assert verdicts["retention_discount_20"].blocked_by == ("costly_retention_for_valuable_customers",)
    assert verdicts["retention_loyalty_points"].admitted


def test_scenario_9_lifecycle_stages(demo):
    prospect = customer(channel="web", products=set(), categories={"lifecycle_stage": "prospect"},
                        numbers={"contract_months_left": 0, "tenure_months": 0})
    outcome, verdicts = decide(demo, prospect)
    assert admitted(verdicts, {"acquisition"}) >= {"acquire_sim_only_starter", "acquire_fiber_welcome"}
    assert not admitted(verdicts, {"upsell", "cross_sell", "bundle", "retention"})
    for stage in ("new", "satisfied", "retained", "loyal"):
        outcome, verdicts = decide(demo, customer(channel="web", categories={"lifecycle_stage": stage}))
        assert "growing" in outcome.situations
        assert not admitted(verdicts, {"acquisition"})
        assert admitted(verdicts, {"upsell"}) and admitted(verdicts, {"cross_sell"}) and \
            admitted(verdicts, {"bundle"}), stage
    outcome, verdicts = decide(demo, customer(channel="web", categories={"lifecycle_stage": "declining"}))
    assert not admitted(verdicts, {"upsell", "cross_sell", "bundle", "acquisition"})
    tips = verdicts["digital_self_service_tips"]
    assert tips.admitted and "cost_aware_care" in tips.levers


def test_product_based_eligibility(demo):
    _, verdicts = decide(demo, customer(channel="web"))  # holds mobile + broadband
    assert verdicts["cross_sell_broadband"].stage == "eligibility"
    assert verdicts["upsell_fiber_speed"].admitted
    assert verdicts["bundle_home_duo"].admitted  # both components held
    assert verdicts["bundle_triple_play"].stage == "eligibility"  # no TV
    _, verdicts = decide(demo, customer(channel="web", products={"mobile"}))
    assert verdicts["cross_sell_broadband"].admitted and verdicts["bundle_home_duo"].stage == "eligibility"


def test_fallback_per_channel_and_funnel_helpers(demo):
    assert demo.fallback_action("call_center").id == "account_health_check"
    for channel in ("web", "mobile_app", "email", "sms", "branch", "pos"):
        action = demo.fallback_action(channel)
        assert action.id == "brand_newsletter_signup" and channel in action.channels
    outcome, verdicts = decide(demo, customer(numbers={"open_cases": 1}))
    blocked = demo.blocked_actions(outcome)
    assert blocked["upsell_unlimited"].name == "service_before_sales"
    weight, reasons = demo.weights(demo.ruleset.action("resolve_open_case"), outcome, "call_center")
    assert weight == verdicts["resolve_open_case"].weight == 20.0
    assert reasons == ["context call_center/service x2", "lever fix_first x10"]
    assert [a.id for a in demo.catalog] == [a.id for a in demo.ruleset.actions]


def test_demo_catalog_covers_types_and_channels(demo):
    actions = demo.catalog
    assert len(actions) >= 32
    assert {a.type for a in actions} == {"upsell", "cross_sell", "bundle", "retention", "acquisition", "service"}
    assert set(CHANNELS) == {c for a in actions for c in a.channels}
    assert sum(len(a.channels) >= 3 for a in actions) >= 25


# --- the vectorised part decides what durable-rules decides -------------------------------------------
# Per-action engagement conditions run in a numba program (vector.py); compiled with
# eligibility="durable" the same rule set has one durable rule per action instead. Both must give the
# same outcome and the same admitted actions and weights for every profile.
def world_inputs(n: int, seed: int) -> list[FactInputs]:
    """Profiles of the synthetic customer base, on random channels with random context and triggers."""
    import numpy as np

    from engine.models.derived import derive
    from engine.sim.world import generate

    world, rng = generate(n, seed), random.Random(seed)
    out = []
    for i in range(n):
        p = world.profile(i)
        out.append(FactInputs(
            numbers=np.concatenate((p.numeric, derive(p.numeric, SCHEMA))), categories=p.categorical,
            products=p.sets["products"], consents=p.sets["consent"], channel=rng.choice(CHANNELS),
            touchpoint=rng.choice(TEXT_POOL), context={"intent": rng.choice(("upgrade", "cancel", "billing", ""))},
            triggers=[t for t in TRIGGERS if rng.random() < 0.1]))
    return out


def plain(verdicts) -> list[tuple]:
    return [(v.action.id, *v[1:]) for v in verdicts]


def assert_same_decisions(vector, durable, inputs, today=TODAY) -> int:
    """Every input decided alike by both compilations; returns how many actions were admitted."""
    assert vector.plan.eligibility is not None and durable.plan.eligibility is None
    admitted_total = 0
    for k, inp in enumerate(inputs):
        fact = vector.build_fact(inp)
        assert fact == durable.build_fact(inp)
        got, want = vector.evaluate(fact), durable.evaluate(fact)
        assert not got.degraded and not want.degraded
        assert (got.situations, got.policies, got.levers, got.eligible) == (
            want.situations, want.policies, want.levers, want.eligible), inp
        index, verdicts = vector.admitted(got, inp.channel, today)
        naive_index, naive_verdicts = durable.admitted(want, inp.channel, today)
        assert index == naive_index and plain(verdicts) == plain(naive_verdicts)
        if k % 10 == 0:  # explanations and the Python evaluator are slower: a sample
            python = vector.evaluate_python(fact)
            assert (got.situations, got.policies, got.levers, got.eligible) == (
                python.situations, python.policies, python.levers, python.eligible)
            full = plain(vector.verdicts(got, inp.channel, today))
            assert full == plain(durable.verdicts(want, inp.channel, today))
            assert [v for v in full if v[1]] == plain(verdicts)
        admitted_total += len(index)
    return admitted_total


def test_vectorised_engagement_equals_durable_on_the_demo_rules(demo):
    ruleset, _ = load_rules(REPO / "rules")
    with compile_rules(ruleset, eligibility="durable") as naive:
        rng = random.Random(23)
        inputs = [random_inputs(rng) for _ in range(2000)] + world_inputs(2000, 4)
        assert assert_same_decisions(demo, naive, inputs) > 2000


def test_vectorised_engagement_equals_durable_on_a_large_synthetic_catalog(tmp_path):
    from engine.sim import synthetic_rules as synthetic

    ruleset, errors = load_rules(synthetic.write_rules(tmp_path, actions=100, rules=300, customer_rules=60))
    assert not errors, errors[:3]
    counts = synthetic.count_rules(ruleset)
    assert counts["actions"] == 100 and sum(counts.values()) - 100 == 300
    with compile_rules(ruleset) as vector, compile_rules(ruleset, eligibility="durable") as naive:
        rng = random.Random(29)
        inputs = world_inputs(2500, 6) + [random_inputs(rng) for _ in range(500)]
        assert assert_same_decisions(vector, naive, inputs) > 3000


@pytest.mark.parametrize("seed", [4, 5])
def test_vectorised_engagement_equals_durable_on_random_conditions(seed):
    """Random conditions (arithmetic, text, sets, situations) as actions' and groups' conditions."""
    from engine.rules.model import Action, GroupRules

    rng = random.Random(seed)
    gen = ConditionGenerator(rng)
    scope = Scope(SCHEMA, situations={f"s{i}" for i in range(12)}, triggers=None)

    def resolved(text):
        tree, errors = compile_condition(text, scope)
        assert not errors, (text, errors)
        return tree

    base = ruleset_of_situations({f"s{i}": gen.condition([f"s{j}" for j in range(i)], depth=2) for i in range(12)})
    situations = list(base.situations)
    actions = []
    for i in range(60):
        stages = {stage: resolved(gen.condition(situations, depth=2)) if rng.random() < p else None
                  for stage, p in (("eligible", 0.9), ("applicable", 0.4), ("suitable", 0.4))}
        actions.append(Action(id=f"a{i}", name="a", type="service", group=f"g{i % 7}", value=1.0,
                              channels={c: {"text": "x"} for c in CHANNELS}, **stages))
    groups = {f"g{k}": GroupRules(f"g{k}", suitable=resolved(gen.condition(situations, depth=1)))
              for k in range(0, 7, 2)}
    ruleset = RuleSet(version="rules-random", loaded_at=base.loaded_at, actions=tuple(actions), fallback={},
                      situations=base.situations, policies=(), levers=(), context_weights={}, groups=groups,
                      schema=SCHEMA)
    with compile_rules(ruleset) as vector, compile_rules(ruleset, eligibility="durable") as naive:
        inputs = [random_inputs(rng) for _ in range(1000)]
        assert assert_same_decisions(vector, naive, inputs) > 500


def test_seven_digit_rounding_matches_formatting():
    import numpy as np

    from engine.rules.facts import round7

    rng = np.random.default_rng(3)
    stored = (rng.choice([-1.0, 1.0], 200_000) * rng.random(200_000) * 10.0 ** rng.integers(-6, 10, 200_000))
    values = np.concatenate([stored.astype(np.float32).astype(np.float64),  # as profiles hold them
                             rng.random(50_000) * 10.0 ** rng.integers(-3, 5, 50_000),  # derived features
                             np.arange(12_345_600, 12_345_700, dtype=np.float64), [0.0, -0.0, 5e20]])
    expected = np.array([float(f"{v:.7g}") for v in values.tolist()])
    assert np.array_equal(round7(values), expected)
    assert round7(np.array([np.nan, np.inf, -np.inf])).tolist() == [0.0, 0.0, 0.0]
    assert round7(np.array([1.23456789e-30]))[0] == pytest.approx(1.234568e-30, rel=1e-15)
