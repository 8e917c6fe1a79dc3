"""Rule stage latency for a large catalog, against the naive durable-rules design in the same run.

    python loadtest/bench_rules.py --json /tmp/bench_rules.json

Writes a synthetic rule set (``engine.sim.synthetic_rules``: 100 actions, 300 rules, of which 60 are
customer-level situations / policies / levers and 240 per-action engagement conditions), compiles it
twice and times the rule stage of a decision for profiles of the synthetic customer base on random
channels, contexts and triggers:

- ``vectorised``: the service's design: durable-rules decides the customer-level rules (one
  ``assert_fact``), one numba call decides every action's engagement conditions, numpy the verdicts;
- ``naive durable``: every action's engagement conditions compiled into durable-rules as one rule
  per action, which fires for every eligible action (one firing rule per eligible action).

The stage is what ``nba_decision_stage_duration_seconds{stage="rules"}`` measures in Decide: build
the fact from the profile, evaluate, and the admitted actions with their weights. The designs run
in alternating blocks of ``--block`` decisions so that both see the same machine noise. Latency is
wall-clock; the CPU time of the thread is shown under it (on a shared machine the difference is
time spent waiting for a core). Exit code 1 when the vectorised p99 is above ``--budget-us``.
"""

from __future__ import annotations

import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "loadtest"))

from harness import args as common  # noqa: E402
from harness.results import write_json  # noqa: E402

from engine.features import FeatureSchema  # noqa: E402
from engine.models.derived import derive  # noqa: E402
from engine.rules.facts import FactInputs  # noqa: E402
from engine.rules.loader import load_rules  # noqa: E402
from engine.rules.runtime import compile_rules  # noqa: E402
from engine.sim import synthetic_rules as synthetic  # noqa: E402
from engine.sim.telco import CHANNELS  # noqa: E402
from engine.sim.world import generate  # noqa: E402

PERCENTILES = (50, 90, 99, 99.9)


def requests(n: int, seed: int, schema: FeatureSchema) -> list[tuple]:
    """(profile, derived, channel, context) for ``n`` customers of the synthetic world (derived features
    by ``schema``, the compiled rules' own)."""
    world, rng = generate(n, seed), random.Random(seed)
    out = []
    for i in range(n):
        p = world.profile(i)
        p.triggers = frozenset(t for t in synthetic.TRIGGERS if rng.random() < 0.05)
        context = {"intent": rng.choice(synthetic.INTENTS + ("", "", ""))}
        out.append((p, derive(p.numeric, schema), rng.choice(CHANNELS), context))
    return out


def rule_stage(rules, request) -> tuple[int, int]:
    """One decision's rule stage, as Decide runs it; returns (durable firings, admitted actions)."""
    profile, derived, channel, context = request
    outcome = rules.evaluate(rules.build_fact(FactInputs(
        numbers=np.concatenate((profile.numeric, derived)), categories=profile.categorical,
        products=profile.sets["products"], sets=profile.sets, consents=profile.sets["consent"], channel=channel,
        touchpoint="", context=context, triggers=profile.triggers)))
    index, _ = rules.admitted(outcome, channel)
    return outcome.fired, len(index)


