"""Campaigns as loaded from ``rules/campaigns/*.yaml``: objective, dates, target, channels, budgets.

A campaign owns its actions (catalog actions it names, or actions of its own): while an action belongs
to a campaign it is offered only on the campaign's channels, to the customers its ``target`` admits,
inside its dates and within its budgets. An action belongs to at most one campaign, so every presented
action has at most one campaign to credit it to. The dates and budgets are judged by the decision funnel
(``engine.decision.campaigns``) on the decision's own clock, so a campaign starts and ends without a
reload; the target is one more eligibility condition of each of its actions (``RuleSet.stage_conditions``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.rules.nodes import Node

if TYPE_CHECKING:
    from engine.rules.checker import Scope
    from engine.rules.model import Action
    from engine.rules.yamlsrc import Loc

CAMPAIGNS_DIR = "campaigns"
OBJECTIVES = ("acceptances", "value", "retention_saves")
CAMPAIGN_KEYS = {"name": True, "objective": True, "owner": True, "start": True, "end": True, "time_zone": False,
                 "actions": True, "target": False, "channels": False, "budget": False, "control_share": False,
                 "priority": False, "description": False}
BUDGET_KEYS = {"total": False, "daily": False}


@dataclass(frozen=True, eq=False)
class Campaign:
    name: str
    objective: str  # acceptances | value | retention_saves
    owner: str
    start: float  # epoch seconds, inclusive
    end: float  # epoch seconds, exclusive
    time_zone: str
    actions: tuple[str, ...]
    target: Node | None = None
    target_text: str = ""
    channels: frozenset[str] = frozenset()  # empty: the channels its actions have
    total_budget: int | None = None  # presentations over the whole campaign
    daily_budget: int | None = None  # presentations per day (in the campaign's time zone)
    control_share: float = 0.0  # customers held out of the campaign (lift, ``nba campaign report``)
    priority: float = 1.0  # multiplies its actions' priority
    description: str = ""
    source: str = ""  # file:line:col
    file: str = ""

    def live(self, now: float) -> bool:
        return self.start <= now < self.end

    def live_on(self, day: date) -> bool:
        """Live at some moment of ``day`` (in the campaign's time zone)."""
        tz = ZoneInfo(self.time_zone)
        first = datetime.combine(day, time(), tz).timestamp()
        return first < self.end and first + 86_400 > self.start

    def day(self, now: float) -> str:
        """The campaign's day at ``now`` (YYYYMMDD in its time zone): its daily budget's counter."""
        return f"{datetime.fromtimestamp(now, ZoneInfo(self.time_zone)):%Y%m%d}"

    def holds_out(self, customer_id: str) -> bool:
        """The customer is in this campaign's control group (a stable hash, independent per campaign)."""
        if self.control_share <= 0:
            return False
        digest = hashlib.blake2b(f"campaign:{self.name}:{customer_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < self.control_share

    def elapsed(self, now: float) -> float:
        """Share of the campaign's time gone at ``now`` (0 before it starts, 1 after it ends)."""
        return min(1.0, max(0.0, (now - self.start) / (self.end - self.start)))

    def even_spend(self, now: float) -> float | None:
        """Presentations an even spend of the total budget would have used by ``now``."""
        return None if self.total_budget is None else self.total_budget * self.elapsed(now)

    def describe_dates(self) -> str:
        tz = ZoneInfo(self.time_zone)
        return (f"{datetime.fromtimestamp(self.start, tz):%Y-%m-%d %H:%M} to "
                f"{datetime.fromtimestamp(self.end, tz):%Y-%m-%d %H:%M} {self.time_zone}")


def campaign_files(rules_dir: Path) -> list[Path]:
    folder = Path(rules_dir) / CAMPAIGNS_DIR
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def _moment(loader: Any, loc: Loc | None, what: str, tz: tzinfo, end: bool) -> float | None:
    """A date (the day's start; for an end, the next day's start) or a date and time, in ``tz`` unless
    the value gives its own UTC offset."""
    if loc is None:
        return None
    value = loc.value
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.replace(tzinfo=tz)).timestamp()
    if isinstance(value, date):
        return datetime.combine(value + timedelta(days=1) if end else value, time(), tz).timestamp()
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=tz)).timestamp()
        except ValueError:
            pass
    loader.err(loc.error(f"expected a date or a date and time for {what}",
                         'e.g. 2030-01-15 or "2030-01-15 08:00" (in time_zone)'))
    return None


