"""Where the CPU of one Decide goes: per stage and per library, from per-thread CPU clocks.

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
time per command (INFO commandstats).

    python loadtest/decide_profile.py --calls 3000 --json /tmp/decide_profile.json
    python loadtest/decide_profile.py --calls 1000 --pace 100 1000 --rounds 3   # per-call CPU, warm vs paced
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.sim.telco import SCHEMA  # noqa: E402
from engine.store.redis_embedded import EmbeddedRedis  # noqa: E402

MIX = (("CHANNEL_WEB", 0.35), ("CHANNEL_MOBILE_APP", 0.25), ("CHANNEL_CALL_CENTER", 0.25), ("CHANNEL_EMAIL", 0.07),
       ("CHANNEL_SMS", 0.03), ("CHANNEL_BRANCH", 0.03), ("CHANNEL_POINT_OF_SALE", 0.02))
clock = time.thread_time_ns


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


class _Context:
    def time_remaining(self) -> None:
        return None

    def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


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
    if out:
        Path(out).write_text(json.dumps({"cpu_us_p50": {str(k): v for k, v in cpu.items()}}, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000, help="decisions per pass")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--models-dir", default="/tmp/nba-models" if Path("/tmp/nba-models").is_dir()
                    else str(ROOT / "models"))
    ap.add_argument("--json")
    ap.add_argument("--pace", type=float, nargs="+", default=[], metavar="RATE",
                    help="instead: per-call CPU when the calls come back to back and when they come RATE per second "
                         "(the thread sleeps between them), alternating, --rounds times")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --pace")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="instead: cProfile of N calls, the top functions by own time (relative figures only)")
    args = ap.parse_args()

    import gc

    import redis

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.decision import funnel
    from engine.decision.funnel import DecisionEngine
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.serving.server import DecisionServicer
    from engine.sim import demo
    from engine.store.decision_log import DecisionLog
    from engine.store.profiles import ProfileStore

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        store = ProfileStore.from_url(redis_server.url)
        demo.seed(store, args.customers)
        rules = Live(load_and_compile(ROOT / "rules"), retire=lambda r: r.close())
        model = Live(ModelRegistry(args.models_dir, SCHEMA).load())
        decision_log = DecisionLog(store.client)
        # noon UTC: no quiet hours (contact_p99.py --in-process uses the same clock)
        engine = DecisionEngine(store, rules, model, decision_log, contacts=True, clock=lambda: 1_781_524_800.0)
        engine.warmup()

        # all it uses of an App for Decide: the engine, and the rules (the declared channels)
        servicer = DecisionServicer(SimpleNamespace(engine=engine, rules=rules))  # type: ignore[arg-type]
        context = _Context()
        rng = random.Random(5)
        channels = [getattr(pb, n) for n, _ in MIX]
        weights = [s for _, s in MIX]

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
            rules.current.close()
            return 0

        if args.pace:
            paced(call, measured, [0.0, *args.pace], args.rounds, args.json)
            decision_log.close()
            rules.current.close()
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
        rules.current.close()

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
    if args.json:
        Path(args.json).write_text(json.dumps({"pass1": first, "pass3": second, "libraries_us": libraries,
                                               "instrumented_us": instrumented,
                                               "log_writer_us": log_cpu / len(measured) / 1000,
                                               "redis": redis_us, "calls": len(measured)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
