"""``nba report``: outcomes per action and action type, and the lift of the decision policy over the
control group, from the decision and response streams.

A decision's value is the summed value of its accepted actions (each (decision, action) accepted once,
however often the acceptance was recorded). Lift compares the mean value per decision of the decision
policy with the control group's: ratio - 1, with a 95% confidence interval from the delta method on the
log of the ratio of two independent means (normal approximation; fine for hundreds of decisions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import redis

from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM, StreamEntries

Z95 = 1.959964


@dataclass
class Tally:
    presented: int = 0
    accepted: int = 0
    value: float = 0.0

    def row(self) -> dict:
        rate = self.accepted / self.presented if self.presented else 0.0
        return {"presented": self.presented, "accepted": self.accepted, "acceptance_rate": round(rate, 4),
                "value": round(self.value, 2)}


@dataclass
class Arm:
    values: list[float] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)

    def summary(self) -> dict:
        v = np.asarray(self.values, dtype=float)
        n = len(v)
        return self.tally.row() | {
            "decisions": n,
            "value_per_1000_decisions": round(1000 * float(v.mean()), 1) if n else 0.0,
        }


def _read(client: redis.Redis, stream: str, since: str, chunk: int = 10_000):
    start = since
    while True:
        batch = cast(StreamEntries, client.xrange(stream, min=start, max="+", count=chunk))
        if not batch:
            return
        for entry_id, fields in batch:
            yield entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}
        last = batch[-1][0].decode()
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"
        if len(batch) < chunk:
            return


def lift_interval(treated: np.ndarray, control: np.ndarray) -> dict:
    """Lift of mean(treated) over mean(control), as ratio - 1 with a 95% CI (delta method on the log)."""
    nt, nc = len(treated), len(control)
    if nt < 2 or nc < 2:
        return {"lift": None, "ci95": None, "note": "needs at least 2 decisions in each group"}
    mt, mc = float(treated.mean()), float(control.mean())
    if mt <= 0 or mc <= 0:
        return {"lift": None, "ci95": None, "note": "no accepted value in one group"}
    se = math.sqrt(treated.var(ddof=1) / (nt * mt * mt) + control.var(ddof=1) / (nc * mc * mc))
    ratio = mt / mc
    diff_se = math.sqrt(treated.var(ddof=1) / nt + control.var(ddof=1) / nc)
    return {
        "lift": round(ratio - 1, 4),
        "ci95": [round(ratio * math.exp(-Z95 * se) - 1, 4), round(ratio * math.exp(Z95 * se) - 1, 4)],
        "ratio": round(ratio, 3),
        "value_per_1000_difference": round(1000 * (mt - mc), 1),
        "value_per_1000_difference_ci95": [round(1000 * (mt - mc - Z95 * diff_se), 1),
                                           round(1000 * (mt - mc + Z95 * diff_se), 1)],
    }


def build_report(client: redis.Redis, since: str = "-", customer_prefix: str = "",
                 values: dict[str, float] | None = None, types: dict[str, str] | None = None) -> dict:
    """The report over decisions logged from stream id ``since`` (and responses to them)."""
    values, types = values or {}, types or {}
    decisions: dict[str, tuple[list[str], list[str], list[float], bool]] = {}
    models: dict[str, dict[str, int]] = {}  # model version (role) -> decisions, of which explored
    for _, d in _read(client, DECISIONS_STREAM, since):
        if customer_prefix and not d.get("customer_id", "").startswith(customer_prefix):
            continue
        actions = [a for a in d.get("actions", "").split(",") if a]
        kinds = d.get("types", "").split(",") if d.get("types") else [types.get(a, "?") for a in actions]
        vals = ([float(x) for x in d["values"].split(",")] if d.get("values")
                else [values.get(a, 0.0) for a in actions])
        decisions[d["decision_id"]] = (actions, kinds, vals, d.get("control") == "1")
        model = models.setdefault(f"{d.get('model_version', '?')} ({d.get('model_role') or 'champion'})",
                                  {"decisions": 0, "explored": 0})
        model["decisions"] += 1
        model["explored"] += d.get("explored") == "1"
    accepted: set[tuple[str, str]] = set()
    for _, r in _read(client, RESPONSES_STREAM, since):
        if r.get("outcome") == "accepted" and r.get("decision_id") in decisions:
            accepted.add((r["decision_id"], r["action_id"]))
    by_action: dict[str, Tally] = {}
    by_type: dict[str, Tally] = {}
    arms = {"decision_policy": Arm(), "control": Arm()}
    for decision_id, (actions, kinds, vals, is_control) in decisions.items():
        arm = arms["control" if is_control else "decision_policy"]
        total = 0.0
        for action_id, kind, value in zip(actions, kinds, vals):
            hit = (decision_id, action_id) in accepted
            for tally in (by_action.setdefault(action_id, Tally()), by_type.setdefault(kind, Tally()), arm.tally):
                tally.presented += 1
                tally.accepted += hit
                tally.value += value if hit else 0.0
            total += value if hit else 0.0
        arm.values.append(total)
    treated = np.asarray(arms["decision_policy"].values)
    control = np.asarray(arms["control"].values)
    return {
        "since": since,
        "decisions": len(decisions),
        "responses_accepted": len(accepted),
        "by_action": {a: t.row() for a, t in sorted(by_action.items(), key=lambda kv: -kv[1].value)},
        "by_type": {k: t.row() for k, t in sorted(by_type.items(), key=lambda kv: -kv[1].value)},
        "policy": {name: arm.summary() for name, arm in arms.items()},
        "lift": lift_interval(treated, control),
        "models": models,
        "exploration": {"decisions": (explored := sum(m["explored"] for m in models.values())),
                        "share": explored / len(decisions) if decisions else 0.0},
    }


def format_report(report: dict) -> str:
    lines = [f"{report['decisions']} decisions since {report['since']}, {report['responses_accepted']} accepted"]
    header = f"{'':32} {'presented':>10} {'accepted':>9} {'rate':>7} {'value':>12}"
    for title, rows in (("action", report["by_action"]), ("action type", report["by_type"])):
        lines += ["", f"{'by ' + title:32} {header[33:]}"]
        for name, r in rows.items():
            lines.append(f"{name:32} {r['presented']:>10} {r['accepted']:>9} {r['acceptance_rate']:>7.2%} "
                         f"{r['value']:>12,.0f}")
    lines += ["", f"{'policy':32} {'decisions':>10} {'accepted':>9} {'rate':>7} {'value/1000 dec':>15}"]
    for name, r in report["policy"].items():
        lines.append(f"{name:32} {r['decisions']:>10} {r['accepted']:>9} {r['acceptance_rate']:>7.2%} "
                     f"{r['value_per_1000_decisions']:>15,.1f}")
    lines += ["", f"{'model (role)':32} {'decisions':>10} {'explored':>9}"]
    for name, m in report["models"].items():
        lines.append(f"{name:32} {m['decisions']:>10} {m['explored']:>9}")
    lines.append(f"exploration: {report['exploration']['share']:.1%} of decisions ranked with a Thompson sample")
    lift = report["lift"]
    if lift.get("lift") is None:
        lines.append(f"lift over control: n/a ({lift.get('note')})")
    else:
        lo, hi = lift["ci95"]
        dlo, dhi = lift["value_per_1000_difference_ci95"]
        lines.append(f"lift over control: {lift['lift']:+.1%} accepted value per decision "
                     f"(95% CI {lo:+.1%} .. {hi:+.1%}); x{lift['ratio']:.2f}; "
                     f"{lift['value_per_1000_difference']:+,.1f} per 1,000 decisions (95% CI {dlo:+,.1f} .. {dhi:+,.1f})")
    return "\n".join(lines)
