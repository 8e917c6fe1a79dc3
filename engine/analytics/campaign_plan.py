"""``nba campaign plan FILE``: a forecast of a campaign before it goes live, on the stored customers.

For every customer of the sample and every channel of the campaign, the live rules with the campaign
added (a what-if: the rule files as they are, the campaign file put among them) decide, at a moment
inside the campaign, whether one of its actions is admitted (eligible and targeted: *eligible*) and
whether it would be shown: ranked in the top ``max_actions`` (one per group) by the current model's
priority, as the funnel ranks (the service's control group gets a random order of offers; the
campaign's own control group never sees it). Where it is shown, the action it pushes out of the top
under the live rules is *displaced* (what ``nba rules diff`` would show, per campaign).

How often it is shown depends on traffic, which the plan does not invent: decisions per customer and
day on each channel, measured on the recorded decision stream (or given; the plan warns where the
recorded traffic is missing, thin or spans fewer days than measured), and on what the contact
policies hold back as the customer is contacted: ``plan_replay`` replays each targeted customer's
coming decisions (on every channel: other offers' impressions count too) with the contact limits, the
model's propensity as the chance of acceptance and the recorded share of rejections. Day by day, the
daily budget caps each day and the total budget the sum: the day the total runs out is the run-out day
(budgets cut every customer's presentations alike).

What it leaves out (so a check against ``nba simulate`` can fail): how customers really respond (it has
only the model), other changes to customers meanwhile, exploration and retraining, fatigue, and other
actions' budgets running out.
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis

from engine.analytics.plan_replay import replay
from engine.analytics.recorded import Recorded
from engine.decision.arbitration import order
from engine.decision.contact import control_order
from engine.decision.funnel import DecisionEngine
from engine.decision.request import DEFAULT_MAX_ACTIONS
from engine.errors import NbaError
from engine.features import FeatureSchema
from engine.live import Live
from engine.models.derived import derive
from engine.models.model_input import model_input
from engine.models.registry import LoadedModel
from engine.rules.campaigns import CAMPAIGNS_DIR, Campaign, campaign_files
from engine.rules.facts import FactInputs
from engine.rules.loader import load_rules
from engine.rules.runtime import CompiledRules, load_and_compile
from engine.store.profiles import (
    DECISIONS_STREAM,
    RESPONSES_STREAM,
    Profile,
    ProfileStore,
    customer_ids,
    profile_key,
    triggers_key,
)

DAY = 86_400.0
NO_CAMPAIGN = "(no campaign)"
# fewer recorded decisions on a channel than this and its measured rate is off by more than 10% (Poisson)
THIN_TRAFFIC = 100
TRAFFIC_FIX = ("Recorded traffic is the decisions the running service (nba serve) logs to the decision stream over "
               "the last --traffic-days days; until it has recorded enough, give the traffic: "
               "--decisions-per-day CHANNEL=N (decisions per day on that channel, all customers together)")
# what each count of the plan counts (the JSON says it, the text's headings too)
UNITS = {"eligible": "customers (at the campaign's start, per channel)",
         "shown": "customers whose top at the campaign's start holds its action (per channel)",
         "displaced": "customers whose top at the campaign's start loses this action to the campaign (per channel)",
         "presentations": "presentations over the forecast's days", "per_day": "presentations",
         "by_segment": "presentations and acceptances over the forecast's days",
         "traffic": "decisions per customer per day"}


class PlanError(NbaError, ValueError):
    """A plan that cannot be made: no traffic to forecast with, no customers, a campaign that does not load."""


@dataclass
class Plan:
    campaign: str
    ruleset_version: str
    model_version: str
    customers: int
    days: int  # the forecast's days (from the campaign's start)
    traffic: dict[str, float]  # decisions per customer per day (on average), by channel
    max_actions: int
    traffic_recorded: dict[str, int] | None = None  # decisions measured per channel (None: traffic given)
    warnings: list[str] = field(default_factory=list)  # why the forecast may be off, and how to fix it
    units: dict[str, str] = field(default_factory=lambda: dict(UNITS))
    eligible: dict[str, dict[str, int]] = field(default_factory=dict)  # channel -> segment -> customers
    shown: dict[str, dict[str, int]] = field(default_factory=dict)  # channel -> segment -> customers shown
    presentations: float = 0.0  # expected, before budgets
    presentations_in_budget: float = 0.0  # expected, within the daily and total budgets
    acceptances: float = 0.0
    accepted_value: float = 0.0
    by_segment: dict[str, dict[str, float]] = field(default_factory=dict)
    per_day: list[float] = field(default_factory=list)  # expected presentations per day, within budgets
    run_out_day: str | None = None  # the day the total budget is expected to run out (None: it lasts)
    displaced: dict[str, dict[str, int]] = field(default_factory=dict)  # campaign -> action -> customers
    replays: int = 0  # replays of each eligible customer's coming decisions
    never_presented: list[str] = field(default_factory=list)  # its actions no recorded decision presented
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


# --- inputs ------------------------------------------------------------------------------------------

def what_if_rules(rules_dir: Path, campaign_file: Path) -> tuple[CompiledRules, CompiledRules, Campaign]:
    """(live rules, live rules with ``campaign_file`` among its campaigns, that campaign): the file
    replaces a live campaign of the same name. Raises ``RuleErrors`` naming the file's lines."""
    from engine.rules.yamlsrc import load_yaml

    if not Path(campaign_file).is_file():
        raise PlanError(f"{campaign_file}: no such campaign file")
    tree, _, _ = load_yaml(Path(campaign_file))
    name = tree.value.get("name").value if tree is not None and tree.is_map and "name" in tree.value else None
    with tempfile.TemporaryDirectory(prefix="nba-plan-") as tmp:
        base, plus = Path(tmp) / "live", Path(tmp) / "with"
        shutil.copytree(rules_dir, base)
        for path in campaign_files(base):  # the campaign itself as live now (if it is) is not "live" here
            other, _, _ = load_yaml(path)
            if other is not None and other.is_map and "name" in other.value and other.value["name"].value == name:
                path.unlink()
        shutil.copytree(base, plus)
        (plus / CAMPAIGNS_DIR).mkdir(exist_ok=True)
        shutil.copy(campaign_file, plus / CAMPAIGNS_DIR / Path(campaign_file).name)
        ruleset, errors = load_rules(plus)
        if ruleset is None:
            from engine.rules.errors import RuleErrors

            shown = str(campaign_file)  # errors name the file the marketer gave, not the copy
            raise RuleErrors([e.__class__(shown if e.file.endswith(Path(campaign_file).name) else e.file, e.line,
                                          e.column, e.message, e.hint, e.snippet) for e in errors])
        live = load_and_compile(base)
        try:
            with_campaign = load_and_compile(plus)
        except Exception:
            live.close()
            raise
    assert name is not None
    return live, with_campaign, with_campaign.ruleset.campaigns[name]


