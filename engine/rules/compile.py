"""Compile a ``RuleSet`` into one durable-rules ruleset (JSON condition language, no Python DSL).

One durable rule per situation (``sit$<name>``) and engagement policy (``pol$<name>``): the policy
outcomes. A condition that needed splitting gets ``#1``, ``#2``... suffixes (its pieces exclude each
other, so at most one fires; see ``Plan.may_repeat`` for the exception). Situations are inlined
everywhere, so one ``assert_fact`` of one fact decides them all. Constant conditions get no durable
rule. One extra rule, ``nba$all``, matches every fact (durable must run an action in every session it
deletes).

The per-action engagement conditions (each action's and its group's ``eligible``, ``applicable`` and
``suitable``) and the levers' conditions (priority weights for arbitration) are compiled to an
``EligibilityProgram`` (vector.py) run after durable, reading the situations durable decided.
``plan(ruleset, eligibility="durable")`` compiles them into durable rules instead (``act$<id>``, one
firing per eligible action, and ``lev$<name>``): the naive design, kept as the oracle the program is
tested against and as the benchmark's baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import durable_rules_engine

from engine.rules.errors import RuleError, RuleErrors
from engine.rules.facts import ZERO_FIELD, to_json
from engine.rules.model import RuleSet
from engine.rules.network import GUARD_FIELD, RULE_LIMIT, TooManyRules, arrange, rule_stack
from engine.rules.nodes import FLIPPED, And, Arith, Bool, Compare, Field, Neg, Node, Num, Or, Str, walk
from engine.rules.normalize import MAX_MARKERS, TooComplex, markers, prepare
from engine.rules.vector import EligibilityProgram

PREFIX = {"situation": "sit", "policy": "pol", "lever": "lev", "action": "act"}
MAX_FACT_FIELDS = 250  # durable: 255 properties per fact, including sid and id
CATCH_ALL = "nba$all"  # a rule that matches every fact (see plan())
OPS = {"==": "$eq", "!=": "$neq", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}
ARITH = {"+": "$add", "-": "$sub", "*": "$mul", "/": "$div"}


@dataclass
class Plan:
    """What to give durable-rules, and how to read back what fired."""

    definition: dict = field(default_factory=dict)  # durable rule name -> {"all": [{"m": ...}]}
    rule_names: dict[str, tuple[str, str]] = field(default_factory=dict)  # durable name -> (kind, name)
    always: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in PREFIX})
    fields: dict[str, str] = field(default_factory=dict)  # fact field -> "num" | "str" | "bool"
    durable_fields: tuple[str, ...] = ()  # the fields durable's rules read (the fact sent to durable)
    eligibility: EligibilityProgram | None = None  # actions' engagement, then levers; None: in durable
    sources: dict[str, str] = field(default_factory=dict)  # durable name -> "file:line:col"
    may_repeat: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) that may fire twice


def _error_at(source: str, message: str, hint: str = "") -> RuleError:
    if source.count(":") < 2:
        return RuleError(source or "rules", 1, 1, message, hint)
    file, line, col = source.rsplit(":", 2)
    return RuleError(file, int(line), int(col), message, hint)


def conditions(ruleset: RuleSet):
    """(kind, name, condition, source) for every condition of the rule set."""
    for s in ruleset.situations.values():
        yield "situation", s.name, s.when, s.source
    for p in ruleset.policies:
        yield "policy", p.name, p.when, p.source
    for lv in ruleset.levers:
        yield "lever", lv.name, lv.when, lv.source
    for a in ruleset.actions:
        engagement = ruleset.engagement(a)
        yield "action", a.id, Bool(True) if engagement is None else engagement, a.source


def _fits(piece: Node) -> bool:
    return markers(piece) <= MAX_MARKERS and rule_stack(condition_json(piece, {})) <= RULE_LIMIT


def plan(ruleset: RuleSet, eligibility: str = "vector") -> tuple[Plan, list[RuleError]]:
    """The durable definition for ``ruleset`` and any condition too complex to compile.

    ``eligibility``: "vector" (an ``EligibilityProgram`` for actions and levers) or "durable" (one
    durable rule per action and per lever).
    """
    if eligibility not in ("vector", "durable"):
        raise ValueError(f"eligibility must be vector or durable, not {eligibility!r}")
    out, errors = Plan(), []
    situations = ruleset.situation_conditions()
    conds: list[dict] = []
    durable_fields: dict[str, str] = {}  # what durable's rules read: the fact sent to durable
    in_durable = eligibility == "durable"
    for kind, name, condition, source in conditions(ruleset):
        for node in walk(condition):  # the Python evaluator reads every field, even simplified ones
            if isinstance(node, Field):
                out.fields[node.name] = node.kind
        if kind in ("action", "lever") and not in_durable:
            continue  # in the EligibilityProgram
        try:
            pieces, exclusive = prepare(condition, situations, _fits)
        except TooComplex as err:
            errors.append(_error_at(source, f"the condition of {kind} \"{name}\" is too complex ({err})",
                                    "split it into situations or simplify the and/or nesting"))
            continue
        if pieces is True:
            out.always[kind].add(name)
            continue
        if pieces is False:
            continue
        if not exclusive:
            out.may_repeat.add((kind, name))
        base = f"{PREFIX[kind]}${name}"
        for k, piece in enumerate(pieces):
            rule = base if len(pieces) == 1 else f"{base}#{k + 1}"
            conds.append(condition_json(piece, durable_fields))
            out.rule_names[rule] = (kind, name)
            out.sources[rule] = source
    # Every session must run at least one action before durable may delete it: durable leaves a
    # session's action context uninitialised until an action starts, and delete_state frees it.
    out.rule_names[CATCH_ALL] = ("engine", "all")
    out.sources[CATCH_ALL] = ""
    conds.append({"$eq": {GUARD_FIELD: 0.0}})
    durable_fields[GUARD_FIELD] = "num"
    first = ruleset.files[0] if ruleset.files else "rules"
    try:
        arranged, _guarded = arrange(conds)
    except TooManyRules as err:
        errors.append(RuleError(first, 1, 1, f"too many rules for the engine: {err}", "merge or remove rules"))
        arranged = conds
    for rule, cond in zip(out.rule_names, arranged):
        out.definition[rule] = {"all": [{"m": cond}]}
    out.fields.update(durable_fields)
    out.durable_fields = tuple(sorted(durable_fields))
    if not in_durable:
        out.eligibility = EligibilityProgram([ruleset.engagement(a) for a in ruleset.actions]
                                             + [lv.when for lv in ruleset.levers])
    if len(durable_fields) > MAX_FACT_FIELDS:
        errors.append(RuleError(first, 1, 1, f"the rules use {len(durable_fields)} different fields; "
                                f"the engine holds at most {MAX_FACT_FIELDS}",
                                "use fewer distinct products, context keys or triggers"))
    return out, errors


def condition_json(node: Node, fields: dict[str, str]) -> dict:
    """durable's JSON for a normalised condition piece; records the fact fields it reads."""
    for n in walk(node):
        if isinstance(n, Field):
            fields[n.name] = n.kind
    if isinstance(node, And):
        return {"$and": [condition_json(i, fields) for i in node.items]}
    if isinstance(node, Or):
        return {"$or": [condition_json(i, fields) for i in node.items]}
    if isinstance(node, Compare):
        return _compare_json(node, fields)
    raise TypeError(f"not a normalised condition: {type(node).__name__}")


