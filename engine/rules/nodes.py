"""Expression trees of the condition language.

The parser produces literals, ``Name``, ``Call``, ``ContextRef`` and the operators below. The checker
(``checker.py``) resolves every name to a ``Field`` of the fact (see ``facts.py``) or a ``SitRef``
(a situation, inlined before compiling to durable-rules). Positions (``pos``, ``end``) are offsets into
the condition text and do not take part in equality, so trees compare structurally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COMPARE_OPS = ("==", "!=", "<", "<=", ">", ">=")
ARITH_OPS = ("+", "-", "*", "/")
NEGATED = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}
FLIPPED = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}


@dataclass(frozen=True)
class Node:
    pos: int = field(default=0, compare=False, kw_only=True, repr=False)
    end: int = field(default=0, compare=False, kw_only=True, repr=False)


# --- literals ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Num(Node):
    value: float


@dataclass(frozen=True)
class Str(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class ListLit(Node):
    items: tuple[Node, ...]


# --- names as parsed ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Name(Node):
    name: str


@dataclass(frozen=True)
class ContextRef(Node):
    key: str


@dataclass(frozen=True)
class Call(Node):
    func: str
    args: tuple[Node, ...]


# --- names as resolved --------------------------------------------------------------------------
@dataclass(frozen=True)
class Field(Node):
    """A field of the fact. ``kind`` is "num", "str" or "bool"."""

    name: str
    kind: str


@dataclass(frozen=True)
class SitRef(Node):
    name: str


# --- operators --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Neg(Node):
    operand: Node


@dataclass(frozen=True)
class Arith(Node):
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Compare(Node):
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class In(Node):
    left: Node
    items: tuple[Node, ...]
    negated: bool = False


@dataclass(frozen=True)
class Not(Node):
    operand: Node


@dataclass(frozen=True)
class And(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Bad(Node):
    """Where the parser met a syntax error and went on; ``parts``: what it did parse there, still
    checked for errors of their own."""

    parts: tuple[Node, ...] = ()


TRUE = Bool(True)
FALSE = Bool(False)


def walk(node: Node):
    """Yield ``node`` and every node below it."""
    yield node
    for child in children(node):
        yield from walk(child)


def children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, (And, Or)):
        return node.items
    if isinstance(node, ListLit):
        return node.items
    if isinstance(node, Call):
        return node.args
    if isinstance(node, (Not, Neg)):
        return (node.operand,)
    if isinstance(node, (Arith, Compare)):
        return (node.left, node.right)
    if isinstance(node, In):
        return (node.left, *node.items)
    return ()
