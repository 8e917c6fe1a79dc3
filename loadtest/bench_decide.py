"""Decide latency: over gRPC against a health-check baseline, where its CPU goes in process, and what an
interaction's repeat costs.

Default: ``nba serve`` in a child process (embedded Redis in a temporary directory, demo data, the
champion model in ./models, trained first if missing), then requests at a constant arrival rate from
one client on loopback, with the gRPC ``Health/Check`` at the same rate as the baseline in the same run.
Latency is measured from each request's *intended* send time, so a slow reply delays the next ones'
numbers instead of hiding them. Bounded: ``--calls`` at ``--rate`` plus warm-up.

    python loadtest/bench_decide.py --calls 10000 --rate 500

``--profile``: where the CPU of one Decide goes, per stage and per library, from per-thread CPU clocks.
One process, one thread, an embedded Redis with the demo customers, the engine as ``nba serve`` builds
it (contact policies and budgets on, decision log), called the way the gRPC servicer calls it: request
bytes parsed, ``DecisionServicer.Decide`` (validation, ``DecideInput``, the engine, ``decision_to_pb``,
the call counter), the response serialised. No gRPC transport: ``bench_ceiling.py`` measures that.
CPU is ``time.thread_time_ns()`` (CLOCK_THREAD_CPUTIME_ID): time blocked on Redis's reply costs
nothing, which is what a sampling profiler on this VM gets wrong (it counts threads waiting for the GIL
or a socket as busy, and its sampling stalls the process). Three passes of ``--calls`` decisions each,
the same request sequence:

1. **stages**: the CPU per call and per funnel stage (the stage boundaries the engine times for
   Prometheus, read on the thread clock), plus the servicer's own share (protobuf, mapping);
2. **libraries**: wrappers around each library's entry points charge exclusive CPU to a bucket
   (a nested bucket pauses its caller's); what no bucket claims is glue. The wrappers cost CPU
   themselves (two clock reads each, charged partly to the buckets), so this pass's total is higher:
   read the shares, not the absolute microseconds;
3. the same as 1 again (the spread between 1 and 3 is the noise).

Besides: the decision-log writer thread's CPU per decision (from /proc/self/task), and Redis's own
time per command (INFO commandstats). ``--pace RATE...`` instead gives the per-call CPU back to back
against paced at each RATE (alternating, ``--rounds`` times); ``--cprofile N`` the top functions of N calls.

    python loadtest/bench_decide.py --profile --calls 3000 --json /tmp/decide_profile.json
    python loadtest/bench_decide.py --profile --calls 1000 --pace 100 1000 --rounds 3   # per-call CPU, warm vs paced

``--interactions``: in-process Decide latency of a new decision, a new decision with an interaction id,
and its repeat. One engine (contact policies, budgets and the decision log on, as served) on an embedded
Redis with ``--customers`` demo customers. Every round draws one request (a demo customer, call_center or
web at random, a touchpoint per channel, 3 actions) and times the calls in an order that rotates through
all six orders of the three kinds, round by round, so machine noise and cache warmth fall on every kind
alike:

- **new**: the request without an interaction id (a new decision every time);
- **new + interaction**: the request with a fresh interaction id: a new decision that also stores itself
  for its placement in ``nba:{c:<id>}:ix:<interaction>``;
- **repeat**: the previous round's interaction request asked again (same customer, interaction id and
  placement): served from the stored decision (``Decision.repeat``), no second impression or budget;
- **round trip**: ``EVALSHA`` of ``return 1`` on the engine's own Redis client, the ceiling of any call
  that needs one Redis round trip (a repeat needs exactly one).

    python loadtest/bench_decide.py --interactions --models-dir /tmp/nba-models --calls 5000 --json /tmp/interactions.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from harness import args as common  # noqa: E402
from harness import servers as srv  # noqa: E402
from harness.clients import CallContext, open_loop  # noqa: E402
from harness.results import ratio_line, ratios, summary, table, write_json  # noqa: E402
from loadgen import CHANNEL_MIX  # noqa: E402

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc  # noqa: E402

CHANNELS = [pb.CHANNEL_WEB, pb.CHANNEL_CALL_CENTER, pb.CHANNEL_MOBILE_APP, pb.CHANNEL_EMAIL]
clock = time.thread_time_ns
KINDS = ("new", "new_interaction", "repeat")
LABELS = {"new": "new decision", "new_interaction": "new + interaction id", "repeat": "repeat (stored)",
          "round_trip": "Redis round trip (EVALSHA return 1)"}
TOUCHPOINTS = {"call_center": "agent.desktop", "web": "web.home.hero"}
WARMUP_ROUNDS = 1000


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    common.add_modes(ap, {"--profile": "the CPU of one Decide per stage and library, in process",
                          "--interactions": "new decision, new + interaction id and its repeat, in process"})
    ap.add_argument("--calls", type=int, help="measured calls (default: 10,000 over gRPC; 3,000 per --profile pass; "
                                              "5,000 per kind with --interactions)")
    common.add_load(ap, rate=500.0)
    ap.add_argument("--warmup", type=int, default=1_000, help="calls before measuring (default 1,000)")
    common.add_customers(ap)
    ap.add_argument("--cold-share", type=float, default=0.05, help="share of unknown customers (over gRPC)")
    common.add_models_dir(ap, srv.default_models())
    ap.add_argument("--pace", type=float, nargs="+", default=[], metavar="RATE",
                    help="--profile: per-call CPU when the calls come back to back and when they come RATE per second "
                         "(the thread sleeps between them), alternating, --rounds times")
    common.add_rounds(ap, 3, "rounds of --pace")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="--profile: cProfile of N calls, the top functions by own time (relative figures only)")
    ap.add_argument("--max-seconds", type=float, default=600, help="--interactions: stop the loop after this long")
    common.add_json(ap)
    args = ap.parse_args(argv)
    if args.profile or args.pace or args.cprofile:
        args.calls = args.calls or 3000
        return profile(args)
    if args.interactions:
        return interactions(args)
    args.calls = args.calls or 10_000
    return over_grpc(args)


# --- over gRPC --------------------------------------------------------------------------------------------


def over_grpc(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rng = random.Random(1)
    with srv.embedded_serve(args.customers) as (_, address, _), grpc.insecure_channel(address) as channel:
        decide = pb_grpc.DecisionServiceStub(channel).Decide.future
        check = health_pb2_grpc.HealthStub(channel).Check.future

        def decide_request(i: int) -> pb.DecideRequest:
            cold = rng.random() < args.cold_share
            cid = f"NEW{i}" if cold else f"C{rng.randrange(args.customers):07d}"
            return pb.DecideRequest(customer_id=cid, channel=CHANNELS[i % len(CHANNELS)], touchpoint="bench",
                                    max_actions=3)

        def health_request(i: int) -> health_pb2.HealthCheckRequest:
            return health_pb2.HealthCheckRequest()

        open_loop(decide, decide_request, args.warmup, args.rate)
        open_loop(check, health_request, args.warmup, args.rate)
        base, base_err = open_loop(check, health_request, args.calls, args.rate)
        lat, err = open_loop(decide, decide_request, args.calls, args.rate)

    keys = ("p50", "p90", "p99", "p999", "max")
    result: dict[str, Any] = {"offered_rps": args.rate, "calls": args.calls,
                              "decide": summary(lat, keys=keys, scale=1000) | {"errors": err},
                              "health_baseline": summary(base, keys=keys, scale=1000) | {"errors": base_err}}
    r = ratios(result["decide"], result["health_baseline"], keys=("p50", "p99"))
    result["ratio_p50_decide_over_health"], result["ratio_p99_decide_over_health"] = r["p50"], r["p99"]
    print(f"open loop, {args.rate:g} req/s, {args.calls} calls each, one client on loopback")
    print(table({"Decide": result["decide"], "Health.Check baseline": result["health_baseline"]}, keys=keys, title="call"))
    print(ratio_line("Decide / baseline", r))
    write_json(args.json, result)
    return 1 if err else 0


# --- in process: where the CPU goes -----------------------------------------------------------------------


class Buckets:
    """Exclusive thread CPU per bucket: entering a bucket pauses the one it was entered from."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []  # [bucket, started]
        self.on = False
        self.thread = threading.get_ident()  # only this thread is charged (the log writer calls redis-py too)

    def wrap(self, owner: Any, attr: str, bucket: str) -> None:
        fn = getattr(owner, attr)
        if getattr(fn, "_profiled", False):
            return

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on or threading.get_ident() != self.thread:
                return fn(*args, **kwargs)
            now = clock()
            stack = self.stack
            if stack:
                top = stack[-1]
                self.ns[top[0]] += now - top[1]
            frame = [bucket, now]
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                now = clock()
                self.ns[bucket] += now - frame[1]
                stack.pop()
                if stack:
                    stack[-1][1] = now

        timed._profiled = True  # type: ignore[attr-defined]
        setattr(owner, attr, timed)


