"""The condition language in one call: parse, resolve and type-check a condition text."""

from __future__ import annotations

from engine.rules.checker import Scope, check
from engine.rules.errors import ConditionError
from engine.rules.evaluate import evaluate
from engine.rules.nodes import Node
from engine.rules.parser import parse

__all__ = ["ConditionError", "Scope", "compile_condition", "evaluate", "parse"]


def compile_condition(text: str, scope: Scope) -> tuple[Node | None, list[ConditionError]]:
    """The resolved tree of ``text`` and its errors (offsets into ``text``); the tree is None on errors."""
    try:
        tree = parse(text)
    except ConditionError as err:
        return None, [err]
    resolved, errors = check(tree, scope)
    return (None, errors) if errors else (resolved, [])
