"""Data into and within Redis: ``nba import customers`` / ``history`` (bulk loads from CSV or Parquet)
and ``nba profiles`` (the stored profiles' packing layouts, and migrating the older ones)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.commands.common import config_for, domain_schema, open_store
from engine.commands.options import redis_options


def register(sub: argparse._SubParsersAction) -> None:
    imports = sub.add_parser("import", help="bulk-load data into Redis").add_subparsers(dest="import_cmd", required=True)
    p = imports.add_parser("customers", help="load customers from CSV (.csv, .csv.gz) or Parquet (.parquet, .pq) as "
                           "domain.yaml declares them; reports every rejected row (exit 1), loads the others")
    p.add_argument("file", help="columns named like the attributes of domain.yaml, and the id column")
    redis_options(p)
    p.add_argument("--rules-dir", help="rule files whose domain.yaml says what a customer is (default ./rules)")
    p.add_argument("--id-column", default="customer_id", metavar="NAME", help="the customer id column (default customer_id)")
    p.add_argument("--map", action="append", default=[], metavar="COLUMN=ATTRIBUTE",
                   help="feed ATTRIBUTE from COLUMN (repeat for several); other columns match attributes by name")
    p.add_argument("--report", metavar="FILE", help="write every rejection to FILE as CSV (file,row,column,value,reason)")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("--progress", action="store_true", help="a progress bar on stderr even when it is not a terminal")
    p.add_argument("--batch", type=int, default=2_000, help="customers per Redis pipeline (default 2000)")
    p.set_defaults(fn=cmd_import_customers)
    p = imports.add_parser("history", help="past presentations and outcomes (customer_id, action_id, channel, ts, "
                           "outcome; CSV or Parquet) into the contact histories; nba train --from-history learns from them")
    p.add_argument("file")
    redis_options(p)
    p.add_argument("--rules-dir", help="the rule files the actions and channels belong to (default ./rules)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_import_history)

    p = sub.add_parser("profiles", help="stored profiles: their packing layouts, and migrating the older ones")
    p.add_argument("profiles_cmd", choices=("layouts", "migrate"))
    redis_options(p)
    p.add_argument("--rules-dir", help="the rule files whose domain.yaml is current (default ./rules)")
    p.set_defaults(fn=cmd_profiles)


def cmd_import_customers(args: argparse.Namespace) -> int:
    """``nba import customers FILE``: exit 0 when every row loaded, 1 when rows were rejected (the good
    ones loaded), 2 when the input cannot be used at all (nothing written)."""
    import getpass

    from engine.rules.errors import RuleErrors
    from engine.store.audit import audit
    from engine.store.bulk import ImportRefused, import_customers

    cfg = config_for(args)
    mapping = _column_map(args.map)
    if mapping is None:
        return 2
    path = Path(args.file)
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    try:
        schema = domain_schema(cfg)
    except RuleErrors as exc:
        for e in exc.errors:
            print(e.render(), file=sys.stderr)
        print(f"{len(exc.errors)} error(s) in {cfg.rules_dir}/domain.yaml: nothing imported", file=sys.stderr)
        return 2
    progress = sys.stderr if args.progress or sys.stderr.isatty() else None
    try:
        with open_store(cfg) as store:
            report = import_customers(store, path, schema, id_column=args.id_column, mapping=mapping,
                                      batch=args.batch, progress=progress)
            audit(store.client, getpass.getuser(), "customers_imported", file=str(path.resolve()),
                  loaded=report.loaded, rejected_rows=report.rejected_rows)
    except ImportRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        report.write_rejections(args.report)
        print(f"wrote {len(report.rejected):,} rejections to {args.report}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.render())
    return 1 if report.rejected else 0


def _column_map(pairs: list[str]) -> dict[str, str] | None:
    """--map COLUMN=ATTRIBUTE, each: column -> attribute; None after printing the pair that is not one."""
    mapping: dict[str, str] = {}
    for pair in pairs:
        column, equals, attribute = pair.partition("=")
        if not equals or not column or not attribute.strip():
            print(f"error: --map {pair!r}: write COLUMN=ATTRIBUTE", file=sys.stderr)
            return None
        if column in mapping:
            print(f"error: --map names column {column!r} twice", file=sys.stderr)
            return None
        mapping[column] = attribute.strip()
    return mapping


def cmd_import_history(args: argparse.Namespace) -> int:
    """``nba import history FILE``: past presentations into the contact histories; exit 1 when rows were
    rejected (the others imported), 2 when the file cannot be used."""
    import getpass

    from engine.analytics.past import HistoryRefused, fill_contacts, read_past
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules
    from engine.store.audit import audit

    cfg = config_for(args)
    ruleset, errors = load_rules(cfg.rules_dir)
    if ruleset is None:
        raise RuleErrors(errors)
    now = time.time()
    try:
        report = read_past(args.file, ruleset, now)
    except HistoryRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open_store(cfg) as store:
        report.contacts = fill_contacts(store.client, ruleset, report.offers, now)
        audit(store.client, getpass.getuser(), "history_imported", file=str(Path(args.file).resolve()),
              offers=len(report.offers), contacts=report.contacts)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 1 if report.rejected else 0


def cmd_profiles(args: argparse.Namespace) -> int:
    """``nba profiles layouts`` / ``migrate``: stored profiles per packing layout; the older ones rewritten."""
    from engine.store.updates import census, migrate_all

    cfg = config_for(args)
    schema = domain_schema(cfg)
    with open_store(cfg) as store:
        if args.profiles_cmd == "layouts":
            known = store.read_layouts()
            counts = census(store, schema)
            print(f"{'layout':14} {'profiles':>10}  state")
            for layout, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                state = ("current" if layout == schema.layout() else
                         "no layout recorded: read as the current one" if not layout else
                         "older: read by name, `nba profiles migrate` rewrites it" if layout in known else
                         "unknown: not in nba:layouts, decided as cold starts")
                print(f"{layout or '-':14} {n:>10,}  {state}")
            return 0
        migrated, unreadable = migrate_all(store, schema, progress=lambda seen, done: print(
            f"  {seen:,} profiles looked at, {done:,} migrated", file=sys.stderr))
    print(f"{migrated:,} profiles rewritten in layout {schema.layout()}"
          + (f"; {len(unreadable):,} in a layout nba:layouts does not hold, left as they are (e.g. {unreadable[0]})"
             if unreadable else ""))
    return 1 if unreadable else 0
