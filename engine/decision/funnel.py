"""The decision core: one Decide call as plain Python, called by the gRPC layer and by tests.

Funnel: validate -> profile (one Redis round trip) -> derived features (numba) -> rules (one
durable-rules evaluation) -> propensity (one numba call for all admitted actions) -> arbitration ->
log (background). Every stage is timed into ``nba_decision_stage_duration_seconds``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import redis

from engine import metrics
from engine.decision import choice, interactions, records, traces
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
from engine.decision.budget_claims import NOT_CLAIMED, BudgetClaims
from engine.decision.campaigns import campaign_stage
from engine.decision.contact import (
    DECIDE,
    DRY,
    PRESENT,
    RESERVE,
    candidate_budgets,
    control_order,
    interaction_key,
    new_decision_id,
    present_args,
)
from engine.decision.request import DecideInput, validate
from engine.decision.responses import ResponseRecorder
from engine.features import FeatureSchema
from engine.live import Live
from engine.models.derived import derive
from engine.models.experiment import ExplorationConfig, ModelSet, arbitration_of, exploration_of, resolve
from engine.models.exploration import Explorer
from engine.models.model_input import ActionTable, Adapter, model_input, row_columns
from engine.models.registry import LoadedModel
from engine.rules.contact import ContactRules, Interactions
from engine.rules.facts import FactInputs
from engine.rules.runtime import ActionVerdict, CompiledRules, RuleOutcome
from engine.store.decision_log import DecisionLog
from engine.store.erasure import index_record, own_member
from engine.store.profiles import (
    FEATURE_LAYOUTS_KEY,
    Profile,
    ProfileStore,
    SchemaMismatch,
    is_cluster,
    redis_deadline,
)
from engine.store.pseudonym import pseudonym

log = logging.getLogger(__name__)

MIN_DECISION_SECONDS = 0.006  # less time left than this before the caller's deadline: the fallback at once
ANSWER_SECONDS = 0.005  # kept back from the deadline for what follows the last Redis reply (rules, scoring, reply)
ANSWER_SHARE = 0.2  # and at least this share of the time left: when a stall ends many calls at once, they queue


def redis_until(deadline: float) -> float:
    """Until when (``time.monotonic()``) a call with this deadline waits for Redis replies (0: no deadline)."""
    if not deadline:
        return 0.0
    return deadline - max(ANSWER_SECONDS, ANSWER_SHARE * (deadline - time.monotonic()))


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
    schema: FeatureSchema | None = None  # the feature schema ``features`` follow
    interaction_id: str = ""
    repeat: bool = False  # the interaction's stored decision for this placement, returned again
    preview: bool = False  # decided without side effects (nothing recorded, counted or reserved)
    campaign_eligible: list[str] = field(default_factory=list)  # running campaigns with an admitted action
    campaign_control: list[str] = field(default_factory=list)  # campaigns holding this customer out
    quiet_until: float = 0.0  # quiet hours withheld actions: when they end on the customer's clock (epoch s)
    # the logging policy (engine.decision.choice): its exploration share, the walk's candidates in ranked
    # order (action id, value x weight), each slot's feasible candidates (indexes), and each presented
    # action's probability at its slot (None: not known, a Thompson-sampled ranking)
    epsilon: float = 0.0
    candidates: list[tuple[str, float]] = field(default_factory=list)
    choice_sets: list[list[int]] = field(default_factory=list)
    probabilities: list[float] | None = field(default_factory=list)
    # uplift arbitration: each admitted action's (P(take | shown), P(take | not shown), value x weight)
    uplift: dict[str, tuple[float, float, float]] = field(default_factory=dict)


class _Stages:
    """Times consecutive stages with one clock read per boundary; ``decide`` observes them all at once."""

    def __init__(self, observe: bool = True, traced: bool = False) -> None:
        self.observe = observe
        self.last = time.perf_counter()
        self.timings: list[tuple[str, float]] = []
        self.starts: list[float] | None = [] if traced else None  # each stage's start, for its span

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        if self.observe:
            self.timings.append((stage, now - self.last))
            if self.starts is not None:
                self.starts.append(self.last)
        self.last = now


# A ranking orders the admitted candidates ``(priority, propensity, verdict)`` in place of the model's
# priority (the simulation's baselines): (candidates, request, profile, now) -> candidates in order.
Ranking = Callable[[list, DecideInput, Profile, float], list]


class DecisionEngine:
    """``contacts``: enforce contact policies and budgets (contact.yaml, daily_budget) atomically in
    Redis when actions are presented; off, arbitration is in-process only (the p99 comparison).

    A decision pins one snapshot when it starts, the rule set (with its contact configuration) and the
    model set, and reads nothing else that a reload can change."""

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
        self.controlled_rankings: set[str] = set()  # named rankings that serve customers (the control group applies)
        self.responses = ResponseRecorder(store.client, rules, clock=clock)
        self._present_script = store.client.register_script(PRESENT)
        self.budgets = BudgetClaims(store.client) if is_cluster(store.client) else None
        # keyed by content versions (an id() of a retired rule set can be reused by the next one)
        self._tables: dict[tuple[str, str], ActionTable] = {}
        self._bound: dict[tuple[str, str], tuple[Any, Adapter | None]] = {}  # (ruleset, model version) -> ...
        self.explorer: Explorer | None = None  # set by App: Thompson sampling counts
        self._feature_layouts: set[str] = set()  # fingerprints recorded in nba:feature_layouts

    def _action_table(self, rules: CompiledRules, model: LoadedModel) -> ActionTable:
        key = (rules.version, model.version)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 32:
                self._tables.clear()
            table = self._tables[key] = model_input(rules.schema).action_table(
                rules.ruleset.actions, model.action_levels, model.levels.get("action_type"))
        return table

    def _scorer(self, rules: CompiledRules, model: LoadedModel) -> tuple[Any, Adapter | None]:
        """The model bound to this catalog (``engine.models.bound_scorer``) and the adapter from the live
        row layout to the model's (None: the same); ``prepare`` builds them off the request path whenever
        models or rules change."""
        key = (rules.version, model.version)
        found = self._bound.get(key)
        if found is None:
            if len(self._bound) > 32:
                self._bound.clear()
            rows = model_input(rules.schema)
            columns = row_columns(len(model.features)) if model.features else rows.row_features
            scorer = model.scorer.bind(columns, self._action_table(rules, model).rows)
            found = self._bound[key] = (scorer, rows.adapter(model.features, model.levels))
        return found

    def prepare(self, models=None, rules: CompiledRules | None = None) -> None:
        """Bind every model of ``models`` (default: live) to ``rules``' catalog (default: live) before
        they go live, so no request pays for it."""
        models = models if models is not None else self.model.current
        rules = rules if rules is not None else self.rules.current
        for model in getattr(models, "models", (models,)):
            for half in (model, model.organic):
                if half is not None:
                    self._scorer(rules, half)[0].warmup()

    def _fetch(self, req: DecideInput, now: float, schema: FeatureSchema) -> tuple[Profile, dict[str, str], str | None]:
        """The profile (triggers active at ``now``) and, with an interaction id, what the interaction stored."""
        try:
            if req.interaction_id:
                profile, stored = self.store.fetch_with(req.customer_id,
                                                        interaction_key(req.customer_id, req.interaction_id), schema, now)
                return profile, stored, None
            return self.store.fetch(req.customer_id, schema, now), {}, None
        except redis.exceptions.RedisError as exc:
            metrics.REDIS_ERRORS.labels("profile_fetch").inc()
            log.warning("profile fetch failed for %s: %s", pseudonym(req.customer_id), exc)
            return Profile.cold(req.customer_id, schema), {}, "profile_store"
        except SchemaMismatch as exc:
            log.warning("%s", exc)
            return Profile.cold(req.customer_id, schema), {}, "profile_schema"

    def decide(self, req: DecideInput) -> Decision:
        started = time.perf_counter()
        span = traces.recording_span()  # the RPC's span when this call is traced (None: tracing off)
        stages = _Stages(traced=span is not None)
        seconds = None
        named = None
        try:
            decision, degraded_by = self._decide(req, stages=stages)
            stages.last = time.perf_counter()
            named = traces.DECISION_ID.set(decision.decision_id)  # for the log lines from here on
            self._record(decision, req, degraded_by)
            stages.done("logging")
            seconds = stages.last - started
        finally:
            if named is not None:
                traces.DECISION_ID.reset(named)
            metrics.observe_decision(req.channel, seconds, stages.timings)
            if span is not None and stages.starts is not None:
                traces.stage_spans(span, stages.timings, stages.starts)
        if span is not None:
            traces.decided(span, decision.decision_id, decision.channel, decision.ruleset_version,
                              decision.model_version, decision.degraded)
        return decision

    def warmup(self) -> None:
        """Run every stage once per channel (JIT, Redis pool, rule engine) before taking traffic."""
        for channel in self.rules.current.schema.channel_names:
            self._decide(DecideInput(customer_id="warmup", channel=channel, explain=True, preview=True), observe=False)
        try:
            self.store.client.script_load(PRESENT)
        except redis.exceptions.RedisError as exc:
            log.warning("cannot load the presenting script: %s", exc)

    def _decide(self, req: DecideInput, observe: bool = True,
                stages: _Stages | None = None) -> tuple[Decision, str | None]:
        with self.rules.use() as rules:  # the snapshot: this rule set (and its contact.yaml) and this model set
            max_actions = validate(req, rules.schema)
            if req.deadline and req.deadline - time.monotonic() < MIN_DECISION_SECONDS:
                return self._out_of_time(rules, req), "deadline"
            # Redis replies are awaited until the caller's deadline less the time to answer, not longer
            with redis_deadline(redis_until(req.deadline)):
                return self._decide_in_time(rules, req, max_actions, observe, stages or _Stages(observe))

    def _out_of_time(self, rules: CompiledRules, req: DecideInput) -> Decision:
        """Too little time left for a decision: the channel's fallback at once, degraded, nothing read or
        recorded in Redis (a response to it is not known)."""
        action = rules.ruleset.fallback_for(req.channel)
        actions = [fallback_ranked(action, req.channel)] if (
            req.fallback and action is not None and req.channel in action.channels) else []
        now = self.clock()
        models = self.model.current
        return Decision(decision_id=new_decision_id(now, req.customer_id), customer_id=req.customer_id, channel=req.channel,
                        actions=actions, ruleset_version=rules.version, model_version=models.version,
                        degraded=True, cold_start=False, situations=[], decided_at=now, preview=req.preview,
                        probabilities=[1.0] * len(actions))

    def _decide_in_time(self, rules: CompiledRules, req: DecideInput, max_actions: int,
                        observe: bool, stages: _Stages) -> tuple[Decision, str | None]:
        stages.last = time.perf_counter()
        now = self.clock()
        models = self.model.current
        schema = rules.schema
        profile, stored, degraded_by = self._fetch(req, now, schema)
        stages.done("profile")
        place = interactions.FIELD_PREFIX + interactions.placement(req.touchpoint, max_actions, req.context)
        replace = place in stored
        if replace:
            head, actions = interactions.read(stored[place])
            # an offer decided before the customer withdrew consent on this channel is decided anew
            if req.channel in profile.sets.get("consent", ()) or all(a.type in schema.service_types for a in actions):
                return self._repeat(rules, req, head, actions, now), None
            del stored[place]
        derived = derive(profile.numeric, schema, now)
        stages.done("derive")
        model, role, shadow = resolve(models, req.customer_id)
        outcome = rules.evaluate(rules.build_fact(FactInputs(
            numbers=np.concatenate((profile.numeric, derived)),
            categories=profile.categorical,
            products=profile.sets.get("products", ()), sets=profile.sets,
            consents=profile.sets.get("consent", ()),
            channel=req.channel, touchpoint=req.touchpoint, context=req.context,
            triggers=profile.triggers,
        )))
        admitted, candidates = rules.admitted(outcome, req.channel, now=now)  # catalog indices, verdicts
        if outcome.degraded:
            degraded_by = degraded_by or "rule_engine"
        stages.done("rules")
        rows = model_input(schema)
        x = rows.shared_row(rows.customer_block(profile, derived), req.channel)
        propensity = self._score(rules, model, x, admitted)
        shadow_p = self._score(rules, shadow, x, admitted) if shadow is not None else None
        exploration = exploration_of(models)
        explore = self._explore(exploration, model, rules, req, admitted, propensity, now)
        organic = (without_offer(propensity, self._score(rules, model.organic, x, admitted))
                   if arbitration_of(models) == "uplift" and model.organic is not None else None)
        stages.done("scoring")
        funnel = [FunnelEntry(v.action.id, STAGE_NAMES[v.stage], dropped_detail(v))
                  for v in rules.verdicts(outcome, req.channel, now=now) if not v.admitted] if req.explain else None
        decision = Decision(
            decision_id=new_decision_id(now, req.customer_id), customer_id=req.customer_id, channel=req.channel, actions=[],
            ruleset_version=rules.version, model_version=model.version, degraded=degraded_by is not None,
            cold_start=not profile.found, situations=sorted(outcome.situations), decided_at=now,
            funnel=funnel or [], model_role=role, features=x, schema=schema, interaction_id=req.interaction_id,
            preview=req.preview)
        ranking = _uplift(decision, candidates, propensity, explore, organic) if organic is not None else None
        repeat = self._present(rules, decision, outcome, profile, candidates, propensity, req, max_actions,
                               funnel, stored, place, observe, explore, replace, degraded_by == "profile_store",
                               exploration, ranking)
        if repeat is not None:  # a concurrent call of this interaction and placement decided first
            return self._repeat(rules, req, *interactions.read(repeat), now), None
        if decision.degraded and degraded_by is None:
            degraded_by = "contact_store"
        for a in [] if decision.control else decision.actions:  # the control policy did not rank on it
            if a.action_id in decision.uplift:
                p, q, _ = decision.uplift[a.action_id]
                a.reasons.append(f"uplift arbitration: {p:.3f} if shown, {q:.3f} without")
        if decision.explored and explore is not None:
            decision.explored_top = "same" if (order(candidates, propensity)[0][2].action.id
                                               == order(candidates, propensity, explore)[0][2].action.id) else "changed"
        for key, value in _shadow(shadow, shadow_p, candidates, decision.actions).items():
            setattr(decision, key, value)
        stages.done("arbitration")
        if observe:
            for kind, names in (("situation", outcome.situations), ("policy", outcome.policies),
                                ("lever", outcome.levers)):
                for name in names:
                    metrics.rule_firings.inc(kind, name)
        return decision, degraded_by

    def _repeat(self, rules: CompiledRules, req: DecideInput, head: dict, actions: list[RankedAction],
                now: float) -> Decision:
        """The interaction's stored decision for this placement, again: same id, actions and versions,
        with the asking channel's treatment where the catalog has one. If it was decided on an
        on_impression channel and is now asked on a channel that shows it (on_decide), its actions are
        counted as seen (once: an impression per decision and action)."""
        for a in actions:
            action = rules.ruleset.by_id.get(a.action_id)
            if action is not None and req.channel in action.channels:
                a.treatment = dict(action.channels[req.channel])
        contact = rules.ruleset.contact if self.contacts else None
        if (not req.preview and contact is not None and head["mode"] == RESERVE
                and contact.interactions.counts_on_decide(req.channel)):
            for a in actions:
                self.responses.record(head["id"], a.action_id, "impression", now)
        funnel = [FunnelEntry(a.action_id, "ranked", f"rank {a.rank}: decided for interaction {req.interaction_id} "
                              f"at {head['ts']:.3f} on {head['ch']}", a.propensity, a.priority)
                  for a in actions] if req.explain else []
        return Decision(
            decision_id=head["id"], customer_id=req.customer_id, channel=req.channel, actions=actions,
            ruleset_version=head["rules"], model_version=head["model"], degraded=head["degraded"],
            cold_start=head["cold"], situations=head["situations"], decided_at=head["ts"], funnel=funnel,
            control=head["control"], model_role=head["role"], explored=head["explored"],
            interaction_id=req.interaction_id, repeat=True, preview=req.preview)

    def _explore(self, config: ExplorationConfig, model: LoadedModel, rules: CompiledRules, req: DecideInput, admitted: list[int],
                 propensity: np.ndarray, now: float) -> np.ndarray | None:
        """Ranking propensities blended with Thompson samples when this decision explores, else None.
        Never for the control group (unless configured) nor for a named ranking."""
        if self.explorer is None or config.strategy != "thompson" or not config.enabled or req.ranking or not admitted:
            return None
        if not Explorer.explores(config, req.customer_id, now):
            return None
        contact = rules.ruleset.contact if self.contacts else None
        if not config.control and contact is not None and contact.control.contains(req.customer_id):
            return None
        table = self._action_table(rules, model)
        return self.explorer.blend(config, req.customer_id, now, table.action_ids,
                                   np.asarray(admitted, dtype=np.int64), propensity)

    def _order(self, contact: ContactRules | None, candidates: list, req: DecideInput, profile: Profile, now: float,
               funnel: list[FunnelEntry] | None) -> tuple[list, bool]:
        """The candidates in the order of the service's ranking, a named ranking or the control policy.
        The control group applies to every decision that serves a customer (inbound, and outbound started by
        events), not to the simulation's baseline rankings."""
        control = (contact is not None and contact.control.contains(req.customer_id)
                   and (not req.ranking or req.ranking in self.controlled_rankings))
        if req.ranking:
            candidates = self.rankings[req.ranking](candidates, req, profile, now)
            if control:  # targeting (an event-triggered offer) is the policy under test: control customers don't get it
                withheld = [c for c in candidates if not c[2].action.service]
                if funnel is not None:
                    funnel.extend(FunnelEntry(v.action.id, "control_group", "control group: targeted offers are "
                                              "withheld (lift measurement)", p, pr) for pr, p, v in withheld)
                candidates = [c for c in candidates if c[2].action.service]
        elif control:
            candidates = control_order(cast(ContactRules, contact).control, candidates, req.customer_id, now)
        return candidates, control

    def _present(self, rules: CompiledRules, decision: Decision, outcome: RuleOutcome, profile: Profile,
                 admitted: list[ActionVerdict], propensity: np.ndarray, req: DecideInput, max_actions: int,
                 funnel: list[FunnelEntry] | None, stored: dict[str, str], place: str, observe: bool,
                 explore: np.ndarray | None, replace: bool, store_down: bool,
                 exploration: ExplorationConfig, ranking: np.ndarray | None = None) -> str | None:
        """Order the candidates, drop those a contact policy forbids, then keep the top N, one per group,
        within budgets: atomically in Redis when contact policies are enforced. Fills ``decision`` (actions,
        control, degraded); returns the stored decision instead when a concurrent call of the same
        interaction and placement decided first (``replace``: this decision replaces the stored one).
        ``ranking``: what the priority multiplies in place of the (blended) propensity (uplift arbitration)."""
        channel, now = req.channel, decision.decided_at
        contact = (rules.ruleset.contact or ContactRules()) if self.contacts else None
        ranked_by = ranking if ranking is not None else explore
        candidates, decision.control = self._order(contact, order(admitted, propensity, ranked_by), req, profile, now,
                                                   funnel)
        if ranking is not None and not decision.control:
            candidates = _no_uplift(candidates, decision.uplift, funnel)
        if stored:
            candidates = _one_voice(candidates, interactions.tops(stored, place), req.interaction_id, funnel)
        candidates, played = campaign_stage(rules.ruleset, candidates, req.customer_id, funnel)
        decision.campaign_eligible, decision.campaign_control = sorted(played.eligible), sorted(played.held_out)
        quiet = contact.quiet_hours if contact is not None else None
        clock = quiet.clock_for(profile.categorical) if quiet is not None else None  # the customer's zone
        if quiet is not None and quiet.quiet(channel, now, clock):
            decision.quiet_until = quiet.ends_after(now, clock)
            withheld = [c for c in candidates if not c[2].action.quiet_exempt]  # alerts domain.yaml lets through
            if funnel is not None:
                funnel.extend(FunnelEntry(v.action.id, "quiet_hours", f"quiet hours {quiet.describe(clock)} "
                                          f"on {channel}", p, pr) for pr, p, v in withheld)
            if observe and not req.preview and withheld:
                metrics.CONTACT_SUPPRESSED.labels("quiet_hours").inc()
            candidates, fallback = [c for c in candidates if c[2].action.quiet_exempt], None
        else:
            fallback = fallback_action(rules, outcome, channel, funnel) if req.fallback else None
        exploring = explore is not None and not decision.control
        epsilon, draws = _epsilon(exploration, req, decision.control, now, max_actions)
        decision.explored = exploring or (epsilon > 0 and bool(candidates))  # the interaction's header says it
        sets: list[list[int]] = []
        if contact is not None and store_down:  # Redis failed us just now: limits and budgets cannot be judged
            decision.actions = [fallback_ranked(fallback, channel)] if fallback else []
            _logging_policy(decision, [], [], 0.0)
            return None
        if contact is None or not observe:
            ranked = select(candidates, channel, max_actions, funnel, epsilon, draws, sets if epsilon > 0 else None)
            if not ranked and fallback is not None:
                ranked = [fallback_ranked(fallback, channel)]
            decision.actions = _exploring(ranked) if exploring else ranked
            _logging_policy(decision, candidates, sets, epsilon, exploring)
            if observe and not req.preview:
                return self._write_records(decision, req, place, (rules.ruleset.contact or ContactRules()).interactions,
                                           replace)
            return None
        mode = DRY if req.preview else DECIDE if contact.interactions.counts_on_decide(channel) else RESERVE
        record = {"customer": req.customer_id, "channel": channel, "control": "1" if decision.control else "0",
                  "ts": f"{now:.3f}", "ruleset": rules.version, "model": decision.model_version,
                  "counted": "1" if mode == DECIDE else "0"}
        bodies: list[str] | None = None
        head = ""
        if req.interaction_id:
            would_show = [ranked_action(v, p, priority, channel, 0) for priority, p, v in candidates]
            if fallback is not None:
                would_show.append(fallback_ranked(fallback, channel, count=False))
            bodies = [interactions.action_body(a) for a in (_exploring(would_show) if exploring else would_show)]
            head = _header(decision, mode)
        budgets, specs, claims = self.budgets, [], None
        if budgets is not None:  # a cluster: budgets are claimed outside the script (engine.decision.budget_claims)
            specs = [candidate_budgets(v.action, rules.ruleset.campaigns, now) for _, _, v in candidates]
            claims = [0 if not b else budgets.peek(b) if mode == DRY else NOT_CLAIMED for b in specs]
        try:
            for _ in range(len(candidates) + 1):  # each "need" round settles a claim at least
                keys, args, limits = present_args(contact, candidates, fallback, max_actions, channel,
                                                  decision.decision_id, now, record, req.customer_id, mode,
                                                  req.interaction_id, place[len(interactions.FIELD_PREFIX):], bodies,
                                                  head, replace, _late_ms(req.deadline), rules.ruleset.campaigns,
                                                  claims, self.responses.codes, epsilon, draws)
                reply = self.store.hot.script(self._present_script, keys, [args])
                verdicts, fb = reply[0], reply[1]
                if verdicts != b"need":
                    break
                assert budgets is not None and claims is not None  # "need" comes only with claims
                for i in fb:
                    claims[i - 1] = budgets.claim(specs[i - 1])
        except redis.exceptions.RedisError as exc:
            metrics.REDIS_ERRORS.labels("present").inc()
            # limits and budgets cannot be judged: no offer is shown unchecked, only the channel's fallback
            log.warning("presenting decision %s failed (answered with the fallback): %s", decision.decision_id, exc)
            decision.actions = [fallback_ranked(fallback, channel)] if fallback else []
            _logging_policy(decision, [], [], 0.0)
            decision.degraded = True
            return None
        if budgets is not None and claims is not None and mode != DRY:
            budgets.settle(claims, specs, verdicts if isinstance(verdicts, list) else [], mode == RESERVE,
                           decision.decision_id, [v.action.id for _, _, v in candidates], req.customer_id,
                           int(now * 1000) + contact.interactions.reservation_ms)
        if verdicts == b"replay":
            return fb.decode()
        if verdicts == b"late":
            decision.actions = [fallback_ranked(fallback, channel)] if fallback else []
            _logging_policy(decision, [], [], 0.0)
            decision.degraded = True
            return None
        picks = [int(i) for i in reply[3]]  # in the order of their slots
        ranked = [ranked_action(candidates[i][2], candidates[i][1], candidates[i][0], channel, rank)
                  for rank, i in enumerate(picks, 1)]
        for k, ((priority, p, v), verdict) in enumerate(zip(candidates, verdicts)):
            verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
            if observe and not req.preview and (verdict == "budget" or verdict.startswith(("limit:", "campaign_"))):
                metrics.contact_suppressed.inc(
                    "budget" if verdict == "budget" else "campaign_budget" if verdict.startswith("campaign_")
                    else limits[int(verdict.split(":")[1]) - 1].name)
            if verdict == "ok":
                if funnel is not None:
                    funnel.append(FunnelEntry(v.action.id, "ranked", f"rank {picks.index(k) + 1}", p, priority))
            elif funnel is not None:
                funnel.append(FunnelEntry(v.action.id, *present_detail(verdict, v, limits, max_actions), p, priority))
        if fb and fallback is not None:
            ranked = [fallback_ranked(fallback, channel)]
        decision.actions = _exploring(ranked) if exploring else ranked
        _logging_policy(decision, candidates, [[int(i) for i in s] for s in reply[2]], epsilon, exploring)
        return None

    def _write_records(self, decision: Decision, req: DecideInput, place: str, ix: Interactions,
                       replace: bool) -> str | None:
        """Without contact enforcement: the decision record off the hot path, and the interaction's
        decision for this placement (unless a concurrent call stored one first: then that one)."""
        if self.decision_log is not None:
            a = decision.actions
            bucket, field = records.location(decision.decision_id)
            value = records.encode(self.responses.codes, decision.decision_id, {
                "actions": ",".join(x.action_id for x in a), "groups": ",".join(x.group for x in a),
                "types": ",".join(x.type for x in a), "values": ",".join(f"{x.value:g}" for x in a),
                "customer": req.customer_id, "channel": req.channel, "control": "1" if decision.control else "0",
                "ts": f"{decision.decided_at:.3f}", "ruleset": decision.ruleset_version,
                "model": decision.model_version, "counted": "1",
            })
            self.decision_log.write_record(bucket, {field: value}, records.ttl_ms(decision.decision_id, ix.accept_ms),
                                           req.customer_id, decision.decision_id,
                                           records.minute_index(decision.decision_id, req.customer_id, ix.accept_ms))
        if not req.interaction_id:
            return None
        key = interaction_key(req.customer_id, req.interaction_id)
        body = (f'{{"h":{_header(decision, DECIDE)},"fb":false,'
                f'"a":[{",".join(interactions.action_body(a) for a in decision.actions)}]}}')
        pipe = self.store.client.pipeline(transaction=False)
        if replace:
            pipe.hset(key, place, body)
        else:
            pipe.hsetnx(key, place, body)
        pipe.hget(key, place)
        pipe.pexpire(key, ix.window_ms)  # from the latest decision here (PRESENT: from the first)
        index_record(pipe, req.customer_id, own_member(req.customer_id, key), ix.window_ms)  # for erasure, export
        first, winner = pipe.execute()[:2]
        return None if first else winner.decode()

    def _score(self, rules: CompiledRules, model: LoadedModel, x: np.ndarray, admitted: list[int]) -> np.ndarray:
        """Propensity of every admitted action in one call of the model bound to the catalog: the
        shared row ``x`` (customer block, channel) against the admitted catalog rows."""
        if not admitted:
            return np.empty(0)
        scorer, adapter = self._scorer(rules, model)
        return scorer.predict(x if adapter is None else adapter(x), np.asarray(admitted, dtype=np.int64))

    def _register_features(self, schema: FeatureSchema) -> None:
        """Record once which names and levels the logged model input of ``schema`` has, so that training
        reads decisions logged under it by name after domain.yaml changed."""
        fingerprint = schema.fingerprint()
        if fingerprint in self._feature_layouts:
            return
        rows = model_input(schema)
        levels = {k: v for k, v in rows.feature_levels().items() if k in rows.customer_features}
        try:
            self.store.client.hsetnx(FEATURE_LAYOUTS_KEY, fingerprint,
                                     json.dumps({"features": list(rows.customer_features), "levels": levels}))
        except redis.exceptions.RedisError as exc:
            log.warning("cannot record the feature layout %s: %s", fingerprint, exc)
            return
        self._feature_layouts.add(fingerprint)

    def _record(self, decision: Decision, req: DecideInput, degraded_by: str | None) -> None:
        """Metrics and the decision log; a repeat or a preview is not a new decision."""
        if decision.repeat or decision.preview:
            metrics.interaction_decisions.inc("repeat" if decision.repeat else "preview")
            return
        metrics.interaction_decisions.inc("new")
        metrics.decisions.inc(decision.channel)
        metrics.model_decisions.inc(decision.model_version, decision.model_role)
        if decision.explored:
            metrics.EXPLORATION.labels(decision.explored_top).inc()
        for a in decision.actions:
            metrics.actions_presented.inc(a.action_id, a.type, decision.channel)
        if decision.cold_start:
            metrics.COLD_STARTS.inc()
        if degraded_by:
            metrics.DEGRADED.labels(degraded_by).inc()
        if self.decision_log is not None:
            if decision.schema is not None and decision.features is not None:
                self._register_features(decision.schema)
            self.decision_log.write({
                "decision_id": decision.decision_id,
                "customer_id": decision.customer_id,
                "channel": decision.channel,
                "touchpoint": req.touchpoint,
                **({"interaction_id": req.interaction_id} if req.interaction_id else {}),
                "actions": ",".join(a.action_id for a in decision.actions),
                "types": ",".join(a.type for a in decision.actions),
                "values": ",".join(f"{a.value:g}" for a in decision.actions),
                "propensities": ",".join(f"{a.propensity:.5f}" for a in decision.actions),
                "control": "1" if decision.control else "0",
                "ruleset_version": decision.ruleset_version,
                "model_version": decision.model_version,
                "model_role": decision.model_role,
                "explored": "1" if decision.explored else "0",
                **_choice_fields(decision),
                **_uplift_fields(decision),
                **({"shadow_model": decision.shadow_version,
                    "shadow_propensities": ",".join(f"{p:.5f}" for p in decision.shadow_propensities),
                    "shadow_top": decision.shadow_top} if decision.shadow_version else {}),
                **({"features": model_input(decision.schema).encode_features(decision.features),
                    "feature_schema": decision.schema.fingerprint()}
                   if decision.features is not None and decision.schema is not None and decision.actions else {}),
                "degraded": "1" if decision.degraded else "0",
                "ts": f"{decision.decided_at:.3f}",
                **_campaign_fields(decision),
            })


