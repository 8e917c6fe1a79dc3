"""The customer feature schema: what a profile holds, in what order, with which types.

Numeric features are packed into one float32 vector in Redis (order below). Categorical features hold
one level from a fixed list; set features hold members of a fixed list. Derived features are computed
per decision from the packed vector (see ``derived.py``) and are read-only for seeding.

The schema has a version; a profile written under another version is treated as a cold start and the
decision is flagged ``degraded`` rather than misreading the packed bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

SCHEMA_VERSION = 1

CHANNELS: tuple[str, ...] = ("call_center", "web", "mobile_app", "email", "sms", "branch", "pos")
# Channels where the customer comes to us; email and SMS are outbound and need explicit consent.
INBOUND_CHANNELS: tuple[str, ...] = ("call_center", "web", "mobile_app", "branch", "pos")

# Stored numeric features, in packed-vector order.
NUMERIC: tuple[str, ...] = (
    "tenure_months",
    "age",
    "monthly_spend",
    "spend_trend",  # relative change of monthly spend over the last 3 months, e.g. -0.2
    "data_usage_gb",
    "data_allowance_gb",
    "voice_minutes",
    "device_age_months",
    "contract_months_left",
    "num_lines",
    "new_lines_30d",
    "complaints_90d",
    "failed_payments_90d",
    "support_calls_90d",
    "open_cases",
    "days_since_last_purchase",
    "purchases_12m",
    "revenue_12m",
    "margin_12m",
    "churn_risk",
    "credit_score",
    "tv_hours_week",
    "roaming_days_90d",
    "nps",
)

# Computed per decision from the stored vector; usable in rules and by the model.
DERIVED: tuple[str, ...] = (
    "data_usage_ratio",
    "recency_score",
    "frequency_score",
    "monetary_score",
    "rfm_score",
    "recency_decay",
    "value_score",
)

CATEGORICAL: dict[str, tuple[str, ...]] = {
    "plan": ("none", "prepaid", "sim_only", "standard", "unlimited"),
    "segment": ("consumer", "student", "senior", "family", "small_business"),
    "lifecycle_stage": ("prospect", "new", "satisfied", "retained", "loyal", "declining"),
    "value_tier": ("A", "B", "C"),
    "region": ("north", "south", "east", "west", "capital"),
    "device_os": ("none", "ios", "android", "other"),
}

SETS: dict[str, tuple[str, ...]] = {
    "products": (
        "mobile",
        "broadband",
        "fiber",
        "tv",
        "fixed_voice",
        "device_insurance",
        "streaming",
        "cloud_storage",
        "roaming_pack",
        "security_suite",
        "smart_home",
        "family_plan",
    ),
    "consent": CHANNELS,
}


@dataclass(frozen=True)
class FeatureSchema:
    """Names and types the rule language and the model may reference."""

    version: int = SCHEMA_VERSION
    numeric: tuple[str, ...] = NUMERIC
    derived: tuple[str, ...] = DERIVED
    categorical: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(CATEGORICAL))
    sets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(SETS))

    @property
    def numbers(self) -> tuple[str, ...]:
        """Every numeric name a rule may use: stored then derived."""
        return self.numeric + self.derived

    def fingerprint(self) -> str:
        """A short hash that changes whenever names, order or levels change."""
        body = json.dumps(
            {
                "version": self.version,
                "numeric": self.numeric,
                "derived": self.derived,
                "categorical": self.categorical,
                "sets": self.sets,
            },
            sort_keys=True,
        )
        return hashlib.sha256(body.encode()).hexdigest()[:12]


SCHEMA = FeatureSchema()

ACTION_TYPES: tuple[str, ...] = ("upsell", "cross_sell", "bundle", "retention", "acquisition", "service")
