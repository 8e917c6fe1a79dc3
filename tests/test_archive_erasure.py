"""The archive's storage side: erasure and export reach the archived files (engine/store/archive_erasure.py),
the archive on object storage by URL (fsspec), trimming the streams to what is archived, compaction."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import redis

from engine.serving.privacy import export_customer, forget_customers
from engine.store.archive import ArchiveError, ArchiveWriter, archived_files, read_entries
from engine.store.archive_compact import compact, merge
from engine.store.archive_erasure import erase_customers
from engine.store.archive_fs import connect_duckdb, open_read
from engine.store.archive_lock import files_lock, writer_lock
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, RESPONSES_STREAM, redis_client
from engine.store.slots import customer_shard_key, shard_keys
from engine.store.streams import xrange_all

from .clock import DAY

ANNA, MARKER = "ANNA-0042", "MARKER-5d1e77"
OTHERS = [f"K{i:03d}" for i in range(40)]  # many: every shard of a cluster gets some


def _add(client: redis.Redis, customers: list[str], rounds: int, tag: str = "") -> None:
    """A decision, a response and an event per customer and round; ANNA's carry MARKER in a field."""
    pipe = client.pipeline(transaction=False)
    for r in range(rounds):
        for c in customers:
            note = MARKER if c == ANNA else "plain"
            d = f"d{tag}{r}-{c}"
            pipe.xadd(customer_shard_key(DECISIONS_STREAM, c, client),
                      {"decision_id": d, "customer_id": c, "ts": "1000.5", "actions": "a1,a2", "note": note})
            pipe.xadd(customer_shard_key(RESPONSES_STREAM, c, client),
                      {"decision_id": d, "customer_id": c, "action_id": "a1", "outcome": "accepted", "ts": "1001"})
            pipe.xadd(customer_shard_key(EVENTS_STREAM, c, client),
                      {"event_id": f"e{tag}{r}-{c}", "customer_id": c, "type": "visit", "ts": "1002",
                       "attr.note": note})
        pipe.execute()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _decoded(path: Path) -> bytes:
    """Every value and the metadata of a Parquet file, decompressed (a raw scan of zstd pages may miss a
    value that is there)."""
    table = pq.read_table(path)
    return (str(table.to_pylist()) + str(table.schema.metadata)).encode()


Seen = list[tuple[bytes, bytes]]  # (entry id, customer): entry ids repeat across the shards of a cluster


def _everything(client: redis.Redis, root: Path | str | None) -> dict[str, Seen]:
    return {base: [(e[0], e[1].get(b"customer_id", b"")) for e in read_entries(client, base, root=root)]
            for base in (DECISIONS_STREAM, RESPONSES_STREAM, EVENTS_STREAM)}


def _without(seen: dict[str, Seen], customer: str) -> dict[str, Seen]:
    return {base: [e for e in entries if e[1] != customer.encode()] for base, entries in seen.items()}


@pytest.mark.both_redis
def test_forget_erases_the_archive_and_export_reads_it_once(redis_url: str, tmp_path: Path) -> None:
    client = redis_client(redis_url)
    root = tmp_path / "archive"
    everyone = [ANNA, *OTHERS]
    _add(client, everyone, 6)
    with ArchiveWriter(client, root, file_entries=37) as writer:  # several files per shard, streams trimmed
        assert writer.once() == 3 * 6 * len(everyone)
    _add(client, everyone, 2, tag="t")  # a tail in the streams only
    assert all(len(list(xrange_all(client, b))) == 2 * len(everyone) for b in (DECISIONS_STREAM, RESPONSES_STREAM, EVENTS_STREAM))
    names = [p.name for p in _files(root) if p.suffix == ".parquet"]
    before = _everything(client, root)
    assert any(ANNA.encode() in _decoded(p) and MARKER.encode() in _decoded(p) for p in _files(root)
               if p.suffix == ".parquet")

    exported = export_customer(client, ANNA, who=None, archive=root)
    assert len(exported["decisions"]) == 8 and len(exported["events"]) == 8  # 6 archived + 2 in the tail, once
    assert all(len(d["responses"]) == 1 for d in exported["decisions"])
    assert {e["attributes"]["note"] for e in exported["events"]} == {MARKER}
    assert len(export_customer(client, ANNA, who=None)["decisions"]) == 2  # without the archive: the tail

    erased = forget_customers(client, [ANNA], who="test", archive=root)[ANNA]
    assert erased.failures == []
    assert erased.archive_rows_deleted == 3 * 6 and erased.stream_entries_deleted == 3 * 2
    for path in _files(root):  # every file: data, lock files, anything
        data = path.read_bytes()
        assert ANNA.encode() not in data and MARKER.encode() not in data, path
        if path.suffix == ".parquet":
            assert ANNA.encode() not in _decoded(path) and MARKER.encode() not in _decoded(path), path
    assert [p.name for p in _files(root) if p.suffix == ".parquet"] == names  # the checkpoints stay
    after = _everything(client, root)
    assert after == _without(before, ANNA)  # the others' entries all there, in order, once
    assert all(len(after[b]) == len(before[b]) - 8 == len(set(after[b])) for b in before)
    assert export_customer(client, ANNA, who=None, archive=root)["decisions"] == []
    with ArchiveWriter(client, root, file_entries=37) as writer:  # resumes after the checkpoints: nothing doubled
        writer.once()
    assert _everything(client, root) == after
    client.close()


