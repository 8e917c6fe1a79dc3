"""``nba campaign report NAME``: what a campaign did, from the decision and response streams.

- **Presented, accepted, value, acceptance rate** of the campaign's actions, in all and per channel,
  segment and action: a presentation is an action of the campaign in a recorded decision (the stream's
  ``campaigns`` field names each action's campaign); it is accepted when an ``accepted`` response to that
  decision and action was recorded (once, however often it was sent). On ``on_impression`` channels
  (web, app) that is the action returned: the budget counters count the reported impressions, so there
  the spend can be lower than the presentations here.
- **Lift against the campaign's control group**, customers as the unit, intent to treat: a customer is
  in the campaign's treated arm when some decision found an action of the running campaign admitted for
  them (``campaign_eligible``), in its control arm when it held them out (``campaign_control``), whether
  or not anything was shown. The outcome per customer is the campaign's objective over all that
  customer's decisions from the first one in play until the campaign's end: accepted value
  (``value``), accepted actions (``acceptances``) or accepted retention actions (``retention_saves``).
  Lift = mean outcome per treated customer / mean per control customer - 1, with the customer-clustered
  95% CI of ``analytics/report.py`` (one unit per customer).
- **Spend and pacing**: presentations per day (in the campaign's time zone) and the cumulative spend
  against the even-spend line of the total budget.
- **Against the plan** (``nba campaign plan --save`` stores it): per segment, the acceptance rate and
  the presentations per day against the plan's, each judged on its own: the rate (``verdict``) is under
  or over its plan when it differs by more than 1.96 binomial standard errors, the volume
  (``volume_verdict``) when the presentations differ from the planned ones over the same days by more
  than 1.96 Poisson standard errors; ``in_words`` says which.

The text and the HTML page say in words what a marketer needs: whether the lift is significant yet (and
roughly how many more customers it would take), and what share of an even spend has been spent by now.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import redis

from engine.analytics.recorded import Recorded
from engine.analytics.report import Tally, lift_from_totals
from engine.rules.campaigns import Campaign
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM, profile_key

Z95 = 1.959964
Z80 = 0.841621  # one-sided, for 80% power


def plan_key(name: str) -> str:
    """Where ``nba campaign plan --save`` keeps the campaign's latest plan (JSON)."""
    return f"nba:campaign:{name}:plan"


def _objective_sql(objective: str) -> str:
    """The campaign's objective of one accepted response (columns ``value`` and ``kind``) in SQL."""
    if objective == "value":
        return "a.value"
    if objective == "retention_saves":
        return "CASE WHEN a.kind = 'retention' THEN 1.0 ELSE 0.0 END"
    return "1.0"


def _segments(client: redis.Redis, customers: list[str]) -> dict[str, str]:
    pipe = client.pipeline(transaction=False)
    for cid in customers:
        pipe.hget(profile_key(cid), "segment")
    return {cid: (s.decode() if isinstance(s, bytes) else s) or "unknown" for cid, s in zip(customers, pipe.execute())}


