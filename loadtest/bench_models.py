"""The propensity model's costs and shape: the numba scorers against LightGBM (default), the derived-feature
kernel against its hand-written baseline (``--derived``), and one model across actions against one per
action type (``--shapes``).

Scorers (default): per-call latency of the numba scorers vs lightgbm.Booster.predict and lleaves, on decision-shaped
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

    python loadtest/bench_models.py [--lleaves-python PATH] [--repeats N] [--budget S] [--json FILE]
    python loadtest/bench_models.py --repeats 300 --budget 0.5

Derived features (``--derived``): the kernel that runs domain.yaml's compiled formulas against the hand-written numba
kernel it replaced (kept here, verbatim, as the baseline), on the telco demo's seven features.

A call derives one customer (what a decision does) or a batch (training, campaign plans). Both kernels
get the same float32 vectors, are warmed up alike and take turns (200 calls each) so that a busy spell
hits them alike; their outputs are checked equal before timing.

    python loadtest/bench_models.py --derived [--calls N] [--batch N]

Model shapes (``--shapes``): One propensity model across all actions vs one model per action type, on the synthetic world.

Same simulated responses, same time-based holdout (latest 20%), same LightGBM parameters and rounds
per model. Reports holdout AUC, log loss, mean |calibration error| and rank correlation with the
hidden truth overall and per type (actions seen in training), training time, and separately how well
each shape ranks actions it never saw (three catalog actions dropped from the training rows, kept in
the holdout).

    python loadtest/bench_models.py --shapes [--customers N] [--rounds R] [--json FILE]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from harness import args as common  # noqa: E402
from harness.results import write_json  # noqa: E402

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
    common.add_modes(ap, {"--derived": "the derived-feature kernels",
                          "--shapes": "one model across actions vs one per action type"})
    ap.add_argument("--repeats", type=int, default=5000, help="max timed calls per scorer and batch size")
    ap.add_argument("--budget", type=float, default=3.0, help="max seconds per scorer and batch size")
    ap.add_argument("--lleaves-python", help="python of a virtualenv with lleaves (timed in a subprocess)")
    ap.add_argument("--calls", type=int, default=20_000, help="--derived: single-customer calls per kernel")
    ap.add_argument("--batch", type=int, default=100_000, help="--derived: customers in one batch call")
    common.add_customers(ap, 50_000)
    ap.add_argument("--rounds", type=int, default=200, help="--shapes: boosting rounds per model")
    ap.add_argument("--learning-rate", type=float, help="--shapes: default the service's (engine.models.training.PARAMS)")
    common.add_json(ap, "also write results to this JSON file")
    ap.add_argument("--lleaves-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.lleaves_worker:
        return lleaves_worker(args.lleaves_worker, args.repeats, args.budget)
    if args.derived:
        return derived(args)
    if args.shapes:
        return shapes(args)
    return scorers(args)


def scorers(args: argparse.Namespace) -> int:
    import lightgbm as lgb
    import numba

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
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {
            "env": {"python": platform.python_version(), "lightgbm": lgb.__version__,
                    "numba": numba.__version__, "numpy": np.__version__, "cpus": os.cpu_count()},
            "model": {"row_split_share": row_split_share, "channel_split_share": channel_split_share,
                      "bind_ms": bind_s * 1e3},
            "max_abs_diff_vs_booster": max_diff, "notes": notes, "results": results,
        })
    return 0



# --- derived features -------------------------------------------------------------------------------------

def kernels() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The hand-written numba kernel as it was before domain.yaml (engine/models/derived.py, kept here
    verbatim as the baseline) and the service's kernel, on the telco demo's features. Built here, not at
    import: the lleaves worker's interpreter has no numba."""
    import numba

    from engine.models.derived import derive
    from engine.sim.telco import DERIVED, NUMERIC, SCHEMA

    index = {name: i for i, name in enumerate(NUMERIC)}
    usage, allowance_at = index["data_usage_gb"], index["data_allowance_gb"]
    days, purchases, revenue, margin = (index["days_since_last_purchase"], index["purchases_12m"], index["revenue_12m"],
                                        index["margin_12m"])
    recency_days = np.array([365.0, 180.0, 90.0, 30.0])
    frequency = np.array([1.0, 3.0, 5.0, 8.0])
    monetary = np.array([200.0, 500.0, 900.0, 1500.0])

    @numba.njit(nogil=True)
    def score_up(x: float, cuts: np.ndarray) -> float:
        s = 1.0
        for c in cuts:
            if x >= c:
                s += 1.0
        return s

    @numba.njit(nogil=True)
    def score_down(x: float, cuts: np.ndarray) -> float:
        s = 1.0
        for c in cuts:
            if x <= c:
                s += 1.0
        return s

    @numba.njit(nogil=True)
    def derive_rows(num: np.ndarray, out: np.ndarray) -> None:
        for i in range(num.shape[0]):
            allowance = num[i, allowance_at]
            out[i, 0] = num[i, usage] / allowance if allowance > 0 else 0.0
            r = score_down(num[i, days], recency_days)
            f = score_up(num[i, purchases], frequency)
            m = score_up(num[i, revenue], monetary)
            out[i, 1] = r
            out[i, 2] = f
            out[i, 3] = m
            out[i, 4] = r + f + m
            out[i, 5] = np.exp(-max(num[i, days], 0.0) / 90.0)
            out[i, 6] = (r + f + m) / 15.0 * 0.5 + min(max(num[i, margin], 0.0) / 1000.0, 1.0) * 0.5

    def hand_written(num: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(np.asarray(num, dtype=np.float64))
        out = np.empty((rows.shape[0], len(DERIVED)), dtype=np.float64)
        derive_rows(rows, out)
        return out[0] if np.ndim(num) == 1 else out

    def declared(num: np.ndarray) -> np.ndarray:
        return derive(num, SCHEMA, 1.8e9)

    return {"hand-written (baseline)": hand_written, "domain.yaml program": declared}


def derived(args: argparse.Namespace) -> int:
    from engine.sim.telco import DERIVED, NUMERIC

    rng = np.random.default_rng(1)
    batch = rng.uniform(-50, 2000, size=(args.batch, len(NUMERIC))).astype(np.float32)
    batch[::5, NUMERIC.index("data_allowance_gb")] = 0.0
    by_name = kernels()
    hand_written, declared = by_name.values()
    if not np.allclose(hand_written(batch), declared(batch), rtol=1e-15, atol=0):
        raise SystemExit("the kernels disagree")
    single: dict[str, list[int]] = {name: [] for name in by_name}
    bulk: dict[str, list[float]] = {name: [] for name in by_name}
    rows = batch[: args.calls]
    turn = 200
    for start in range(0, args.calls, turn):
        for name, fn in by_name.items():
            times = single[name]
            for row in rows[start: start + turn]:
                t0 = time.perf_counter_ns()
                fn(row)
                times.append(time.perf_counter_ns() - t0)
    for _ in range(5):
        for name, fn in by_name.items():
            began = time.perf_counter()
            fn(batch)
            bulk[name].append(time.perf_counter() - began)
    base = "hand-written (baseline)"
    print(f"derived features ({len(DERIVED)} of the telco demo), {args.calls} single-customer calls per kernel "
          f"in turns of {turn}; batch of {args.batch} customers, 5 calls each")
    print(f"{'kernel':26} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'vs base p50':>11} {'batch Mrows/s':>14}")
    p50_base = np.percentile(single[base], 50)
    for name in by_name:
        t = np.array(single[name]) / 1000.0
        p50, p99, p999 = np.percentile(t, [50, 99, 99.9])
        rate = args.batch / min(bulk[name]) / 1e6
        print(f"{name:26} {p50:8.2f} {p99:8.2f} {p999:9.2f} {p50 * 1000 / p50_base:10.2f}x {rate:14.1f}")
    return 0



# --- model shapes -----------------------------------------------------------------------------------------


def calibration_error(y: np.ndarray, p: np.ndarray) -> float:
    """Row-weighted mean |observed - predicted| over the calibration bins."""
    from engine.models.training import calibration

    table = calibration(y, p)
    return float(sum(b["rows"] * abs(b["observed"] - b["predicted"]) for b in table) / max(1, len(y)))


def shapes(args: argparse.Namespace) -> int:
    import lightgbm as lgb

    from engine.models.model_input import model_input
    from engine.models.training import PARAMS, auc, logloss, spearman
    from engine.rules.runtime import load_and_compile
    from engine.sim.telco import ACTION_TYPES, SCHEMA
    from engine.sim.training_data import simulate_responses
    from engine.sim.world import generate

    layout = model_input(SCHEMA)
    categorical_features, features = layout.categorical_features, layout.features
    action_col, type_col = features.index("action"), features.index("action_type")
    if args.learning_rate is None:
        args.learning_rate = PARAMS["learning_rate"]
    rules = load_and_compile(ROOT / "rules")
    actions = rules.ruleset.actions
    rules.close()
    data = simulate_responses(generate(args.customers, 7), actions)
    train_mask, hold = data.split()
    # Three actions never seen in training: how does each shape rank a new action?
    rng = np.random.default_rng(5)
    unseen = rng.choice(len(actions), 3, replace=False)
    train_mask &= ~np.isin(data.x[:, action_col], unseen)
    cats = [features.index(c) for c in categorical_features]
    params = {**PARAMS, "learning_rate": args.learning_rate}
    y, types = data.y, data.x[:, type_col]

    preds, seconds = {}, {}
    t0 = time.perf_counter()
    one = lgb.train(params, lgb.Dataset(data.x[train_mask], y[train_mask], categorical_feature=cats), args.rounds)
    seconds["one model across actions"] = time.perf_counter() - t0
    preds["one model across actions"] = one.predict(data.x[hold])
    per = np.empty(hold.sum())
    t0 = time.perf_counter()
    for code in range(len(ACTION_TYPES)):
        sel = train_mask & (types == code)
        if not sel.any():
            continue
        booster = lgb.train(params, lgb.Dataset(data.x[sel], y[sel], categorical_feature=cats), args.rounds)
        per[types[hold] == code] = booster.predict(data.x[hold][types[hold] == code])
    seconds["one model per action type"] = time.perf_counter() - t0
    preds["one model per action type"] = per

    new = np.isin(data.x[hold, action_col], unseen)
    yh_all, truth_all = y[hold], data.p_true[hold]
    yh, truth, th = yh_all[~new], truth_all[~new], types[hold][~new]
    report = {}
    for name, p_all in preds.items():
        p = p_all[~new]
        row = {"auc": auc(yh, p), "logloss": logloss(yh, p), "calibration_error": calibration_error(yh, p),
               "rank_correlation_with_truth": spearman(p, truth), "train_seconds": seconds[name],
               "unseen_actions_rank_correlation": spearman(p_all[new], truth_all[new]),
               "unseen_actions_logloss": logloss(yh_all[new], p_all[new]), "by_type": {}}
        for code, t in enumerate(ACTION_TYPES):
            s = th == code
            row["by_type"][t] = {"rows": int(s.sum()), "auc": auc(yh[s], p[s]), "logloss": logloss(yh[s], p[s]),
                                 "calibration_error": calibration_error(yh[s], p[s]),
                                 "rank_correlation_with_truth": spearman(p[s], truth[s])}
        report[name] = row

    print(f"synthetic world: {args.customers:,} customers, {len(y):,} simulated responses, {len(actions)} actions, "
          f"{args.rounds} rounds per model; holdout = latest 20% ({hold.sum():,} rows); "
          f"learning rate {args.learning_rate}; {len(unseen)} actions dropped from training "
          f"({new.sum():,} holdout rows, scored apart)")
    print(f"\n{'':28}{'AUC':>8}{'logloss':>9}{'cal.err':>9}{'rank-corr':>10}{'unseen rc':>10}{'unseen ll':>10}{'train s':>9}")
    for name, r in report.items():
        print(f"{name:28}{r['auc']:>8.4f}{r['logloss']:>9.4f}{r['calibration_error']:>9.4f}"
              f"{r['rank_correlation_with_truth']:>10.4f}{r['unseen_actions_rank_correlation']:>10.4f}"
              f"{r['unseen_actions_logloss']:>10.4f}{r['train_seconds']:>9.1f}")
    print("\nper action type: AUC / calibration error (one model | per type)")
    for t in ACTION_TYPES:
        a, b = report["one model across actions"]["by_type"][t], report["one model per action type"]["by_type"][t]
        print(f"  {t:12} rows {a['rows']:>6}  auc {a['auc']:.4f} | {b['auc']:.4f}   "
              f"cal.err {a['calibration_error']:.4f} | {b['calibration_error']:.4f}")
    write_json(args.json, report)
    return 0



if __name__ == "__main__":
    sys.exit(main())
