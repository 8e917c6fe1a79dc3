"""The condition language in one call: parse, resolve and type-check a condition text."""

from __future__ import annotations

from .checker import Scope, check
from .errors import ConditionError
from .evaluate import evaluate
from .nodes import Node
from .parser import parse

__all__ = ["ConditionError", "Scope", "compile_condition", "evaluate", "parse"]


def compile_condition(text: str, scope: Scope) -> tuple[Node | None, list[ConditionError]]:
    """The resolved tree of ``text`` and its errors (offsets into ``text``); the tree is None on errors."""
    try:
        tree = parse(text)
    except ConditionError as err:
        return None, [err]
    resolved, errors = check(tree, scope)
    return (None, errors) if errors else (resolved, [])
