"""The decision core: one Decide call as plain Python, called by the gRPC layer and by tests.

Funnel: validate -> profile (one Redis round trip) -> derived features (numba) -> rules (one
durable-rules evaluation) -> propensity (one numba call for all admitted actions) -> arbitration ->
log (background). Every stage is timed into ``nba_decision_stage_duration_seconds``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis

from engine import metrics
from engine.decision.arbitration import (
    STAGE_NAMES,
    FunnelEntry,
    RankedAction,
    dropped_detail,
    fallback_action,
    fallback_ranked,
    order,
    present_detail,
    ranked_action,
    select,
)
from engine.decision.contact import DECISION_TTL_DAYS, PRESENT, control_order, decision_key, present_args
from engine.decision.request import DecideInput, validate
from engine.features import CHANNELS, SCHEMA
from engine.live import Live
from engine.models.derived import derive
from engine.models.experiment import ModelSet, exploration_of, resolve
from engine.models.exploration import Explorer
from engine.models.model_input import ROW_FEATURES, ActionTable, customer_block, encode_features, shared_row
from engine.models.registry import LoadedModel
from engine.rules.contact import DAY_MS, ContactRules
from engine.rules.facts import FactInputs
from engine.rules.runtime import ActionVerdict, CompiledRules, RuleOutcome
from engine.store.decision_log import DecisionLog
from engine.store.profiles import Profile, ProfileStore, SchemaMismatch

log = logging.getLogger(__name__)

FEATURE_SCHEMA = SCHEMA.fingerprint()  # hashed once: every logged decision carries it


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
    control: bool = False  # the customer is in the control group: the control policy decided
    model_role: str = "champion"  # which model decided: champion, or a challenger on its traffic share
    explored: bool = False  # exploration (Thompson sampling) took part in the ranking
    explored_top: str = ""  # exploring: "changed" if the top candidate differs from pure exploitation, else "same"
    shadow_version: str = ""  # a shadow challenger also scored this decision (logged, never shown)
    shadow_propensities: list[float] = field(default_factory=list)  # its scores for ``actions``
    shadow_top: str = ""  # the action the shadow model would have ranked first
    features: np.ndarray | None = None  # the shared model input (customer block, channel), for training


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


# A ranking orders the admitted candidates ``(priority, propensity, verdict)`` in place of the model's
# priority (the simulation's baselines): (candidates, request, profile, now) -> candidates in order.
Ranking = Callable[[list, DecideInput, Profile, float], list]


class DecisionEngine:
    """``contacts``: enforce contact policies and budgets (contact.yaml, daily_budget) atomically in
    Redis when actions are presented; off, arbitration is in-process only (the p99 comparison)."""

    def __init__(self, store: ProfileStore, rules: Live[CompiledRules], model: Live[ModelSet] | Live[LoadedModel],
                 decision_log: DecisionLog | None = None, contacts: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.rules = rules
        self.model = model
        self.decision_log = decision_log
        self.contacts = contacts
        self.clock = clock
        self.rankings: dict[str, Ranking] = {}
        self._present_script = store.client.register_script(PRESENT)
        # keyed by content versions (an id() of a retired rule set can be reused by the next one)
        self._tables: dict[tuple[str, str], ActionTable] = {}
        self._bound: dict[tuple[str, str], object] = {}  # (ruleset, model version) -> DecisionScorer
        self.explorer: Explorer | None = None  # set by App: Thompson sampling counts

    def _action_table(self, rules: CompiledRules, model: LoadedModel) -> ActionTable:
        key = (rules.version, model.version)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 32:
                self._tables.clear()
            table = self._tables[key] = ActionTable.build(rules.ruleset.actions, model.action_levels)
        return table

    def _scorer(self, rules: CompiledRules, model: LoadedModel):
        """The model bound to this catalog (``engine.models.bound_scorer``); ``prepare`` builds it off the
        request path whenever models or rules change."""
        key = (rules.version, model.version)
        scorer = self._bound.get(key)
        if scorer is None:
            if len(self._bound) > 32:
                self._bound.clear()
            scorer = self._bound[key] = model.scorer.bind(ROW_FEATURES, self._action_table(rules, model).rows)
        return scorer

    def prepare(self, models=None, rules: CompiledRules | None = None) -> None:
        """Bind every model of ``models`` (default: live) to ``rules``' catalog (default: live) before
        they go live, so no request pays for it."""
        models = models if models is not None else self.model.current
        rules = rules if rules is not None else self.rules.current
        for model in getattr(models, "models", (models,)):
            self._scorer(rules, model).warmup()

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
        try:  # the presenting script, without presenting anything (no budget or history is touched)
            self.store.client.script_load(PRESENT)
        except redis.exceptions.RedisError as exc:
            log.warning("cannot load the presenting script: %s", exc)

    def _decide(self, req: DecideInput, observe: bool = True) -> tuple[Decision, str | None]:
        max_actions = validate(req)
        stages = _Stages(observe)
        decision_id, now = uuid.uuid4().hex, self.clock()
        profile, degraded_by = self._fetch(req.customer_id)
        stages.done("profile")
        derived = derive(profile.numeric)
        stages.done("derive")
        with self.rules.use() as rules:
            models = self.model.current
            model, role, shadow = resolve(models, req.customer_id)
            outcome = rules.evaluate(rules.build_fact(FactInputs(
                numbers=np.concatenate((profile.numeric, derived)),
                categories=profile.categorical,
                products=profile.sets.get("products", ()),
                consents=profile.sets.get("consent", ()),
                channel=req.channel, touchpoint=req.touchpoint, context=req.context,
                triggers=profile.triggers,
            )))
            admitted, candidates = rules.admitted(outcome, req.channel)  # catalog indices, verdicts
            if outcome.degraded:
                degraded_by = degraded_by or "rule_engine"
            stages.done("rules")
            x = shared_row(customer_block(profile, derived), req.channel)
            propensity = self._score(rules, model, x, admitted)
            shadow_p = self._score(rules, shadow, x, admitted) if shadow is not None else None
            explore = self._explore(models, model, rules, req, admitted, propensity, now)
            stages.done("scoring")
            funnel = [FunnelEntry(v.action.id, STAGE_NAMES[v.stage], dropped_detail(v))
                      for v in rules.verdicts(outcome, req.channel) if not v.admitted] if req.explain else None
            ranked, control, presented_by = self._present(
                rules, model, outcome, profile, candidates, propensity, req, max_actions,
                funnel, decision_id, now, observe, explore=explore)
            degraded_by = degraded_by or presented_by
            explored_top = ""
            if explore is not None and not control:
                for a in ranked:
                    if a.propensity > 0 or not a.reasons[0].startswith("fallback"):
                        a.reasons.append("exploring: ranked on the model blended with a Thompson sample")
                explored_top = "same" if (order(candidates, propensity)[0][2].action.id
                                          == order(candidates, propensity, explore)[0][2].action.id) else "changed"
            shadow_info = _shadow(shadow, shadow_p, candidates, ranked)
            stages.done("arbitration")
            ruleset_version = rules.version
        if observe:
            for kind, names in (("situation", outcome.situations), ("policy", outcome.policies),
                                ("lever", outcome.levers)):
                for name in names:
                    metrics.rule_firings(kind, name).inc()
        return Decision(
            decision_id=decision_id,
            customer_id=req.customer_id,
            channel=req.channel,
            actions=ranked,
            ruleset_version=ruleset_version,
            model_version=model.version,
            degraded=degraded_by is not None,
            cold_start=not profile.found,
            situations=sorted(outcome.situations),
            decided_at=now,
            funnel=funnel or [],
            control=control,
            model_role=role,
            explored=bool(explored_top),
            explored_top=explored_top,
            **shadow_info,
            features=x,
        ), degraded_by

    def _explore(self, models, model: LoadedModel, rules: CompiledRules, req: DecideInput, admitted: list[int],
                 propensity: np.ndarray, now: float) -> np.ndarray | None:
        """Ranking propensities blended with Thompson samples when this decision explores, else None.
        Never for the control group (unless configured) nor for a named ranking."""
        config = exploration_of(models)
        if self.explorer is None or not config.enabled or req.ranking or not admitted:
            return None
        if not Explorer.explores(config, req.customer_id, now):
            return None
        contact = getattr(rules.ruleset, "contact", None) if self.contacts else None
        if not config.control and contact is not None and contact.control.contains(req.customer_id):
            return None
        table = self._action_table(rules, model)
        return self.explorer.blend(config, req.customer_id, now, table.action_ids,
                                   np.asarray(admitted, dtype=np.int64), propensity)

    def _contact_rules(self) -> ContactRules | None:
        return getattr(self.rules.current.ruleset, "contact", None) if self.contacts else None

    def _present(self, rules: CompiledRules, model: LoadedModel, outcome: RuleOutcome, profile: Profile,
                 admitted: list[ActionVerdict], propensity: np.ndarray, req: DecideInput, max_actions: int,
                 funnel: list[FunnelEntry] | None, decision_id: str, now: float,
                 present: bool = True, explore: np.ndarray | None = None) -> tuple[list[RankedAction], bool, str | None]:
        """Order the candidates (model priority, the control policy or a named ranking), drop those a
        contact policy forbids, then keep the top N, one per group, within budgets: atomically in Redis
        when contact policies are enforced. Returns (actions, control group, degraded_by).
        ``present`` False (warm-up) decides without recording anything."""
        channel = req.channel
        contact = self._contact_rules() if self.contacts else None
        contact = contact or (ContactRules() if self.contacts else None)
        candidates = order(admitted, propensity, explore)
        control = False
        if req.ranking:
            candidates = self.rankings[req.ranking](candidates, req, profile, now)
        elif contact is not None and contact.control.contains(req.customer_id):
            control = True
            candidates = control_order(contact.control, candidates, req.customer_id, now)
        if contact is not None and contact.quiet_hours is not None and contact.quiet_hours.quiet(channel, now):
            if funnel is not None:
                funnel.extend(FunnelEntry(v.action.id, "quiet_hours", f"quiet hours {contact.quiet_hours.describe()} "
                                          f"on {channel}", p, pr) for pr, p, v in candidates)
            if present:
                metrics.CONTACT_SUPPRESSED.labels("quiet_hours").inc()
            candidates, fallback = [], None
        else:
            fallback = fallback_action(rules, outcome, channel, funnel) if req.fallback else None
        if contact is None or not present:
            ranked = select(candidates, channel, max_actions, funnel)
            if not ranked and fallback is not None:
                ranked = [fallback_ranked(fallback, channel)]
            if present:
                self._write_decision_record(decision_id, req, ranked, control, now, rules, model)
            return ranked, control, None
        record = {"customer": req.customer_id, "channel": channel, "control": "1" if control else "0",
                  "ts": f"{now:.3f}", "ruleset": rules.version, "model": model.version}
        keys, args, limits = present_args(contact, candidates, fallback, max_actions, channel, decision_id, now,
                                          record, req.customer_id)
        try:
            verdicts, fb = self._present_script(keys=keys, args=[args])
        except redis.exceptions.RedisError as exc:
            metrics.REDIS_ERRORS.labels("present").inc()
            log.warning("presenting decision %s failed (limits and budgets not applied): %s", decision_id, exc)
            ranked = select(candidates, channel, max_actions, funnel)
            return ranked or ([fallback_ranked(fallback, channel)] if fallback else []), control, "contact_store"
        ranked = []
        for (priority, p, v), verdict in zip(candidates, verdicts):
            verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
            if verdict == "budget" or verdict.startswith("limit:"):
                metrics.CONTACT_SUPPRESSED.labels(
                    "budget" if verdict == "budget" else limits[int(verdict.split(":")[1]) - 1].name).inc()
            if verdict == "ok":
                ranked.append(ranked_action(v, p, priority, channel, len(ranked) + 1))
                if funnel is not None:
                    funnel.append(FunnelEntry(v.action.id, "ranked", f"rank {len(ranked)}", p, priority))
            elif funnel is not None:
                funnel.append(FunnelEntry(v.action.id, *present_detail(verdict, v, limits, max_actions), p, priority))
        if fb and fallback is not None:
            ranked = [fallback_ranked(fallback, channel)]
        return ranked, control, None

    def _write_decision_record(self, decision_id: str, req: DecideInput, ranked: list[RankedAction],
                               control: bool, now: float, rules: CompiledRules, model: LoadedModel) -> None:
        """Without contact enforcement the decision record is written off the hot path."""
        if self.decision_log is None:
            return
        self.decision_log.write_record(decision_key(decision_id), {
            "actions": ",".join(a.action_id for a in ranked), "groups": ",".join(a.group for a in ranked),
            "types": ",".join(a.type for a in ranked), "values": ",".join(f"{a.value:g}" for a in ranked),
            "customer": req.customer_id, "channel": req.channel, "control": "1" if control else "0",
            "ts": f"{now:.3f}", "ruleset": rules.version, "model": model.version,
        }, DECISION_TTL_DAYS * DAY_MS)

    def _score(self, rules: CompiledRules, model: LoadedModel, x: np.ndarray, admitted: list[int]) -> np.ndarray:
        """Propensity of every admitted action in one call of the model bound to the catalog: the
        shared row ``x`` (customer block, channel) against the admitted catalog rows."""
        if not admitted:
            return np.empty(0)
        return self._scorer(rules, model).predict(x, np.asarray(admitted, dtype=np.int64))

    def _record(self, decision: Decision, req: DecideInput, degraded_by: str | None) -> None:
        metrics.decisions(decision.channel).inc()
        metrics.model_decisions(decision.model_version, decision.model_role).inc()
        if decision.explored:
            metrics.EXPLORATION.labels(decision.explored_top).inc()
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
                "types": ",".join(a.type for a in decision.actions),
                "values": ",".join(f"{a.value:g}" for a in decision.actions),
                "propensities": ",".join(f"{a.propensity:.5f}" for a in decision.actions),
                "control": "1" if decision.control else "0",
                "ruleset_version": decision.ruleset_version,
                "model_version": decision.model_version,
                "model_role": decision.model_role,
                "explored": "1" if decision.explored else "0",
                **({"shadow_model": decision.shadow_version,
                    "shadow_propensities": ",".join(f"{p:.5f}" for p in decision.shadow_propensities),
                    "shadow_top": decision.shadow_top} if decision.shadow_version else {}),
                **({"features": encode_features(decision.features), "feature_schema": FEATURE_SCHEMA}
                   if decision.features is not None and decision.actions else {}),
                "degraded": "1" if decision.degraded else "0",
                "ts": f"{decision.decided_at:.3f}",
            })


def _shadow(shadow: LoadedModel | None, shadow_p: np.ndarray | None, admitted: list[ActionVerdict],
            ranked: list[RankedAction]) -> dict:
    """What a shadow challenger made of this decision: its version, its scores for the presented
    actions, and the action its own priority would have put first."""
    if shadow is None or shadow_p is None:
        return {}
    by_id = {v.action.id: p for v, p in zip(admitted, shadow_p.tolist())}
    top = order(admitted, shadow_p)
    return {"shadow_version": shadow.version,
            "shadow_propensities": [by_id.get(a.action_id, float("nan")) for a in ranked],
            "shadow_top": top[0][2].action.id if top else ""}
