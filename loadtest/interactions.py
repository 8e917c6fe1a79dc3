"""In-process Decide latency: a new decision, a new decision with an interaction id, and its repeat.

One process, one thread, one engine (contact policies, budgets and the decision log on, as served) on
an embedded Redis it starts on a free loopback port with ``--customers`` demo customers. Every round
draws one request (a demo customer, call_center or web at random, a touchpoint per channel, 3 actions)
and times four calls in an order that rotates through all six orders of the three kinds, round by
round, so machine noise and cache warmth fall on every kind alike:

- **new**: the request without an interaction id (a new decision every time);
- **new + interaction**: the request with a fresh interaction id: a new decision that also stores itself
  for its placement in ``nba:{c:<id>}:ix:<interaction>``;
- **repeat**: the previous round's interaction request asked again (same customer, interaction id and
  placement): served from the stored decision (``Decision.repeat``), no second impression or budget;
- **round trip**: ``EVALSHA`` of ``return 1`` on the engine's own Redis client, the ceiling of any call
  that needs one Redis round trip (a repeat needs exactly one).

    python loadtest/interactions.py --models-dir /tmp/nba-models --decisions 5000 --json /tmp/interactions.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.sim.telco import SCHEMA  # noqa: E402
from engine.store.redis_embedded import EmbeddedRedis  # noqa: E402

KINDS = ("new", "new_interaction", "repeat")
LABELS = {"new": "new decision", "new_interaction": "new + interaction id", "repeat": "repeat (stored)",
          "round_trip": "Redis round trip (EVALSHA return 1)"}
TOUCHPOINTS = {"call_center": "agent.desktop", "web": "web.home.hero"}
WARMUP = 1000


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "p999_ms": round(float(np.percentile(ms, 99.9)), 3), "calls": int(ms.size)}


def run(decisions: int, customers: int, models_dir: str, max_seconds: float, seed: int = 12) -> dict:
    from engine.decision.funnel import DecisionEngine
    from engine.decision.request import DecideInput
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.sim import demo
    from engine.store.decision_log import DecisionLog
    from engine.store.profiles import ProfileStore

    times: dict[str, list[float]] = {k: [] for k in (*KINDS, "round_trip")}
    wrong = {"new_repeat": 0, "repeat_not_repeat": 0, "repeat_other_decision": 0}
    orders = list(itertools.permutations(KINDS))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as redis_server:
        store = ProfileStore.from_url(redis_server.url)
        demo.seed(store, customers)
        rules = Live(load_and_compile(ROOT / "rules"), retire=lambda r: r.close())
        model = Live(ModelRegistry(models_dir, SCHEMA).load())
        decision_log = DecisionLog(store.client)
        engine = DecisionEngine(store, rules, model, decision_log=decision_log)
        engine.warmup()
        client = store.client
        noop = client.script_load("return 1")
        rng = random.Random(seed)
        previous: tuple[object, str] | None = None  # last round's interaction request and its decision id
        started = time.monotonic()
        rounds = 0
        for i in range(decisions + WARMUP):
            if time.monotonic() - started > max_seconds:
                print(f"stopped after {max_seconds:g} s: {i} rounds", file=sys.stderr)
                break
            cid = f"C{rng.randrange(customers):07d}"
            channel = rng.choice(("call_center", "web"))
            plain = DecideInput(cid, channel, touchpoint=TOUCHPOINTS[channel], max_actions=3)
            fresh = DecideInput(cid, channel, touchpoint=TOUCHPOINTS[channel], max_actions=3,
                                interaction_id=f"ix-{seed}-{i}")
            measured = i >= WARMUP
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
        rules.current.close()
    table = {k: percentiles(v) for k, v in times.items() if v}
    table["ratios"] = {
        f"{a}/{b}": {p: round(table[a][p] / table[b][p], 2) for p in ("p50_ms", "p99_ms", "p999_ms")}
        for a, b in (("repeat", "new"), ("new_interaction", "new"), ("repeat", "round_trip"),
                     ("new", "round_trip"))}
    table["checks"] = wrong
    table["run"] = {"rounds": rounds, "warmup_rounds": WARMUP, "seconds": round(wall, 1), "customers": customers,
                    "models_dir": models_dir}
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decisions", type=int, default=5000, help="measured calls per kind (after 1,000 warm-up rounds)")
    ap.add_argument("--customers", type=int, default=20_000, help="demo customers seeded into the embedded Redis")
    ap.add_argument("--models-dir", default=str(ROOT / "models"))
    ap.add_argument("--max-seconds", type=float, default=600, help="stop the loop after this long")
    ap.add_argument("--json")
    args = ap.parse_args()
    table = run(args.decisions, args.customers, args.models_dir, args.max_seconds)
    print(f"{'in-process Decide':38} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'calls':>6}")
    for kind in (*KINDS, "round_trip"):
        t = table[kind]
        print(f"{LABELS[kind]:38} {t['p50_ms']:8.3f} {t['p99_ms']:8.3f} {t['p999_ms']:9.3f} {t['calls']:6d}")
    for name, r in table["ratios"].items():
        print(f"{name:38} x{r['p50_ms']:.2f} p50, x{r['p99_ms']:.2f} p99, x{r['p999_ms']:.2f} p99.9")
    print(f"checks (all 0 expected): {table['checks']}; {table['run']['rounds']} rounds in {table['run']['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return 0 if not any(table["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
