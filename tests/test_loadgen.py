"""The open-loop load generator against a real server: bounded, counted, SLO-checked, plotted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "loadtest"))
import loadgen  # noqa: E402

from engine.sim.telco import SCHEMA


def _address(channel: object) -> str:
    """The fixture's ephemeral 127.0.0.1 port, under whatever interceptors wrap its channel."""
    inner = channel
    while not hasattr(inner, "target"):
        inner = inner._channel  # type: ignore[attr-defined]  # grpc's channel layers keep the next one here
    return inner.target().decode()


def test_parse_slo_units() -> None:
    assert loadgen.parse_slo(["p99=5ms", "p50=800us", "max=0.1s", "p99.9=7"]) == {
        "p99_ms": 5.0, "p50_ms": 0.8, "max_ms": 100.0, "p999_ms": 7.0}
    with pytest.raises(SystemExit):
        loadgen.parse_slo(["p42=1ms"])


def test_a_short_run_reports_percentiles_json_and_png_and_checks_the_slo(service, tmp_path: Path) -> None:
    app, channel = service
    address = _address(channel)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = ["--address", address, "--rate", "60", "--duration", "2", "--warmup", "0.5", "--processes", "2",
            "--customers", "1000", "--json", str(out), "--png", str(png)]
    assert loadgen.main(args + ["--slo", "p99=2s"]) == 0
    result = json.loads(out.read_text())
    for key in ("offered_rps", "achieved_rps", "errors", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"):
        assert key in result
    assert result["errors"] == 0
    assert result["requests"] == pytest.approx(120, abs=2)  # 60/s for the 2 measured seconds
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["p999_ms"] <= result["max_ms"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loadgen.main(args + ["--slo", "p50=1us"]) == 1  # an SLO nobody meets fails the run


def test_find_max_steps_up_until_the_slo_breaks_judging_each_rate_on_its_median_run(service) -> None:
    app, channel = service
    work = loadgen.Workload(_address(channel), customers=1000)
    held = loadgen.find_max(work, {"p99_ms": 2000.0}, start_rate=20, max_rate=40, step=1.5, duration=1,
                            warmup=0.3, processes=1, repeats=2)
    assert [s["offered_rps"] for s in held["steps"]] == [20, 30]  # 45/s is past --max-rate
    assert held["max_rps_meeting_slo"] == 30 and all(s["held"] for s in held["steps"])
    assert all(len(s["p99_ms_of_runs"]) == 2 and s["p99_ms"] in s["p99_ms_of_runs"] for s in held["steps"])

    broken = loadgen.find_max(work, {"p99_ms": 0.001}, start_rate=20, max_rate=40, step=1.5, duration=1,
                              warmup=0.3, processes=1, repeats=1)
    assert broken["best"] is None and broken["max_rps_meeting_slo"] == 0.0
    assert len(broken["steps"]) == 1 and not broken["steps"][0]["held"]


def test_the_sections_probe_times_the_real_presenting_script(redis_url: str, models_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``history_cost.py --sections`` edits a copy of ``PRESENT`` at fixed markers: they must still be there,
    the copy must run, and it must decide as the script does."""
    import history_cost

    from engine.decision import funnel

    from .test_contact import decide, make_engine
    from .test_scenarios import customer

    plain = make_engine(redis_url, models_dir)
    monkeypatch.setattr(funnel, "PRESENT", history_cost.timed_sections(funnel.PRESENT))
    timed = make_engine(redis_url, models_dir)
    for e, cid in ((plain, "SECT-1"), (timed, "SECT-2")):
        e.store.save([customer(cid)], SCHEMA)
    history_cost.sections(timed.store.client)
    shown = [[a.action_id for a in decide(e, cid, "call_center").actions] for e, cid in
             ((plain, "SECT-1"), (timed, "SECT-2"))]
    took = history_cost.sections(timed.store.client)
    assert shown[0] and shown[0] == shown[1]
    assert len(took) == 5 and all(us >= 0 for us in took.values())
    for e in (plain, timed):
        e.rules.current.close()


def test_the_history_size_probe_times_histories_that_grow_to_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """``history_cost.py --by-size`` must time histories the presenting script kept: each size's key grows
    with its impressions until the (kind, action, channel, day) fields are all there."""
    import history_cost

    monkeypatch.setattr(history_cost, "SIZES", (1, 10, 100, 1_000))
    table = history_cost.by_size(rounds=1, calls=2)
    size = {(r["spread"], r["impressions"]): r["key_bytes"] for r in table.values()}
    assert 0 < size["1 day", 1] < size["1 day", 10] < size["1 day", 100]
    assert size["1 day", 100] < size["29 days", 100] < size["29 days", 1_000]
    assert all(r["over_one_impression"] > 0 for r in table.values())


def _faults(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202 - the loadtest module
    # faults.py turns gRPC's fork handlers off for its own process (os.environ); not for this one's children
    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "true"))
    import faults

    return faults


@pytest.mark.both_redis
def test_the_fault_drill_looks_up_every_ok_decide_in_every_shard_of_the_decision_stream(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``faults.py`` reports decision-log entries lost apart from acknowledged writes: a decision the real
    ``DecisionLog`` wrote is found on whichever shard its customer has, one it never wrote is lost."""
    from engine.store.decision_log import DecisionLog
    from engine.store.profiles import redis_client

    faults = _faults(monkeypatch)
    client = redis_client(redis_url)
    writer = DecisionLog(client)
    customers = [f"LOG-{i}" for i in range(40)]  # spread over the cluster's 16 shards
    for i, cid in enumerate(customers):
        writer.write({"decision_id": f"d{i}", "customer_id": cid, "degraded": "1" if i % 10 == 0 else "0"})
    writer.close()
    decided = [("fault", f"d{i}") for i in range(40) if i % 10] + [("fault", "never-logged"), ("baseline", "d1")]
    degraded = [("fault", f"d{i}") for i in range(0, 40, 10)] + [("fault", "degraded-never-logged")]
    assert faults.check_decision_log(client, decided, degraded) == {
        "fault": {"decision_log_checked": 37, "decision_log_lost": 1,
                  "decision_log_degraded_checked": 5, "decision_log_degraded_lost": 1},
        "baseline": {"decision_log_checked": 1, "decision_log_lost": 0},
    }


def test_the_fault_drill_reads_what_the_service_counted_dropping_from_its_metrics(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch Redis refuses is lost whole and counted once (per batch, not per entry: the drill reports
    both figures for that reason)."""
    import redis
    from prometheus_client import REGISTRY, generate_latest
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from engine.store.decision_log import DecisionLog
    from engine.store.redis_embedded import free_port

    faults = _faults(monkeypatch)
    before = faults.log_drops_in(generate_latest(REGISTRY).decode())
    # nothing listens there; no retries: redis-py's default ten, with backoff, can outlast close()'s wait
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    writer = DecisionLog(nowhere, linger=0.2)
    for i in range(3):
        writer.write({"decision_id": f"x{i}", "customer_id": "LOG-X"})
    writer.close(timeout=30)
    after = faults.log_drops_in(generate_latest(REGISTRY).decode())
    assert after["decision_log"] - before["decision_log"] == 1
    assert after["decision_log_full"] == before["decision_log_full"]
