"""Run a compiled rule set: one ``assert_fact`` per decision through durable's C engine.

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
from dataclasses import dataclass, replace
from datetime import date
from typing import NamedTuple

import durable_rules_engine

from .compile import Plan, create_ruleset, plan
from .errors import RuleErrors
from .evaluate import evaluate as evaluate_tree
from .facts import FactInputs, FactLayout, encode_fact, inputs_from_profile
from .model import Action, Policy, RuleSet

log = logging.getLogger(__name__)
_names = itertools.count(1)


@dataclass(frozen=True)
class RuleOutcome:
    """What held for one fact.

    ``fired`` counts durable firings (for metrics): one per rule that held, except rules listed in
    ``CompiledRules.plan.may_repeat`` (conditions too large to make exclusive), which may fire more.
    """

    situations: frozenset[str]
    policies: frozenset[str]
    levers: frozenset[str]
    eligible: frozenset[str]  # action ids whose eligibility holds (actions without one included)
    fired: int = 0
    degraded: bool = False  # durable failed; computed by the Python evaluator instead


class ActionVerdict(NamedTuple):
    """One action for one decision, after the rule stage.

    stage: "admitted", or where it dropped out: "channel" (no treatment for the channel),
    "dates" (outside valid_from..valid_to), "eligibility" (its condition is false),
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
        self.plan = the_plan
        self.layout = FactLayout(the_plan.fields)
        self.name = f"nba-{ruleset.version}-{next(_names)}"
        self._lock = threading.Lock()
        self._sids = itertools.count(1)
        self._holder = [create_ruleset(self.name, the_plan)]  # the durable handle (swapped by _rebuild)
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
        self._static_cache: dict[tuple[str, date], list] = {}

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
            payload = encode_fact(fact, sid)  # may raise ValueError before touching the engine
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
        return self._outcome(fired)

    def _rebuild(self) -> None:
        """Swap in a fresh durable ruleset (dropping every session of the old one); lock held."""
        old = self._holder[0]
        self._holder[0] = create_ruleset(f"{self.name}-r{next(self._sids)}", self.plan)
        _delete_handle(old)

    def _outcome(self, fired: list[str]) -> RuleOutcome:
        always = self.plan.always
        found = {kind: set(names) for kind, names in always.items()}
        names = self.plan.rule_names
        count = 0
        for rule in fired:
            kind, name = names[rule]
            if kind in found:
                found[kind].add(name)
                count += 1
        return RuleOutcome(
            situations=frozenset(found["situation"]),
            policies=frozenset(found["policy"]),
            levers=frozenset(found["lever"]),
            eligible=frozenset(found["action"]),
            fired=count,
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
            eligible=frozenset(a.id for a in rs.actions if a.eligible is None or holds(a.eligible)),
        )

    # --- per-action verdicts ------------------------------------------------------------------------
    def verdicts(self, outcome: RuleOutcome, channel: str, today: date | None = None) -> list[ActionVerdict]:
        """A verdict for every action of the catalog, in catalog order."""
        static = self._static_verdicts(channel, today or date.today())
        fired_policies = [p for p in self._policies if p in outcome.policies]
        fired_levers = [lv for lv in self._levers if lv in outcome.levers]
        eligible = outcome.eligible
        out = []
        for action, dropped, base_weight in static:
            if dropped is not None:
                out.append(dropped)
                continue
            aid = action.id
            if aid not in eligible:
                out.append(ActionVerdict(action, False, "eligibility"))
                continue
            if fired_policies:
                blocked = tuple(p for p in fired_policies if aid in self._policy_blocks[p])
                if blocked:
                    reasons = tuple(self._policies[p].reason for p in blocked)
                    out.append(ActionVerdict(action, False, "policy", blocked, reasons))
                    continue
            weight, levers = base_weight, ()
            if fired_levers:
                levers = tuple(lv for lv in fired_levers if aid in self._lever_targets[lv])
                for lv in levers:
                    weight *= self._levers[lv].weight
            out.append(ActionVerdict(action, True, "admitted", (), (), levers, weight))
        return out

    def _static_verdicts(self, channel: str, today: date):
        """Per action: (action, verdict when dropped for channel/dates else None, context weight)."""
        key = (channel, today)
        cached = self._static_cache.get(key)
        if cached is None:
            weights = self.ruleset.context_weights.get(channel, {})
            cached = []
            for action in self.ruleset.actions:
                if channel not in action.channels:
                    cached.append((action, ActionVerdict(action, False, "channel"), 0.0))
                elif not action.valid_on(today):
                    cached.append((action, ActionVerdict(action, False, "dates"), 0.0))
                else:
                    cached.append((action, None, weights.get(action.type, 1.0)))
            if len(self._static_cache) > 256:
                self._static_cache.clear()
            self._static_cache[key] = cached
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

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> CompiledRules:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _delete_handle(handle: int) -> None:
    try:
        durable_rules_engine.delete_ruleset(handle)
    except Exception:
        pass


def _delete_ruleset(holder: list[int]) -> None:
    _delete_handle(holder[0])


def compile_rules(ruleset: RuleSet) -> CompiledRules:
    """Compile ``ruleset``; raises ``RuleErrors`` for conditions the engine cannot take."""
    the_plan, errors = plan(ruleset)
    if errors:
        raise RuleErrors(errors)
    return CompiledRules(ruleset, the_plan)
