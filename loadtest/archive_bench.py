"""The archive's write rate and `nba report` from the archive against reading the streams.

Fills the decision and response streams of a redis-server of its own with N decision-shaped entries (the
fields the funnel logs, a feature vector included) and responses to 10% of them, archives them
(``ArchiveWriter.once``), then times ``build_report`` from the streams and, after trimming the streams to
nothing, from the archive, and one DuckDB query over the files.

    python loadtest/archive_bench.py --decisions 200000
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import duckdb

from engine.analytics.report import build_report
from engine.store.archive import ArchiveWriter
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM, redis_client
from engine.store.redis_embedded import EmbeddedRedis

ACTIONS = [f"action_{i}" for i in range(40)]


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=200_000)
    args = parser.parse_args()
    out: dict = {"decisions": args.decisions}
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", persist=False).start()
        client = redis_client(server.url, timeout=60.0)
        try:
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
        finally:
            client.close()
            server.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
