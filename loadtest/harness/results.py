"""Results of the load tools: percentile summaries (p50/p99/p99.9), ratio lines against a baseline, aligned
tables, the load-average stamp and JSON files."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
LABEL = {"p50": "p50", "p90": "p90", "p99": "p99", "p999": "p99.9", "max": "max"}


def summary(values: Any, unit: str = "ms", keys: Sequence[str] = ("p50", "p99", "p999"), digits: int | None = 3,
            scale: float = 1.0) -> dict[str, Any]:
    """Percentiles of ``values`` x ``scale`` (NaN: a failed call, counted in ``errors``) as ``p50_<unit>``...;
    ``keys`` may add ``p90`` and ``max``; ``calls`` counts the answered ones."""
    arr = np.asarray(values, dtype=float) * scale
    good = arr[~np.isnan(arr)]
    out: dict[str, Any] = {}
    for key in keys:
        value = (float(good.max()) if key == "max" else float(np.percentile(good, QUANTILES[key]))) if good.size \
            else float("inf")
        out[f"{key}_{unit}"] = round(value, digits) if digits is not None else value
    out["calls"] = int(good.size)
    out["errors"] = int(arr.size - good.size)
    return out


def per_round(parts: Iterable[Any], key: str = "p99", unit: str = "ms") -> list[float]:
    """One percentile of each round's values (NaN ignored)."""
    return [round(float(np.nanpercentile(np.asarray(p, dtype=float), QUANTILES[key])), 3) for p in parts]


def ratios(a: Mapping[str, float], b: Mapping[str, float], keys: Sequence[str] = ("p50", "p99", "p999"),
           unit: str = "ms") -> dict[str, float]:
    """``a / b`` per percentile (``b`` the baseline)."""
    return {k: round(a[f"{k}_{unit}"] / b[f"{k}_{unit}"], 3) for k in keys}


def ratio_line(title: str, r: Mapping[str, float]) -> str:
    return f"{title}: " + ", ".join(f"{LABEL.get(k, k)} x{v:.2f}" for k, v in r.items())


def table(rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = ("p50", "p99", "p999"), unit: str = "ms",
          title: str = "", extra: Sequence[str] = ("calls", "errors"), width: int = 0) -> str:
    """An aligned table: one row per name, the percentile columns, then ``extra`` columns."""
    width = max([width, len(title), *(len(n) for n in rows)])
    head = f"{title:{width}} " + " ".join(f"{LABEL.get(k, k) + ' ' + unit:>10}" for k in keys) + \
        "".join(f" {e:>8}" for e in extra)
    lines = [head]
    for name, r in rows.items():
        lines.append(f"{name:{width}} " + " ".join(f"{r[f'{k}_{unit}']:10.3f}" for k in keys)
                     + "".join(f" {r.get(e, ''):>8}" for e in extra))
    return "\n".join(lines)


def loadavg() -> float:
    return os.getloadavg()[0]


def stamp() -> str:
    """``HH:MM:SS, load average X``: printed with every round so a noisy spell shows."""
    return f"{time.strftime('%H:%M:%S')}, load average {loadavg():.2f}"


def write_json(path: str | Path | None, result: Any) -> None:
    """``result`` as indented JSON at ``path`` (nothing when no path), with the load average at the end."""
    if path:
        if isinstance(result, dict):
            result = {**result, "load_average_at_end": round(loadavg(), 2)}
        Path(path).write_text(json.dumps(result, indent=2, default=str))