def install(buckets: Buckets, engine: Any) -> None:
    import durable_rules_engine
    import prometheus_client.metrics as prom
    import redis.client
    import redis.commands.core

    from engine.decision import funnel
    from engine.rules import runtime
    from engine.rules.facts import FactEncoder, FactLayout
    from engine.rules.vector import EligibilityProgram
    from engine.serving import server
    from engine.store import profiles
    from engine.store.decision_log import DecisionLog

    w = buckets.wrap
    for name in ("execute_command",):
        w(redis.client.Redis, name, "redis-py client")
    w(redis.client.Pipeline, "execute", "redis-py client")
    w(redis.client.Pipeline, "pipeline_execute_command", "redis-py client")
    w(redis.commands.core.Script, "__call__", "redis-py client")
    if hasattr(profiles, "HotPath"):  # the decision path's own connections (issue 18)
        w(profiles.HotPath, "execute", "redis-py client")
        w(profiles, "pack", "redis-py client")
    w(profiles, "decode_profile", "profile decoding")
    for name in ("assert_fact", "start_action_for_state", "complete_and_start_action", "delete_state"):
        w(durable_rules_engine, name, "durable-rules (C engine)")
    w(FactLayout, "build", "fact encoding")
    w(FactEncoder, "encode", "fact encoding")
    for name in ("evaluate", "admitted", "verdicts", "blocked_actions"):
        w(runtime.CompiledRules, name, "rule work (Python)")
    w(EligibilityProgram, "run", "numba: rule conditions")
    w(runtime, "_admit", "numba: rule conditions")
    w(funnel, "derive", "numba: derive + scoring")
    w(type(engine), "_score", "numba: derive + scoring")
    from engine.models.model_input import ModelInput

    w(ModelInput, "customer_block", "model input row")
    w(ModelInput, "shared_row", "model input row")
    for name in ("order", "present_args"):
        w(funnel, name, "ordering + script arguments")
    w(funnel, "ranked_action", "ranked actions (reasons, treatments)")
    w(funnel, "fallback_action", "rule work (Python)")
    w(funnel, "new_decision_id", "decision id")
    w(server, "decision_to_pb", "protobuf")
    for cls in (prom.Histogram, prom.Counter):
        w(cls, "observe" if cls is prom.Histogram else "inc", "prometheus_client")
    w(prom.MetricWrapperBase, "labels", "prometheus_client")
    from engine import metrics
    if hasattr(metrics, "observe_decision"):  # issue 18: one call per decision, value objects directly
        w(metrics, "observe_decision", "prometheus_client")
        w(metrics.Children, "inc", "prometheus_client")
    w(type(engine), "_record", "decision-log record")
    w(DecisionLog, "write", "decision-log record")


