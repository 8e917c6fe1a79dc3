"""PublishEvent: time until the trigger is visible to Decide, open loop, and throughput on one process.

Starts ``nba serve --workers 1`` in a child process (embedded Redis in a temporary directory, demo data,
the champion model in ./models, trained first if missing). One client on loopback then:

1. baselines at ``--rate``: ``Health/Check`` (the gRPC round trip) and ``PublishEvent`` of
   ``complaint_resolved`` (an event no pattern part uses: validation, dedupe, history, log, clear);
2. ``PublishEvent`` of ``contact_request`` for distinct customers at ``--rate`` (each raises
   ``callback_requested`` and schedules an absence timer). Every reply is handed to checker threads
   that read the customer's triggers through ``ProfileStore.fetch`` (the one round trip Decide uses to
   read the profile and triggers) until the trigger is there: *visible after return* is that time
   from the reply, *end to end* from the event's intended send time. Every ``--decide-every``-th
   event is checked instead by a real ``Decide`` on call_center sent right after the reply, which
   must put ``callback_customer`` on top (*Decide after return*: reply to Decide reply);
3. throughput: ``PublishEvent`` closed loop with ``--inflight`` calls outstanding for ``--max-seconds``.

One client channel is one connection, which the kernel gives to one worker of several sharing the
port, so the server runs one worker process.

Latency counts from each request's intended send time (open loop), so queueing shows. Bounded.

    python loadtest/bench_events.py --rate 500 --seconds 20 --json /tmp/bench_events.json
"""

from __future__ import annotations

import queue
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

sys.path.insert(0, str(ROOT / "loadtest"))

from harness import args as common  # noqa: E402
from harness import results  # noqa: E402
from harness.clients import open_loop  # noqa: E402
from harness.servers import embedded_serve  # noqa: E402

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc  # noqa: E402
from engine.sim.telco import SCHEMA  # noqa: E402
from engine.store.profiles import ProfileStore  # noqa: E402


def summary(seconds: np.ndarray) -> dict:
    """p50/p90/p99/p99.9/max in ms of latencies in seconds (NaN: none)."""
    return results.summary(seconds, keys=("p50", "p90", "p99", "p999", "max"), scale=1000, digits=None)


def visibility(publish, decide, store: ProfileStore, calls: int, rate: float, decide_every: int, prefix: str,
               check_every: int = 1, checkers: int = 2) -> dict:
    """The open-loop contact-request run with trigger checks after every reply."""
    replies: queue.Queue = queue.Queue()
    reply_at = np.full(calls, np.nan)
    visible_at = np.full(calls, np.nan)
    decide_after = np.full(calls, np.nan)
    reads = np.zeros(calls, dtype=np.int64)
    wrong_top = [0]

    def checker() -> None:
        while True:
            item = replies.get()
            if item is None:
                return
            i, customer = item
            if decide_every and i % decide_every == 0:  # this one is checked by a real Decide only
                reply = decide(pb.DecideRequest(customer_id=customer, channel=pb.CHANNEL_CALL_CENTER, max_actions=3),
                               timeout=10)
                decide_after[i] = time.perf_counter()
                if not reply.actions or reply.actions[0].action_id != "callback_customer":
                    wrong_top[0] += 1
                continue
            n = 0
            while n < 10_000:
                n += 1
                if "callback_requested" in store.fetch(customer, SCHEMA).triggers:
                    visible_at[i] = time.perf_counter()
                    break
            reads[i] = n

    threads = [threading.Thread(target=checker, daemon=True) for _ in range(checkers)]
    for t in threads:
        t.start()

    def send(request, timeout):
        fut = publish(request, timeout=timeout)
        i = int(request.event_id.rsplit("-", 1)[1])

        def done(f) -> None:
            reply_at[i] = time.perf_counter()
            if f.exception() is None and (i % check_every == 0 or (decide_every and i % decide_every == 0)):
                replies.put((i, request.customer_id))
        fut.add_done_callback(done)
        return fut

    def request(i: int) -> pb.PublishEventRequest:
        return pb.PublishEventRequest(event_id=f"{prefix}-{i}", customer_id=f"{prefix}{i}", type="contact_request",
                                      attributes={"topic": "billing"})

    latency, errors = open_loop(send, request, calls, rate)
    for _ in threads:
        replies.put(None)
    for t in threads:
        t.join(60)
    intended = reply_at - latency  # open_loop's intended send times (its callback runs right after ours)
    sampled = ~np.isnan(decide_after)
    checked = ~sampled & (np.arange(calls) % check_every == 0)
    after_return = (visible_at - reply_at)[checked]
    end_to_end = (visible_at - intended)[checked]
    return {
        "publish": summary(latency) | {"errors": errors},
        "visible_after_return": summary(after_return),
        "end_to_end_send_to_visible": summary(end_to_end),
        "decide_after_return": summary((decide_after - reply_at)[sampled]) | {"wrong_top": wrong_top[0]},
        "reads_needed_max": int(reads.max()),
        "never_visible": int(np.isnan(visible_at[checked]).sum()),
    }


