"""``nba report`` (outcomes and lift over the control group) and the archive it reads: ``nba archive``
copies the decision, response and event streams into Parquet files and compacts them."""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine.commands.common import archive_for, config_for, open_store
from engine.commands.options import archive_option, paths, range_options, redis_options
from engine.config import Config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="outcomes per action and type, and lift over the control group, from the streams")
    paths(p)
    range_options(p, "decision")
    p.add_argument("--customer-prefix", default="", help="only customers whose id starts with this")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="also a customer-bootstrap 95%% CI of the lift from N resamples (0: off)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true")
    archive_option(p)
    p.set_defaults(fn=cmd_report)
    _archive_parsers(sub)


def _archive_parsers(sub: argparse._SubParsersAction) -> None:
    archive = sub.add_parser("archive", help="copy the decision, response and event streams into Parquet files "
                             "(the archive reports read)").add_subparsers(dest="archive_cmd", required=True)
    for name, text in (("run", "archive continuously until stopped (SIGINT/SIGTERM: flush, then stop)"),
                       ("once", "archive every entry up to the streams' heads, then exit (prints a JSON line)")):
        p = archive.add_parser(name, help=text)
        redis_options(p)
        p.add_argument("--dir", metavar="DIR|URL", help="the archive's root, a directory or an fsspec URL "
                       "(s3://, gs://: install s3fs or gcsfs; default NBA_ARCHIVE, else <data dir>/archive); give the "
                       "service the same as NBA_ARCHIVE or nba serve --archive-dir, so that erasure reaches it")
        p.add_argument("--file-entries", type=int, default=20_000, help="entries per file at most (and the "
                       "entries per stream shard held in memory)")
        p.add_argument("--flush-seconds", type=float, default=60.0,
                       help="run: write what waits after this long even when a file is not full")
        p.add_argument("--poll", type=float, default=1.0, help="run: seconds between reads of the streams")
        p.add_argument("--metrics-host", default="127.0.0.1")
        p.add_argument("--metrics-port", type=int, default=0, help="run: serve /metrics (archive lag) here (0: off)")
        p.add_argument("--no-trim", action="store_true", help="leave the streams as they are (default: trim each "
                       "shard to what is archived, XTRIM MINID; STREAM_MAXLEN stays the memory cap)")
        p.add_argument("--keep-seconds", type=float, default=0.0,
                       help="when trimming, keep this many seconds of the newest entries in the streams")
        p.set_defaults(fn=cmd_archive)
    p = archive.add_parser("compact", help="merge each closed day's files of a stream shard into one file")
    redis_options(p)
    p.add_argument("--dir", metavar="DIR|URL", help="the archive's root (default NBA_ARCHIVE, else <data dir>/archive)")
    p.add_argument("--before", metavar="YYYY-MM-DD", help="compact the days before this one (default: today, UTC)")
    p.set_defaults(fn=cmd_archive)
    p = archive.add_parser("prune", help="remove the days before a date (retention); each stream shard's newest "
                           "file stays, emptied, as the writer's checkpoint")
    redis_options(p)
    p.add_argument("--dir", metavar="DIR|URL", help="the archive's root (default NBA_ARCHIVE, else <data dir>/archive)")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--before", metavar="YYYY-MM-DD", help="remove the days before this one")
    when.add_argument("--keep-days", type=int, metavar="N", help="remove the days before today (UTC) less N days")
    p.set_defaults(fn=cmd_archive)


def cmd_report(args: argparse.Namespace) -> int:
    from engine.analytics.report import build_report, format_report
    from engine.rules.loader import load_rules

    cfg = config_for(args)
    ruleset, _errors = load_rules(cfg.rules_dir)
    values = {a.id: a.value for a in ruleset.actions} if ruleset else {}
    types = {a.id: a.type for a in ruleset.actions} if ruleset else {}
    with open_store(cfg) as store:
        report = build_report(store.client, since=args.since, customer_prefix=args.customer_prefix,
                              values=values, types=types, bootstrap=args.bootstrap, seed=args.seed,
                              archive=archive_for(args, cfg), until=args.until)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_archive_compact(args: argparse.Namespace, cfg: Config) -> int:
    """``nba archive compact``: one file per closed day and stream shard (prints a JSON line)."""
    from engine.store.archive_compact import compact, parse_day

    root = args.dir or cfg.archive_root()
    before = parse_day(args.before) if args.before else time.strftime("%Y-%m-%d", time.gmtime())
    with open_store(cfg) as store:
        done = compact(store.client, root, before)
    print(json.dumps({"archive": str(root), "before": before, "files_before": done.files_before,
                      "files_after": done.files_after, "merged": done.merged}))
    return 0


def cmd_archive_prune(args: argparse.Namespace, cfg: Config) -> int:
    """``nba archive prune``: retention (prints a JSON line)."""
    from engine.store.archive_compact import parse_day, prune

    root = args.dir or cfg.archive_root()
    if args.keep_days is not None and args.keep_days < 1:
        raise SystemExit("nba archive prune: --keep-days must be at least 1")
    before = parse_day(args.before) if args.before else time.strftime(
        "%Y-%m-%d", time.gmtime(time.time() - args.keep_days * 86_400))
    with open_store(cfg) as store:
        done = prune(store.client, root, before)
    print(json.dumps({"archive": str(root), "before": before, "days_removed": done.days,
                      "files_removed": done.files, "checkpoints_kept": done.checkpoints_kept}))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    import threading

    from engine.store.archive import ArchiveWriter

    cfg = config_for(args)
    if args.archive_cmd == "compact":
        return cmd_archive_compact(args, cfg)
    if args.archive_cmd == "prune":
        return cmd_archive_prune(args, cfg)
    root = args.dir or cfg.archive_root()
    with open_store(cfg) as store, ArchiveWriter(store.client, root, file_entries=args.file_entries,
                                                 flush_seconds=args.flush_seconds, trim=not args.no_trim,
                                                 keep_seconds=args.keep_seconds) as writer:
        if args.archive_cmd == "once":
            written = writer.once()
            lag = writer.lag()
            print(json.dumps({"archive": str(root), "archived": written,
                              "lag": {name: {"entries": e, "seconds": s} for name, (e, s) in lag.items()}}))
            return 0
        if args.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, addr=args.metrics_host)
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            from engine.serving.serve import stop_on_signals

            stop_on_signals(stop)
        print(f"archiving into {root}; Ctrl-C stops", file=sys.stderr, flush=True)
        writer.run(stop, poll=args.poll)
    return 0
