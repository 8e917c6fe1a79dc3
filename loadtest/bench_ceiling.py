"""The service against the transport's ceiling: highest rate meeting the SLO, bare server vs ``nba serve``.

Seeds one embedded Redis with the demo customers, starts the bare server (``bare_server.py``: the
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
alternates request by request between them (``contact_p99.alternate``): each ``nba serve`` against
the bare server, and each against the same worker count from ``--compare-tree``; per pair the
percentiles, the CPU per request and the ratios. On a machine shared with other work this is the fair
comparison: a burst of someone else's load hits both sides of a pair alike.

``--bare-aio`` adds the bare server's asyncio twin ("bare aio": ``bare_server.py --aio``, same options,
``maximum_concurrent_rpcs`` and per-call work, on an event loop instead of a thread pool; issue 18), started
at ``--bare-start-rate`` too; ratios stay against the sync bare server. ``--workers`` with no count
measures only the two bare servers; ``--sweep`` then includes both bare servers (without ``--bare-aio`` it
leaves the bare server out), ``--alternate`` pairs bare with bare aio:

    python loadtest/bench_ceiling.py --workers --bare-aio --rounds 2 --repeats 3 --duration 5 --warmup 2 \
        --bare-start-rate 600 --step 1.25
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402
from grpc_modes import wait_serving  # noqa: E402

from engine.store.redis_embedded import EmbeddedRedis, free_port  # noqa: E402

BARE = "bare"
BARE_AIO = "bare aio"


def _default_models() -> str:
    return "/tmp/nba-models" if Path("/tmp/nba-models/propensity/CHAMPION").is_file() else str(ROOT / "models")


def start_servers(redis_url: str, workers: list[int], models_dir: str, compare_tree: Path | None,
                  bare_aio: bool = False) -> dict[str, tuple[subprocess.Popen, str]]:
    """name -> (process, address) for the bare server (and its asyncio twin with ``bare_aio``) and every
    ``nba serve`` variant, once SERVING."""
    env = dict(os.environ, REDIS_URL=redis_url)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    trees = [("", ROOT)] + ([("before ", compare_tree)] if compare_tree else [])
    commands: dict[str, tuple[list[str], Path]] = {}
    port = free_port()
    commands[BARE] = ([sys.executable, str(ROOT / "loadtest" / "bare_server.py"), "--address", f"127.0.0.1:{port}"],
                      ROOT)
    if bare_aio:
        commands[BARE_AIO] = ([sys.executable, str(ROOT / "loadtest" / "bare_server.py"), "--aio",
                               "--address", f"127.0.0.1:{free_port()}"], ROOT)
    for label, tree in trees:
        for w in workers:
            commands[f"{label}{w} worker{'s' if w > 1 else ''}"] = (
                [sys.executable, "-m", "engine.cli", "serve", "--workers", str(w), "--no-demo", "--metrics-port", "0",
                 "--models-dir", models_dir, "--address", f"127.0.0.1:{free_port()}"], tree)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name, (cmd, tree) in commands.items():
            address = cmd[cmd.index("--address") + 1]
            proc = subprocess.Popen(cmd, cwd=tree, env=dict(env, PYTHONPATH=str(tree)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers[name] = (proc, address)
        for proc, address in servers.values():
            wait_serving(address, proc)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process, from /proc."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return stats


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` and all its descendants (workers), from /proc."""
    stats = _proc_stats()
    tree = {pid}
    for _ in range(4):  # supervisor -> workers -> (none deeper today)
        tree |= {p for p, (parent, _) in stats.items() if parent in tree}
    return sum(stats.get(p, (0, 0.0))[1] for p in tree)


def worker_decides(pid: int) -> dict[int, float]:
    """Decide calls each worker of the ``nba serve`` supervisor ``pid`` has answered so far (worker pid ->
    count), from the workers' Prometheus multiprocess files: the spawned workers inherit the
    supervisor's PROMETHEUS_MULTIPROC_DIR and each writes ``counter_<pid>.db``. Empty for the bare server."""
    from prometheus_client.mmap_dict import MmapedDict

    counts: dict[int, float] = {}
    for child, (parent, _) in _proc_stats().items():
        if parent != pid:
            continue
        try:
            env = dict(v.split("=", 1) for v in (Path("/proc") / str(child) / "environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        path = Path(env.get("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")) / f"counter_{child}.db"
        if not path.is_file():
            continue
        keys = ((json.loads(key), value) for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)))
        counts[child] = sum(value for (_, name, labels, _), value in keys
                            if name == "nba_grpc_requests_total" and labels.get("method") == "Decide")
    return counts