def without_offer(treated: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """P(take | not shown) = sigmoid(logit P(take | shown) + the organic model's logit shift), the shift
    scored as sigmoid(shift) (``models.training.fit_organic``)."""
    t = np.clip(treated, 1e-9, 1 - 1e-9)
    s = np.clip(shift, 1e-9, 1 - 1e-9)
    return 1.0 / (1.0 + (1 - t) * (1 - s) / (t * s))


def _uplift(decision: Decision, admitted: list[ActionVerdict], propensity: np.ndarray, explore: np.ndarray | None,
            organic: np.ndarray) -> np.ndarray:
    """Uplift arbitration's ranking: P(take | shown) (blended with the Thompson sample when exploring) less
    P(take | not shown), per admitted action; both kept with the decision."""
    decision.uplift = {v.action.id: (p, q, v.action.value * v.weight)
                       for v, p, q in zip(admitted, propensity.tolist(), organic.tolist())}
    return (propensity if explore is None else explore) - organic


def _no_uplift(candidates: list, uplift: dict[str, tuple[float, float, float]],
               funnel: list[FunnelEntry] | None) -> list:
    """Drop the offers whose estimated uplift is not above zero (stage ``no_uplift``): shown, they would
    reach only customers who take them anyway, or push them away. Service actions stay."""
    kept = []
    for c in candidates:
        if c[0] > 0 or c[2].action.service:
            kept.append(c)
        elif funnel is not None:
            p, q, _ = uplift[c[2].action.id]
            funnel.append(FunnelEntry(c[2].action.id, "no_uplift", f"uplift arbitration: {p:.3f} if shown, "
                                      f"{q:.3f} without: showing it gains nothing", p, c[0]))
    return kept


def _uplift_fields(decision: Decision) -> dict[str, str]:
    """Uplift arbitration's record: ``arbitration``, each presented action's estimated uplift (``uplifts``,
    aligned with ``actions``) and, when exploring, each candidate's (``candidate_uplifts``, aligned with
    ``candidates``): what ``nba report``'s Qini curves rank by."""
    if not decision.uplift:
        return {}

    def gain(action_id: str) -> str:
        p, q, _ = decision.uplift.get(action_id, (0.0, 0.0, 0.0))
        return f"{p - q:.6g}"

    out = {"arbitration": "uplift", "uplifts": ",".join(gain(a.action_id) for a in decision.actions)}
    if decision.candidates:
        out["candidate_uplifts"] = ",".join(gain(a) for a, _ in decision.candidates)
    return out


def _campaign_fields(decision: Decision) -> dict[str, str]:
    """The decision stream's campaign fields: each action's campaign (aligned with ``actions``), and the
    campaigns in play for the customer (``nba campaign report``); none without campaigns."""
    out = {}
    if any(a.campaign for a in decision.actions):
        out["campaigns"] = ",".join(a.campaign for a in decision.actions)
    if decision.campaign_eligible:
        out["campaign_eligible"] = ",".join(decision.campaign_eligible)
    if decision.campaign_control:
        out["campaign_control"] = ",".join(decision.campaign_control)
    return out


def _choice_fields(decision: Decision) -> dict[str, str]:
    """The decision stream's record of the logging policy (``engine.decision.choice``): ``probabilities``
    (each presented action's at its slot; absent when not known), ``epsilon``, and for an exploring
    decision ``candidates`` (the walk's, in ranked order: ``<action>:<value x weight>``) and ``choice_sets``
    (per slot, the feasible candidates' indexes, space-separated; slots separated by ``;``)."""
    if decision.epsilon <= 0:
        return {"epsilon": "0"} if decision.probabilities is None else {
            "epsilon": "0", "probabilities": ",".join("1" for _ in decision.probabilities)}
    out = {"epsilon": f"{decision.epsilon:g}"}
    if decision.probabilities is not None:  # "" for a decision that showed nothing (probability 1)
        out["probabilities"] = ",".join(f"{p:.9g}" for p in decision.probabilities)
    if decision.candidates:
        out["candidates"] = ",".join(f"{a}:{m:.9g}" for a, m in decision.candidates)
        out["choice_sets"] = ";".join(" ".join(map(str, s)) for s in decision.choice_sets)
    return out


def _late_ms(deadline: float) -> int:
    """The caller's deadline (``time.monotonic()``) in epoch ms, as Redis's clock reads it; 0: none."""
    return int((time.time() + deadline - time.monotonic()) * 1000) if deadline else 0


EXPLORING = "exploring: ranked on the model blended with a Thompson sample"


def _epsilon(config: ExplorationConfig, req: DecideInput, control: bool, now: float,
             slots: int) -> tuple[float, list[float] | None]:
    """This decision's exploration share per slot and its draws (``engine.decision.choice``): none for
    another strategy, a named ranking, or the control group (unless ``control`` is configured)."""
    if config.strategy != "epsilon" or not config.enabled or req.ranking or (control and not config.control):
        return 0.0, None
    return config.share, choice.draws(req.customer_id, Explorer.period(config, now), slots)


def _logging_policy(decision: Decision, candidates: list, sets: list[list[int]], epsilon: float,
                    sampled: bool = False) -> None:
    """Record with ``decision`` how the logging policy chose its actions and with what probability: each
    presented action's at its slot (1 for a fallback, which no draw chose); none when a Thompson sample
    (``sampled``) ranked, whose probabilities have no closed form."""
    decision.epsilon = epsilon
    decision.explored = sampled or bool(sets)
    if sampled:
        decision.probabilities = None
        return
    if epsilon <= 0:  # the ranking's choice at every slot (or the fallback): nothing more is logged
        decision.probabilities = [1.0] * len(decision.actions)
        return
    decision.candidates = [(v.action.id, v.action.value * v.weight) for _, _, v in candidates]
    decision.choice_sets = sets
    index = {action_id: i for i, (action_id, _) in enumerate(decision.candidates)}
    decision.probabilities = []
    for slot, a in enumerate(decision.actions):
        if slot >= len(sets) or index.get(a.action_id) not in sets[slot]:
            decision.probabilities.append(1.0)  # the fallback
            continue
        at = sets[slot].index(index[a.action_id])
        p = choice.slot_probability(epsilon, len(sets[slot]), at)
        decision.probabilities.append(p)
        if at:
            a.reasons.append(f"exploring: drawn from the {len(sets[slot])} actions that could be shown "
                             f"(probability {p:.3f})")
    if sets:
        first = index.get(decision.actions[0].action_id) if decision.actions else None
        decision.explored_top = "same" if first == sets[0][0] else "changed"


def _exploring(ranked: list[RankedAction]) -> list[RankedAction]:
    for a in ranked:
        if a.propensity > 0 or not a.reasons[0].startswith("fallback"):
            a.reasons.append(EXPLORING)
    return ranked


def _header(decision: Decision, mode: str) -> str:
    return interactions.header(
        id=decision.decision_id, rules=decision.ruleset_version, model=decision.model_version,
        role=decision.model_role, ch=decision.channel, mode=mode, ts=decision.decided_at, cold=decision.cold_start,
        degraded=decision.degraded, situations=decision.situations, control=decision.control,
        explored=decision.explored)


def _one_voice(candidates: list, tops: dict[str, str], interaction_id: str, funnel: list[FunnelEntry] | None) -> list:
    """Drop the rivals of what earlier placements of this interaction put on top: another action of the
    same group (another price of the same offer family) would contradict what the customer was told."""
    if not tops:
        return candidates
    kept = []
    for c in candidates:
        action = c[2].action
        top = tops.get(action.group)
        if top is None or top == action.id:
            kept.append(c)
        elif funnel is not None:
            funnel.append(FunnelEntry(action.id, "one_voice", f"interaction {interaction_id} already offers {top} "
                                      f"of group {action.group}", c[1], c[0]))
    return kept


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
