"""Quiet hours postpone outbound actions to the end of the window (rules/contact.yaml: email and sms,
21:00-08:00 UTC in the demo rules), through a real App on a real Redis with a clock the test moves; the
window on the customer's own clock (an IANA zone, daylight saving time included), and zone mistakes
reported at file:line:col."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis

from engine.config import Config
from engine.decision.request import DecideInput
from engine.events.processor import OUTBOUND_STREAM, TIMERS_KEY, OutboundBusy, outbound_key
from engine.events.timers import TimerPoller
from engine.rules.contact import QuietHours
from engine.rules.loader import load_rules
from engine.rules.timezones import LocalClock, find_zone, offset_at
from engine.serving.app import App
from engine.sim.telco import NUMERIC, SCHEMA
from engine.store.profiles import Profile, redis_client
from engine.store.slots import customer_shard_key

from . import shards
from .clock import Clock, at, utc
from .conftest import RULES_DIR
from .test_domain import LIBRARY, library

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
        assert out.reason == f"quiet hours 21:00-08:00 UTC on email: postponed to {utc(at(1, '08:00'))}"
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
        assert out.reason == (f"quiet hours 21:00-08:00 UTC on sms until {utc(at(1, '08:00'))}: the trigger's time to live "
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


# --- time zones: the window on the customer's wall clock, daylight saving time included ----------------
# Daylight saving time is a matter of calendar dates, so these use fixed instants (their tz rules are in
# the past or fixed by law, and nothing here reads the real clock); the tests through Redis use zones
# without daylight saving time at moments of tests/clock.py.

def _instant(text: str) -> float:
    """``2026-03-29 01:00`` UTC as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S" if text.count(":") == 2 else "%Y-%m-%d %H:%M").replace(
        tzinfo=UTC).timestamp()


def _window(zone: str, start: str = "21:00", end: str = "08:00") -> tuple[QuietHours, LocalClock]:
    tz = find_zone(zone)
    assert tz is not None
    clock = LocalClock(zone, tz)
    h1, m1 = (int(p) for p in start.split(":"))
    h2, m2 = (int(p) for p in end.split(":"))
    return QuietHours(frozenset({"email"}), h1 * 60 + m1, h2 * 60 + m2, clock), clock


def test_amsterdam_quiet_hours_follow_summer_time() -> None:
    quiet, _ = _window("Europe/Amsterdam")
    # winter (UTC+1): 21:00-08:00 local is 20:00-07:00 UTC
    assert not quiet.quiet("email", _instant("2026-01-15 19:59:59"))
    assert quiet.quiet("email", _instant("2026-01-15 20:00"))
    assert quiet.quiet("email", _instant("2026-01-16 06:59:59"))
    assert not quiet.quiet("email", _instant("2026-01-16 07:00"))
    assert not quiet.quiet("web", _instant("2026-01-15 23:00"))  # not a quiet channel
    # summer (UTC+2): 19:00-06:00 UTC
    assert not quiet.quiet("email", _instant("2026-07-15 18:59"))
    assert quiet.quiet("email", _instant("2026-07-15 19:00"))
    assert not quiet.quiet("email", _instant("2026-07-16 06:00"))
    assert quiet.describe() == "21:00-08:00 Europe/Amsterdam"


def test_amsterdam_nights_when_the_clocks_change() -> None:
    quiet, _ = _window("Europe/Amsterdam")
    # last Sunday of March 2026: 02:00 CET becomes 03:00 CEST (01:00 UTC); the night is an hour shorter
    evening = _instant("2026-03-28 20:30")  # 21:30 CET
    assert quiet.quiet("email", evening)
    assert quiet.ends_after(evening) == _instant("2026-03-29 06:00")  # 08:00 CEST
    assert quiet.quiet("email", _instant("2026-03-29 05:59:59")) and not quiet.quiet("email", _instant("2026-03-29 06:00"))
    # last Sunday of October 2026: 03:00 CEST becomes 02:00 CET (01:00 UTC); the night is an hour longer
    evening = _instant("2026-10-24 20:00")  # 22:00 CEST
    assert quiet.ends_after(evening) == _instant("2026-10-25 07:00")  # 08:00 CET
    assert quiet.quiet("email", _instant("2026-10-25 06:59:59")) and not quiet.quiet("email", _instant("2026-10-25 07:00"))
    # asked after the change, the same window ends at the same moment
    assert quiet.ends_after(_instant("2026-10-25 03:00")) == _instant("2026-10-25 07:00")