def shares(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Each worker's share of the Decides answered between two ``worker_decides`` readings, largest first."""
    done = {p: after[p] - before.get(p, 0.0) for p in after}
    total = sum(done.values())
    return sorted((n / total for n in done.values()), reverse=True) if total else []


def stop_servers(servers: dict[str, tuple[subprocess.Popen, str]]) -> None:
    for proc, _ in servers.values():
        proc.terminate()
    for proc, _ in servers.values():
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                    help="nba serve worker counts (default 1 2); none: only the bare server(s)")
    ap.add_argument("--bare-aio", action="store_true",
                    help='also "bare aio": bare_server.py --aio, the asyncio twin of the bare server')
    ap.add_argument("--rounds", type=int, default=1, help="find-max of every server per round, order rotating")
    ap.add_argument("--slo", action="append", default=[], help="default p99=5ms")
    ap.add_argument("--start-rate", type=float, default=100, help="nba serve's first rate")
    ap.add_argument("--bare-start-rate", type=float, default=500, help="the bare servers' first rate")
    ap.add_argument("--step", type=float, default=1.25)
    ap.add_argument("--duration", type=float, default=10, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--processes", type=int, default=2, help="load generator processes")
    ap.add_argument("--repeats", type=int, default=3, help="runs per rate, judged on the median p99")
    ap.add_argument("--p50-rate", type=float, default=100, help="rate of the latency comparison run")
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--models-dir", default=_default_models())
    ap.add_argument("--compare-tree", type=Path, help="also nba serve from this source tree (before/after)")
    ap.add_argument("--alternate", type=float, metavar="RATE",
                    help="instead of find-max: pairs of servers alternating request by request at RATE in total "
                         "(each nba serve against the bare server, and against --compare-tree's)")
    ap.add_argument("--alternate-rounds", type=int, default=3)
    ap.add_argument("--sweep", type=float, nargs="+", metavar="RATE",
                    help="instead of find-max: every server at these fixed rates (loadgen.run), --rounds times, "
                         "the servers' order rotating by round; median p50/p99 per server and rate")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.sweep and not args.workers and not args.bare_aio:
        ap.error("--sweep leaves the bare server out: give --workers counts or --bare-aio")
    slo = loadgen.parse_slo(args.slo or ["p99=5ms"])
    if args.alternate:
        return alternate_pairs(args)
    if args.sweep:
        return sweep(args)

    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        from engine.sim import demo
        from engine.store.profiles import ProfileStore

        demo.seed(ProfileStore.from_url(redis_server.url), args.customers)
        servers = start_servers(redis_server.url, args.workers, args.models_dir, args.compare_tree, args.bare_aio)
        try:
            names = list(servers)
            for r in range(args.rounds):
                shift = r % len(names)
                result: dict[str, dict] = {}
                for name in names[shift:] + names[:shift]:
                    work = loadgen.Workload(servers[name][1], customers=args.customers)
                    print(f"--- round {r + 1}: {name} ({time.strftime('%H:%M:%S')}, load average "
                          f"{os.getloadavg()[0]:.2f})", flush=True)
                    start = args.bare_start_rate if name in (BARE, BARE_AIO) else args.start_rate
                    pid = servers[name][0].pid
                    counted = worker_decides(pid)
                    found = loadgen.find_max(work, slo, start, 100_000, args.step, args.duration, args.warmup,
                                             args.processes, args.repeats)
                    found["worker_shares"] = shares(counted, worker_decides(pid))
                    cpu, counted = tree_cpu_seconds(pid), worker_decides(pid)
                    at = loadgen.run(work, args.p50_rate, args.duration, args.warmup, args.processes)
                    # every request sent (warm-up too); the server's idle time meanwhile is counted as well
                    at["server_cpu_ms_per_request"] = ((tree_cpu_seconds(pid) - cpu) * 1000
                                                       / (args.p50_rate * (args.warmup + args.duration)))
                    at["worker_shares"] = shares(counted, worker_decides(pid))
                    print(f"at {args.p50_rate:g}/s: {loadgen._line(at)}  server CPU "
                          f"{at['server_cpu_ms_per_request']:.3f} ms/request{_share_text(at['worker_shares'])}",
                          flush=True)
                    for step in found["steps"]:
                        step.pop("series", None)
                    at.pop("series", None)
                    result[name] = {"max_rps": found["max_rps_meeting_slo"], "find_max": found, "at_rate": at}
                rounds.append(result)
                if args.json:  # after every round: a long run stopped early keeps what it measured
                    Path(args.json).write_text(json.dumps({"summary": summarize(rounds), "rounds": rounds,
                                                           "args": vars(args)}, indent=2, default=str))
        finally:
            stop_servers(servers)

    table = summarize(rounds)
    print(f"\nSLO {', '.join(f'{k[:-3]} <= {v:g} ms' for k, v in slo.items())}; {args.rounds} round(s), "
          f"--repeats {args.repeats}, {args.duration:g} s per run; medians over rounds, ratios within each round")
    print(f"{'server':>18} {'max rate/s':>11} {'/ bare':>7} {'per round':>20} | {f'p50 at {args.p50_rate:g}/s':>14} "
          f"{'/ bare':>7} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU ms/req':>10} {'/ bare':>7}")
    for name, t in table.items():
        ratio = f"{t['max_ratio']:7.3f}" if t["max_ratio"] is not None else f"{'-':>7}"
        print(f"{name:>18} {t['max_rps']:11.0f} {ratio} {', '.join(f'{x:.0f}' for x in t['max_rps_rounds']):>20} | "
              f"{t['p50_ms']:14.3f} {t['p50_ratio']:7.2f} {t['p99_ms']:8.3f} {t['p999_ms']:9.3f} "
              f"{t['cpu_ms']:10.3f} {t['cpu_ratio']:7.2f}")
    print_scaling(table, rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": table, "rounds": rounds, "args": vars(args)},
                                              indent=2, default=str))
    return 0


