"""``nba campaign plan`` (a campaign file forecast on the stored customers before launch) and ``nba
campaign report`` (its results from the recorded decisions, text, JSON or HTML)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.commands.common import archive_for, config_for, live_model, open_store, rule_errors
from engine.commands.options import archive_option, paths, range_options
from engine.config import Config

if TYPE_CHECKING:
    from engine.analytics.campaign_plan import Traffic


def register(sub: argparse._SubParsersAction) -> None:
    campaign = sub.add_parser("campaign", help="campaigns (rules/campaigns/*.yaml): plan before launch, report after"
                              ).add_subparsers(dest="campaign_cmd", required=True)
    p = campaign.add_parser("plan", help="forecast a campaign file on the stored customers: eligible, shown, expected "
                            "presentations and value, budget run-out day, displaced actions")
    paths(p)
    p.add_argument("file", help="the campaign file (it need not be in the rules folder yet)")
    p.add_argument("--customers", type=int, default=0, help="plan on the first N stored customers (0: all)")
    p.add_argument("--days", type=int, default=0, help="forecast the first N days of the campaign (0: all of it)")
    p.add_argument("--max-actions", type=int, default=0,
                   help="actions shown per decision (0: the service's default, as for a Decide without max_actions)")
    p.add_argument("--traffic-days", type=float, default=7.0,
                   help="traffic: decisions per customer and day measured over the last N recorded days")
    p.add_argument("--decisions-per-day", nargs="+", metavar="CHANNEL=N",
                   help="traffic given instead: decisions per day on a channel (all customers)")
    p.add_argument("--save", action="store_true", help="keep the plan for nba campaign report (under/over plan)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (warnings still)")
    archive_option(p)
    p.set_defaults(fn=cmd_campaign_plan)
    p = campaign.add_parser("report", help="a campaign's results from the streams: per channel and segment, lift "
                            "over its control group, spend and pacing, segments against the plan")
    paths(p)
    p.add_argument("name")
    range_options(p, "decision")
    p.add_argument("--html", metavar="FILE", help="also write one self-contained HTML page (tables, PNG charts)")
    p.add_argument("--json", action="store_true")
    archive_option(p)
    p.set_defaults(fn=cmd_campaign_report)


def cmd_campaign_plan(args: argparse.Namespace) -> int:
    from engine.analytics.campaign_plan import (
        PlanError,
        format_plan,
        plan_campaign,
        rejection_share,
        stored_customers,
        what_if_rules,
    )
    from engine.analytics.campaign_report import plan_key
    from engine.rules.errors import RuleErrors

    def tell(stage: str) -> None:
        if not args.quiet:
            print(f"plan: {stage}", file=sys.stderr, flush=True)

    cfg = config_for(args)
    tell("loading the model and the rules with the campaign")
    model = live_model(cfg)
    if model is None:
        return 1
    try:
        live, planned, campaign = what_if_rules(cfg.rules_dir, Path(args.file))
    except RuleErrors as exc:
        return rule_errors(exc.errors, ": no plan")
    try:
        with open_store(cfg) as store:
            everyone = stored_customers(store.client)
            customers = everyone[: args.customers] if args.customers else everyone
            traffic = _traffic(args, cfg, store.client, planned.schema.channel_names, len(everyone), tell)
            reject = rejection_share(store.client, args.traffic_days, archive=archive_for(args, cfg))
            plan = plan_campaign(store, model, live, planned, campaign, customers, traffic, args.max_actions, args.days,
                                 reject_share=reject, progress=tell)
            for warning in plan.warnings:  # not silenced by --quiet: the forecast may be off
                print(f"warning: {warning}", file=sys.stderr)
            if args.save:
                store.client.set(plan_key(campaign.name), json.dumps(plan.as_dict()))
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        live.close()
        planned.close()
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _traffic(args: argparse.Namespace, cfg: Config, client: Any, channels: Sequence[str], population: int,
             tell: Callable[[str], None]) -> Traffic:
    """Decisions per customer, channel and day: as --decisions-per-day gives them, else measured on the
    recorded decisions of the last --traffic-days (raises ``PlanError`` for a malformed CHANNEL=N)."""
    from engine.analytics.campaign_plan import PlanError, Traffic, traffic_from_stream

    if args.decisions_per_day:
        given = {}
        for item in args.decisions_per_day:
            channel, _, n = item.partition("=")
            if channel not in channels or not n:
                raise PlanError(f"--decisions-per-day {item}: expected CHANNEL=N with a channel of "
                                + ", ".join(channels))
            given[channel] = float(n) / max(population, 1)
        return Traffic.given(given)
    tell(f"measuring traffic on the decision stream's last {args.traffic_days:g} days")
    return traffic_from_stream(client, max(population, 1), args.traffic_days, channels, archive=archive_for(args, cfg))


def cmd_campaign_report(args: argparse.Namespace) -> int:
    from engine.analytics.campaign_report import build_campaign_report, format_campaign_report, plan_key
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules

    cfg = config_for(args)
    ruleset, errors = load_rules(cfg.rules_dir)
    if ruleset is None:
        raise RuleErrors(errors)
    campaign = ruleset.campaigns.get(args.name)
    if campaign is None:
        print(f"error: no campaign {args.name!r} in {cfg.rules_dir}/campaigns (campaigns: "
              f"{', '.join(ruleset.campaigns) or 'none'})", file=sys.stderr)
        return 1
    with open_store(cfg) as store:
        saved = store.client.get(plan_key(campaign.name))
        report = build_campaign_report(store.client, campaign, json.loads(saved) if saved else None, since=args.since,
                                       archive=archive_for(args, cfg), until=args.until)
    if args.html:
        from engine.analytics.campaign_html import render_html

        try:
            page = render_html(report)
        except ImportError:
            print("error: --html draws its charts with matplotlib: pip install 'nba-engine[report]'", file=sys.stderr)
            return 1
        Path(args.html).write_text(page, encoding="utf-8")
        print(f"report: {args.html}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else format_campaign_report(report))
    return 0
