"""Run a compiled rule set: one ``assert_fact`` per decision through durable's C engine (situations,
policies), then every action's engagement conditions and the levers in one numba call (vector.py),
then admission and weights in another.

The raw C API is used directly (not ``durable.lang.Host``, which starts polling threads and never
frees rulesets). Each ``evaluate`` uses a fresh session id and always deletes its state, so at most
one state is alive per ruleset (durable holds 1024). The C engine is not thread-safe: one lock per
compiled ruleset serialises the engine calls.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import NamedTuple

import durable_rules_engine
import numba
import numpy as np

from engine.rules.compile import Plan, create_ruleset, plan
from engine.rules.errors import RuleErrors
from engine.rules.evaluate import evaluate as evaluate_tree
from engine.rules.facts import FactEncoder, FactInputs, FactLayout, inputs_from_profile
from engine.rules.loader import load_rules
from engine.rules.model import Action, Policy, RuleSet
from engine.rules.patterns import compile_patterns

log = logging.getLogger(__name__)
_names = itertools.count(1)


@dataclass(frozen=True)
class RuleOutcome:
    """What held for one fact.

    ``fired`` counts durable firings (for metrics): one per rule that held, except rules listed in
    ``CompiledRules.plan.may_repeat`` (conditions too large to make exclusive), which may fire more.
    ``mask`` is ``eligible`` as one bool per catalog action, in catalog order; ``fact`` the fact
    evaluated (for explanations).
    """

    situations: frozenset[str]
    policies: frozenset[str]
    levers: frozenset[str]
    eligible: frozenset[str]  # action ids whose engagement conditions (eligible, applicable, suitable,
    #                           the action's and its group's) all hold; actions without any included
    fired: int = 0
    degraded: bool = False  # durable failed; computed by the Python evaluator instead
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    fact: dict | None = field(default=None, compare=False, repr=False)


class ActionVerdict(NamedTuple):
    """One action for one decision, after the rule stage.

    stage: "admitted", or where it dropped out: "channel" (no treatment for the channel),
    "dates" (outside valid_from..valid_to), "eligibility", "applicability" or "suitability" (that
    engagement condition of the action or its group is false; ``reasons`` holds its text),
    "policy" (blocked by the policies in ``blocked_by``; ``reasons`` holds their reasons).
    weight: context weight for the channel x product of the weights of ``levers``.
    """

    action: Action
    admitted: bool
    stage: str
    blocked_by: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    levers: tuple[str, ...] = ()
    weight: float = 1.0


class CompiledRules:
    """A rule set compiled into a durable ruleset. Build with ``compile_rules(ruleset)``."""

    def __init__(self, ruleset: RuleSet, the_plan: Plan):
        self.ruleset = ruleset
        self.version = ruleset.version
        self.schema = ruleset.schema
        self.plan = the_plan
        self.layout = FactLayout(the_plan.fields, ruleset.schema)
        self.name = f"nba-{ruleset.version}-{next(_names)}"
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._holder = [_create(self.name, the_plan)]  # the durable handle (swapped by _rebuild)
        self.engine_errors = 0  # durable failures answered by the Python evaluator
        # Frees the durable ruleset when this object is collected, or at close() (once).
        # (weakref.finalize holds the holder list, not self, so collection is not prevented.)
        self._finalizer = weakref.finalize(self, _delete_ruleset, self._holder)
        self._policy_blocks = {
            p.name: frozenset(a.id for a in ruleset.actions if p.blocks.matches(a)) for p in ruleset.policies
        }
        self._lever_targets = {
            lv.name: frozenset(a.id for a in ruleset.actions if lv.targets.matches(a)) for lv in ruleset.levers
        }
        self._policies = {p.name: p for p in ruleset.policies}
        self._levers = {lv.name: lv for lv in ruleset.levers}
        self._program = the_plan.eligibility
        self._encoder = FactEncoder({f: self.layout.fields[f] for f in the_plan.durable_fields})
        self._ids = tuple(a.id for a in ruleset.actions)
        # One row per policy / lever over the catalog: which actions it blocks, what it multiplies by.
        actions = ruleset.actions
        self._policy_row = {p.name: i for i, p in enumerate(ruleset.policies)}
        self._lever_row = {lv.name: i for i, lv in enumerate(ruleset.levers)}
        self._blocks = np.array([[p.blocks.matches(a) for a in actions] for p in ruleset.policies],
                                dtype=np.bool_).reshape(len(ruleset.policies), len(actions))
        self._lever_weights = np.array([[lv.weight if lv.targets.matches(a) else 1.0 for a in actions]
                                        for lv in ruleset.levers]).reshape(len(ruleset.levers), len(actions))
        self._static_cache: dict[tuple[str, date, frozenset[str]], tuple] = {}
        # The event patterns' own durable ruleset, built and freed with this one (hot reload swaps both).
        self.patterns = compile_patterns(ruleset.events, ruleset.version)

    # --- facts --------------------------------------------------------------------------------------
    @property
    def fact_fields(self) -> dict[str, str]:
        """Fact field name -> kind ("num", "str", "bool") for every field some rule reads."""
        return dict(self.layout.fields)

    def build_fact(self, source=None, derived=None, channel: str = "", touchpoint: str = "",
                   context=None, **fields) -> dict:
        """The fact for one decision, holding every field a rule reads (defaults for missing data).

        ``source`` is a ``FactInputs``; or a store ``Profile`` (duck-typed) with ``derived`` (the
        DERIVED vector), ``channel``, ``touchpoint`` and ``context``; or None with the
        ``FactInputs`` fields as keywords.
        """
        if source is None:
            inputs = FactInputs(channel=channel, touchpoint=touchpoint, context=context or {}, **fields)
        elif isinstance(source, FactInputs):
            inputs = source
        else:
            inputs = inputs_from_profile(source, derived, channel, touchpoint, context)
        return self.layout.build(inputs)

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, fact: dict) -> RuleOutcome:
        """Assert ``fact`` once and collect every rule that fired.

        ``fact`` comes from ``build_fact`` (it must hold every field in ``fact_fields``). If durable
        itself fails (it should not: see network.py), the session is not touched again
        (deleting a session whose actions did not all run frees uninitialised memory in durable), the
        durable ruleset is replaced by a fresh one (deleting a ruleset never touches its sessions),
        and the outcome comes from the Python evaluator with ``degraded=True``.
        """
        failed = False
        fired: list[str] = []
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError(f"rule set {self.name} is closed")
            handle = self._holder[0]
            sid = str(next(self._sids))
            payload = self._encoder.encode(fact, sid)  # may raise ValueError before touching the engine
            try:
                state = durable_rules_engine.assert_fact(handle, payload)[1]
                result = durable_rules_engine.start_action_for_state(handle, state)
                if result is None:  # cannot happen: nba$all always fires
                    raise RuntimeError("no rule fired, not even nba$all")
                message = result[1]
                while message:
                    # message is '{"<rule name>":{"m":{...}}}'
                    fired.append(message[2 : message.index('"', 2)])
                    message = durable_rules_engine.complete_and_start_action(handle, state)
                # Only now, with every action completed, is the session safe to delete.
                durable_rules_engine.delete_state(handle, sid)
            except Exception as err:
                failed = True
                log.error("durable-rules failed on %s (%s); rebuilding it and using the Python evaluator",
                          self.name, err)
                self._rebuild()
                self.engine_errors += 1
        if failed:
            return replace(self.evaluate_python(fact), degraded=True)
        return self._outcome(fired, fact)

    def _rebuild(self) -> None:
        """Swap in a fresh durable ruleset (dropping every session of the old one); lock held."""
        old = self._holder[0]
        self._holder[0] = _create(f"{self.name}-r{next(self._sids)}", self.plan)
        _delete_handle(old)

    def _outcome(self, fired: list[str], fact: dict) -> RuleOutcome:
        always = self.plan.always
        found: dict[str, list[str]] = {"situation": [], "policy": [], "lever": [], "action": []}
        names = self.plan.rule_names
        for rule in fired:
            kind, name = names[rule]
            if kind in found:
                found[kind].append(name)
        situations = frozenset(found["situation"]).union(always["situation"])
        if self._program is not None:  # actions' engagement, then levers
            held = self._program.run(fact, situations)
            mask = held[: len(self._ids)]
            verdicts = held.tolist()
            eligible = frozenset(itertools.compress(self._ids, verdicts))
            levers = frozenset(itertools.compress(self._lever_row, verdicts[len(self._ids):]))
        else:
            eligible = frozenset(found["action"]).union(always["action"])
            mask = np.array([aid in eligible for aid in self._ids], dtype=np.bool_)
            levers = frozenset(found["lever"]).union(always["lever"])
        return RuleOutcome(
            situations=situations,
            policies=frozenset(found["policy"]).union(always["policy"]),
            levers=levers,
            eligible=eligible,
            fired=sum(map(len, found.values())),
            mask=mask,
            fact=fact,
        )

    def evaluate_python(self, fact: dict) -> RuleOutcome:
        """The same outcome computed by the tree-walking interpreter (oracle and explanations)."""
        rs = self.ruleset
        sits = rs.situation_conditions()

        def holds(expr) -> bool:
            return bool(evaluate_tree(expr, fact, sits))

        return RuleOutcome(
            situations=frozenset(n for n, s in rs.situations.items() if holds(s.when)),
            policies=frozenset(p.name for p in rs.policies if holds(p.when)),
            levers=frozenset(lv.name for lv in rs.levers if holds(lv.when)),
            eligible=frozenset(a.id for a in rs.actions if all(holds(c) for _, _, c in rs.stage_conditions(a))),
            fact=fact,
        )

    # --- per-action verdicts ------------------------------------------------------------------------
    def verdicts(self, outcome: RuleOutcome, channel: str, today: date | None = None,
                 now: float | None = None) -> list[ActionVerdict]:
        """A verdict for every action of the catalog, in catalog order (for explanations)."""
        static, _, _ = self._static(channel, today or date.today(), now)
        admitted = dict(zip(*self.admitted(outcome, channel, today, now)))
        eligible = self._mask(outcome)
        fired = self._in_order(outcome.policies, self._policy_row)
        out = []
        for i, action in enumerate(self.ruleset.actions):
            if static[i] is not None:
                out.append(static[i])
            elif not eligible[i]:
                stage, text = self._failed_stage(action, outcome)
                out.append(ActionVerdict(action, False, stage, (), (text,)))
            elif i in admitted:
                out.append(admitted[i])
            else:
                names = tuple(p for p in fired if self._blocks[self._policy_row[p], i])
                out.append(ActionVerdict(action, False, "policy", names, tuple(self._policies[p].reason for p in names)))
        return out

    def _failed_stage(self, action: Action, outcome: RuleOutcome) -> tuple[str, str]:
        """The first engagement condition of ``action`` that is false: (verdict stage, its text)."""
        if outcome.fact is not None:
            sits = self.ruleset.situation_conditions()
            for stage, text, condition in self.ruleset.stage_conditions(action):
                if not evaluate_tree(condition, outcome.fact, sits):
                    return _STAGE_OF[stage], text
        return "eligibility", action.eligible_text

    def admitted(self, outcome: RuleOutcome, channel: str, today: date | None = None,
                 now: float | None = None) -> tuple[list[int], list[ActionVerdict]]:
        """The catalog indices and verdicts of the admitted actions only (the decision's hot path).
        ``now`` (epoch seconds): the campaigns running at that moment; else those running on ``today``."""
        admitted, weight = self._decide(outcome, channel, today, now)
        index = np.flatnonzero(admitted).tolist()
        if not index:
            return index, []
        actions, weights = self.ruleset.actions, weight.tolist()
        levers = self._in_order(outcome.levers, self._lever_row)
        if not levers:
            return index, [ActionVerdict(actions[i], True, "admitted", (), (), (), weights[i]) for i in index]
        targets = self._lever_targets
        return index, [ActionVerdict(actions[i], True, "admitted", (), (),
                                     tuple(lv for lv in levers if actions[i].id in targets[lv]), weights[i])
                       for i in index]

    def _mask(self, outcome: RuleOutcome) -> np.ndarray:
        if outcome.mask is not None:
            return outcome.mask
        return np.array([aid in outcome.eligible for aid in self._ids], dtype=np.bool_)

    @staticmethod
    def _in_order(names: frozenset[str], rows: dict[str, int]) -> list[str]:
        """``names`` (fired policies / levers) in file order."""
        return sorted(names, key=rows.__getitem__) if len(names) > 1 else list(names)

    def _decide(self, outcome: RuleOutcome, channel: str, today: date | None, now: float | None = None):
        """Per catalog action (numpy arrays): admitted, and its weight (context x fired levers, in
        file order so the rounding is always the same)."""
        _, offered, base = self._static(channel, today or date.today(), now)
        policies = np.array([self._policy_row[p] for p in outcome.policies], dtype=np.intp) if outcome.policies else _NONE
        levers = np.array(sorted(self._lever_row[lv] for lv in outcome.levers), dtype=np.intp) if outcome.levers else _NONE
        admitted = np.empty(len(self._ids), dtype=np.bool_)
        weight = np.empty(len(self._ids))
        _admit(offered, self._mask(outcome), self._blocks, policies, self._lever_weights, levers, base,
               admitted, weight)
        return admitted, weight

    def _static(self, channel: str, today: date, now: float | None = None):
        """Per action for this channel and day (and, for campaigns, the moment ``now`` or else the day):
        the verdict when dropped for channel/dates (else None), whether it may be offered (bool array)
        and its context weight (float array)."""
        campaigns = self.ruleset.campaigns
        running = frozenset(c.name for c in campaigns.values()
                            if (c.live(now) if now is not None else c.live_on(today))) if campaigns else frozenset()
        key = (channel, today, running)
        cached = self._static_cache.get(key)
        if cached is None:
            weights = self.ruleset.context_weights.get(channel, {})
            static: list[ActionVerdict | None] = []
            for action in self.ruleset.actions:
                if channel not in action.channels:
                    static.append(ActionVerdict(action, False, "channel"))
                elif not action.valid_on(today):
                    static.append(ActionVerdict(action, False, "dates"))
                elif action.campaign and action.campaign not in running:
                    campaign = campaigns[action.campaign]
                    static.append(ActionVerdict(action, False, "dates", (),
                                                (f"campaign {campaign.name} runs {campaign.describe_dates()}",)))
                else:
                    static.append(None)
            offered = np.array([v is None for v in static], dtype=np.bool_)
            campaigns = self.ruleset.campaigns
            base = np.array([weights.get(a.type, 1.0) * (campaigns[a.campaign].priority if a.campaign else 1.0)
                             if ok else 0.0 for a, ok in zip(self.ruleset.actions, offered.tolist())])
            if len(self._static_cache) > 256:
                self._static_cache.clear()
            cached = self._static_cache[key] = (static, offered, base)
        return cached

    # --- conveniences for the decision funnel ---------------------------------------------------------
    @property
    def catalog(self) -> tuple[Action, ...]:
        """The actions, in catalog order."""
        return self.ruleset.actions

    @property
    def loaded_at(self):
        return self.ruleset.loaded_at

    def blocked_actions(self, outcome: RuleOutcome) -> dict[str, Policy]:
        """Action id -> the first fired policy (in file order) that blocks it."""
        blocked: dict[str, Policy] = {}
        for name, policy in self._policies.items():
            if name in outcome.policies:
                for aid in self._policy_blocks[name]:
                    blocked.setdefault(aid, policy)
        return blocked

    def weights(self, action: Action, outcome: RuleOutcome, channel: str) -> tuple[float, list[str]]:
        """Context weight x fired lever weights for ``action`` on ``channel``, with readable reasons."""
        weight, reasons = 1.0, []
        context = self.ruleset.context_weights.get(channel, {}).get(action.type)
        if context is not None and context != 1.0:
            weight *= context
            reasons.append(f"context {channel}/{action.type} x{context:g}")
        campaign = self.ruleset.campaign_of(action)
        if campaign is not None and campaign.priority != 1.0:
            weight *= campaign.priority
            reasons.append(f"campaign {campaign.name} priority x{campaign.priority:g}")
        for name, lever in self._levers.items():
            if name in outcome.levers and action.id in self._lever_targets[name]:
                weight *= lever.weight
                reasons.append(f"lever {name} x{lever.weight:g}")
        return weight, reasons

    def fallback_action(self, channel: str) -> Action | None:
        """The action shown on ``channel`` when nothing survives."""
        return self.ruleset.fallback_for(channel)

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the durable ruleset now (waits for an evaluation in progress). Idempotent."""
        with self._lock:
            self._finalizer()
        if self.patterns is not None:
            self.patterns.close()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> CompiledRules:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@numba.njit(cache=True, nogil=True)
def _admit(offered, eligible, blocks, policies, lever_weights, levers, base, admitted, weight):  # pragma: no cover
    """admitted = offered and eligible and blocked by none of ``policies`` (rows of ``blocks``);
    weight = base x the ``levers`` rows of ``lever_weights``, multiplied in that order."""
    for a in range(offered.shape[0]):
        ok = offered[a] and eligible[a]
        if ok:
            for p in policies:
                if blocks[p, a]:
                    ok = False
                    break
        admitted[a] = ok
        w = base[a]
        for lv in levers:
            w = w * lever_weights[lv, a]
        weight[a] = w


_NONE = np.empty(0, dtype=np.intp)  # no fired policies / levers
_STAGE_OF = {"eligible": "eligibility", "applicable": "applicability", "suitable": "suitability"}


_live_handles: set[int] = set()  # durable rulesets created here and not deleted yet
_handles_lock = threading.Lock()


def open_rulesets() -> int:
    """How many durable rulesets this process holds (one per live CompiledRules: a reload that
    leaked would make this grow)."""
    with _handles_lock:
        return len(_live_handles)


def _create(name: str, the_plan: Plan) -> int:
    handle = create_ruleset(name, the_plan)
    with _handles_lock:
        _live_handles.add(handle)
    return handle


def _delete_handle(handle: int) -> None:
    with _handles_lock:
        _live_handles.discard(handle)
    try:
        durable_rules_engine.delete_ruleset(handle)
    except Exception:
        pass


def _delete_ruleset(holder: list[int]) -> None:
    _delete_handle(holder[0])


def compile_rules(ruleset: RuleSet, eligibility: str = "vector") -> CompiledRules:
    """Compile ``ruleset``; raises ``RuleErrors`` for conditions the engine cannot take.

    ``eligibility="durable"`` compiles every action's eligibility into a durable rule (the naive
    design: the test oracle and benchmark baseline) instead of the numba program.
    """
    the_plan, errors = plan(ruleset, eligibility)
    if errors:
        raise RuleErrors(errors)
    return CompiledRules(ruleset, the_plan)


def load_and_compile(rules_dir: Path) -> CompiledRules:
    """Load, check and compile the rules in ``rules_dir``; raises ``RuleErrors`` listing every problem."""
    ruleset, errors = load_rules(Path(rules_dir))
    if errors:
        raise RuleErrors(errors)
    assert ruleset is not None
    return compile_rules(ruleset)