def measure(designs: dict, reqs: list, decisions: int, block: int) -> dict:
    times = {name: [] for name in designs}
    cpu = {name: [] for name in designs}
    fired = {name: [] for name in designs}
    admitted = {name: [] for name in designs}
    for rules in designs.values():  # warm up: JIT, caches, durable's pools
        for r in reqs[:500]:
            rule_stage(rules, r)
    gc.collect()
    k = 0
    while len(times[next(iter(designs))]) < decisions:
        for name, rules in designs.items():
            for j in range(block):
                r = reqs[(k + j) % len(reqs)]
                start, start_cpu = time.perf_counter(), time.thread_time()
                f, a = rule_stage(rules, r)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.thread_time() - start_cpu)
                fired[name].append(f)
                admitted[name].append(a)
        k += block
    out = {}
    for name in designs:
        us = np.array(times[name]) * 1e6
        out[name] = {f"p{p:g}": round(float(np.percentile(us, p)), 1) for p in PERCENTILES}
        cpu_us = np.array(cpu[name]) * 1e6
        out[name]["cpu"] = {f"p{p:g}": round(float(np.percentile(cpu_us, p)), 1) for p in PERCENTILES}
        out[name].update(max=round(float(us.max()), 1), mean=round(float(us.mean()), 1),
                         durable_rules=len(designs[name].plan.definition),
                         firings_mean=round(float(np.mean(fired[name])), 1),
                         firings_p99=float(np.percentile(fired[name], 99)),
                         admitted_mean=round(float(np.mean(admitted[name])), 1), decisions=len(us))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--actions", type=int, default=100)
    parser.add_argument("--rules", type=int, default=300)
    parser.add_argument("--customer-rules", type=int, default=60, help="of --rules, the customer-level ones")
    parser.add_argument("--scaling", default="", help="also time ours with these customer-level counts, e.g. 120,200")
    parser.add_argument("--decisions", type=int, default=20_000, help="per design")
    parser.add_argument("--block", type=int, default=200)
    common.add_customers(parser, 5_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--budget-us", type=float, default=300.0)
    common.add_json(parser)
    args = parser.parse_args(argv)

    results = {}
    with tempfile.TemporaryDirectory(prefix="nba-bench-rules-") as tmp:
        ruleset, errors = load_rules(synthetic.write_rules(Path(tmp) / "main", args.actions, args.rules,
                                                           args.customer_rules, args.seed))
        if errors:
            raise SystemExit("\n".join(map(str, errors)))
        counts = synthetic.count_rules(ruleset)
        print(f"synthetic rule set: {counts}")
        designs = {"vectorised": compile_rules(ruleset), "naive durable": compile_rules(ruleset, eligibility="durable")}
        reqs = requests(args.customers, args.seed, designs["vectorised"].schema)
        results["main"] = {"rules": counts, **measure(designs, reqs, args.decisions, args.block)}
        for rules in designs.values():
            rules.close()
        for extra in [int(x) for x in args.scaling.split(",") if x]:
            ruleset, _ = load_rules(synthetic.write_rules(Path(tmp) / f"c{extra}", args.actions, args.rules,
                                                          extra, args.seed))
            with compile_rules(ruleset) as rules:
                results[f"customer_rules_{extra}"] = {
                    "rules": synthetic.count_rules(ruleset),
                    **measure({"vectorised": rules}, reqs, args.decisions // 2, args.block)}
    ours = results["main"]["vectorised"]
    print(f"\n{'design':32} {'durable rules':>13} {'firings':>8} {'admitted':>8} "
          + " ".join(f"{'p' + format(p, 'g'):>8}" for p in PERCENTILES) + f" {'max':>8}  (us)")
    for label, block in results.items():
        for name, r in block.items():
            if name == "rules":
                continue
            customer_level = block["rules"]["situations"] + block["rules"]["policies"] + block["rules"]["levers"]
            title = name if label == "main" else f"{name}, {customer_level} customer-level"
            print(f"{title:32} {r['durable_rules']:>13} {r['firings_mean']:>8} {r['admitted_mean']:>8} "
                  + " ".join(f"{r['p' + format(p, 'g')]:>8}" for p in PERCENTILES) + f" {r['max']:>8}")
            print(f"{'  (CPU time of the thread)':32} {'':>13} {'':>8} {'':>8} "
                  + " ".join(f"{r['cpu']['p' + format(p, 'g')]:>8}" for p in PERCENTILES))
    ok = ours["p99"] <= args.budget_us
    print(f"\nvectorised p99 {ours['p99']} us: {'within' if ok else 'OVER'} the {args.budget_us:g} us budget; "
          f"naive durable p99 {results['main']['naive durable']['p99']} us")
    write_json(args.json, {"args": vars(args), "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
