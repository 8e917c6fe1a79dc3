"""Rewrites that turn a resolved condition into pieces durable-rules can match exactly once.

durable-rules has no ``not``, fires a rule once per *path* through its ``$or`` branches (so
``(a or b) and (c or d)`` fires up to four times), and allows at most 31 entries in a rule's
and/or bookkeeping (each ``$and``/``$or`` takes two; error 113 beyond). So a condition is:

1. inlined   situations replaced by their conditions;
2. ``nnf``   ``not`` pushed down to comparisons (De Morgan, flipped operators), ``in`` expanded to
             ``==`` alternatives, boolean fields written as ``field == true``, constants folded;
3. ``exclusive``  every ``or`` rewritten so its branches cannot hold together
             (``a or b or c`` -> ``a or (not a and (b or (not b and c)))``, skipped when branches
             already exclude each other, e.g. ``segment == "x" or segment == "y"``) -- so a rule
             fires at most once;
4. ``split`` pieces that are too large for one durable rule (and/or bookkeeping, or too wide for
             durable's matching stack, see ``network.py``) are split at their top ``or`` or by
             distributing an ``and`` over an inner ``or``; the pieces stay mutually exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import cast

from engine.errors import NbaError
from engine.rules.evaluate import evaluate
from engine.rules.nodes import (
    FALSE,
    NEGATED,
    TRUE,
    And,
    Arith,
    Bool,
    Compare,
    Field,
    In,
    Neg,
    Node,
    Not,
    Num,
    Or,
    SitRef,
    Str,
    walk,
)

MAX_MARKERS = 28  # durable: MAX_SEQUENCE_EXPRESSIONS 32, the 32nd entry fails; 2 kept for guards
MAX_PIECES = 64  # durable rules per condition before we call it too complex
MAX_EXCLUSIVE_PIECES = 128  # the exclusive form may use more pieces before we fall back to the plain one
MAX_EXCLUSIVE_INPUT = 400  # nodes; beyond this keep the plain form (may fire more than once)
MAX_EXCLUSIVE_SIZE = 1500


class TooComplex(NbaError):
    pass


def inline(node: Node, situations: Mapping[str, Node]) -> Node:
    """Replace every situation reference by its (recursively inlined) condition."""
    if isinstance(node, SitRef):
        return inline(situations[node.name], situations)
    if isinstance(node, (And, Or)):
        return type(node)(tuple(inline(i, situations) for i in node.items))
    if isinstance(node, Not):
        return Not(inline(node.operand, situations))
    return node


def _is_const(node: Node) -> bool:
    return not any(isinstance(n, (Field, SitRef)) for n in walk(node))


def _fold(node: Node) -> Node:
    """Fold constant arithmetic sub-trees into numbers (same IEEE operations as at run time)."""
    if isinstance(node, (Arith, Neg)) and _is_const(node):
        return Num(float(evaluate(node, {})))
    if isinstance(node, Arith):
        return Arith(node.op, _fold(node.left), _fold(node.right))
    if isinstance(node, Neg):
        return Neg(_fold(node.operand))
    return node


def nnf(node: Node, negate: bool = False) -> Node:
    """Negation normal form with ``in`` expanded and constants folded (see the module doc)."""
    if isinstance(node, (And, Or)):
        flip = isinstance(node, And) == negate  # And->Or when negated
        cls = Or if flip else And
        return simplify(cls(tuple(nnf(i, negate) for i in node.items)))
    if isinstance(node, Not):
        return nnf(node.operand, not negate)
    if isinstance(node, Bool):
        return Bool(node.value != negate)
    if isinstance(node, Field):  # a boolean field
        return Compare("==", node, Bool(not negate))
    if isinstance(node, Compare):
        op = NEGATED[node.op] if negate else node.op
        left, right = _fold(node.left), _fold(node.right)
        if isinstance(left, Bool):
            left, right = right, left
        if isinstance(right, Bool) and not isinstance(left, Bool):  # field == true/false
            return Compare("==", left, Bool(right.value == (op == "==")))
        if _is_const(left) and _is_const(right):
            return Bool(bool(evaluate(Compare(op, left, right), {})))
        return Compare(op, left, right)
    if isinstance(node, In):
        negated = node.negated != negate
        op, cls = ("!=", And) if negated else ("==", Or)
        left = _fold(node.left)
        items = tuple(dict.fromkeys(node.items))  # drop repeated values
        return simplify(cls(tuple(nnf(Compare(op, left, item)) for item in items)))
    raise TypeError(f"cannot normalise {type(node).__name__}")


def simplify(node: Node) -> Node:
    """Flatten nested and/or, drop repeats and constants, detect contradictions."""
    if not isinstance(node, (And, Or)):
        return node
    is_and = isinstance(node, And)
    unit, zero = (TRUE, FALSE) if is_and else (FALSE, TRUE)
    items: list[Node] = []
    for item in node.items:
        item = simplify(item)
        if item == zero:
            return zero
        if item == unit:
            continue
        if type(item) is type(node):
            items.extend(item.items)
        else:
            items.append(item)
    items = list(dict.fromkeys(items))
    if is_and:
        leaves = [i for i in items if isinstance(i, Compare)]
        for a in range(len(leaves)):
            for b in range(a + 1, len(leaves)):
                if contradicts(leaves[a], leaves[b]):
                    return FALSE
    else:
        leaf_set = set(i for i in items if isinstance(i, Compare))
        if any(nnf(leaf, True) in leaf_set for leaf in leaf_set):
            return TRUE  # x or not x
    if not items:
        return unit
    if len(items) == 1:
        return items[0]
    return type(node)(tuple(items))


# --- mutual exclusion -------------------------------------------------------------------------------
def _const(node: Node):
    return node.value if isinstance(node, (Num, Str, Bool)) else None


def _interval(c: Compare):
    """(low, low_open, high, high_open) for ``field <op> number``; None otherwise."""
    if not (isinstance(c.left, Field) and isinstance(c.right, Num)) or c.op == "!=":
        return None
    v, inf = c.right.value, math.inf
    return {
        "==": (v, False, v, False),
        "<": (-inf, True, v, True),
        "<=": (-inf, True, v, False),
        ">": (v, True, inf, True),
        ">=": (v, False, inf, True),
    }[c.op]


def contradicts(a: Compare, b: Compare) -> bool:
    """True when the two comparisons can never hold together."""
    if nnf(a, True) == b:
        return True
    if a.left != b.left or not isinstance(a.left, Field):
        return False
    ca, cb = _const(a.right), _const(b.right)
    if ca is None or cb is None:
        return False
    if a.op == b.op == "==":
        return ca != cb
    if {a.op, b.op} == {"==", "!="}:
        return ca == cb
    ia, ib = _interval(a), _interval(b)
    if ia is None or ib is None:
        return False
    low = max((ia[0], not ia[1]), (ib[0], not ib[1]))  # larger low wins; closed before open
    high = min((ia[2], ia[3]), (ib[2], ib[3]))  # smaller high wins; open before closed
    lo, lo_closed = low
    hi, hi_open = high
    if lo > hi:
        return True
    return lo == hi and (not lo_closed or hi_open)


def _conjuncts(node: Node) -> list[Compare]:
    if isinstance(node, Compare):
        return [node]
    if isinstance(node, And):
        return [i for i in node.items if isinstance(i, Compare)]
    return []


def disjoint(a: Node, b: Node) -> bool:
    """True when ``a`` and ``b`` cannot both hold (judged from their top-level comparisons)."""
    return any(contradicts(x, y) for x in _conjuncts(a) for y in _conjuncts(b))


def exclusive(node: Node) -> Node:
    """An equivalent condition whose ``or`` branches are mutually exclusive (see module doc).

    ``a or b or c`` becomes ``a or (not a and (b or (not b and c)))``: linear in size, and the
    ``not a`` is left out when ``a`` already excludes every later branch.
    """
    if isinstance(node, And):
        return simplify(And(tuple(exclusive(i) for i in node.items)))
    if not isinstance(node, Or):
        return node
    first, rest = node.items[0], node.items[1:]
    if not rest:
        return exclusive(first)
    ex_first = exclusive(first)
    ex_rest = exclusive(Or(rest) if len(rest) > 1 else rest[0])
    if all(disjoint(first, later) for later in rest):
        return simplify(Or((ex_first, ex_rest)))
    return simplify(Or((ex_first, simplify(And((exclusive(nnf(first, True)), ex_rest))))))


def size(node: Node) -> int:
    return sum(1 for _ in walk(node))


def markers(node: Node) -> int:
    """Entries a condition takes in durable's per-rule and/or sequence."""
    return sum(2 for n in walk(node) if isinstance(n, (And, Or)))


