"""The decision core: one Decide call as plain Python, called by the gRPC layer and by tests.

Funnel: validate -> profile (one Redis round trip) -> derived features (numba) -> rules (one
durable-rules evaluation) -> propensity (one numba call for all admitted actions) -> arbitration ->
log (background). Every stage is timed into ``nba_decision_stage_duration_seconds``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import redis

from engine import metrics
from engine.decision_log import DecisionLog
from engine.derived import derive
from engine.features import CHANNELS
from engine.live import Live
from engine.model_input import ActionTable, assemble, customer_block
from engine.registry import LoadedModel
from engine.rules.facts import FactInputs
from engine.rules.runtime import ActionVerdict, CompiledRules, RuleOutcome
from engine.store import Profile, ProfileStore, SchemaMismatch

log = logging.getLogger(__name__)

MAX_ACTIONS_LIMIT = 20
DEFAULT_MAX_ACTIONS = 3
MAX_ID_LENGTH = 128


class InvalidRequest(ValueError):
    """A request the caller must fix; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class DecideInput:
    customer_id: str
    channel: str
    touchpoint: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    max_actions: int = 0  # 0: DEFAULT_MAX_ACTIONS
    explain: bool = False


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


@dataclass
class FunnelEntry:
    action_id: str
    stage: str  # ranked | channel | expired | not_eligible | not_applicable | not_suitable | blocked | group | cutoff
    detail: str
    propensity: float = 0.0
    priority: float = 0.0


@dataclass
class Decision:
    decision_id: str
    customer_id: str
    channel: str
    actions: list[RankedAction]
    ruleset_version: str
    model_version: str
    degraded: bool
    cold_start: bool
    situations: list[str]
    decided_at: float
    funnel: list[FunnelEntry] = field(default_factory=list)


def validate(req: DecideInput) -> int:
    """Raise InvalidRequest naming the field; return the effective max_actions."""
    if not req.customer_id or not req.customer_id.strip():
        raise InvalidRequest("customer_id", "must not be empty")
    if len(req.customer_id) > MAX_ID_LENGTH or any(c in req.customer_id for c in "{}\n\r\t "):
        raise InvalidRequest("customer_id", f"at most {MAX_ID_LENGTH} characters, no spaces or braces")
    if req.channel not in CHANNELS:
        raise InvalidRequest("channel", f"must be one of {', '.join(CHANNELS)}")
    if not 0 <= req.max_actions <= MAX_ACTIONS_LIMIT:
        raise InvalidRequest("max_actions", f"must be between 1 and {MAX_ACTIONS_LIMIT} (0 for the default {DEFAULT_MAX_ACTIONS})")
    if len(req.touchpoint) > 256:
        raise InvalidRequest("touchpoint", "at most 256 characters")
    if len(req.context) > 64:
        raise InvalidRequest("context", "at most 64 entries")
    return req.max_actions or DEFAULT_MAX_ACTIONS


class _Stages:
    """Times consecutive stages with one clock read per boundary."""

    def __init__(self, observe: bool = True) -> None:
        self.observe = observe
        self.last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        if self.observe:
            metrics.stage_seconds(stage).observe(now - self.last)
        self.last = now


