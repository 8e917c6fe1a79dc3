"""Campaigns in the funnel: the campaign's control group and its budgets.

A campaign's actions drop out at the rule stage when the campaign is not running at the decision's time
(``CompiledRules.admitted(now=...)``: stage ``expired``, "campaign X runs ..."), so campaigns start and
end by the decision's clock without a reload. Before presenting, they drop out when the customer is in
the campaign's control group (``campaign_control``). The
budgets are judged by the presenting script (``decision/contact.PRESENT``) in the same atomic step as the
daily action budgets, on counters keyed by the campaign's name, so a hot reload of a campaign file keeps
what it spent and N server processes together never spend more than the budget:

- ``nba:campaign:<name>:spent``: presentations over the whole campaign;
- ``nba:campaign:<name>:day:<yyyymmdd>``: presentations on one day of the campaign's time zone.

Each decision records which campaigns were in play for the customer (an admitted action of a running
campaign: ``campaign_eligible``, or ``campaign_control`` for a held-out customer), intent-to-treat, so
``nba campaign report`` compares customers, not presentations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from engine import metrics
from engine.rules.campaigns import Campaign
from engine.store.polling import Poller
from engine.store.profiles import is_cluster

if TYPE_CHECKING:
    from engine.decision.arbitration import FunnelEntry
    from engine.rules.model import RuleSet

DAILY_TTL_SECONDS = 3 * 86_400
KEEP_AFTER_END_SECONDS = 90 * 86_400  # the total counter outlives the campaign (reports, a late reload)
TOTAL, DAILY = "campaign_total", "campaign_daily"


def spent_key(name: str) -> str:
    return f"nba:campaign:{name}:spent"


def day_key(name: str, day: str) -> str:
    return f"nba:campaign:{name}:day:{day}"


@dataclass
class InPlay:
    """The campaigns a decision touched: eligible (not held out) and held out (the campaign's control)."""

    eligible: set[str]
    held_out: set[str]


def campaign_stage(ruleset: RuleSet, candidates: list, customer_id: str,
                   funnel: list[FunnelEntry] | None) -> tuple[list, InPlay]:
    """Ranked candidates ``(priority, propensity, verdict)`` without the actions of campaigns that hold
    this customer out."""
    from engine.decision.arbitration import FunnelEntry

    played = InPlay(set(), set())
    if not ruleset.campaigns:
        return candidates, played
    kept = []
    for c in candidates:
        action = c[2].action
        campaign = ruleset.campaigns.get(action.campaign) if action.campaign else None
        if campaign is None:  # (a campaign that is not running had its actions dropped by the rule stage)
            kept.append(c)
        elif campaign.holds_out(customer_id):
            played.held_out.add(campaign.name)
            if funnel is not None:
                funnel.append(FunnelEntry(action.id, "campaign_control", f"control group of campaign {campaign.name} "
                                          f"({campaign.control_share:.0%} held out to measure its lift)", c[1], c[0]))
        else:
            played.eligible.add(campaign.name)
            kept.append(c)
    return kept, played


def budget_specs(campaign: Campaign | None, now: float) -> list[tuple[str, int, str, int]]:
    """(counter key, budget, verdict when used up, counter TTL seconds) for each budget of ``campaign``."""
    if campaign is None:
        return []
    specs = []
    if campaign.total_budget is not None:
        specs.append((spent_key(campaign.name), campaign.total_budget, f"{TOTAL}:{campaign.name}",
                      int(max(campaign.end - now, 0) + KEEP_AFTER_END_SECONDS)))
    if campaign.daily_budget is not None:
        specs.append((day_key(campaign.name, campaign.day(now)), campaign.daily_budget, f"{DAILY}:{campaign.name}",
                      DAILY_TTL_SECONDS))
    return specs


def budget_detail(verdict: str, ruleset: RuleSet) -> str:
    kind, name = verdict.split(":", 1)
    campaign = ruleset.campaigns.get(name)
    if kind == TOTAL:
        return f"campaign {name} spent its total budget of {campaign.total_budget if campaign else '?'}"
    return f"campaign {name} spent today's budget of {campaign.daily_budget if campaign else '?'}"


@dataclass
class CampaignStatus:
    name: str
    objective: str
    owner: str
    live: bool
    start: float
    end: float
    total_budget: int | None
    daily_budget: int | None
    spent: int
    spent_today: int
    even_spend: float | None  # presentations an even spend would have used by now

    @property
    def budget_left(self) -> int | None:
        return None if self.total_budget is None else max(self.total_budget - self.spent, 0)

    @property
    def pacing(self) -> float | None:
        """Spend against the even-spend line: 1.0 on it, above 1 ahead (spending too fast)."""
        if self.even_spend is None or self.even_spend <= 0:
            return None
        return self.spent / self.even_spend


def campaign_status(client: redis.Redis, campaigns: Sequence[Campaign], now: float) -> list[CampaignStatus]:
    """Budget spent, left and pacing of every campaign, read in one round trip (one per node on a cluster)."""
    if not campaigns:
        return []
    keys = [k for c in campaigns for k in (spent_key(c.name), day_key(c.name, c.day(now)))]
    values = client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)  # type: ignore[attr-defined]
    out = []
    for i, c in enumerate(campaigns):
        spent, today = (int(v or 0) for v in values[2 * i: 2 * i + 2])
        out.append(CampaignStatus(c.name, c.objective, c.owner, c.live(now), c.start, c.end, c.total_budget,
                                  c.daily_budget, spent, today, c.even_spend(now)))
    return out


class CampaignGauges(Poller):
    """Keeps the campaign gauges (live, spent, budget left, pacing) of the live rule set's campaigns
    current: one MGET every ``interval`` seconds."""

    label = "campaigns"

    def __init__(self, client: redis.Redis, campaigns: Callable[[], Sequence[Campaign]], interval: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(interval)
        self.client = client
        self.campaigns = campaigns
        self.clock = clock

    def poll_once(self) -> int:
        statuses = campaign_status(self.client, self.campaigns(), self.clock())
        for s in statuses:
            metrics.CAMPAIGN_LIVE.labels(s.name).set(1 if s.live else 0)
            metrics.CAMPAIGN_SPENT.labels(s.name).set(s.spent)
            if s.budget_left is not None:
                metrics.CAMPAIGN_BUDGET_LEFT.labels(s.name).set(s.budget_left)
            if s.pacing is not None:
                metrics.CAMPAIGN_PACING.labels(s.name).set(s.pacing)
        return len(statuses)
