"""How fast ``nba import customers`` loads a customer base, against a plain redis-py pipeline
(``op_costs.py --import-rate``).

Generates ``--customers`` telco demo customers (``engine.sim.world.generate``: 24 numbers, 6
categories, products and consent as ``;``-separated cells) into a temporary CSV and Parquet file,
starts an embedded redis-server on a free 127.0.0.1 port (no persistence) and, in turns that alternate
their order (a b c d, then d c b a, ...), on a flushed database each time:

- (a) ``import_customers`` on the CSV: read, check every cell, write (``engine/store/bulk.py``);
- (b) ``import_customers`` on the Parquet file;
- (c) the baseline: a plain redis-py pipeline (``transaction=False``, ``--batch`` commands per execute)
  of one ``HSET key mapping`` per customer with the fields ``encode_profile`` gives, built in memory
  before the clock starts. It **excludes parsing and checking** (and the per-customer atomic replace:
  HSET alone does not DEL the old hash first, the importer's script does), so it is what writing the
  same bytes costs through redis-py, not what an import could cost;
- (d) for reference, the ceiling of the importer's write: the very EVALSHA commands it sends (the
  ``_SAVE_PROFILE`` script, DEL + HSET per customer), packed before the clock starts and sent the way
  the importer sends them (``--batch`` per write, 16,000 customers unanswered at most, replies parsed by
  hiredis): what Redis itself allows for the atomic write, with no reading or checking at all.

It prints profiles/s per method (median of the turns), each method's ratio to the baseline (c) and to
the ceiling (d), and checks after every run that Redis holds every customer and a sample of hashes
equals ``encode_profile``. Before the turns, each importer loads a 2,000-customer file once, untimed
(pyarrow's first calls).
The importer and the baseline run in this process, Redis in its own: on a 2-core machine they share
the cores. Every run is bounded by the data; the turns stop early once ``--max-seconds`` have passed.

    python loadtest/op_costs.py --import-rate                      # 200,000 customers, 3 turns
    python loadtest/op_costs.py --import-rate --customers 50000 --turns 5 --json /tmp/bench_import.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import hiredis
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import redis
from harness.results import write_json

from engine.sim.telco import SCHEMA
from engine.sim.world import generate
from engine.store.bulk import import_customers
from engine.store.profiles import _SAVE_PROFILE, _SAVE_SHA, ProfileStore, encode_profile, pack, profile_key
from engine.store.redis_embedded import EmbeddedRedis

METHODS = ("import CSV", "import Parquet", "baseline HSET pipeline", "ceiling EVALSHA pre-packed")
IN_FLIGHT = 16_000  # as engine/store/bulk.py


def customers(n: int, seed: int, folder: Path) -> tuple[Path, Path, list[tuple[str, dict]]]:
    """The CSV and Parquet files of ``n`` customers, and each customer's key and encoded hash fields."""
    world = generate(n, seed)
    profiles = list(world.profiles())
    for p in profiles:
        p.open_cases = ()  # an import writes no open case ids
    columns: dict[str, object] = {"customer_id": [p.customer_id for p in profiles]}
    for j, name in enumerate(SCHEMA.numeric):
        columns[name] = world.numeric[:, j]
    for name in SCHEMA.categorical:
        columns[name] = [p.categorical[name] for p in profiles]
    for name in SCHEMA.sets:
        columns[name] = [";".join(sorted(p.sets[name])) for p in profiles]
    table = pa.table(columns)
    csv_path, parquet_path = folder / "customers.csv", folder / "customers.parquet"
    pcsv.write_csv(table, csv_path)
    pq.write_table(table, parquet_path)
    pcsv.write_csv(table.slice(0, 2_000), folder / "warm.csv")  # first use of pyarrow's kernels, not timed
    pq.write_table(table.slice(0, 2_000), folder / "warm.parquet")
    encoded = [(profile_key(p.customer_id), encode_profile(p, SCHEMA)) for p in profiles]
    return csv_path, parquet_path, encoded


def baseline(client: redis.Redis, encoded: list[tuple[str, dict]], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(encoded), batch):
        pipe = client.pipeline(transaction=False)
        for key, fields in encoded[i: i + batch]:
            pipe.hset(key, mapping=fields)
        pipe.execute()
    return time.perf_counter() - started


def prepacked(encoded: list[tuple[str, dict]], batch: int) -> list[tuple[bytes, int]]:
    """The importer's EVALSHA commands, ``batch`` customers to a payload."""
    out = []
    for i in range(0, len(encoded), batch):
        commands = []
        for key, fields in encoded[i: i + batch]:
            args: list = []
            for name, value in fields.items():
                args += (name, value)
            commands.append(pack("EVALSHA", _SAVE_SHA, 1, key, *args))
        out.append((b"".join(commands), len(commands)))
    return out


