"""Open-loop gRPC load generator for Decide, with SLO check, JSON result and PNG report.

Requests are sent at a constant arrival rate, split over several client processes; each latency is
measured from the request's *intended* send time, so a server that falls behind shows up as queueing
in the tail instead of silently slowing the sender down (no coordinated omission). Every run is
bounded: warm-up seconds, then measured seconds, then at most ``--drain`` seconds for stragglers.

    python loadtest/loadgen.py --address 127.0.0.1:50051 --rate 400 --duration 20 --slo p99=5ms \\
        --json result.json --png result.png
    python loadtest/loadgen.py --find-max --slo p99=5ms --start-rate 100 --max-rate 3000
    nba loadtest ...   (the same)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Channel mix of a contact-center-heavy telco: (channel enum name, share).
CHANNEL_MIX = (("CHANNEL_WEB", 0.35), ("CHANNEL_MOBILE_APP", 0.25), ("CHANNEL_CALL_CENTER", 0.25),
               ("CHANNEL_EMAIL", 0.07), ("CHANNEL_SMS", 0.03), ("CHANNEL_BRANCH", 0.03),
               ("CHANNEL_POINT_OF_SALE", 0.02))
TOUCHPOINTS = {"CHANNEL_WEB": "web.home.hero", "CHANNEL_MOBILE_APP": "app.home.card",
               "CHANNEL_CALL_CENTER": "call_center.inbound", "CHANNEL_EMAIL": "email.weekly",
               "CHANNEL_SMS": "sms.outbound", "CHANNEL_BRANCH": "branch.desk", "CHANNEL_POINT_OF_SALE": "pos.till"}
INTENTS = ("", "", "", "billing", "upgrade", "cancel", "tech_support")


@dataclass
class Workload:
    address: str
    customers: int = 20_000
    hot_customers: int = 500  # a small set of customers that call often (agents re-querying, app refreshes)
    hot_share: float = 0.3
    cold_share: float = 0.05  # unknown customers: cold starts
    max_actions: int = 3
    timeout: float = 2.0
    # TCP connections per client process, used in turn: many desktops and app servers, not one pipe, so
    # that the kernel spreads them over workers sharing a port (it balances connections, not calls).
    connections: int = 4
    # TLS (and mTLS with tls_cert/tls_key); a bearer token for --auth servers: ``token``, else the one in
    # ``token_file``, else env NBA_TOKEN (engine.serving.client.open_channel)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    token_file: str | None = None


def pick_customer(rng: random.Random, work: Workload, new_id: Callable[[], str]) -> str:
    """A customer id of ``work``'s mix: an unknown one (``new_id()``, a cold start), a hot one or any."""
    r = rng.random()
    if r < work.cold_share:
        return new_id()
    if r < work.cold_share + work.hot_share:
        return f"C{rng.randrange(work.hot_customers):07d}"
    return f"C{rng.randrange(work.customers):07d}"


def _client(work: Workload, rate: float, start: float, warmup: float, duration: float, drain: float,
            seed: int, out: mp.Queue) -> None:
    """One client process: open loop at ``rate`` from wall-clock ``start``; returns arrays via ``out``."""
    import grpc

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.serving.client import open_channel

    rng = random.Random(seed)
    channels = [getattr(pb, name) for name, _ in CHANNEL_MIX]
    weights = [share for _, share in CHANNEL_MIX]
    total = warmup + duration
    n = int(total * rate)
    intended = np.empty(n)
    latency = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    pending = threading.Semaphore(0)

    def request(i: int) -> pb.DecideRequest:
        cid = pick_customer(rng, work, lambda: f"LOAD-NEW-{seed}-{i}")
        channel = rng.choices(channels, weights)[0]
        name = pb.Channel.Name(channel)
        intent = rng.choice(INTENTS)
        return pb.DecideRequest(customer_id=cid, channel=channel, touchpoint=TOUCHPOINTS[name],
                                context={"intent": intent} if intent else {}, max_actions=work.max_actions)

    def done(i: int):
        def callback(fut: grpc.Future) -> None:
            latency[i] = time.time() - intended[i]
            ok[i] = fut.exception() is None
            pending.release()
        return callback

    # a local subchannel pool per channel: otherwise channels to one address share one connection
    conns = [open_channel(work.address, work.tls_ca, work.tls_cert, work.tls_key, work.token,
                          options=[("grpc.use_local_subchannel_pool", 1)], retry=False, token_file=work.token_file)
             for _ in range(work.connections)]
    try:
        stubs = [pb_grpc.DecisionServiceStub(c).Decide.future for c in conns]
        requests = [request(i) for i in range(n)]  # built ahead so the send loop only sends
        while time.time() < start:
            time.sleep(min(0.01, max(0.0, start - time.time())))
        for i in range(n):
            intended[i] = start + i / rate
            delay = intended[i] - time.time()
            if delay > 0:
                time.sleep(delay)
            stubs[i % len(stubs)](requests[i], timeout=work.timeout).add_done_callback(done(i))
        deadline = time.time() + drain
        for _ in range(n):
            if not pending.acquire(timeout=max(0.0, deadline - time.time())):
                break
    finally:
        for c in conns:
            c.close()
    measured = intended >= start + warmup
    out.put({"intended": intended[measured], "latency": latency[measured], "ok": ok[measured]})


