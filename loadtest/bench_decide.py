"""Decide latency over gRPC on loopback, open loop, with a gRPC health-check baseline in the same run.

Starts ``nba serve`` in a child process (embedded Redis in a temporary directory, demo data, the
champion model in ./models, trained first if missing), then sends requests at a constant arrival rate
from one client. Latency is measured from each request's *intended* send time, so a slow reply delays
the next ones' numbers instead of hiding them. Bounded: ``--calls`` at ``--rate`` plus warm-up.

    python loadtest/bench_decide.py --calls 10000 --rate 500
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc  # noqa: E402
from engine.store.redis_embedded import free_port  # noqa: E402

CHANNELS = [pb.CHANNEL_WEB, pb.CHANNEL_CALL_CENTER, pb.CHANNEL_MOBILE_APP, pb.CHANNEL_EMAIL]


def start_server(customers: int, *extra: str) -> tuple[subprocess.Popen, str, tempfile.TemporaryDirectory]:
    """``nba serve`` on the embedded default (``extra``: more serve options) once it reports SERVING."""
    tmp = tempfile.TemporaryDirectory(prefix="nba-bench-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--address", f"127.0.0.1:{port}", "--metrics-port", "0",
         "--data-dir", tmp.name, "--customers", str(customers), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{proc.stdout.read()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, address, tmp
            except grpc.RpcError:
                time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become SERVING in 300s")


def open_loop(send, make_request, calls: int, rate: float) -> tuple[np.ndarray, int]:
    """Send ``calls`` requests at ``rate``/s; latency (s) from intended send to reply; errors counted."""
    latencies = np.full(calls, np.nan)
    errors = [0]
    done = threading.Semaphore(0)
    start = time.perf_counter() + 0.05

    def finish(i: int, intended: float):
        def callback(fut) -> None:
            latencies[i] = time.perf_counter() - intended
            if fut.exception() is not None:
                errors[0] += 1
            done.release()
        return callback

    for i in range(calls):
        intended = start + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(make_request(i), timeout=10).add_done_callback(finish(i, intended))
    for _ in range(calls):
        done.acquire(timeout=30)
    return latencies, errors[0]


def summary(lat: np.ndarray) -> dict[str, float]:
    ms = lat[~np.isnan(lat)] * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "p999_ms": float(np.percentile(ms, 99.9)),
            "max_ms": float(ms.max()), "calls": int(len(ms))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second (open loop)")
    ap.add_argument("--warmup", type=int, default=1_000)
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--cold-share", type=float, default=0.05, help="share of unknown customers")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    proc, address, tmp = start_server(args.customers)
    rng = random.Random(1)
    try:
        with grpc.insecure_channel(address) as channel:
            decide = pb_grpc.DecisionServiceStub(channel).Decide.future
            check = health_pb2_grpc.HealthStub(channel).Check.future

            def decide_request(i: int) -> pb.DecideRequest:
                cold = rng.random() < args.cold_share
                cid = f"NEW{i}" if cold else f"C{rng.randrange(args.customers):07d}"
                return pb.DecideRequest(customer_id=cid, channel=CHANNELS[i % len(CHANNELS)],
                                        touchpoint="bench", max_actions=3)

            def health_request(i: int) -> health_pb2.HealthCheckRequest:
                return health_pb2.HealthCheckRequest()

            open_loop(decide, decide_request, args.warmup, args.rate)
            open_loop(check, health_request, args.warmup, args.rate)
            base, base_err = open_loop(check, health_request, args.calls, args.rate)
            lat, err = open_loop(decide, decide_request, args.calls, args.rate)
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()

    result = {"offered_rps": args.rate, "calls": args.calls,
              "decide": summary(lat) | {"errors": err}, "health_baseline": summary(base) | {"errors": base_err}}
    result["ratio_p50_decide_over_health"] = result["decide"]["p50_ms"] / result["health_baseline"]["p50_ms"]
    result["ratio_p99_decide_over_health"] = result["decide"]["p99_ms"] / result["health_baseline"]["p99_ms"]
    print(f"open loop, {args.rate:g} req/s, {args.calls} calls each, one client on loopback")
    print(f"{'call':22} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'errors':>6}")
    for name, s in (("Decide", result["decide"]), ("Health.Check baseline", result["health_baseline"])):
        print(f"{name:22} {s['p50_ms']:8.3f} {s['p90_ms']:8.3f} {s['p99_ms']:8.3f} {s['p999_ms']:9.3f} "
              f"{s['max_ms']:8.3f} {s['errors']:6d}")
    print(f"Decide / baseline: p50 x{result['ratio_p50_decide_over_health']:.2f}, "
          f"p99 x{result['ratio_p99_decide_over_health']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if err else 0


if __name__ == "__main__":
    raise SystemExit(main())
