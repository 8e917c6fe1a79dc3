"""What each contact policy applies to, for ``nba rules diff`` and ``nba rules test``.

A policy without ``types``, ``actions`` or ``groups`` limits every action of the catalog. Named
``booster_once_a_week``, it reads as a limit on the booster while it caps everything: checks, rule
tests and the what-if all pass, and customers get only the fallback. So the tools say how many actions
each new or changed policy applies to, and warn when its name or description mentions an action id or
group that its filters do not restrict it to, and when it counts contacts the live policies did not keep
(the contact history keeps only what they count).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from engine.rules.contact import DAY_MS, KINDS, ContactLimit, ContactRules
from engine.rules.model import Action, RuleSet

FEW = 5  # scopes this small list their action ids


@dataclass
class PolicyScope:
    name: str
    status: str  # new | changed | unchanged
    applies_to: list[str]
    catalog: int
    warnings: list[str] = field(default_factory=list)

    def render(self) -> list[str]:
        n = len(self.applies_to)
        ids = f": {', '.join(self.applies_to)}" if 0 < n <= FEW else " (all)" if n == self.catalog else ""
        status = f" ({self.status})" if self.status else ""
        lines = [f"  {self.name}{status}: applies to {n} of {self.catalog} actions{ids}"]
        return lines + [f"    warning: {w}" for w in self.warnings]

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "applies_to": len(self.applies_to),
                "catalog": self.catalog, "actions": self.applies_to if len(self.applies_to) <= FEW else [],
                "warnings": self.warnings}


def _mentions(text: str, names: Sequence[str]) -> list[str]:
    """The names written in ``text`` as whole words (``_`` and punctuation separate words)."""
    low = text.lower()
    return [n for n in names if re.search(rf"(?<![a-z0-9]){re.escape(n.lower())}(?![a-z0-9])", low)]


def mismatches(limit: ContactLimit, actions: Sequence[Action]) -> list[str]:
    """Why ``limit``'s name or description promises a scope its filters do not give it."""
    scope = set(limit.scope(actions))
    ids = [a.id for a in actions]
    groups = sorted({a.group for a in actions})
    out = []
    for what, text in (("name", limit.name), ("description", limit.description)):
        named_ids = _mentions(text, ids)
        named_groups = [g for g in _mentions(text, groups) if g not in named_ids]
        if not named_ids and not named_groups:
            continue
        named = set(named_ids) | {a.id for a in actions if a.group in named_groups}
        mentioned = ", ".join([f'action "{i}"' for i in named_ids] + [f'group "{g}"' for g in named_groups])
        hint = (f"actions: [{', '.join(named_ids)}]" if named_ids else f"groups: [{', '.join(named_groups)}]")
        outside = scope - named
        if outside:
            out.append(f"its {what} mentions {mentioned} but it limits {len(outside)} other action(s) too "
                       f"({len(scope)} of {len(actions)} in all); to limit only those, add {hint}")
        elif not scope & named:
            out.append(f"its {what} mentions {mentioned} but it does not apply to {'it' if len(named) == 1 else 'them'}")
    return out


def unkept(limit: ContactLimit, old: ContactRules, actions: Sequence[Action], channels: Sequence[str]) -> str | None:
    """Why ``limit`` will not see all of its window at first: the contact history keeps only what the
    live policies count, as long as they count it (``ContactRules.keep_ms``), so contacts within its
    scope that ``old`` did not count, or counted over a shorter window, are not there to count."""
    kind = KINDS[limit.counts]
    window = int(limit.days * DAY_MS)
    short = [(a, ch, old.keep_ms(kind, a.id, a.group, a.type, ch)) for a in actions for ch in channels
             if limit.counts_contact(a.id, a.group, a.type, ch)]
    short = [x for x in short if x[2] < window]
    if not short:
        return None
    a, ch, kept = short[0]
    had = "were not kept" if not kept else f"were kept {kept / DAY_MS:g} days"
    return (f"the {limit.counts} it counts ({len(short)} action x channel pair(s), e.g. {a.id} on {ch}) {had} under the "
            f"live policies, so for its first {limit.days:g} days it counts only those made after it goes live")


def unkept_contacts(new: RuleSet, old: RuleSet) -> list[str]:
    """``<policy>: <why>`` for each policy of ``new`` that will not see all of its window at first."""
    before = old.contact or ContactRules()
    limits = new.contact.limits if new.contact else ()
    return [f"{l.name}: {why}" for l in limits if (why := unkept(l, before, new.actions, new.schema.channel_names))]


def policy_scopes(new: RuleSet, old: RuleSet | None = None) -> list[PolicyScope]:
    """Each contact policy of ``new`` that is new or changed against ``old`` (every one when ``old`` is
    None) with the actions it applies to and any mismatch of its name or description."""
    limits = new.contact.limits if isinstance(new.contact, ContactRules) else ()
    before = {l.name: replace(l, source="") for l in (old.contact.limits if old is not None and old.contact else ())}
    out = []
    for limit in limits:
        status = "new" if limit.name not in before else "unchanged" if before[limit.name] == replace(limit, source="") \
            else "changed"
        if old is not None and status == "unchanged":
            continue
        warnings = mismatches(limit, new.actions)
        if old is not None:
            why = unkept(limit, old.contact or ContactRules(), new.actions, new.schema.channel_names)
            warnings += [why] if why else []
        out.append(PolicyScope(limit.name, status if old is not None else "", limit.scope(new.actions),
                               len(new.actions), warnings))
    return out
