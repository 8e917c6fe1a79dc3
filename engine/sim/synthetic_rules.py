"""A large synthetic rule set in the shape of the demo rules, for benchmarks and equivalence tests.

``write_rules(dir, actions=100, rules=300, customer_rules=60)`` writes ``catalog.yaml`` and
``policies.yaml`` with ``actions`` actions and ``rules`` conditions in all:

- ``customer_rules`` customer-level rules (the durable-rules part): situations, policies and levers
  in the proportions 1 : 5 : 3 (the demo has 10 : 9 : 7 for 37 actions);
- the rest per-action engagement conditions: one ``eligible`` per action (but the fallback, which
  suits everybody), then ``applicable`` and ``suitable`` on actions and on groups until the count
  is reached.

Conditions are drawn like the demo's: product holdings, thresholds at quantiles of the synthetic
customer base (each comparison holds for 20-80% of customers), category levels, consent, channel,
context and triggers, and references to situations. The same arguments always write the same files.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from engine.sim.telco import ACTION_TYPES, CATEGORICAL, CHANNELS, DEMO_RULES, NUMERIC, SETS

PRODUCTS = SETS["products"]
TRIGGERS = ("callback_requested", "retention_save", "payment_failed", "data_cap_near", "complaint_opened")
INTENTS = ("upgrade", "cancel", "billing", "support", "moving")
THRESHOLD_FEATURES = ("tenure_months", "age", "monthly_spend", "data_usage_gb", "device_age_months",
                      "contract_months_left", "num_lines", "purchases_12m", "revenue_12m", "margin_12m",
                      "churn_risk", "credit_score", "tv_hours_week", "roaming_days_90d", "nps",
                      "support_calls_90d", "complaints_90d", "days_since_last_purchase")


def _quantiles(seed: int) -> dict[str, list[float]]:
    from engine.sim.world import generate

    world = generate(4_000, seed)
    out = {}
    for name in THRESHOLD_FEATURES:
        column = world.numeric[:, NUMERIC.index(name)].astype(np.float64)
        out[name] = sorted({round(float(q), 2) for q in np.quantile(column, [0.2, 0.35, 0.5, 0.65, 0.8])})
    return out


class _Conditions:
    def __init__(self, rng: random.Random, quantiles: dict[str, list[float]]):
        self.rng = rng
        self.q = quantiles

    def atom(self, situations: list[str]) -> str:
        rng = self.rng
        kind = rng.random()
        if kind < 0.28:
            product = rng.choice(PRODUCTS)
            return f'holds("{product}")' if rng.random() < 0.5 else f'not holds("{product}")'
        if kind < 0.58:
            name = rng.choice(THRESHOLD_FEATURES)
            return f"{name} {rng.choice(['>=', '<', '>', '<='])} {rng.choice(self.q[name]):g}"
        if kind < 0.72:
            name = rng.choice(list(CATEGORICAL))
            levels = CATEGORICAL[name]
            chosen = rng.sample(levels, rng.randint(1, max(1, len(levels) // 2)))
            if len(chosen) == 1:
                return f'{name} {rng.choice(["==", "!="])} "{chosen[0]}"'
            return f'{name} {rng.choice(["in", "not in"])} [{", ".join(f"{chr(34)}{v}{chr(34)}" for v in chosen)}]'
        if kind < 0.78:
            return rng.choice(["has_consent", f'consent("{rng.choice(CHANNELS)}")'])
        if kind < 0.83:
            return f'channel in [{", ".join(f"{chr(34)}{c}{chr(34)}" for c in rng.sample(CHANNELS, 3))}]'
        if kind < 0.87:
            return f'context.intent == "{rng.choice(INTENTS)}"'
        if kind < 0.90:
            return f'trigger("{rng.choice(TRIGGERS)}")'
        if kind < 0.93:
            return "data_usage_gb - data_allowance_gb > 2"
        if situations:
            name = rng.choice(situations)
            return name if rng.random() < 0.7 else f"not {name}"
        return f'holds("{rng.choice(PRODUCTS)}")'

    def condition(self, situations: list[str], atoms: tuple[int, int]) -> str:
        rng = self.rng
        parts = [self.atom(situations) for _ in range(rng.randint(*atoms))]
        if len(parts) >= 2 and rng.random() < 0.25:  # an alternative inside, as in the demo
            parts[-1] = f"({parts[-1]} or {self.atom(situations)})"
        return " and ".join(parts)


def _targets(rng: random.Random, groups: list[str], ids: list[str]) -> str:
    kind = rng.random()
    if kind < 0.1:
        return "{types: [" + rng.choice(ACTION_TYPES) + "]}"
    if kind < 0.7:
        return "{groups: [" + ", ".join(rng.sample(groups, rng.randint(1, 3))) + "]}"
    return "{actions: [" + ", ".join(rng.sample(ids, rng.randint(1, 4))) + "]}"


def write_rules(target: Path, actions: int = 100, rules: int = 300, customer_rules: int = 60,
                seed: int = 11) -> Path:
    """Write a synthetic ``catalog.yaml`` and ``policies.yaml`` (and the demo's ``domain.yaml``) into
    ``target``; returns ``target``."""
    per_action = rules - customer_rules
    if per_action < actions or customer_rules < 3:
        raise ValueError("need at least one eligible condition per action and 3 customer-level rules")
    rng = random.Random(seed)
    gen = _Conditions(rng, _quantiles(seed))
    n_situations = max(1, customer_rules // 9)
    n_levers = (customer_rules - n_situations) * 3 // 8
    n_policies = customer_rules - n_situations - n_levers

    situations = [f"situation_{i:02d}" for i in range(n_situations)]
    groups = [f"group_{i:02d}" for i in range(max(1, actions // 3))]
    ids = [f"action_{i:03d}" for i in range(actions)]
    # Engagement conditions beyond one eligible per action: applicable / suitable on actions and, one
    # in ten, on groups (never on the fallback action_000 or its group_00).
    extra = per_action - (actions - 1)  # the fallback's "eligible: true" is no condition
    slots = [(kind, "action", i) for i in range(1, actions) for kind in ("applicable", "suitable")]
    slots += [(kind, "group", g) for g in range(1, len(groups)) for kind in ("applicable", "suitable")]
    rng.shuffle(slots)
    group_slots = [s for s in slots if s[1] == "group"][: extra // 10]
    action_slots = [s for s in slots if s[1] == "action"][: extra - len(group_slots)]
    if len(group_slots) + len(action_slots) < extra:
        raise ValueError(f"at most {actions + len(slots)} per-action conditions for {actions} actions")
    chosen = {(kind, owner, i) for kind, owner, i in group_slots + action_slots}

    def stage_lines(owner: str, i: int, indent: str) -> list[str]:
        out = []
        for kind in ("applicable", "suitable"):
            if (kind, owner, i) in chosen:
                out.append(f"{indent}{kind}: '{gen.atom(situations)}'")
        return out

    lines = ["description: synthetic catalog (engine.sim.synthetic_rules)", "fallback:",
             f"  default: {ids[0]}", "actions:"]
    for i, action_id in enumerate(ids):
        kind = ACTION_TYPES[i % len(ACTION_TYPES)]
        channels = CHANNELS if i == 0 else rng.sample(CHANNELS, rng.randint(2, len(CHANNELS)))
        lines += [
            f"  - id: {action_id}",
            f"    name: Synthetic action {i}",
            f"    type: {kind}",
            f"    group: {groups[i % len(groups)]}",
            f"    value: {rng.choice([5, 10, 20, 40, 60, 90, 120, 150, 200])}",
            # the fallback suits everybody
            f"    eligible: '{gen.condition(situations, (1, 2)) if i else 'true'}'",
            *stage_lines("action", i, "    "),
            "    channels:",
            *(f"      {c}: {{text: \"Synthetic offer {i} on {c}\"}}" for c in channels),
        ]
    group_lines = []
    for g, name in enumerate(groups):
        stages = stage_lines("group", g, "    ")
        if stages:  # (never group_00: it holds the fallback, which suits everybody)
            group_lines += [f"  {name}:", *stages]
    if group_lines:
        lines += ["groups:", *group_lines]
    catalog = "\n".join(lines) + "\n"

    lines = ["description: synthetic policies (engine.sim.synthetic_rules)", "triggers: [" + ", ".join(TRIGGERS) + "]",
             "situations:"]
    for k, name in enumerate(situations):
        lines.append(f"  {name}: '{gen.condition(situations[:k], (1, 2))}'")
    lines.append("policies:")
    for k in range(n_policies):
        lines += [f"  - name: policy_{k:03d}", f"    when: '{gen.condition(situations, (3, 4))}'",
                  f"    blocks: {_targets(rng, groups, ids[1:])}", f"    reason: synthetic policy {k}"]
    lines.append("levers:")
    for k in range(n_levers):
        lines += [f"  - name: lever_{k:03d}", f"    when: '{gen.condition(situations, (3, 4))}'",
                  f"    targets: {_targets(rng, groups, ids)}", f"    weight: {rng.choice([0.5, 0.8, 1.2, 1.5, 2.0])}"]
    lines.append("context_weights:")
    lines += [f"  {c}: {{{t}: {rng.choice([0.8, 1.2, 1.5])}}}" for c, t in zip(CHANNELS, ACTION_TYPES)]
    policies = "\n".join(lines) + "\n"

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / "catalog.yaml").write_text(catalog)
    (target / "policies.yaml").write_text(policies)
    (target / "domain.yaml").write_bytes((DEMO_RULES / "domain.yaml").read_bytes())
    return target


def count_rules(ruleset) -> dict[str, int]:
    """How many conditions of each kind a loaded rule set has (for reports; the built-in consent policy
    not counted)."""
    from engine.rules.loader import CONSENT_POLICY

    stages = ("eligible", "applicable", "suitable")
    owners = [*ruleset.actions, *ruleset.groups.values()]
    per_action = sum(getattr(o, stage) is not None for o in owners for stage in stages)
    return {"actions": len(ruleset.actions), "per_action": per_action, "situations": len(ruleset.situations),
            "policies": sum(p.name != CONSENT_POLICY for p in ruleset.policies), "levers": len(ruleset.levers)}