def split(node: Node, fits: Callable[[Node], bool], max_pieces: int = 64) -> list[Node]:
    """Pieces (mutually exclusive alternatives) each accepted by ``fits``."""
    pending, out = [node], []
    while pending:
        piece = pending.pop(0)
        if isinstance(piece, Bool):
            if piece.value:
                return [TRUE]  # one alternative always holds
            continue
        if fits(piece):
            out.append(piece)
        elif isinstance(piece, Or):
            pending[0:0] = list(piece.items)
        elif isinstance(piece, And) and any(isinstance(item, Or) for item in piece.items):
            items = list(piece.items)
            k = max((i for i, item in enumerate(items) if isinstance(item, Or)), key=lambda i: size(items[i]))
            pending[0:0] = [simplify(And((*items[:k], alt, *items[k + 1 :]))) for alt in cast(Or, items[k]).items]
        else:
            out.append(piece)  # a plain conjunction: nothing left to split
        if len(out) + len(pending) > max_pieces:
            raise TooComplex(f"needs more than {max_pieces} engine rules")
    return out


def prepare(node: Node, situations: Mapping[str, Node],
            fits: Callable[[Node], bool] | None = None) -> tuple[list[Node] | bool, bool]:
    """The durable-ready pieces of a condition (or True/False when it is constant), and whether the
    pieces are exclusive (the rule fires at most once). Very large conditions keep their plain
    form: same truth, but the rule may fire more than once for one fact (costs time only)."""
    fits = fits or (lambda piece: markers(piece) <= MAX_MARKERS)
    flat = nnf(inline(node, situations))
    if isinstance(flat, Bool):
        return flat.value, True
    if size(flat) <= MAX_EXCLUSIVE_INPUT:
        excl = exclusive(flat)
        if isinstance(excl, Bool):
            return excl.value, True
        if size(excl) <= MAX_EXCLUSIVE_SIZE:
            try:
                return _result(split(excl, fits, MAX_EXCLUSIVE_PIECES)), True
            except TooComplex:
                pass
    return _result(split(flat, fits, MAX_PIECES)), False


def _result(pieces: list[Node]) -> list[Node] | bool:
    if pieces == [TRUE]:
        return True
    return pieces or False