def _compare_json(node: Compare, fields: dict[str, str]) -> dict:
    op, left, right = node.op, node.left, node.right
    if isinstance(left, Field):
        return {OPS[op]: {left.name: _operand(right)}}
    if isinstance(right, Field):
        return {OPS[FLIPPED[op]]: {right.name: _operand(left)}}
    # Two formulas: "L op R" holds exactly when "0 op (R - L)" does (IEEE subtraction keeps the sign).
    fields[ZERO_FIELD] = "num"
    return {OPS[op]: {ZERO_FIELD: {"$sub": {"$l": _operand(right), "$r": _operand(left)}}}}


def _operand(node: Node):
    if isinstance(node, Num):
        return float(node.value)
    if isinstance(node, (Str, Bool)):
        return node.value
    if isinstance(node, Field):
        return {"$m": node.name}
    if isinstance(node, Arith):
        return {ARITH[node.op]: {"$l": _operand(node.left), "$r": _operand(node.right)}}
    if isinstance(node, Neg):
        return {"$mul": {"$l": _operand(node.operand), "$r": -1.0}}
    raise TypeError(f"not an operand: {type(node).__name__}")


def create_ruleset(name: str, the_plan: Plan) -> int:
    """The durable handle for ``the_plan``; raises RuleErrors naming the rules durable refused."""
    try:
        return durable_rules_engine.create_ruleset(name, to_json(the_plan.definition))
    except Exception as err:  # durable raises its own error type with a numeric code
        errors = []
        for rule, body in the_plan.definition.items():
            try:
                handle = durable_rules_engine.create_ruleset(f"{name}-probe", to_json({rule: body}))
            except Exception as rule_err:
                kind, item = the_plan.rule_names[rule]
                errors.append(_error_at(the_plan.sources[rule], f'the rule engine refused {kind} "{item}": {rule_err}'))
            else:
                durable_rules_engine.delete_ruleset(handle)
        if not errors:
            errors.append(RuleError("rules", 1, 1, f"the rule engine refused the rule set: {err}"))
        raise RuleErrors(errors) from err
