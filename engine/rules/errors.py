"""Errors reported for rule files: where (file:line:col, 1-based), what was expected, and a hint."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from engine.errors import NbaError


@dataclass(frozen=True)
class RuleError:
    """One problem in a rule file. ``str(err)`` is ``file:line:col: message; hint``."""

    file: str
    line: int
    column: int
    message: str
    hint: str = ""
    snippet: str = ""  # the source line, for ``render()``
    note: str = ""  # e.g. which checks elsewhere this error made impossible; shown by ``render()``

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.column}: {self.message}"
        return f"{text}; {self.hint}" if self.hint else text

    def render(self) -> str:
        """The error followed by the source line and a caret under the column."""
        text = str(self)
        if self.snippet:
            text += "\n    " + self.snippet + "\n    " + " " * (self.column - 1) + "^"
        return (text + f"\n    note: {self.note}") if self.note else text


class RuleErrors(NbaError):
    """Raised when rule files do not load or compile; ``errors`` holds every problem found."""

    def __init__(self, errors: Iterable[RuleError]):
        self.errors: list[RuleError] = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors) or "rule errors")


@dataclass(frozen=True)
class ConditionError(NbaError):
    """A problem inside one condition text; ``pos``/``end`` are offsets into that text."""

    pos: int
    end: int
    message: str
    hint: str = ""
    refers: str = ""  # "situation": the name may be one that an unreadable policies.yaml defines

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


def suggest(name: str, candidates: Iterable[str]) -> str:
    """A ``did you mean "x"?`` hint for the closest candidate, or ""."""
    pool = sorted(set(candidates))
    match = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    if not match:
        lowered = {c.lower(): c for c in pool}
        if name.lower() in lowered:
            match = [lowered[name.lower()]]
    return f'did you mean "{match[0]}"?' if match else ""