def stored_customers(client: redis.Redis, limit: int | None = None) -> list[str]:
    return sorted(itertools.islice(customer_ids(client), limit))


def fetch_profiles(store: ProfileStore, customers: Sequence[str], now: float, schema: FeatureSchema,
                   batch: int = 1000) -> list[Profile]:
    """Profiles with their triggers active at ``now``, a pipelined round trip per ``batch`` customers."""
    out = []
    now_ms = int(now * 1000)
    for k in range(0, len(customers), batch):
        chunk = customers[k: k + batch]
        pipe = store.client.pipeline(transaction=False)
        for cid in chunk:
            pipe.hgetall(profile_key(cid))
            pipe.hgetall(triggers_key(cid))
        replies = pipe.execute()
        out += [store.decode(cid, replies[2 * i], replies[2 * i + 1], now_ms, schema) for i, cid in enumerate(chunk)]
    return out


@dataclass
class Traffic:
    """Decisions per customer and day: ``channels`` the average by channel; ``customers`` each recorded
    customer's own rate (zeros for the customers without a decision), which the plan draws from because
    customers differ (a daily caller meets the contact limits, a yearly one never); ``per_day``: the most
    decisions one customer had in one day (0: unknown, then a day's decisions are Poisson); ``presented``:
    the actions presented in those decisions (what a model trained on them can have learned about);
    ``recorded``: the decisions measured per channel (None: the traffic was given, not measured) in the
    ``window`` days before the last one, of which the recorded decisions span (``covered``) so many."""

    channels: dict[str, float]
    customers: np.ndarray | None = None
    per_day: int = 0
    presented: frozenset[str] | None = None  # the actions those decisions presented (None: not known)
    recorded: dict[str, int] | None = None
    window: float = 0.0
    covered: float = 0.0

    @classmethod
    def given(cls, channels: dict[str, float]) -> Traffic:
        return cls(channels)


