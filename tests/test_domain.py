"""domain.yaml: a business's own attributes, derived features, channels and action types, declared in
files, checked with file:line:col errors, packed in Redis by name and held to consent by construction."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.models.derived import derive
from engine.models.model_input import model_input
from engine.rules.loader import load_rules
from engine.rules.runtime import compile_rules
from engine.sim.telco import SCHEMA
from engine.store.profiles import Profile, ProfileStore, SchemaMismatch, profile_key

from .clock import at

REPO = Path(__file__).resolve().parent.parent

LIBRARY = """\
attributes:
  loans_open: {type: number, min: 0}
  fines_due: {type: number, min: 0, default: 0}
  visits_year: {type: number}
  last_visit: {type: date}
  membership: {type: category, levels: [child, adult, senior], default: adult}
  products: {type: set, members: [card, ebook, study_room]}
derived:
  fines_per_loan: {formula: fines_due / loans_open}
  visit_band: {formula: 'bucket(visits_year, 4, 12, 52)'}
  days_away: {formula: 'days_since(last_visit, 9999)'}
  lapsed_score: {formula: 'clamp(log(days_away) / 8, 0, 1)'}
channels:
  desk: {direction: inbound}
  kiosk: {direction: inbound}
  newsletter: {direction: outbound}
  push: {direction: outbound}
action_types:
  reminder: {needs_consent: false}
  event_invite: {}
  membership_offer: {}
"""
CATALOG = """\
fallback: {default: renew_reminder}
actions:
  - id: renew_reminder
    name: Renew your card
    type: reminder
    group: care
    value: 1
    channels: {desk: {script: "Renew?"}, kiosk: {text: "Renew"}, newsletter: {subject: "Renew"}, push: {text: "Renew"}}
  - id: reading_club
    name: Reading club
    type: event_invite
    group: events
    value: 5
    eligible: 'membership == "adult" and visit_band >= 2 and fines_per_loan < 1 and not holds("study_room")'
    channels: {desk: {script: "Join the club"}, newsletter: {subject: "Club"}, push: {text: "Club"}}
