"""Does a decision cost more as customers are seen more often? Decide latency and the presenting
script's Redis time, first decisions against last, in one run.

In-process (no gRPC: what grows is the engine's and Redis's work, not the transport), on an embedded
Redis with ``--customers`` demo customers, contact policies, budgets and the decision log on, the real
clock. ``--decisions`` Decides are sent open loop at ``--rate`` per second from one thread, with the load
generator's mix (``loadtest/loadgen.py``): 5% unknown customers, 30% on 500 hot customers (all of them
when ``--customers`` is 500 or fewer), the rest uniform over all; its channel mix, touchpoints and
intents; 3 actions. Latency counts from each request's intended send time (a late decision delays the
next ones, as a queue would); the service time of ``decide`` itself is reported too.

The run is cut into windows of ``--window`` decisions. Per window: Decide p50 / p99 / p99.9 and the
Redis time per ``EVALSHA`` call from ``INFO commandstats`` deltas (only the presenting script is called
by EVALSHA on this path; no ``SLOWLOG``). The done-when compares the last window with the first: p99 and
script time within 10%.

The host's own speed moves by +-30% from minute to minute here (other work on the 2 cores), so before
every window the clock stops for a calibration that does the same work each time: ``--calibration``
previews (``preview``: the presenting script runs, writes nothing) for one reference customer whose
history was filled once and then stays as it is. Its script time per call and its Decide service time
say how fast Redis and Python were around that window; the "calibrated" ratios divide each window's
figures by its calibration's, relative to the first window's. ``--fill`` decisions of the same mix run
before the first window and are not counted: without them the first window also measures histories
filling from empty (a one-off step, not growth with use). Per window it also prints the history fields
of a sample of the customers it decided for, Redis's Lua heap and its number of keys.

With the real clock a run's contacts all fall on one day, so the histories fill for the whole run and
never reach the steady state of a service that has run for longer than its longest window. ``--days D``
moves the decision clock evenly over D simulated days (from 2030-01-02) through the fill and the
measured decisions: with a fill spanning more than the longest window (30 days in the demo rules), every
measured window sees histories in their steady state (old days dropped as new ones are counted).
``--sections`` times the presenting script's sections inside Redis (``TIME`` marks in a copy of it).

    python loadtest/history_cost.py --models-dir /tmp/nba-models --json /tmp/history_cost.json
    python loadtest/history_cost.py --models-dir /tmp/nba-models --fill 200000 --days 60 --json /tmp/hc-days.json

``--by-size`` instead times the presenting script against the size of one customer's contact history:
customers with 1, 10, 100, 1,000 and 10,000 impressions in their history (written by the presenting script
itself, deciding under a limit that counts every impression and stops none, on a clock 1 to 29 days
back), either all on one day or spread over 29 days, over 10 demo actions (without a daily budget) on 3
channels. Then it judges 10 candidates against ``rules/contact.yaml`` (a preview: it reads and counts,
writes nothing) for each customer in turn, in blocks of ``--calls`` calls, the order of the customers
reversed every round (``--rounds``); the time per call is the ``INFO commandstats`` EVALSHA delta of the
block, and its ratio to the customer of the same spread with a single impression (round by round, the
median). ``--against FILE`` also times another version of the
presenting script (the Lua text in FILE, e.g. an earlier commit's ``PRESENT``) on the same histories: every
block runs once with each script, their order alternating, and the table gets its time and the ratio.

    python loadtest/history_cost.py --by-size --json /tmp/history_probe.json
    PYTHONPATH=<old checkout> python -c "from engine.decision.contact import PRESENT; print(PRESENT)" > /tmp/present-old.lua
    python loadtest/history_cost.py --by-size --against /tmp/present-old.lua
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import loadgen  # noqa: E402
from harness import args as common  # noqa: E402
from harness.results import summary, write_json  # noqa: E402

from engine.sim.telco import SCHEMA  # noqa: E402
from engine.store.redis_embedded import EmbeddedRedis  # noqa: E402

HOT = 500


def requests(n: int, customers: int, seed: int) -> list:
    """The load generator's customer, channel, touchpoint and intent mix as ``DecideInput``s."""
    from engine.decision.request import DecideInput

    rng = random.Random(seed)
    names = [name for name, _ in loadgen.CHANNEL_MIX]
    weights = [share for _, share in loadgen.CHANNEL_MIX]
    out = []
    for i in range(n):
        r = rng.random()
        cid = (f"LOAD-NEW-{seed}-{i}" if r < 0.05 else
               f"C{rng.randrange(min(HOT, customers) if r < 0.35 else customers):07d}")
        name = rng.choices(names, weights)[0]
        intent = rng.choice(loadgen.INTENTS)
        channel = "pos" if name == "CHANNEL_POINT_OF_SALE" else name.removeprefix("CHANNEL_").lower()
        out.append(DecideInput(cid, channel, touchpoint=loadgen.TOUCHPOINTS[name],
                               context={"intent": intent} if intent else {}, max_actions=3))
    return out


