"""Redis bytes and keys per decision and per customer, and what the response retention costs
(``op_costs.py --bytes-per-decision``).

For each ``--accept-days`` value (default 7, the demo's ``responses: accept_days``, and 30, the retention
that was fixed before it was configurable) the script copies ``rules/`` to a temp directory with that
value in ``contact.yaml``, starts an embedded Redis (no persistence) on a free loopback port, seeds
``--customers`` demo customers and takes ``INFO memory`` ``used_memory``, ``DBSIZE`` and, for every key
family, the sum of ``MEMORY USAGE key SAMPLES 0`` over a ``SCAN``. Then it runs ``--decisions``
in-process decisions (contact policies, budgets, the decision log: as served; bounded by
``--max-seconds``) on a fixed clock at 12:00 UTC (email is outside quiet hours), waits for the decision
log to flush and measures again. The mix:

- customers drawn uniformly from the seeded ones; channels call_center 25%, web 35%, mobile_app 25%,
  branch 8%, email 7%; 3 actions per decision;
- 30% of decisions carry a fresh interaction id (stores the decision in ``nba:{c:<id>}:ix:<id>``);
- web and mobile_app (``on_impression``) report an impression for every presented action on 80% of their
  decisions (``engine.responses.record(..., "impression")``); 5% of decisions get a response to the top
  action (30% of those accepted, 70% rejected).

Per decision it reports the bytes each key family grew by, keys per decision and per customer, the
Redis encodings, a linear extrapolation to 1,000,000 decisions, and the steady state at a given rate
(``--rate``) as a formula of how long each family keeps what a decision wrote.

    python loadtest/op_costs.py --bytes-per-decision --models-dir /tmp/nba-models --decisions 100000 --json /tmp/storage.json
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from harness.results import write_json
from harness.servers import ROOT

from engine.sim.telco import SCHEMA
from engine.store.redis_embedded import EmbeddedRedis

NOON_UTC = 1_781_524_800.0  # 2026-06-15 12:00 UTC
CHANNEL_MIX = {"call_center": 0.25, "web": 0.35, "mobile_app": 0.25, "branch": 0.08, "email": 0.07}
TOUCHPOINTS = {"call_center": "agent.desktop", "web": "web.home.hero", "mobile_app": "app.home.banner",
               "branch": "branch.desk", "email": "email.weekly"}
INTERACTION_SHARE = 0.30
IMPRESSION_SHARE = 0.80
RESPONSE_SHARE = 0.05
ACCEPTED_SHARE = 0.30

# key family -> (pattern, how its entries are counted)
FAMILIES = {
    # a field per record in a bucket per slot and minute (engine/decision/records.py), or, in the
    # earlier layout, a key per record (HLEN then counts its fields)
    "decision records": (re.compile(r"^nba:decisions?:"), "HLEN"),
    "record codes": (re.compile(r"^nba:codes$"), "HLEN"),
    "erasure indexes": (re.compile(r"^nba:\{c:[^}]*\}:index$"), "ZCARD"),
    "contact histories": (re.compile(r"^nba:\{c:[^}]*\}:contacts$"), "HLEN"),
    "interaction hashes": (re.compile(r"^nba:\{c:[^}]*\}:ix:"), "HLEN"),
    "budgets": (re.compile(r"^nba:budget:"), None),
    "reservations": (re.compile(r"^nba:reservations$"), "ZCARD"),
    "decision stream": (re.compile(r"^nba:stream:decisions$"), "XLEN"),
    "response stream": (re.compile(r"^nba:stream:responses$"), "XLEN"),
    "profiles": (re.compile(r"^nba:\{c:[^}]*\}:profile$"), "HLEN"),
    "triggers": (re.compile(r"^nba:\{c:[^}]*\}:triggers$"), "HLEN"),
}
OTHER = "other"


def family_of(key: str) -> str:
    for name, (pattern, _) in FAMILIES.items():
        if pattern.search(key):
            return name
    return OTHER


def measure(client) -> dict:
    """used_memory, DBSIZE and, per key family, keys, MEMORY USAGE bytes, entries and encodings (``client``:
    Redis's admin user; INFO, DBSIZE, MEMORY, OBJECT and HLEN are beyond the service user's ACL)."""
    fams: dict[str, dict] = {n: {"keys": 0, "bytes": 0, "entries": 0, "encodings": Counter(),
                                 "encoding_bytes": Counter(), "per_key": []} for n in (*FAMILIES, OTHER)}
    keys: list[str] = []
    for key in client.scan_iter(count=2000):
        keys.append(key.decode())
    for i in range(0, len(keys), 1000):
        chunk = keys[i: i + 1000]
        pipe = client.pipeline(transaction=False)
        for k in chunk:
            pipe.memory_usage(k, samples=0)
            pipe.object("encoding", k)
            count = FAMILIES.get(family_of(k), (None, None))[1]
            if count:
                pipe.execute_command(count, k)
            else:
                pipe.exists(k)
        replies = pipe.execute()
        for j, k in enumerate(chunk):
            usage, encoding, count = replies[3 * j: 3 * j + 3]
            if usage is None:  # expired between SCAN and MEMORY USAGE
                continue
            name = family_of(k)
            f = fams[name]
            entries = int(count or 0) if FAMILIES.get(name, (None, None))[1] else 0
            encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            f["keys"] += 1
            f["bytes"] += int(usage)
            f["entries"] += entries
            f["encodings"][encoding] += 1
            f["encoding_bytes"][encoding] += int(usage)
            if name == "contact histories":
                f["per_key"].append((entries, int(usage)))
    info = client.info("memory")
    return {"used_memory": int(info["used_memory"]), "used_memory_dataset": int(info.get("used_memory_dataset", 0)),
            "dbsize": int(client.dbsize()),
            "families": {n: {"keys": f["keys"], "bytes": f["bytes"], "entries": f["entries"],
                             "encodings": dict(f["encodings"]), "encoding_bytes": dict(f["encoding_bytes"]),
                             "fit": fit(f["per_key"])} for n, f in fams.items()}}


def fit(per_key: list[tuple[int, int]]) -> dict | None:
    """bytes of a key = fixed + per_entry x entries, least squares over the keys of a family."""
    if len(per_key) < 10:
        return None
    entries, usage = np.asarray(per_key, dtype=float).T
    if np.ptp(entries) == 0:
        return None
    (per_entry, fixed), *_ = np.linalg.lstsq(np.column_stack((entries, np.ones_like(entries))), usage, rcond=None)
    return {"fixed_bytes": round(float(fixed), 1), "bytes_per_entry": round(float(per_entry), 1),
            "entries_p50": float(np.median(entries)), "entries_max": int(entries.max())}


def run_one(accept_days: float, decisions: int, customers: int, models_dir: str, max_seconds: float,
            seed: int = 12) -> dict:
    import redis

    from engine.decision.funnel import DecisionEngine
    from engine.decision.request import DecideInput
    from engine.decision.responses import NotFound
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.sim import demo
    from engine.store.decision_log import DecisionLog
    from engine.store.profiles import ProfileStore

    with tempfile.TemporaryDirectory() as tmp:
        rules_dir = Path(tmp) / "rules"
        shutil.copytree(ROOT / "rules", rules_dir)
        contact_yaml = rules_dir / "contact.yaml"
        text, n = re.subn(r"(?m)^(\s*accept_days:\s*)[0-9.]+", rf"\g<1>{accept_days:g}", contact_yaml.read_text())
        if n != 1:
            raise SystemExit("rules/contact.yaml: no single 'accept_days:' line to edit")
        contact_yaml.write_text(text)
        compiled = load_and_compile(rules_dir)
        ix = compiled.ruleset.contact.interactions
        if ix.accept_days != accept_days:
            raise SystemExit(f"accept_days is {ix.accept_days} after editing, want {accept_days}")
        history_days = compiled.ruleset.contact.history_days
        on_impression = set(ix.on_impression)

        with EmbeddedRedis(Path(tmp) / "redis", persist=False) as redis_server:
            store = ProfileStore.from_url(redis_server.url)
            client = store.client
            admin = redis.Redis.from_url(redis_server.admin_url)  # what measure() reads
            demo.seed(store, customers)
            rules = Live(compiled, retire=lambda r: r.close())
            model = Live(ModelRegistry(models_dir, SCHEMA).load())
            decision_log = DecisionLog(client)
            engine = DecisionEngine(store, rules, model, decision_log=decision_log, clock=lambda: NOON_UTC)
            engine.warmup()
            before = measure(admin)

            rng = random.Random(seed)
            channels, weights = list(CHANNEL_MIX), list(CHANNEL_MIX.values())
            counts: Counter[str] = Counter()
            started = time.monotonic()
            for i in range(decisions):
                if i % 1000 == 0 and time.monotonic() - started > max_seconds:
                    print(f"accept_days {accept_days:g}: stopped after {max_seconds:g} s at {i} decisions",
                          file=sys.stderr)
                    break
                channel = rng.choices(channels, weights)[0]
                interaction = f"{rng.getrandbits(128):032x}" if rng.random() < INTERACTION_SHARE else ""
                d = engine.decide(DecideInput(f"C{rng.randrange(customers):07d}", channel,
                                              touchpoint=TOUCHPOINTS[channel], max_actions=3,
                                              interaction_id=interaction))
                counts["decisions"] += 1
                counts["with_interaction"] += bool(interaction)
                counts["actions"] += len(d.actions)
                counts["empty"] += not d.actions
                counts["on_impression_decisions"] += channel in on_impression
                try:
                    if channel in on_impression and rng.random() < IMPRESSION_SHARE:
                        for a in d.actions:
                            engine.responses.record(d.decision_id, a.action_id, "impression")
                            counts["impressions_reported"] += 1
                    if d.actions and rng.random() < RESPONSE_SHARE:
                        outcome = "accepted" if rng.random() < ACCEPTED_SHARE else "rejected"
                        engine.responses.record(d.decision_id, d.actions[0].action_id, outcome)
                        counts[outcome] += 1
                except NotFound:
                    counts["responses_not_found"] += 1
                if i and i % 20_000 == 0:
                    print(f"accept_days {accept_days:g}: {i} decisions, {time.monotonic() - started:.0f} s",
                          file=sys.stderr, flush=True)
            seconds = time.monotonic() - started
            decision_log.close(timeout=60)
            sample = next(client.scan_iter(match="nba:decisions:*", count=1000), None)
            record_ttl_days = client.pttl(sample) / 86_400_000 if sample else None
            budgets = {k.decode(): int(client.get(k) or 0) for k in client.scan_iter(match="nba:budget:*")}
            after = measure(admin)
            admin.close()
            rules.current.close()
    return {"accept_days": accept_days, "history_days": history_days, "window_minutes": ix.window_minutes,
            "reservation_minutes": ix.reservation_minutes, "customers": customers, "seconds": round(seconds, 1),
            "counts": dict(counts), "record_ttl_days": record_ttl_days, "budgets_used": budgets, "before": before, "after": after}


def per_decision(run: dict) -> dict:
    """What each key family grew by, per decision, and what its keys and entries cost after the run."""
    n, b, a = run["counts"]["decisions"], run["before"], run["after"]
    fams = {}
    for name, fa in a["families"].items():
        fb = b["families"][name]
        fams[name] = {
            "bytes_per_decision": round((fa["bytes"] - fb["bytes"]) / n, 1),
            "keys_per_decision": round((fa["keys"] - fb["keys"]) / n, 4),
            "entries_per_decision": round((fa["entries"] - fb["entries"]) / n, 4),
            "bytes_per_key": round(fa["bytes"] / fa["keys"], 1) if fa["keys"] else None,
            "bytes_per_entry": round(fa["bytes"] / fa["entries"], 1) if fa["entries"] else None,
            "bytes_per_key_by_encoding": {e: round(fa["encoding_bytes"][e] / k, 1) for e, k in fa["encodings"].items()},
            "keys": fa["keys"], "entries": fa["entries"], "bytes": fa["bytes"], "encodings": fa["encodings"],
            "fit": fa["fit"],
        }
    usage_growth = sum(f["bytes"] for f in a["families"].values()) - sum(f["bytes"] for f in b["families"].values())
    used_growth = a["used_memory"] - b["used_memory"]
    keys_growth = a["dbsize"] - b["dbsize"]
    return {
        "families": fams,
        "used_memory_per_decision": round(used_growth / n, 1),
        "memory_usage_sum_per_decision": round(usage_growth / n, 1),
        # what MEMORY USAGE does not count (the expires dict, the main dict's table, allocator rounding), per new key
        "overhead_per_key": round((used_growth - usage_growth) / keys_growth, 1) if keys_growth else 0.0,
        "keys_per_decision": round(keys_growth / n, 4),
        "per_customer": {"used_memory_before": round(b["used_memory"] / run["customers"], 1),
                         "profile_bytes": round(b["families"]["profiles"]["bytes"] / run["customers"], 1),
                         "keys_before": round(b["dbsize"] / run["customers"], 3),
                         "keys_after": round(a["dbsize"] / run["customers"], 3)},
    }


def extrapolate(run: dict, per: dict, target: int, rate: float, stream_maxlen: int) -> dict:
    """Memory after ``target`` decisions, and the steady state at ``rate`` decisions/s: each family keeps
    what the decisions of its retention period wrote (rate x seconds kept x bytes per decision), the
    streams their MAXLEN entries, the customers their profile and contact-history key."""
    f, n, customers = per["families"], run["counts"]["decisions"], run["customers"]
    day, scale = 86_400, target / n
    contacts = f["contact histories"]
    fit_ = contacts["fit"] or {"fixed_bytes": 0.0, "bytes_per_entry": contacts["bytes_per_entry"] or 0.0}
    resp = f["response stream"]
    rows: dict[str, dict] = {}

    def row(name: str, grows: str, kept: str, after: float, steady: float, formula: str) -> None:
        rows[name] = {"grows_with": grows, "kept": kept, "after_target": round(after), "steady": round(steady),
                      "steady_formula": formula}

    rec = f["decision records"]["bytes_per_decision"]
    row("decision records", "decisions", f"accept_days = {run['accept_days']:g} d (TTL)", target * rec,
        rate * day * run["accept_days"] * rec, f"rate x 86,400 x {run['accept_days']:g} d x {rec:,.0f} B")
    per_entry, epd = fit_["bytes_per_entry"], contacts["entries_per_decision"]
    row("contact histories", "new (kind, action, channel, day) counters (+ one key per contacted customer); "
        "an upper bound: a counter's later contacts add no bytes",
        f"{run['history_days']:g} d (trimmed, TTL)",
        target * epd * per_entry + min(customers, contacts["keys"] * scale) * fit_["fixed_bytes"],
        rate * day * run["history_days"] * epd * per_entry,
        f"rate x 86,400 x {run['history_days']:g} d x {epd:.2f} entries x {per_entry:,.0f} B (+ {fit_['fixed_bytes']:,.0f} B "
        "per contacted customer)")
    ix = f["interaction hashes"]["bytes_per_decision"]
    row("interaction hashes", "decisions with an interaction id", f"{run['window_minutes']:g} min (TTL)",
        target * ix, rate * 60 * run["window_minutes"] * ix,
        f"rate x {60 * run['window_minutes']:,.0f} s x {ix:,.0f} B (all decisions, {INTERACTION_SHARE:.0%} with an id)")
    ds = f["decision stream"]["bytes_per_entry"] or 0.0
    row("decision stream", "decisions", f"MAXLEN ~{stream_maxlen:,} entries", min(target, stream_maxlen) * ds,
        stream_maxlen * ds, f"{stream_maxlen:,} x {ds:,.0f} B (full after {stream_maxlen / rate / 3600:.1f} h)")
    rs, repd = resp["bytes_per_entry"] or 0.0, resp["entries_per_decision"]
    full = f"full after {stream_maxlen / (rate * repd) / 3600:.1f} h" if repd else "never written"
    row("response stream", "impressions and responses", f"MAXLEN ~{stream_maxlen:,} entries",
        min(target * repd, stream_maxlen) * rs, stream_maxlen * rs, f"{stream_maxlen:,} x {rs:,.0f} B ({full})")
    res = f["reservations"]
    res_entry, res_epd = res["bytes_per_entry"] or 0.0, res["entries_per_decision"]
    row("reservations", "unreported impressions of budgeted actions", f"{run['reservation_minutes']:g} min (releaser)",
        target * res["bytes_per_decision"], rate * res_epd * 60 * run["reservation_minutes"] * res_entry,
        f"rate x {res_epd:.4f} x {60 * run['reservation_minutes']:,.0f} s x {res_entry:,.0f} B")
    bud = f["budgets"]
    row("budgets", "budgeted actions x days", "2 d (TTL)", bud["bytes"], bud["bytes"], "budgeted actions x 2 days x B/key")
    # MEMORY USAGE leaves out the expires entry and the main dict's slot of every key
    live_keys_target = (target * (f["decision records"]["keys_per_decision"] + f["interaction hashes"]["keys_per_decision"])
                        + min(customers, contacts["keys"] * scale))
    live_keys_steady = rate * (day * run["accept_days"] * f["decision records"]["keys_per_decision"]
                               + 60 * run["window_minutes"] * f["interaction hashes"]["keys_per_decision"])
    ov = per["overhead_per_key"]
    row("key overhead", "keys", "with the keys", live_keys_target * ov, live_keys_steady * ov,
        f"keys x {ov:,.0f} B (expires + dict slot, used_memory - MEMORY USAGE)")
    per_customer = (f["profiles"]["bytes_per_key"] or 0.0) + fit_["fixed_bytes"] + 2 * ov
    return {
        "target_decisions": target, "rate": rate, "rows": rows,
        "customers_before_bytes": run["before"]["used_memory"],
        "after_target_total_bytes": round(run["before"]["used_memory"] + sum(r["after_target"] for r in rows.values())),
        "steady_total_bytes": round(sum(r["steady"] for r in rows.values())),
        "per_customer_bytes": round(per_customer, 1),
    }


def size(x: float) -> str:
    return f"{x / 1e9:,.2f} GB" if abs(x) >= 1e9 else f"{x / 1e6:,.1f} MB"


def report(run: dict, per: dict, ext: dict) -> None:
    c = run["counts"]
    print(f"\n== accept_days {run['accept_days']:g}: {c['decisions']:,} decisions in {run['seconds']} s over "
          f"{run['customers']:,} customers (a decision record's TTL {run['record_ttl_days']:.2f} d)")
    print(f"   {c.get('with_interaction', 0):,} with an interaction id, {c.get('actions', 0):,} actions presented "
          f"({c.get('empty', 0):,} decisions without), {c.get('impressions_reported', 0):,} impressions reported, "
          f"{c.get('accepted', 0):,} accepted, {c.get('rejected', 0):,} rejected, "
          f"{c.get('responses_not_found', 0)} responses refused; budgets used {run['budgets_used']}")
    print(f"{'key family':19} {'B/decision':>10} {'keys/dec':>8} {'B/key':>8} {'entries/dec':>11} {'B/entry':>8} "
          f"{'keys':>8} {'total':>9}  B/key by encoding")
    for name, f in per["families"].items():
        if f["keys"]:
            print(f"{name:19} {f['bytes_per_decision']:10,.1f} {f['keys_per_decision']:8.4f} {f['bytes_per_key'] or 0:8,.0f} "
                  f"{f['entries_per_decision']:11.4f} {f['bytes_per_entry'] or 0:8,.1f} {f['keys']:8,d} {size(f['bytes']):>9}  "
                  + ", ".join(f"{e} {f['encodings'][e]:,} x {v:,.0f}" for e, v in f["bytes_per_key_by_encoding"].items()))
    fit_ = per["families"]["contact histories"]["fit"]
    if fit_:
        print(f"contact history key = {fit_['fixed_bytes']:,.0f} B + {fit_['bytes_per_entry']:,.1f} B per entry "
              f"(least squares over its keys; entries p50 {fit_['entries_p50']:g}, max {fit_['entries_max']})")
    pc = per["per_customer"]
    print(f"per decision: MEMORY USAGE {per['memory_usage_sum_per_decision']:,.1f} B, used_memory "
          f"{per['used_memory_per_decision']:,.1f} B, {per['keys_per_decision']:.3f} keys "
          f"(+{per['overhead_per_key']:,.0f} B per key outside MEMORY USAGE)")
    print(f"per customer: {pc['used_memory_before']:,.0f} B of used_memory after seeding (profile {pc['profile_bytes']:,.0f} B), "
          f"keys {pc['keys_before']:.2f} -> {pc['keys_after']:.2f} after the decisions; "
          f"steady state {ext['per_customer_bytes']:,.0f} B (profile, contact key, key overhead)")
    print(f"{'':19} {'after ' + format(ext['target_decisions'], ',') + ' decisions':>22} "
          f"{'steady at ' + format(ext['rate'], 'g') + '/s':>16}  kept / formula")
    for name, r in ext["rows"].items():
        print(f"{name:19} {size(r['after_target']):>22} {size(r['steady']):>16}  {r['kept']}: {r['steady_formula']}")
    print(f"{'total':19} {size(ext['after_target_total_bytes']):>22} {size(ext['steady_total_bytes']):>16}  "
          f"(after N: with the {run['customers']:,} customers' {size(ext['customers_before_bytes'])}; steady: customers aside)")


def run(args: argparse.Namespace) -> int:
    """The measurement with ``op_costs.py``'s arguments (``--bytes-per-decision``)."""
    from engine.store.profiles import STREAM_MAXLEN

    out = []
    for days in args.accept_days:
        one = run_one(days, args.decisions, args.customers, args.models_dir, args.max_seconds or 600)
        per = per_decision(one)
        ext = extrapolate(one, per, args.extrapolate_to, args.rate, STREAM_MAXLEN)
        report(one, per, ext)
        out.append({"run": one, "per_decision": per, "extrapolation": ext})
    if len(out) > 1:
        print()
        base = out[0]["extrapolation"]
        for o in out[1:]:
            e = o["extrapolation"]
            a, b = base["rows"]["decision records"]["steady"], e["rows"]["decision records"]["steady"]
            ta, tb = base["steady_total_bytes"], e["steady_total_bytes"]
            print(f"steady state at {args.rate:g}/s, accept_days {out[0]['run']['accept_days']:g} vs "
                  f"{o['run']['accept_days']:g}: decision records {size(a)} vs {size(b)}; "
                  f"total {size(ta)} vs {size(tb)} (saves {size(tb - ta)})")
    write_json(args.json, {"runs": out})
    return 0
