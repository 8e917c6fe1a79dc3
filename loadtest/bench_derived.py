"""Derived features: the kernel that runs domain.yaml's compiled formulas against the hand-written numba
kernel it replaced (kept here, verbatim, as the baseline), on the telco demo's seven features.

A call derives one customer (what a decision does) or a batch (training, campaign plans). Both kernels
get the same float32 vectors, are warmed up alike and take turns (200 calls each) so that a busy spell
hits them alike; their outputs are checked equal before timing.

    python loadtest/bench_derived.py [--calls N] [--batch N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models.derived import derive  # noqa: E402
from engine.sim.telco import DERIVED, NUMERIC, SCHEMA  # noqa: E402

_I = {name: i for i, name in enumerate(NUMERIC)}
_USAGE, _ALLOWANCE = _I["data_usage_gb"], _I["data_allowance_gb"]
_DAYS, _PURCHASES, _REVENUE, _MARGIN = (_I["days_since_last_purchase"], _I["purchases_12m"], _I["revenue_12m"],
                                        _I["margin_12m"])
_RECENCY_DAYS = np.array([365.0, 180.0, 90.0, 30.0])
_FREQUENCY = np.array([1.0, 3.0, 5.0, 8.0])
_MONETARY = np.array([200.0, 500.0, 900.0, 1500.0])


@numba.njit(cache=True, nogil=True)
def _score_up(x: float, cuts: np.ndarray) -> float:
    s = 1.0
    for c in cuts:
        if x >= c:
            s += 1.0
    return s


@numba.njit(cache=True, nogil=True)
def _score_down(x: float, cuts: np.ndarray) -> float:
    s = 1.0
    for c in cuts:
        if x <= c:
            s += 1.0
    return s


@numba.njit(cache=True, nogil=True)
def derive_rows(num: np.ndarray, out: np.ndarray) -> None:
    """The hand-written kernel as it was before domain.yaml (engine/models/derived.py)."""
    for i in range(num.shape[0]):
        allowance = num[i, _ALLOWANCE]
        out[i, 0] = num[i, _USAGE] / allowance if allowance > 0 else 0.0
        r = _score_down(num[i, _DAYS], _RECENCY_DAYS)
        f = _score_up(num[i, _PURCHASES], _FREQUENCY)
        m = _score_up(num[i, _REVENUE], _MONETARY)
        out[i, 1] = r
        out[i, 2] = f
        out[i, 3] = m
        out[i, 4] = r + f + m
        out[i, 5] = np.exp(-max(num[i, _DAYS], 0.0) / 90.0)
        out[i, 6] = (r + f + m) / 15.0 * 0.5 + min(max(num[i, _MARGIN], 0.0) / 1000.0, 1.0) * 0.5


def hand_written(num: np.ndarray) -> np.ndarray:
    rows = np.atleast_2d(np.asarray(num, dtype=np.float64))
    out = np.empty((rows.shape[0], len(DERIVED)), dtype=np.float64)
    derive_rows(rows, out)
    return out[0] if np.ndim(num) == 1 else out


def declared(num: np.ndarray) -> np.ndarray:
    return derive(num, SCHEMA, 1.8e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="single-customer calls per kernel")
    parser.add_argument("--batch", type=int, default=100_000, help="customers in one batch call")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    batch = rng.uniform(-50, 2000, size=(args.batch, len(NUMERIC))).astype(np.float32)
    batch[::5, _ALLOWANCE] = 0.0
    assert np.allclose(hand_written(batch), declared(batch), rtol=1e-15, atol=0), "the kernels disagree"
    kernels = {"hand-written (baseline)": hand_written, "domain.yaml program": declared}
    single: dict[str, list[int]] = {name: [] for name in kernels}
    bulk: dict[str, list[float]] = {name: [] for name in kernels}
    rows = batch[: args.calls]
    turn = 200
    for start in range(0, args.calls, turn):
        for name, fn in kernels.items():
            times = single[name]
            for row in rows[start: start + turn]:
                t0 = time.perf_counter_ns()
                fn(row)
                times.append(time.perf_counter_ns() - t0)
    for _ in range(5):
        for name, fn in kernels.items():
            began = time.perf_counter()
            fn(batch)
            bulk[name].append(time.perf_counter() - began)
    base = "hand-written (baseline)"
    print(f"derived features ({len(DERIVED)} of the telco demo), {args.calls} single-customer calls per kernel "
          f"in turns of {turn}; batch of {args.batch} customers, 5 calls each")
    print(f"{'kernel':26} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'vs base p50':>11} {'batch Mrows/s':>14}")
    p50_base = np.percentile(single[base], 50)
    for name in kernels:
        t = np.array(single[name]) / 1000.0
        p50, p99, p999 = np.percentile(t, [50, 99, 99.9])
        rate = args.batch / min(bulk[name]) / 1e6
        print(f"{name:26} {p50:8.2f} {p99:8.2f} {p999:9.2f} {p50 * 1000 / p50_base:10.2f}x {rate:14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
