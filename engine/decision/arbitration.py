"""Arbitration: the admitted actions ordered by priority (propensity x value x weight), at most one
per group, the top N; the channel's fallback when nothing survives; and what the explanation says
about every action that dropped out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import metrics
from engine.decision.choice import pick
from engine.rules.runtime import ActionVerdict, CompiledRules, RuleOutcome


@dataclass
class RankedAction:
    action_id: str
    name: str
    type: str
    group: str
    propensity: float
    value: float
    priority: float
    treatment: dict[str, str]
    reasons: list[str]
    rank: int
    campaign: str = ""  # the campaign the action belongs to, if any


@dataclass
class FunnelEntry:
    action_id: str
    stage: str  # ranked | channel | expired | not_eligible | not_applicable | not_suitable | blocked | contact |
    #             quiet_hours | control_group | one_voice | campaign_dates | campaign_control | budget |
    #             campaign_budget | group | cutoff | no_uplift
    detail: str
    propensity: float = 0.0
    priority: float = 0.0


def fallback_action(rules: CompiledRules, outcome: RuleOutcome, channel: str,
                     funnel: list[FunnelEntry] | None):
    """The channel's fallback for when nothing survives: it skips eligibility (and contact limits),
    never a policy block (consent, fraud hold), so an empty answer is a deliberate one."""
    action = rules.ruleset.fallback_for(channel)
    if action is None or channel not in action.channels:
        return None
    policy = rules.blocked_actions(outcome).get(action.id)
    if policy is not None:
        if funnel is not None:
            funnel.append(FunnelEntry(action.id, "blocked", f"fallback blocked by policy {policy.name}: {policy.reason}"))
        return None
    return action


STAGE_NAMES = {"channel": "channel", "dates": "expired", "eligibility": "not_eligible",
                "applicability": "not_applicable", "suitability": "not_suitable", "policy": "blocked"}


def dropped_detail(v: ActionVerdict) -> str:
    a = v.action
    if v.stage == "channel":
        return "no treatment for this channel"
    if v.stage == "dates" and v.reasons:
        return v.reasons[0]
    if v.stage == "dates":
        return f"valid {a.valid_from or '...'} to {a.valid_to or '...'}"
    if v.stage in ("eligibility", "applicability", "suitability"):
        word = {"eligibility": "eligible", "applicability": "applicable", "suitability": "suitable"}[v.stage]
        return f"{word} is false: {v.reasons[0] if v.reasons else ''}"
    return "; ".join(f"policy {name}: {reason}" for name, reason in zip(v.blocked_by, v.reasons))


def order(admitted: list[ActionVerdict], propensity: np.ndarray,
           explore: np.ndarray | None = None) -> list[tuple[float, float, ActionVerdict]]:
    """priority = propensity x value x weight (context weight x levers), highest first; in an
    exploring decision the priority uses the blended propensity ``explore`` (reported: the model's).

    Ties break on the action id so that the same state always gives the same answer.
    """
    ranking = propensity if explore is None else explore
    return sorted(
        ((r * v.action.value * v.weight, p, v) for v, p, r in zip(admitted, propensity.tolist(), ranking.tolist())),
        key=lambda s: (-s[0], s[2].action.id),
    )


def present_detail(verdict: str, v: ActionVerdict, limits: list, max_actions: int) -> tuple[str, str]:
    if verdict == "group":
        return "group", f"group {v.action.group} already shown"
    if verdict == "budget":
        return "budget", f"daily budget of {v.action.daily_budget} used up"
    if verdict.startswith(("campaign_total:", "campaign_daily:")):
        kind, name = verdict.split(":", 1)
        return "campaign_budget", f"campaign {name} spent its {'total' if kind == 'campaign_total' else 'daily'} budget"
    if verdict.startswith("limit:"):
        _, index, n = verdict.split(":")
        limit = limits[int(index) - 1]
        return "contact", f"contact policy {limit.name}: {limit.reason} ({n} {limit.counts} in {limit.days:g} days)"
    return "cutoff", f"below the top {max_actions}"


def ranked_action(v: ActionVerdict, p: float, priority: float, channel: str, rank: int) -> RankedAction:
    action = v.action
    reasons = [f"propensity {p:.3f} x value {action.value:g}"]
    if v.weight != 1.0:
        reasons.append(f"weight x{v.weight:g}" + (f" (levers: {', '.join(v.levers)})" if v.levers else " (channel)"))
    return RankedAction(
        action_id=action.id, name=action.name, type=action.type, group=action.group,
        propensity=p, value=action.value, priority=priority, treatment=dict(action.channels[channel]),
        reasons=reasons, rank=rank, campaign=action.campaign,
    )


def fallback_ranked(action, channel: str, count: bool = True) -> RankedAction:
    if count:
        metrics.FALLBACKS.labels(channel).inc()
    return RankedAction(
        action_id=action.id, name=action.name, type=action.type, group=action.group,
        propensity=0.0, value=action.value, priority=0.0,
        treatment=dict(action.channels.get(channel, {})),
        reasons=["fallback: no action survived the rules for this channel"], rank=1,
    )


def arbitrate(admitted: list[ActionVerdict], propensity: np.ndarray, channel: str, max_actions: int,
               funnel: list[FunnelEntry] | None) -> list[RankedAction]:
    """Top N of the model's order, one per group, in-process (no contact policies or budgets)."""
    return select(order(admitted, propensity), channel, max_actions, funnel)


def select(scored: list, channel: str, max_actions: int, funnel: list[FunnelEntry] | None,
           epsilon: float = 0.0, draws: list[float] | None = None,
           sets: list[list[int]] | None = None) -> list[RankedAction]:
    """Up to ``max_actions`` of ordered candidates, at most one per group, slot by slot as
    ``engine.decision.choice`` describes (``epsilon`` 0: the top of the order); ``sets`` receives each
    slot's feasible candidates (indexes into ``scored``)."""
    ranked: list[RankedAction] = []
    groups: set[str] = set()
    if epsilon <= 0:  # the ranking's choice at every slot: one pass in order
        for priority, p, v in scored:
            action = v.action
            if funnel is None and len(ranked) >= max_actions:
                break
            if action.group in groups or len(ranked) >= max_actions:
                if funnel is not None:
                    funnel.append(FunnelEntry(action.id, "group", f"group {action.group} already shown", p, priority)
                                  if action.group in groups else
                                  FunnelEntry(action.id, "cutoff", f"below the top {max_actions}", p, priority))
                continue
            groups.add(action.group)
            ranked.append(ranked_action(v, p, priority, channel, len(ranked) + 1))
            if funnel is not None:
                funnel.append(FunnelEntry(action.id, "ranked", f"rank {len(ranked)}", p, priority))
        return ranked
    verdicts: dict[int, str] = {}
    pending = list(range(len(scored)))
    while pending and len(ranked) < max_actions:
        feasible = [k for k in pending if scored[k][2].action.group not in groups]
        if not feasible:
            break
        u = draws[len(ranked)] if draws is not None and len(ranked) < len(draws) else 1.0
        chosen = feasible[pick(u, epsilon, len(feasible))]
        if sets is not None:
            sets.append(feasible)
        priority, p, v = scored[chosen]
        groups.add(v.action.group)
        ranked.append(ranked_action(v, p, priority, channel, len(ranked) + 1))
        verdicts[chosen] = f"rank {len(ranked)}"
        pending = [k for k in pending if k != chosen and scored[k][2].action.group not in groups]
    if funnel is not None:
        for k, (priority, p, v) in enumerate(scored):
            verdict = verdicts.get(k, "group" if v.action.group in groups else "cutoff")
            funnel.append(FunnelEntry(v.action.id, "ranked", verdict, p, priority) if verdict.startswith("rank") else
                          FunnelEntry(v.action.id, "group", f"group {v.action.group} already shown", p, priority)
                          if verdict == "group" else
                          FunnelEntry(v.action.id, "cutoff", f"below the top {max_actions}", p, priority))
    return ranked