def throughput(publish, seconds: float, inflight: int, prefix: str) -> dict:
    """Closed loop: ``inflight`` PublishEvent calls outstanding for ``seconds``; replies per second."""
    slots = threading.Semaphore(inflight)
    ok, errors = [0], [0]
    lock = threading.Lock()
    i = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        slots.acquire()
        fut = publish(pb.PublishEventRequest(event_id=f"{prefix}-{i}", customer_id=f"{prefix}{i % 50_000}",
                                             type="contact_request", attributes={"topic": "sales"}), timeout=10)

        def done(f) -> None:
            with lock:
                if f.exception() is None:
                    ok[0] += 1
                else:
                    errors[0] += 1
            slots.release()
        fut.add_done_callback(done)
        i += 1
    for _ in range(inflight):
        slots.acquire(timeout=30)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "ok": ok[0], "errors": errors[0], "events_per_s": ok[0] / elapsed,
            "inflight": inflight}


def in_process(calls: int) -> dict:
    """``EventProcessor.publish`` in a loop, no gRPC: an App on its own embedded Redis (demo rules)."""
    import uuid

    from engine.config import Config
    from engine.serving.app import App
    from engine.store.redis_embedded import EmbeddedRedis

    tmp = tempfile.TemporaryDirectory(prefix="nba-bench-events-")
    server = EmbeddedRedis(Path(tmp.name) / "redis", persist=False).start()
    app = App(Config(redis_url=server.url, demo_customers=500, metrics_port=0, rules_watch_seconds=0,
                     events_poll_seconds=0)).start()
    out = {}
    try:
        for kind, attrs, n in (("complaint_resolved", {}, calls), ("contact_request", {"topic": "billing"}, calls),
                               ("payment_failed", {"amount": "3"}, calls), ("data_usage", {"used_ratio": "0.95"}, calls // 4)):
            took = []
            for i in range(n):
                started = time.perf_counter()
                app.events.publish(uuid.uuid4().hex, f"{kind[:2].upper()}{i}", kind, attrs)
                took.append(time.perf_counter() - started)
            out[kind] = summary(np.array(took)) | {"what": {"complaint_resolved": "no pattern part",
                                                            "contact_request": "raises a trigger, opens a timer",
                                                            "payment_failed": "first of two: no match",
                                                            "data_usage": "raises a trigger + outbound Decide"}[kind]}
    finally:
        app.close()
        server.stop()
        tmp.cleanup()
    return out


def main() -> int:
    ap = common.parser(__doc__)
    common.add_load(ap, rate=500.0, rate_help="events per second (open loop)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each open-loop run")
    ap.add_argument("--warmup", type=int, default=1_000, help="calls of each kind before measuring")
    ap.add_argument("--decide-every", type=int, default=10, help="a Decide after every n-th event's reply (0: none)")
    ap.add_argument("--check-every", type=int, default=1,
                    help="read the triggers after every n-th event's reply (the checks load the same 2 cores)")
    ap.add_argument("--max-seconds", type=float, default=10.0, help="length of the throughput run")
    ap.add_argument("--inflight", type=int, default=64)
    common.add_customers(ap, 2_000)
    common.add_json(ap)
    ap.add_argument("--in-process", type=int, metavar="N",
                    help="instead: time EventProcessor.publish N times per event type, no gRPC, and exit")
    args = ap.parse_args()

    if args.in_process:
        result = in_process(args.in_process)
        print(f"in process, no gRPC, {args.in_process} events per type (data_usage: a quarter)")
        for kind, s in result.items():
            print(f"{kind:20} p50 {s['p50_ms'] * 1000:6.0f} us  p99 {s['p99_ms'] * 1000:6.0f} us  ({s['what']})")
        results.write_json(args.json, result)
        return 0

    calls = int(args.rate * args.seconds)
    # one worker: one client channel is one connection, which the kernel gives to one worker of several
    with embedded_serve(args.customers, workers=1) as (_, address, data):
        # the embedded redis-server, started before SERVING, leaves its URL in its data directory
        store = ProfileStore.from_url((data / "redis" / "redis.url").read_text().strip())
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.DecisionServiceStub(channel)
            publish, decide = stub.PublishEvent.future, stub.Decide
            check = health_pb2_grpc.HealthStub(channel).Check.future

            def health_request(i: int) -> health_pb2.HealthCheckRequest:
                return health_pb2.HealthCheckRequest()

            def resolved_request(i: int) -> pb.PublishEventRequest:
                return pb.PublishEventRequest(event_id=f"base-{i}", customer_id=f"BASE{i}", type="complaint_resolved")

            def warm_request(i: int) -> pb.PublishEventRequest:
                return pb.PublishEventRequest(event_id=f"warm-{i}", customer_id=f"WARM{i}", type="contact_request",
                                              attributes={"topic": "other"})

            open_loop(publish, warm_request, args.warmup, args.rate)
            open_loop(check, health_request, args.warmup, args.rate)
            health, health_err = open_loop(check, health_request, calls, args.rate)
            resolved, resolved_err = open_loop(publish, resolved_request, calls, args.rate)
            result = visibility(publish, decide, store, calls, args.rate, args.decide_every, "EV", args.check_every)
            result["health_baseline"] = summary(health) | {"errors": health_err}
            result["publish_no_pattern_baseline"] = summary(resolved) | {"errors": resolved_err}
            result["throughput"] = throughput(publish, args.max_seconds, args.inflight, "TP")
        store.client.close()

    result.update(offered_eps=args.rate, calls=calls, check_every=args.check_every, decide_every=args.decide_every)
    base = result["health_baseline"]
    result["ratio_p50_publish_over_health"] = result["publish"]["p50_ms"] / base["p50_ms"]
    result["ratio_p99_publish_over_health"] = result["publish"]["p99_ms"] / base["p99_ms"]
    result["ratio_p99_end_to_end_over_no_pattern_publish"] = (
        result["end_to_end_send_to_visible"]["p99_ms"] / result["publish_no_pattern_baseline"]["p99_ms"])
    print(f"open loop, {args.rate:g} events/s, {calls} calls each, one client on loopback, one server "
          f"process; triggers read after every {args.check_every}th reply, Decide after every "
          f"{args.decide_every}th")
    print(results.table({name: result[key] for name, key in (
        ("PublishEvent contact_request", "publish"), ("trigger visible after return", "visible_after_return"),
        ("send -> trigger visible (end to end)", "end_to_end_send_to_visible"),
        ("Decide after return (callback on top)", "decide_after_return"),
        ("PublishEvent no-pattern baseline", "publish_no_pattern_baseline"), ("Health.Check baseline", "health_baseline"))},
        keys=("p50", "p90", "p99", "p999", "max"), title="measure", extra=("calls",)))
    print(f"errors: publish {result['publish']['errors']}, never visible {result['never_visible']}, "
          f"reads needed max {result['reads_needed_max']}, Decide without callback on top "
          f"{result['decide_after_return']['wrong_top']}")
    print(f"PublishEvent / Health: p50 x{result['ratio_p50_publish_over_health']:.2f}, "
          f"p99 x{result['ratio_p99_publish_over_health']:.2f}; end-to-end p99 / no-pattern publish p99 "
          f"x{result['ratio_p99_end_to_end_over_no_pattern_publish']:.2f}")
    t = result["throughput"]
    print(f"throughput (closed loop, {t['inflight']} in flight, {t['seconds']:.1f}s): "
          f"{t['events_per_s']:.0f} PublishEvent/s, {t['errors']} errors")
    results.write_json(args.json, result)
    failed = result["publish"]["errors"] or result["never_visible"] or result["decide_after_return"]["wrong_top"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