def test_a_writer_drops_what_it_read_before_an_erasure_and_erasure_waits_for_the_files_lock(
        redis_url: str, tmp_path: Path) -> None:
    client = redis_client(redis_url)
    root = tmp_path / "archive"
    _add(client, [ANNA, *OTHERS[:3]], 5)
    with ArchiveWriter(client, root, file_entries=10_000, flush_seconds=3600) as writer:
        assert writer.step() == 0  # read, held, not written: no file is due
        assert writer.lag()["decisions"][0] == 20
        erased = forget_customers(client, [ANNA], who="test", archive=root)[ANNA]
        assert erased.failures == [] and erased.archive_rows_deleted == 0  # nothing archived yet
        assert writer.step(final=True) == 3 * 15  # read again from the rewritten streams
    data = b"".join(_decoded(p) for p in _files(root) if p.suffix == ".parquet")
    assert ANNA.encode() not in data and MARKER.encode() not in data and b"K002" in data

    _add(client, [ANNA], 2)
    with ArchiveWriter(client, root) as writer:
        writer.once()
    held = files_lock(root, client).acquire()  # as a writer mid-file holds it
    done = threading.Event()
    result: list = []
    eraser = threading.Thread(target=lambda: (result.append(erase_customers(client, root, [ANNA])), done.set()))
    eraser.start()
    assert not done.wait(0.5)  # waits for the lock
    held.release()
    assert done.wait(30)
    eraser.join()
    assert result[0].failures == [] and result[0].rows[ANNA] == 6
    client.close()


def test_the_archive_on_memory_and_file_urls_erases_and_compacts(redis_url: str, tmp_path: Path) -> None:
    client = redis_client(redis_url)
    _add(client, [ANNA, *OTHERS[:5]], 4)
    expected = _everything(client, None)
    url = f"memory://archive-{uuid.uuid4().hex}"
    with ArchiveWriter(client, url, file_entries=5) as writer:
        with pytest.raises(ArchiveError, match="another archive writer"), ArchiveWriter(client, url):
            pass  # the writer lock on object storage: a Redis lease
        assert writer.once() == 3 * 4 * 6
    assert not list(xrange_all(client, DECISIONS_STREAM))  # trimmed
    files = archived_files(url, DECISIONS_STREAM)
    paths = [f.path for fs in files.values() for f in fs]
    assert len(paths) > 1 and all(isinstance(p, str) and p.startswith(url + "/decisions/day=") for p in paths)
    con = connect_duckdb(url)
    assert con.sql(f"SELECT count(*) FROM read_parquet({[str(p) for p in paths]}, union_by_name = true)"
                   ).fetchall() == [(24,)]
    con.close()
    assert _everything(client, url) == expected

    erased = forget_customers(client, [ANNA], who="test", archive=url)[ANNA]
    assert erased.failures == [] and erased.archive_rows_deleted == 12
    fs = fsspec.filesystem("memory")
    for path in fs.find(url):
        data = fs.cat_file(path)
        assert ANNA.encode() not in data and MARKER.encode() not in data, path
        with open_read(f"memory://{path.lstrip('/')}") as f:
            assert ANNA.encode() not in str(pq.read_table(f).to_pylist()).encode()
    left = _everything(client, url)
    assert left == _without(expected, ANNA) and all(len(left[b]) == len(expected[b]) - 4 for b in expected)
    done = compact(client, url, "9999-12-31")
    assert done.merged > 0 and done.files_before > done.files_after
    assert len(fs.find(url)) == done.files_after
    assert _everything(client, url) == left

    local = tmp_path / "local"
    with ArchiveWriter(client, f"file://{local}") as writer:  # file:// is a local directory
        _add(client, OTHERS[:2], 1)
        assert writer.once() == 6
    assert list(local.glob("decisions/day=*/s*.parquet"))
    client.close()


