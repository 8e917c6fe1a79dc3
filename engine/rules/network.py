"""A model of durable-rules' alpha network, to keep every fact inside the engine's fixed limits.

durable matches a fact by a depth-first walk of its alpha network with a fixed stack of 64 nodes
(``handleAlpha``, ``MAX_STACK_SIZE``): a node that matches pushes all its matching children. When
more than 64 are pending, ``assert_fact`` fails with error 303 -- and a later ``delete_state`` of
that session crashes the process. Many rules whose first tests hold at once (a catalog of 100
actions) overflow it.

We rebuild the network from the JSON we give durable, exactly as durable shares nodes (a test is
shared with an identical sibling only when its right side is a constant: same field, operator,
type and value; ``$m`` and arithmetic operands are never shared; every ``$or`` gets a fresh
forwarding node), and compute the worst-case stack assuming every test matches. When the rules do
not fit, they are grouped under always-true guard tests on the field ``g__`` (always 0), one or
two levels deep, so each node has few children.
"""

from __future__ import annotations

from engine.errors import NbaError
from engine.rules.facts import GUARD_FIELD  # always 0 in the fact

STACK_LIMIT = 60  # durable fails at 64 pending nodes; keep a margin
RULE_LIMIT = 24  # one rule's own worst case; larger rules are split
GROUP_LIMIT = 30  # worst case below a level-0 guard
SUPER_LIMIT = 45  # worst case below a level-1 guard


class TooManyRules(NbaError):
    pass


class _Node:
    __slots__ = ("children", "shared")

    def __init__(self) -> None:
        self.children: list[_Node] = []
        self.shared: dict[tuple, _Node] = {}


def _leaf(cond: dict) -> tuple[str, str, object]:
    (op, body), = cond.items()
    if op.startswith("$"):
        (field, right), = body.items()
        return field, op, right
    return op, "$eq", body  # {"field": value} is an equality


def _add(cond: dict, parent: _Node) -> _Node:
    """Add one condition below ``parent`` as durable would; returns the node it ends on."""
    (op, body), = cond.items()
    if op == "$and":
        node = parent
        for item in body:
            node = _add(item, node)
        return node
    if op == "$or":
        forward = _Node()
        for item in body:
            _add(item, parent).children.append(forward)
        return forward
    field, oper, right = _leaf(cond)
    if isinstance(right, (str, float, bool)):
        key = (field, oper, type(right).__name__, right)
        found = parent.shared.get(key)
        if found is None:
            found = parent.shared[key] = _Node()
            parent.children.append(found)
        return found
    node = _Node()  # $m / arithmetic operands: never shared
    parent.children.append(node)
    return node


def _extra(node: _Node, memo: dict[int, int]) -> int:
    """Worst-case stack growth while durable walks below ``node`` (all tests matching)."""
    got = memo.get(id(node))
    if got is None:
        kids = node.children
        if not kids:
            got = 0
        else:
            got = len(kids) - 1 + max(1, max(_extra(k, memo) for k in kids))
        memo[id(node)] = got
    return got


def worst_stack(conditions: list[dict]) -> int:
    """Worst-case pending alpha nodes for a fact, for rules with these ``m`` conditions."""
    root = _Node()
    for cond in conditions:
        _add(cond, root)
    return _extra(root, {})


def rule_stack(cond: dict) -> int:
    return worst_stack([cond])


def _guarded(cond: dict, guards: list[dict]) -> dict:
    (op, body), = cond.items()
    if op == "$and":
        return {"$and": [*guards, *body]}
    return {"$and": [*guards, cond]}


def _guard(value: float) -> dict:
    return {"$neq": {GUARD_FIELD: value}}  # g__ is always 0, so this always holds


def _pack(items: list[list[dict]], limit: int) -> list[list[int]]:
    """Consecutive groups of item indices whose worst case, side by side, stays within ``limit``."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i in range(len(items)):
        trial = current + [i]
        if current and worst_stack([c for j in trial for c in items[j]]) > limit:
            groups.append(current)
            current = [i]
        else:
            current = trial
    if current:
        groups.append(current)
    return groups


def arrange(conditions: list[dict]) -> tuple[list[dict], bool]:
    """The conditions, with guard tests prepended where needed; and whether guards are used."""
    if worst_stack(conditions) <= STACK_LIMIT:
        return list(conditions), False
    out = list(conditions)
    groups = _pack([[c] for c in conditions], GROUP_LIMIT)
    for g, members in enumerate(groups):
        for i in members:
            out[i] = _guarded(conditions[i], [_guard(float(g + 1))])
    if worst_stack(out) <= STACK_LIMIT:
        return out, True
    level0 = [[out[i] for i in members] for members in groups]
    supers = _pack(level0, SUPER_LIMIT)
    for s, group_ids in enumerate(supers):
        for g in group_ids:
            for i in groups[g]:
                out[i] = _guarded(out[i], [_guard(float(-(s + 1)))])
    if worst_stack(out) > STACK_LIMIT:
        raise TooManyRules(f"{len(conditions)} engine rules cannot be arranged within durable's matching stack")
    return out, True
