"""One-process open-loop clients: ``open_loop`` sends any call at a constant rate; ``alternate`` sends Decides
alternating request by request between two servers (on a machine shared with other work a burst of
someone else's load hits both sides of the comparison alike). Latency counts from each request's
intended send time, so a slow reply delays the next ones' numbers instead of hiding them. ``CallContext``
stands in for the gRPC context when a servicer method is called in process."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from harness.results import per_round, summary


class CallContext:
    """What a servicer method uses of ``grpc.ServicerContext`` when it is called in process: no deadline,
    and ``abort`` raises."""

    def time_remaining(self) -> None:
        return None

    def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")

Connect = Callable[[str, str], Any]  # (side, address) -> channel


def open_loop(send: Callable[..., Any], make_request: Callable[[int], Any], calls: int,
              rate: float) -> tuple[np.ndarray, int]:
    """Send ``calls`` requests at ``rate``/s through ``send(request, timeout=)`` (a ``.future`` stub method);
    latency (s, NaN: no reply) from intended send to reply; errors counted."""
    latencies = np.full(calls, np.nan)
    errors = [0]
    done = threading.Semaphore(0)
    start = time.perf_counter() + 0.05

    def finish(i: int, intended: float) -> Callable[[Any], None]:
        def callback(fut: Any) -> None:
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


def alternate(addresses: dict[str, str], rate: float, duration: float, customers: int, seed: int,
              warmup: float = 2.0, connect: Connect | None = None) -> dict[str, np.ndarray]:
    """Open loop at ``rate`` requests/s in total, request i to side i % 2 (the same request goes to both
    sides in turn); latencies (ms, NaN: failed) per side. ``connect(side, address)`` opens a side's channel
    (default: plaintext)."""
    import grpc
    from loadgen import CHANNEL_MIX

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    channels = [getattr(pb, name) for name, _ in CHANNEL_MIX]
    weights = [share for _, share in CHANNEL_MIX]
    sides = list(addresses)
    n = int((warmup + duration) * rate)
    requests = []
    for i in range(n // 2 + 1):
        r = rng.random()
        cid = f"NEW-{seed}-{i}" if r < 0.05 else f"C{rng.randrange(500 if r < 0.35 else customers):07d}"
        requests.append(pb.DecideRequest(customer_id=cid, channel=rng.choices(channels, weights)[0], max_actions=3))
    intended = np.empty(n)
    latency = np.full(n, np.nan)
    pending = threading.Semaphore(0)

    def done(i: int) -> Callable[[Any], None]:
        def callback(fut: Any) -> None:
            if fut.exception() is None:
                latency[i] = time.time() - intended[i]
            pending.release()
        return callback

    opened = {s: connect(s, a) if connect else grpc.insecure_channel(a) for s, a in addresses.items()}
    try:
        stubs = {s: pb_grpc.DecisionServiceStub(ch).Decide.future for s, ch in opened.items()}
        start = time.time() + 0.5
        for i in range(n):
            intended[i] = start + i / rate
            delay = intended[i] - time.time()
            if delay > 0:
                time.sleep(delay)
            stubs[sides[i % 2]](requests[i // 2], timeout=5).add_done_callback(done(i))
        for _ in range(n):
            if not pending.acquire(timeout=10):
                break
    finally:
        for ch in opened.values():
            ch.close()
    measured = intended >= start + warmup
    return {s: latency[measured & (np.arange(n) % 2 == k)] * 1000 for k, s in enumerate(sides)}


def alternate_rounds(addresses: dict[str, str], rounds: int, rate: float, duration: float, customers: int,
                     connect: Connect | None = None) -> dict[str, list[np.ndarray]]:
    """``rounds`` of ``alternate``, who goes first alternating by round; prints each round's figures."""
    out: dict[str, list[np.ndarray]] = {s: [] for s in addresses}
    for r in range(rounds):
        order = dict(list(addresses.items())[::-1] if r % 2 else addresses.items())
        lat = alternate(order, rate, duration, customers, seed=r, connect=connect)
        for side, ms in lat.items():
            out[side].append(ms)
        print(f"round {r + 1}: " + "  ".join(
            f"{side} p50 {np.nanpercentile(ms, 50):.3f} p99 {np.nanpercentile(ms, 99):.3f} ms "
            f"errors {int(np.isnan(ms).sum())}" for side, ms in sorted(lat.items())), flush=True)
    return out


def summarize_rounds(rounds: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """Per side: percentiles over all rounds' latencies (ms; NaN: failed), each round's p50 and p99."""
    return {side: summary(np.concatenate(parts)) | {"rounds_p50_ms": per_round(parts, "p50"),
                                                    "rounds_p99_ms": per_round(parts, "p99"),
                                                    "requests": int(sum(len(p) for p in parts))}
            for side, parts in rounds.items()}
