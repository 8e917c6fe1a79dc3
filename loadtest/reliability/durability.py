"""What `appendfsync always` costs against `everysec`: RecordResponse, PublishEvent and Decide through real servers.

Two ``nba serve --workers 1`` processes, each with its own embedded Redis (append-only file in a
directory on the machine's disk), one started with ``--fsync everysec`` (the default), the other with
``--fsync always``; both seed the 20,000 demo customers and use the same model. One open-loop client sends
at a constant total rate and alternates request by request between the two (who goes first alternates
by round), cycling Decide, RecordResponse (for a decision that server answered earlier in the round) and
PublishEvent (a new event id) on each, so machine noise hits both alike. Every one of these calls writes
to Redis before it answers: Decide through the presenting script (impressions, budget units, the
decision record), RecordResponse the response, PublishEvent the event. Latency counts from each call's
intended send time; a 5-second round first warms both up (not counted). Also times ``write`` +
``fdatasync`` of a 300-byte record in the same directory (what `always` adds per Redis event-loop
iteration), and reports Redis's ``aof_delayed_fsync``.

    .venv/bin/python loadtest/faults.py --durability --rate 150 --duration 20 --rounds 4 --json /tmp/durability.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
from faults import CLIENT_OPTIONS, log, worker_pid
from harness.results import per_round, ratio_line, ratios, summary, write_json
from harness.servers import ROOT, serve_command
from loadgen import CHANNEL_MIX, TOUCHPOINTS

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.store.redis_embedded import free_port

MODES = ("everysec", "always")
KINDS = ("Decide", "RecordResponse", "PublishEvent")


def fsync_cost(directory: Path, n: int = 2000) -> dict:
    """write(300 B) + fdatasync, n times, in ``directory`` (the disk the append-only files are on)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        record = b"x" * 300
        for _ in range(n):
            began = time.perf_counter()
            os.write(fd, record)
            os.fdatasync(fd)
            times.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        path.unlink()
    return summary(times, scale=1000)


