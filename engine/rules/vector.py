"""Per-action engagement conditions (and the levers) for the whole catalog in one numba call.

durable-rules decides the policy outcomes (situations, engagement policies): a few of them hold per
decision. The engagement conditions (eligible, applicable, suitable; the action's and its group's)
are per action, and a large share of a catalog passes them for any customer; as durable rules, every
such action would be one more firing, and every condition more tests in the matching network, on
every decision (BENCHMARKS.md has the cost). So each action's conditions are compiled into one small
stack program, and one numba kernel runs all of them over a vector of the fact's fields; situations
are read from durable's outcome. The levers' conditions (priority weights, not policies) ride along
as extra programs after the actions'.
``tests/test_rule_runtime.py`` proves it decides exactly what durable-rules decides (the same
conditions compiled as durable rules) on thousands of generated profiles.

Values: numbers as they are (IEEE doubles, as in durable), yes/no as 1.0 / 0.0, text as a code:
text constants of the conditions are numbered 0, 1, ...; any other text in the fact gets a negative
code, the same one for the same text within one fact, so ``context.intent == touchpoint`` works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numba
import numpy as np

from engine.rules.facts import values_of
from engine.rules.nodes import And, Arith, Bool, Compare, Field, In, Neg, Node, Not, Num, Or, SitRef, Str

LOAD, CONST, ADD, SUB, MUL, DIV, NEG, EQ, NE, LT, LE, GT, GE, AND, OR, NOT = range(16)
_ARITH = {"+": ADD, "-": SUB, "*": MUL, "/": DIV}
_COMPARE = {"==": EQ, "!=": NE, "<": LT, "<=": LE, ">": GT, ">=": GE}


@numba.njit(cache=True, nogil=True)
def _run(ops, args, consts, starts, x, stack, out):  # pragma: no cover - compiled
    for a in range(starts.shape[0] - 1):
        sp = 0
        for pc in range(starts[a], starts[a + 1]):
            op = ops[pc]
            arg = args[pc]
            if op == 0:  # LOAD
                stack[sp] = x[arg]
                sp += 1
            elif op == 1:  # CONST
                stack[sp] = consts[arg]
                sp += 1
            elif op == 6:  # NEG
                stack[sp - 1] = -stack[sp - 1]
            elif op == 15:  # NOT
                stack[sp - 1] = 1.0 if stack[sp - 1] == 0.0 else 0.0
            elif op == 13:  # AND of arg values
                sp -= arg
                v = 1.0
                for k in range(sp, sp + arg):
                    if stack[k] == 0.0:
                        v = 0.0
                stack[sp] = v
                sp += 1
            elif op == 14:  # OR of arg values
                sp -= arg
                v = 0.0
                for k in range(sp, sp + arg):
                    if stack[k] != 0.0:
                        v = 1.0
                stack[sp] = v
                sp += 1
            else:  # binary
                sp -= 1
                r = stack[sp]
                left = stack[sp - 1]
                if op == 2:
                    v = left + r
                elif op == 3:
                    v = left - r
                elif op == 4:
                    v = left * r
                elif op == 5:
                    v = left / r if r != 0.0 else 0.0
                elif op == 7:
                    v = 1.0 if left == r else 0.0
                elif op == 8:
                    v = 1.0 if left != r else 0.0
                elif op == 9:
                    v = 1.0 if left < r else 0.0
                elif op == 10:
                    v = 1.0 if left <= r else 0.0
                elif op == 11:
                    v = 1.0 if left > r else 0.0
                else:
                    v = 1.0 if left >= r else 0.0
                stack[sp - 1] = v
        out[a] = stack[0] != 0.0


class EligibilityProgram:
    """Stack programs for the eligibility of every action; ``run`` evaluates them all at once.

    ``conditions`` holds one resolved condition per action (None: always eligible); situation
    references are read from the situations that held (``SitRef`` is not inlined).
    """

    def __init__(self, conditions: Sequence[Node | None]):
        self.slots: dict[tuple[str, str], int] = {}
        self.texts: dict[str, int] = {}
        consts: list[float] = []
        const_index: dict[float, int] = {}
        ops: list[int] = []
        args: list[int] = []
        starts = [0]
        depth = 1

        def const(value: float) -> None:
            index = const_index.get(value)
            if index is None:
                index = const_index[value] = len(consts)
                consts.append(value)
            emit(CONST, index)

        def slot(name: str, kind: str) -> int:
            return self.slots.setdefault((name, kind), len(self.slots))

        def emit(op: int, arg: int = 0) -> None:
            ops.append(op)
            args.append(arg)

        def text(value: str) -> float:
            return float(self.texts.setdefault(value, len(self.texts)))

        def gen(node: Node) -> int:
            """Emit ``node``; returns the stack depth it needs."""
            if type(node) is Field:
                emit(LOAD, slot(node.name, node.kind))
                return 1
            if type(node) is SitRef:
                emit(LOAD, slot(node.name, "situation"))
                return 1
            if type(node) is Num:
                const(float(node.value))
                return 1
            if type(node) is Bool:
                const(1.0 if node.value else 0.0)
                return 1
            if type(node) is Str:
                const(text(node.value))
                return 1
            if type(node) is Neg:
                need = gen(node.operand)
                emit(NEG)
                return need
            if type(node) is Not:
                need = gen(node.operand)
                emit(NOT)
                return need
            if type(node) is Arith or type(node) is Compare:
                left = gen(node.left)
                right = gen(node.right)
                emit(_ARITH[node.op] if type(node) is Arith else _COMPARE[node.op])
                return max(left, 1 + right)
            if type(node) is In:
                alternatives = tuple(Compare("!=" if node.negated else "==", node.left, item) for item in node.items)
                return gen((And if node.negated else Or)(alternatives))
            if type(node) is And or type(node) is Or:
                need = 0
                for k, item in enumerate(node.items):
                    need = max(need, k + gen(item))
                emit(AND if type(node) is And else OR, len(node.items))
                return need
            raise TypeError(f"cannot compile {type(node).__name__}")

        for condition in conditions:
            depth = max(depth, gen(Bool(True) if condition is None else condition))
            starts.append(len(ops))
        self._ops = np.asarray(ops, dtype=np.int32)
        self._args = np.asarray(args, dtype=np.int32)
        self._consts = np.asarray(consts or [0.0], dtype=np.float64)
        self._starts = np.asarray(starts, dtype=np.int32)
        self._depth = depth
        self.size = len(conditions)
        by_kind: dict[str, list[tuple[str, int]]] = {"num": [], "bool": [], "str": [], "situation": []}
        for (name, kind), i in self.slots.items():
            by_kind[kind].append((name, i))
        self._numbers = values_of([name for name, _ in by_kind["num"] + by_kind["bool"]])
        self._number_slots = np.array([i for _, i in by_kind["num"] + by_kind["bool"]], dtype=np.intp)
        self._situations = by_kind["situation"]
        self._texts = by_kind["str"]

    @property
    def fields(self) -> dict[str, str]:
        """Fact field -> kind, for every field the programs read."""
        return {name: kind for (name, kind) in self.slots if kind != "situation"}

    def vector(self, fact: Mapping, situations: frozenset[str]) -> np.ndarray:
        x = np.zeros(len(self.slots) or 1, dtype=np.float64)
        x[self._number_slots] = self._numbers(fact)  # numbers and yes/no (True is 1.0)
        for name, i in self._situations:
            if name in situations:
                x[i] = 1.0
        texts = self.texts
        others: dict[str, float] = {}
        for name, i in self._texts:
            value = fact[name]
            code: float | None = texts.get(value)
            if code is None:
                code = others.get(value)
                if code is None:
                    code = others[value] = -1.0 - len(others)
            x[i] = code
        return x

    def run(self, fact: Mapping, situations: frozenset[str]) -> np.ndarray:
        """A bool per action: its eligibility holds for ``fact`` given the ``situations`` that hold."""
        out = np.empty(self.size, dtype=np.bool_)
        stack = np.empty(self._depth, dtype=np.float64)  # per call: evaluations may run in parallel
        _run(self._ops, self._args, self._consts, self._starts, self.vector(fact, situations), stack, out)
        return out