def test_a_window_that_ends_in_the_skipped_or_the_repeated_hour() -> None:
    quiet, _ = _window("Europe/Amsterdam", "21:00", "02:30")
    # 02:30 does not exist on 29 March: the window ends when the clocks jump from 02:00 to 03:00
    assert quiet.quiet("email", _instant("2026-03-29 00:59:59"))  # 01:59:59 CET
    assert not quiet.quiet("email", _instant("2026-03-29 01:00"))  # 03:00 CEST
    assert quiet.ends_after(_instant("2026-03-29 00:40")) == _instant("2026-03-29 01:00")
    # 02:00-03:00 happens twice on 25 October: quiet until the first 02:30, and again in the repeated half hour
    assert quiet.ends_after(_instant("2026-10-25 00:10")) == _instant("2026-10-25 00:30")  # 02:10 CEST -> 02:30 CEST
    assert not quiet.quiet("email", _instant("2026-10-25 00:45"))  # 02:45 CEST
    assert quiet.quiet("email", _instant("2026-10-25 01:10"))  # 02:10 CET, the second time
    assert quiet.ends_after(_instant("2026-10-25 01:10")) == _instant("2026-10-25 01:30")  # 02:30 CET


def test_south_of_the_equator_summer_time_runs_october_to_april() -> None:
    quiet, _ = _window("Australia/Sydney")
    # January is summer (UTC+11): 21:00 local is 10:00 UTC; July is winter (UTC+10): 11:00 UTC
    assert quiet.quiet("email", _instant("2026-01-15 10:00")) and not quiet.quiet("email", _instant("2026-01-15 09:59"))
    assert quiet.quiet("email", _instant("2026-07-15 11:00")) and not quiet.quiet("email", _instant("2026-07-15 10:59"))
    # first Sunday of October 2026: 02:00 AEST becomes 03:00 AEDT (16:00 UTC on the 3rd)
    evening = _instant("2026-10-03 11:00")  # 21:00 AEST
    assert quiet.ends_after(evening) == _instant("2026-10-03 21:00")  # 08:00 AEDT: 10 hours later, not 11
    # first Sunday of April 2026: 03:00 AEDT becomes 02:00 AEST (16:00 UTC on the 4th)
    evening = _instant("2026-04-04 10:00")  # 21:00 AEDT
    assert quiet.ends_after(evening) == _instant("2026-04-04 22:00")  # 08:00 AEST: 12 hours later


def test_half_hour_zones_and_a_half_hour_clock_change() -> None:
    quiet, _ = _window("Asia/Kolkata")  # UTC+5:30 all year
    assert quiet.quiet("email", _instant("2026-01-15 15:30")) and not quiet.quiet("email", _instant("2026-01-15 15:29:59"))
    assert quiet.ends_after(_instant("2026-01-15 15:30")) == _instant("2026-01-16 02:30")
    # Lord Howe Island moves its clocks by half an hour, at 15:30 UTC: inside a cached UTC hour
    quiet, clock = _window("Australia/Lord_Howe", "02:15", "08:00")
    before, after = _instant("2026-10-03 15:10"), _instant("2026-10-03 15:40")
    assert clock.offset(before) == 10.5 * 3600 and clock.offset(after) == 11 * 3600
    assert not quiet.quiet("email", before)  # 01:40 LHST
    assert quiet.quiet("email", after)  # 02:40 LHDT: 02:00-02:30 was skipped
    assert quiet.ends_after(_instant("2026-10-03 15:29:59")) == _instant("2026-10-03 15:29:59")