def _last_ts(rec: Recorded) -> float | None:
    """The ``ts`` of the decision with the highest entry id (None: none recorded)."""
    row = rec.sql("SELECT CAST(coalesce(nullif(ts, ''), '0') AS DOUBLE) FROM decisions "
                  "ORDER BY _ms DESC, _seq DESC, _shard LIMIT 1").fetchone()
    return None if row is None else float(row[0])


def traffic_from_stream(client: redis.Redis, population: int, days: float, channels: Sequence[str],
                        until: float | None = None, archive: Path | str | None = None) -> Traffic:
    """The traffic of the ``days`` before ``until`` (default: the last recorded decision) in the recorded
    decisions (the archive at ``archive`` plus the streams' tails; without one, the streams); ``population``:
    the customers that traffic came from (those without a decision count as 0)."""
    # by the decisions' own times: entry ids are Redis's clock, which a simulation's decisions do not keep
    with Recorded(client, archive) as rec:
        rec.view(DECISIONS_STREAM, ("ts", "channel", "customer_id", "actions"))
        last = _last_ts(rec)
        if last is None:
            return Traffic({}, recorded={}, window=days)
        end = until if until is not None else last
        rec.sql("CREATE TEMP TABLE w AS SELECT (_ms, _seq, _shard) AS k, CAST(coalesce(nullif(ts, ''), '0') AS DOUBLE) AS ts, "
                "coalesce(channel, '') AS channel, coalesce(customer_id, '') AS cid, actions FROM decisions; "
                "DELETE FROM w WHERE NOT (? - ? <= ts AND ts <= ?)", [end, days * DAY, end])
        counts = dict(rec.sql("SELECT channel, count(*) FROM w GROUP BY channel").fetchall())
        first = rec.sql("SELECT min(ts) FROM w").fetchone()[0]
        per_customer = rec.sql("SELECT count(*) AS n, min(k) AS seen FROM w GROUP BY cid ORDER BY seen").fetchnumpy()["n"]
        per_day = rec.sql("SELECT max(n) FROM (SELECT count(*) AS n FROM w GROUP BY cid, CAST(floor(ts / ?) AS BIGINT))",
                          [DAY]).fetchone()[0]
        presented = {a for (a,) in rec.sql("SELECT DISTINCT unnest(string_split(coalesce(actions, ''), ',')) FROM w")
                     .fetchall() if a}
    first = min(end, float(first)) if first is not None else end
    rates = np.zeros(max(population, len(per_customer)))
    rates[: len(per_customer)] = np.asarray(per_customer, dtype=float) / days
    return Traffic({ch: counts[ch] / (population * days) for ch in channels if counts.get(ch)}, rates,
                   int(per_day or 0), frozenset(presented),
                   recorded={ch: int(counts.get(ch, 0)) for ch in channels}, window=days, covered=(end - first) / DAY)


def traffic_warnings(traffic: Traffic, channels: Sequence[str]) -> list[str]:
    """What makes the measured traffic on ``channels`` a poor basis for a forecast, each saying how to fix
    it (none when the traffic was given)."""
    if traffic.recorded is None:
        return []
    window = f"{traffic.window:g} day" + ("" if traffic.window == 1 else "s")
    out = []
    for ch in channels:
        n = traffic.recorded.get(ch, 0)
        if n == 0:
            out.append(f"no decisions recorded on {ch} in the last {window}: the plan forecasts no presentations "
                       f"there. {TRAFFIC_FIX}")
        elif n < THIN_TRAFFIC:
            out.append(f"only {n} decision{'s' if n > 1 else ''} recorded on {ch} in the last {window} (fewer than "
                       f"{THIN_TRAFFIC}): its traffic, and the forecast there, are rough. {TRAFFIC_FIX}")
    if any(traffic.recorded.values()) and traffic.covered < traffic.window - 1:
        fix = (f"give --traffic-days {math.floor(traffic.covered)} or --decisions-per-day CHANNEL=N"
               if traffic.covered >= 1 else "give --decisions-per-day CHANNEL=N, or plan once days are recorded")
        out.append(f"the recorded decisions span only {traffic.covered:.1f} of the {window} measured, so the "
                   f"traffic (their count over all {window}) is underestimated: {fix}")
    return out