# $name: the campaign's name (a quoted literal). A decision puts its customer in play (``campaign_eligible``:
# treated, ``campaign_control``: control; the first such decision decides the arm, eligible before control
# within one); ``shown``: the actions its ``campaigns`` field tags with the campaign; ``acc``: the first
# accepted response per (decision, action); ``latest``: the last record of each decision an acceptance names.
_CAMPAIGN_SQL = """
CREATE TEMP TABLE d AS
SELECT (_ms, _seq, _shard) AS k, coalesce(decision_id, '') AS did, coalesce(customer_id, '') AS cid,
       CAST(coalesce(nullif(ts, ''), '0') AS DOUBLE) AS ts, coalesce(channel, '') AS channel,
       list_contains(string_split(coalesce(campaign_eligible, ''), ','), $name) AS eligible,
       list_contains(string_split(coalesce(campaign_control, ''), ','), $name) AS held_out,
       string_split(coalesce(campaigns, ''), ',') AS tags, actions, "values"
FROM decisions;
CREATE TEMP TABLE inplay AS
SELECT cid, arg_min(CASE WHEN eligible THEN 'treated' ELSE 'control' END, k) AS side, min(ts) AS first
FROM d WHERE eligible OR held_out GROUP BY cid;
CREATE TEMP TABLE acc AS
SELECT coalesce(decision_id, '') AS did, coalesce(action_id, '') AS aid,
       arg_min(CAST(coalesce(nullif(value, ''), '0') AS DOUBLE), (_ms, _seq, _shard)) AS value,
       arg_min(coalesce(action_type, ''), (_ms, _seq, _shard)) AS kind
FROM responses WHERE outcome = 'accepted' GROUP BY ALL;
CREATE TEMP TABLE shown AS
WITH tagged AS (
    SELECT did, cid, channel, ts, tags, string_split(coalesce(actions, ''), ',') AS acts,
           string_split(coalesce("values", ''), ',') AS vals, unnest(range(1, len(tags) + 1)) AS i
    FROM d WHERE list_contains(tags, $name))
SELECT t.did, t.cid, t.channel, t.ts, t.acts[t.i] AS action,
       CASE WHEN t.i <= len(t.vals) AND t.vals[t.i] <> '' THEN CAST(t.vals[t.i] AS DOUBLE) ELSE 0.0 END AS value,
       a.did IS NOT NULL AS hit
FROM tagged t LEFT JOIN acc a ON a.did = t.did AND a.aid = t.acts[t.i]
WHERE t.tags[t.i] = $name AND t.i <= len(t.acts);
CREATE TEMP TABLE latest AS
SELECT did, arg_max(cid, k) AS cid, arg_max(ts, k) AS ts FROM d WHERE did IN (SELECT did FROM acc) GROUP BY did;
"""
_TALLY = "count(*), count(*) FILTER (WHERE hit), coalesce(sum(value) FILTER (WHERE hit), 0.0)"


def _tally(row: tuple) -> Tally:
    return Tally(int(row[0]), int(row[1]), float(row[2]))


