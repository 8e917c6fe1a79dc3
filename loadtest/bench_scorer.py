"""Per-call latency of the numba scorers vs lightgbm.Booster.predict and lleaves, on decision-shaped
batches.

One binary propensity model (200 trees, 31 leaves, 40 features of which 5 categorical) is trained on
synthetic responses shaped like the service's: 36 customer features, then the action (id of 40,
type of 6, value) and the channel, with per-action responses to customer traits, so the trees split
on action features as the service's model does. A call scores what the service scores: 1 row (one
customer, one action), 30 rows (one decision: a customer against 30 admitted catalog actions on one
channel), 300 and 3,000 rows (10 and 100 such decisions in one call, e.g. an outbound batch). Every
call is a different customer and a different action subset.

Scorers, each given the input in its natural form:
- ``numba decision``: ``CompiledModel.bind(action columns, catalog)`` once, then per call the
  customer's shared row and the admitted catalog indices (what the service holds);
- ``numba walker``: ``CompiledModel.predict`` on the assembled rows (the generic tree walker);
- ``Booster.predict`` (its default threads) and ``Booster.predict, 1 thread`` on the assembled rows;
- ``lleaves`` (LLVM-compiled trees, ``n_jobs=1``) on the assembled rows, when ``--lleaves-python``
  names an interpreter that has it (lleaves 1.3 cannot use the llvmlite numba 0.68 needs, so it runs
  in its own virtualenv, on the same model file and the same batches, in the same run).

The scorers of this process take turns (25 calls each) so that a busy spell on a shared machine hits
them alike; lleaves is timed right after, in its own process.

    python loadtest/bench_scorer.py [--lleaves-python PATH] [--repeats N] [--budget S] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BATCH_SIZES = (1, 30, 300, 3000)
ACTIONS_PER_DECISION = 30
N_CUSTOMER = 36
N_FEATURES = 40
ACTION, ACTION_TYPE, ACTION_VALUE, CHANNEL = 36, 37, 38, 39
ROW_FEATURES = (ACTION, ACTION_TYPE, ACTION_VALUE)  # differ between the rows of one decision
CATEGORICAL = (34, 35, ACTION, ACTION_TYPE, CHANNEL)
N_ACTIONS, N_TYPES, N_CHANNELS = 40, 6, 7
CUSTOMER_POOL = 20_000


def time_calls(fn: Callable[[object], object], inputs: list, repeats: int, budget_s: float) -> np.ndarray:
    """Per-call wall times in microseconds: up to ``repeats`` calls, stopping after ``budget_s``.

    Calls cycle through distinct inputs: re-scoring one batch would let the branch predictor learn
    its exact paths through the trees and report optimistic tree-walk times.
    """
    return time_interleaved({"fn": fn}, {"fn": inputs}, repeats, budget_s)["fn"]


def time_interleaved(fns: dict[str, Callable[[object], object]], inputs: dict[str, list], repeats: int,
                     budget_s: float, slice_calls: int = 25) -> dict[str, np.ndarray]:
    """Like ``time_calls`` for several scorers at once, taking turns ``slice_calls`` calls at a time
    so that a busy spell on a shared machine hits them all alike; each stops at ``repeats`` calls or
    when its share of the budget (``budget_s`` each) is spent."""
    for name, fn in fns.items():
        for i in range(min(20, repeats)):
            fn(inputs[name][i % len(inputs[name])])
    times = {name: np.empty(repeats, dtype=np.float64) for name in fns}
    count = dict.fromkeys(fns, 0)
    spent = dict.fromkeys(fns, 0.0)
    active = [name for name in fns]
    while active:
        for name in list(active):
            fn, args, out = fns[name], inputs[name], times[name]
            n = count[name]
            started = time.perf_counter()
            for _ in range(min(slice_calls, repeats - n)):
                arg = args[n % len(args)]
                t0 = time.perf_counter_ns()
                fn(arg)
                out[n] = (time.perf_counter_ns() - t0) / 1e3
                n += 1
            count[name] = n
            spent[name] += time.perf_counter() - started
            if n >= repeats or spent[name] > budget_s:
                active.remove(name)
    return {name: times[name][: count[name]] for name in fns}


def summarise(name: str, batch: int, times: np.ndarray) -> dict:
    p50, p99, p999 = np.percentile(times, [50, 99, 99.9])
    return {"scorer": name, "batch": batch, "calls": len(times), "p50_us": float(p50), "p99_us": float(p99),
            "p999_us": float(p999), "rows_per_s_at_p50": batch / p50 * 1e6}


def lleaves_worker(workdir: Path, repeats: int, budget: float) -> int:
    """Runs under the lleaves interpreter: compile the model, time the same batches, write JSON."""
    import importlib.metadata

    import lleaves

    model = lleaves.Model(model_file=str(workdir / "model.txt"))
    t0 = time.perf_counter()
    model.compile()
    compile_s = time.perf_counter() - t0
    data = np.load(workdir / "batches.npz")
    reference = data["reference"]
    got = model.predict(data["check"], n_jobs=1)
    results = []
    for batch in BATCH_SIZES:
        inputs = [data[k] for k in sorted(data.files) if k.startswith(f"b{batch}_")]
        times = time_calls(lambda X: model.predict(X, n_jobs=1), inputs, repeats, budget)
        results.append(summarise("lleaves", batch, times))
    (workdir / "lleaves.json").write_text(json.dumps({
        "version": importlib.metadata.version("lleaves"),
        "llvmlite": importlib.metadata.version("llvmlite"),
        "compile_s": compile_s, "max_abs_diff": float(np.abs(got - reference).max()), "results": results,
    }))
    return 0


def make_world(rng: np.random.Generator):
    """Customers (shared rows without action columns), a catalog, and a response function."""
    cust = rng.normal(size=(CUSTOMER_POOL, N_CUSTOMER))
    cust[:, :12] = np.round(np.abs(cust[:, :12]) * 2)  # counts with many exact zeros
    cust[rng.random(cust.shape) < 0.04] = np.nan
    cust[:, 34] = rng.integers(0, 5, CUSTOMER_POOL)
    cust[:, 35] = rng.integers(0, 8, CUSTOMER_POOL)
    catalog = np.empty((N_ACTIONS, len(ROW_FEATURES)))
    catalog[:, 0] = np.arange(N_ACTIONS)
    catalog[:, 1] = rng.integers(0, N_TYPES, N_ACTIONS)
    catalog[:, 2] = np.round(rng.lognormal(3.5, 0.8, N_ACTIONS), 1)
    traits = [0, 3, 12, 13, 14, 15, 16, 17, 20, 21]
    weights = rng.normal(0, 0.6, (N_ACTIONS, len(traits)))
    type_base = rng.normal(-2.3, 0.5, N_TYPES)
    type_traits = rng.normal(0, 0.8, (N_TYPES, 4))
    segment = rng.normal(0, 0.4, (N_TYPES, 5))
    channel_fx = rng.normal(0, 0.3, N_CHANNELS)

    def p_true(c: np.ndarray, a: np.ndarray, ch: np.ndarray) -> np.ndarray:
        z = np.nan_to_num(cust[c][:, traits])
        t = catalog[a, 1].astype(int)
        logit = type_base[t] + (z * weights[a]).sum(1) + (np.nan_to_num(cust[c][:, 18:22]) * type_traits[t]).sum(1)
        logit += segment[t, cust[c, 34].astype(int)] + channel_fx[ch] - 0.3 * np.log1p(catalog[a, 2] / 40)
        return 1 / (1 + np.exp(-logit))

    return cust, catalog, p_true


def rows_for(cust: np.ndarray, catalog: np.ndarray, c: np.ndarray, a: np.ndarray, ch: np.ndarray) -> np.ndarray:
    X = np.empty((len(c), N_FEATURES))
    X[:, :N_CUSTOMER] = cust[c]
    X[:, list(ROW_FEATURES)] = catalog[a]
    X[:, CHANNEL] = ch
    return X


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5000, help="max timed calls per scorer and batch size")
    ap.add_argument("--budget", type=float, default=3.0, help="max seconds per scorer and batch size")
    ap.add_argument("--lleaves-python", help="python of a virtualenv with lleaves (timed in a subprocess)")
    ap.add_argument("--json", type=Path, help="also write results to this JSON file")
    ap.add_argument("--lleaves-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.lleaves_worker:
        return lleaves_worker(args.lleaves_worker, args.repeats, args.budget)

    import lightgbm as lgb
    import numba

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine.models.scorer import CompiledModel

    rng = np.random.default_rng(42)
    cust, catalog, p_true = make_world(rng)
    n_train = 60_000
    c, a, ch = rng.integers(0, CUSTOMER_POOL, n_train), rng.integers(0, N_ACTIONS, n_train), rng.integers(0, N_CHANNELS, n_train)
    y = (rng.random(n_train) < p_true(c, a, ch)).astype(np.float64)
    t0 = time.perf_counter()
    booster = lgb.train({"objective": "binary", "num_leaves": 31, "learning_rate": 0.05, "min_data_in_leaf": 20,
                         "verbose": -1, "seed": 1}, lgb.Dataset(rows_for(cust, catalog, c, a, ch), y,
                                                                categorical_feature=list(CATEGORICAL)), 200)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = CompiledModel.from_booster(booster)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decision = model.bind(list(ROW_FEATURES), catalog)
    bind_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.warmup()
    decision.warmup()
    warmup_s = time.perf_counter() - t0
    split_features = model._split_feature
    row_split_share = float(np.isin(split_features, ROW_FEATURES).mean())
    channel_split_share = float((split_features == CHANNEL).mean())

    # Calls: decisions of 30 distinct actions; customers are never reused across calls.
    calls: dict[int, list[dict]] = {}
    next_customer = 0
    for batch in BATCH_SIZES:
        n_dec, per = (1, 1) if batch == 1 else (batch // ACTIONS_PER_DECISION, ACTIONS_PER_DECISION)
        n_calls = max(4, min(400, 12_000 // batch))
        calls[batch] = []
        for _ in range(n_calls):
            ids = (next_customer + np.arange(n_dec)) % CUSTOMER_POOL
            next_customer += n_dec
            channel = rng.integers(0, N_CHANNELS, n_dec)
            shared = np.empty((n_dec, N_FEATURES))
            shared[:, :N_CUSTOMER] = cust[ids]
            shared[:, list(ROW_FEATURES)] = np.nan  # ignored by the decision scorer
            shared[:, CHANNEL] = channel
            acts = np.concatenate([np.sort(rng.choice(N_ACTIONS, per, replace=False)) for _ in range(n_dec)])
            owner = np.repeat(np.arange(n_dec), per)
            X = rows_for(cust, catalog, ids[owner], acts, channel[owner])
            calls[batch].append({"shared": shared, "shared1": shared[0], "owner": owner, "acts": acts, "X": X})

    check = np.concatenate([call["X"] for call in calls[3000]])
    reference = booster.predict(check)
    max_diff = {
        "numba decision": float(max(np.abs(decision.predict_pairs(k["shared"], k["owner"], k["acts"])
                                           - booster.predict(k["X"])).max() for k in calls[3000])),
        "numba walker": float(np.abs(model.predict(check) - reference).max()),
    }

    def decide(call: dict) -> np.ndarray:
        if len(call["shared"]) == 1:
            return decision.predict(call["shared1"], call["acts"])
        return decision.predict_pairs(call["shared"], call["owner"], call["acts"])

    scorers: dict[str, tuple[Callable, str]] = {
        "numba decision": (decide, "call"),
        "numba walker": (model.predict, "X"),
        "Booster.predict": (booster.predict, "X"),
        "Booster.predict, 1 thread": (lambda X: booster.predict(X, num_threads=1), "X"),
    }
    results: list[dict] = []
    for batch in BATCH_SIZES:
        timed = time_interleaved({name: fn for name, (fn, _) in scorers.items()},
                                 {name: calls[batch] if key == "call" else [k["X"] for k in calls[batch]]
                                  for name, (_, key) in scorers.items()}, args.repeats, args.budget)
        results += [summarise(name, batch, times) for name, times in timed.items()]

    notes: list[str] = []
    if args.lleaves_python:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            work = Path(tmp)
            booster.save_model(str(work / "model.txt"))
            np.savez(work / "batches.npz", check=check, reference=reference,
                     **{f"b{batch}_{i:04d}": k["X"] for batch in BATCH_SIZES for i, k in enumerate(calls[batch])})
            proc = subprocess.run([args.lleaves_python, __file__, "--lleaves-worker", str(work),
                                   "--repeats", str(args.repeats), "--budget", str(args.budget)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                notes.append(f"lleaves worker failed: {proc.stderr.strip().splitlines()[-1:]}")
            else:
                ll = json.loads((work / "lleaves.json").read_text())
                results += ll["results"]
                max_diff["lleaves"] = ll["max_abs_diff"]
                notes.append(f"lleaves {ll['version']} (llvmlite {ll['llvmlite']}, own virtualenv): "
                             f"LLVM compile {ll['compile_s']:.1f}s; n_jobs=1")
    else:
        notes.append("lleaves: skipped (--lleaves-python not given)")

    print(f"python {platform.python_version()}, lightgbm {lgb.__version__}, numba {numba.__version__}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs ({platform.machine()})")
    print(f"model: {model.num_trees} trees, 31 leaves, {N_FEATURES} features ({len(CATEGORICAL)} categorical); "
          f"{row_split_share:.0%} of splits on per-row action features, {channel_split_share:.0%} on the channel; "
          f"train {train_s:.1f}s, compile {build_s * 1e3:.0f}ms, bind to the {N_ACTIONS}-action catalog "
          f"{bind_s * 1e3:.0f}ms, warmup (JIT or cache load) {warmup_s * 1e3:.0f}ms")
    print(f"calls: 1 row = 1 customer x 1 action; n >= 30 rows = n/30 customers x {ACTIONS_PER_DECISION} "
          f"distinct actions; every call a different customer")
    print("max |score - Booster.predict| over 3,000 rows: " + ", ".join(f"{k} {v:.1e}" for k, v in max_diff.items()))
    for note in notes:
        print(note)
    print()
    header = (f"{'rows':>5}  {'scorer':<27}{'calls':>6}{'p50 us':>10}{'p99 us':>10}{'p99.9 us':>10}"
              f"{'rows/s @p50':>13}{'p50 / decision':>16}")
    print(header)
    print("-" * len(header))
    for batch in BATCH_SIZES:
        rows = [r for r in results if r["batch"] == batch]
        base = next(r["p50_us"] for r in rows if r["scorer"] == "numba decision")
        for r in rows:
            r["p50_over_decision"] = r["p50_us"] / base
            print(f"{batch:>5}  {r['scorer']:<27}{r['calls']:>6}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
                  f"{r['p999_us']:>10.1f}{r['rows_per_s_at_p50']:>13,.0f}{r['p50_over_decision']:>15.1f}x")
    print("\n'p50 / decision' = scorer p50 / numba decision p50: how many times faster the decision scorer is.")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "env": {"python": platform.python_version(), "lightgbm": lgb.__version__,
                    "numba": numba.__version__, "numpy": np.__version__, "cpus": os.cpu_count()},
            "model": {"row_split_share": row_split_share, "channel_split_share": channel_split_share,
                      "bind_ms": bind_s * 1e3},
            "max_abs_diff_vs_booster": max_diff, "notes": notes, "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
