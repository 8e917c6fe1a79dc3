"""A tree-walking interpreter of resolved conditions: the test oracle and the explainer.

``env`` is the fact (see ``facts.py``): field name -> value. Numbers are floats (IEEE double, as in
durable-rules); division is only ever by a non-zero constant (the checker enforces it).
"""

from __future__ import annotations

from collections.abc import Mapping

from .nodes import And, Arith, Bool, Compare, Field, In, Neg, Node, Not, Num, Or, SitRef, Str


def evaluate(node: Node, env: Mapping, situations: Mapping[str, Node] | None = None):
    """Value of ``node`` in ``env``; ``situations`` maps situation names to their conditions."""
    return _Evaluator(env, situations or {}).eval(node)


class _Evaluator:
    def __init__(self, env: Mapping, situations: Mapping[str, Node]):
        self.env = env
        self.situations = situations
        self.memo: dict[str, bool] = {}

    def eval(self, node: Node):
        t = type(node)
        if t is Field:
            return self.env[node.name]
        if t is Num:
            return float(node.value)
        if t is Str or t is Bool:
            return node.value
        if t is And:
            return all(self.eval(item) for item in node.items)
        if t is Or:
            return any(self.eval(item) for item in node.items)
        if t is Not:
            return not self.eval(node.operand)
        if t is Compare:
            return _compare(node.op, self.eval(node.left), self.eval(node.right))
        if t is In:
            value = self.eval(node.left)
            found = any(value == self.eval(item) for item in node.items)
            return not found if node.negated else found
        if t is Arith:
            a, b = self.eval(node.left), self.eval(node.right)
            op = node.op
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            return a / b
        if t is Neg:
            return -self.eval(node.operand)
        if t is SitRef:
            name = node.name
            if name not in self.memo:
                self.memo[name] = bool(self.eval(self.situations[name]))
            return self.memo[name]
        raise TypeError(f"cannot evaluate {t.__name__}")


def _compare(op: str, a, b) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b