class DecisionEngine:
    def __init__(self, store: ProfileStore, rules: Live[CompiledRules], model: Live[LoadedModel],
                 decision_log: DecisionLog | None = None) -> None:
        self.store = store
        self.rules = rules
        self.model = model
        self.decision_log = decision_log
        self._tables: dict[tuple[int, str], ActionTable] = {}

    def _action_table(self, rules: CompiledRules, model: LoadedModel) -> ActionTable:
        key = (rules.version, model.version)  # the version is a content hash: same catalog
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 8:
                self._tables.clear()
            table = self._tables[key] = ActionTable.build(rules.ruleset.actions, model.action_levels)
        return table

    def _fetch(self, customer_id: str) -> tuple[Profile, str | None]:
        try:
            return self.store.fetch(customer_id), None
        except redis.exceptions.RedisError as exc:
            metrics.REDIS_ERRORS.labels("profile_fetch").inc()
            log.warning("profile fetch failed for %s: %s", customer_id, exc)
            return Profile.cold(customer_id), "profile_store"
        except SchemaMismatch as exc:
            log.warning("%s", exc)
            return Profile.cold(customer_id), "profile_schema"

    def decide(self, req: DecideInput) -> Decision:
        started = time.perf_counter()
        decision, degraded_by = self._decide(req)
        stages = _Stages()
        self._record(decision, req, degraded_by)
        stages.done("logging")
        metrics.decide_seconds(req.channel).observe(time.perf_counter() - started)
        return decision

    def warmup(self) -> None:
        """Run every stage once per channel (JIT, Redis pool, rule engine) before taking traffic."""
        for channel in CHANNELS:
            self._decide(DecideInput(customer_id="warmup", channel=channel, explain=True), observe=False)

    def _decide(self, req: DecideInput, observe: bool = True) -> tuple[Decision, str | None]:
        max_actions = validate(req)
        stages = _Stages(observe)
        profile, degraded_by = self._fetch(req.customer_id)
        stages.done("profile")
        derived = derive(profile.numeric)
        stages.done("derive")
        with self.rules.use() as rules:
            model = self.model.current
            outcome = rules.evaluate(rules.build_fact(FactInputs(
                numbers=np.concatenate((profile.numeric, derived)),
                categories=profile.categorical,
                products=profile.sets.get("products", ()),
                consents=profile.sets.get("consent", ()),
                channel=req.channel, touchpoint=req.touchpoint, context=req.context,
                triggers=profile.triggers,
            )))
            admitted, verdicts = rules.admitted(outcome, req.channel)
            if outcome.degraded:
                degraded_by = degraded_by or "rule_engine"
            stages.done("rules")
            propensity = self._score(rules, model, profile, derived, admitted, req.channel)
            stages.done("scoring")
            funnel = [FunnelEntry(v.action.id, _STAGE_NAMES[v.stage], _dropped_detail(v))
                      for v in rules.verdicts(outcome, req.channel) if not v.admitted] if req.explain else None
            ranked = arbitrate(verdicts, propensity, req.channel, max_actions, funnel)
            if not ranked:
                ranked = fallback(rules, outcome, req.channel, funnel)
                if ranked:
                    metrics.FALLBACKS.labels(req.channel).inc()
            stages.done("arbitration")
            ruleset_version = rules.version
        if observe:
            for kind, names in (("situation", outcome.situations), ("policy", outcome.policies),
                                ("lever", outcome.levers)):
                for name in names:
                    metrics.rule_firings(kind, name).inc()
        return Decision(
            decision_id=uuid.uuid4().hex,
            customer_id=req.customer_id,
            channel=req.channel,
            actions=ranked,
            ruleset_version=ruleset_version,
            model_version=model.version,
            degraded=degraded_by is not None,
            cold_start=not profile.found,
            situations=sorted(outcome.situations),
            decided_at=time.time(),
            funnel=funnel or [],
        ), degraded_by

    def _score(self, rules: CompiledRules, model: LoadedModel, profile: Profile, derived: np.ndarray,
               admitted: list[int], channel: str) -> np.ndarray:
        """Propensity of every admitted action in one scorer call."""
        if not admitted:
            return np.empty(0)
        table = self._action_table(rules, model)
        x = assemble(customer_block(profile, derived), table, np.asarray(admitted), channel)
        return model.scorer.predict(x)

    def _record(self, decision: Decision, req: DecideInput, degraded_by: str | None) -> None:
        metrics.decisions(decision.channel).inc()
        for a in decision.actions:
            metrics.actions_presented(a.action_id, a.type, decision.channel).inc()
        if decision.cold_start:
            metrics.COLD_STARTS.inc()
        if degraded_by:
            metrics.DEGRADED.labels(degraded_by).inc()
        if self.decision_log is not None:
            self.decision_log.write({
                "decision_id": decision.decision_id,
                "customer_id": decision.customer_id,
                "channel": decision.channel,
                "touchpoint": req.touchpoint,
                "actions": ",".join(a.action_id for a in decision.actions),
                "propensities": ",".join(f"{a.propensity:.5f}" for a in decision.actions),
                "ruleset_version": decision.ruleset_version,
                "model_version": decision.model_version,
                "degraded": "1" if decision.degraded else "0",
                "ts": f"{decision.decided_at:.3f}",
            })


_STAGE_NAMES = {"channel": "channel", "dates": "expired", "eligibility": "not_eligible",
                "applicability": "not_applicable", "suitability": "not_suitable", "policy": "blocked"}


def _dropped_detail(v: ActionVerdict) -> str:
    a = v.action
    if v.stage == "channel":
        return "no treatment for this channel"
    if v.stage == "dates":
        return f"valid {a.valid_from or '...'} to {a.valid_to or '...'}"
    if v.stage in ("eligibility", "applicability", "suitability"):
        word = {"eligibility": "eligible", "applicability": "applicable", "suitability": "suitable"}[v.stage]
        return f"{word} is false: {v.reasons[0] if v.reasons else ''}"
    return "; ".join(f"policy {name}: {reason}" for name, reason in zip(v.blocked_by, v.reasons))


def fallback(rules: CompiledRules, outcome: RuleOutcome, channel: str,
             funnel: list[FunnelEntry] | None) -> list[RankedAction]:
    """The channel's fallback when nothing survived: it skips eligibility, never a policy block
    (consent, fraud hold), so an empty answer is a deliberate one."""
    action = rules.ruleset.fallback_for(channel)
    if action is None or channel not in action.channels:
        return []
    policy = rules.blocked_actions(outcome).get(action.id)
    if policy is not None:
        if funnel is not None:
            funnel.append(FunnelEntry(action.id, "blocked", f"fallback blocked by policy {policy.name}: {policy.reason}"))
        return []
    return [RankedAction(
        action_id=action.id, name=action.name, type=action.type, group=action.group,
        propensity=0.0, value=action.value, priority=0.0,
        treatment=dict(action.channels.get(channel, {})),
        reasons=["fallback: no action survived the rules for this channel"], rank=1,
    )]


def arbitrate(admitted: list[ActionVerdict], propensity: np.ndarray, channel: str, max_actions: int,
               funnel: list[FunnelEntry] | None) -> list[RankedAction]:
    """priority = propensity x value x weight (context weight x levers); top N, one per group.

    Ties break on the action id so that the same state always gives the same answer.
    """
    scored = sorted(
        ((p * v.action.value * v.weight, p, v) for v, p in zip(admitted, propensity.tolist())),
        key=lambda s: (-s[0], s[2].action.id),
    )
    ranked: list[RankedAction] = []
    groups: set[str] = set()
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
        reasons = [f"propensity {p:.3f} x value {action.value:g}"]
        if v.weight != 1.0:
            reasons.append(f"weight x{v.weight:g}" + (f" (levers: {', '.join(v.levers)})" if v.levers else " (channel)"))
        ranked.append(RankedAction(
            action_id=action.id, name=action.name, type=action.type, group=action.group,
            propensity=p, value=action.value, priority=priority, treatment=dict(action.channels[channel]),
            reasons=reasons, rank=len(ranked) + 1,
        ))
        if funnel is not None:
            funnel.append(FunnelEntry(action.id, "ranked", f"rank {len(ranked)}: {'; '.join(reasons)}", p, priority))
    return ranked