def build_campaign_report(client: redis.Redis, campaign: Campaign, plan: dict | None = None, since: str = "-",
                          now: float | None = None, archive: Path | str | None = None, until: str = "+") -> dict:
    """The report of ``campaign`` from the decisions and responses recorded from ``since`` to ``until``
    (stream ids or UTC days); ``plan``: its saved plan; ``archive``: read the archive at that root plus the
    streams' unarchived tails. Aggregated in DuckDB."""
    name = campaign.name
    tz = ZoneInfo(campaign.time_zone)
    with Recorded(client, archive, since, until) as rec:
        rec.view(DECISIONS_STREAM, ("decision_id", "customer_id", "ts", "channel", "campaign_eligible",
                                    "campaign_control", "campaigns", "actions", "values"))
        rec.view(RESPONSES_STREAM, ("decision_id", "action_id", "outcome", "value", "action_type"))
        rec.sql(_CAMPAIGN_SQL.replace("$name", "'" + name.replace("'", "''") + "'"))
        total = _tally(rec.sql(f"SELECT {_TALLY} FROM shown").fetchone())
        by_channel = {k: _tally(r) for k, *r in rec.sql(f"SELECT channel, {_TALLY} FROM shown GROUP BY channel").fetchall()}
        by_action = {k: _tally(r) for k, *r in rec.sql(f"SELECT action, {_TALLY} FROM shown GROUP BY action").fetchall()}
        by_customer = {k: _tally(r) for k, *r in rec.sql(f"SELECT cid, {_TALLY} FROM shown GROUP BY cid").fetchall()}
        # presentations per minute: a minute never straddles a local midnight (offsets are whole minutes)
        per_minute = rec.sql("SELECT CAST(floor(ts / 60) AS BIGINT) AS m, count(*) FROM shown GROUP BY m").fetchall()
        last_shown = rec.sql("SELECT max(ts) FROM shown").fetchone()[0]
        arm = dict(rec.sql("SELECT cid, side FROM inplay").fetchall())
        outcome = dict(rec.sql(
            f"SELECT l.cid, sum({_objective_sql(campaign.objective)}) FROM acc a JOIN latest l ON l.did = a.did "
            f"JOIN inplay p ON p.cid = l.cid WHERE p.first <= l.ts AND l.ts < ? GROUP BY l.cid",
            [float(campaign.end)]).fetchall())
    customers = sorted(set(by_customer) | set(arm))
    segment = _segments(client, customers)
    by_segment: dict[str, Tally] = defaultdict(Tally)
    for cid, t in by_customer.items():
        seg = by_segment[segment.get(cid, "unknown")]
        seg.presented, seg.accepted, seg.value = seg.presented + t.presented, seg.accepted + t.accepted, seg.value + t.value
    per_day: dict[str, int] = defaultdict(int)
    for minute, n in per_minute:
        per_day[datetime.fromtimestamp(minute * 60, tz).strftime("%Y-%m-%d")] += int(n)
    arms = {side: sorted(c for c, a in arm.items() if a == side) for side in ("treated", "control")}
    totals = {side: (np.array([float(outcome.get(c, 0.0)) for c in ids], dtype=float), np.ones(len(ids)))
              for side, ids in arms.items()}
    lift = lift_from_totals(totals["treated"], totals["control"])
    lift["customers"] = {"treated": len(arms["treated"]), "control": len(arms["control"])}
    lift["outcome_per_customer"] = {side: round(float(v.mean()), 4) if len(v) else None for side, (v, _) in totals.items()}
    lift["objective"] = campaign.objective
    lift |= significance(lift)
    days = _every_day(sorted(per_day))  # days without a presentation too: the chart's axis is the calendar
    spend, running = [], 0
    for day in days:
        running += per_day.get(day, 0)
        end_of_day = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=tz).timestamp() + 86_400
        even = campaign.even_spend(end_of_day)
        spend.append({"day": day, "presented": per_day.get(day, 0), "cumulative": running,
                      "even_spend": round(even, 1) if even is not None else None})
    now = now if now is not None else (float(last_shown) if last_shown is not None else campaign.start)
    even_now = campaign.even_spend(now)
    report: dict = {
        "campaign": name, "objective": campaign.objective, "owner": campaign.owner, "dates": campaign.describe_dates(),
        "total_budget": campaign.total_budget, "daily_budget": campaign.daily_budget,
        "control_share": campaign.control_share,
        "totals": total.row() | {"customers": len(by_customer)},
        "by_channel": {k: v.row() for k, v in sorted(by_channel.items())},
        "by_segment": {k: v.row() for k, v in sorted(by_segment.items())},
        "by_action": {k: v.row() for k, v in sorted(by_action.items())},
        "lift": lift,
        "spend": spend,
        "pacing": {"as_of": now, "spent": total.presented, "even_spend": round(even_now, 1) if even_now is not None else None,
                   "ratio": round(total.presented / even_now, 3) if even_now else None},
        "versus_plan": versus_plan(by_segment, plan, days) if plan else None,
    }
    report["pacing"]["in_words"] = pacing_words(report)
    return report


