"""Highest Decide rate meeting an SLO with 1 worker and with N workers, measured in one run.

Seeds one embedded Redis with the demo customers, then for each worker count starts
``nba serve --workers W`` (full funnel: demo catalog, champion model), finds the highest open-loop
rate whose p99 meets the SLO (``loadgen.find_max``), and measures latency again at 50% of that rate.
The load generator runs on the same machine and competes for the same cores.

    python loadtest/bench_workers.py --workers 1 2 --slo p99=5ms --json /tmp/workers.json --png /tmp/workers.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402
from grpc_modes import wait_serving  # noqa: E402

from engine.store.redis_embedded import EmbeddedRedis, free_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 2])
    ap.add_argument("--slo", action="append", default=[], help="default p99=5ms")
    ap.add_argument("--start-rate", type=float, default=100)
    ap.add_argument("--step", type=float, default=1.25)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--processes", type=int, default=2, help="load generator processes")
    ap.add_argument("--repeats", type=int, default=3, help="runs per rate, judged on the median p99")
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--json")
    ap.add_argument("--png", help="latency vs offered load for the worker count that held the highest rate")
    args = ap.parse_args()
    slo = loadgen.parse_slo(args.slo or ["p99=5ms"])

    results = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        from engine.sim import demo
        from engine.store.profiles import ProfileStore

        demo.seed(ProfileStore.from_url(redis_server.url), args.customers)
        env = dict(os.environ, REDIS_URL=redis_server.url)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for workers in args.workers:
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--workers", str(workers), "--no-demo",
                 "--metrics-port", "0", "--address", f"127.0.0.1:{port}"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_serving(f"127.0.0.1:{port}", proc)
                work = loadgen.Workload(f"127.0.0.1:{port}", customers=args.customers)
                print(f"--- {workers} worker(s)", flush=True)
                found = loadgen.find_max(work, slo, args.start_rate, 100_000, args.step, args.duration, 2,
                                         args.processes, args.repeats)
                half = None
                if found["best"]:
                    half = loadgen.run(work, found["max_rps_meeting_slo"] / 2, args.duration, 2, args.processes)
                    print(f"at 50%: {loadgen._line(half)}", flush=True)
                results[workers] = {"find_max": found, "at_half": half}
            finally:
                proc.terminate()
                proc.wait(60)

    print(f"\nSLO {', '.join(f'{k[:-3]} <= {v:g} ms' for k, v in slo.items())}")
    print(f"{'workers':>7} {'max rate/s':>11} {'p50 ms':>8} {'p99 ms':>8} | "
          f"{'at 50%/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}")
    for w, r in results.items():
        best, half = r["find_max"]["best"], r["at_half"]
        if best is None:
            print(f"{w:>7} {'none':>11}")
            continue
        print(f"{w:>7} {best['offered_rps']:11.0f} {best['p50_ms']:8.3f} {best['p99_ms']:8.3f} | "
              f"{half['offered_rps']:9.0f} {half['p50_ms']:8.3f} {half['p99_ms']:8.3f} {half['p999_ms']:9.3f}")
    counts = sorted(results)
    if len(counts) > 1 and results[counts[0]]["find_max"]["max_rps_meeting_slo"]:
        ratio = results[counts[-1]]["find_max"]["max_rps_meeting_slo"] / results[counts[0]]["find_max"]["max_rps_meeting_slo"]
        print(f"throughput meeting the SLO, {counts[-1]} workers / {counts[0]} worker: x{ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.png:
        best = max(counts, key=lambda w: (results[w]["find_max"]["max_rps_meeting_slo"], w))
        loadgen.plot(results[best]["find_max"], args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
