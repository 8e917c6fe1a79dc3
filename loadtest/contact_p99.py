"""Decide latency with contact policies and budgets enforced vs not, same load, same run.

Two ``nba serve --workers 1`` processes on one Redis (20,000 demo customers): one enforcing
``rules/contact.yaml`` and the catalog's daily budgets (contact history read with the profile, one Lua
script presenting the actions), one with ``--no-contact-policies`` (in-process arbitration, decision
record written off the hot path). One open-loop client sends at a constant total rate and alternates
requests between the two servers (same customer and channel mix, request by request), so noise on a
shared machine hits both alike; latency counts from each request's intended send time. The table
gives each mode's percentiles over all rounds and the p99 of every round.

    python loadtest/contact_p99.py --rate 200 --duration 20 --rounds 4 --json /tmp/contact_p99.json

``--in-process N`` instead times N ``DecisionEngine.decide`` calls per mode in one process, the two
engines alternating call by call on the same request sequence (no gRPC, no client: the cost of the
contact policies and budgets themselves, with machine noise shared equally).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402
from grpc_modes import wait_serving  # noqa: E402

from engine.sim.telco import SCHEMA  # noqa: E402
from engine.store.redis_embedded import EmbeddedRedis, free_port  # noqa: E402


def alternate(addresses: dict[str, str], rate: float, duration: float, customers: int, seed: int,
              warmup: float = 2.0, connect=None) -> dict[str, np.ndarray]:
    """Open loop at ``rate`` requests/s in total, request i to mode i % 2; latencies (ms) per mode.
    ``connect(mode, address)`` opens a mode's channel (default: plaintext)."""
    import random
    import threading
    import time

    import grpc

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    channels = [getattr(pb, name) for name, _ in loadgen.CHANNEL_MIX]
    weights = [share for _, share in loadgen.CHANNEL_MIX]
    modes = list(addresses)
    n = int((warmup + duration) * rate)
    requests = []
    for i in range(n // 2 + 1):  # each request goes to both modes, in turn
        r = rng.random()
        cid = (f"NEW-{seed}-{i}" if r < 0.05 else
               f"C{rng.randrange(500 if r < 0.35 else customers):07d}")
        requests.append(pb.DecideRequest(customer_id=cid, channel=rng.choices(channels, weights)[0], max_actions=3))
    intended = np.empty(n)
    latency = np.full(n, np.nan)
    pending = threading.Semaphore(0)

    def done(i: int):
        def callback(fut) -> None:
            if fut.exception() is None:
                latency[i] = time.time() - intended[i]
            pending.release()
        return callback

    opened = {m: connect(m, a) if connect else grpc.insecure_channel(a) for m, a in addresses.items()}
    try:
        stubs = {m: pb_grpc.DecisionServiceStub(ch).Decide.future for m, ch in opened.items()}
        start = time.time() + 0.5
        for i in range(n):
            intended[i] = start + i / rate
            delay = intended[i] - time.time()
            if delay > 0:
                time.sleep(delay)
            stubs[modes[i % 2]](requests[i // 2], timeout=5).add_done_callback(done(i))
        for _ in range(n):
            if not pending.acquire(timeout=10):
                break
    finally:
        for ch in opened.values():
            ch.close()
    measured = intended >= start + warmup
    return {m: latency[measured & (np.arange(n) % 2 == k)] * 1000 for k, m in enumerate(modes)}


def alternate_rounds(addresses: dict[str, str], rounds: int, rate: float, duration: float, customers: int,
                     connect=None) -> dict[str, list[np.ndarray]]:
    """``rounds`` of ``alternate``, who goes first alternating by round; prints each round's figures."""
    out: dict[str, list[np.ndarray]] = {m: [] for m in addresses}
    for r in range(rounds):
        order = dict(list(addresses.items())[::-1] if r % 2 else addresses.items())
        lat = alternate(order, rate, duration, customers, seed=r, connect=connect)
        for mode, ms in lat.items():
            out[mode].append(ms)
        print(f"round {r + 1}: " + "  ".join(
            f"{mode} p50 {np.nanpercentile(ms, 50):.3f} p99 {np.nanpercentile(ms, 99):.3f} ms "
            f"errors {int(np.isnan(ms).sum())}" for mode, ms in sorted(lat.items())), flush=True)
    return out


def summarize_rounds(rounds: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """Per mode: percentiles over all rounds' latencies (ms; NaN: failed), each round's p50 and p99."""
    table = {}
    for mode, parts in rounds.items():
        ms = np.concatenate(parts)
        good = ms[~np.isnan(ms)]
        table[mode] = {"p50_ms": round(float(np.percentile(good, 50)), 3),
                       "p99_ms": round(float(np.percentile(good, 99)), 3),
                       "p999_ms": round(float(np.percentile(good, 99.9)), 3),
                       "rounds_p50_ms": [round(float(np.nanpercentile(p, 50)), 3) for p in parts],
                       "rounds_p99_ms": [round(float(np.nanpercentile(p, 99)), 3) for p in parts],
                       "requests": int(len(ms)), "errors": int(np.isnan(ms).sum())}
    return table


def in_process(calls: int, customers: int, models_dir: str) -> dict:
    import random
    import time

    from engine.decision.funnel import DecisionEngine
    from engine.decision.request import DecideInput
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.sim import demo
    from engine.sim.telco import CHANNELS
    from engine.store.profiles import ProfileStore

    mix = dict(zip(CHANNELS, (0.25, 0.35, 0.25, 0.07, 0.03, 0.03, 0.02)))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        store = ProfileStore.from_url(redis_server.url)
        demo.seed(store, customers)
        rules = Live(load_and_compile(ROOT / "rules"), retire=lambda r: r.close())
        model = Live(ModelRegistry(models_dir, SCHEMA).load())
        engines = {"off": DecisionEngine(store, rules, model, contacts=False),
                   "on": DecisionEngine(store, rules, model, contacts=True, clock=lambda: 1_781_524_800.0)}
        for e in engines.values():
            e.warmup()
        rng = random.Random(5)
        times: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(calls + 1000):
            r = rng.random()
            cid = f"C{rng.randrange(500 if r < 0.3 else customers):07d}" if r >= 0.05 else f"NEW-{i}"
            req = DecideInput(cid, rng.choices(list(mix), list(mix.values()))[0], max_actions=3)
            for mode in (("off", "on") if i % 2 else ("on", "off")):
                t = time.perf_counter()
                engines[mode].decide(req)
                if i >= 1000:
                    times[mode].append(time.perf_counter() - t)
        rules.current.close()
    out = {}
    for mode, t in times.items():
        ms = np.asarray(t) * 1000
        out[mode] = {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
                     "p999_ms": round(float(np.percentile(ms, 99.9)), 3), "calls": len(ms)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--duration", type=float, default=15, help="measured seconds per round")
    ap.add_argument("--rounds", type=int, default=3, help="turns per mode")
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--models-dir", default=str(ROOT / "models"))
    ap.add_argument("--json")
    ap.add_argument("--in-process", type=int, default=0, metavar="CALLS")
    args = ap.parse_args()
    if args.in_process:
        table = in_process(args.in_process, args.customers, args.models_dir)
        ratio = table["on"]["p99_ms"] / table["off"]["p99_ms"]
        print(f"{'contact policies':17} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}  (in-process, {args.in_process} calls each)")
        for mode in ("off", "on"):
            t = table[mode]
            print(f"{mode:17} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {t['p999_ms']:9.3f}")
        print(f"p99 on / off: {ratio:.2f} (target <= 1.5)")
        if args.json:
            Path(args.json).write_text(json.dumps(table | {"p99_ratio": round(ratio, 3)}, indent=2))
        return 0 if ratio <= 1.5 else 1

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        from engine.sim import demo
        from engine.store.profiles import ProfileStore

        demo.seed(ProfileStore.from_url(redis_server.url), args.customers)
        env = dict(os.environ, REDIS_URL=redis_server.url)
        procs, ports = {}, {}
        try:
            for mode in ("off", "on"):
                ports[mode] = free_port()
                cmd = [sys.executable, "-m", "engine.cli", "serve", "--workers", "1", "--no-demo",
                       "--metrics-port", "0", "--address", f"127.0.0.1:{ports[mode]}",
                       "--models-dir", args.models_dir] + (["--no-contact-policies"] if mode == "off" else [])
                procs[mode] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
            for mode in procs:
                wait_serving(f"127.0.0.1:{ports[mode]}", procs[mode])
            rounds = alternate_rounds({m: f"127.0.0.1:{ports[m]}" for m in ("off", "on")}, args.rounds, args.rate,
                                      args.duration, args.customers)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(30)

    table = summarize_rounds(rounds)
    ratio = table["on"]["p99_ms"] / table["off"]["p99_ms"]
    print(f"\n{'contact policies':17} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}  p99 per round")
    for mode in ("off", "on"):
        t = table[mode]
        print(f"{mode:17} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {t['p999_ms']:9.3f}  "
              f"{', '.join(f'{x:.3f}' for x in t['rounds_p99_ms'])}")
    print(f"p99 on / off: {ratio:.2f} (target <= 1.5)")
    if args.json:
        Path(args.json).write_text(json.dumps(table | {"p99_ratio": round(ratio, 3), "rate": args.rate,
                                                       "duration": args.duration, "rounds": args.rounds}, indent=2))
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
