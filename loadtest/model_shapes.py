"""One propensity model across all actions vs one model per action type, on the synthetic world.

Same simulated responses, same time-based holdout (latest 20%), same LightGBM parameters and rounds
per model. Reports holdout AUC, log loss, mean |calibration error| and rank correlation with the
hidden truth overall and per type (actions seen in training), training time, and separately how well
each shape ranks actions it never saw (three catalog actions dropped from the training rows, kept in
the holdout).

    python loadtest/model_shapes.py [--customers N] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.models.model_input import model_input  # noqa: E402
from engine.sim.telco import SCHEMA  # noqa: E402

CATEGORICAL_FEATURES, FEATURES = model_input(SCHEMA).categorical_features, model_input(SCHEMA).features
from engine.models.training import PARAMS, auc, calibration, logloss, spearman  # noqa: E402
from engine.rules.runtime import load_and_compile  # noqa: E402
from engine.sim.telco import ACTION_TYPES  # noqa: E402
from engine.sim.training_data import simulate_responses  # noqa: E402
from engine.sim.world import generate  # noqa: E402

RULES = Path(__file__).resolve().parents[1] / "rules"
ACTION_COL = FEATURES.index("action")
TYPE_COL = FEATURES.index("action_type")


def calibration_error(y: np.ndarray, p: np.ndarray) -> float:
    """Row-weighted mean |observed - predicted| over the calibration bins."""
    table = calibration(y, p)
    return float(sum(b["rows"] * abs(b["observed"] - b["predicted"]) for b in table) / max(1, len(y)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--learning-rate", type=float, default=PARAMS["learning_rate"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    rules = load_and_compile(RULES)
    actions = rules.ruleset.actions
    rules.close()
    data = simulate_responses(generate(args.customers, 7), actions)
    train_mask, hold = data.split()
    # Three actions never seen in training: how does each shape rank a new action?
    rng = np.random.default_rng(5)
    unseen = rng.choice(len(actions), 3, replace=False)
    train_mask &= ~np.isin(data.x[:, ACTION_COL], unseen)
    cats = [FEATURES.index(c) for c in CATEGORICAL_FEATURES]
    params = {**PARAMS, "learning_rate": args.learning_rate}
    y, types = data.y, data.x[:, TYPE_COL]

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

    new = np.isin(data.x[hold, ACTION_COL], unseen)
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
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