def significance(lift: dict) -> dict:
    """Whether the lift's 95% CI excludes 0, in words, with a rough count of the customers that would show
    the lift at this size (80% power, the arms in their present proportion; None when significant or not
    estimable). The count is the sample at which a true lift of the size seen so far would come out
    significant four times in five; a smaller true lift needs more."""
    if lift.get("lift") is None or not lift.get("ci95"):
        return {"significant": None, "more_customers_needed": None,
                "in_words": f"no lift yet: {lift.get('note', 'not enough data')}"}
    lo, hi = lift["ci95"]
    if lo > 0 or hi < 0:
        side = "above" if lo > 0 else "below"
        return {"significant": True, "more_customers_needed": None,
                "in_words": f"significant: the whole 95% interval lies {side} 0 (the campaign does "
                            f"{'better' if lo > 0 else 'worse'} than its control group)"}
    words = ("not significant yet: the 95% interval includes 0, so the difference from the control group may "
             "be chance")
    needed = None
    log_ratio = math.log1p(lift["lift"])
    if log_ratio != 0 and lo > -1:
        se = (math.log1p(hi) - math.log1p(lo)) / (2 * Z95)  # the interval is symmetric on the log scale
        scale = ((Z95 + Z80) * se / abs(log_ratio)) ** 2  # the CI's width shrinks with the root of the sample
        c = lift.get("customers", {})
        needed = {arm: max(0, math.ceil(c.get(arm, 0) * (scale - 1))) for arm in ("treated", "control")}
        words += (f"; if the true lift were {lift['lift']:+.1%}, about {needed['treated']:,} more treated and "
                  f"{needed['control']:,} more control customers would show it (a rough estimate: a smaller "
                  "true lift needs more)")
    return {"significant": False, "more_customers_needed": needed, "in_words": words}


def pacing_words(report: dict) -> str:
    """The budget's spend against an even spend of it over the campaign's dates, in words."""
    p, total = report["pacing"], report["total_budget"]
    if total is None:
        return f"no total budget ({p['spent']:,} presentations so far)"
    spent = f"{p['spent']:,} of the {total:,} presentations of the total budget spent"
    when = datetime.fromtimestamp(p["as_of"], ZoneInfo("UTC")).strftime("%Y-%m-%d %H:%M UTC")
    if not p.get("even_spend"):
        return f"{spent}; the campaign had not started by {when}"
    share = p["spent"] / p["even_spend"]
    pace = "behind" if share < 0.9 else "ahead of" if share > 1.1 else "about on"
    percent = f"{share:.0%}" if share >= 0.095 else f"{share:.1%}"  # 0.4%, not 0%
    return (f"{spent}: {percent} of what an even spend over the campaign's dates would have spent by {when} "
            f"({p['even_spend']:,.0f}), {pace} pace")


def _every_day(days: list[str]) -> list[str]:
    """Every calendar day from the first of ``days`` to the last (YYYY-MM-DD)."""
    if not days:
        return []
    first, last = (date.fromisoformat(d) for d in (days[0], days[-1]))
    return [(first + timedelta(days=k)).isoformat() for k in range((last - first).days + 1)]


def versus_plan(by_segment: dict[str, Tally], plan: dict, days: list[str]) -> list[dict]:
    """Per segment of the plan: actual against planned acceptance rate and presentations per day, and
    whether each is under or over its plan: the rate (``verdict``) outside 1.96 binomial SEs, the volume
    (``volume_verdict``) outside 1.96 Poisson SEs of the planned presentations over the same days."""
    out = []
    planned = plan.get("by_segment", {})
    plan_days = max(float(plan.get("days") or 1), 1.0)
    live_days = max(len(days), 1)
    for seg in sorted(set(planned) | set(by_segment)):
        p = planned.get(seg, {})
        t = by_segment.get(seg, Tally())
        rate_plan = p.get("acceptance_rate")
        rate = t.accepted / t.presented if t.presented else None
        verdict = "as planned"
        if rate is not None and rate_plan is not None and t.presented:
            se = math.sqrt(max(rate_plan * (1 - rate_plan), 1e-9) / t.presented)
            if rate < rate_plan - Z95 * se:
                verdict = "under"
            elif rate > rate_plan + Z95 * se:
                verdict = "over"
        elif t.presented == 0 and p.get("presentations", 0) > 0:
            verdict = "not reached"
        expected = p.get("presentations", 0.0) / plan_days * live_days
        volume = "as planned"
        if t.presented < expected - Z95 * math.sqrt(expected):
            volume = "under"
        elif t.presented > expected + Z95 * math.sqrt(expected):
            volume = "over"
        row = {"segment": seg, "presented": t.presented,
               "presented_per_day": round(t.presented / live_days, 2),
               "planned_per_day": round(p.get("presentations", 0.0) / plan_days, 2),
               "acceptance_rate": round(rate, 4) if rate is not None else None,
               "planned_acceptance_rate": round(rate_plan, 4) if rate_plan is not None else None,
               "verdict": verdict, "volume_verdict": volume}
        out.append(row | {"in_words": _plan_words(row)})
    return out


