"""Redis cost per operation and memory per customer, on one Redis node and on a 3-master Redis Cluster.

In-process (no gRPC: the Redis side of an operation is the same either way), the service as ``nba
serve`` composes it (``engine.serving.app.App``: contact policies and budgets on, decision log, event
processor; no timer poller or ingest consumer; ``--models-dir``) on each backend of
``harness.redis_backends``: an embedded node (append-only, everysec) and ``LocalCluster`` (3 masters + 3
replicas, append-only), each seeded with ``--customers`` demo customers (``engine.sim.demo.seed``).
Phases, ``--ops`` operations each, customers uniform over the seeded ones:

- ``decide call_center`` (presenting at once: the contact counters and budgets are written) and
  ``decide web`` (presented when the impression is reported), 3 actions, no interaction id;
- ``respond impression``: RecordResponse ``impression`` for the top action of each web decision;
- ``respond accepted/rejected``: 30% accepted, 70% rejected, top action of a call-center decision;
- ``budget claim (one counter)``: the cluster's ``CLAIM`` script on one budget counter key, the
  cost that bounds how often one budgeted action can be presented (its counter is one slot);
- ``publish event``: PublishEvent, a mix of the demo's event types (some raise triggers).

Per phase and operation: Redis commands (by name, with Redis's own usec per call), Redis CPU
microseconds (``used_cpu_sys + used_cpu_user`` deltas of every node, minus each node's idle rate
measured for 3 s before the phases), bytes sent to Redis (``total_net_input_bytes``), bytes appended to
the AOF and, on the cluster, to the replication stream (``master_repl_offset``), for the masters and the
replicas apart; and the service process's CPU per operation (``time.process_time``: every thread of
this process, the decision-log writer included). Each phase is bounded by ``--max-seconds``.

Then a 31-day simulation on a fixed set of ``--sim-customers`` fresh demo customers with a clock that
moves a day at a time, ``--sim-per-day`` decisions per customer per day (the ``--bytes-per-decision`` mix: channels,
impressions reported on web and app, 5% responses) and ``--sim-events-per-day`` events, and ``MEMORY
USAGE`` of every key of those customers at the end (profile, triggers, contact history, event history
and ids, interaction hashes), of the decision records and of the stream entries (bytes per entry). The
memory per customer for the capacity model is their sum plus the decision records a customer keeps
(``decisions/customer/day x retention days x bytes per record``), printed for a few rates, and the keys
per customer (each about 120 B outside ``MEMORY USAGE``). What the scripts trim by the simulated clock
(contact and event histories, record minutes) is in its steady state; what Redis expires by its own clock
(outbound state keys, their index members) is not: all 31 days of them are still there, an upper bound.

    python loadtest/op_costs.py --models-dir /tmp/nba-models --json /tmp/op_costs.json

Two more storage measurements are modes of this tool (their code in ``loadtest/capacity/``):
``--bytes-per-decision``, the Redis bytes and keys each decision adds per key family and what the response
retention (``--accept-days``) costs in steady state at ``--rate``; ``--import-rate``, how fast ``nba import
customers`` loads ``--customers`` profiles from CSV and Parquet against a plain redis-py pipeline and the
importer's own pre-packed commands:

    python loadtest/op_costs.py --bytes-per-decision --models-dir /tmp/nba-models --decisions 30000 --accept-days 7
    python loadtest/op_costs.py --import-rate --customers 50000 --turns 5 --json /tmp/bench_import.json
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from harness import args as common  # noqa: E402
from harness import redis_backends as rb  # noqa: E402
from harness.results import stamp, write_json  # noqa: E402

EVENT_MIX = (("data_usage", lambda r: {"used_ratio": f"{r.uniform(0.5, 1.0):.2f}"}),
             ("payment_failed", lambda r: {"amount": f"{r.uniform(5, 80):.2f}"}),
             ("payment_received", lambda r: {"amount": f"{r.uniform(5, 80):.2f}"}),
             ("contact_request", lambda r: {"topic": r.choice(["billing", "technical", "sales"])}),
             ("call_completed", lambda r: {}),
             ("complaint_opened", lambda r: {"severity": r.choice(["low", "medium", "high"])}))
SIM_CHANNELS = {"call_center": 0.25, "web": 0.35, "mobile_app": 0.25, "branch": 0.08, "email": 0.07}
TOUCHPOINTS = {"call_center": "call_center.inbound", "web": "web.home.hero", "mobile_app": "app.home.card",
               "branch": "branch.desk", "email": "email.weekly"}
# per-customer key families (the hash tag {c:<id>}: the key's tail after it), in the order they are matched
PER_CUSTOMER = (("profile", "profile$"), ("triggers", "triggers$"), ("contact history", "contacts$"),
                ("event history", "events$"), ("event ids", "event_ids$"), ("event effects", "events:pending$"),
                ("interactions", "ix:"), ("outbound", "outbound:"), ("record minutes", "record_minutes$"),
                ("erasure index", "index$"))
FAMILIES = (*((name, re.compile(r"^nba:\{c:[^}]*\}:" + tail)) for name, tail in PER_CUSTOMER),
            ("other per customer", re.compile(r"^nba:\{c:")),
            ("decision records", re.compile(r"^nba:(\{[^}]*\}:)?decision:")),
            ("decision record buckets", re.compile(r"^nba:decisions:")),
            ("streams", re.compile(r"^nba:stream:")),
            ("budgets", re.compile(r"budget")))


def family(key: str) -> str:
    for name, pattern in FAMILIES:
        if pattern.search(key):
            return name
    return "other"


def customer_of(key: str) -> str | None:
    m = re.match(r"^nba:\{c:([^}]*)\}", key)
    return m.group(1) if m else None


class Clock:
    """Real time, or a fixed offset from it (the simulation moves it a day at a time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def start_app(url: str, models_dir: str, clock: Clock):
    from engine.config import Config
    from engine.serving.app import App

    cfg = Config(redis_url=url, models_dir=Path(models_dir), rules_dir=ROOT / "rules", demo=False,
                 metrics_port=0, events_poll_seconds=0, rules_watch_seconds=0, model_poll_seconds=3600)
    return App(cfg, clock=clock).start()


def phases(app, b: rb.Backend, customers: int, ops: int, max_seconds: float, seed: int) -> dict:
    from engine.decision.request import DecideInput
    from engine.decision.responses import NotFound

    rng = random.Random(seed)
    idle = rb.background(b, 3.0)
    results: dict[str, dict] = {}
    web: list = []
    calls: list = []

    def timed(name: str, one) -> None:
        before, cpu, started = rb.snapshot(b), time.process_time(), time.monotonic()
        done = 0
        for i in range(ops):
            if i % 100 == 0 and time.monotonic() - started > max_seconds:
                break
            done += one(i)
        service_cpu = time.process_time() - cpu
        time.sleep(0.3)  # the decision log's last batch (it lingers 20 ms)
        d = rb.delta(b, before, rb.snapshot(b))
        r = rb.per_op(b, d, max(done, 1), idle)
        r["service_cpu_us"] = service_cpu * 1e6 / max(done, 1)
        r["seconds"] = time.monotonic() - started
        results[name] = r
        print(f"  {name:<26} {done:6d} ops  Redis CPU {r['masters']['cpu_us']:6.1f} us (masters) "
              f"+ {r['replicas'].get('cpu_us', 0.0):5.1f} (replicas)  commands {r['masters']['commands']:5.2f}  "
              f"in {r['masters']['net_in_B']:6.0f} B  AOF {r['masters']['aof_B']:6.0f} B  "
              f"service CPU {r['service_cpu_us']:6.0f} us; busiest master {r['busiest_master_cpu_us']:6.1f} us",
              flush=True)

    def decide(channel: str, keep: list):
        def one(i: int) -> int:
            d = app.engine.decide(DecideInput(f"C{rng.randrange(customers):07d}", channel,
                                              touchpoint=TOUCHPOINTS[channel], max_actions=3))
            if d.actions:
                keep.append((d.decision_id, d.actions[0].action_id))
            return 1
        return one

    timed("decide call_center", decide("call_center", calls))
    timed("decide web", decide("web", web))

    def respond(pool: list, outcome):
        def one(i: int) -> int:
            if i >= len(pool):
                return 0
            decision_id, action_id = pool[i]
            try:
                app.responses.record(decision_id, action_id, outcome())
            except NotFound:
                return 0
            return 1
        return one

    timed("respond impression", respond(web, lambda: "impression"))
    timed("respond accepted/rejected", respond(calls, lambda: "accepted" if rng.random() < 0.3 else "rejected"))

    def publish(i: int) -> int:
        kind, attrs = EVENT_MIX[i % len(EVENT_MIX)]
        app.events.publish(f"op-costs-{seed}-{i}", f"C{rng.randrange(customers):07d}", kind, attrs(rng))
        return 1

    from engine.decision.budget_claims import CLAIM

    claim = app.store.client.register_script(CLAIM)

    def claim_one(i: int) -> int:  # one action's daily budget counter: one key, so one slot and one shard
        claim(keys=["nba:budget:capacity-probe:20260101"], args=[10**9, 172_800])
        return 1

    timed("budget claim (one counter)", claim_one)
    try:
        timed("publish event", publish)
    except Exception as exc:  # the events path on a cluster lands separately: say so, keep the rest
        results["publish event"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"  publish event: {type(exc).__name__}: {exc}", flush=True)
    return results


def simulate(app, clock: Clock, first: int, n: int, per_day: float, events_per_day: float, days: int,
             seed: int) -> dict:
    """``days`` days of traffic on customers ``first``..``first + n - 1``; counts of what was done."""
    from engine.decision.request import DecideInput
    from engine.decision.responses import NotFound

    rng = random.Random(seed)
    channels, weights = list(SIM_CHANNELS), list(SIM_CHANNELS.values())
    on_impression = {"web", "mobile_app"}
    counts = {"decisions": 0, "responses": 0, "events": 0, "event_errors": 0}
    start_offset = clock.offset
    for day in range(days):
        clock.offset = start_offset + day * 86_400 + 1
        for c in range(first, first + n):
            cid = f"C{c:07d}"
            k = int(per_day) + (rng.random() < per_day - int(per_day))
            for _ in range(k):
                channel = rng.choices(channels, weights)[0]
                d = app.engine.decide(DecideInput(cid, channel, touchpoint=TOUCHPOINTS[channel], max_actions=3))
                counts["decisions"] += 1
                try:
                    if channel in on_impression and rng.random() < 0.8:
                        for a in d.actions:
                            app.responses.record(d.decision_id, a.action_id, "impression")
                            counts["responses"] += 1
                    if d.actions and rng.random() < 0.05:
                        app.responses.record(d.decision_id, d.actions[0].action_id,
                                             "accepted" if rng.random() < 0.3 else "rejected")
                        counts["responses"] += 1
                except NotFound:
                    pass
            e = int(events_per_day) + (rng.random() < events_per_day - int(events_per_day))
            for j in range(e):
                kind, attrs = EVENT_MIX[rng.randrange(len(EVENT_MIX))]
                try:
                    app.events.publish(f"sim-{seed}-{day}-{c}-{j}", cid, kind, attrs(rng))
                    counts["events"] += 1
                except Exception:  # noqa: BLE001 - the events path on a cluster may not be there yet
                    counts["event_errors"] += 1
        clock.offset = start_offset + day * 86_400 + 43_200
    clock.offset = start_offset + days * 86_400
    return counts


def memory(b: rb.Backend, sim_customers: set[str]) -> dict:
    """MEMORY USAGE (SAMPLES 0) of every key on the masters: per family for the simulated customers,
    decision records (bytes per record) and streams (bytes per entry)."""
    per_customer: dict[str, dict[str, int]] = {}
    key_counts: dict[str, int] = {}  # keys per simulated customer (each costs ~120 B outside MEMORY USAGE)
    records: list[int] = []
    buckets = {"bytes": 0, "keys": 0, "records": 0}
    sample: list[bytes] = []  # record values, to measure buckets as full as production makes them
    bench: tuple = (None, "")
    streams: dict[str, dict[str, int]] = {}
    for node in b.masters:
        c = node.client
        keys = [k.decode() for k in c.scan_iter(count=2000)]
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            pipe = c.pipeline(transaction=False)
            for k in chunk:
                pipe.memory_usage(k, samples=0)
                pipe.type(k)
            replies = pipe.execute()
            for j, k in enumerate(chunk):
                usage, kind = replies[2 * j], replies[2 * j + 1]
                if usage is None:
                    continue
                fam = family(k)
                cust = customer_of(k)
                if cust in sim_customers:
                    per_customer.setdefault(cust, {})
                    per_customer[cust][fam] = per_customer[cust].get(fam, 0) + int(usage)
                    key_counts[cust] = key_counts.get(cust, 0) + 1
                elif fam == "decision records":
                    records.append(int(usage))
                elif fam == "decision record buckets":
                    buckets["bytes"] += int(usage)
                    buckets["keys"] += 1
                    buckets["records"] += int(c.hlen(k))
                    if len(sample) < 2000:
                        sample += list(c.hvals(k))
                        bench = (c, "nba:bench:" + k[k.index("{"):k.index("}") + 1])  # a key on this node's slots
                elif fam == "streams" and kind in (b"stream", "stream"):
                    s = streams.setdefault(re.sub(r":\{shard:[^}]*\}$", "", k), {"bytes": 0, "entries": 0, "keys": 0})
                    s["bytes"] += int(usage)
                    s["entries"] += int(c.xlen(k))
                    s["keys"] += 1
    fams = sorted({f for d in per_customer.values() for f in d})
    table = {}
    for f in fams:
        values = np.array([d.get(f, 0) for d in per_customer.values()], dtype=float)
        table[f] = {"mean": float(values.mean()), "p50": float(np.median(values)), "p99": float(np.percentile(values, 99)),
                    "max": float(values.max())}
    totals = np.array([sum(d.values()) for d in per_customer.values()], dtype=float)
    table["all per-customer keys"] = {"mean": float(totals.mean()), "p50": float(np.median(totals)),
                                      "p99": float(np.percentile(totals, 99)), "max": float(totals.max())}
    info = [n.client.info("memory") for n in b.masters]
    dense = {}
    if sample:  # a bucket holds ~18 records at 5,000 decisions/s over 16,384 slots, ~73 at 20,000/s
        c, key = bench
        for n in (18, 73):
            c.delete(key)
            c.hset(key, mapping={f"{i:04x}{i:016x}": sample[i % len(sample)] for i in range(n)})
            dense[n] = {"bytes_per_record": int(c.memory_usage(key, samples=0)) / n,
                        "encoding": c.object("encoding", key).decode()}
            c.delete(key)
    return {"per_customer": table, "customers": len(per_customer),
            "keys_per_customer": float(np.mean(list(key_counts.values()))) if key_counts else 0.0,
            "decision_record_bytes": float(np.mean(records)) if records else
            (buckets["bytes"] / buckets["records"] if buckets["records"] else 0.0),
            "decision_records": len(records) or buckets["records"], "record_buckets": buckets,
            "dense_buckets": dense,
            "streams": {k: dict(v, bytes_per_entry=v["bytes"] / v["entries"] if v["entries"] else 0.0)
                        for k, v in sorted(streams.items())},
            "used_memory": sum(int(i["used_memory"]) for i in info)}


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    common.add_modes(ap, {
        "--bytes-per-decision": "Redis bytes and keys per decision by key family, per --accept-days "
                                "(loadtest/capacity/decision_bytes.py)",
        "--import-rate": "nba import customers (CSV, Parquet) against a redis-py pipeline "
                         "(loadtest/capacity/import_rate.py)"})
    ap.add_argument("--backends", nargs="+", default=["node", "cluster"], choices=["node", "cluster"])
    ap.add_argument("--customers", type=int,
                    help="demo customers (default 20,000; --import-rate: customers imported, default 200,000)")
    ap.add_argument("--ops", type=int, default=3000, help="operations per phase")
    ap.add_argument("--max-seconds", type=float,
                    help="bound on each phase (default 60); --bytes-per-decision: on each run's decision loop, "
                         "--import-rate: no new turn after this long (default 600)")
    ap.add_argument("--sim-customers", type=int, default=300)
    ap.add_argument("--sim-per-day", type=float, default=2.0, help="decisions per customer per simulated day")
    ap.add_argument("--sim-events-per-day", type=float, default=1.0)
    ap.add_argument("--sim-days", type=int, default=31)
    common.add_models_dir(ap, "/tmp/nba-models" if Path("/tmp/nba-models/propensity/CHAMPION").is_file()
                          else ROOT / "models")
    ap.add_argument("--seed", type=int, help="default 15; --import-rate: 7")
    common.add_json(ap)
    ap.add_argument("--decisions", type=int, default=100_000, help="--bytes-per-decision: decisions per run")
    ap.add_argument("--accept-days", type=float, nargs="+", default=[7, 30],
                    help="--bytes-per-decision: one run per value of contact.yaml's responses accept_days")
    common.add_load(ap, rate=300, rate_help="--bytes-per-decision: decisions/s for the steady state")
    ap.add_argument("--extrapolate-to", type=int, default=1_000_000, help="--bytes-per-decision: decisions")
    ap.add_argument("--turns", type=int, default=3, help="--import-rate: runs of each method (alternating order)")
    ap.add_argument("--batch", type=int, default=2_000, help="--import-rate: customers per pipeline")
    args = ap.parse_args(argv)
    if args.bytes_per_decision:
        from capacity import decision_bytes

        args.customers = args.customers or 20_000
        return decision_bytes.run(args)
    if args.import_rate:
        from capacity import import_rate

        args.seed = 7 if args.seed is None else args.seed
        return import_rate.run(args)
    args.customers = args.customers or 20_000
    args.max_seconds = args.max_seconds or 60.0
    args.seed = 15 if args.seed is None else args.seed

    from engine.sim import demo
    from engine.store.profiles import ProfileStore

    out: dict = {"args": vars(args), "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends:
            with rb.backend(name, tmp) as b:
                print(f"--- {name} ({stamp()})", flush=True)
                store = ProfileStore.from_url(b.url)
                demo.seed(store, args.customers + args.sim_customers)
                clock = Clock()
                app = start_app(b.url, args.models_dir, clock)
                try:
                    res = {"phases": phases(app, b, args.customers, args.ops, args.max_seconds, args.seed)}
                    started = time.monotonic()
                    res["simulation"] = simulate(app, clock, args.customers, args.sim_customers, args.sim_per_day,
                                                 args.sim_events_per_day, args.sim_days, args.seed)
                    res["simulation"]["seconds"] = time.monotonic() - started
                    time.sleep(0.3)
                    sim = {f"C{c:07d}" for c in range(args.customers, args.customers + args.sim_customers)}
                    res["memory"] = memory(b, sim)
                finally:
                    app.close()
                out["backends"][name] = res
                report_memory(name, res, args)
    write_json(args.json, out)
    return 0


def report_memory(name: str, res: dict, args: argparse.Namespace) -> None:
    m = res["memory"]
    print(f"  simulation: {res['simulation']} ({args.sim_customers} customers x {args.sim_days} days, "
          f"{args.sim_per_day:g} decisions and {args.sim_events_per_day:g} events per customer per day)")
    for f, v in m["per_customer"].items():
        print(f"  {f:<22} mean {v['mean']:8.0f} B  p50 {v['p50']:8.0f}  p99 {v['p99']:8.0f}  max {v['max']:8.0f}")
    print(f"  keys per customer: {m['keys_per_customer']:.1f} (each ~120 B outside MEMORY USAGE)")
    print(f"  decision record {m['decision_record_bytes']:.0f} B ({m['decision_records']} records)")
    if m.get("record_buckets", {}).get("keys"):
        bk = m["record_buckets"]
        print(f"  record buckets: {bk['keys']} keys, {bk['records']} records, {bk['bytes']} B (MEMORY USAGE; "
              f"+ ~120 B per key outside it)")
    for n, v in m.get("dense_buckets", {}).items():
        print(f"  a bucket of {n} of these records: {v['bytes_per_record']:.1f} B per record + 120 / {n} = "
              f"{v['bytes_per_record'] + 120 / n:.1f} B with the key's overhead ({v['encoding']})")
    for k, v in m["streams"].items():
        print(f"  {k}: {v['bytes_per_entry']:.0f} B per entry ({v['entries']} entries in {v['keys']} keys)")
    base = m["per_customer"]["all per-customer keys"]["mean"]
    for per_day in (1, 5, 34.56):
        for days in (7, 30):
            total = base + per_day * days * m["decision_record_bytes"]
            print(f"  {name}: {per_day:g} decisions/customer/day, records kept {days} d: {total / 1024:8.1f} KiB "
                  f"per customer")


if __name__ == "__main__":
    raise SystemExit(main())
