"""The loaded rule set: action catalog, situations, engagement policies, levers, context weights.

Engagement policies per action and per group come in three stages, each an optional condition on
the action (``eligible``, ``applicable``, ``suitable``) and on its group (``RuleSet.groups``):
eligibility (may we offer it to this customer), applicability (in this context: channel,
touchpoint, call intent) and suitability (is it right for them: affordability, risk). An action
goes on only when every one of them holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from engine.features import FeatureSchema
from engine.rules.nodes import And, Node

STAGES = ("eligible", "applicable", "suitable")  # per-action engagement conditions, in funnel order


@dataclass(frozen=True, eq=False)
class Action:
    id: str
    name: str
    type: str
    group: str
    value: float
    channels: dict[str, dict[str, str]]  # channel -> treatment (field -> text)
    eligible: Node | None = None  # resolved condition; None means always eligible
    eligible_text: str = ""
    applicable: Node | None = None
    applicable_text: str = ""
    suitable: Node | None = None
    suitable_text: str = ""
    valid_from: date | None = None
    valid_to: date | None = None
    daily_budget: int | None = None
    description: str = ""
    source: str = ""  # "file:line:col" of the action, for explanations
    campaign: str = ""  # the campaign this action belongs to (rules/campaigns/*.yaml), if any
    service: bool = False  # its type is customer care, not an offer (domain.yaml: needs_consent false)
    quiet_exempt: bool = False  # its type may go out during quiet hours (domain.yaml: quiet_hours false)

    def offered_on(self, channel: str) -> bool:
        return channel in self.channels

    def valid_on(self, day: date) -> bool:
        if self.valid_from is not None and day < self.valid_from:
            return False
        return self.valid_to is None or day <= self.valid_to


@dataclass(frozen=True, eq=False)
class GroupRules:
    """Engagement conditions shared by every action of a group (catalog.yaml ``groups:``)."""

    name: str
    eligible: Node | None = None
    eligible_text: str = ""
    applicable: Node | None = None
    applicable_text: str = ""
    suitable: Node | None = None
    suitable_text: str = ""
    description: str = ""
    source: str = ""


@dataclass(frozen=True)
class Targets:
    """Which actions a policy blocks or a lever boosts: any of these types, groups or action ids."""

    types: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    actions: frozenset[str] = frozenset()

    def matches(self, action: Action) -> bool:
        return action.type in self.types or action.group in self.groups or action.id in self.actions


@dataclass(frozen=True, eq=False)
class Situation:
    name: str
    when: Node
    when_text: str
    description: str = ""
    source: str = ""


@dataclass(frozen=True, eq=False)
class Policy:
    name: str
    when: Node
    when_text: str
    blocks: Targets
    reason: str
    description: str = ""
    source: str = ""


@dataclass(frozen=True, eq=False)
class Lever:
    name: str
    when: Node
    when_text: str
    targets: Targets
    weight: float
    description: str = ""
    source: str = ""


@dataclass(eq=False)
class RuleSet:
    version: str  # "rules-" + first 12 hex of sha256 over the files' names and bytes
    loaded_at: datetime
    actions: tuple[Action, ...]
    fallback: dict[str, str]  # channel or "default" -> action id
    situations: dict[str, Situation]
    policies: tuple[Policy, ...]
    levers: tuple[Lever, ...]
    context_weights: dict[str, dict[str, float]]  # channel -> action type -> multiplier
    triggers: tuple[str, ...] | None = None  # declared trigger names (None: not declared)
    files: tuple[str, ...] = ()
    groups: dict[str, GroupRules] = field(default_factory=dict)  # group -> its engagement conditions
    contact: Any = None  # engine.decision.contact.ContactRules from contact.yaml (None: no contact policies)
    events: Any = None  # rules.patterns.EventRules from events.yaml (None: no event patterns)
    campaigns: dict[str, Any] = field(default_factory=dict)  # name -> rules.campaigns.Campaign
    schema: FeatureSchema = field(default_factory=FeatureSchema)  # domain.yaml
    by_id: dict[str, Action] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {a.id: a for a in self.actions}

    def action(self, action_id: str) -> Action:
        return self.by_id[action_id]

    def fallback_for(self, channel: str) -> Action | None:
        action_id = self.fallback.get(channel) or self.fallback.get("default")
        return self.by_id.get(action_id) if action_id else None

    def campaign_of(self, action: Action) -> Any:
        """The ``rules.campaigns.Campaign`` ``action`` belongs to (None: none)."""
        return self.campaigns.get(action.campaign) if action.campaign else None

    def context_weight(self, channel: str, action_type: str) -> float:
        return self.context_weights.get(channel, {}).get(action_type, 1.0)

    def situation_conditions(self) -> dict[str, Node]:
        return {name: s.when for name, s in self.situations.items()}

    def stage_conditions(self, action: Action) -> list[tuple[str, str, Node]]:
        """(stage, text, condition) for every engagement condition of ``action``, group's first,
        in funnel order: eligible, applicable, suitable."""
        group = self.groups.get(action.group)
        out = []
        campaign = self.campaigns.get(action.campaign) if action.campaign else None
        if campaign is not None and campaign.target is not None:  # who the campaign targets, before all else
            out.append(("eligible", f"campaign {campaign.name} target: {campaign.target_text}", campaign.target))
        for stage in STAGES:
            for owner, prefix in ((group, f"group {action.group}: "), (action, "")):
                condition = getattr(owner, stage) if owner is not None else None
                if condition is not None:
                    out.append((stage, prefix + getattr(owner, f"{stage}_text"), condition))
        return out

    def engagement(self, action: Action) -> Node | None:
        """All of ``action``'s engagement conditions in one (None: always engaged)."""
        conditions = tuple(c for _, _, c in self.stage_conditions(action))
        if not conditions:
            return None
        return conditions[0] if len(conditions) == 1 else And(conditions)
