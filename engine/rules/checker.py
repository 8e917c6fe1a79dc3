"""Name resolution and type checking of conditions against the feature schema.

Turns a parsed tree into a resolved tree whose leaves are fact ``Field``s, literals and ``SitRef``s,
collecting every error (with offsets into the condition text) instead of stopping at the first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass

from engine.features import FeatureSchema
from engine.rules.errors import ConditionError, suggest
from engine.rules.facts import consent_field, context_field, holds_field, set_field, trigger_field
from engine.rules.nodes import (
    And,
    Arith,
    Bad,
    Bool,
    Call,
    Compare,
    ContextRef,
    Field,
    In,
    ListLit,
    Name,
    Neg,
    Node,
    Not,
    Num,
    Or,
    SitRef,
    Str,
    walk,
)

FUNCTIONS = {
    "holds": 'holds("broadband"): the customer holds that product',
    "consent": 'consent("email"): the customer consented to that channel',
    "trigger": 'trigger("callback_requested"): that trigger is active for the customer',
    "has": 'has(interests, "golf"): the customer\'s set attribute (domain.yaml) holds that member',
}
BUILTINS = ("channel", "touchpoint", "has_consent", "context")
IDENT = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Ty:
    kind: str  # "num", "bool", "str", "cat"
    cat: str = ""  # categorical feature name (or "channel")
    levels: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "num":
            return "a number"
        if self.kind == "bool":
            return "a condition (true/false)"
        if self.kind == "cat":
            return f"a category ({self.cat})"
        return "text"


NUM, BOOL, STR = Ty("num"), Ty("bool"), Ty("str")


@dataclass
class Scope:
    """What names a condition may use."""

    schema: FeatureSchema
    situations: Collection[str] = ()
    triggers: Collection[str] | None = None  # declared trigger names; None accepts any

    def reserved(self) -> set[str]:
        return set(self.schema.numbers) | set(self.schema.categorical) | set(BUILTINS) | set(FUNCTIONS)

    def names(self) -> list[str]:
        return [*self.schema.numbers, *self.schema.categorical, *self.situations, *BUILTINS]


def check(node: Node, scope: Scope) -> tuple[Node, list[ConditionError]]:
    """Resolve and type-check a parsed condition. The result is meaningful only without errors."""
    checker = _Checker(scope)
    resolved, ty = checker.expr(node)
    if ty is not None and ty.kind != "bool":
        checker.error(node, f"expected a condition (true or false) but this is {ty.describe()}", _compare_hint(ty))
    return (guard_divisions(resolved) if not checker.errors else resolved), checker.errors


def _division(node: Node, guarded: frozenset[int]) -> Arith | None:
    """The first division by something not fixed in ``node`` that no guard covers yet."""
    for n in walk(node):
        if isinstance(n, Arith) and n.op == "/" and not _is_const(n.right) and id(n) not in guarded:
            return n
    return None


def _replace(node: Node, target: Node, by: Node) -> Node:
    if node is target:
        return by
    if isinstance(node, Arith):
        return Arith(node.op, _replace(node.left, target, by), _replace(node.right, target, by), pos=node.pos, end=node.end)
    if isinstance(node, Neg):
        return Neg(_replace(node.operand, target, by), pos=node.pos, end=node.end)
    if isinstance(node, Compare):
        return Compare(node.op, _replace(node.left, target, by), _replace(node.right, target, by), pos=node.pos, end=node.end)
    if isinstance(node, In):
        return In(_replace(node.left, target, by), node.items, node.negated, pos=node.pos, end=node.end)
    return node


def guard_divisions(node: Node, guarded: frozenset[int] = frozenset()) -> Node:
    """``node`` with every comparison that divides by a feature split on that divisor being 0:
    ``C`` becomes ``(d != 0 and C) or (d == 0 and C with the division as 0)``, so that every engine
    (durable-rules, the vector program, the Python evaluator) gives x / 0 the value 0."""
    if isinstance(node, (And, Or)):
        items = tuple(guard_divisions(i, guarded) for i in node.items)
        return type(node)(items, pos=node.pos, end=node.end)
    if isinstance(node, Not):
        return Not(guard_divisions(node.operand, guarded), pos=node.pos, end=node.end)
    if not isinstance(node, (Compare, In)):
        return node
    division = _division(node, guarded)
    if division is None:
        return node
    zero = Num(0.0, pos=division.right.pos, end=division.right.end)
    span = {"pos": node.pos, "end": node.end}
    divides = And((Compare("!=", division.right, zero, **span), guard_divisions(node, guarded | {id(division)})), **span)
    by_zero = guard_divisions(_replace(node, division, Num(0.0, pos=division.pos, end=division.end)), guarded)
    return Or((divides, And((Compare("==", division.right, zero, **span), by_zero), **span)), **span)


def situation_refs(node: Node) -> list[SitRef]:
    """The situations a resolved condition references directly."""
    return [n for n in walk(node) if isinstance(n, SitRef)]


def _compare_hint(ty: Ty) -> str:
    if ty.kind == "num":
        return "compare it, e.g. tenure_months >= 12"
    if ty.kind == "cat":
        return f'compare it, e.g. {ty.cat} == "{ty.levels[0]}"'
    return 'compare it, e.g. context.intent == "upgrade"'


def _is_const(node: Node) -> bool:
    return not any(isinstance(n, (Field, SitRef)) for n in walk(node))


class _Checker:
    def __init__(self, scope: Scope):
        self.scope = scope
        self.errors: list[ConditionError] = []

    def error(self, node: Node, message: str, hint: str = "", refers: str = "") -> None:
        self.errors.append(ConditionError(node.pos, max(node.end, node.pos + 1), message, hint, refers))

    # returns (resolved node, type or None when an error was reported)
    def expr(self, node: Node) -> tuple[Node, Ty | None]:
        method = getattr(self, "_" + type(node).__name__)
        return method(node)

    # --- leaves -----------------------------------------------------------------------------------
    def _Num(self, node: Num):
        return node, NUM

    def _Str(self, node: Str):
        return node, STR

    def _Bool(self, node: Bool):
        return node, BOOL

    def _Bad(self, node: Bad):
        for part in node.parts:  # its syntax error is reported; what did parse may have mistakes of its own
            self.expr(part)
        return node, None

    def _ListLit(self, node: ListLit):
        self.error(node, 'a list [...] can only follow "in" or "not in"')
        return node, None

    def _Name(self, node: Name):
        name, schema, span = node.name, self.scope.schema, {"pos": node.pos, "end": node.end}
        if name in schema.numbers:
            return Field(name, "num", **span), NUM
        if name in schema.categorical:
            return Field(name, "str", **span), Ty("cat", name, tuple(schema.categorical[name]))
        if name in self.scope.situations:
            return SitRef(name, **span), BOOL
        if name == "channel":
            return Field("channel", "str", **span), Ty("cat", "channel", schema.channel_names)
        if name == "touchpoint":
            return Field("touchpoint", "str", **span), STR
        if name == "has_consent":
            return Field("has_consent", "bool", **span), BOOL
        if name == "context":
            self.error(node, '"context" needs a key', "write context.KEY, e.g. context.intent")
            return node, None
        if name in FUNCTIONS:
            self.error(node, f'"{name}" is a function', f"write {FUNCTIONS[name].split(':')[0]}")
            return node, None
        if name in schema.sets:
            use = {"products": 'holds("...")', "consent": 'consent("...")'}.get(name, f'has({name}, "...")')
            self.error(node, f'"{name}" is a set', f"use {use} to test membership")
            return node, None
        hint = suggest(name, self.scope.names()) or "see the feature list in rules/README.md"
        self.error(node, f'unknown feature "{name}"', hint, refers="situation")
        return node, None

    def _ContextRef(self, node: ContextRef):
        if not IDENT.match(node.key):
            self.error(node, f'context key "{node.key}" must be lower case letters, digits and _')
            return node, None
        return Field(context_field(node.key), "str", pos=node.pos, end=node.end), STR

    def _Call(self, node: Call):
        func = node.func
        if func not in FUNCTIONS:
            schema = self.scope.schema
            if func in schema.numbers or func in schema.categorical or func in self.scope.situations:
                self.error(node, f'"{func}" is not a function', f"write {func} without parentheses")
            else:
                hint = suggest(func, FUNCTIONS) or "functions: " + ", ".join(FUNCTIONS)
                self.error(node, f'unknown function "{func}"', hint)
            return node, None
        example = FUNCTIONS[func].split(":")[0]
        if func == "has":
            return self._has(node, example)
        if len(node.args) != 1 or not isinstance(node.args[0], Str):
            self.error(node, f"{func}() needs one name in quotes", f"e.g. {example}")
            return node, None
        arg = node.args[0]
        value, span = arg.value, {"pos": node.pos, "end": node.end}
        if func == "holds":
            products = self.scope.schema.products
            if value not in products:
                hint = suggest(value, products) or "products: " + ", ".join(products)
                self.error(arg, f'unknown product "{value}"', hint)
                return node, None
            return Field(holds_field(value), "bool", **span), BOOL
        if func == "consent":
            channels = self.scope.schema.channel_names
            if value not in channels:
                hint = suggest(value, channels) or "channels: " + ", ".join(channels)
                self.error(arg, f'unknown channel "{value}"', hint)
                return node, None
            return Field(consent_field(value), "bool", **span), BOOL
        # trigger
        known = self.scope.triggers
        if not IDENT.match(value):
            self.error(arg, f'trigger name "{value}" must be lower case letters, digits and _')
            return node, None
        if known is not None and value not in known:
            hint = suggest(value, known) or "declare it under triggers: in policies.yaml"
            self.error(arg, f'unknown trigger "{value}"', hint)
            return node, None
        return Field(trigger_field(value), "bool", **span), BOOL

    def _has(self, node: Call, example: str):
        sets = {n: m for n, m in self.scope.schema.sets.items() if n != "consent"}
        if len(node.args) != 2 or not isinstance(node.args[0], Name) or not isinstance(node.args[1], Str):
            self.error(node, "has() needs a set attribute and a member in quotes", f"e.g. {example}")
            return node, None
        attribute, member = node.args[0].name, node.args[1].value
        if attribute not in sets:
            hint = suggest(attribute, sets) or ("set attributes: " + ", ".join(sets) if sets else
                                               "domain.yaml declares no set attribute")
            self.error(node.args[0], f'"{attribute}" is not a set attribute', hint)
            return node, None
        if member not in sets[attribute]:
            hint = suggest(member, sets[attribute]) or "members: " + ", ".join(sets[attribute])
            self.error(node.args[1], f'unknown member "{member}" of {attribute}', hint)
            return node, None
        return Field(set_field(attribute, member), "bool", pos=node.pos, end=node.end), BOOL

    # --- arithmetic -------------------------------------------------------------------------------
    def _Neg(self, node: Neg):
        operand, ty = self.expr(node.operand)
        if ty is not None and ty.kind != "num":
            self.error(node.operand, f"expected a number after '-' but this is {ty.describe()}")
            ty = None
        return Neg(operand, pos=node.pos, end=node.end), (NUM if ty else None)

    def _Arith(self, node: Arith):
        left, lt = self.expr(node.left)
        right, rt = self.expr(node.right)
        ok = True
        for side, ty in ((node.left, lt), (node.right, rt)):
            if ty is not None and ty.kind != "num":
                self.error(side, f'"{node.op}" works on numbers but this is {ty.describe()}')
                ok = False
        ok = ok and lt is not None and rt is not None
        if ok and node.op == "/":
            if _is_const(right):  # a feature may be 0: dividing by it gives 0 then (see guard_divisions)
                from engine.rules.evaluate import evaluate

                divisor = evaluate(right, {})
                if divisor == 0 or not math.isfinite(divisor):
                    self.error(node.right, "division by zero")
                    ok = False
        return Arith(node.op, left, right, pos=node.pos, end=node.end), (NUM if ok else None)

    # --- comparisons ------------------------------------------------------------------------------
    def _Compare(self, node: Compare):
        left, lt = self.expr(node.left)
        right, rt = self.expr(node.right)
        span = {"pos": node.pos, "end": node.end}
        if lt is None or rt is None:
            return Compare(node.op, left, right, **span), None
        op = node.op
        if lt.kind == "bool" or rt.kind == "bool":
            # "x == true" / "has_consent != false" are accepted and simplified.
            if op in ("==", "!=") and lt.kind == rt.kind == "bool":
                for cond, lit in ((left, right), (right, left)):
                    if isinstance(lit, Bool):
                        positive = lit.value == (op == "==")
                        return (cond if positive else Not(cond, **span)), BOOL
            self.error(node, "conditions cannot be compared with " + op, 'combine conditions with "and", "or", "not"')
            return Compare(op, left, right, **span), None
        if lt.kind == "num" and rt.kind == "num":
            return Compare(op, left, right, **span), BOOL
        if lt.kind == "num" or rt.kind == "num":
            num_side, oty = (left, rt) if lt.kind == "num" else (right, lt)
            if oty.kind == "cat":
                hint = f"{oty.cat} is a category; compare it with one of: " + ", ".join(oty.levels)
            else:
                name = num_side.name if isinstance(num_side, Field) else "nps"
                hint = f"compare numbers with numbers (no quotes), e.g. {name} > 0.5"
            self.error(node, f"cannot compare a number with {oty.describe()}", hint)
            return Compare(op, left, right, **span), None
        # both text-like (str or cat)
        if op not in ("==", "!="):
            self.error(node, f'"{op}" compares numbers; text can only be compared with == or !=')
            return Compare(op, left, right, **span), None
        if lt.kind == "cat" and rt.kind == "cat" and lt.cat != rt.cat:
            self.error(node, f"cannot compare {lt.cat} with {rt.cat}: they have different levels")
            return Compare(op, left, right, **span), None
        ok = True
        for cat_ty, lit in ((lt, right), (rt, left)):
            if cat_ty.kind == "cat" and isinstance(lit, Str):
                ok = self._check_level(lit, cat_ty) and ok
        return Compare(op, left, right, **span), (BOOL if ok else None)

    def _In(self, node: In):
        left, lt = self.expr(node.left)
        span = {"pos": node.pos, "end": node.end}
        if lt is None:
            return In(left, node.items, node.negated, **span), None
        if lt.kind == "bool":
            self.error(node.left, '"in" needs a value on its left, not a condition')
            return In(left, node.items, node.negated, **span), None
        ok = True
        for item in node.items:
            if isinstance(item, Bad):
                ok = False
            elif lt.kind == "num":
                if not isinstance(item, Num):
                    self.error(item, "expected a number in the list (the left side is a number)")
                    ok = False
            elif not isinstance(item, Str):
                self.error(item, f"expected text in quotes in the list (the left side is {lt.describe()})")
                ok = False
            elif lt.kind == "cat":
                ok = self._check_level(item, lt) and ok
        return In(left, node.items, node.negated, **span), (BOOL if ok else None)

    def _check_level(self, lit: Str, ty: Ty) -> bool:
        if lit.value in ty.levels:
            return True
        levels = ", ".join(ty.levels)
        self.error(lit, f'"{lit.value}" is not a level of {ty.cat} (levels: {levels})', suggest(lit.value, ty.levels))
        return False

    # --- logic ------------------------------------------------------------------------------------
    def _bool_operand(self, node: Node, word: str) -> tuple[Node, bool]:
        resolved, ty = self.expr(node)
        if ty is None:
            return resolved, False
        if ty.kind != "bool":
            where = 'after "not"' if word == "not" else f'on each side of "{word}"'
            self.error(node, f"expected a condition {where} but this is {ty.describe()}", _compare_hint(ty))
            return resolved, False
        return resolved, True

    def _Not(self, node: Not):
        operand, ok = self._bool_operand(node.operand, "not")
        return Not(operand, pos=node.pos, end=node.end), (BOOL if ok else None)

    def _And(self, node: And):
        return self._logic(node, And, "and")

    def _Or(self, node: Or):
        return self._logic(node, Or, "or")

    def _logic(self, node, cls, word):
        items, ok = [], True
        for item in node.items:
            resolved, good = self._bool_operand(item, word)
            items.append(resolved)
            ok = ok and good
        return cls(tuple(items), pos=node.pos, end=node.end), (BOOL if ok else None)
