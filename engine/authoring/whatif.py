"""What-if before going live: ``nba rules diff OLD_DIR NEW_DIR --customers N``.

Decides for a sample of stored customers under both rule sets (same profiles and contact history,
same model, the real funnel, nothing written to Redis) and reports how the top actions move: counts per action, the
customers whose top action changed, the biggest moves, and examples with the reason the old top
action lost its place under the new rules. Control-group decisions are counted on their own line: their
offers come in a random order, drawn per customer, day and action (``decision.contact.control_order``),
so both sides see the same draw and only a change of the customer's eligible offers moves them. New or
changed contact policies are listed with the actions they apply to (``contactscope``).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.authoring.contactscope import PolicyScope, policy_scopes
from engine.decision.funnel import Decision, DecisionEngine
from engine.decision.request import DecideInput
from engine.live import Live
from engine.models.registry import LoadedModel
from engine.rules.runtime import CompiledRules
from engine.store.profiles import ProfileStore

NOTHING = "(nothing)"
_PROFILE_KEYS = "nba:{c:*}:profile"


def sample_customers(store: ProfileStore, n: int) -> list[str]:
    """Up to ``n`` stored customer ids (Redis SCAN order: spread over the key space), sorted."""
    ids = []
    for key in itertools.islice(store.client.scan_iter(match=_PROFILE_KEYS, count=1000), n):
        key = key.decode() if isinstance(key, bytes) else key
        ids.append(key[len("nba:{c:"): -len("}:profile")])
    return sorted(ids)


@dataclass
class Change:
    customer_id: str
    channel: str
    old: str
    new: str
    why: str = ""  # where the old top action went under the new rules


@dataclass
class WhatIf:
    old_version: str
    new_version: str
    model_version: str
    channels: list[str]
    decisions: int = 0  # customers x channels
    old_top: Counter = field(default_factory=Counter)
    new_top: Counter = field(default_factory=Counter)
    moves: Counter = field(default_factory=Counter)  # (old top, new top) -> decisions
    changes: list[Change] = field(default_factory=list)
    control_decisions: int = 0  # decisions of control-group customers (on either side)
    control_changed: int = 0  # of those, how many changed top action (included in ``changed``)
    policies: list[PolicyScope] = field(default_factory=list)  # new or changed contact policies

    @property
    def changed(self) -> int:
        return sum(self.moves.values())

    def render(self, examples: int = 10) -> str:
        pct = 100.0 * self.changed / self.decisions if self.decisions else 0.0
        lines = [
            f"what-if: {self.old_version} -> {self.new_version}, model {self.model_version}, "
            f"{self.decisions} decisions ({', '.join(self.channels)})",
            f"top action changed in {self.changed} of {self.decisions} decisions ({pct:.1f}%)",
            f"control group: top action changed in {self.control_changed} of {self.control_decisions} decisions "
            "(random offers drawn alike on both sides: only offers that became eligible or not move them)",
            "",
            f"{'top action':34} {'old':>7} {'new':>7} {'change':>7}",
        ]
        actions = sorted(set(self.old_top) | set(self.new_top),
                         key=lambda a: (-abs(self.new_top[a] - self.old_top[a]), -self.new_top[a], a))
        for a in actions:
            delta = self.new_top[a] - self.old_top[a]
            lines.append(f"{a:34} {self.old_top[a]:>7} {self.new_top[a]:>7} {delta:>+7}")
        if self.moves:
            lines += ["", "biggest moves (old top -> new top: decisions)"]
            for (old, new), count in self.moves.most_common(10):
                lines.append(f"  {old} -> {new}: {count}")
        if self.policies:
            lines += ["", "contact policies new or changed"]
            for scope in self.policies:
                lines += scope.render()
        if self.changes and examples:
            lines += ["", "examples"]
            for c in self.changes[:examples]:
                lines.append(f"  {c.customer_id} {c.channel}: {c.old} -> {c.new}" + (f"  ({c.why})" if c.why else ""))
        return "\n".join(lines)

    def as_dict(self, examples: int = 10) -> dict:
        return {
            "old_version": self.old_version, "new_version": self.new_version, "model_version": self.model_version,
            "channels": self.channels, "decisions": self.decisions, "changed": self.changed,
            "old_top": dict(self.old_top), "new_top": dict(self.new_top),
            "moves": [{"old": o, "new": n, "decisions": c} for (o, n), c in self.moves.most_common()],
            "examples": [c.__dict__ for c in self.changes[:examples]],
            "control_decisions": self.control_decisions, "control_changed": self.control_changed,
            "contact_policies": [p.as_dict() for p in self.policies],
        }


def _top(decision: Decision) -> str:
    return decision.actions[0].action_id if decision.actions else NOTHING


def what_if(store: ProfileStore, model: LoadedModel, old: CompiledRules, new: CompiledRules,
            customers: list[str], channels: list[str], examples: int = 10) -> WhatIf:
    """Decide for every customer on every channel under ``old`` and ``new``; compare the top actions."""
    now = time.time()  # one clock for both: the control group's daily order is the same
    engines = [DecisionEngine(store, Live(rules), Live(model), clock=lambda: now) for rules in (old, new)]
    report = WhatIf(old.version, new.version, model.version, list(channels),
                    policies=policy_scopes(new.ruleset, old.ruleset))
    for cid in customers:
        for channel in channels:
            sides = [e._decide(DecideInput(cid, channel), observe=False)[0] for e in engines]
            before, after = (_top(d) for d in sides)
            report.decisions += 1
            if any(d.control for d in sides):
                report.control_decisions += 1
                report.control_changed += before != after
            report.old_top[before] += 1
            report.new_top[after] += 1
            if before != after:
                report.moves[(before, after)] += 1
                if len(report.changes) < examples:
                    report.changes.append(Change(cid, channel, before, after, _why(engines[1], cid, channel, before)))
    return report


def _why(engine: DecisionEngine, customer_id: str, channel: str, action_id: str) -> str:
    """Where ``action_id`` dropped out of ``engine``'s decision (the funnel of an explained decision)."""
    if action_id == NOTHING:
        return ""
    decision = engine._decide(DecideInput(customer_id, channel, explain=True), observe=False)[0]
    for entry in decision.funnel:
        if entry.action_id == action_id:
            if entry.stage == "ranked":
                return f"now {entry.detail}"
            return f"{action_id}: {entry.stage}, {entry.detail}"
    return f"{action_id} is no longer in the catalog"


def load_pair(old_dir: Path, new_dir: Path) -> tuple[CompiledRules, CompiledRules]:
    """Both rule sets compiled (raises RuleErrors naming the files)."""
    from engine.rules.runtime import load_and_compile

    old = load_and_compile(old_dir)
    try:
        return old, load_and_compile(new_dir)
    except Exception:
        old.close()
        raise