def rejection_share(client: redis.Redis, days: float, until: float | None = None,
                    archive: Path | str | None = None) -> float:
    """Of the actions presented in the ``days`` before ``until`` (default: the last recorded decision) and
    not accepted, the share with a recorded rejection (0 without recorded decisions); from the archive at
    ``archive`` plus the streams' tails (without one, the streams)."""
    with Recorded(client, archive) as rec:
        rec.view(DECISIONS_STREAM, ("decision_id", "ts", "actions"))
        rec.view(RESPONSES_STREAM, ("decision_id", "action_id", "outcome"))
        last = _last_ts(rec)
        if last is None:
            return 0.0
        end = until if until is not None else last
        presented, accepted, rejected = rec.sql("""
WITH pres AS (
    SELECT DISTINCT did, aid FROM (
        SELECT decision_id AS did, unnest(string_split(actions, ',')) AS aid FROM decisions
        WHERE coalesce(actions, '') <> '' AND ? - ? <= CAST(coalesce(nullif(ts, ''), '0') AS DOUBLE)
          AND CAST(coalesce(nullif(ts, ''), '0') AS DOUBLE) <= ?)),
o AS (
    SELECT coalesce(decision_id, '') AS did, coalesce(action_id, '') AS aid, bool_or(outcome = 'accepted') AS acc,
           bool_or(outcome = 'rejected') AS rej
    FROM responses GROUP BY ALL)
SELECT count(*), count(*) FILTER (WHERE o.acc), count(*) FILTER (WHERE o.rej AND NOT o.acc)
FROM pres p LEFT JOIN o ON o.did = p.did AND o.aid = p.aid""", [end, days * DAY, end]).fetchone()
    return rejected / (presented - accepted) if presented > accepted else 0.0


# --- the forecast ------------------------------------------------------------------------------------

def _shown_top(candidates: list, max_actions: int) -> list:
    """The top ``max_actions`` of ordered candidates, one per group (contact limits aside)."""
    out: list = []
    groups: set[str] = set()
    for c in candidates:
        if len(out) >= max_actions:
            break
        if c[2].action.group not in groups:
            groups.add(c[2].action.group)
            out.append(c)
    return out


