"""The condition language in one call: parse, resolve and type-check a condition text."""

from __future__ import annotations

from engine.rules.checker import Scope, check
from engine.rules.errors import ConditionError
from engine.rules.evaluate import evaluate
from engine.rules.nodes import Node
from engine.rules.parser import parse, parse_all

__all__ = ["ConditionError", "Scope", "compile_condition", "evaluate", "parse"]


def compile_condition(text: str, scope: Scope) -> tuple[Node | None, list[ConditionError]]:
    """The resolved tree of ``text`` and every error in it, syntax and type errors alike, in the order of
    their offsets into ``text``; the tree is None on errors."""
    tree, errors = parse_all(text)
    if tree is None:
        return None, errors
    resolved, type_errors = check(tree, scope)
    errors = sorted([*errors, *type_errors], key=lambda e: e.pos)
    return (None, errors) if errors else (resolved, [])