@pytest.mark.both_redis
def test_streams_are_trimmed_only_past_what_is_archived_and_read_by_every_group(redis_url: str,
                                                                                tmp_path: Path) -> None:
    client = redis_client(redis_url)
    root = tmp_path / "archive"
    _add(client, OTHERS, 5)
    expected = _everything(client, None)
    keys = shard_keys(DECISIONS_STREAM, client)
    with ArchiveWriter(client, root, file_entries=10_000, flush_seconds=3600) as writer:
        writer.once()
        assert sum(client.xlen(k) for k in keys) == 0  # trimmed to nothing
        assert _everything(client, root) == expected  # and every entry read once
        _add(client, OTHERS, 1, tag="late")
        assert writer.step() == 0  # not due: nothing written, nothing trimmed
        assert sum(client.xlen(k) for k in keys) == len(OTHERS)
        assert len(_everything(client, root)[DECISIONS_STREAM]) == 6 * len(OTHERS)
    # a consumer group that has read nothing yet keeps its entries; a recent window is kept on request
    key = keys[0]
    client.xgroup_create(key, "slow", id="$")
    _add(client, OTHERS, 1, tag="g")
    waiting = client.xlen(key)
    with ArchiveWriter(client, root, keep_seconds=3600) as writer:
        writer.once()
    assert client.xlen(key) == waiting  # an hour's window and the group: nothing trimmed
    with ArchiveWriter(client, root) as writer:
        writer.once()
    first = client.xrange(key, count=1)
    group = client.xinfo_groups(key)[0]["last-delivered-id"]
    assert first and first[0][0] > group  # trimmed up to what the group read, no further
    assert len(_everything(client, root)[DECISIONS_STREAM]) == 7 * len(OTHERS)
    client.close()