def plan_campaign(store: ProfileStore, model: LoadedModel, live: CompiledRules | None, planned: CompiledRules,
                  campaign: Campaign, customers: Sequence[str], traffic: Traffic, max_actions: int = 0,
                  days: int | None = None, at: float | None = None, reject_share: float = 0.0,
                  replays: int = 0, seed: int = 0, progress: Callable[[str], None] | None = None) -> Plan:
    """The forecast of ``campaign`` (in ``planned``, the live rules with it) on ``customers``; the actions
    it displaces are those of ``live``'s top it takes the place of (``live`` None: not looked for).
    ``traffic``: decisions per customer and day (see ``Traffic``); ``reject_share``: the share of presentations
    not accepted that get rejected; ``replays`` per customer (0: as many as fit about 200,000 decisions);
    ``max_actions`` shown per decision (0: the service's default, as a Decide request without one);
    ``progress`` is told each stage and every tenth of the customers."""
    started = time.perf_counter()
    max_actions = max_actions or DEFAULT_MAX_ACTIONS
    tell = progress or (lambda _: None)
    if not customers:
        raise PlanError("no stored customers to plan on (nba seed writes the demo ones)")
    own = _channels(planned, campaign)
    if not any(traffic.channels.get(ch, 0) > 0 for ch in own):
        raise PlanError(f"no traffic on the campaign's channels ({', '.join(own)}) to forecast with. {TRAFFIC_FIX}")
    span = max(1, math.ceil((campaign.end - campaign.start) / DAY))
    days = min(days or span, span)
    at = at if at is not None else campaign.start + 3600.0
    engine = DecisionEngine(store, Live(planned), Live(model), contacts=False, clock=lambda: at)
    contact = planned.ruleset.contact
    control = contact.control if contact is not None else None
    limits = contact.limits if contact is not None else ()
    mine = set(campaign.actions)
    plan = Plan(campaign.name, planned.version, model.version, len(customers), days,
                {ch: traffic.channels.get(ch, 0.0) for ch in own}, max_actions,
                {ch: traffic.recorded.get(ch, 0) for ch in own} if traffic.recorded is not None else None,
                traffic_warnings(traffic, own))
    eligible: dict[str, Counter[str]] = defaultdict(Counter)
    shown_n: dict[str, Counter[str]] = defaultdict(Counter)
    displaced: dict[str, Counter[str]] = defaultdict(Counter)
    everywhere = {ch: r for ch, r in traffic.channels.items() if r > 0}  # other offers' contacts on every channel count
    mean_rate = sum(everywhere.values())
    if replays <= 0:  # replays enough to average out the draws, within about 200,000 replayed decisions
        # (guessing that a fifth of the customers are targeted: the rest are never replayed)
        replays = max(1, min(8, int(200_000 / max(sum(everywhere.values()) * days * len(customers) * 0.2, 1))))
    per_day = np.zeros(days)
    accepted_n = np.zeros(days)
    accepted_value = 0.0
    segment_shown: dict[str, float] = defaultdict(float)
    segment_accepted: dict[str, float] = defaultdict(float)
    schema = planned.schema
    rows = model_input(schema)
    tenth = max(1, math.ceil(len(customers) / 10))
    tell(f"ranking and replaying {len(customers):,} customers over {days} days ({replays} replays each)")
    for index, profile in enumerate(fetch_profiles(store, list(customers), at, schema)):
        if index and index % tenth == 0:
            tell(f"{index:,} of {len(customers):,} customers ({index / len(customers):.0%})")
        derived = derive(profile.numeric, schema, at)
        block = rows.customer_block(profile, derived)
        seg = profile.categorical.get("segment") or "unknown"
        ranked: dict[str, list] = {}
        for channel in own:
            candidates = _ranked(engine, planned, model, profile, derived, block, channel, at)
            if any(c[2].action.id in mine for c in candidates):
                eligible[channel][seg] += 1
            ranked[channel] = candidates
        targeted = [ch for ch in own if any(c[2].action.id in mine for c in ranked[ch])]
        if not targeted or campaign.holds_out(profile.customer_id):
            continue
        for channel in everywhere:
            if channel not in ranked:
                ranked[channel] = _ranked(engine, planned, model, profile, derived, block, channel, at)
        in_control = control is not None and control.contains(profile.customer_id)
        for channel in targeted:
            first = control_order(control, ranked[channel], profile.customer_id, at) if control and in_control \
                else ranked[channel]
            top = _shown_top(first, max_actions)
            if any(c[2].action.id in mine for c in top):
                shown_n[channel][seg] += 1
                if live is not None:
                    for a in _displaced(engine, live, model, profile, derived, block, channel, max_actions, at, top, mine):
                        displaced[a.campaign or NO_CAMPAIGN][a.id] += 1
        rng = np.random.default_rng([seed, index])
        for _ in range(replays):
            rate = float(rng.choice(traffic.customers)) if traffic.customers is not None and len(traffic.customers) \
                else mean_rate
            for s in replay(ranked, everywhere, days, campaign.start, mine, limits, max_actions, reject_share, rng,
                            profile.customer_id, control, rate=rate, per_day=traffic.per_day):
                per_day[s.day] += 1.0 / replays
                segment_shown[seg] += 1.0 / replays
                if s.accepted:
                    accepted_n[s.day] += 1.0 / replays
                    accepted_value += s.value / replays
                    segment_accepted[seg] += 1.0 / replays
    plan.eligible = {ch: dict(sorted(c.items())) for ch, c in sorted(eligible.items())}
    plan.shown = {ch: dict(sorted(c.items())) for ch, c in sorted(shown_n.items())}
    plan.displaced = {k: dict(v.most_common()) for k, v in sorted(displaced.items())}
    tell(f"{len(customers):,} of {len(customers):,} customers (100%); applying the budgets")
    _budgets(plan, campaign, per_day, float(accepted_n.sum()), accepted_value)
    scale = plan.presentations_in_budget / plan.presentations if plan.presentations > 0 else 0.0
    plan.by_segment = {seg: {"presentations": round(segment_shown[seg] * scale, 2),
                             "acceptances": round(segment_accepted[seg] * scale, 2),
                             "acceptance_rate": round(segment_accepted[seg] / segment_shown[seg], 4)}
                       for seg in sorted(segment_shown) if segment_shown[seg] > 0}
    plan.replays = replays
    plan.never_presented = sorted(mine - traffic.presented) if traffic.presented is not None else []
    plan.seconds = round(time.perf_counter() - started, 2)
    return plan


def _ranked(engine: DecisionEngine, rules: CompiledRules, model: LoadedModel, profile: Profile, derived: np.ndarray,
            block: np.ndarray, channel: str, at: float) -> list:
    """The admitted candidates ``(priority, propensity, verdict)`` on ``channel`` in the model's order."""
    outcome = rules.evaluate(rules.build_fact(FactInputs(
        numbers=np.concatenate((profile.numeric, derived)), categories=profile.categorical,
        products=profile.sets.get("products", ()), consents=profile.sets.get("consent", ()), sets=profile.sets,
        channel=channel, touchpoint="", context={}, triggers=profile.triggers)))
    admitted, verdicts = rules.admitted(outcome, channel, now=at)
    return order(verdicts, engine._score(rules, model, model_input(rules.schema).shared_row(block, channel), admitted))