def test_the_cached_offset_equals_zoneinfo_around_every_transition() -> None:
    """Every 7 minutes and 13 seconds across a year of transitions, in zones with whole-hour, half-hour
    and 45-minute offsets: the per-hour cache answers what zoneinfo answers."""
    start = _instant("2026-03-20 00:00")
    for zone in ("Europe/Amsterdam", "America/New_York", "Australia/Sydney", "Australia/Lord_Howe",
                 "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham", "America/St_Johns"):
        tz = find_zone(zone)
        assert tz is not None
        clock = LocalClock(zone, tz)
        for i in range(0, 230 * 86_400, 433 * 7):
            assert clock.offset(start + i) == offset_at(tz, start + i), (zone, start + i)


def test_the_customers_zone_overrides_the_default_one() -> None:
    default, _ = _window("Europe/Amsterdam")
    tokyo = LocalClock("Asia/Tokyo", find_zone("Asia/Tokyo"))  # type: ignore[arg-type]
    quiet = QuietHours(default.channels, default.start, default.end, default.clock, "time_zone", {"Asia/Tokyo": tokyo})
    noon_utc = _instant("2026-01-15 12:00")  # 13:00 in Amsterdam, 21:00 in Tokyo
    assert quiet.clock_for({"time_zone": "Asia/Tokyo"}) is tokyo
    assert quiet.quiet("email", noon_utc, quiet.clock_for({"time_zone": "Asia/Tokyo"}))
    assert quiet.ends_after(noon_utc, tokyo) == _instant("2026-01-15 23:00")  # 08:00 in Tokyo
    for unknown in ({"time_zone": ""}, {"time_zone": "unknown"}, {"time_zone": "Mars/Olympus"}, {}):
        assert quiet.clock_for(unknown) is quiet.clock
        assert not quiet.quiet("email", noon_utc, quiet.clock_for(unknown))
    assert quiet.describe(tokyo) == "21:00-08:00 Asia/Tokyo"


def test_the_customers_clock_is_cheap_per_decision() -> None:
    """What quiet hours add to a decision: the customer's clock, then the window test. About 0.5 us on
    the 2-core VM (a cached offset; zoneinfo alone costs as much again); bounded generously here so a
    busy CI machine does not fail it."""
    quiet, clock = _window("Europe/Amsterdam")
    quiet = QuietHours(quiet.channels, quiet.start, quiet.end, clock, "time_zone", {"Europe/Amsterdam": clock})
    profile = {"time_zone": "Europe/Amsterdam"}
    now = _instant("2026-03-29 00:30")
    n = 20_000
    began = time.perf_counter()
    for i in range(n):
        quiet.quiet("email", now + i * 0.01, quiet.clock_for(profile))
    per_call = (time.perf_counter() - began) / n
    assert per_call < 20e-6, per_call


ZONE_ATTRIBUTE = "  time_zone: {type: category, levels: [unknown, UTC, Asia/Tokyo, Asia/Kolkata], default: unknown}\n"


def zoned_rules(rules_dir: Path) -> Path:
    """The demo rules with a customer time zone: an attribute in domain.yaml, named in contact.yaml."""
    domain = rules_dir / "domain.yaml"
    text = domain.read_text()
    domain.write_text(text.replace("  products:\n", ZONE_ATTRIBUTE + "  products:\n", 1))
    contact = rules_dir / "contact.yaml"
    text = contact.read_text()
    assert "  time_zone: UTC " in text
    contact.write_text(text.replace("  time_zone: UTC ", "  customer_time_zone: time_zone\n  time_zone: UTC ", 1))
    return rules_dir


