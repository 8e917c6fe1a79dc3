"""Per-call latency of CompiledModel.predict vs lightgbm.Booster.predict (and lleaves if installed).

Trains one binary model (200 trees, 31 leaves, 40 features of which 5 categorical) on synthetic data,
checks that every scorer agrees with Booster.predict, then times many single calls per batch size.

    python loadtest/bench_scorer.py [--repeats N] [--budget SECONDS] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.scorer import CompiledModel  # noqa: E402

BATCH_SIZES = (1, 30, 300, 3000)
N_FEATURES = 40
CATEGORICAL = (35, 36, 37, 38, 39)
CARDINALITY = (3, 5, 7, 12, 40)  # like the service's plan/segment/... levels and an action id
POOL_ROWS = 60_000


def make_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic propensity data: numeric features with NaNs and zeros, a few categorical ones."""
    X = rng.normal(size=(n, N_FEATURES))
    X[:, :10] = np.round(X[:, :10] * 3)  # some features with many exact zeros
    X[rng.random(X.shape) < 0.05] = np.nan
    for j, card in zip(CATEGORICAL, CARDINALITY, strict=True):
        X[:, j] = rng.integers(0, card, n)
    logit = np.nan_to_num(X[:, 10:20]) @ rng.normal(size=10) * 0.4
    logit += np.sin(np.nan_to_num(X[:, 20])) + 0.3 * np.nan_to_num(X[:, 0]) * np.nan_to_num(X[:, 1])
    logit += 0.5 * (rng.normal(size=40)[X[:, 39].astype(int)] + rng.normal(size=12)[X[:, 38].astype(int)])
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
    return X, y


def train(rng: np.random.Generator) -> lgb.Booster:
    X, y = make_data(rng, 20_000)
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.05, "min_data_in_leaf": 20,
              "verbose": -1, "seed": 1}
    return lgb.train(params, lgb.Dataset(X, y, categorical_feature=list(CATEGORICAL)), 200)


def time_calls(fn: Callable[[np.ndarray], object], batches: list[np.ndarray], repeats: int,
               budget_s: float) -> np.ndarray:
    """Per-call wall times in microseconds: up to `repeats` calls, stopping after `budget_s`.

    Calls cycle through distinct batches: re-scoring one batch would let the CPU's branch predictor
    learn its exact paths through the trees and report optimistic tree-walk times.
    """
    for i in range(min(20, repeats)):
        fn(batches[i % len(batches)])
    times = np.empty(repeats, dtype=np.float64)
    deadline = time.perf_counter() + budget_s
    n = 0
    while n < repeats:
        X = batches[n % len(batches)]
        t0 = time.perf_counter_ns()
        fn(X)
        times[n] = (time.perf_counter_ns() - t0) / 1e3
        n += 1
        if time.perf_counter() > deadline:
            break
    return times[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5000, help="max timed calls per scorer and batch size")
    ap.add_argument("--budget", type=float, default=3.0, help="max seconds per scorer and batch size")
    ap.add_argument("--json", type=Path, help="also write results to this JSON file")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(42)
    t0 = time.perf_counter()
    booster = train(rng)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = CompiledModel.from_booster(booster)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.warmup()
    warmup_s = time.perf_counter() - t0

    X_pool, _ = make_data(rng, POOL_ROWS)
    X_pool[rng.random(X_pool.shape) < 0.01] = -1.0  # negative categories too
    X_pool[:, 39][rng.random(POOL_ROWS) < 0.01] = 45.0  # unseen category
    X_pool = np.ascontiguousarray(X_pool)
    X_all = X_pool[: max(BATCH_SIZES)]
    reference = booster.predict(X_all)
    cat_nodes = float((model._decision_type & 1).mean())
    max_diff = {"numba": float(np.abs(model.predict(X_all) - reference).max())}

    scorers: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "numba": model.predict,
        "lightgbm": booster.predict,
        "lightgbm_1thread": lambda X: booster.predict(X, num_threads=1),
    }
    notes: list[str] = []
    try:
        import lleaves
    except ImportError:
        notes.append("lleaves not installed: skipped (pip install lleaves to include it)")
    else:
        version = importlib.metadata.version("lleaves")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.txt"
                booster.save_model(str(path))
                lmodel = lleaves.Model(model_file=str(path))
                t0 = time.perf_counter()
                lmodel.compile()
                compile_s = time.perf_counter() - t0
        except Exception as exc:  # e.g. lleaves built against an older llvmlite API
            notes.append(f"lleaves {version} is installed but failed to compile the model: "
                         f"{type(exc).__name__}: {exc}; skipped")
        else:
            notes.append(f"lleaves {version}: LLVM compile {compile_s:.1f}s; timed with n_jobs=1")
            scorers["lleaves"] = lambda X: lmodel.predict(X, n_jobs=1)
            max_diff["lleaves"] = float(np.abs(lmodel.predict(X_all, n_jobs=1) - reference).max())

    results: list[dict] = []
    for batch in BATCH_SIZES:
        batches = [X_pool[i:i + batch] for i in range(0, POOL_ROWS - batch + 1, batch)]
        for name, fn in scorers.items():
            times = time_calls(fn, batches, args.repeats, args.budget)
            p50, p99, p999 = np.percentile(times, [50, 99, 99.9])
            results.append({"scorer": name, "batch": batch, "calls": len(times), "p50_us": p50,
                            "p99_us": p99, "p999_us": p999, "rows_per_s_at_p50": batch / p50 * 1e6})

    print(f"python {platform.python_version()}, lightgbm {lgb.__version__}, numba {numba.__version__}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs ({platform.machine()})")
    print(f"model: 200 trees, 31 leaves, {N_FEATURES} features ({len(CATEGORICAL)} categorical); "
          f"{cat_nodes:.0%} of splits categorical; train {train_s:.1f}s, build {build_s * 1e3:.0f}ms, "
          f"warmup (JIT or cache load) {warmup_s * 1e3:.0f}ms")
    print(f"each call scores a different slice of a {POOL_ROWS:,}-row pool (float64, C-order)")
    print("max |score - Booster.predict| on 3000 rows: "
          + ", ".join(f"{k} {v:.1e}" for k, v in max_diff.items()))
    for note in notes:
        print(note)
    print()
    header = (f"{'batch':>5}  {'scorer':<17}{'calls':>6}{'p50 us':>11}{'p99 us':>11}{'p99.9 us':>11}"
              f"{'rows/s @p50':>14}{'vs numba':>10}")
    print(header)
    print("-" * len(header))
    for batch in BATCH_SIZES:
        rows = [r for r in results if r["batch"] == batch]
        numba_p50 = next(r["p50_us"] for r in rows if r["scorer"] == "numba")
        for r in rows:
            r["p50_ratio_vs_numba"] = r["p50_us"] / numba_p50
            print(f"{batch:>5}  {r['scorer']:<17}{r['calls']:>6}{r['p50_us']:>11.1f}{r['p99_us']:>11.1f}"
                  f"{r['p999_us']:>11.1f}{r['rows_per_s_at_p50']:>14,.0f}{r['p50_ratio_vs_numba']:>9.1f}x")
    print("\n'vs numba' = scorer p50 / numba p50 (Booster.predict row: the LightGBM/numba speed-up).")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "env": {"python": platform.python_version(), "lightgbm": lgb.__version__,
                    "numba": numba.__version__, "numpy": np.__version__, "cpus": os.cpu_count()},
            "max_abs_diff_vs_booster": max_diff, "notes": notes, "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
