"""The archive (engine/store/archive.py): reports read from it after the streams are trimmed to nothing, a
writer killed mid-file loses and doubles nothing, the layout and schema, the lag metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis
from prometheus_client import REGISTRY

from engine import cli
from engine.analytics.campaign_report import build_campaign_report
from engine.analytics.report import build_report
from engine.store.archive import (
    SCHEMA_VERSION,
    TMP_PREFIX,
    ArchiveError,
    ArchiveWriter,
    archived_files,
    read_entries,
)
from engine.store.decision_log import DecisionLog
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM, redis_client
from engine.store.slots import customer_shard_key, shard_keys
from engine.store.streams import xrange_all

from .clock import DAY, Clock
from .conftest import REPO
from .test_campaigns import INSIDE, SCHEMA, blitz, decide, engine_for, flushed, rules_with
from .test_scenarios import customer

pytestmark = pytest.mark.both_redis


def trim_to_nothing(client: redis.Redis, base: str) -> None:
    for key in shard_keys(base, client):
        client.xtrim(key, maxlen=0, approximate=False)
    assert not list(xrange_all(client, base))


def fill(client: redis.Redis, n: int, customers: int = 997, width: int = 20) -> None:
    """``n`` decision-like entries of ``customers`` customers (many: every shard of a cluster gets some)."""
    base = DECISIONS_STREAM
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        cid = f"K{i % customers:04d}"
        fields = {"decision_id": f"d{i}", "customer_id": cid} | {f"f{j}": f"value {i} {j}" for j in range(width)}
        pipe.xadd(customer_shard_key(base, cid, client), fields)
        if i % 2_000 == 1_999:
            pipe.execute()
    pipe.execute()


@pytest.fixture()
def campaign_engine(redis_url: str, models_dir: Path, tmp_path: Path):
    """The campaign tests' engine (control share 0.3) on a test clock, and its rule folder."""
    clock = Clock(INSIDE)
    rules = rules_with(tmp_path, blitz(total=1000, daily=40, share=0.3))
    engine = engine_for(redis_url, models_dir, rules, clock)
    yield engine, clock, rules
    flushed(engine)
    engine.rules.current.close()


