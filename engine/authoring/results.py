"""What a rule test or an event-rule test reports, shared by both kinds of test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from engine.rules.errors import RuleError
from engine.rules.runtime import ActionVerdict


class NamedTest(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def where(self) -> str: ...  # file:line:col of the test


@dataclass
class TestResult:
    test: NamedTest
    failures: list[str]
    ranked: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def render(self) -> str:
        head = f'{self.test.where}: {"ok  " if self.passed else "FAIL"} {self.test.name}'
        return "\n".join([head, *(f"    {f}" for f in self.failures)])

    def as_error(self) -> RuleError:
        file, line, col = self.test.where.rsplit(":", 2)
        return RuleError(file, int(line), int(col), f'rule test "{self.test.name}" failed: ' + "; ".join(self.failures))


def why(v: ActionVerdict, channel: str) -> str:
    """Why an action did not go through, for a failure message."""
    a = v.action
    if v.admitted:
        return "it was admitted"
    if v.stage == "channel":
        return f"it has no treatment for {channel}"
    if v.stage == "dates" and v.reasons:
        return f"it is outside its dates ({v.reasons[0]})"
    if v.stage == "dates":
        return f"it is outside its dates ({a.valid_from or '...'} to {a.valid_to or '...'})"
    if v.stage == "policy":
        return "it was blocked by " + "; ".join(f"policy {p} ({r})" for p, r in zip(v.blocked_by, v.reasons))
    word = {"eligibility": "eligible", "applicability": "applicable", "suitability": "suitable"}[v.stage]
    return f"it was not {word}: {v.reasons[0] if v.reasons else ''}"
