"""The Grafana dashboard and alert rules only query metrics the service really exposes."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY, generate_latest

import engine.metrics  # noqa: F401  (registers every metric)

from .conftest import REPO

MONITORING = REPO / "loadtest" / "monitoring"


def _exposed() -> set[str]:
    text = generate_latest(REGISTRY).decode()
    return set(re.findall(r"^# TYPE (\S+)", text, re.M))


def _queried(text: str) -> set[str]:
    names = set(re.findall(r"\b(nba_[a-z_]+)", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_dashboard_and_alerts_use_existing_metrics() -> None:
    exposed = _exposed()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    alerts = (MONITORING / "nba-alerts.yml").read_text()
    for name in _queried(exprs) | _queried(alerts):
        assert name in exposed or name.removesuffix("_total") in exposed, f"{name} is not a metric"
    assert len(dashboard["panels"]) >= 10
