"""Microbenchmark of the rule stage: ``python -m engine.rules.bench [rules_dir]``.

Prints microseconds per call for a few typical customers: build_fact, evaluate (one durable
assert_fact + actions + delete_state, then the numba engagement program), the same rules with every
action's engagement compiled into durable (the naive design), admitted (the verdicts a decision
uses), and the Python evaluator for comparison. loadtest/bench_rules.py measures a 100-action catalog.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.rules.facts import FactInputs
from engine.rules.runtime import compile_rules, load_and_compile

PROFILES = {
    "loyal family, web": FactInputs(
        numbers={"tenure_months": 30, "churn_risk": 0.2, "data_usage_ratio": 0.9, "num_lines": 3,
                 "device_age_months": 26, "credit_score": 700, "tv_hours_week": 12, "contract_months_left": 8},
        categories={"plan": "standard", "segment": "family", "lifecycle_stage": "loyal", "value_tier": "B",
                    "device_os": "android"},
        products={"mobile", "broadband"}, consents={"web", "email"}, channel="web", touchpoint="home"),
    "tier A at risk, open case, call": FactInputs(
        numbers={"tenure_months": 60, "open_cases": 1, "churn_risk": 0.7},
        categories={"plan": "unlimited", "segment": "consumer", "lifecycle_stage": "retained", "value_tier": "A"},
        products={"mobile", "fiber", "tv"}, consents={"call_center"}, channel="call_center",
        triggers={"callback_requested"}),
    "prospect, web": FactInputs(
        categories={"lifecycle_stage": "prospect", "segment": "student"}, consents={"web"}, channel="web"),
    "declining, no consent, email": FactInputs(
        numbers={"tenure_months": 20, "churn_risk": 0.45, "support_calls_90d": 3},
        categories={"plan": "sim_only", "segment": "consumer", "lifecycle_stage": "declining", "value_tier": "C"},
        products={"mobile"}, consents=(), channel="email"),
}


def _per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    rules = load_and_compile(Path(args[0]) if args else Path("rules"))
    naive = compile_rules(rules.ruleset, eligibility="durable")
    try:
        print(f"{rules.version}: {len(rules.plan.definition)} durable rules ({len(naive.plan.definition)} naive), "
              f"{len(rules.plan.durable_fields)} fields sent to durable")
        for name, inputs in PROFILES.items():
            fact = rules.build_fact(inputs)
            outcome = rules.evaluate(fact)
            for _ in range(200):  # warm up
                rules.evaluate(fact)
            build = _per_call(lambda inputs=inputs: rules.build_fact(inputs), 3000)
            evaluate = _per_call(lambda fact=fact: rules.evaluate(fact), 3000)
            naive_evaluate = _per_call(lambda fact=fact: naive.evaluate(fact), 3000)
            admitted = _per_call(lambda outcome=outcome, inputs=inputs: rules.admitted(outcome, inputs.channel), 3000)
            python = _per_call(lambda fact=fact: rules.evaluate_python(fact), 500)
            print(f"{name:32s} fired {outcome.fired:2d} (naive {naive.evaluate(fact).fired:2d})  build_fact {build:5.1f} us  "
                  f"evaluate {evaluate:6.1f} us  (naive {naive_evaluate:6.1f} us)  admitted {admitted:5.1f} us  "
                  f"(python evaluator {python:6.1f} us)")
    finally:
        rules.close()
        naive.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
