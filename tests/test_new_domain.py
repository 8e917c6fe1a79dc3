"""A business the code has never seen, end to end: its domain.yaml (attributes, derived features,
channels and action types invented here), customers imported from Parquet and CSV, a first model trained
from an imported history, decisions over gRPC on its own channels, responses recorded on them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import numpy as np
import pyarrow.csv as pacsv
import pytest

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.store.profiles import RESPONSES_STREAM

from .clock import at

pytestmark = pytest.mark.service

DOMAIN = """\
description: A public library lending books, e-books and study rooms.
attributes:
  loans_open: {type: number, min: 0, max: 50}
  loans_year: {type: number, min: 0, max: 1000}
  fines_due: {type: number, min: 0, max: 500}
  events_attended: {type: number, min: 0, max: 100}
  last_visit: {type: date}
  member_since: {type: date}
  membership: {type: category, levels: [child, adult, senior, student], default: adult}
  branch_area: {type: category, levels: [centre, north, south]}
  products: {type: set, members: [card, ebook_pass, study_room, museum_pass]}
derived:
  fines_per_loan: {formula: fines_due / loans_open}
  reading_band: {formula: 'bucket(loans_year, 4, 12, 52)'}
  days_away: {formula: 'days_since(last_visit, 9999)'}
  member_years: {formula: 'days_since(member_since, 0) / 365'}
channels:
  desk: {direction: inbound}
  kiosk: {direction: inbound}
  library_app: {direction: both, quiet_hours: false}
  newsletter: {direction: outbound}
action_types:
  reminder: {needs_consent: false}
  event_invite: {}
  membership_offer: {}
"""
CATALOG = """\
fallback: {default: renew_card}
actions:
  - id: renew_card
    name: Renew your card
    type: reminder
    group: care
    value: 1
    channels: {desk: {script: "Renew?"}, kiosk: {text: "Renew"}, library_app: {title: "Renew"}, newsletter: {subject: "Renew"}}
  - id: pay_fines
    name: Pay your fines online
    type: reminder
    group: care
    value: 3
    eligible: 'fines_due > 0'
    channels: {desk: {script: "You have fines"}, kiosk: {text: "Pay here"}, library_app: {title: "Fines"}}
  - id: reading_club
    name: Reading club
    type: event_invite
    group: events
    value: 5
    eligible: 'reading_band >= 3 and fines_per_loan < 2'
    channels: {desk: {script: "Join the club"}, kiosk: {text: "Club"}, library_app: {title: "Club"}, newsletter: {subject: "Club"}}
  - id: ebook_pass_offer
    name: E-book pass
    type: membership_offer
    group: offers
    value: 12
    eligible: 'not holds("ebook_pass") and member_years >= 1'
    channels: {desk: {script: "E-books?"}, kiosk: {text: "E-books"}, library_app: {title: "E-books"}, newsletter: {subject: "E-books"}}
  - id: welcome_back
    name: We missed you
    type: event_invite
    group: events
    value: 4
    eligible: 'days_away > 180'
    channels: {library_app: {title: "Welcome back"}, newsletter: {subject: "We missed you"}}
"""
POLICIES = """\
situations:
  owes_a_lot: 'fines_due > 50'
policies:
  - name: no_offers_with_big_fines
    when: owes_a_lot
    blocks: {types: [membership_offer]}
    reason: Settle fines first
"""
CONTACT = """\
contact_policies:
  - {name: one_newsletter_a_week, max: 1, days: 7, channels: [newsletter]}
