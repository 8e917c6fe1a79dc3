"""The retail bank example domain (rules/examples/retail_bank): its rules check clean and pass their own
tests, the synthetic data generator (engine/sim/datagen.py) serves it from its schema alone, and the
compiled rules decide hand-built bank customers as the bank intends."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
import pytest

from engine.authoring import check as authoring
from engine.decision.arbitration import arbitrate, fallback_action
from engine.features import CONSENT, FeatureSchema
from engine.models.derived import derive
from engine.rules.facts import FactInputs
from engine.rules.loader import load_domain_file, load_rules
from engine.rules.runtime import ActionVerdict, CompiledRules, load_and_compile
from engine.sim import datagen

from .clock import DAY, at

REPO = Path(__file__).resolve().parent.parent
BANK = REPO / "rules" / "examples" / "retail_bank"
NOW = at(2, "12:00")  # a Wednesday noon of the test calendar: the moment derived dates count to
TODAY = int(NOW // DAY)  # days since 1970-01-01, as dates are stored
NOW_DAY = datetime.fromtimestamp(NOW, UTC).date()
CREDIT_GROUPS = {"cards", "lending", "mortgage"}


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return load_domain_file(BANK)


@pytest.fixture(scope="module")
def rules() -> Iterator[CompiledRules]:
    compiled = load_and_compile(BANK)
    yield compiled
    compiled.close()


# --- the rule files ---------------------------------------------------------------------------------
def test_the_bank_rules_check_clean_and_every_rule_test_passes() -> None:
    assert authoring.check(BANK) == []
    compiled, errors, results = authoring.test(BANK)
    try:
        assert errors == [] and compiled is not None
        failed = [r.render() for r in results if not r.passed]
        assert not failed, "\n".join(failed)
        assert len(results) >= 12
    finally:
        if compiled is not None:
            compiled.close()


def test_the_bank_domain_is_its_own(schema: FeatureSchema) -> None:
    assert {"atm", "relationship_manager", "push"} <= set(schema.channel_names)
    assert schema.service_types == {"service", "risk_alert"}
    assert set(schema.outbound_channels) == {"mobile_app", "relationship_manager", "email", "sms", "push"}
    assert {"customer_since", "last_branch_visit"} == schema.dates
    assert "tenure_years" in schema.derived and "mortgage" in schema.products
    ruleset, errors = load_rules(BANK)
    assert errors == [] and ruleset is not None
    assert 15 <= len(ruleset.actions) <= 25
    assert not any(a.valid_from or a.valid_to for a in ruleset.actions) and not ruleset.campaigns  # no calendar
    for channel in schema.channel_names:  # a fallback on every channel, with a text for it
        fallback = ruleset.fallback_for(channel)
        assert fallback is not None and channel in fallback.channels, channel


# --- scenarios: the compiled rules decide hand-built customers --------------------------------------
BASE: dict = {
    "age": 40, "income_monthly": 3500, "balance_current": 2500, "balance_savings": 8000, "card_spend_month": 600,
    "app_logins_30d": 12, "credit_score": 720, "churn_risk": 0.1, "fraud_score": 0.05,
    "customer_since": TODAY - 6 * 365, "last_branch_visit": TODAY - 200,
    "segment": "mass", "life_stage": "established", "risk_class": "low", "investor_profile": "none",
    "kyc_status": "verified", "preferred_language": "en",
}
ALL_PRODUCTS = ("current_account", "savings", "overdraft_facility")


def customer(schema: FeatureSchema, channel: str, *, products=ALL_PRODUCTS, consents=None, triggers=(),
             context=None, touchpoint: str = "", **changes) -> FactInputs:
    """A decision's input for an established mass-market customer, then ``changes``: stored numbers as
    float32 in the schema's order, derived ones computed by the domain's kernel at ``NOW``."""
    profile = BASE | changes
    stored = np.array([profile.get(n, schema.defaults.get(n, 0.0)) for n in schema.numeric], dtype=np.float32)
    derived = derive(stored, schema, NOW)
    return FactInputs(numbers=np.concatenate((stored, derived)),
                      categories={k: v for k, v in profile.items() if k in schema.categorical},
                      products=frozenset(products),
                      consents=frozenset(schema.channel_names if consents is None else consents),
                      channel=channel, touchpoint=touchpoint, context=context or {}, triggers=frozenset(triggers))


def decide(rules: CompiledRules, inputs: FactInputs) -> tuple[dict[str, ActionVerdict], list[str], frozenset[str]]:
    """(verdict per action, the ranked ids as a rule test ranks them, the situations that hold)."""
    outcome = rules.evaluate(rules.build_fact(inputs))
    verdicts = {v.action.id: v for v in rules.verdicts(outcome, inputs.channel, today=NOW_DAY, now=NOW)}
    admitted = [v for v in verdicts.values() if v.admitted]
    ranked = [a.action_id for a in arbitrate(admitted, np.ones(len(admitted)), inputs.channel, 5, None)]
    if not ranked:
        fallback = fallback_action(rules, outcome, inputs.channel, None)
        ranked = [fallback.id] if fallback is not None else []
    return verdicts, ranked, outcome.situations


def test_distress_gets_no_credit_anywhere_but_the_overdraft_warning_without_marketing_consent(
        rules: CompiledRules, schema: FeatureSchema) -> None:
    distress = {"balance_current": -800.0, "overdraft_days_90d": 20.0}
    checked = 0
    for channel in schema.channel_names:
        verdicts, ranked, situations = decide(rules, customer(schema, channel, **distress))
        assert "financial_distress" in situations
        credit = [v.action.id for v in verdicts.values() if v.action.group in CREDIT_GROUPS and v.admitted]
        assert credit == [], channel
        for aid in ("credit_card_classic", "personal_loan_offer"):
            if channel in verdicts[aid].action.channels:
                checked += 1
                assert "no_credit_offers_in_distress" in verdicts[aid].blocked_by, (channel, aid)
    assert checked >= 8
    # In the app, without any marketing consent: the warning first, then money guidance; no offer at all.
    verdicts, ranked, _ = decide(rules, customer(schema, "mobile_app", consents=["branch"], **distress))
    assert ranked[:2] == ["overdraft_warning", "money_guidance"]
    assert {verdicts[a].action.type for a in ranked} <= schema.service_types
    assert {"no_credit_offers_in_distress", "marketing_needs_consent"} <= set(verdicts["credit_card_classic"].blocked_by)
    # Out of distress the same customer hears about the card and the loan again.
    verdicts, _, situations = decide(rules, customer(schema, "online_banking"))
    assert "financial_distress" not in situations
    assert verdicts["credit_card_classic"].admitted and verdicts["personal_loan_offer"].admitted
    assert verdicts["overdraft_warning"].stage == "eligibility"


def test_an_overdraft_trigger_is_distress_before_the_profile_shows_it(rules: CompiledRules, schema: FeatureSchema) -> None:
    verdicts, ranked, situations = decide(rules, customer(schema, "push", triggers=["overdraft_entered"]))
    assert "financial_distress" in situations and ranked[0] == "overdraft_warning"
    verdicts, ranked, situations = decide(rules, customer(schema, "push"))
    assert "financial_distress" not in situations and not verdicts["overdraft_warning"].admitted


def test_consent_per_channel_holds_offers_but_not_alerts(rules: CompiledRules, schema: FeatureSchema) -> None:
    no_push = [c for c in schema.channel_names if c != "push"]
    profile = {"overdraft_days_90d": 2.0}  # was overdrawn lately (the warning applies), not in distress
    offered = 0
    for channel in schema.channel_names:
        inputs = customer(schema, channel, products=["current_account"], consents=no_push, touchpoint="receipt",
                          **profile)
        verdicts, _, situations = decide(rules, inputs)
        assert "financial_distress" not in situations
        savings, warning = verdicts["open_savings_account"], verdicts["overdraft_warning"]
        if channel == "push":
            assert "marketing_needs_consent" in savings.blocked_by
            assert warning.admitted
            assert "tips_need_consent" in verdicts["security_tips"].blocked_by
            assert not [v for v in verdicts.values() if v.admitted and v.action.type not in schema.service_types]
        elif channel in savings.action.channels:
            offered += 1
            assert savings.admitted, (channel, savings.stage, savings.blocked_by)
        assert warning.admitted or channel not in warning.action.channels
    assert offered >= 5


def test_students_get_a_classic_card_but_no_loan_on_any_channel(rules: CompiledRules, schema: FeatureSchema) -> None:
    student = {"segment": "student", "life_stage": "starter", "age": 21, "income_monthly": 1600,
               "customer_since": TODAY - 2 * 365, "balance_savings": 25000}
    seen_card = False
    for channel in schema.channel_names:
        verdicts, _, situations = decide(rules, customer(schema, channel, products=["current_account"], **student))
        assert "student" in situations
        loans = [v for v in verdicts.values() if v.action.group in ("lending", "mortgage") and v.admitted]
        assert loans == [], (channel, [v.action.id for v in loans])
        card = verdicts["credit_card_classic"]
        if channel in card.action.channels:
            seen_card = True
            assert card.admitted, (channel, card.stage, card.blocked_by)
    assert seen_card
    assert "no_loans_for_students" in decide(rules, customer(schema, "branch", products=["current_account"],
                                                             **student))[0]["personal_loan_offer"].blocked_by


def test_suspected_fraud_comes_first_wherever_the_check_can_be_shown(rules: CompiledRules, schema: FeatureSchema) -> None:
    shown = 0
    for channel in schema.channel_names:
        verdicts, ranked, situations = decide(rules, customer(schema, channel, fraud_score=0.93, churn_risk=0.8))
        assert "fraud_suspected" in situations
        assert not [a for a in ranked if verdicts[a].action.type not in schema.service_types], (channel, ranked)
        if channel in verdicts["fraud_check"].action.channels:
            shown += 1
            assert ranked[0] == "fraud_check", (channel, ranked)
    assert shown >= 5


def test_tenure_counts_from_the_opening_date_to_the_decision(rules: CompiledRules, schema: FeatureSchema) -> None:
    """days_since(customer_since, 0) / 365 at NOW: 60 days in is a new customer (no card yet), 3 years is not."""
    verdicts, _, situations = decide(rules, customer(schema, "online_banking", customer_since=TODAY - 60))
    assert "new_customer" in situations
    assert "no_credit_for_new_customers" in verdicts["credit_card_classic"].blocked_by
    verdicts, _, situations = decide(rules, customer(schema, "online_banking", customer_since=TODAY - 3 * 365))
    assert "new_customer" not in situations and verdicts["credit_card_classic"].admitted


def test_the_atm_screen_is_discreet_and_its_receipt_may_sell(rules: CompiledRules, schema: FeatureSchema) -> None:
    screen, ranked, _ = decide(rules, customer(schema, "atm", products=["current_account"], touchpoint="screen"))
    assert "discreet_at_the_atm" in screen["open_savings_account"].blocked_by
    assert ranked == ["security_tips"]
    receipt, ranked, _ = decide(rules, customer(schema, "atm", products=["current_account"], touchpoint="receipt"))
    assert ranked[0] == "open_savings_account"


# --- synthetic data ---------------------------------------------------------------------------------
NOW_DT = datetime(2031, 3, 5, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def people(schema: FeatureSchema) -> pa.Table:
    return datagen.customers(schema, 3000, seed=11, now=NOW_DT)


@pytest.fixture(scope="module")
def past(schema: FeatureSchema, people: pa.Table) -> pa.Table:
    ruleset, _ = load_rules(BANK)
    assert ruleset is not None
    return datagen.history(schema, ruleset.actions, people, 8, seed=11, now=NOW_DT)


def test_customers_have_the_declared_columns_within_bounds_and_levels(schema: FeatureSchema, people: pa.Table) -> None:
    assert people.column_names == ["customer_id", *schema.numeric, *schema.categorical, *schema.sets]
    assert people.num_rows == 3000
    ids = people.column("customer_id").to_pylist()
    assert len(set(ids)) == 3000 and ids[0] == "C0000000"
    for name in schema.numeric:
        column = people.column(name)
        if name in schema.dates:
            assert column.type == pa.date32()
            days = [d for d in column.to_pylist() if d is not None]
            assert column.null_count < 0.1 * people.num_rows
            assert min(days) >= NOW_DT.date() - timedelta(days=datagen.DATE_YEARS * 366) and max(days) <= NOW_DT.date()
            continue
        values = column.to_numpy()
        assert np.isfinite(values).all(), name
        low, high = schema.bounds[name]
        assert low is not None and high is not None
        assert values.min() >= low and values.max() <= high, name
        assert np.unique(values).size > 3, name  # spread, not a constant
    for name, levels in schema.categorical.items():
        found = Counter(people.column(name).to_pylist())
        assert set(found) <= set(levels), name
        assert len(found) >= 2, name
    for name, members in schema.sets.items():
        held = [set(v.split(";")) if v else set() for v in people.column(name).to_pylist()]
        assert set().union(*held) <= set(members), name
    consent = people.column(CONSENT).to_pylist()
    assert sum(1 for c in consent if c) > 0.9 * len(consent)
    # Plausible shapes: counts have many zeros, a negative balance is the exception.
    assert (people.column("missed_payments_12m").to_numpy() == 0).mean() > 0.3
    assert 0 < (people.column("balance_current").to_numpy() < 0).mean() < 0.3


def test_customers_are_deterministic_per_seed(schema: FeatureSchema, people: pa.Table) -> None:
    assert datagen.customers(schema, 3000, seed=11, now=NOW_DT).equals(people)
    other = datagen.customers(schema, 3000, seed=12, now=NOW_DT)
    assert other.column_names == people.column_names and not other.equals(people)
    assert datagen.customers(schema, 50, seed=11, now=NOW_DT.timestamp()).equals(people.slice(0, 50))


def test_attributes_are_correlated_through_the_hidden_traits(schema: FeatureSchema, people: pa.Table) -> None:
    numbers = np.column_stack([people.column(n).to_numpy() for n in schema.numeric if n not in schema.dates])
    ranks = np.argsort(np.argsort(numbers, axis=0), axis=0)
    corr = np.corrcoef(ranks, rowvar=False)
    off = np.abs(corr[~np.eye(corr.shape[0], dtype=bool)])
    assert off.max() > 0.2  # some attributes move together


def test_history_is_a_plausible_log_with_signal(schema: FeatureSchema, people: pa.Table, past: pa.Table) -> None:
    assert past.column_names == ["customer_id", "action_id", "channel", "ts", "outcome"]
    assert 0.9 * 3000 * 8 <= past.num_rows <= 3000 * 8
    ruleset, _ = load_rules(BANK)
    assert ruleset is not None
    actions = {a.id: a for a in ruleset.actions}
    ids = set(people.column("customer_id").to_pylist())
    consent = dict(zip(people.column("customer_id").to_pylist(),
                       (set(c.split(";")) if c else set() for c in people.column(CONSENT).to_pylist())))
    rows = past.to_pylist()
    for row in rows:
        assert row["customer_id"] in ids and row["outcome"] in datagen.OUTCOMES
        action = actions[row["action_id"]]
        assert row["channel"] in action.channels
        if action.type not in schema.service_types:
            assert row["channel"] in consent[row["customer_id"]]
    stamps = [datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) for r in rows]
    assert min(stamps) >= NOW_DT - timedelta(days=datagen.HISTORY_DAYS) and max(stamps) <= NOW_DT
    assert stamps == sorted(stamps)
    shown: Counter[str] = Counter(r["action_id"] for r in rows)
    took: Counter[str] = Counter(r["action_id"] for r in rows if r["outcome"] == "accepted")
    assert set(shown) == set(actions)
    rate = {a: took[a] / shown[a] for a in shown}
    overall = sum(took.values()) / len(rows)
    assert 0.01 < overall < 0.3
    assert max(rate.values()) - min(rate.values()) > 0.05  # actions differ
    # The hidden model uses the customer: acceptance differs between halves of some attribute.
    by_customer = {r: i for i, r in enumerate(people.column("customer_id").to_pylist())}
    spread = []
    for name in schema.numeric:
        if name in schema.dates:
            continue
        values = people.column(name).to_numpy()
        high = values > np.median(values)
        for aid in shown:
            hits = [(high[by_customer[r["customer_id"]]], r["outcome"] == "accepted") for r in rows if r["action_id"] == aid]
            a = [ok for h, ok in hits if h]
            b = [ok for h, ok in hits if not h]
            if len(a) > 200 and len(b) > 200:
                spread.append(abs(np.mean(a) - np.mean(b)))
    assert max(spread) > 0.05


def test_history_is_deterministic_per_seed(schema: FeatureSchema, people: pa.Table, past: pa.Table) -> None:
    ruleset, _ = load_rules(BANK)
    assert ruleset is not None
    assert datagen.history(schema, ruleset.actions, people, 8, seed=11, now=NOW_DT).equals(past)
    assert not datagen.history(schema, ruleset.actions, people, 8, seed=12, now=NOW_DT).equals(past)


def test_write_picks_csv_or_parquet_by_suffix(tmp_path: Path, people: pa.Table, past: pa.Table) -> None:
    small = people.slice(0, 40)
    parquet = datagen.write(small, tmp_path / "out" / "customers.parquet")
    assert pa_parquet.read_table(parquet).equals(small)
    csv = datagen.write(past.slice(0, 40), tmp_path / "history.csv")
    back = pa_csv.read_csv(csv)
    assert back.column_names == past.column_names and back.num_rows == 40
    assert back.column("action_id").to_pylist() == past.column("action_id").to_pylist()[:40]
    customers_csv = pa_csv.read_csv(datagen.write(small, tmp_path / "customers.csv"))
    assert customers_csv.column_names == small.column_names
    assert isinstance(customers_csv.column("customer_since").to_pylist()[0], date | None)
    with pytest.raises(ValueError):
        datagen.write(small, tmp_path / "customers.xlsx")


def test_the_generator_knows_no_domain(tmp_path: Path) -> None:
    """The telco demo's schema works too, and the generator module names none of either domain's nouns."""
    ruleset, errors = load_rules(REPO / "rules")
    assert ruleset is not None, errors
    telco = ruleset.schema
    table = datagen.customers(telco, 200, seed=1, now=NOW_DT)
    assert table.column_names == ["customer_id", *telco.numeric, *telco.categorical, *telco.sets]
    log = datagen.history(telco, ruleset.actions, table, 3, seed=1, now=NOW_DT)
    assert log.num_rows > 0 and set(log.column("channel").to_pylist()) <= set(telco.channel_names)
    source = Path(datagen.__file__).read_text()
    bank = load_domain_file(BANK)
    nouns = {*bank.numeric, *bank.categorical, *bank.products, *telco.numeric, *telco.categorical, *telco.products,
             *bank.channel_names, *telco.channel_names}
    assert not [n for n in nouns if f'"{n}"' in source or f"'{n}'" in source]
    assert "engine.serving" not in source and "engine.cli" not in source
