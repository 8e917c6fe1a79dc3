"""Decisions/s within the SLO of ``nba serve`` on one Redis node against a local 3-master Redis Cluster,
and the Redis side's own capacity per shard, measured in one run.

Starts both backends of ``harness.redis_backends`` at once (an embedded node, append-only; ``LocalCluster``: 3
masters + 3 replicas, append-only; all on loopback), seeds each with the same ``--customers`` demo
customers (``engine.sim.demo.seed``), and starts ``nba serve --workers W`` (the same W, full funnel:
demo catalog, ``--models-dir``'s champion, contact policies and budgets, decision log) against each
(``REDIS_URL`` ``redis://`` and ``redis+cluster://``). Both servers run the whole time; the one not
under load sits idle. Then ``--rounds`` rounds; in each round the two sides take turns, the order
alternating by round, and each side gets:

1. a fixed-rate run (``--cpu-rate`` for ``--cpu-duration`` s, open loop): Redis CPU per decision of
   every node (``used_cpu_sys + used_cpu_user`` deltas, minus that node's idle rate measured for 5 s
   before the rounds), Redis commands per decision (INFO commandstats), and the CPU of the serving
   processes per decision (``/proc``, supervisor and workers);
2. ``loadgen.find_max`` (open loop, ``--processes`` client processes x 4 connections, the loadgen mix:
   7 channels, 30% on 500 hot customers, 5% unknown; each rate ``--repeats`` times, judged on its
   median-p99 run): the highest rate whose p99 meets ``--slo``.

Per side the summary gives the medians over rounds and the cluster/node ratios within each round. The
Redis-side capacity is what a shard could serve if the service processes were not in the way: one
core's second divided by the busiest master's Redis CPU per decision (a cluster spreads customers
over masters by slot; the busiest master binds). On 2 cores shared by the load generator, the
service and 6 Redis processes, the service's Python processes limit the end-to-end rate long before
Redis does, so the end-to-end ratio says little about shards; the Redis-side figures are the ones a
bigger machine would see.

    python loadtest/bench_cluster.py --workers 2 --slo p99=10ms --repeats 3 --rounds 2 --json /tmp/bench_cluster.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402
from harness import args as common  # noqa: E402
from harness import redis_backends as rb  # noqa: E402
from harness import servers as srv  # noqa: E402
from harness.results import stamp, write_json  # noqa: E402
from harness.servers import tree_cpu_seconds  # noqa: E402

SIDES = ("node", "cluster")


def cpu_run(b: rb.Backend, proc: subprocess.Popen, work: loadgen.Workload, rate: float, duration: float,
            warmup: float, processes: int, idle: dict[int, float]) -> dict:
    """One open-loop run at ``rate``; Redis and service CPU per decision over every request it sent."""
    before, cpu = rb.snapshot(b), tree_cpu_seconds(proc.pid)
    result = loadgen.run(work, rate, duration, warmup, processes)
    service = tree_cpu_seconds(proc.pid) - cpu
    d = rb.delta(b, before, rb.snapshot(b))
    # every request sent, warm-up included (the snapshots cover it), as loadgen.run splits them
    decisions = processes * int((warmup + duration) * rate / processes)
    result.pop("series", None)
    result["redis"] = rb.per_op(b, d, decisions, idle)
    result["service_cpu_ms_per_decision"] = service * 1000 / decisions
    result["decisions"] = decisions
    return result


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="nba serve --workers, both sides")
    common.add_slo(ap, "p99=10ms")
    common.add_find_max(ap, start_rate=150)
    common.add_load(ap, duration=6, warmup=2, duration_help="measured seconds per find-max run")
    common.add_processes(ap)
    common.add_rounds(ap, 2)
    ap.add_argument("--cpu-rate", type=float, default=150, help="rate of the fixed-rate CPU run")
    ap.add_argument("--cpu-duration", type=float, default=10)
    ap.add_argument("--no-find-max", action="store_true", help="only the fixed-rate CPU runs")
    common.add_customers(ap)
    ap.add_argument("--masters", type=int, default=3)
    common.add_models_dir(ap, srv.default_models())
    common.add_json(ap)
    args = ap.parse_args()
    slo = loadgen.parse_slo(args.slo or ["p99=10ms"])

    from engine.sim import demo
    from engine.store.profiles import ProfileStore

    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        backends = {s: stack.enter_context(rb.backend(s, tmp, args.masters)) for s in SIDES}
        servers: srv.Servers = {}
        for b in backends.values():
            demo.seed(ProfileStore.from_url(b.url), args.customers)
        try:
            for s, b in backends.items():
                servers |= srv.start({s: srv.serve_command(srv.loopback(), workers=args.workers,
                                                           models_dir=args.models_dir)}, b.url)
            time.sleep(2)
            idle = {}
            for b in backends.values():
                idle.update(rb.background(b, 5.0))
            for r in range(args.rounds):
                order = SIDES if r % 2 == 0 else SIDES[::-1]
                result: dict[str, dict] = {}
                for s in order:
                    proc, address = servers[s]
                    work = loadgen.Workload(address, customers=args.customers)
                    print(f"--- round {r + 1}: {s} ({stamp()})", flush=True)
                    at = cpu_run(backends[s], proc, work, args.cpu_rate, args.cpu_duration, args.warmup,
                                 args.processes, idle)
                    red = at["redis"]
                    print(f"at {args.cpu_rate:g}/s: {loadgen._line(at)}\n  Redis CPU per decision: masters "
                          f"{red['masters']['cpu_us']:.1f} us (busiest {red['busiest_master_cpu_us']:.1f}, shares "
                          f"{', '.join(f'{x:.2f}' for x in red['master_cpu_share'])}), replicas "
                          f"{red['replicas'].get('cpu_us', 0.0):.1f} us; commands {red['masters']['commands']:.2f}; "
                          f"service CPU {at['service_cpu_ms_per_decision']:.3f} ms", flush=True)
                    found = None
                    if not args.no_find_max:
                        before = rb.snapshot(backends[s])
                        found = loadgen.find_max(work, slo, args.start_rate, 100_000, args.step, args.duration,
                                                 args.warmup, args.processes, args.repeats)
                        for step in found["steps"]:
                            step.pop("series", None)
                        sent = sum(args.repeats * args.processes * int((args.warmup + args.duration) * st["offered_rps"]
                                                                       / args.processes) for st in found["steps"])
                        found["redis"] = rb.per_op(backends[s], rb.delta(backends[s], before, rb.snapshot(backends[s])),
                                                   sent, idle)
                        print(f"  over the find-max ({sent} decisions): Redis CPU per decision, masters "
                              f"{found['redis']['masters']['cpu_us']:.1f} us (busiest "
                              f"{found['redis']['busiest_master_cpu_us']:.1f})", flush=True)
                    result[s] = {"at_rate": at, "find_max": found,
                                 "max_rps": found["max_rps_meeting_slo"] if found else None,
                                 "load_average": os.getloadavg()[0]}
                rounds.append(result)
                write_json(args.json, {"summary": summarize(rounds), "rounds": rounds, "args": vars(args)})
        finally:
            srv.stop(servers)

    table = summarize(rounds)
    report(table, args, slo)
    write_json(args.json, {"summary": table, "rounds": rounds, "args": vars(args)})
    return 0


def summarize(rounds: list[dict[str, dict]]) -> dict:
    out: dict = {}
    for s in SIDES:
        rs = [r[s] for r in rounds if s in r]
        if not rs:
            continue
        def med(f, rs=rs) -> float:
            return float(np.median([f(x) for x in rs]))
        t = {
            "cpu_rate": {k: med(lambda x, k=k: x["at_rate"][k]) for k in ("p50_ms", "p99_ms", "p999_ms")},
            "redis_cpu_us_masters": med(lambda x: x["at_rate"]["redis"]["masters"]["cpu_us"]),
            "redis_cpu_us_replicas": med(lambda x: x["at_rate"]["redis"]["replicas"].get("cpu_us", 0.0)),
            "redis_cpu_us_busiest_master": med(lambda x: x["at_rate"]["redis"]["busiest_master_cpu_us"]),
            "redis_commands": med(lambda x: x["at_rate"]["redis"]["masters"]["commands"]),
            "redis_cmd_usec": med(lambda x: x["at_rate"]["redis"]["masters"]["cmd_usec"]),
            "service_cpu_ms": med(lambda x: x["at_rate"]["service_cpu_ms_per_decision"]),
            "master_cpu_share": [float(np.median(v)) for v in
                                 zip(*[x["at_rate"]["redis"]["master_cpu_share"] for x in rs], strict=True)],
        }
        t["redis_side_decisions_per_s"] = 1e6 / t["redis_cpu_us_busiest_master"]
        if rs[0]["max_rps"] is not None:
            bests = [x["find_max"]["best"] for x in rs]
            t["max_rps"] = med(lambda x: x["max_rps"])
            t["max_rps_rounds"] = [x["max_rps"] for x in rs]
            held = [b for b in bests if b]
            t["redis_cpu_us_masters_find_max"] = med(lambda x: x["find_max"]["redis"]["masters"]["cpu_us"])
            t["redis_cpu_us_busiest_master_find_max"] = med(lambda x: x["find_max"]["redis"]["busiest_master_cpu_us"])
            t["at_max"] = {k: float(np.median([b[k] for b in held])) for k in ("p50_ms", "p99_ms", "p999_ms")} if held else None
        out[s] = t
    if "node" in out and "cluster" in out:
        ratios = {}
        both = [r for r in rounds if "node" in r and "cluster" in r]
        if both and both[0]["node"]["max_rps"] is not None:
            rr = [r["cluster"]["max_rps"] / r["node"]["max_rps"] for r in both if r["node"]["max_rps"]]
            ratios["max_rps"] = float(np.median(rr)) if rr else None
            ratios["max_rps_rounds"] = rr
        for k in ("p50_ms", "p99_ms", "p999_ms"):
            ratios[f"cpu_rate_{k}"] = float(np.median([r["cluster"]["at_rate"][k] / r["node"]["at_rate"][k] for r in both]))
        ratios["service_cpu"] = float(np.median([r["cluster"]["at_rate"]["service_cpu_ms_per_decision"]
                                                 / r["node"]["at_rate"]["service_cpu_ms_per_decision"] for r in both]))
        ratios["redis_cpu_total"] = float(np.median([r["cluster"]["at_rate"]["redis"]["masters"]["cpu_us"]
                                                     / r["node"]["at_rate"]["redis"]["masters"]["cpu_us"] for r in both]))
        ratios["redis_side_capacity"] = float(np.median([r["node"]["at_rate"]["redis"]["busiest_master_cpu_us"]
                                                         / r["cluster"]["at_rate"]["redis"]["busiest_master_cpu_us"]
                                                         for r in both]))
        out["cluster/node"] = ratios
    return out


def report(table: dict, args: argparse.Namespace, slo: dict) -> None:
    print(f"\nnba serve --workers {args.workers}; {args.rounds} round(s), sides alternating; medians over rounds")
    if not args.no_find_max:
        print(f"SLO {', '.join(f'{k[:-3]} <= {v:g} ms' for k, v in slo.items())}, --repeats {args.repeats}, "
              f"{args.duration:g} s per run")
    print(f"{'side':>8} {'max rate/s':>10} {'per round':>14} {'p50':>7} {'p99':>7} {'p99.9':>7} | "
          f"at {args.cpu_rate:g}/s: {'p50':>6} {'p99':>7} {'p99.9':>7} {'svc CPU ms':>10} {'Redis us':>8} "
          f"{'+repl us':>8} {'busiest':>8} {'cmd us':>6} {'cmds':>5} | {'Redis-side dec/s':>16}")
    for s in SIDES:
        t = table.get(s)
        if t is None:
            continue
        m = t.get("at_max") or {}
        mx = f"{t['max_rps']:10.0f} {', '.join(f'{x:.0f}' for x in t['max_rps_rounds']):>14}" if "max_rps" in t \
            else f"{'-':>10} {'-':>14}"
        print(f"{s:>8} {mx} {m.get('p50_ms', float('nan')):7.3f} {m.get('p99_ms', float('nan')):7.3f} "
              f"{m.get('p999_ms', float('nan')):7.3f} | {'':>{len(f'at {args.cpu_rate:g}/s:')}} "
              f"{t['cpu_rate']['p50_ms']:6.3f} {t['cpu_rate']['p99_ms']:7.3f} {t['cpu_rate']['p999_ms']:7.3f} "
              f"{t['service_cpu_ms']:10.3f} {t['redis_cpu_us_masters']:8.1f} {t['redis_cpu_us_replicas']:8.1f} "
              f"{t['redis_cpu_us_busiest_master']:8.1f} {t['redis_cmd_usec']:6.1f} {t['redis_commands']:5.1f} | "
              f"{t['redis_side_decisions_per_s']:16,.0f}")
    for s in SIDES:
        t = table.get(s)
        if t and "redis_cpu_us_masters_find_max" in t:
            print(f"{s:>8}: Redis CPU per decision over the find-max runs (higher rates): masters "
                  f"{t['redis_cpu_us_masters_find_max']:.1f} us, busiest {t['redis_cpu_us_busiest_master_find_max']:.1f} "
                  f"us -> Redis-side {1e6 / t['redis_cpu_us_busiest_master_find_max']:,.0f} decisions/s")
    ratio = table.get("cluster/node")
    if ratio:
        mr = ratio.get("max_rps")
        print(f"cluster / node: max rate x{mr:.2f} (rounds {', '.join(f'{x:.2f}' for x in ratio['max_rps_rounds'])}); "
              if mr else "cluster / node: ", end="")
        print(f"at {args.cpu_rate:g}/s p50 x{ratio['cpu_rate_p50_ms']:.2f}, p99 x{ratio['cpu_rate_p99_ms']:.2f}, "
              f"p99.9 x{ratio['cpu_rate_p999_ms']:.2f}; service CPU per decision x{ratio['service_cpu']:.2f}; "
              f"Redis CPU per decision (all masters) x{ratio['redis_cpu_total']:.2f}; Redis-side capacity "
              f"(busiest master) x{ratio['redis_side_capacity']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