_SIDE = {"under": "below plan", "over": "above plan", "as planned": "as planned"}


def _plan_words(row: dict) -> str:
    if row["verdict"] == "not reached":
        rate = "not reached yet (no presentations)"
    elif row["acceptance_rate"] is None or row["planned_acceptance_rate"] is None:
        rate = "acceptance rate: nothing to compare"
    else:
        rate = (f"acceptance rate {_SIDE[row['verdict']]} ({row['acceptance_rate']:.1%} vs "
                f"{row['planned_acceptance_rate']:.1%} planned)")
    volume = (f"volume {_SIDE[row['volume_verdict']]} ({row['presented_per_day']:g} vs "
              f"{row['planned_per_day']:g} presentations/day planned)")
    return f"{rate}; {volume}"


def format_campaign_report(report: dict) -> str:
    t = report["totals"]
    lines = [f"campaign {report['campaign']} ({report['objective']}, owner {report['owner']}): {report['dates']}",
             f"{t['presented']} presented to {t['customers']} customers, {t['accepted']} accepted "
             f"({t['acceptance_rate']:.1%}), value {t['value']:,.2f}"]
    header = f"{'':28} {'presented':>10} {'accepted':>9} {'rate':>7} {'value':>12}"
    for title, key in (("channel", "by_channel"), ("segment", "by_segment"), ("action", "by_action")):
        lines += ["", f"{'by ' + title:28} {header[29:]}"]
        for name, r in report[key].items():
            lines.append(f"{name:28} {r['presented']:>10} {r['accepted']:>9} {r['acceptance_rate']:>7.2%} {r['value']:>12,.2f}")
    lift = report["lift"]
    c = lift["customers"]
    lines.append("")
    if lift.get("lift") is None:
        lines.append(f"lift: {lift.get('note', 'n/a')} ({c['treated']} treated, {c['control']} control customers)")
    else:
        lo, hi = lift["ci95"]
        per = lift["outcome_per_customer"]
        lines.append(f"lift on {lift['objective']} per customer: {lift['lift']:+.1%} (95% CI {lo:+.1%} .. {hi:+.1%}); "
                     f"treated {per['treated']} ({c['treated']} customers) vs control {per['control']} "
                     f"({c['control']} customers)")
        lines.append(f"  {lift.get('in_words') or significance(lift)['in_words']}")
    lines.append(f"budget: {report['pacing'].get('in_words') or pacing_words(report)}")
    if report["versus_plan"]:
        lines += ["", f"{'segment vs plan':20} {'presented/day':>13} {'planned/day':>11} {'rate':>7} {'planned':>8}  "
                  "against the plan"]
        for r in report["versus_plan"]:
            rate = f"{r['acceptance_rate']:.1%}" if r["acceptance_rate"] is not None else "-"
            planned = f"{r['planned_acceptance_rate']:.1%}" if r["planned_acceptance_rate"] is not None else "-"
            lines.append(f"{r['segment']:20} {r['presented_per_day']:>13} {r['planned_per_day']:>11} {rate:>7} "
                         f"{planned:>8}  {r.get('in_words') or _plan_words(r)}")
    return "\n".join(lines)