def test_reports_from_the_archive_equal_the_streams_after_they_are_trimmed(campaign_engine, tmp_path: Path,
                                                                           redis_url: str,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    engine, clock, rules = campaign_engine
    client = engine.store.client
    campaign = engine.rules.current.ruleset.campaigns["test_blitz"]
    ids = [f"A{i:03d}" for i in range(60)]
    engine.store.save([customer(cid, categorical={"segment": ("consumer", "family")[i % 2]})
                       for i, cid in enumerate(ids)], SCHEMA)

    def play(days: int) -> None:
        for day in range(days):
            for i, cid in enumerate(ids):
                d = decide(engine, cid)
                for a in d.actions:
                    if (a.action_id == "blitz_offer" and i % 3 == 0) or (a.action_id != "blitz_offer" and i % 4 == day):
                        engine.responses.record(d.decision_id, a.action_id, "accepted", clock.now + 60)
            clock.now += DAY

    root = tmp_path / "archive"
    play(2)
    flushed(engine)
    with ArchiveWriter(client, root, file_entries=25, trim=False) as writer:  # several files per shard
        assert writer.once() > 0
    engine.decision_log = DecisionLog(client)
    play(1)  # a tail that is not archived yet
    flushed(engine)
    report = build_report(client)
    campaign_report = build_campaign_report(client, campaign)
    assert report["decisions"] == 3 * len(ids) and report["responses_accepted"] > 0
    assert campaign_report["totals"]["presented"] > 0

    # the archive plus the tail is what the streams hold
    assert build_report(client, archive=root) == report
    assert build_campaign_report(client, campaign, archive=root) == campaign_report
    with ArchiveWriter(client, root, file_entries=25) as writer:
        writer.once()
    for base in (DECISIONS_STREAM, RESPONSES_STREAM):
        trim_to_nothing(client, base)
    assert build_report(client)["decisions"] == 0
    assert build_report(client, archive=root) == report
    assert build_campaign_report(client, campaign, archive=root) == campaign_report

    # and so does `nba report --archive DIR`
    assert cli.main(["report", "--redis-url", redis_url, "--rules-dir", str(rules),
                     "--archive", str(root), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["decisions"], printed["responses_accepted"]) == (report["decisions"], report["responses_accepted"])
    assert cli.main(["report", "--redis-url", redis_url, "--rules-dir", str(rules),
                     "--no-archive", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decisions"] == 0


def test_a_writer_killed_mid_file_loses_and_doubles_nothing(redis_url: str, tmp_path: Path) -> None:
    client = redis_client(redis_url)
    fill(client, 30_000)
    expected = [e[0] for e in xrange_all(client, DECISIONS_STREAM)]
    root = tmp_path / "archive"
    command = [sys.executable, "-m", "engine.cli", "archive", "once", "--redis-url", redis_url, "--dir", str(root),
               "--file-entries", "3000", "--data-dir", str(tmp_path / "data")]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    landed = 0
    deadline = time.monotonic() + 240
    while not landed and time.monotonic() < deadline:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            until = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < until:
                if any(root.glob(f"*/day=*/{TMP_PREFIX}*")):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.0005)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            assert proc.stderr is not None
            proc.stderr.close()
        landed = proc.returncode == -signal.SIGKILL and any(root.glob(f"*/day=*/{TMP_PREFIX}*"))
        if proc.returncode == 0:  # it finished before a kill landed: start over
            for path in root.rglob("*.parquet"):
                path.unlink()
    assert landed, "no kill landed while a file was half-written"
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["lag"]["decisions"]["entries"] == 0
    assert not list(root.glob(f"*/day=*/{TMP_PREFIX}*"))  # the crashed writer's temporary file was removed
    archived = [f for files in archived_files(root, DECISIONS_STREAM).values() for f in files]
    rows = pq.read_table([str(f.path) for f in archived], columns=["_shard", "_id"]).to_pylist()
    assert len(rows) == len(expected) == len({(r["_shard"], r["_id"]) for r in rows})  # each entry once
    trim_to_nothing(client, DECISIONS_STREAM)
    assert [e[0] for e in read_entries(client, DECISIONS_STREAM, root=root)] == expected
    client.close()


def test_the_lag_metric_counts_what_waits(redis_url: str, tmp_path: Path) -> None:
    client = redis_client(redis_url)

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"stream": "decisions"})

    with ArchiveWriter(client, tmp_path / "archive", file_entries=100, flush_seconds=3600) as writer:
        fill(client, 40, customers=1)  # one shard: a file is per shard
        time.sleep(0.05)
        fill(client, 10, customers=1)
        assert writer.step() == 0  # neither a full file nor an hour: nothing written
        assert gauge("nba_archive_lag_entries") == 50
        assert gauge("nba_archive_lag_seconds") >= 0.05
        fill(client, 60, customers=1)
        assert writer.step() == 100  # a full file
        assert gauge("nba_archive_lag_entries") == 10
        fill(client, 500, customers=1)
        writer.lag()  # more than a file's worth waits: estimated, at least what was read, at most the stream
        assert 100 <= gauge("nba_archive_lag_entries") <= 610
        writer.once()
        assert gauge("nba_archive_lag_entries") == 0 and gauge("nba_archive_lag_seconds") == 0
    client.close()


def test_files_are_per_day_with_a_versioned_schema_and_one_writer_holds_the_archive(redis_url: str,
                                                                                      tmp_path: Path) -> None:
    client = redis_client(redis_url)
    key = shard_keys(DECISIONS_STREAM, client)[0]
    midnight = 20_000 * DAY * 1000  # a fixed UTC midnight: 2024-10-04
    client.xadd(key, {"decision_id": "late", "customer_id": "c1"}, id=f"{midnight - 1}-0")
    client.xadd(key, {"decision_id": "early", "note": "only here"}, id=f"{midnight}-0")
    client.xadd(key, {"decision_id": "later"}, id=f"{midnight + 5}-3")
    root = tmp_path / "archive"
    (root / "decisions" / "day=2024-10-04").mkdir(parents=True)
    (root / "decisions" / "day=2024-10-04" / f"{TMP_PREFIX}s0_1-0_2-0.parquet").write_bytes(b"half a file")
    with ArchiveWriter(client, root) as writer:
        with pytest.raises(ArchiveError, match="another archive writer"), ArchiveWriter(client, root):
            pass
        assert writer.once() == 3
    assert not list(root.glob(f"*/day=*/{TMP_PREFIX}*"))
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    assert files == [f"decisions/day=2024-10-03/s0_{midnight - 1}-0_{midnight - 1}-0.parquet",
                     f"decisions/day=2024-10-04/s0_{midnight}-0_{midnight + 5}-3.parquet"]
    table = pq.read_table(root / files[1])
    assert table.schema.metadata[b"nba.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table.to_pylist() == [
        {"_id": f"{midnight}-0", "_ms": midnight, "_seq": 0, "_shard": 0, "decision_id": "early", "note": "only here"},
        {"_id": f"{midnight + 5}-3", "_ms": midnight + 5, "_seq": 3, "_shard": 0, "decision_id": "later", "note": None}]
    # a time range, from the archive alone and across the archive and a tail
    client.xadd(key, {"decision_id": "tail"}, id=f"{midnight + 9}-0")
    ids = [e[0].decode() for e in read_entries(client, DECISIONS_STREAM, since=str(midnight), root=root)]
    assert ids == [f"{midnight}-0", f"{midnight + 5}-3", f"{midnight + 9}-0"]
    ids = [e[0].decode() for e in read_entries(client, DECISIONS_STREAM, until=str(midnight), root=root)]
    assert ids == [f"{midnight - 1}-0", f"{midnight}-0"]
    assert dict(next(read_entries(client, DECISIONS_STREAM, root=root))[1]) == {b"decision_id": b"late",
                                                                                b"customer_id": b"c1"}
    client.close()


def test_nba_archive_run_flushes_by_time_serves_its_lag_and_stops_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    from engine.store.redis_embedded import free_port

    client = redis_client(redis_url)
    root, port = tmp_path / "archive", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "archive", "run", "--redis-url", redis_url,
                             "--dir", str(root), "--flush-seconds", "0.2", "--poll", "0.1", "--metrics-port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        fill(client, 50)
        deadline = time.monotonic() + 60
        scraped = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None
            archived = sum(pq.read_metadata(p).num_rows for p in root.glob("decisions/day=*/*.parquet")
                           if not p.name.startswith(TMP_PREFIX))  # one being written is renamed any moment
            if archived == 50:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                        scraped = reply.read().decode()
                except OSError:
                    scraped = ""
                if 'nba_archive_lag_entries{stream="decisions"} 0.0' in scraped:
                    break
            time.sleep(0.1)
        assert 'nba_archive_lag_entries{stream="decisions"} 0.0' in scraped, scraped[-2000:]
        assert 'nba_archived_entries_total{stream="decisions"} 50.0' in scraped
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.close()