def load_campaigns(loader: Any, scope: Scope, actions: list[Action]) -> tuple[dict[str, Campaign], list[Action]]:
    """Every campaign file's campaign, and the catalog with the campaigns' own actions added and the
    catalog actions they claim bound to them (errors go to ``loader``)."""
    from engine.rules.errors import suggest

    campaigns: dict[str, Campaign] = {}
    by_id = {a.id: i for i, a in enumerate(actions)}
    out = list(actions)
    owner_of: dict[str, str] = {}
    for path in campaign_files(loader.dir):
        tree = loader.yaml(f"{CAMPAIGNS_DIR}/{path.name}")
        fields = loader.keys(tree, CAMPAIGN_KEYS, "campaign", {"actions": "[<action id>]"}) if tree is not None else None
        if fields is None:
            continue
        assert tree is not None
        name = loader.ident(fields.get("name"), "campaign name")
        if name in campaigns:
            loader.err(fields["name"].error(f'duplicate campaign name "{name}"',
                                            f"first defined in {campaigns[name].source}"))
            continue
        what = f'campaign "{name or "?"}"'
        objective = loader.text(fields.get("objective"), f"{what} objective")
        if objective and objective not in OBJECTIVES:
            loader.err(fields["objective"].error(f'unknown objective "{objective}"',
                                                 suggest(objective, OBJECTIVES) or "objectives: " + ", ".join(OBJECTIVES)))
        tz_name = loader.text(fields.get("time_zone"), f"{what} time_zone", "UTC")
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "America" is a folder of zones
            loader.err(fields["time_zone"].error(f'unknown time zone "{tz_name}"', "e.g. Europe/Amsterdam or UTC"))
            tz, tz_name = ZoneInfo("UTC"), "UTC"
        start = _moment(loader, fields.get("start"), "start", tz, end=False)
        end = _moment(loader, fields.get("end"), "end", tz, end=True)
        if start is not None and end is not None and end <= start:
            loader.err(fields["end"].error(f"{what} ends before it starts"))
        channels = frozenset(ch for ch, _ in _channels(loader, fields.get("channels"), what))
        target = loader.condition(fields.get("target"), scope, f"{what} target")
        budget = loader.keys(fields["budget"], BUDGET_KEYS, f"{what} budget") if "budget" in fields else None
        total = _count(loader, (budget or {}).get("total"), f"{what} total budget")
        daily = _count(loader, (budget or {}).get("daily"), f"{what} daily budget")
        share = loader.number(fields.get("control_share"), f"{what} control_share", minimum=0)
        if share is not None and share > 0.5:
            loader.err(fields["control_share"].error("control_share must be at most 0.5", "e.g. 0.1 for 10%"))
        priority = loader.number(fields.get("priority"), f"{what} priority", positive=True)
        ids: list[str] = []
        items = loader.sequence(fields["actions"], f"{what} actions") if "actions" in fields else []
        if "actions" in fields and not items:
            loader.err(fields["actions"].error(f"{what} has no actions"))
        for item in items:
            if item.is_scalar:  # a catalog action
                action_id = loader.text(item, f"{what} action")
                if action_id not in by_id:
                    hint = suggest(action_id, by_id) or "name a catalog action, or define it here"
                    loader.ref_err("action", item.error(f'unknown action "{action_id}" in {what}', hint))
                    continue
                index = by_id[action_id]
            else:  # an action of its own
                own = loader.action_items([item], scope)
                if not own:
                    continue
                out.append(own[0])
                index = by_id[own[0].id] = len(out) - 1
                action_id = own[0].id
            if action_id in owner_of:
                loader.err(item.error(f'action "{action_id}" already belongs to campaign "{owner_of[action_id]}"',
                                      "an action belongs to at most one campaign"))
                continue
            owner_of[action_id] = name
            action = out[index]
            kept = {ch: t for ch, t in action.channels.items() if not channels or ch in channels}
            if not kept:
                loader.err(item.error(f'action "{action_id}" has none of {what}\'s channels ({", ".join(sorted(channels))})',
                                      "add a treatment for one of them, or the channel to the campaign"))
            out[index] = replace(action, campaign=name, channels=kept)
            ids.append(action_id)
        if not name or start is None or end is None:
            continue
        campaigns[name] = Campaign(
            name=name, objective=objective or "value", owner=loader.text(fields.get("owner"), f"{what} owner"),
            start=start, end=end, time_zone=tz_name, actions=tuple(ids), target=target,
            target_text=str(fields["target"].value) if "target" in fields else "", channels=channels,
            total_budget=total, daily_budget=daily, control_share=float(share or 0.0),
            priority=float(priority) if priority is not None else 1.0,
            description=loader.text(fields.get("description"), "description"), source=tree.where(), file=str(path))
    return campaigns, out


def _count(loader: Any, loc: Loc | None, what: str) -> int | None:
    value = loader.number(loc, what, minimum=0)
    if value is None:
        return None
    if not float(value).is_integer():
        assert loc is not None
        loader.err(loc.error(f"{what} must be a whole number of presentations"))
        return None
    return int(value)


def _channels(loader: Any, loc: Loc | None, what: str) -> list[tuple[str, Loc]]:
    from engine.rules.errors import suggest

    found = []
    for channel, item in loader.names(loc, f"{what} channels"):
        known = loader.schema.channel_names
        if channel not in known:
            loader.err(item.error(f'unknown channel "{channel}"', suggest(channel, known) or ", ".join(known)))
        else:
            found.append((channel, item))
    return found
