"""Sync (thread pool) vs asyncio gRPC server for Decide, one worker process each, same load, same run.

Both servers wrap the same DecisionEngine; the asyncio one calls it directly on the event loop (a
decision is ~0.5 ms of CPU and one Redis round trip, so one process is one core either way). Each
mode is driven open-loop by loadgen at the same rates, one after the other.

    python loadtest/grpc_modes.py --rates 200 400 600 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402

from engine.store.redis_embedded import EmbeddedRedis, free_port  # noqa: E402


def serve_aio(port: int, redis_url: str) -> None:
    """An asyncio gRPC server with the real engine (Decide + health), until killed."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.config import Config
    from engine.decision.request import DecideInput
    from engine.serving.app import App
    from engine.serving.server import CHANNEL_FROM_PB, decision_to_pb

    app = App(Config(redis_url=redis_url, demo=False, metrics_port=0)).start()

    class Decisions(pb_grpc.DecisionServiceServicer):
        async def Decide(self, request, context):
            d = app.engine.decide(DecideInput(request.customer_id, CHANNEL_FROM_PB[request.channel],
                                              request.touchpoint, dict(request.context), request.max_actions))
            return decision_to_pb(d)

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_DecisionServiceServicer_to_server(Decisions(), server)
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        await server.wait_for_termination()

    asyncio.run(main())


def wait_serving(address: str, proc: subprocess.Popen) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 300
    with grpc.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit("server not SERVING in 300s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[200, 400, 600])
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--json")
    ap.add_argument("--serve-aio", nargs=2, metavar=("PORT", "REDIS_URL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_aio:
        serve_aio(int(args.serve_aio[0]), args.serve_aio[1])
        return 0

    results = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        from engine.sim import demo
        from engine.store.profiles import ProfileStore

        store = ProfileStore.from_url(redis_server.url)
        demo.seed(store, args.customers)
        env = dict(os.environ, REDIS_URL=redis_server.url)
        for mode in ("sync", "asyncio"):
            port = free_port()
            cmd = ([sys.executable, "-m", "engine.cli", "serve", "--workers", "1", "--no-demo", "--metrics-port", "0",
                    "--address", f"127.0.0.1:{port}"] if mode == "sync" else
                   [sys.executable, __file__, "--serve-aio", str(port), redis_server.url])
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_serving(f"127.0.0.1:{port}", proc)
                work = loadgen.Workload(f"127.0.0.1:{port}", customers=args.customers)
                results[mode] = []
                for rate in args.rates:
                    r = loadgen.run(work, rate, args.duration, warmup=2, processes=1)
                    r.pop("series")
                    results[mode].append(r)
                    print(f"{mode:8} {loadgen._line(r)}", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"\n{'rate/s':>7} {'sync p50':>9} {'aio p50':>9} {'sync p99':>9} {'aio p99':>9} {'p99 aio/sync':>13}")
    for s, a in zip(results["sync"], results["asyncio"]):
        print(f"{s['offered_rps']:7.0f} {s['p50_ms']:9.3f} {a['p50_ms']:9.3f} {s['p99_ms']:9.3f} {a['p99_ms']:9.3f} "
              f"{a['p99_ms'] / s['p99_ms']:13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