def _channels(rules: CompiledRules, campaign: Campaign) -> list[str]:
    channels = set()
    for action_id in campaign.actions:
        channels |= set(rules.ruleset.by_id[action_id].channels)
    return [ch for ch in rules.schema.channel_names if ch in channels]


def _displaced(engine: DecisionEngine, live: CompiledRules, model: LoadedModel, profile: Profile, derived: np.ndarray,
               block: np.ndarray, channel: str, max_actions: int, at: float, top: list, mine: set[str]) -> list:
    """Actions in the live rules' top ``max_actions`` that the campaign's top pushes out."""
    before = {c[2].action.id for c in _shown_top(_ranked(engine, live, model, profile, derived, block, channel, at),
                                                   max_actions)}
    after = {c[2].action.id for c in top}
    return [live.ruleset.by_id[a] for a in sorted(before - after) if a not in mine]


def _budgets(plan: Plan, campaign: Campaign, per_day: np.ndarray, acceptances: float, value: float) -> None:
    """Expected presentations per day within the daily and total budgets, and the total's run-out day."""
    plan.presentations = float(per_day.sum())
    in_budget, total, run_out = [], 0.0, None
    for d in range(plan.days):
        today = min(per_day[d], campaign.daily_budget) if campaign.daily_budget is not None else per_day[d]
        if campaign.total_budget is not None and total + today >= campaign.total_budget:
            today = campaign.total_budget - total
            run_out = run_out if run_out is not None else d
        total += today
        in_budget.append(float(today))
    plan.per_day = [round(x, 2) for x in in_budget]
    plan.presentations_in_budget = total
    scale = total / plan.presentations if plan.presentations > 0 else 0.0  # budgets cut every customer alike
    plan.acceptances = acceptances * scale
    plan.accepted_value = value * scale
    if run_out is not None:
        plan.run_out_day = time.strftime("%Y-%m-%d", time.gmtime(campaign.start + run_out * DAY))


def format_plan(plan: Plan) -> str:
    lines = [f"plan for campaign {plan.campaign}: {plan.customers} customers, {plan.days} days, top {plan.max_actions} "
             f"per decision; rules {plan.ruleset_version}, model {plan.model_version} ({plan.seconds:.1f}s)",
             "traffic (decisions per customer per day): " + ", ".join(
                 f"{k} {v:.3g}" + (f" ({plan.traffic_recorded.get(k, 0):,} decisions recorded)"
                                   if plan.traffic_recorded is not None else " (given)")
                 for k, v in plan.traffic.items()),
             "", "customers at the campaign's start, per channel: eligible for its actions, and shown one (in the top)",
             f"{'channel':14} {'segment':16} {'eligible':>9} {'shown':>7}"]
    for ch, segs in plan.eligible.items():
        for seg, n in segs.items():
            lines.append(f"{ch:14} {seg:16} {n:>9} {plan.shown.get(ch, {}).get(seg, 0):>7}")
    lines += ["", f"expected presentations over the {plan.days} days: {plan.presentations_in_budget:,.0f} within budgets "
              f"({plan.presentations:,.0f} without them)",
              f"expected acceptances: {plan.acceptances:,.1f}, accepted value {plan.accepted_value:,.0f}",
              "total budget: " + (f"runs out on {plan.run_out_day}" if plan.run_out_day else "lasts the forecast")]
    if plan.by_segment:
        lines += ["", f"{'segment':16} {'presentations':>13} {'acceptances':>11} {'rate':>7}"]
        for seg, r in plan.by_segment.items():
            lines.append(f"{seg:16} {r['presentations']:>13,.1f} {r['acceptances']:>11,.1f} {r['acceptance_rate']:>7.2%}")
    if plan.never_presented:
        lines += ["", f"note: no recorded decision presented {', '.join(plan.never_presented)}, so a model trained on "
                  "them has no responses to it: its propensity is the model's guess. Exploration and retraining will "
                  "move it as responses come in, and the presentations with it (nba simulate --campaign measures how "
                  "far)."]
    if plan.displaced:
        lines += ["", "displaced from the top at the campaign's start (customers, not presentations: one per customer "
                  "and channel whose top loses the action to the campaign):"]
        for owner, actions in plan.displaced.items():
            lines.append(f"  {owner}: " + ", ".join(f"{a} {n}" for a, n in actions.items()))
    return "\n".join(lines)