"""
POLICIES = "policies: []\n"


def library(tmp_path: Path, domain: str = LIBRARY, contact: str | None = None) -> Path:
    for name, text in (("domain.yaml", domain), ("catalog.yaml", CATALOG), ("policies.yaml", POLICIES),
                       ("contact.yaml", contact)):
        if text is not None:
            (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def errors_of(rules_dir: Path) -> list[str]:
    _, errors = load_rules(rules_dir)
    return [str(e).replace(str(rules_dir) + "/", "") for e in errors]


def _reference(num: np.ndarray) -> np.ndarray:
    """The telco derived features as the hand-written kernel computed them before domain.yaml."""
    col = {name: num[:, i].astype(np.float64) for i, name in enumerate(SCHEMA.numeric)}
    allowance = col["data_allowance_gb"]
    ratio = np.where(allowance > 0, col["data_usage_gb"] / np.where(allowance > 0, allowance, 1.0), 0.0)
    r = 1.0 + sum((col["days_since_last_purchase"] <= c).astype(float) for c in (365.0, 180.0, 90.0, 30.0))
    f = 1.0 + sum((col["purchases_12m"] >= c).astype(float) for c in (1.0, 3.0, 5.0, 8.0))
    m = 1.0 + sum((col["revenue_12m"] >= c).astype(float) for c in (200.0, 500.0, 900.0, 1500.0))
    decay = np.exp(-np.maximum(col["days_since_last_purchase"], 0.0) / 90.0)
    value = (r + f + m) / 15.0 * 0.5 + np.minimum(np.maximum(col["margin_12m"], 0.0) / 1000.0, 1.0) * 0.5
    return np.stack([ratio, r, f, m, r + f + m, decay, value], axis=1)


def test_the_demo_formulas_give_what_the_hand_written_kernel_gave() -> None:
    rng = np.random.default_rng(5)
    num = rng.uniform(-100, 2000, size=(5000, len(SCHEMA.numeric))).astype(np.float32)
    num[::3, SCHEMA.numeric.index("data_allowance_gb")] = 0.0
    num[::4, SCHEMA.numeric.index("days_since_last_purchase")] = 30.0  # on a cut point
    got, want = derive(num, SCHEMA), _reference(num)
    decay = SCHEMA.derived.index("recency_decay")  # exp: numba's and numpy's differ in the last bit
    assert np.array_equal(np.delete(got, decay, axis=1), np.delete(want, decay, axis=1))
    np.testing.assert_allclose(got[:, decay], want[:, decay], rtol=1e-15, atol=0)
    assert SCHEMA.fingerprint() == "197f6a1e12a7"  # unchanged: models trained before domain.yaml still load


def test_a_domain_the_code_has_never_seen(tmp_path: Path) -> None:
    ruleset, errors = load_rules(library(tmp_path))
    assert not errors, errors
    schema = ruleset.schema
    assert schema.channel_names == ("desk", "kiosk", "newsletter", "push")
    assert schema.outbound_channels == ("newsletter", "push") and schema.service_types == {"reminder"}
    now = at(3, "12:00")
    day = now / 86_400
    stored = np.array([[0, 5, 20, day - 40, ], [4, 2, 2, np.nan]], dtype=np.float32)
    got = derive(stored, schema, now)
    assert got[0, 0] == 0.0  # 5 / 0 is 0, not inf
    assert got[1, 0] == 0.5 and list(got[:, 1]) == [3.0, 1.0]
    assert abs(got[0, 2] - 40) < 0.01 and got[1, 2] == 9999  # unknown date: the fallback
    assert got[1, 3] == 1.0 and 0 < got[0, 3] < 1
    with compile_rules(ruleset) as rules:
        reader = np.array([4, 2, 20, day - 3], dtype=np.float32)
        fact = rules.build_fact(numbers=np.concatenate((reader, derive(reader, schema, now))), categories={"membership": "adult"},
                                channel="newsletter", consents=["desk"])
        outcome = rules.evaluate(fact)
        verdicts = {v.action.id: v for v in rules.verdicts(outcome, "newsletter", now=now)}
        # the new marketing type is held to consent with no policy written for it; the service type is not
        assert not verdicts["reading_club"].admitted and verdicts["reading_club"].stage == "policy" and verdicts["reading_club"].blocked_by == ("marketing_needs_consent",)
        assert verdicts["renew_reminder"].admitted


@pytest.mark.parametrize("broken, message", [
    ("fines_per_loan: {formula: fines_due / loans_opn}", 'derived.2: unknown attribute "loans_opn"; did you mean "loans_open"?'),
    ("fines_per_loan: {formula: 'days_away + 1'}", 'is declared below this one'),
    ("fines_per_loan: {formula: 'last_visit + 1'}", '"last_visit" is a date; write days_since(last_visit'),
    ("fines_per_loan: {formula: 'bucket(fines_due, 5, 1)'}", "bucket() cut points must be strictly ascending"),
    ("fines_per_loan: {formula: 'fines_due > 1'}", "a formula is arithmetic on numbers"),
    ("fines_per_loan: {formula: 'membership * 2'}", '"membership" is not a number'),
])
def test_formula_mistakes_are_located(tmp_path: Path, broken: str, message: str) -> None:
    domain = LIBRARY.replace("fines_per_loan: {formula: fines_due / loans_open}", broken)
    errors = errors_of(library(tmp_path, domain))
    line = 1 + domain.splitlines().index("  " + broken)
    assert len(errors) == 1 and errors[0].startswith(f"domain.yaml:{line}:"), errors
    assert message.split(": ", 1)[-1] in errors[0]


@pytest.mark.parametrize("old, new, message", [
    ("desk: {direction: inbound}", "desk: {direction: sideways}", 'direction "sideways" is not inbound, outbound or both'),
    ("levels: [child, adult, senior]", "levels: [child, adult, adult]", '"adult" is listed twice'),
    ("visits_year: {type: number}", "visits_year: {type: numbr}", 'did you mean "number"'),
    ("visits_year: {type: number}", "channel: {type: number}", 'reserved by the rule language'),
    ("reminder: {needs_consent: false}", "reminder: {needs_consent: nope}", "expected true or false"),
])
def test_domain_mistakes_are_located_and_nothing_else_is_loaded(tmp_path: Path, old: str, new: str, message: str) -> None:
    errors = errors_of(library(tmp_path, LIBRARY.replace(old, new)))
    assert errors and all(e.startswith("domain.yaml:") for e in errors) and message in errors[0], errors


def test_quiet_hours_cover_every_outbound_channel(tmp_path: Path) -> None:
    quiet = "quiet_hours: {channels: [newsletter], from: '21:00', to: '08:00'}\n"
    errors = errors_of(library(tmp_path, contact=quiet))
    assert errors == ["contact.yaml:1:25: quiet hours must cover every outbound channel; missing: push; add them, "
                      "leave channels out (all outbound channels), or exempt one in domain.yaml with quiet_hours: false"]
    ruleset, errors = load_rules(library(tmp_path, contact="quiet_hours: {from: '21:00', to: '08:00'}\n"))
    assert not errors and ruleset.contact.quiet_hours.channels == {"newsletter", "push"}


def test_profiles_are_read_by_name_after_the_domain_changes(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "old").mkdir()
    old = load_rules(library(tmp_path / "old"))[0].schema
    grown = LIBRARY.replace("  visits_year: {type: number}\n",
                            "  visits_year: {type: number}\n  rooms_booked: {type: number, default: 2}\n")
    grown = grown.replace("levels: [child, adult, senior], default: adult", "levels: [child, adult, senior, student]")
    (tmp_path / "new").mkdir()
    new = load_rules(library(tmp_path / "new", grown))[0].schema
    store = ProfileStore.from_url(redis_url)
    try:
        profile = Profile("L1", np.array([3, 1.5, 30, 20_000], dtype=np.float32), {"membership": "senior"},
                          {"products": frozenset({"card"}), "consent": frozenset({"desk"})})
        store.save([profile], old)
        fresh = ProfileStore.from_url(redis_url)  # another process: knows the old layout only from nba:layouts
        read = fresh.fetch("L1", new)
        assert dict(zip(new.numeric, read.numeric.tolist())) == {
            "loans_open": 3.0, "fines_due": 1.5, "visits_year": 30.0, "rooms_booked": 2.0, "last_visit": 20_000.0}
        assert read.categorical == {"membership": "senior"} and read.sets["products"] == {"card"}
        assert fresh.fetch("L1", old).numeric.tolist() == [3.0, 1.5, 30.0, 20_000.0]
        store.client.hset(profile_key("L2"), mapping={"schema": 1, "layout": "0123456789ab", "num": b"\0" * 8})
        with pytest.raises(SchemaMismatch, match="nba:layouts does not hold"):
            fresh.fetch("L2", new)
        cold = fresh.fetch("nobody", new)
        assert not cold.found and cold.categorical == {"membership": ""} and cold.sets["consent"] == {"desk", "kiosk"}
        assert np.isnan(cold.numeric[new.numeric.index("last_visit")]) and cold.numeric[new.numeric.index("rooms_booked")] == 2
        fresh.client.close()
    finally:
        store.client.close()


def test_the_editor_schema_describes_domain_yaml() -> None:
    import json

    from engine.rules.domain import ATTRIBUTE_KEYS, CHANNEL_KEYS, DERIVED_KEYS, DOMAIN_KEYS, TYPE_KEYS

    from .test_rule_language import _validate, _yaml_as_json

    schema = json.loads((REPO / "rules" / "schema" / "domain.schema.json").read_text())
    demo = _yaml_as_json(REPO / "rules" / "domain.yaml")
    assert _validate(demo, schema, schema) == []
    demo["channels"]["web"]["direction"] = "sideways"
    assert len(_validate(demo, schema, schema)) == 1
    props = schema["properties"]
    assert set(props) == set(DOMAIN_KEYS)
    assert set(props["attributes"]["additionalProperties"]["properties"]) == set(ATTRIBUTE_KEYS)
    assert set(props["derived"]["additionalProperties"]["properties"]) == set(DERIVED_KEYS)
    assert set(props["channels"]["additionalProperties"]["properties"]) == set(CHANNEL_KEYS)
    assert set(props["action_types"]["additionalProperties"]["properties"]) == set(TYPE_KEYS)


@pytest.mark.parametrize("tenure, revenue, lines, expected", [
    (0, 500, 1, False), (10, 500, 2, True), (100, 500, 1, False), (0, 0, 0, False), (10, -500, 1, False),
    (1, 50, 0, False),  # margin / (num_lines - 1) = 5 / -1: below 0
])
def test_rules_may_divide_by_a_feature_and_zero_gives_zero(tmp_path: Path, tenure, revenue, lines, expected) -> None:
    import shutil

    shutil.copytree(REPO / "rules", tmp_path / "rules")
    rules_dir = tmp_path / "rules"
    condition = "revenue_12m / tenure_months > 10 and margin_12m / (num_lines - 1) >= 0"
    policies = rules_dir / "policies.yaml"
    policies.write_text(policies.read_text().replace("situations:\n", f"situations:\n  per_month: '{condition}'\n", 1))
    catalog = rules_dir / "catalog.yaml"
    catalog.write_text(catalog.read_text().replace("    group: brand\n", f"    group: brand\n    eligible: '{condition}'\n", 1))
    ruleset, errors = load_rules(rules_dir)
    assert not errors, errors
    with compile_rules(ruleset) as rules:
        fact = rules.build_fact(numbers={"tenure_months": tenure, "revenue_12m": revenue, "num_lines": lines,
                                         "margin_12m": 5}, channel="web", consents=["web"])
        outcome = rules.evaluate(fact)
        assert ("per_month" in outcome.situations) is expected  # durable-rules
        assert ("per_month" in rules.evaluate_python(fact).situations) is expected
        verdicts = {v.action.id: v for v in rules.verdicts(outcome, "web", now=at(3, "12:00"))}
        assert (verdicts["brand_newsletter_signup"].stage != "eligibility") is expected  # the vector program


def test_stored_layouts_are_counted_and_migrated_online(tmp_path: Path, redis_url: str) -> None:
    from engine.store.updates import apply_update, census, check_update, migrate_all

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = load_rules(library(tmp_path / "old"))[0].schema
    new = load_rules(library(tmp_path / "new", LIBRARY.replace(
        "  visits_year: {type: number}\n", "  rooms_booked: {type: number, default: 2}\n  visits_year: {type: number}\n")))[0].schema
    store = ProfileStore.from_url(redis_url)
    try:
        profiles = [Profile(f"M{i}", np.array([i, 0.5, 10 + i, 20_000], dtype=np.float32), {"membership": "adult"},
                            {"products": frozenset({"card"}), "consent": frozenset({"desk"})}) for i in range(30)]
        store.save(profiles, old)
        assert census(store, new) == {old.layout(): 30}
        # an update under the new schema migrates that one profile first, then writes
        apply_update(store, "M3", check_update(new, {"rooms_booked": 5}), new)
        assert census(store, new) == {old.layout(): 29, new.layout(): 1}
        migrated, unreadable = migrate_all(store, new)
        assert (migrated, unreadable) == (29, []) and census(store, new) == {new.layout(): 30}
        m3, m4 = store.fetch("M3", new), store.fetch("M4", new)
        assert m3.value("rooms_booked", new) == 5 and m4.value("rooms_booked", new) == 2
        assert m4.value("visits_year", new) == 14 and m4.value("loans_open", new) == 4
        assert migrate_all(store, new) == (0, [])  # nothing left to do
    finally:
        store.client.close()


def test_rule_tests_take_dates_as_dates(tmp_path: Path) -> None:
    from engine.authoring.check import test as run_tests

    rules_dir = library(tmp_path)
    (rules_dir / "catalog.yaml").write_text(CATALOG.replace(
        "    eligible: 'membership", "    eligible: 'days_away > 30 and membership"))
    (rules_dir / "tests").mkdir()
    (rules_dir / "tests" / "dates.yaml").write_text(textwrap.dedent("""\
        tests:
          - name: a reader away for a while is invited
            channel: desk
            today: 2026-06-15
            profile: {last_visit: 2026-03-01, loans_open: 1, visits_year: 20, membership: adult, consents: [desk]}
            expect: {admitted: [reading_club]}
          - name: one seen last week is not
            channel: desk
            today: 2026-06-15
            profile: {last_visit: 2026-06-08, loans_open: 1, visits_year: 20, membership: adult, consents: [desk]}
            expect: {blocked: {reading_club: eligible}}
          - name: a date is a date
            channel: desk
            profile: {last_visit: yesterday}
            expect: {admitted: [renew_reminder]}
        """))
    rules, errors, results = run_tests(rules_dir)
    assert [str(e).split(": ", 1)[1] for e in errors] == [
        "expected a date for last_visit; write it as YYYY-MM-DD, e.g. 2026-01-31"]
    (rules_dir / "tests" / "dates.yaml").write_text(
        (rules_dir / "tests" / "dates.yaml").read_text().split("  - name: a date is a date")[0])
    rules, errors, results = run_tests(rules_dir)
    assert not errors and [r.passed for r in results] == [True, True], [r.as_error() for r in results]
    assert rules is not None
    rules.close()


def test_any_set_attribute_can_be_tested_with_has(tmp_path: Path) -> None:
    domain = LIBRARY.replace("  products: {type: set, members: [card, ebook, study_room]}\n",
                             "  products: {type: set, members: [card, ebook, study_room]}\n"
                             "  genres: {type: set, members: [crime, poetry, science]}\n")
    rules_dir = library(tmp_path, domain)
    catalog = rules_dir / "catalog.yaml"
    catalog.write_text(catalog.read_text().replace("eligible: 'membership", "eligible: 'has(genres, \"crime\") and membership"))
    ruleset, errors = load_rules(rules_dir)
    assert not errors, errors
    assert "genres__crime" in model_input(ruleset.schema).customer_features
    with compile_rules(ruleset) as rules:
        reader = np.array([4, 2, 20, np.nan], dtype=np.float32)
        derived = derive(reader, ruleset.schema, at(3, "12:00"))
        for genres, admitted in (({"crime", "poetry"}, True), ({"poetry"}, False), (set(), False)):
            fact = rules.build_fact(numbers=np.concatenate((reader, derived)), categories={"membership": "adult"},
                                    channel="desk", consents=["desk"], sets={"genres": genres})
            verdict = {v.action.id: v for v in rules.verdicts(rules.evaluate(fact), "desk", now=at(3, "12:00"))}
            assert verdict["reading_club"].admitted is admitted, genres
    for wrong, message in (('has(genre, "crime")', '"genre" is not a set attribute; did you mean "genres"?'),
                           ('has(genres, "krime")', 'unknown member "krime" of genres; did you mean "crime"?'),
                           ('genres == "crime"', '"genres" is a set; use has(genres, "...") to test membership')):
        catalog.write_text(CATALOG.replace("eligible: 'membership", f"eligible: '{wrong} and membership"))
        assert [e.split(": ", 1)[1] for e in errors_of(rules_dir)] == [message]
