"""The archive's write rate and `nba report` from the archive against reading the streams.

Fills the decision and response streams of a redis-server of its own with N decision-shaped entries (the
fields the funnel logs, a feature vector included) and responses to 10% of them, archives them
(``ArchiveWriter.once``), then times ``build_report`` from the streams and, after trimming the streams to
nothing, from the archive, and one DuckDB query over the files.

    python loadtest/archive_bench.py --decisions 200000

``--generated DAYS`` instead writes ``--decisions`` decisions (10% with an accepted response) spread over DAYS
days straight into Parquet files in the archive's layout and schema (generating 10 million through Redis would
take hours here; the files are *generated*, not written by ``ArchiveWriter``, and ``--check`` first shows on a
small sample that generated files and writer-written files give the same report), then times
``nba report``'s ``build_report`` over all the days and the training-row assembly (``from_streams``) over
``--training-days`` of them, p50 of ``--runs`` runs each, and the archive's bytes per decision and files per day:

    python loadtest/archive_bench.py --generated 30 --decisions 10000000 --check
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from harness import args as common  # noqa: E402
from harness.results import write_json  # noqa: E402

from engine.analytics.report import build_report  # noqa: E402
from engine.store.archive import ArchiveWriter  # noqa: E402
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM, redis_client  # noqa: E402
from engine.store.redis_embedded import EmbeddedRedis  # noqa: E402

ACTIONS = [f"action_{i}" for i in range(40)]


@contextmanager
def own_redis(folder: Path) -> Iterator:
    """A client of a redis-server of this run's own (no persistence) in ``folder``."""
    server = EmbeddedRedis(folder / "redis", persist=False).start()
    client = redis_client(server.url, timeout=60.0)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def fill(client, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    responses = 0
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        actions = rng.sample(ACTIONS, 3)
        did = f"d{i:09d}"
        pipe.xadd(DECISIONS_STREAM, {
            "decision_id": did, "customer_id": f"C{rng.randrange(100_000):07d}", "channel": "web", "touchpoint": "home",
            "actions": ",".join(actions), "types": "upsell,cross_sell,retention", "values": "120,80,300",
            "propensities": ",".join(f"{rng.random():.5f}" for _ in actions), "control": "1" if i % 10 == 0 else "0",
            "ruleset_version": "r-2024.10.01", "model_version": "m-7", "model_role": "champion", "explored": "0",
            "features": ",".join(f"{rng.random():.4f}" for _ in range(24)), "feature_schema": "f3a9c0", "degraded": "0",
            "ts": f"{1_700_000_000 + i / 100:.3f}"}, maxlen=None)
        if i % 10 == 3:
            pipe.xadd(RESPONSES_STREAM, {"decision_id": did, "action_id": actions[0], "outcome": "accepted",
                                         "value": "120", "action_type": "upsell", "ts": "0"}, maxlen=None)
            responses += 1
        if i % 5_000 == 4_999:
            pipe.execute()
    pipe.execute()
    return responses


CHANNELS = ["web", "mobile_app", "email", "sms"]
TYPES = ["upsell", "cross_sell", "bundle", "retention", "acquisition", "service"]
START_MS = 1_790_000_000_000  # any day: ids and ts are the generated traffic's own


def _decision_fields(i: int, rng: random.Random, width: int, fingerprint: str) -> tuple[dict[str, str], dict | None]:
    """Decision ``i``'s fields as the funnel logs them, and its accepted response (10%) or None."""
    import base64

    import numpy as np

    actions = rng.sample(ACTIONS, 3)
    did = f"d{i:09d}"
    block = np.frombuffer(rng.randbytes(4 * width), dtype="<u4") % 1000 / 100  # small floats, like scaled features
    fields = {"decision_id": did, "customer_id": f"C{rng.randrange(1_000_000):07d}", "channel": rng.choice(CHANNELS),
              "touchpoint": "home", "actions": ",".join(actions), "types": ",".join(TYPES[ACTIONS.index(a) % 6] for a in actions),
              "values": ",".join(str(40 + ACTIONS.index(a) * 5) for a in actions),
              "propensities": ",".join(f"{rng.random():.5f}" for _ in actions), "control": "1" if i % 10 == 0 else "0",
              "ruleset_version": "r-2024.10.01", "model_version": "m-7", "model_role": "champion",
              "explored": "1" if i % 20 == 1 else "0", "campaigns": ",,",
              "features": base64.b64encode(block.astype("<f4").tobytes()).decode(), "feature_schema": fingerprint,
              "degraded": "0"}
    response = None
    if i % 10 == 3:
        response = {"decision_id": did, "action_id": actions[0], "outcome": "accepted", "value": "120",
                    "action_type": TYPES[ACTIONS.index(actions[0]) % 6]}
    return fields, response


def _generate(root: Path, decisions: int, days: int, file_entries: int = 20_000, seed: int = 0) -> dict:
    """``decisions`` spread evenly over ``days`` as archive files (shard 0), ids at the decisions' times."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.models.model_input import model_input
    from engine.sim.telco import SCHEMA
    from engine.store.archive import SCHEMA_VERSION, STREAMS, file_name, stream_dir

    rng = random.Random(seed)
    width, fingerprint = len(model_input(SCHEMA).customer_features), SCHEMA.fingerprint()
    step = days * 86_400_000 / decisions

    def flush(base: str, rows: list[tuple[int, dict[str, str]]]) -> None:
        if not rows:
            return
        names = list(rows[0][1])
        table = pa.table({"_id": pa.array([f"{ms}-0" for ms, _ in rows]), "_ms": pa.array([ms for ms, _ in rows], pa.int64()),
                          "_seq": pa.array([0] * len(rows), pa.int64()), "_shard": pa.array([0] * len(rows), pa.int32())}
                         | {n: pa.array([f[n] for _, f in rows], pa.string()) for n in names})
        table = table.replace_schema_metadata({"nba.schema_version": str(SCHEMA_VERSION), "nba.stream": base})
        day = time.strftime("%Y-%m-%d", time.gmtime(rows[0][0] // 1000))
        directory = Path(stream_dir(root, base)) / f"day={day}"
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, directory / file_name(0, (rows[0][0], 0), (rows[-1][0], 0)), compression="zstd")

    pending: dict[str, list[tuple[int, dict[str, str]]]] = {DECISIONS_STREAM: [], RESPONSES_STREAM: []}
    day_of = -1
    for i in range(decisions):
        ms = START_MS + int(i * step)
        if ms // 86_400_000 != day_of:  # one file per UTC day, as the writer cuts them
            for base in pending:
                flush(base, pending[base])
                pending[base] = []
            day_of = ms // 86_400_000
        fields, response = _decision_fields(i, rng, width, fingerprint)
        fields["ts"] = f"{ms / 1000:.3f}"
        pending[DECISIONS_STREAM].append((ms, fields))
        if response is not None:
            response["ts"] = f"{ms / 1000 + 60:.3f}"
            pending[RESPONSES_STREAM].append((ms + 1, response))
        for base, rows in pending.items():
            if len(rows) >= file_entries:
                flush(base, rows)
                pending[base] = []
    for base, rows in pending.items():
        flush(base, rows)
    files = list(root.rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files)
    decision_files = [f for f in files if f.parts[-3] == STREAMS[DECISIONS_STREAM]]
    return {"files": len(files), "files_per_day": round(len(files) / days, 1),
            "decision_files_per_day": round(len(decision_files) / days, 1),
            "bytes_per_decision_with_its_responses": round(size / decisions, 1),
            "bytes_per_decision_file_only": round(sum(f.stat().st_size for f in decision_files) / decisions, 1)}


def _check_generated_equals_written(n: int = 3_000) -> None:
    """The same decisions generated as files and archived by ``ArchiveWriter`` give the same report."""
    from engine.models.model_input import model_input
    from engine.sim.telco import SCHEMA

    rng = random.Random(0)
    width, fingerprint = len(model_input(SCHEMA).customer_features), SCHEMA.fingerprint()
    step = 86_400_000 * 2 // n
    with tempfile.TemporaryDirectory() as tmp:
        with own_redis(Path(tmp)) as client:
            pipe = client.pipeline(transaction=False)
            for i in range(n):
                ms = START_MS + i * step
                fields, response = _decision_fields(i, rng, width, fingerprint)
                fields["ts"] = f"{ms / 1000:.3f}"
                pipe.xadd(DECISIONS_STREAM, fields, id=f"{ms}-0", maxlen=None)
                if response is not None:
                    response["ts"] = f"{ms / 1000 + 60:.3f}"
                    pipe.xadd(RESPONSES_STREAM, response, id=f"{ms + 1}-0", maxlen=None)
            pipe.execute()
            written = Path(tmp) / "written"
            with ArchiveWriter(client, written) as writer:
                writer.once()
            for key in (DECISIONS_STREAM, RESPONSES_STREAM):
                client.delete(key)
            generated = Path(tmp) / "generated"
            _generate(generated, n, 2, seed=0)
            a, b = build_report(client, archive=written), build_report(client, archive=generated)
            assert a == b and a["decisions"] == n, "generated files and writer-written files give different reports"


def old_python_report(client, since: str, until: str, archive: Path) -> dict:
    """The baseline: ``nba report``'s figures as they were computed before the SQL, entry by entry in Python
    over ``read_entries`` (lift left out: its numpy part is the same in both)."""
    from engine.store.archive import read_entries

    def entries(stream: str):
        for _, fields in read_entries(client, stream, since, archive, until):
            yield {k.decode(): v.decode() for k, v in fields.items()}

    decisions: dict[str, tuple] = {}
    models: dict[str, int] = {}
    for d in entries(DECISIONS_STREAM):
        actions = [a for a in d.get("actions", "").split(",") if a]
        kinds = d.get("types", "").split(",") if d.get("types") else ["?" for _ in actions]
        vals = [float(x) for x in d["values"].split(",")] if d.get("values") else [0.0 for _ in actions]
        decisions[d["decision_id"]] = (actions, kinds, vals, d.get("control") == "1",
                                       d.get("customer_id") or f"decision:{d['decision_id']}")
        name = f"{d.get('model_version', '?')} ({d.get('model_role') or 'champion'})"
        models[name] = models.get(name, 0) + 1
    accepted = {(r["decision_id"], r["action_id"]) for r in entries(RESPONSES_STREAM)
                if r.get("outcome") == "accepted" and r.get("decision_id") in decisions}
    by_action: dict[str, list] = {}
    by_type: dict[str, list] = {}
    per_customer: dict[tuple[bool, str], list] = {}
    for decision_id, (actions, kinds, vals, is_control, customer) in decisions.items():
        total = 0.0
        for action_id, kind, value in zip(actions, kinds, vals):
            hit = (decision_id, action_id) in accepted
            for tally in (by_action.setdefault(action_id, [0, 0, 0.0]), by_type.setdefault(kind, [0, 0, 0.0])):
                tally[0] += 1
                tally[1] += hit
                tally[2] += value if hit else 0.0
            total += value if hit else 0.0
        cluster = per_customer.setdefault((is_control, customer), [0.0, 0])
        cluster[0] += total
        cluster[1] += 1
    return {"decisions": len(decisions), "responses_accepted": len(accepted), "by_action": by_action,
            "by_type": by_type, "customers": len(per_customer), "models": models}


def _p50(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 2), out


def generated(args: argparse.Namespace) -> dict:
    from engine.analytics.training_rows import from_streams
    from engine.sim.telco import SCHEMA

    out: dict = {"decisions": args.decisions, "days": args.generated, "files": "generated in the archive's layout"}
    if args.check:
        _check_generated_equals_written()
        out["check"] = "generated files and ArchiveWriter files give the same report (3,000 decisions)"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir) if args.dir else Path(tmp) / "archive"
        if args.dir and any(root.rglob("*.parquet")):  # generated by an earlier run with the same arguments
            out["reused"] = str(root)
        else:
            t = time.perf_counter()
            out |= _generate(root, args.decisions, args.generated)
            out["generate_s"] = round(time.perf_counter() - t, 1)
        with own_redis(Path(tmp)) as client:
            out["report_p50_s"], report = _p50(lambda: build_report(client, archive=root), args.runs)
            assert isinstance(report, dict) and report["decisions"] == args.decisions
            out["report_responses_accepted"] = report["responses_accepted"]
            first = time.strftime("%Y-%m-%d", time.gmtime(START_MS // 1000))
            last = time.strftime("%Y-%m-%d", time.gmtime(START_MS // 1000 + 86_400 * (args.training_days - 1)))
            out["training_days"] = args.training_days
            out["training_rows_p50_s"], data = _p50(lambda: from_streams(
                client, SCHEMA, as_of=START_MS / 1000 + 86_400 * (args.generated + 8), archive=root, since=first,
                until=last), args.runs)
            out["training_rows"] = len(data)  # type: ignore[arg-type]
            if args.baseline_days:  # the old path and the SQL one on the same subset, alternating
                since = str(START_MS)
                until = str(START_MS + 86_400_000 * args.baseline_days - 1)
                old, new = [], []
                for _ in range(args.baseline_runs):
                    t = time.perf_counter()
                    subset = old_python_report(client, since, until, root)
                    old.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    sql = build_report(client, since=since, until=until, archive=root)
                    new.append(time.perf_counter() - t)
                    assert (subset["decisions"], subset["responses_accepted"]) == (sql["decisions"], sql["responses_accepted"])
                out["baseline_decisions"] = subset["decisions"]
                out["baseline_old_python_report_p50_s"] = round(statistics.median(old), 2)
                out["baseline_sql_report_same_subset_p50_s"] = round(statistics.median(new), 2)
    return out


def show(out: dict, path: str | None) -> None:
    print(json.dumps(out, indent=2))
    write_json(path, out)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--generated", type=int, default=0, metavar="DAYS",
                        help="generate the archive's files over DAYS days instead of filling Redis")
    parser.add_argument("--training-days", type=int, default=3, help="--generated: the days training rows are made of")
    parser.add_argument("--runs", type=int, default=3, help="--generated: timed runs (the median is printed)")
    parser.add_argument("--check", action="store_true", help="--generated: first check generated against written files")
    parser.add_argument("--baseline-days", type=int, default=0,
                        help="--generated: also time the old Python-per-entry report on the first N days (0: off)")
    parser.add_argument("--baseline-runs", type=int, default=1, help="--generated: runs of the baseline comparison")
    parser.add_argument("--dir", help="--generated: generate into DIR and keep it; reuse it when it holds files")
    common.add_json(parser, "also write the printed result here")
    args = parser.parse_args(argv)
    if args.generated:
        show(generated(args), args.json)
        return 0
    out: dict = {"decisions": args.decisions}
    with tempfile.TemporaryDirectory() as tmp:
        with own_redis(Path(tmp)) as client:
            t = time.perf_counter()
            out["responses"] = fill(client, args.decisions)
            out["fill_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            report = build_report(client)
            out["report_from_streams_s"] = round(time.perf_counter() - t, 2)
            root = Path(tmp) / "archive"
            t = time.perf_counter()
            with ArchiveWriter(client, root) as writer:
                archived = writer.once()
            seconds = time.perf_counter() - t
            out["archive_s"] = round(seconds, 1)
            out["archive_entries_per_s"] = round(archived / seconds)
            size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
            out["archive_files"] = sum(1 for _ in root.rglob("*.parquet"))
            out["archive_bytes_per_decision_and_response"] = round(size / archived, 1)
            for key in (DECISIONS_STREAM, RESPONSES_STREAM):
                client.xtrim(key, maxlen=0)
            t = time.perf_counter()
            again = build_report(client, archive=root)
            out["report_from_archive_s"] = round(time.perf_counter() - t, 2)
            assert again == report, "the archive's report differs from the streams'"
            t = time.perf_counter()
            con = duckdb.connect()
            rows = con.sql(f"SELECT count(*), count(DISTINCT customer_id) FROM read_parquet('{root}/decisions/*/*.parquet', "
                           "union_by_name = true)").fetchall()
            out["duckdb_count_distinct_customers_s"] = round(time.perf_counter() - t, 2)
            assert rows[0][0] == args.decisions
    show(out, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
