"""Quiet hours postpone outbound actions to the end of the window (rules/contact.yaml: email and sms,
21:00-08:00 UTC in the demo rules), through a real App on a real Redis with a clock the test moves."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis

from engine.config import Config
from engine.events.processor import OUTBOUND_STREAM, TIMERS_KEY, OutboundBusy, outbound_key
from engine.events.timers import TimerPoller
from engine.serving.app import App
from engine.sim.telco import NUMERIC, SCHEMA
from engine.store.profiles import Profile, redis_client
from engine.store.slots import customer_shard_key

from . import shards
from .clock import Clock, at, utc
from .conftest import RULES_DIR

pytestmark = pytest.mark.both_redis


@pytest.fixture()
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES_DIR, target)
    return target


def _app(redis_url: str, models_dir: Path, rules_dir: Path, clock: Clock) -> App:
    return App(Config(redis_url=redis_url, rules_dir=rules_dir, models_dir=models_dir, demo=False,
                      metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0), clock=clock).start()


def _profile(app: App, customer: str) -> None:
    numeric = np.zeros(len(NUMERIC), dtype=np.float32)
    for name, value in {"tenure_months": 24, "monthly_spend": 40, "data_allowance_gb": 20, "data_usage_gb": 8,
                        "credit_score": 700}.items():
        numeric[NUMERIC.index(name)] = value
    app.store.save([Profile(customer, numeric, {"plan": "standard", "segment": "consumer",
                                                "lifecycle_stage": "satisfied", "value_tier": "B",
                                                "region": "north", "device_os": "ios"},
                            {"products": frozenset({"mobile"}),
                             "consent": frozenset({"web", "call_center", "email", "sms", "mobile_app"})})], SCHEMA)


def _outbound(client: redis.Redis) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for fields in shards.entries(client, OUTBOUND_STREAM)]


def _timers(client: redis.Redis) -> list[tuple[dict, float]]:
    return [(json.loads(m), score) for m, score in shards.zrange(client, TIMERS_KEY)]


def test_quiet_hours_postpone_an_outbound_email_and_a_restart_sends_it_once(
        redis_url: str, models_dir: Path, rules_dir: Path) -> None:
    client = redis_client(redis_url)
    clock = Clock(at(0, "21:30"))
    app = _app(redis_url, models_dir, rules_dir, clock)
    try:
        _profile(app, "Q1")
        assert not app.events.publish("pay-1", "Q1", "payment_failed", {"amount": "20"}).patterns
        clock.now = at(0, "22:00")
        done = app.events.publish("pay-2", "Q1", "payment_failed", {"amount": "35"})
        assert done.patterns == ["repeated_payment_failure"] and done.raised == ["payment_failed"]
        (out,) = done.outbound
        assert (out.status, out.action_id, out.channel, out.decision_id) == ("postponed", "payment_help_plan", "email", "")
        assert out.reason == f"quiet hours 21:00-08:00 on email: postponed to {utc(at(1, '08:00'))}"
        assert _outbound(client) == []
        ((timer, due),) = _timers(client)
        assert due == at(1, "08:00") * 1000
        assert (timer["k"], timer["c"], timer["p"], timer["e"]) == ("outbound", "Q1", "repeated_payment_failure", "pay-2")
        assert timer["x"] == at(14, "22:00") * 1000  # the trigger's expiry: 22:00 + 14 days
        # (4) the same event again is a duplicate: no second outbound, no second timer
        replay = app.events.publish("pay-2", "Q1", "payment_failed", {"amount": "35"})
        assert replay.duplicate and not replay.outbound
        assert len(_timers(client)) == 1
        # nothing is due before the window ends
        clock.now = at(1, "07:59")
        assert TimerPoller(app.store.client, app.events.on_timer, clock=clock).poll_once() == 0
    finally:
        app.close()

    # the postponed outbound is only in Redis: a new App on the same Redis sends it after 08:00
    clock.now = at(1, "08:00:01")
    app = _app(redis_url, models_dir, rules_dir, clock)
    try:
        ((timer, _),) = _timers(client)
        member = json.dumps(timer, separators=(",", ":"))
        assert client.zscore(customer_shard_key(TIMERS_KEY, "Q1", client), member) is not None

        # two workers run the same timer at once (a lease ran out): one sends, the other sends nothing
        def run(_: int) -> list:
            try:
                return app.events.on_timer(member).outbound
            except OutboundBusy:
                return []

        with ThreadPoolExecutor(2) as pool:
            results = [r for rs in pool.map(run, range(2)) for r in rs]
        assert [r.status for r in results if r.status == "sent"] == ["sent"]
        (sent,) = _outbound(client)
        (first,) = [r for r in results if r.status == "sent"]
        assert first.decision_id and sent["decision_id"] == first.decision_id
        assert (sent["customer_id"], sent["action_id"], sent["channel"], sent["pattern"], sent["event_id"]) == (
            "Q1", "payment_help_plan", "email", "repeated_payment_failure", "pay-2")
        assert float(sent["ts"]) == pytest.approx(at(1, "08:00:01"))
        assert client.get(outbound_key("Q1", "repeated_payment_failure", "pay-2")) == b"sent"
        # the poller still holds the timer: it runs it once more (nothing is sent) and removes it
        poller = TimerPoller(app.store.client, app.events.on_timer, clock=clock)
        assert poller.poll_once() == 1
        assert poller.poll_once() == 0
        assert len(_outbound(client)) == 1 and _timers(client) == []
    finally:
        app.close()


def test_a_postponed_run_that_lands_in_quiet_hours_again_is_postponed_again(
        redis_url: str, models_dir: Path, rules_dir: Path) -> None:
    """The poller's clock says 08:00:01, the deciding worker's clock is behind (still quiet): postponed
    again to the same window end, under a new timer member the poller does not remove."""
    client = redis_client(redis_url)
    clock = Clock(at(0, "22:00"))
    app = _app(redis_url, models_dir, rules_dir, clock)
    try:
        _profile(app, "Q2")
        app.events.publish("pay-1", "Q2", "payment_failed", {"amount": "20"})
        (out,) = app.events.publish("pay-2", "Q2", "payment_failed", {"amount": "20"}).outbound
        assert out.status == "postponed"
        clock.now = at(1, "07:59:30")
        ahead = TimerPoller(app.store.client, app.events.on_timer, clock=Clock(at(1, "08:00:01")))
        assert ahead.poll_once() == 1
        assert _outbound(client) == []
        ((timer, due),) = _timers(client)
        assert due == at(1, "08:00") * 1000 and timer["n"] == 2
        clock.now = at(1, "08:00:02")
        assert TimerPoller(app.store.client, app.events.on_timer, clock=clock).poll_once() == 1
        assert [o["action_id"] for o in _outbound(client)] == ["payment_help_plan"]
        assert _timers(client) == []
    finally:
        app.close()


def test_a_trigger_that_expires_before_the_window_ends_is_suppressed(
        redis_url: str, models_dir: Path, rules_dir: Path) -> None:
    events = rules_dir / "events.yaml"
    text = events.read_text()
    assert "raise: {trigger: data_cap_near, ttl: 3d}" in text
    events.write_text(text.replace("raise: {trigger: data_cap_near, ttl: 3d}", "raise: {trigger: data_cap_near, ttl: 2h}"))
    client = redis_client(redis_url)
    clock = Clock(at(0, "22:00"))
    app = _app(redis_url, models_dir, rules_dir, clock)
    try:
        _profile(app, "Q3")
        reply = app.events.publish("use-1", "Q3", "data_usage", {"used_ratio": "0.93"})
        (out,) = reply.outbound
        assert (out.status, out.action_id, out.channel) == ("suppressed", "upsell_extra_data", "sms")
        assert out.reason == (f"quiet hours 21:00-08:00 on sms until {utc(at(1, '08:00'))}: the trigger's time to live "
                              f"ends first ({utc(at(1))}), not postponed")
        assert reply.raised == ["data_cap_near"]
        assert _timers(client) == [] and _outbound(client) == []
        assert client.get(outbound_key("Q3", "data_cap_near", "use-1")) == b"done"
        # outside quiet hours the same pattern sends at once
        clock.now = at(1, "12:00")
        (out,) = app.events.publish("use-2", "Q3", "data_usage", {"used_ratio": "0.95"}).outbound
        assert out.status == "sent" and out.decision_id
        assert [o["event_id"] for o in _outbound(client)] == ["use-2"]
    finally:
        app.close()


def test_a_postponed_outbound_whose_trigger_was_cleared_overnight_is_not_sent(
        redis_url: str, models_dir: Path, rules_dir: Path) -> None:
    client = redis_client(redis_url)
    clock = Clock(at(0, "21:30"))
    app = _app(redis_url, models_dir, rules_dir, clock)
    try:
        _profile(app, "Q9")
        app.events.publish("pay-1", "Q9", "payment_failed", {"amount": "20"})
        clock.now = at(0, "22:00")
        (out,) = app.events.publish("pay-2", "Q9", "payment_failed", {"amount": "35"}).outbound
        assert out.status == "postponed"
        clock.now = at(0, "23:00")
        assert app.events.publish("paid", "Q9", "payment_received", {"amount": "55"}).cleared == ["payment_failed"]
        clock.now = at(1, "08:00:01")
        ((timer, _),) = _timers(client)
        (result,) = app.events.on_timer(json.dumps(timer, separators=(",", ":"))).outbound
        assert result.status == "suppressed" and result.reason == "trigger payment_failed was cleared before the postponed send"
        assert _outbound(client) == []
        assert client.get(outbound_key("Q9", "repeated_payment_failure", "pay-2")) == b"done"
    finally:
        app.close()