def evalsha(client) -> tuple[int, int, float, int, int]:
    """(calls, usec) of EVALSHA so far, Redis's CPU seconds (all commands; unlike ``usec``, not
    inflated when other processes take the CPU from Redis), its Lua heap bytes and its number of keys."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    cpu = client.info("cpu")
    return (int(stats.get("calls", 0)), int(stats.get("usec", 0)),
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), int(client.info("memory")["used_memory_lua"]),
            int(client.dbsize()))


REFERENCE = "REF-0000001"


def calibrate(engine, admin, req, n: int) -> dict:
    """``n`` previews of ``req`` (the reference customer): script us per call and service p50/p99 ms."""
    before = evalsha(admin)
    took = np.empty(n)
    for k in range(n):
        t = time.perf_counter()
        engine.decide(req)
        took[k] = time.perf_counter() - t
    after = evalsha(admin)
    return {"script_us_per_call": round((after[1] - before[1]) / max(after[0] - before[0], 1), 1),
            "service_p50_ms": round(float(np.percentile(took, 50)) * 1000, 3),
            "service_p99_ms": round(float(np.percentile(took, 99)) * 1000, 3)}


START_2030 = 1_893_499_200.0  # 2030-01-02 12:00 UTC
PROFILE_KEY = "nba:bench:present-sections"


def timed_sections(script: str) -> str:
    """``PRESENT`` with ``TIME`` marks at its section boundaries, each section's microseconds added to
    ``PROFILE_KEY`` (the marks' own commands are left out of the sections; ``TIME`` reads the real clock
    inside a script)."""
    marks = [("local a = cjson.decode(ARGV[1])\n", "decode arguments"),
             ("local function mark(head)", "read and count the history"),
             ("if #need > 0 then return {'need', need} end", "judge and present candidates"),
             ("local bodies = {}\n", "write the history"),
             ("return {verdicts, fb, sets, picks}\n", "write the decision record")]
    head = ("local function bench_now() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end\n"
            "local bench_last = bench_now()\n"
            "local function bench_mark(name)\n"
            f"  redis.call('HINCRBY', '{PROFILE_KEY}', name, bench_now() - bench_last); bench_last = bench_now()\n"
            "end\n")
    at = script.index(marks[0][0])
    out = script[:at] + head + script[at:]
    for i, (marker, name) in enumerate(marks):
        assert out.count(marker) == 1, marker
        call = f"bench_mark('{i + 1} {name}')\n"
        if marker.startswith("return"):
            call += f"redis.call('HINCRBY', '{PROFILE_KEY}', 'calls', 1)\n"
        out = out.replace(marker, marker + call if i == 0 else call + marker)
    return out


def sections(client) -> dict[str, float]:
    """Microseconds per presenting call in each section since the last read (``--sections``)."""
    raw = {k.decode(): int(v) for k, v in client.hgetall(PROFILE_KEY).items()}
    client.delete(PROFILE_KEY)
    calls = raw.pop("calls", 0)
    return {k: round(v / calls, 1) for k, v in sorted(raw.items())} if calls else {}


def run(decisions: int, rate: float, window: int, customers: int, models_dir: str, seed: int, fill: int = 0,
        calibration: int = 300, ballast: int = 0, days: float = 0.0, profile: bool = False) -> dict:
    import redis

    from engine.decision import funnel
    from engine.decision.funnel import DecisionEngine
    from engine.decision.history import contacts_key
    from engine.decision.request import DecideInput
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.sim import demo
    from engine.store.decision_log import DecisionLog
    from engine.store.profiles import ProfileStore

    if profile:
        funnel.PRESENT = timed_sections(funnel.PRESENT)
    reqs = requests(fill + decisions, customers, seed)
    filling, reqs = reqs[:fill], reqs[fill:]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as server:
        store = ProfileStore.from_url(server.url)
        demo.seed(store, customers)
        rules = Live(load_and_compile(ROOT / "rules"), retire=lambda r: r.close())
        step = days * 86_400 / (fill + decisions)  # 0 without --days: ``now`` is then not the clock
        now = [START_2030]
        clock = (lambda: now[0]) if days else time.time
        engine = DecisionEngine(store, rules, Live(ModelRegistry(models_dir, SCHEMA).load()), DecisionLog(store.client),
                                clock=clock)
        engine.warmup()
        for i in range(2000):  # JIT, pools, allocator: on customers of their own
            engine.decide(DecideInput(f"WARM-{i}", reqs[i % len(reqs)].channel, touchpoint=reqs[i % len(reqs)].touchpoint,
                                       max_actions=3))
        for req in filling:
            engine.decide(req)
            now[0] += step
        if ballast:  # keys like decision records, to tell the dataset's size from the customers' histories
            pipe = store.client.pipeline(transaction=False)
            for k in range(ballast):
                pipe.hset(f"nba:ballast:{k}", mapping={"actions": "a,b,c", "customer": f"C{k:07d}", "pad": "x" * 400})
                if k % 1000 == 999:
                    pipe.execute()
            pipe.execute()
        reference = DecideInput(REFERENCE, "call_center", max_actions=3)
        for _ in range(30):  # its history: filled once, then only previewed
            engine.decide(reference)
        reference = DecideInput(REFERENCE, "call_center", max_actions=3, preview=True)
        # INFO, DBSIZE, MEMORY USAGE and HLEN are beyond the service user's ACL: Redis's admin user reads them
        admin = redis.Redis.from_url(server.admin_url)
        latency = np.empty(decisions)
        service = np.empty(decisions)
        calibrations = [calibrate(engine, admin, reference, calibration)]
        marks = [evalsha(admin)]
        fields: list[float] = []  # per window: history fields of (a sample of) the customers it decided for
        script_sections: list[dict[str, float]] = []  # per window, with --sections
        if profile:
            sections(admin)
        elapsed = 0.0
        start = time.perf_counter() + 0.2
        for i, req in enumerate(reqs):
            intended = start + (i % window) / rate
            delay = intended - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t = time.perf_counter()
            engine.decide(req)
            done = time.perf_counter()
            now[0] += step
            latency[i], service[i] = done - intended, done - t
            if (i + 1) % window == 0:
                marks.append(evalsha(admin))
                w = len(marks) - 2
                sample = [r.customer_id for r in reqs[i + 1 - window: i + 1: 50]]
                fields.append(float(np.mean([admin.hlen(contacts_key(c)) for c in sample])))
                script_sections.append(sections(admin) if profile else {})
                calls, usec = marks[-1][0] - marks[-2][0], marks[-1][1] - marks[-2][1]
                lat = latency[i + 1 - window: i + 1] * 1000
                cpu = (marks[-1][2] - marks[-2][2]) / window * 1e6
                print(f"window {w + 1:2d} (decisions {i + 2 - window:>7,}-{i + 1:>7,}): Decide p50 "
                      f"{np.percentile(lat, 50):.3f} p99 {np.percentile(lat, 99):.3f} ms (service p99 "
                      f"{np.percentile(service[i + 1 - window: i + 1] * 1000, 99):.3f}), script "
                      f"{usec / max(calls, 1):.1f} us/call ({calls} calls), Redis CPU {cpu:.1f} us/decision, Lua heap "
                      f"{marks[-1][3] / 1e6:.1f} MB, {marks[-1][4]:,} keys, history fields of its customers "
                      f"{fields[-1]:.1f}; "
                      f"calibration before it: {calibrations[-1]}"
                      + (f"; script sections, us per call: {script_sections[-1]}" if profile else ""), flush=True)
                if i + 1 < decisions:  # the clock stops for the next window's calibration
                    elapsed += time.perf_counter() - start
                    calibrations.append(calibrate(engine, admin, reference, calibration))
                    marks[-1] = evalsha(admin)
                    if profile:
                        sections(admin)  # the calibration's previews are not the window's
                    start = time.perf_counter() + 0.05
        elapsed += time.perf_counter() - start
        hot = [f"C{i:07d}" for i in range(min(HOT, customers))]
        sizes = [int(admin.memory_usage(f"nba:{{c:{c}}}:contacts", samples=0) or 0) for c in hot]
        admin.close()
        rules.current.close()
    windows = []
    for w in range(len(marks) - 1):
        sl = slice(w * window, (w + 1) * window)
        calls, usec = marks[w + 1][0] - marks[w][0], marks[w + 1][1] - marks[w][1]
        windows.append({"decisions": [w * window + 1, (w + 1) * window],
                        "latency": summary(latency[sl] * 1000), "service": summary(service[sl] * 1000),
                        "script_us_per_call": round(usec / max(calls, 1), 1), "script_calls": calls,
                        "redis_cpu_us_per_decision": round((marks[w + 1][2] - marks[w][2]) / window * 1e6, 1),
                        "calibration": calibrations[w], "lua_heap_bytes": marks[w + 1][3], "keys": marks[w + 1][4],
                        "history_fields_of_its_customers": round(fields[w], 2),
                        **({"script_sections_us": script_sections[w]} if profile else {})})
    first, last = windows[0], windows[-1]
    c0, cn = first["calibration"], last["calibration"]
    return {
        "decisions": decisions, "rate": rate, "achieved_rate": round(decisions / elapsed, 1), "window": window,
        "customers": customers, "hot_customers": min(HOT, customers), "hot_share": 0.3, "windows": windows,
        "last_over_first": {
            "latency_p99": round(last["latency"]["p99_ms"] / first["latency"]["p99_ms"], 3),
            "service_p99": round(last["service"]["p99_ms"] / first["service"]["p99_ms"], 3),
            "script_us_per_call": round(last["script_us_per_call"] / first["script_us_per_call"], 3),
            "redis_cpu": round(last["redis_cpu_us_per_decision"] / first["redis_cpu_us_per_decision"], 3)},
        "last_over_first_calibrated": {  # divided by how fast the host ran the same reference work then
            "service_p99": round(last["service"]["p99_ms"] / first["service"]["p99_ms"]
                                 / (cn["service_p99_ms"] / c0["service_p99_ms"]), 3),
            "script_us_per_call": round(last["script_us_per_call"] / first["script_us_per_call"]
                                        / (cn["script_us_per_call"] / c0["script_us_per_call"]), 3)},
        "fill": fill, "calibration_calls": calibration, "ballast": ballast, "days": days,
        "hot_contact_key_bytes": {"mean": round(float(np.mean(sizes)), 1), "max": int(max(sizes))},
    }


SIZES = (1, 10, 100, 1_000, 10_000)
PROBE_NOW = datetime(2030, 6, 15, 12, tzinfo=UTC).timestamp()
PROBE_CHANNELS = ("call_center", "branch", "email")


class _Verdict:
    def __init__(self, action: object) -> None:
        self.action = action


def by_size(rounds: int, calls: int, against: str | None = None) -> dict:
    """``--by-size``: the presenting script's time per preview call for customers with 1 to 10,000
    impressions in their history (all on one day, or over 29 days); with ``against``, that script too."""
    import redis

    from engine.decision.codes import Codes
    from engine.decision.contact import PRESENT, present_args
    from engine.rules.contact import ContactLimit, ContactRules
    from engine.rules.runtime import load_and_compile

    def record(cid: str, channel: str, at: float) -> dict[str, str]:
        return {"customer": cid, "channel": channel, "ts": f"{at:.3f}", "counted": "1"}

    rules = load_and_compile(ROOT / "rules")
    contact = rules.ruleset.contact
    actions = [a for a in rules.ruleset.actions if "call_center" in a.channels and a.daily_budget is None][:10]
    # writing: a limit that counts every impression (the history keeps only what a limit counts) and stops
    # none, over the 30 days the demo rules keep
    keep = ContactRules((ContactLimit("keep_30_days", 10**9, 30),))
    candidates = [(1.0 - i / 100, 0.5, _Verdict(a)) for i, a in enumerate(actions)]
    customers = {f"{spread}-{n}": (spread, n) for spread in ("1 day", "29 days") for n in SIZES}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as server:
        client = redis.Redis.from_url(server.url)  # the service user runs the scripts, as the service does
        admin = redis.Redis.from_url(server.admin_url)  # INFO and MEMORY USAGE are beyond its ACL
        codes = Codes(client)
        scripts = {"this": client.register_script(PRESENT)}
        if against:
            scripts["against"] = client.register_script(against)
        k = 0
        for cid, (spread, n) in customers.items():
            for i in range(n):
                k += 1
                at = PROBE_NOW - 3600 - (i % 29) * 86_400 * (spread != "1 day") - (i % 97)
                a = actions[i % len(actions)]
                channel = PROBE_CHANNELS[i % 3]
                keys, argv, _ = present_args(keep, [(1.0, 0.5, _Verdict(a))], None, 1, channel,
                                             f"{int(at * 1000):012x}{k:020x}", at, record(cid, channel, at), cid,
                                             "decide", codes=codes)
                scripts["this"](keys=keys, args=[argv])
        times: dict[str, dict[str, list[float]]] = {cid: {name: [] for name in scripts} for cid in customers}
        order = list(customers)
        for r in range(rounds):
            for cid in (order if r % 2 == 0 else order[::-1]):
                for name in (list(scripts) if r % 2 == 0 else list(scripts)[::-1]):
                    before = evalsha(admin)
                    for j in range(calls):
                        channel = PROBE_CHANNELS[j % 3]
                        keys, argv, _ = present_args(contact, candidates, None, 3, channel, f"p{r}{j}", PROBE_NOW,
                                                     record(cid, channel, PROBE_NOW), cid, "dry", codes=codes)
                        scripts[name](keys=keys, args=[argv])
                    after = evalsha(admin)
                    times[cid][name].append((after[1] - before[1]) / (after[0] - before[0]))
        sizes = {cid: int(admin.memory_usage(f"nba:{{c:{cid}}}:contacts", samples=0) or 0) for cid in customers}
        if empty := [cid for cid, size in sizes.items() if not size]:
            raise SystemExit(f"--by-size: the presenting script kept no contact history for {empty}: nothing was timed")
        client.close()
        admin.close()
    rules.close()
    out = {}
    for cid, t in times.items():
        row = out[cid] = {"spread": customers[cid][0], "impressions": customers[cid][1], "key_bytes": sizes[cid]}
        for name, prefix in (("this", ""), ("against", "against_")):
            if name in t:
                row[f"{prefix}us_per_call"] = round(float(np.median(t[name])), 1)
                row[f"{prefix}us_per_call_rounds"] = [round(x, 1) for x in t[name]]
        # the baseline in the same run: the customer of the same spread with a single impression
        row["over_one_impression"] = round(float(np.median(np.divide(t["this"], times[f"{row['spread']}-1"]["this"]))), 2)
        if against:
            row["this_over_against"] = round(float(np.median(np.divide(t["this"], t["against"]))), 3)
    return out


def print_by_size(table: dict, against: bool) -> None:
    print(f"{'history':>8} {'impressions':>12} {'us/call (median of rounds)':>27} {'x 1 impression':>15} {'key bytes':>10}"
          + (f" {'--against us/call':>18} {'ratio (median of rounds)':>25}" if against else ""))
    for row in table.values():
        print(f"{row['spread']:>8} {row['impressions']:>12,} {row['us_per_call']:>27.1f} {row['over_one_impression']:>15.2f} "
              f"{row['key_bytes']:>10,}"
              + (f" {row['against_us_per_call']:>18.1f} {row['this_over_against']:>25.3f}" if against else ""))


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    common.add_modes(ap, {"--by-size": "the presenting script's time against one customer's history size"})
    ap.add_argument("--decisions", type=int, default=200_000)
    common.add_load(ap, rate=300.0, rate_help="Decides per second, open loop")
    ap.add_argument("--window", type=int, default=20_000)
    common.add_customers(ap)
    common.add_models_dir(ap, ROOT / "models")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--fill", type=int, default=0, help="decisions of the same mix before the first window")
    ap.add_argument("--calibration", type=int, default=300, help="reference previews before every window")
    ap.add_argument("--ballast", type=int, default=0, help="hashes of ~500 B written before the first window")
    ap.add_argument("--days", type=float, default=0.0,
                    help="a decision clock from 2030-01-02 12:00 UTC moving evenly over this many days through "
                         "--fill and --decisions (default: the real clock, every contact on today)")
    ap.add_argument("--sections", action="store_true",
                    help="time the presenting script's sections inside Redis (TIME marks; they add their own cost)")
    common.add_rounds(ap, 6, "--by-size: rounds, the customers' and the scripts' order alternating")
    ap.add_argument("--calls", type=int, default=300, help="--by-size: script calls per customer and round (default 300)")
    ap.add_argument("--against", metavar="FILE", help="--by-size: another presenting script (Lua) to time alongside")
    common.add_json(ap)
    args = ap.parse_args(argv)
    if args.by_size:
        table = by_size(args.rounds, args.calls, Path(args.against).read_text() if args.against else None)
        print_by_size(table, bool(args.against))
        write_json(args.json, table)
        return 0
    out = run(args.decisions, args.rate, args.window, args.customers, args.models_dir, args.seed, args.fill,
              args.calibration, args.ballast, args.days, args.sections)
    first, last = out["windows"][0], out["windows"][-1]
    print(f"\n{'window':>16} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'service p99':>12} {'script us':>10} "
          f"{'Redis CPU us':>13}")
    for name, w in (("first", first), ("last", last)):
        print(f"{name} {w['decisions'][0]:>7,}-{w['decisions'][1]:<7,} {w['latency']['p50_ms']:8.3f} "
              f"{w['latency']['p99_ms']:8.3f} {w['latency']['p999_ms']:9.3f} {w['service']['p99_ms']:12.3f} "
              f"{w['script_us_per_call']:10.1f} {w['redis_cpu_us_per_decision']:13.1f}")
    r = out["last_over_first"]
    print(f"last / first: Decide p99 {r['latency_p99']:.3f} (service {r['service_p99']:.3f}), script time per call "
          f"{r['script_us_per_call']:.3f} (target: both within 10%), Redis CPU per decision {r['redis_cpu']:.3f}; "
          f"achieved {out['achieved_rate']}/s; hot customers' contact key {out['hot_contact_key_bytes']['mean']:.0f} B mean, "
          f"{out['hot_contact_key_bytes']['max']} B max")
    c = out["last_over_first_calibrated"]
    print(f"calibrated by the reference work: service p99 {c['service_p99']:.3f}, script time per call "
          f"{c['script_us_per_call']:.3f}")
    write_json(args.json, out)
    return 0 if abs(r["latency_p99"] - 1) <= 0.1 and abs(r["script_us_per_call"] - 1) <= 0.1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