def _zoned_profile(app: App, customer: str, zone: str) -> None:
    schema = app.rules.current.schema
    numeric = np.zeros(len(schema.numeric), dtype=np.float32)
    for name, value in {"tenure_months": 24, "monthly_spend": 40, "data_allowance_gb": 20, "data_usage_gb": 8,
                        "credit_score": 700}.items():
        numeric[schema.numeric.index(name)] = value
    app.store.save([Profile(customer, numeric, {"plan": "standard", "segment": "consumer",
                                                "lifecycle_stage": "satisfied", "value_tier": "B",
                                                "region": "north", "device_os": "ios", "time_zone": zone},
                            {"products": frozenset({"mobile"}),
                             "consent": frozenset({"web", "call_center", "email", "sms", "mobile_app"})})], schema)


def test_the_customers_own_zone_decides_and_postpones_to_its_morning(
        redis_url: str, models_dir: Path, rules_dir: Path) -> None:
    """Tokyo is UTC+9 all year: at 13:30 UTC it is 22:30 there. The Tokyo customer's e-mail waits for 08:00
    Tokyo time (23:00 UTC); customers with no zone, or a value that is not one, are on the default (UTC)
    clock and get theirs at once."""
    client = redis_client(redis_url)
    clock = Clock(at(0, "13:30"))
    app = _app(redis_url, models_dir, zoned_rules(rules_dir), clock)
    try:
        for customer, zone in (("Z1", "Asia/Tokyo"), ("Z2", "unknown"), ("Z3", "Mars/Olympus"), ("Z4", "")):
            _zoned_profile(app, customer, zone)
            app.events.publish(f"{customer}-pay-1", customer, "payment_failed", {"amount": "20"})
            (out,) = app.events.publish(f"{customer}-pay-2", customer, "payment_failed", {"amount": "35"}).outbound
            if customer == "Z1":
                assert out.status == "postponed"
                assert out.reason == f"quiet hours 21:00-08:00 Asia/Tokyo on email: postponed to {utc(at(0, '23:00'))}"
            else:
                assert out.status == "sent", (customer, out)
        ((timer, due),) = _timers(client)
        assert (timer["c"], due) == ("Z1", at(0, "23:00") * 1000)
        assert sorted(o["customer_id"] for o in _outbound(client)) == ["Z2", "Z3", "Z4"]
        # a decision on e-mail says so in its funnel; 08:30 in Tokyo is 23:30 UTC: quiet for UTC, not for Tokyo
        clock.now = at(0, "23:30")
        tokyo = app.engine.decide(DecideInput("Z1", "email", explain=True, preview=True))
        utc_customer = app.engine.decide(DecideInput("Z2", "email", explain=True, preview=True))
        assert tokyo.actions and tokyo.quiet_until == 0.0
        assert not utc_customer.actions and utc_customer.quiet_until == at(1, "08:00")
        assert {f.detail for f in utc_customer.funnel if f.stage == "quiet_hours"} == {"quiet hours 21:00-08:00 UTC on email"}
    finally:
        app.close()


def test_rule_tests_set_the_customers_zone_like_any_attribute(capsys, rules_dir: Path) -> None:
    from engine.cli import main

    zoned_rules(rules_dir)
    tests = rules_dir / "tests" / "scenarios.yaml"
    text = tests.read_text()
    tests.write_text(text.replace("  products: [mobile, broadband]\n", "  products: [mobile, broadband]\n  time_zone: Asia/Kolkata\n", 1))
    assert main(["rules", "test", str(rules_dir)]) == 0, capsys.readouterr().out
    tests.write_text(text.replace("  products: [mobile, broadband]\n", "  products: [mobile, broadband]\n  time_zone: Asia/Calcuta\n", 1))
    assert main(["rules", "test", str(rules_dir)]) != 0
    assert 'Asia/Calcuta' in capsys.readouterr().out


def _load_errors(rules_dir: Path) -> list[str]:
    _, errors = load_rules(rules_dir)
    return [str(e).replace(str(rules_dir) + "/", "") for e in errors]


QUIET = "quiet_hours:\n  from: '21:00'\n  to: '08:00'\n"