def alternate_pairs(args: argparse.Namespace) -> int:
    """Request-by-request alternation (``contact_p99.alternate_rounds``) of server pairs sharing one load
    generator: a machine shared with other work slows both sides of a pair alike."""
    import contact_p99

    results = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        from engine.sim import demo
        from engine.store.profiles import ProfileStore

        demo.seed(ProfileStore.from_url(redis_server.url), args.customers)
        servers = start_servers(redis_server.url, args.workers, args.models_dir, args.compare_tree, args.bare_aio)
        try:
            pairs = [(BARE, n) for n in servers if n != BARE and not n.startswith("before ")]
            pairs += [(n, n.removeprefix("before ")) for n in servers if n.startswith("before ")]
            for pair in pairs:
                print(f"--- {pair[0]} vs {pair[1]} ({time.strftime('%H:%M:%S')}, load average "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
                cpu = {n: tree_cpu_seconds(servers[n][0].pid) for n in pair}
                rounds = contact_p99.alternate_rounds({n: servers[n][1] for n in pair}, args.alternate_rounds,
                                                      args.alternate, args.duration, args.customers)
                table = contact_p99.summarize_rounds(rounds)
                for n in pair:
                    table[n]["server_cpu_ms_per_request"] = (tree_cpu_seconds(servers[n][0].pid) - cpu[n]) * 1000 / \
                        table[n]["requests"]
                results.append({"pair": pair, "table": table})
        finally:
            stop_servers(servers)
    print(f"\nalternating request by request, {args.alternate:g}/s in total, {args.alternate_rounds} x "
          f"{args.duration:g} s; ratios second / first")
    print(f"{'pair':>34} {'p50 ms':>15} {'p99 ms':>17} {'p99.9 ms':>17} {'CPU ms/req':>13} | {'p50':>5} {'p99':>5} {'CPU':>5}")
    for r in results:
        a, b = (r["table"][n] for n in r["pair"])
        print(f"{' vs '.join(r['pair']):>34} {a['p50_ms']:7.3f} {b['p50_ms']:7.3f} {a['p99_ms']:8.3f} {b['p99_ms']:8.3f} "
              f"{a['p999_ms']:8.3f} {b['p999_ms']:8.3f} {a['server_cpu_ms_per_request']:6.3f} "
              f"{b['server_cpu_ms_per_request']:6.3f} | {b['p50_ms'] / a['p50_ms']:5.2f} {b['p99_ms'] / a['p99_ms']:5.2f} "
              f"{b['server_cpu_ms_per_request'] / a['server_cpu_ms_per_request']:5.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"alternate": results, "args": vars(args)}, indent=2, default=str))
    return 0


def sweep(args: argparse.Namespace) -> int:
    """Every server at fixed open-loop rates, round after round (the order rotating): on a shared machine
    a latency at a given rate, median over rounds, says more than one find-max that a burst can break."""
    runs: dict[str, dict[float, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        from engine.sim import demo
        from engine.store.profiles import ProfileStore

        demo.seed(ProfileStore.from_url(redis_server.url), args.customers)
        servers = start_servers(redis_server.url, args.workers, args.models_dir, args.compare_tree, args.bare_aio)
        try:
            names = list(servers) if args.bare_aio else [n for n in servers if n != BARE]
            for r in range(args.rounds):
                shift = r % len(names)
                for name in names[shift:] + names[:shift]:
                    work = loadgen.Workload(servers[name][1], customers=args.customers)
                    for rate in args.sweep:
                        pid = servers[name][0].pid
                        cpu, counted = tree_cpu_seconds(pid), worker_decides(pid)
                        result = loadgen.run(work, rate, args.duration, args.warmup, args.processes)
                        result.pop("series", None)
                        result["server_cpu_ms_per_request"] = ((tree_cpu_seconds(pid) - cpu) * 1000
                                                               / (rate * (args.warmup + args.duration)))
                        result["worker_shares"] = shares(counted, worker_decides(pid))
                        runs.setdefault(name, {}).setdefault(rate, []).append(result)
                        print(f"round {r + 1} {name:>16} {loadgen._line(result)}  CPU "
                              f"{result['server_cpu_ms_per_request']:.3f} ms/req{_share_text(result['worker_shares'])} "
                              f"(load average {os.getloadavg()[0]:.2f})", flush=True)
        finally:
            stop_servers(servers)
    print(f"\nmedians over {args.rounds} round(s) of {args.duration:g} s per server and rate")
    print(f"{'server':>16} {'rate/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU ms/req':>10}  p99 per round")
    for name, by_rate in runs.items():
        for rate, rs in by_rate.items():
            print(f"{name:>16} {rate:7.0f} {np.median([x['p50_ms'] for x in rs]):8.3f} "
                  f"{np.median([x['p99_ms'] for x in rs]):8.3f} {np.median([x['p999_ms'] for x in rs]):9.3f} "
                  f"{np.median([x['server_cpu_ms_per_request'] for x in rs]):10.3f}  "
                  + ", ".join(f"{x['p99_ms']:.1f}" for x in rs))
    if args.json:
        Path(args.json).write_text(json.dumps({"sweep": runs, "args": vars(args)}, indent=2, default=str))
    return 0


def _share_text(worker_shares: list[float]) -> str:
    return f"  per-worker share {'/'.join(f'{x:.0%}' for x in worker_shares)}" if len(worker_shares) > 1 else ""


def print_scaling(table: dict[str, dict], rounds: list[dict[str, dict]]) -> None:
    """Each worker count's highest rate against one worker's (the same tree, ratios within each round) and
    how evenly its workers shared the Decides of its find-max runs (largest share first, last round)."""
    one = "1 worker"
    if one not in table:
        return
    print(f"\n{'scaling':>18} {'/ 1 worker':>11} {'per round':>20} | per-worker share of Decides in find-max (last round)")
    for name in table:
        if name in (BARE, BARE_AIO) or name.startswith("before "):
            continue
        ratios = [r[name]["max_rps"] / r[one]["max_rps"] for r in rounds if r[one]["max_rps"]]
        text = ", ".join(f"{x:.2f}" for x in ratios)
        median = f"{float(np.median(ratios)):11.2f}" if ratios else f"{'-':>11}"
        print(f"{name:>18} {median} {text:>20} | "
              + "/".join(f"{x:.0%}" for x in rounds[-1][name]["find_max"].get("worker_shares", [])))


def summarize(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per server: median highest rate and p50 over rounds; ratios to the bare server of the same round."""
    out = {}
    for name in rounds[0]:
        maxes = [r[name]["max_rps"] for r in rounds]
        p50s = [r[name]["at_rate"]["p50_ms"] for r in rounds]
        ratios = [r[name]["max_rps"] / r[BARE]["max_rps"] for r in rounds if r[BARE]["max_rps"]]  # bare held a rate
        out[name] = {
            "max_rps": float(np.median(maxes)), "max_rps_rounds": maxes,
            "max_ratio": float(np.median(ratios)) if ratios else None,
            "cpu_ms": float(np.median([r[name]["at_rate"]["server_cpu_ms_per_request"] for r in rounds])),
            "cpu_ratio": float(np.median([r[name]["at_rate"]["server_cpu_ms_per_request"]
                                          / r[BARE]["at_rate"]["server_cpu_ms_per_request"] for r in rounds])),
            "p50_ms": float(np.median(p50s)),
            "p50_ratio": float(np.median([r[name]["at_rate"]["p50_ms"] / r[BARE]["at_rate"]["p50_ms"] for r in rounds])),
            "p99_ms": float(np.median([r[name]["at_rate"]["p99_ms"] for r in rounds])),
            "p999_ms": float(np.median([r[name]["at_rate"]["p999_ms"] for r in rounds])),
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