quiet_hours: {from: "21:00", to: "08:00"}
"""


def library(tmp_path: Path) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in (("domain.yaml", DOMAIN), ("catalog.yaml", CATALOG), ("policies.yaml", POLICIES),
                       ("contact.yaml", CONTACT)):
        (rules / name).write_text(textwrap.dedent(text))
    return rules


def test_a_library_imports_its_customers_trains_on_its_history_and_decides(redis_url: str, tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2

    from engine.analytics.past import fill_contacts, read_past, training_set
    from engine.config import Config
    from engine.models.registry import ModelRegistry
    from engine.models.training import fit
    from engine.rules.loader import load_rules
    from engine.serving.app import App
    from engine.serving.server import build_server
    from engine.sim import datagen
    from engine.store.bulk import import_customers
    from engine.store.profiles import ProfileStore

    rules_dir = library(tmp_path)
    ruleset, errors = load_rules(rules_dir)
    assert not errors, errors
    schema = ruleset.schema
    now = at(3, "12:00")
    people = datagen.customers(schema, 400, seed=4, now=now, prefix="L")
    datagen.write(people.slice(0, 200), tmp_path / "first.parquet")
    datagen.write(people.slice(200), tmp_path / "second.csv")
    store = ProfileStore.from_url(redis_url)
    try:
        for name in ("first.parquet", "second.csv"):
            report = import_customers(store, tmp_path / name, schema)
            assert report.loaded == 200 and not report.rejected, report.render()
        past = datagen.history(schema, ruleset.actions, people, 6, seed=5, now=now)
        pacsv.write_csv(past, tmp_path / "history.csv")
        history = read_past(tmp_path / "history.csv", ruleset, now)
        assert not history.rejected and len(history.offers) == past.num_rows
        assert fill_contacts(store.client, ruleset, history.offers, now) > 0
        data = training_set(store, ruleset, history.offers, now)
        assert data.summary["customers_stored"] == 400 and 0 < data.y.mean() < 1
        booster, metrics, summary = fit(data, rounds=30)
        assert metrics["holdout_auc"] > 0.55  # the history carries signal the model finds
        registry = ModelRegistry(tmp_path / "models", schema)
        version = registry.save(booster.model_to_string(), list(data.actions), metrics, summary)
        registry.promote(version)
    finally:
        store.client.close()

    app = App(Config(redis_url=redis_url, rules_dir=rules_dir, models_dir=tmp_path / "models", demo=False,
                     metrics_port=0, rules_watch_seconds=0), clock=lambda: now).start()
    server, port, health = build_server(app, "127.0.0.1:0")
    server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.DecisionServiceStub(channel)
        seen: dict[str, int] = {}
        for i in range(0, 400, 7):
            reply = stub.Decide(pb.DecideRequest(customer_id=f"L{i:07d}", channel_name="desk", explain=True), timeout=10)
            assert not reply.cold_start and reply.model_version == version and reply.actions
            assert all(a.treatment.channel_name == "desk" and a.type_name in schema.type_names for a in reply.actions)
            for a in reply.actions:
                seen[a.action_id] = seen.get(a.action_id, 0) + 1
                assert 0 < a.propensity < 1
        assert len(seen) >= 3  # the derived-feature rules pick different actions for different readers
        kiosk = stub.Decide(pb.DecideRequest(customer_id="L0000001", channel_name="kiosk"), timeout=10)
        stub.RecordResponse(pb.RecordResponseRequest(decision_id=kiosk.decision_id,
                                                     action_id=kiosk.actions[0].action_id,
                                                     outcome=pb.OUTCOME_ACCEPTED), timeout=10)
        entries = app.store.client.xrange(RESPONSES_STREAM)
        assert any(f[b"decision_id"].decode() == kiosk.decision_id for _, f in entries)
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(pb.DecideRequest(customer_id="L0000001", channel=pb.CHANNEL_WEB), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "desk, kiosk" in err.value.details()
        assert np.isfinite(reply.actions[0].priority)
    finally:
        channel.close()
        server.stop(0).wait()
        app.close()


def test_the_command_line_brings_a_library_in(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.cli import main
    from engine.rules.loader import load_rules
    from engine.sim import datagen

    rules_dir = library(tmp_path)
    ruleset, _ = load_rules(rules_dir)
    people = datagen.customers(ruleset.schema, 300, seed=8, prefix="L")
    datagen.write(people, tmp_path / "people.csv")
    history = datagen.history(ruleset.schema, ruleset.actions, people, 5, seed=9)
    rows = history.to_pylist()
    rows[3]["channel"] = "fax"  # a bad row among good ones
    pacsv.write_csv(history.from_pylist(rows, schema=history.schema), tmp_path / "history.csv")
    where = ["--redis-url", redis_url, "--rules-dir", str(rules_dir)]
    assert main(["import", "customers", str(tmp_path / "people.csv"), *where]) == 0
    assert "300 of 300 rows loaded" in capsys.readouterr().out
    assert main(["import", "history", str(tmp_path / "history.csv"), *where]) == 1  # one row rejected
    out = capsys.readouterr().out
    assert f"{len(rows) - 1:,} of {len(rows):,} rows read; 1 rows rejected" in out and "history.csv:4:channel" in out
    assert main(["train", "--from-history", str(tmp_path / "history.csv"), "--models-dir", str(tmp_path / "models"),
                 "--rounds", "20", *where]) == 0
    assert "imported history" in capsys.readouterr().out
    assert (tmp_path / "models" / "propensity" / "CHAMPION").is_file()
    assert main(["profiles", "layouts", *where]) == 0
    assert f"{ruleset.schema.layout()}          300  current" in capsys.readouterr().out
    assert main(["train", "--models-dir", str(tmp_path / "models"), *where]) == 1  # no synthetic world for a library
    assert "the synthetic world is the telco demo's" in capsys.readouterr().err