def rounds_run(addresses: dict[str, str], rate: float, duration: float, warmup: float, customers: int,
               seed: int) -> dict[str, dict[str, np.ndarray]]:
    """One round: latencies (ms, NaN: failed) per mode and kind."""
    rng = random.Random(seed)
    channels = [getattr(pb, name) for name, _ in CHANNEL_MIX]
    weights = [share for _, share in CHANNEL_MIX]
    modes = list(addresses)
    conns = {m: grpc.insecure_channel(a, options=CLIENT_OPTIONS) for m, a in addresses.items()}
    stubs = {m: pb_grpc.DecisionServiceStub(c) for m, c in conns.items()}
    decided: dict[str, collections.deque] = {m: collections.deque(maxlen=5000) for m in modes}
    n = int((warmup + duration) * rate)
    rec: list[list] = []  # [intended, done, mode, kind, ok]
    pending = threading.Semaphore(0)
    start = time.monotonic() + 0.3
    try:
        for i in range(n):
            mode = modes[i % 2]
            kind = (i // 2) % 3
            if kind == 1 and not decided[mode]:
                kind = 0  # no decision to respond to yet
            stub = stubs[mode]
            req: Any
            if kind == 0:
                ch = rng.choices(channels, weights)[0]
                req = pb.DecideRequest(customer_id=f"C{rng.randrange(customers):07d}", channel=ch,
                                       touchpoint=TOUCHPOINTS[pb.Channel.Name(ch)], max_actions=3)
                method = stub.Decide
            elif kind == 1:
                decision, action = decided[mode].popleft()
                req = pb.RecordResponseRequest(decision_id=decision, action_id=action,
                                               outcome=rng.choice((pb.OUTCOME_IMPRESSION, pb.OUTCOME_CLICKED,
                                                                   pb.OUTCOME_ACCEPTED, pb.OUTCOME_REJECTED)))
                method = stub.RecordResponse
            else:
                req = pb.PublishEventRequest(event_id=f"dur-{seed}-{i}-{time.time_ns()}",
                                             customer_id=f"C{rng.randrange(customers):07d}", type="data_usage",
                                             attributes={"used_ratio": f"{rng.uniform(0, 0.85):.2f}"})
                method = stub.PublishEvent
            intended = start + i / rate
            row = [intended, 0.0, mode, kind, False]
            rec.append(row)
            delay = intended - time.monotonic()
            if delay > 0:
                time.sleep(delay)

            def done(fut, row=row, mode=mode) -> None:
                row[1] = time.monotonic()
                if fut.exception() is None:
                    row[4] = True
                    reply = fut.result()
                    if row[3] == 0 and reply.actions and not reply.degraded:
                        decided[mode].append((reply.decision_id, reply.actions[0].action_id))
                pending.release()

            method.future(req, timeout=2.0).add_done_callback(done)
        deadline = time.monotonic() + 5
        for _ in range(n):
            if not pending.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
    finally:
        for c in conns.values():
            c.close()
    out: dict[str, dict[str, list[float]]] = {m: {k: [] for k in KINDS} for m in modes}
    for intended, finished, mode, kind, ok in rec:
        if intended < start + warmup:
            continue
        out[mode][KINDS[kind]].append((finished - intended) * 1000 if ok and finished else float("nan"))
    return {m: {k: np.array(v) for k, v in ks.items()} for m, ks in out.items()}


def run(args: argparse.Namespace) -> int:
    """The comparison with ``faults.py``'s arguments (``--durability``)."""
    args.rate = args.rate or 150.0
    args.duration = args.duration or 20.0
    base = Path(args.workdir or tempfile.mkdtemp(prefix="nba-durability-"))
    procs: dict[str, subprocess.Popen] = {}
    ports = {m: free_port() for m in MODES}
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
    rounds: dict[str, dict[str, list[np.ndarray]]] = {m: {k: [] for k in KINDS} for m in MODES}
    try:
        for mode in MODES:
            (base / mode).mkdir(parents=True, exist_ok=True)
            cmd = serve_command(f"127.0.0.1:{ports[mode]}", "--fsync", mode, "--data-dir", str(base / mode),
                                "--customers", str(args.customers), models_dir=args.models_dir, demo=True)
            procs[mode] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=(base / f"{mode}.log").open("w"),
                                           stderr=subprocess.STDOUT)
        for mode in MODES:
            began = time.monotonic()
            while worker_pid(f"127.0.0.1:{ports[mode]}", data_dir=base / mode) is None:  # its admin token
                if procs[mode].poll() is not None or time.monotonic() - began > 300:
                    raise SystemExit(f"nba serve --fsync {mode} did not start ({base / mode}.log)")
                time.sleep(0.2)
        # CONFIG and INFO are beyond the service user's ACL: each embedded Redis's admin user reads them
        clients = {m: redis.Redis.from_url((base / m / "redis" / "redis.admin.url").read_text().strip()) for m in MODES}
        policy = {m: clients[m].config_get("appendfsync")["appendfsync"] for m in MODES}
        assert policy == {m: m for m in MODES}, policy
        log(f"serving: {policy}; data in {base}")
        gc.disable()  # the client's collector would stall the sender (see faults.py)
        rounds_run({m: f"127.0.0.1:{ports[m]}" for m in MODES}, args.rate, 5, 0, args.customers, seed=99)  # warm-up
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            lat = rounds_run({m: f"127.0.0.1:{ports[m]}" for m in order}, args.rate, args.duration, args.warmup,
                             args.customers, seed=r)
            for m in MODES:
                for k in KINDS:
                    rounds[m][k].append(lat[m][k])
            log(f"round {r + 1}: " + "  ".join(
                f"{m} {k} p50 {np.nanpercentile(lat[m][k], 50):.2f} p99 {np.nanpercentile(lat[m][k], 99):.2f}"
                for m in MODES for k in KINDS))
        gc.enable()
        delayed = {m: int(clients[m].info("persistence")["aof_delayed_fsync"]) for m in MODES}
        disk = fsync_cost(base)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    table = {m: {k: summary(np.concatenate(rounds[m][k])) | {
        "rounds_p50_ms": per_round(rounds[m][k], "p50"), "rounds_p99_ms": per_round(rounds[m][k], "p99")} for k in KINDS}
        for m in MODES}
    ratio = {k: ratios(table["always"][k], table["everysec"][k]) for k in KINDS}
    print(f"{args.rounds} rounds x {args.duration:g}s at {args.rate:g} calls/s in total, alternating; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'':10} {'call':15} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'calls':>6} {'errors':>6}")
    for m in MODES:
        for k in KINDS:
            t = table[m][k]
            print(f"{m:10} {k:15} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {t['p999_ms']:9.3f} {t['calls']:6} {t['errors']:6}")
    for k in KINDS:
        print(ratio_line(f"always / everysec {k}", ratio[k]))
    print(f"write + fdatasync of 300 B on this disk: {disk}; aof_delayed_fsync: {delayed}")
    write_json(args.json, {"table": table, "ratios": ratio, "fdatasync": disk, "aof_delayed_fsync": delayed,
                           "rate": args.rate, "rounds": args.rounds, "duration": args.duration})
    return 0