def run(work: Workload, rate: float, duration: float, warmup: float = 3.0, processes: int = 2,
        drain: float = 5.0) -> dict:
    """One open-loop run at ``rate`` requests/s split over ``processes`` clients; the result dict."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start = time.time() + 2.0 + 0.3 * processes  # time for the spawned clients to import grpc
    procs = [ctx.Process(target=_client, args=(work, rate / processes, start + k / rate, warmup, duration,
                                                  drain, 1000 * k + int(rate), out), daemon=True)
             for k in range(processes)]
    for p in procs:
        p.start()
    parts = [out.get(timeout=start - time.time() + warmup + duration + drain + 60) for _ in procs]
    for p in procs:
        p.join(10)
    intended = np.concatenate([p["intended"] for p in parts])
    latency = np.concatenate([p["latency"] for p in parts])
    ok = np.concatenate([p["ok"] for p in parts])
    return summarize(rate, duration, intended, latency, ok)


def summarize(rate: float, duration: float, intended: np.ndarray, latency: np.ndarray, ok: np.ndarray) -> dict:
    answered = ~np.isnan(latency)
    good = answered & ok
    ms = latency[good] * 1000
    errors = int((~good).sum())  # failed or never answered within the drain time

    def pct(q: float) -> float:
        return float(np.percentile(ms, q)) if len(ms) else float("inf")

    order = np.argsort(intended)
    t0 = intended.min() if len(intended) else 0.0
    seconds = np.floor(intended[order] - t0).astype(int)
    series = []
    for s in range(int(duration)):
        sel = (seconds == s) & good[order]
        lat = latency[order][sel] * 1000
        if len(lat):
            series.append({"t": s, "p50_ms": float(np.percentile(lat, 50)),
                           "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())})
    return {
        "offered_rps": rate,
        "achieved_rps": float(good.sum() / duration) if duration else 0.0,
        "requests": int(len(latency)),
        "errors": errors,
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "p999_ms": pct(99.9),
        "max_ms": float(ms.max()) if len(ms) else float("inf"),
        "series": series,
    }


def parse_slo(items: list[str]) -> dict[str, float]:
    """``["p99=5ms", "p50=1.5ms"]`` -> ``{"p99_ms": 5.0, "p50_ms": 1.5}``."""
    slo = {}
    for item in items:
        key, _, value = item.partition("=")
        key = {"p50": "p50_ms", "p90": "p90_ms", "p99": "p99_ms", "p99.9": "p999_ms", "p999": "p999_ms",
               "max": "max_ms"}.get(key.strip())
        if key is None or not value:
            raise SystemExit(f"--slo {item!r}: expected e.g. p99=5ms (p50, p90, p99, p99.9, max)")
        value = value.strip()
        scale = 1.0
        if value.endswith("ms"):
            value = value[:-2]
        elif value.endswith("us"):
            value, scale = value[:-2], 0.001
        elif value.endswith("s"):
            value, scale = value[:-1], 1000.0
        slo[key] = float(value) * scale
    return slo


def missed(result: dict, slo: dict[str, float]) -> list[str]:
    misses = [f"{k} {result[k]:.3f} > {v:g}" for k, v in slo.items() if result[k] > v]
    if result["errors"]:
        misses.append(f"{result['errors']} errors")
    return misses


def find_max(work: Workload, slo: dict[str, float], start_rate: float, max_rate: float, step: float,
             duration: float, warmup: float, processes: int, repeats: int = 1) -> dict:
    """Raise the offered rate by ``step`` until the SLO breaks, then bisect once; highest rate that held.
    With ``repeats`` > 1 each rate runs that many times and is judged on the run with the median p99
    (on a noisy machine one unlucky run should neither make nor break a rate); an error in any run
    breaks it."""
    steps, rate, best = [], start_rate, None

    def attempt(rate: float) -> dict:
        runs = [run(work, rate, duration, warmup, processes) for _ in range(repeats)]
        result = sorted(runs, key=lambda r: r["p99_ms"])[len(runs) // 2]
        if repeats > 1:
            result["p99_ms_of_runs"] = [r["p99_ms"] for r in runs]
        result["held"] = not missed(result, slo) and not any(r["errors"] for r in runs)
        steps.append(result)
        print(_line(result), flush=True)
        return result

    while rate <= max_rate:
        result = attempt(rate)
        if not result["held"]:
            break
        best = result
        rate *= step
    if best is not None and not steps[-1]["held"]:
        result = attempt((best["offered_rps"] + steps[-1]["offered_rps"]) / 2)
        if result["held"]:
            best = result
    return {"max_rps_meeting_slo": best["offered_rps"] if best else 0.0, "best": best, "steps": steps,
            "slo": slo, "repeats": repeats}


def _line(r: dict) -> str:
    held = "" if "held" not in r else ("  held" if r["held"] else "  BROKEN")
    if "p99_ms_of_runs" in r:
        held += f" (p99 of the runs: {', '.join(f'{x:.3f}' for x in r['p99_ms_of_runs'])})"
    return (f"offered {r['offered_rps']:8.1f}/s achieved {r['achieved_rps']:8.1f}/s  p50 {r['p50_ms']:7.3f}  "
            f"p90 {r['p90_ms']:7.3f}  p99 {r['p99_ms']:8.3f}  p99.9 {r['p999_ms']:8.3f}  max {r['max_ms']:8.3f} ms"
            f"  errors {r['errors']}{held}")


def plot(result: dict, path: str) -> None:
    """Latency percentiles over time (one run), or against offered load (--find-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "steps" in result:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        steps = result["steps"]
        rates = [s["offered_rps"] for s in steps]
        order = np.argsort(rates)
        for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
            ax1.plot(np.array(rates)[order], np.array([s[key] for s in steps])[order], marker="o", label=label)
        for key, limit in result["slo"].items():
            ax1.axhline(limit, color="red", linestyle="--", linewidth=1, label=f"SLO {key[:-3]} {limit:g} ms")
        ax1.set(xlabel="offered load (requests/s)", ylabel="latency (ms)", yscale="log",
                title=f"Decide latency vs offered load (max meeting SLO: {result['max_rps_meeting_slo']:.0f}/s)")
        ax1.legend()
        over_time = result["best"] or steps[0]
    else:
        fig, ax2 = plt.subplots(1, 1, figsize=(7, 4.5))
        over_time = result
    series = over_time["series"]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        ax2.plot([s["t"] for s in series], [s[key] for s in series], label=label)
    ax2.set(xlabel="second of the measured run", ylabel="latency (ms)", yscale="log",
            title=f"Decide latency over time at {over_time['offered_rps']:.0f}/s")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_channel(work: Workload) -> None:
    """A token file that cannot be read, or a token for plaintext off loopback: one error here, before the
    client processes start (each would fail alike)."""
    from engine.serving.client import ClientSecurityError, open_channel

    try:
        open_channel(work.address, work.tls_ca, work.tls_cert, work.tls_key, work.token,
                     token_file=work.token_file).close()
    except (ClientSecurityError, OSError) as exc:
        raise SystemExit(f"nba loadtest: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    from engine.commands.options import RefusedToken

    ap = argparse.ArgumentParser(prog="nba loadtest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default="127.0.0.1:50051")
    ap.add_argument("--rate", type=float, default=200.0, help="offered requests per second")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds sent but not measured")
    ap.add_argument("--processes", type=int, default=2, help="client processes sharing the rate")
    ap.add_argument("--connections", type=int, default=4, help="connections per client process, used in turn")
    ap.add_argument("--customers", type=int, default=20_000, help="ids C0000000.. that exist")
    ap.add_argument("--cold-share", type=float, default=0.05, help="share of unknown customers")
    ap.add_argument("--hot-share", type=float, default=0.3, help="share of requests for 500 hot customers")
    ap.add_argument("--slo", action="append", default=[], metavar="pNN=Xms", help="e.g. p99=5ms (repeatable)")
    ap.add_argument("--find-max", action="store_true", help="step the rate up until the SLO breaks")
    ap.add_argument("--start-rate", type=float, default=100.0)
    ap.add_argument("--max-rate", type=float, default=5000.0)
    ap.add_argument("--step", type=float, default=1.25, help="rate multiplier per --find-max step")
    ap.add_argument("--repeats", type=int, default=1, help="--find-max: runs per rate, judged on the median p99")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--png", help="write latency plots here")
    ap.add_argument("--tls-ca", help="CA bundle to verify the server (TLS)")
    ap.add_argument("--tls-cert", help="client certificate (mTLS)")
    ap.add_argument("--tls-key", help="client certificate's key (mTLS)")
    ap.add_argument("--token-file", metavar="FILE", help="file holding the bearer token for a server with --auth "
                    "(default: env NBA_TOKEN); sent only over TLS or to a loopback address")
    ap.add_argument("--token", action=RefusedToken, help=argparse.SUPPRESS)  # as the nba commands refuse it
    args = ap.parse_args(argv)

    slo = parse_slo(args.slo)
    work = Workload(args.address, customers=args.customers, cold_share=args.cold_share, hot_share=args.hot_share,
                    connections=args.connections, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                    token_file=args.token_file)
    _check_channel(work)
    if args.find_max:
        if not slo:
            raise SystemExit("--find-max needs an --slo")
        result = find_max(work, slo, args.start_rate, args.max_rate, args.step, args.duration, args.warmup,
                          args.processes, args.repeats)
        print(f"highest offered rate meeting {', '.join(args.slo)}: {result['max_rps_meeting_slo']:.1f}/s")
        failures = [] if result["best"] else ["no rate met the SLO"]
    else:
        result = run(work, args.rate, args.duration, args.warmup, args.processes)
        print(_line(result))
        failures = missed(result, slo)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.png:
        plot(result, args.png)
    if failures:
        print("SLO missed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
