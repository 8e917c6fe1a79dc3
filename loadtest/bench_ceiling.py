"""The service against the transport's ceiling: highest rate meeting the SLO, bare server vs ``nba serve``.

Seeds one embedded Redis with the demo customers, starts the bare server (``--serve-bare``, ``harness/bare_server.py``: the
service's own gRPC server answering a fixed ``DecideResponse`` with no work) and ``nba serve
--workers W`` for each ``--workers`` (full funnel: demo catalog, champion model, contact policies and
budgets, decision log), all at once, then runs round after round; in each round every server in turn
(the order rotating by round) gets ``loadgen.find_max`` (open loop, ``--processes`` client processes x
4 connections, ``--repeats`` runs per rate judged on the median p99) and one run at ``--p50-rate``.
The summary gives each server's highest rate holding the SLO, its latency at ``--p50-rate`` and the
CPU its processes (workers included) used per request in that run, medians over the rounds, and their
ratios to the bare server of the same round (the figure issue 18 tracks).
``--compare-tree DIR`` adds ``nba serve`` from another source tree (a worktree of an earlier commit)
with the same worker counts: before and after in one run. Servers not under load sit idle meanwhile
(their health and file-watch pollers wake a few times a second).

    python loadtest/bench_ceiling.py --rounds 1 --repeats 3 --duration 10 --slo p99=5ms --json /tmp/ceiling.json

Scaling over workers: ``--workers 1 2 4 8`` finds each count's highest rate beside the bare server's, and
prints each count's rate against one worker's (ratios within a round) and how evenly its workers shared
the Decides (each worker's answered Decides, read from its Prometheus multiprocess file; the kernel
balances connections, not calls, so the share follows the ``--processes`` x 4 connections). The bare
server under the same ``--processes`` shows whether the load generator keeps up. On the 16-core machine
(one device run, about 5 minutes):

    python loadtest/bench_ceiling.py --workers 1 2 4 8 --processes 8 --rounds 1 --repeats 1 --duration 5 \
        --warmup 1 --step 1.4 --start-rate 200 --bare-start-rate 1000 --json $OUT/scaling.json
    python loadtest/bench_ceiling.py --alternate 200 --alternate-rounds 3 --compare-tree /tmp/before

``--alternate RATE`` replaces the find-max rounds by pairs of servers sharing one open-loop client that
alternates request by request between them (``harness.clients``): each ``nba serve`` against
the bare server, and each against the same worker count from ``--compare-tree``; per pair the
percentiles, the CPU per request and the ratios. On a machine shared with other work this is the fair
comparison: a burst of someone else's load hits both sides of a pair alike.

``--bare-aio`` adds the bare server's asyncio twin ("bare aio": ``--serve-bare --aio``, same options,
``maximum_concurrent_rpcs`` and per-call work, on an event loop instead of a thread pool; issue 18), started
at ``--bare-start-rate`` too; ratios stay against the sync bare server. ``--workers`` with no count
measures only the two bare servers; ``--sweep`` then includes both bare servers (without ``--bare-aio`` it
leaves the bare server out), ``--alternate`` pairs bare with bare aio:

    python loadtest/bench_ceiling.py --workers --bare-aio --rounds 2 --repeats 3 --duration 5 --warmup 2 \
        --bare-start-rate 600 --step 1.25

Overheads, A/B in one run (``--ab``); each prints both sides' p50/p99/p99.9 and the ratio:

* ``explore``: in process, epsilon exploration (0.2 per slot) against none, both enforcing contact policies.
* ``uplift``: in process, uplift arbitration (a second model of the same size scores every admitted action)
  against propensity arbitration, both enforcing contact policies.
* ``contact``: ``nba serve --workers 1`` enforcing ``rules/contact.yaml`` and the daily budgets against one
  with ``--no-contact-policies``, alternating request by request (exit 1 when the p99 ratio is over 1.5);
  with ``--in-process CALLS`` the two engines in one process, call by call, no gRPC;
* ``tls``: TLS with token authentication (``--auth``) against plaintext, alternating request by request
  (certificates made for the run by tests/certs.py);
* ``admission``: admission's message watchdog against plain unary admission, two servers on one App in
  this process, sequential Decides in alternating turns (``--turns``, ``--calls``);
* ``tracing``: tracing off against on (every call sampled, or ``--sample``), spans batched to an exporter
  that drops them; ``--via grpc`` (a real server on loopback) or ``--via direct`` (the engine in a SERVER span).

    python loadtest/bench_ceiling.py --ab contact --alternate 200 --duration 20 --alternate-rounds 4 --json /tmp/contact.json
    python loadtest/bench_ceiling.py --ab contact --in-process 4000
    python loadtest/bench_ceiling.py --ab explore --in-process 4000
    python loadtest/bench_ceiling.py --ab uplift --in-process 4000
    python loadtest/bench_ceiling.py --ab tls --alternate 200 --duration 15 --alternate-rounds 4
    python loadtest/bench_ceiling.py --ab admission --turns 12 --calls 300
    python loadtest/bench_ceiling.py --ab tracing --via grpc --turns 12 --calls 300

``--serve-bare [--aio] --address A`` runs the bare server alone (the benchmark starts it so, in its own process).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402
from harness import args as common  # noqa: E402
from harness import servers as srv  # noqa: E402
from harness.clients import alternate_rounds, summarize_rounds  # noqa: E402
from harness.results import ratio_line, ratios, stamp, summary, table, write_json  # noqa: E402

BARE = "bare"
BARE_AIO = "bare aio"


def commands(workers: list[int], models_dir: str, compare_tree: Path | None,
             bare_aio: bool = False) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """name -> command of the bare server (and its asyncio twin with ``bare_aio``) and every ``nba serve``
    variant, and the source tree of the ``--compare-tree`` ones."""
    cmds = {BARE: srv.bare_command(srv.loopback())}
    if bare_aio:
        cmds[BARE_AIO] = srv.bare_command(srv.loopback(), aio=True)
    trees: dict[str, Path] = {}
    for label, tree in [("", ROOT)] + ([("before ", compare_tree)] if compare_tree else []):
        for w in workers:
            name = f"{label}{w} worker{'s' if w > 1 else ''}"
            cmds[name] = srv.serve_command(srv.loopback(), workers=w, models_dir=models_dir)
            trees[name] = tree
    return cmds, trees


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = common.parser(__doc__)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                    help="nba serve worker counts (default 1 2); none: only the bare server(s)")
    ap.add_argument("--bare-aio", action="store_true",
                    help='also "bare aio": --serve-bare --aio, the asyncio twin of the bare server')
    common.add_rounds(ap, 1, "find-max of every server per round, order rotating")
    common.add_slo(ap)
    common.add_find_max(ap, start_rate=100)
    ap.add_argument("--bare-start-rate", type=float, default=500, help="the bare servers' first rate")
    common.add_load(ap, duration=10, warmup=2, duration_help="measured seconds per run")
    common.add_processes(ap)
    ap.add_argument("--p50-rate", type=float, default=100, help="rate of the latency comparison run")
    common.add_customers(ap)
    common.add_models_dir(ap, srv.default_models())
    common.add_compare_tree(ap)
    ap.add_argument("--alternate", type=float, metavar="RATE",
                    help="instead of find-max: pairs of servers alternating request by request at RATE in total "
                         "(each nba serve against the bare server, and against --compare-tree's)")
    ap.add_argument("--alternate-rounds", type=int, default=3)
    ap.add_argument("--sweep", type=float, nargs="+", metavar="RATE",
                    help="instead of find-max: every server at these fixed rates (loadgen.run), --rounds times, "
                         "the servers' order rotating by round; median p50/p99 per server and rate")
    ap.add_argument("--ab", choices=("contact", "explore", "uplift", "tls", "admission", "tracing"),
                    help="instead: one overhead, A/B in one run (see the module docstring); "
                         "contact and tls alternate at --alternate RATE (default 200) for --alternate-rounds")
    ap.add_argument("--in-process", type=int, default=0, metavar="CALLS",
                    help="--ab contact: the two engines in one process, CALLS calls each, no gRPC")
    common.add_turns(ap)
    ap.add_argument("--via", choices=("grpc", "direct"), default="grpc", help="--ab tracing: through gRPC or in-process")
    ap.add_argument("--sample", type=float, default=1.0, help="--ab tracing: the share of calls sampled")
    ap.add_argument("--serve-bare", action="store_true", help="run the bare server alone (with --address, --aio)")
    ap.add_argument("--aio", action="store_true", help="--serve-bare: the asyncio twin")
    common.add_address(ap, "127.0.0.1:50061")
    common.add_json(ap)
    args = ap.parse_args(argv)
    if args.sweep and not args.workers and not args.bare_aio:
        ap.error("--sweep leaves the bare server out: give --workers counts or --bare-aio")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.serve_bare:
        from harness.bare_server import serve

        return serve(args.address, args.aio)
    if args.ab:
        return AB[args.ab](args)
    if args.alternate:
        return alternate_pairs(args)
    if args.sweep:
        return sweep(args)
    return find_max_rounds(args)


def _measured_run(work: loadgen.Workload, pid: int, rate: float, args: argparse.Namespace) -> dict:
    """One ``loadgen.run`` at ``rate`` with the server's CPU per request (every request sent, warm-up too;
    the server's idle time meanwhile counted as well) and its workers' shares of the Decides."""
    cpu, counted = srv.tree_cpu_seconds(pid), srv.worker_decides(pid)
    result = loadgen.run(work, rate, args.duration, args.warmup, args.processes)
    result.pop("series", None)
    result["server_cpu_ms_per_request"] = srv.cpu_ms_per_request(pid, cpu, int(rate * (args.warmup + args.duration)))
    result["worker_shares"] = srv.shares(counted, srv.worker_decides(pid))
    return result


def find_max_rounds(args: argparse.Namespace) -> int:
    slo = loadgen.parse_slo(args.slo or ["p99=5ms"])
    rounds: list[dict[str, dict]] = []
    cmds, trees = commands(args.workers, args.models_dir, args.compare_tree, args.bare_aio)
    with srv.serving(cmds, args.customers, trees=trees) as servers:
        names = list(servers)
        for r in range(args.rounds):
            shift = r % len(names)
            result: dict[str, dict] = {}
            for name in names[shift:] + names[:shift]:
                work = loadgen.Workload(servers[name][1], customers=args.customers)
                print(f"--- round {r + 1}: {name} ({stamp()})", flush=True)
                start = args.bare_start_rate if name in (BARE, BARE_AIO) else args.start_rate
                pid = servers[name][0].pid
                counted = srv.worker_decides(pid)
                found = loadgen.find_max(work, slo, start, 100_000, args.step, args.duration, args.warmup,
                                         args.processes, args.repeats)
                found["worker_shares"] = srv.shares(counted, srv.worker_decides(pid))
                at = _measured_run(work, pid, args.p50_rate, args)
                print(f"at {args.p50_rate:g}/s: {loadgen._line(at)}  server CPU "
                      f"{at['server_cpu_ms_per_request']:.3f} ms/request{_share_text(at['worker_shares'])}", flush=True)
                for step in found["steps"]:
                    step.pop("series", None)
                result[name] = {"max_rps": found["max_rps_meeting_slo"], "find_max": found, "at_rate": at}
            rounds.append(result)
            # after every round: a long run stopped early keeps what it measured
            write_json(args.json, {"summary": summarize(rounds), "rounds": rounds, "args": vars(args)})

    summary_table = summarize(rounds)
    print(f"\nSLO {', '.join(f'{k[:-3]} <= {v:g} ms' for k, v in slo.items())}; {args.rounds} round(s), "
          f"--repeats {args.repeats}, {args.duration:g} s per run; medians over rounds, ratios within each round")
    print(f"{'server':>18} {'max rate/s':>11} {'/ bare':>7} {'per round':>20} | {f'p50 at {args.p50_rate:g}/s':>14} "
          f"{'/ bare':>7} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU ms/req':>10} {'/ bare':>7}")
    for name, t in summary_table.items():
        ratio = f"{t['max_ratio']:7.3f}" if t["max_ratio"] is not None else f"{'-':>7}"
        print(f"{name:>18} {t['max_rps']:11.0f} {ratio} {', '.join(f'{x:.0f}' for x in t['max_rps_rounds']):>20} | "
              f"{t['p50_ms']:14.3f} {t['p50_ratio']:7.2f} {t['p99_ms']:8.3f} {t['p999_ms']:9.3f} "
              f"{t['cpu_ms']:10.3f} {t['cpu_ratio']:7.2f}")
    print_scaling(summary_table, rounds)
    write_json(args.json, {"summary": summary_table, "rounds": rounds, "args": vars(args)})
    return 0


def alternate_pairs(args: argparse.Namespace) -> int:
    """Request-by-request alternation (``harness.clients``) of server pairs sharing one load generator:
    a machine shared with other work slows both sides of a pair alike."""
    results = []
    cmds, trees = commands(args.workers, args.models_dir, args.compare_tree, args.bare_aio)
    with srv.serving(cmds, args.customers, trees=trees) as servers:
        pairs = [(BARE, n) for n in servers if n != BARE and not n.startswith("before ")]
        pairs += [(n, n.removeprefix("before ")) for n in servers if n.startswith("before ")]
        for pair in pairs:
            print(f"--- {pair[0]} vs {pair[1]} ({stamp()})", flush=True)
            cpu = {n: srv.tree_cpu_seconds(servers[n][0].pid) for n in pair}
            rounds = alternate_rounds({n: servers[n][1] for n in pair}, args.alternate_rounds, args.alternate,
                                      args.duration, args.customers)
            t = summarize_rounds(rounds)
            for n in pair:
                t[n]["server_cpu_ms_per_request"] = srv.cpu_ms_per_request(servers[n][0].pid, cpu[n], t[n]["requests"])
            results.append({"pair": pair, "table": t})
    print(f"\nalternating request by request, {args.alternate:g}/s in total, {args.alternate_rounds} x "
          f"{args.duration:g} s; ratios second / first")
    print(f"{'pair':>34} {'p50 ms':>15} {'p99 ms':>17} {'p99.9 ms':>17} {'CPU ms/req':>13} | {'p50':>5} {'p99':>5} {'CPU':>5}")
    for r in results:
        a, b = (r["table"][n] for n in r["pair"])
        print(f"{' vs '.join(r['pair']):>34} {a['p50_ms']:7.3f} {b['p50_ms']:7.3f} {a['p99_ms']:8.3f} {b['p99_ms']:8.3f} "
              f"{a['p999_ms']:8.3f} {b['p999_ms']:8.3f} {a['server_cpu_ms_per_request']:6.3f} "
              f"{b['server_cpu_ms_per_request']:6.3f} | {b['p50_ms'] / a['p50_ms']:5.2f} {b['p99_ms'] / a['p99_ms']:5.2f} "
              f"{b['server_cpu_ms_per_request'] / a['server_cpu_ms_per_request']:5.2f}")
    write_json(args.json, {"alternate": results, "args": vars(args)})
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Every server at fixed open-loop rates, round after round (the order rotating): on a shared machine
    a latency at a given rate, median over rounds, says more than one find-max that a burst can break."""
    runs: dict[str, dict[float, list[dict]]] = {}
    cmds, trees = commands(args.workers, args.models_dir, args.compare_tree, args.bare_aio)
    with srv.serving(cmds, args.customers, trees=trees) as servers:
        names = list(servers) if args.bare_aio else [n for n in servers if n != BARE]
        for r in range(args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                work = loadgen.Workload(servers[name][1], customers=args.customers)
                for rate in args.sweep:
                    result = _measured_run(work, servers[name][0].pid, rate, args)
                    runs.setdefault(name, {}).setdefault(rate, []).append(result)
                    print(f"round {r + 1} {name:>16} {loadgen._line(result)}  CPU "
                          f"{result['server_cpu_ms_per_request']:.3f} ms/req{_share_text(result['worker_shares'])} "
                          f"({stamp()})", flush=True)
    print(f"\nmedians over {args.rounds} round(s) of {args.duration:g} s per server and rate")
    print(f"{'server':>16} {'rate/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU ms/req':>10}  p99 per round")
    for name, by_rate in runs.items():
        for rate, rs in by_rate.items():
            print(f"{name:>16} {rate:7.0f} {np.median([x['p50_ms'] for x in rs]):8.3f} "
                  f"{np.median([x['p99_ms'] for x in rs]):8.3f} {np.median([x['p999_ms'] for x in rs]):9.3f} "
                  f"{np.median([x['server_cpu_ms_per_request'] for x in rs]):10.3f}  "
                  + ", ".join(f"{x['p99_ms']:.1f}" for x in rs))
    write_json(args.json, {"sweep": runs, "args": vars(args)})
    return 0


def _share_text(worker_shares: list[float]) -> str:
    return f"  per-worker share {'/'.join(f'{x:.0%}' for x in worker_shares)}" if len(worker_shares) > 1 else ""


def print_scaling(summary_table: dict[str, dict], rounds: list[dict[str, dict]]) -> None:
    """Each worker count's highest rate against one worker's (the same tree, ratios within each round) and
    how evenly its workers shared the Decides of its find-max runs (largest share first, last round)."""
    one = "1 worker"
    if one not in summary_table:
        return
    print(f"\n{'scaling':>18} {'/ 1 worker':>11} {'per round':>20} | per-worker share of Decides in find-max (last round)")
    for name in summary_table:
        if name in (BARE, BARE_AIO) or name.startswith("before "):
            continue
        scaled = [r[name]["max_rps"] / r[one]["max_rps"] for r in rounds if r[one]["max_rps"]]
        text = ", ".join(f"{x:.2f}" for x in scaled)
        median = f"{float(np.median(scaled)):11.2f}" if scaled else f"{'-':>11}"
        print(f"{name:>18} {median} {text:>20} | "
              + "/".join(f"{x:.0%}" for x in rounds[-1][name]["find_max"].get("worker_shares", [])))


def summarize(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per server: median highest rate and p50 over rounds; ratios to the bare server of the same round."""
    out = {}
    for name in rounds[0]:
        maxes = [r[name]["max_rps"] for r in rounds]
        held = [r[name]["max_rps"] / r[BARE]["max_rps"] for r in rounds if r[BARE]["max_rps"]]  # bare held a rate
        at = [(r[name]["at_rate"], r[BARE]["at_rate"]) for r in rounds]
        cpu = "server_cpu_ms_per_request"
        out[name] = {
            "max_rps": float(np.median(maxes)), "max_rps_rounds": maxes,
            "max_ratio": float(np.median(held)) if held else None,
            "cpu_ms": float(np.median([x[cpu] for x, _ in at])),
            "cpu_ratio": float(np.median([x[cpu] / bare[cpu] for x, bare in at])),
            "p50_ms": float(np.median([x["p50_ms"] for x, _ in at])),
            "p50_ratio": float(np.median([x["p50_ms"] / bare["p50_ms"] for x, bare in at])),
            "p99_ms": float(np.median([x["p99_ms"] for x, _ in at])),
            "p999_ms": float(np.median([x["p999_ms"] for x, _ in at])),
        }
    return out


# --- the overheads, A/B -----------------------------------------------------------------------------------


def _ab_report(t: dict[str, dict], base: str, other: str, args: argparse.Namespace, note: str) -> dict[str, float]:
    print("\n" + table(t, title=note, extra=("calls", "errors")))
    r = ratios(t[other], t[base])
    print(ratio_line(f"{other} / {base}", r))
    return r


def _alternating(cmds: dict[str, list[str]], args: argparse.Namespace, connect: Any = None) -> dict[str, dict]:
    """Two servers on one seeded Redis, alternating request by request for --alternate-rounds rounds."""
    rate = args.alternate or 200.0
    with srv.serving(cmds, args.customers, connect=connect) as servers:
        rounds = alternate_rounds({n: a for n, (_, a) in servers.items()}, args.alternate_rounds, rate,
                                  args.duration, args.customers,
                                  connect=connect and (lambda n, a: connect(n, a)))
    t = summarize_rounds(rounds)
    for name, side in t.items():
        print(f"{name:10} p99 per round: {', '.join(f'{x:.3f}' for x in side['rounds_p99_ms'])}")
    return t


def ab_contact(args: argparse.Namespace) -> int:
    """Contact policies and budgets on against off (``--no-contact-policies``); exit 1 when p99 on/off > 1.5."""
    if args.in_process:
        t = contact_in_process(args.in_process, args.customers, args.models_dir)
        note = f"contact policies, in-process, {args.in_process} calls each"
    else:
        t = _alternating({"off": srv.serve_command(srv.loopback(), "--no-contact-policies", models_dir=args.models_dir),
                          "on": srv.serve_command(srv.loopback(), models_dir=args.models_dir)}, args)
        note = f"contact policies, {args.alternate_rounds} rounds x {args.duration:g}s, alternating"
    r = _ab_report(t, "off", "on", args, note)
    print(f"p99 on / off: {r['p99']:.2f} (target <= 1.5)")
    write_json(args.json, t | {"p99_ratio": r["p99"], "ratios": r, "args": vars(args)})
    return 0 if r["p99"] <= 1.5 else 1


def ab_explore(args: argparse.Namespace) -> int:
    """Epsilon exploration (0.2 per slot: the walk judges every candidate it could still show at each slot
    and records the feasible sets) against none, in process, both with contact policies."""
    t = contact_in_process(args.in_process or 4000, args.customers, args.models_dir, explore=0.2)
    r = _ab_report(t, "off", "on", args, f"epsilon exploration 0.2, in-process, {args.in_process or 4000} calls each")
    write_json(args.json, t | {"ratios": r, "args": vars(args)})
    return 0


def ab_uplift(args: argparse.Namespace) -> int:
    """Uplift arbitration (the champion's model file as the organic half: a second model of the same size
    scores every admitted action) against propensity arbitration, in process, both with contact policies."""
    t = contact_in_process(args.in_process or 4000, args.customers, args.models_dir, uplift=True)
    r = _ab_report(t, "off", "on", args, f"uplift arbitration, in-process, {args.in_process or 4000} calls each")
    write_json(args.json, t | {"ratios": r, "args": vars(args)})
    return 0


def contact_in_process(calls: int, customers: int, models_dir: str, explore: float = 0.0,
                       uplift: bool = False) -> dict[str, dict]:
    """``DecisionEngine.decide`` with contact policies on and off, one process, alternating call by call on
    the same request sequence (no gRPC: the cost of the policies and budgets themselves); with ``explore``,
    both sides enforce contact policies and "on" explores epsilon-greedy with that share per slot; with
    ``uplift``, both enforce them and "on" ranks by uplift."""
    import random
    from dataclasses import replace

    from engine.decision.funnel import DecisionEngine
    from engine.decision.request import DecideInput
    from engine.live import Live
    from engine.models.experiment import ExplorationConfig, ModelSet
    from engine.sim.telco import CHANNELS

    mix = dict(zip(CHANNELS, (0.25, 0.35, 0.25, 0.07, 0.03, 0.03, 0.02)))
    times: dict[str, list[float]] = {"off": [], "on": []}
    with srv.engine_parts(customers, models_dir) as parts:
        model = parts.model.current
        if uplift:
            champion = model.champion if isinstance(model, ModelSet) else model
            on = Live(ModelSet(replace(champion, organic=replace(champion, version=f"{champion.version}+organic")),
                               arbitration="uplift"))
        else:
            on = Live(ModelSet(model, exploration=ExplorationConfig(strategy="epsilon", share=explore))) \
                if explore > 0 else parts.model
        clock = lambda: 1_781_524_800.0  # noqa: E731
        engines = {"off": DecisionEngine(parts.store, parts.rules, parts.model, contacts=explore > 0 or uplift,
                                         clock=clock),
                   "on": DecisionEngine(parts.store, parts.rules, on, contacts=True, clock=clock)}
        for e in engines.values():
            e.warmup()
        rng = random.Random(5)
        for i in range(calls + 1000):
            r = rng.random()
            cid = f"C{rng.randrange(500 if r < 0.3 else customers):07d}" if r >= 0.05 else f"NEW-{i}"
            req = DecideInput(cid, rng.choices(list(mix), list(mix.values()))[0], max_actions=3)
            for side in (("off", "on") if i % 2 else ("on", "off")):
                t = time.perf_counter()
                engines[side].decide(req)
                if i >= 1000:
                    times[side].append(time.perf_counter() - t)
    return {side: summary(t, scale=1000) for side, t in times.items()}


def ab_tls(args: argparse.Namespace) -> int:
    """TLS with token authentication against plaintext without auth."""
    from engine.serving.client import open_channel
    from engine.serving.security import token_hash
    from tests.certs import CA

    token = "loadtest-token"
    with tempfile.TemporaryDirectory() as tmp:
        ca = CA(Path(tmp) / "pki")
        cert = ca.issue("server", "nba.test", server=True)
        auth = Path(tmp) / "auth.yaml"
        auth.write_text(f"callers:\n  - name: loadtest\n    token_sha256: {token_hash(token)}\n    roles: [decide]\n")
        tls: dict[str, dict[str, Any]] = {"plain": {}, "secure": {"tls_ca": ca.pem, "token": token}}
        t = _alternating({"plain": srv.serve_command(srv.loopback(), models_dir=args.models_dir),
                          "secure": srv.serve_command(srv.loopback(), "--tls-cert", str(cert.cert), "--tls-key",
                                                      str(cert.key), "--auth", str(auth), models_dir=args.models_dir)},
                         args, connect=lambda n, a: open_channel(a, **tls[n]))
    r = _ab_report(t, "plain", "secure", args, f"{args.alternate_rounds} rounds x {args.duration:g}s, alternating")
    write_json(args.json, t | {"ratios": r, "args": vars(args)})
    return 0


def _turns(sides: dict[str, Callable[[int], object]], turns: int, calls: int,
           switch: Callable[[str], None] = lambda side: None) -> dict[str, dict]:
    """Sequential calls, the sides alternating turn by turn (A, B / B, A), the first turn dropped as warm-up;
    ``switch(side)`` before each side's turn. Percentiles in microseconds."""
    took: dict[str, list[float]] = {side: [] for side in sides}
    i = 0
    for turn in range(turns):
        for side in (list(sides) if turn % 2 == 0 else list(sides)[::-1]):
            switch(side)
            call = sides[side]
            for _ in range(calls):
                i += 1
                began = time.perf_counter()
                call(i)
                if turn:
                    took[side].append(time.perf_counter() - began)
    return {side: summary(t, unit="us", scale=1e6, digits=1) for side, t in took.items()}


def ab_admission(args: argparse.Namespace) -> int:
    """Admission's message watchdog (health checks and streams get it) against plain unary admission."""
    import dataclasses

    import grpc

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.config import Config
    from engine.serving.admission import Admission
    from engine.serving.app import App
    from engine.serving.server import build_server

    class Watched(Admission):
        """nba.v1 calls run like health checks: request-streaming, their message awaited under the watchdog."""

        def _admit(self, method: str, handler: grpc.RpcMethodHandler, lane: Any) -> grpc.RpcMethodHandler:
            if lane is self.calls:
                lane = dataclasses.replace(self.calls)  # the same pool and limit, past the plain branch
            return super()._admit(method, handler, lane)

    app = App(Config(data_dir=Path(tempfile.mkdtemp(prefix="nba-admission-")), demo=False)).start()
    opened: list[tuple[grpc.Server, grpc.Channel]] = []
    try:
        request = pb.DecideRequest(customer_id="C0000042", channel_name="call_center", touchpoint="bench", max_actions=3)
        sides: dict[str, Callable[[int], object]] = {}
        for name, admission in (("plain", Admission(16)), ("watchdog", Watched(16))):
            server, port, _ = build_server(app, "127.0.0.1:0", admission=admission)
            server.start()
            opened.append((server, grpc.insecure_channel(f"127.0.0.1:{port}")))
            stub = pb_grpc.DecisionServiceStub(opened[-1][1])
            sides[name] = lambda i, stub=stub: stub.Decide(request, timeout=2)
        t = _turns(sides, args.turns, args.calls)
    finally:
        for server, channel in opened:
            channel.close()
            server.stop(0)
        app.close()
    print(table(t, unit="us", title="admission", extra=("calls",)))
    print(ratio_line("watchdog / plain", ratios(t["watchdog"], t["plain"], unit="us")))
    write_json(args.json, t | {"args": vars(args)})
    return 0


def ab_tracing(args: argparse.Namespace) -> int:
    """Tracing off (``nba serve``'s default) against on, spans batched to an exporter that drops them."""
    from collections.abc import Sequence

    import grpc
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.config import Config
    from engine.decision import traces
    from engine.decision.request import DecideInput
    from engine.serving.app import App
    from engine.serving.server import build_server

    customers = 2_000

    class Dropped(SpanExporter):
        """Counts the spans and drops them."""

        def __init__(self) -> None:
            self.spans = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self.spans += len(spans)
            return SpanExportResult.SUCCESS

    app = App(Config(data_dir=Path(tempfile.mkdtemp(prefix="nba-tracing-")), demo_customers=customers,
                     metrics_port=0)).start()
    exporter = Dropped()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(args.sample)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    server = channel = None
    try:
        call: Callable[[int], object]
        if args.via == "grpc":
            server, port, _ = build_server(app, "127.0.0.1:0")
            server.start()
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = pb_grpc.DecisionServiceStub(channel)

            def call(i: int) -> object:
                return stub.Decide(pb.DecideRequest(customer_id=f"C{i % customers:07d}", channel_name="web",
                                                    touchpoint="bench", max_actions=3), timeout=2)
        else:
            def call(i: int) -> object:
                req = DecideInput(customer_id=f"C{i % customers:07d}", channel="web", touchpoint="bench", max_actions=3)
                tracer = traces.tracer()
                if tracer is None:
                    return app.engine.decide(req)
                with tracer.start_as_current_span("nba.v1.DecisionService/Decide", kind=SpanKind.SERVER):
                    return app.engine.decide(req)

        t = _turns({"off": call, "on": call}, args.turns, args.calls,
                   switch=lambda side: traces.enable(provider) if side == "on" else traces.disable())
        traces.disable()
        provider.force_flush()
    finally:
        provider.shutdown()
        if channel is not None:
            channel.close()
        if server is not None:
            server.stop(0)
        app.close()
    print(table(t, unit="us", title="tracing", extra=("calls",)))
    print(ratio_line("on / off", ratios(t["on"], t["off"], unit="us")))
    print(f"--via {args.via} --sample {args.sample:g}: spans exported {exporter.spans} "
          f"({exporter.spans / (args.turns * args.calls):.2f} a call with tracing on)")
    write_json(args.json, t | {"spans": exporter.spans, "args": vars(args)})
    return 0


AB: dict[str, Callable[[argparse.Namespace], int]] = {
    "contact": ab_contact, "explore": ab_explore, "uplift": ab_uplift, "tls": ab_tls, "admission": ab_admission,
    "tracing": ab_tracing}


if __name__ == "__main__":
    raise SystemExit(main())