@pytest.mark.parametrize(("domain_edit", "quiet", "expected"), [
    (None, "  time_zone: Europe/Amsterdan\n",
     'contact.yaml:4:14: quiet_hours time_zone "Europe/Amsterdan" is not an IANA time zone; did you mean "Europe/Amsterdam"?'),
    (None, "  time_zone: 'Europe/Amsterdam '\n",
     'contact.yaml:4:14: quiet_hours time_zone "Europe/Amsterdam " is not an IANA time zone; did you mean "Europe/Amsterdam"?'),
    (None, "  time_zone: ../../etc/passwd\n",
     'contact.yaml:4:14: quiet_hours time_zone "../../etc/passwd" is not an IANA time zone; e.g. Europe/Amsterdam or UTC'),
    (None, "  utc_offset_minutes: 60\n",
     "contact.yaml:4:3: quiet_hours utc_offset_minutes is no longer read: a fixed offset ignores daylight saving time; "
     "name the time zone instead, e.g. time_zone: Europe/Amsterdam (time_zone: UTC for an offset of 0)"),
    (None, "  customer_time_zone: home_zon\n",
     'contact.yaml:4:23: quiet_hours customer_time_zone: unknown attribute "home_zon"; did you mean "home_zone"?'),
    (None, "  customer_time_zone: loans_open\n",
     'contact.yaml:4:23: quiet_hours customer_time_zone "loans_open" is a number, not a category attribute; '
     "declare it in domain.yaml as type: category with IANA zones as levels"),
    (None, "  customer_time_zone: products\n",
     'contact.yaml:4:23: quiet_hours customer_time_zone "products" is a set, not a category attribute; '
     "declare it in domain.yaml as type: category with IANA zones as levels"),
    (("Asia/Kolkata", "Asia/Calcuta"), "  customer_time_zone: home_zone\n",
     'domain.yaml:2:67: attribute "home_zone" level "Asia/Calcuta" is not an IANA time zone (contact.yaml quiet_hours '
     'customer_time_zone names the attribute); did you mean "Asia/Calcutta"?'),
    ((", default: unknown", ""), "  customer_time_zone: home_zone\n",
     'domain.yaml:2:40: attribute "home_zone" level "unknown" is not an IANA time zone (contact.yaml quiet_hours '
     "customer_time_zone names the attribute); only the attribute's default level may stand for an unknown zone"),
])
def test_zone_mistakes_are_located(tmp_path: Path, domain_edit: tuple[str, str] | None, quiet: str,
                                   expected: str) -> None:
    domain = LIBRARY.replace("attributes:\n", "attributes:\n" + LIBRARY_ZONE, 1)
    if domain_edit:
        domain = domain.replace(*domain_edit)
    assert _load_errors(library(tmp_path, domain, QUIET + quiet)) == [expected]


LIBRARY_ZONE = "  home_zone: {type: category, levels: [unknown, Europe/Amsterdam, Asia/Kolkata], default: unknown}\n"


def test_a_zone_declared_right_loads(tmp_path: Path) -> None:
    domain = LIBRARY.replace("attributes:\n", "attributes:\n" + LIBRARY_ZONE, 1)
    contact = QUIET + "  time_zone: Europe/Amsterdam\n  customer_time_zone: home_zone\n"
    ruleset, errors = load_rules(library(tmp_path, domain, contact))
    assert not errors, errors
    quiet = ruleset.contact.quiet_hours
    assert (quiet.time_zone, quiet.customer_zone, sorted(quiet.clocks)) == (
        "Europe/Amsterdam", "home_zone", ["Asia/Kolkata", "Europe/Amsterdam"])
    assert quiet.clock_for({"home_zone": "unknown"}) is quiet.clock
    # no time_zone: UTC, as the demo rules say explicitly
    ruleset, errors = load_rules(library(tmp_path, LIBRARY, QUIET))
    assert not errors and ruleset.contact.quiet_hours.time_zone == "UTC"
