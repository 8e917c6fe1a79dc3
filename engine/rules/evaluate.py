"""A tree-walking interpreter of resolved conditions: the test oracle and the explainer.

``env`` is the fact (see ``facts.py``): field name -> value. Numbers are floats (IEEE double, as in
durable-rules); division is only ever by a non-zero constant (the checker enforces it).
"""

from __future__ import annotations

from collections.abc import Mapping

from engine.rules.nodes import And, Arith, Bool, Compare, Field, In, Neg, Node, Not, Num, Or, SitRef, Str


def evaluate(node: Node, env: Mapping, situations: Mapping[str, Node] | None = None):
    """Value of ``node`` in ``env``; ``situations`` maps situation names to their conditions."""
    return _Evaluator(env, situations or {}).value(node)


class _Evaluator:
    def __init__(self, env: Mapping, situations: Mapping[str, Node]):
        self.env = env
        self.situations = situations
        self.memo: dict[str, bool] = {}

    def value(self, node: Node):
        if type(node) is Field:
            return self.env[node.name]
        if type(node) is Num:
            return float(node.value)
        if type(node) is Str or type(node) is Bool:
            return node.value
        if type(node) is And:
            return all(self.value(item) for item in node.items)
        if type(node) is Or:
            return any(self.value(item) for item in node.items)
        if type(node) is Not:
            return not self.value(node.operand)
        if type(node) is Compare:
            return _compare(node.op, self.value(node.left), self.value(node.right))
        if type(node) is In:
            value = self.value(node.left)
            found = any(value == self.value(item) for item in node.items)
            return not found if node.negated else found
        if type(node) is Arith:
            a, b = self.value(node.left), self.value(node.right)
            op = node.op
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            return a / b if b != 0 else 0.0  # x / 0 is 0, as in every engine (checker.guard_divisions)
        if type(node) is Neg:
            return -self.value(node.operand)
        if type(node) is SitRef:
            name = node.name
            if name not in self.memo:
                self.memo[name] = bool(self.value(self.situations[name]))
            return self.memo[name]
        raise TypeError(f"cannot evaluate {type(node).__name__}")


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