def thread_cpu_ns(native_id: int) -> int:
    """utime + stime of one thread of this process (clock ticks, so 10 ms resolution)."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def paced(call: Any, requests: list[bytes], rates: list[float], rounds: int, out: str | None) -> None:
    """Per-call thread CPU at each rate (0: back to back), the rates alternating within every round: how
    much a call costs when the core has idled since the last one (caches and predictors gone cold, as
    between a service's calls at a low rate) against one right after another."""
    cpu: dict[float, list[float]] = defaultdict(list)
    for r in range(rounds):
        for rate in rates if r % 2 == 0 else rates[::-1]:
            took = []
            for data in requests:
                t = clock()
                call(data)
                took.append(clock() - t)
                if rate:
                    time.sleep(1 / rate)
            cpu[rate].append(float(np.percentile(took, 50)) / 1000)
            print(f"round {r + 1}: {'back to back' if not rate else f'{rate:g}/s':>13}  CPU p50 "
                  f"{cpu[rate][-1]:7.1f} us per call", flush=True)
    base = float(np.median(cpu[0.0]))
    print(f"\n{'calls':>13} {'CPU p50 us (median of rounds)':>30} {'/ back to back':>15}")
    for rate, values in cpu.items():
        med = float(np.median(values))
        print(f"{'back to back' if not rate else f'{rate:g}/s':>13} {med:30.1f} {med / base:15.2f}")
    write_json(out, {"cpu_us_p50": {str(k): v for k, v in cpu.items()}})


def profile(args: argparse.Namespace) -> int:
    import gc

    import redis

    from engine.decision import funnel
    from engine.decision.funnel import DecisionEngine
    from engine.serving.server import DecisionServicer
    from engine.store.decision_log import DecisionLog

    with srv.engine_parts(args.customers, args.models_dir) as parts:
        store, rules, redis_server = parts.store, parts.rules, parts.redis
        decision_log = DecisionLog(store.client)
        # noon UTC: no quiet hours (bench_ceiling.py --ab contact --in-process uses the same clock)
        engine = DecisionEngine(store, rules, parts.model, decision_log, contacts=True, clock=lambda: 1_781_524_800.0)
        engine.warmup()

        # all it uses of an App for Decide: the engine, and the rules (the declared channels)
        servicer = DecisionServicer(SimpleNamespace(engine=engine, rules=rules))  # type: ignore[arg-type]
        context = CallContext()
        rng = random.Random(5)
        channels = [getattr(pb, n) for n, _ in CHANNEL_MIX]
        weights = [s for _, s in CHANNEL_MIX]

        def request(i: int) -> bytes:
            r = rng.random()
            cid = f"C{rng.randrange(500 if r < 0.35 else args.customers):07d}" if r >= 0.05 else f"NEW-{i}"
            return pb.DecideRequest(customer_id=cid, channel=rng.choices(channels, weights)[0], touchpoint="profile",
                                    max_actions=3).SerializeToString()

        requests = [request(i) for i in range(args.warmup + args.calls)]
        parse, decide = pb.DecideRequest.FromString, servicer.Decide

        def call(data: bytes) -> bytes:
            return decide(parse(data), context).SerializeToString()

        for data in requests[: args.warmup]:
            call(data)
        gc.collect()
        gc.freeze()  # as nba serve does after warm-up
        measured = requests[args.warmup:]
        if args.cprofile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(lambda: [call(data) for data in measured[: args.cprofile]])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
            decision_log.close()
            return 0

        if args.pace:
            paced(call, measured, [0.0, *args.pace], args.rounds, args.json)
            decision_log.close()
            return 0
        stage_ns: dict[str, list[int]] = defaultdict(list)
        original_stages = funnel._Stages

        class CpuStages(original_stages):  # type: ignore[misc, valid-type]
            """The engine's stage boundaries, read on the thread's CPU clock as well."""

            @property
            def last(self) -> float:
                return self._last

            @last.setter
            def last(self, value: float) -> None:  # a stage (re)starts: the CPU clock too
                self._last = value
                self.cpu = clock()

            def done(self, stage: str) -> None:
                spent = clock() - self.cpu
                super().done(stage)  # sets ``last``: the CPU clock restarts
                stage_ns[stage].append(spent)

        def stages_pass() -> dict[str, Any]:
            stage_ns.clear()
            totals = []
            funnel._Stages = CpuStages
            try:
                for data in measured:
                    t = clock()
                    call(data)
                    totals.append(clock() - t)
            finally:
                funnel._Stages = original_stages
            total = np.asarray(totals) / 1000
            out = {"cpu_us_p50": float(np.percentile(total, 50)), "cpu_us_mean": float(total.mean()),
                   "cpu_us_p99": float(np.percentile(total, 99)), "stages_us_mean": {}}
            for stage, ns in stage_ns.items():
                out["stages_us_mean"][stage] = sum(ns) / len(measured) / 1000
            out["stages_us_mean"]["servicer (protobuf, mapping, call counter)"] = (
                out["cpu_us_mean"] - sum(out["stages_us_mean"].values()))
            return out

        writer = next(t for t in threading.enumerate() if t.name == "decision-log")
        # INFO is beyond the service user's ACL: Redis's admin user reads it (its connection made here, before
        # the first read, so its handshake is not counted)
        admin = redis.Redis.from_url(redis_server.admin_url)
        stats_before = admin.info("commandstats")
        log_cpu = thread_cpu_ns(writer.native_id)  # type: ignore[arg-type]
        first = stages_pass()
        time.sleep(0.1)  # the writer's last batch
        log_cpu = thread_cpu_ns(writer.native_id) - log_cpu  # type: ignore[arg-type]
        stats = admin.info("commandstats")
        admin.close()

        buckets = Buckets()
        install(buckets, engine)
        buckets.on = True
        totals = []
        for data in measured:
            t = clock()
            call(data)
            totals.append(clock() - t)
        buckets.on = False
        instrumented = float(np.mean(totals) / 1000)
        libraries = {k: v / len(measured) / 1000 for k, v in buckets.ns.items()}
        libraries["glue (the rest)"] = instrumented - sum(libraries.values())
        second = stages_pass()
        decision_log.close()

    redis_us = {}
    for cmd, s in stats.items():
        calls = s["calls"] - stats_before.get(cmd, {"calls": 0})["calls"]
        usec = s["usec"] - stats_before.get(cmd, {"usec": 0})["usec"]
        if calls > 0 and cmd.removeprefix("cmdstat_") not in ("info",):
            redis_us[cmd.removeprefix("cmdstat_")] = {"calls_per_decision": calls / len(measured),
                                                      "us_per_call": usec / calls}

    print(f"{len(measured)} Decides per pass, one thread, in-process servicer call (no transport); thread CPU")
    print(f"\nper call: pass 1 p50 {first['cpu_us_p50']:.1f} us, mean {first['cpu_us_mean']:.1f}, p99 "
          f"{first['cpu_us_p99']:.1f}; pass 3 p50 {second['cpu_us_p50']:.1f}, mean {second['cpu_us_mean']:.1f}, "
          f"p99 {second['cpu_us_p99']:.1f}")
    print(f"\n{'stage (CPU, mean us)':46} {'pass 1':>8} {'pass 3':>8} {'share':>6}")
    for stage in first["stages_us_mean"]:
        a, b = first["stages_us_mean"][stage], second["stages_us_mean"].get(stage, float("nan"))
        print(f"{stage:46} {a:8.1f} {b:8.1f} {a / first['cpu_us_mean']:6.0%}")
    print(f"\n{'library (exclusive CPU, mean us; pass 2)':46} {'us':>8} {'share':>6}")
    for name, us in sorted(libraries.items(), key=lambda kv: -kv[1]):
        print(f"{name:46} {us:8.1f} {us / instrumented:6.0%}")
    print(f"{'total, instrumented':46} {instrumented:8.1f}")
    print(f"\ndecision-log writer thread: {log_cpu / len(measured) / 1000:.1f} us CPU per decision (pass 1)")
    print("Redis, per decision (pass 1): " + "; ".join(
        f"{c} {v['calls_per_decision']:.2f} x {v['us_per_call']:.1f} us" for c, v in sorted(redis_us.items())))
    write_json(args.json, {"pass1": first, "pass3": second, "libraries_us": libraries, "instrumented_us": instrumented,
                           "log_writer_us": log_cpu / len(measured) / 1000, "redis": redis_us, "calls": len(measured)})
    return 0



# --- in process: interactions -----------------------------------------------------------------------------


def interaction_table(decisions: int, customers: int, models_dir: str, max_seconds: float, seed: int = 12) -> dict:
    from engine.decision.funnel import DecisionEngine
    from engine.decision.request import DecideInput
    from engine.store.decision_log import DecisionLog

    times: dict[str, list[float]] = {k: [] for k in (*KINDS, "round_trip")}
    wrong = {"new_repeat": 0, "repeat_not_repeat": 0, "repeat_other_decision": 0}
    orders = list(itertools.permutations(KINDS))
    with srv.engine_parts(customers, models_dir) as parts:
        store = parts.store
        decision_log = DecisionLog(store.client)
        engine = DecisionEngine(store, parts.rules, parts.model, decision_log=decision_log)
        engine.warmup()
        client = store.client
        noop = client.script_load("return 1")
        rng = random.Random(seed)
        previous: tuple[object, str] | None = None  # last round's interaction request and its decision id
        started = time.monotonic()
        rounds = 0
        for i in range(decisions + WARMUP_ROUNDS):
            if time.monotonic() - started > max_seconds:
                print(f"stopped after {max_seconds:g} s: {i} rounds", file=sys.stderr)
                break
            cid = f"C{rng.randrange(customers):07d}"
            channel = rng.choice(("call_center", "web"))
            plain = DecideInput(cid, channel, touchpoint=TOUCHPOINTS[channel], max_actions=3)
            fresh = DecideInput(cid, channel, touchpoint=TOUCHPOINTS[channel], max_actions=3,
                                interaction_id=f"ix-{seed}-{i}")
            measured = i >= WARMUP_ROUNDS
            stored = None
            for kind in orders[i % len(orders)]:
                if kind == "repeat" and previous is None:
                    continue
                req = plain if kind == "new" else fresh if kind == "new_interaction" else previous[0]  # type: ignore[index]
                t = time.perf_counter()
                d = engine.decide(req)
                elapsed = time.perf_counter() - t
                if kind == "repeat":
                    if not d.repeat:
                        wrong["repeat_not_repeat"] += 1
                    elif d.decision_id != previous[1]:  # type: ignore[index]
                        wrong["repeat_other_decision"] += 1
                else:
                    wrong["new_repeat"] += d.repeat
                    if kind == "new_interaction":
                        stored = (fresh, d.decision_id)
                if measured:
                    times[kind].append(elapsed)
            t = time.perf_counter()
            client.evalsha(noop, 0)
            if measured:
                times["round_trip"].append(time.perf_counter() - t)
            # the repeat of the next round asks for this round's interaction again
            previous = stored
            rounds += 1
        wall = time.monotonic() - started
        decision_log.close()
    table: dict[str, Any] = {k: summary(v, scale=1000) for k, v in times.items() if v}
    table["ratios"] = {
        f"{a}/{b}": {p: round(table[a][p] / table[b][p], 2) for p in ("p50_ms", "p99_ms", "p999_ms")}
        for a, b in (("repeat", "new"), ("new_interaction", "new"), ("repeat", "round_trip"),
                     ("new", "round_trip"))}
    table["checks"] = wrong
    table["run"] = {"rounds": rounds, "warmup_rounds": WARMUP_ROUNDS, "seconds": round(wall, 1), "customers": customers,
                    "models_dir": models_dir}
    return table


def interactions(args: argparse.Namespace) -> int:
    args.calls = args.calls or 5000
    t = interaction_table(args.calls, args.customers, args.models_dir, args.max_seconds)
    print(table({LABELS[k]: t[k] for k in (*KINDS, "round_trip")}, title="in-process Decide", extra=("calls",)))
    for name, r in t["ratios"].items():
        print(f"{name:38} x{r['p50_ms']:.2f} p50, x{r['p99_ms']:.2f} p99, x{r['p999_ms']:.2f} p99.9")
    print(f"checks (all 0 expected): {t['checks']}; {t['run']['rounds']} rounds in {t['run']['seconds']} s")
    write_json(args.json, t)
    return 0 if not any(t["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
