"""Decide latency over TLS with token authentication against plaintext, same load, same run.

Two ``nba serve --workers 1`` processes on one Redis (demo customers, contact policies on): one
plaintext without auth, one serving TLS only with ``--auth`` (every call carries a bearer token that
the interceptor checks against its SHA-256 and the caller's role). One open-loop client sends at a
constant total rate and alternates requests between the two (same customer and channel mix, request by
request; who goes first alternates by round), so machine noise hits both alike. Certificates are made
for the run (tests/certs.py). Prints p50/p99/p99.9 per mode and the ratios secure/plain.

    python loadtest/tls_overhead.py --rate 200 --duration 15 --rounds 4 --json /tmp/tls.json
"""

from __future__ import annotations

import argparse
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

from contact_p99 import alternate_rounds, summarize_rounds  # noqa: E402

from engine.serving.client import open_channel  # noqa: E402
from engine.serving.security import token_hash  # noqa: E402
from engine.store.redis_embedded import EmbeddedRedis, free_port  # noqa: E402
from tests.certs import CA  # noqa: E402

TOKEN = "loadtest-token"


def wait_serving(address: str, proc: subprocess.Popen, **tls) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 300
    with open_channel(address, **tls) as channel:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
    raise SystemExit("server not SERVING in 300s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--duration", type=float, default=15, help="measured seconds per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--models-dir", default=str(ROOT / "models"))
    ap.add_argument("--json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", persist=False) as redis_server:
        from engine.sim import demo
        from engine.store.profiles import ProfileStore

        demo.seed(ProfileStore.from_url(redis_server.url), args.customers)
        ca = CA(Path(tmp) / "pki")
        server = ca.issue("server", "nba.test", server=True)
        auth = Path(tmp) / "auth.yaml"
        auth.write_text(f"callers:\n  - name: loadtest\n    token_sha256: {token_hash(TOKEN)}\n    roles: [decide]\n")
        env = dict(os.environ, REDIS_URL=redis_server.url)
        ports = {"plain": free_port(), "secure": free_port()}
        extra = {"plain": [], "secure": ["--tls-cert", str(server.cert), "--tls-key", str(server.key),
                                         "--auth", str(auth)]}
        tls = {"plain": {}, "secure": {"tls_ca": ca.pem, "token": TOKEN}}
        procs = {}
        try:
            for mode in ports:
                cmd = [sys.executable, "-m", "engine.cli", "serve", "--workers", "1", "--no-demo", "--metrics-port",
                       "0", "--address", f"127.0.0.1:{ports[mode]}", "--models-dir", args.models_dir, *extra[mode]]
                procs[mode] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
            for mode in procs:
                wait_serving(f"127.0.0.1:{ports[mode]}", procs[mode], **tls[mode])
            rounds = alternate_rounds({m: f"127.0.0.1:{ports[m]}" for m in ("plain", "secure")}, args.rounds,
                                      args.rate, args.duration, args.customers,
                                      connect=lambda m, a: open_channel(a, **tls[m]))
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(30)

    table = summarize_rounds(rounds)
    ratios = {q: round(table["secure"][f"{q}_ms"] / table["plain"][f"{q}_ms"], 3) for q in ("p50", "p99", "p999")}
    print(f"{'':8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'requests':>9} {'errors':>7}  "
          f"({args.rounds} rounds x {args.duration:g}s at {args.rate:g}/s in total, alternating)")
    for mode in ("plain", "secure"):
        t = table[mode]
        print(f"{mode:8} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {t['p999_ms']:9.3f} {t['requests']:9} {t['errors']:7}")
    print("secure / plain: " + ", ".join(f"{q} x{r:.2f}" for q, r in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(table | {"ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