def ceiling(client: redis.Redis, payloads: list[tuple[bytes, int]]) -> float:
    client.script_load(_SAVE_PROFILE)
    conn = client.connection_pool.get_connection()
    reader, buffer = hiredis.Reader(), bytearray(1 << 16)

    def replies(count: int) -> None:
        while count:
            reply = reader.gets()
            if reply is False:
                size = conn._sock.recv_into(buffer)
                assert size, "redis closed the connection"
                reader.feed(buffer, 0, size)
                continue
            assert not isinstance(reply, hiredis.ReplyError), reply
            count -= 1

    started = time.perf_counter()
    pending: deque[int] = deque()
    for payload, count in payloads:
        conn.send_packed_command([payload], check_health=False)
        pending.append(count)
        while len(pending) > 1 and sum(pending) > IN_FLIGHT:
            replies(pending.popleft())
    while pending:
        replies(pending.popleft())
    took = time.perf_counter() - started
    conn.disconnect()
    client.connection_pool.release(conn)
    return took


def check(client: redis.Redis, encoded: list[tuple[str, dict]], method: str) -> None:
    keys = sum(1 for _ in client.scan_iter(match="nba:{c:*}:profile", count=10_000))
    assert keys == len(encoded), f"{method}: {keys} profiles in Redis, want {len(encoded)}"
    for key, fields in encoded[:: max(len(encoded) // 50, 1)]:
        want = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
        assert client.hgetall(key) == want, f"{method}: {key} differs from encode_profile"


def run(args: argparse.Namespace) -> int:
    """The comparison with ``op_costs.py``'s arguments (``--import-rate``)."""
    args.customers = args.customers or 200_000
    args.max_seconds = args.max_seconds or 600.0
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nba-bench-import-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persist=False) as server:
        folder = Path(tmp)
        made = time.perf_counter()
        csv_path, parquet_path, encoded = customers(args.customers, args.seed, folder)
        payloads = prepacked(encoded, args.batch)
        print(f"{args.customers:,} telco demo customers ({len(SCHEMA.numeric)} numbers, {len(SCHEMA.categorical)} "
              f"categories, {len(SCHEMA.sets)} sets): CSV {csv_path.stat().st_size / 1e6:.1f} MB, Parquet "
              f"{parquet_path.stat().st_size / 1e6:.1f} MB, made in {time.perf_counter() - made:.1f}s")
        store = ProfileStore.from_url(server.url)
        plain = redis.Redis.from_url(server.url)  # the service user, as the importer writes
        admin = redis.Redis.from_url(server.admin_url)  # INFO and FLUSHDB are beyond the service user's ACL
        info = admin.info("server")
        print(f"redis {info['redis_version']} on 127.0.0.1:{server.port}, {os.cpu_count()} cores, batch {args.batch}")
        for warm in ("warm.csv", "warm.parquet"):
            import_customers(store, folder / warm, SCHEMA, batch=args.batch)
        seconds: dict[str, list[float]] = {m: [] for m in METHODS}
        for turn in range(args.turns):
            if turn and time.perf_counter() - began > args.max_seconds:
                print(f"stopped after {turn} turns (--max-seconds {args.max_seconds:g})")
                break
            for method in METHODS if turn % 2 == 0 else tuple(reversed(METHODS)):
                admin.flushdb()
                if method == METHODS[2]:
                    took = baseline(plain, encoded, args.batch)
                elif method == METHODS[3]:
                    took = ceiling(plain, payloads)
                else:
                    path = csv_path if method == METHODS[0] else parquet_path
                    started = time.perf_counter()
                    report = import_customers(store, path, SCHEMA, batch=args.batch)
                    took = time.perf_counter() - started
                    assert report.loaded == args.customers and not report.rejected, report.render()
                check(plain, encoded, method)
                seconds[method].append(took)
                print(f"  turn {turn + 1}  {method:28} {args.customers / took:>10,.0f} profiles/s  ({took:.2f}s)")
        store.client.close()
        plain.close()
        admin.close()

    rates = {m: args.customers / statistics.median(s) for m, s in seconds.items() if s}
    base, top = rates[METHODS[2]], rates[METHODS[3]]
    print(f"\n{'method':28} {'profiles/s (median)':>20} {'vs baseline':>12} {'vs ceiling':>11}")
    for method, rate in rates.items():
        print(f"{method:28} {rate:>20,.0f} {rate / base:>11.2f}x {rate / top:>10.2f}x")
    print("baseline: HSET of pre-encoded fields through a redis-py pipeline (no parsing or checking, no DEL);\n"
          "ceiling: the importer's EVALSHA commands packed beforehand, sent as it sends them (no parsing or checking)")
    write_json(args.json, {
        "customers": args.customers, "batch": args.batch, "cores": os.cpu_count(),
        "seconds": seconds, "profiles_per_second": rates,
        "ratio_to_baseline": {m: r / base for m, r in rates.items()},
        "ratio_to_ceiling": {m: r / top for m, r in rates.items()}})
    return 0