def test_compaction_merges_a_day_per_shard_and_a_crash_between_its_steps_doubles_nothing(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine import cli

    client = redis_client(redis_url)
    key = shard_keys(DECISIONS_STREAM, client)[0]
    midnight = 20_000 * DAY * 1000  # a fixed UTC midnight: 2024-10-04
    root = tmp_path / "archive"
    with ArchiveWriter(client, root, file_entries=1000) as writer:
        for minute in range(0, 24 * 60, 10):  # a day at a flush every 10 minutes: 144 files
            for i in range(3):
                client.xadd(key, {"decision_id": f"m{minute}-{i}", "customer_id": ANNA if i == 0 else "B"},
                            id=f"{midnight + minute * 60_000 + i}-0")
            writer.step(final=True)
        client.xadd(key, {"decision_id": "next day"}, id=f"{midnight + DAY * 1000}-0")
        writer.step(final=True)
    expected = [e[0] for e in read_entries(client, DECISIONS_STREAM, root=root)]
    day = root / "decisions" / "day=2024-10-04"
    assert len(list(day.glob("*.parquet"))) == 144 and len(expected) == 144 * 3 + 1

    parts = archived_files(root, DECISIONS_STREAM, (midnight, 0), (midnight + 1, 0))[0]
    merged = merge(root, parts, DECISIONS_STREAM, remove_parts=False)  # a crash before the parts are removed
    assert len(list(day.glob("*.parquet"))) == 145
    assert archived_files(root, DECISIONS_STREAM)[0][0] == merged  # the parts are covered: ignored
    assert [e[0] for e in read_entries(client, DECISIONS_STREAM, root=root)] == expected

    assert cli.main(["archive", "compact", "--redis-url", redis_url, "--dir", str(root),
                     "--before", "2024-10-05"]) == 0  # the next day is not closed: left alone
    done = json.loads(capsys.readouterr().out)
    assert (done["files_before"], done["files_after"]) == (145, 1)
    assert [p.name for p in day.glob("*.parquet")] == [Path(str(merged.path)).name]
    assert len(list((root / "decisions" / "day=2024-10-05").glob("*.parquet"))) == 1
    assert [e[0] for e in read_entries(client, DECISIONS_STREAM, root=root)] == expected
    assert pq.read_metadata(merged.path).num_rows == 144 * 3

    assert erase_customers(client, root, [ANNA]).rows[ANNA] == 144  # the merged file is erased too
    assert len(list(read_entries(client, DECISIONS_STREAM, root=root))) == 144 * 2 + 1
    client.close()


def test_a_bad_compaction_day_is_refused_naming_the_option(redis_url: str, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="--before"):
        compact(redis_client(redis_url), tmp_path, "yesterday")


def test_the_forget_job_erases_the_archive_and_reports_a_file_it_could_not_rewrite(redis_url: str,
                                                                                     tmp_path: Path) -> None:
    from engine.serving.privacy_jobs import PrivacyJobs

    client = redis_client(redis_url)
    root = tmp_path / "archive"
    _add(client, [ANNA, *OTHERS[:3]], 3)
    with ArchiveWriter(client, root) as writer:
        writer.once()
    jobs = PrivacyJobs(client, None, lambda: None, archive=root)  # never started: run by hand
    export = jobs.submit("export", ANNA, who="test")
    jobs.run_once()
    assert len(json.loads(client.hget(f"nba:{{privacy}}:job:{export}", "json"))["decisions"]) == 3
    day = next((root / "decisions").glob("day=*"))
    broken = day / "s0_1-0_2-0.parquet"  # a file of ANNA's shard that cannot be read
    broken.write_bytes(b"not parquet")
    job = jobs.submit("forget", ANNA, who="test")
    jobs.run_once()
    done = jobs.get(job)
    assert done["state"] == "failed" and int(done["archive_rows_deleted"]) == 9
    assert any(str(broken) in f for f in done["failures"]), done["failures"]
    broken.unlink()
    data = b"".join(_decoded(p) for p in _files(root) if p.suffix == ".parquet")
    assert ANNA.encode() not in data and MARKER.encode() not in data and b"K001" in data
    client.close()


def test_a_writer_that_lost_its_lease_stops_instead_of_writing_beside_another(redis_url: str) -> None:
    client = redis_client(redis_url)
    _add(client, [ANNA], 2)
    url = f"memory://archive-{uuid.uuid4().hex}"
    with ArchiveWriter(client, url, file_entries=5) as writer:
        writer.once()
        before = archived_files(url, DECISIONS_STREAM)
        lease = writer_lock(url, client)
        client.set(lease.key, "another writer's token")  # its lease ran out and another writer took it
        _add(client, [OTHERS[0]], 2)
        stop = threading.Event()
        runner = threading.Thread(target=writer.run, args=(stop, 0.05))
        runner.start()
        runner.join(10)
        assert not runner.is_alive() and not stop.is_set()  # it ended by itself
    assert archived_files(url, DECISIONS_STREAM) == before  # it wrote nothing after losing the lease
    assert client.get(lease.key) == b"another writer's token"  # and left the other's lease alone
    client.close()


def test_get_customer_job_reports_the_archived_rows_a_forget_removed(redis_url: str, redis_admin_url: str,
                                                                      models_dir: Path, tmp_path: Path) -> None:
    import grpc

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc

    from .conftest import as_admin, served_app
    from .test_privacy import _job

    root = tmp_path / "archive"
    with served_app(redis_url, models_dir, tmp_path / "rules", archive="off", archive_dir=str(root),
                    redis_admin_url=redis_admin_url) as (app, address):
        client = app.store.client
        _add(client, [ANNA, *OTHERS[:3]], 2)
        with ArchiveWriter(client, root) as writer:
            writer.once()
        with grpc.insecure_channel(address) as plain:
            channel = as_admin(plain)
            admin = pb_grpc.AdminServiceStub(channel)
            job = _job(channel, admin.ForgetCustomer(pb.ForgetCustomerRequest(customer_id=ANNA), timeout=10).job_id)
    assert job.archive_rows_deleted == 2 * 3, job  # a decision, response and event a round
    assert job.state == "succeeded", list(job.failures)


def test_prune_removes_the_days_before_a_date_but_keeps_each_shards_checkpoint(redis_url: str, tmp_path: Path) -> None:
    """Retention: days before the date go; a stream shard whose newest file is in them keeps that file,
    emptied, so the writer resumes after it instead of archiving the shard's stream from its start (here
    the streams are not trimmed, so that would bring every pruned entry back)."""
    from engine.store.archive_compact import prune

    client = redis_client(redis_url)
    root = tmp_path / "archive"
    day_ms = 86_400_000
    today = int(time.time() * 1000) // day_ms * day_ms
    for back in (3, 2, 1):  # decisions on three days, events only on the first
        for i, c in enumerate(OTHERS):
            ms = today - back * day_ms + 1_000 + i
            client.xadd(customer_shard_key(DECISIONS_STREAM, c, client), {"decision_id": f"d{back}-{c}", "customer_id": c},
                        id=f"{ms}-0")
            if back == 3:
                client.xadd(customer_shard_key(EVENTS_STREAM, c, client), {"event_id": f"e-{c}", "customer_id": c},
                            id=f"{ms}-0")
    with ArchiveWriter(client, root, trim=False) as writer:
        writer.once()
    before = time.strftime("%Y-%m-%d", time.gmtime((today - day_ms) / 1000))
    done = prune(client, root, before)
    assert done.days >= 1 and done.files >= 2 and done.checkpoints_kept >= 1
    decisions = [f[b"decision_id"].decode() for _, f in read_entries(client, DECISIONS_STREAM, root=root)]
    assert sorted(decisions) == sorted(f"d1-{c}" for c in OTHERS)  # only the day kept
    assert list(read_entries(client, EVENTS_STREAM, root=root)) == []  # pruned, and not archived again
    with ArchiveWriter(client, root, trim=False) as writer:
        writer.once()
    assert list(read_entries(client, EVENTS_STREAM, root=root)) == []
    assert [f[b"decision_id"].decode() for _, f in read_entries(client, DECISIONS_STREAM, root=root)] == decisions
    client.close()
