"""The ``nba`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

from engine.config import Config

if TYPE_CHECKING:
    from collections.abc import Sequence

    from engine.features import FeatureSchema
    from engine.models.registry import LoadedModel
    from engine.models.training import TrainingSet
    from engine.rules.errors import RuleError
    from engine.store.profiles import ProfileStore


def _config(args: argparse.Namespace) -> Config:
    cfg = Config()
    for name in ("redis_url", "redis_ca", "redis_cert", "redis_key", "data_dir", "rules_dir", "models_dir"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, Path(value) if name.endswith("_dir") else value)
    return cfg


def _channel(args: argparse.Namespace):
    """A channel to a running server with the command's --address, TLS and token options."""
    from engine.serving.client import open_channel, read_token_file
    from engine.serving.security import is_loopback, read_local_admin_token

    token: str | None = read_token_file(args.token_file) if args.token_file else os.environ.get("NBA_TOKEN", "").strip()
    if not token and is_loopback(args.address):
        # a local nba serve without an auth file wants its admin token for AdminService (security.py)
        token = read_local_admin_token(getattr(args, "data_dir", None) or Config().data_dir)
    return open_channel(args.address, args.tls_ca, args.tls_cert, args.tls_key, token or "")


def _rpc(args: argparse.Namespace, service: str, method: str, request):
    """One call to a running server with the command's connection options; a failed call is an
    ``NbaError`` that ``main`` prints as ``error: CODE: details``."""
    import grpc

    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.errors import NbaError

    with _channel(args) as channel:
        try:
            return getattr(getattr(pb_grpc, f"{service}Stub")(channel), method)(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            raise NbaError(f"{exc.code().name}: {exc.details()}") from None


def client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--tls-ca", help="CA bundle to verify the server's certificate (TLS)")
    p.add_argument("--tls-cert", help="client certificate (mTLS)")
    p.add_argument("--tls-key", help="client certificate's key (mTLS)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token (default: env NBA_TOKEN; on "
                   "loopback the local admin token of --data-dir); sent only over TLS or to a loopback address")
    p.add_argument("--token", action=RefusedToken, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help="a local nba serve's data directory, whose admin.token is sent on loopback "
                   "(default: env NBA_DATA_DIR or .nba-data)")


class RefusedToken(argparse.Action):
    """``--token`` is gone: a command line is readable by every local user (``ps``, /proc/PID/cmdline)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error("--token is not accepted: every local user can read a command line (ps, /proc); put the "
                     "token in a file only you can read and pass --token-file FILE, or set NBA_TOKEN")


@contextmanager
def _store(cfg: Config) -> Iterator:
    """A ProfileStore on REDIS_URL, else on the Redis of a running ``nba serve`` with the same data
    directory (its URL and password are in the data directory), else on an embedded server started for
    this command. A refused password or unreachable Redis: ``RedisUnavailable``, printed by ``main``."""
    from engine.store.profiles import ProfileStore
    from engine.store.redis_embedded import redis_for

    embedded, url = redis_for(cfg, running_ok=True)
    try:
        store = ProfileStore.open(url, cfg, "REDIS_URL" if cfg.redis_url else "embedded redis-server")
    except BaseException:
        if embedded:
            embedded.stop()
        raise
    try:
        yield store
    finally:
        store.client.close()
        if embedded:
            embedded.stop()


def _audit(cfg: Config, action: str, **detail: object) -> None:
    """An audit record by the user running this command: in the audit stream of REDIS_URL when set (the
    serving processes also audit what they pick up), else in the log only."""
    import getpass

    from engine.store.audit import audit, log_audit

    if cfg.redis_url is None:
        log_audit(getpass.getuser(), action, **detail)
        return
    with _store(cfg) as store:
        audit(store.client, getpass.getuser(), action, **detail)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.serving.serve import serve

    cfg = _config(args)
    cfg.grpc_address = args.address
    cfg.metrics_host, cfg.metrics_port = args.metrics_host, args.metrics_port
    cfg.demo_customers = args.customers
    cfg.demo = not args.no_demo
    cfg.workers = args.workers
    cfg.contact_policies = not args.no_contact_policies
    cfg.rules_watch_seconds = args.watch_rules
    cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca = args.tls_cert, args.tls_key, args.tls_client_ca
    cfg.auth_file, cfg.insecure, cfg.dev_open_admin = args.auth, args.insecure, args.dev_open_admin
    cfg.max_in_flight = args.max_in_flight
    cfg.reflection = args.reflection
    cfg.traces = args.traces or cfg.traces
    cfg.trace_sample = cfg.trace_sample if args.trace_sample is None else args.trace_sample
    cfg.log_format = args.log_format
    cfg.archive = args.archive
    cfg.archive_dir = args.archive_dir or cfg.archive_dir
    if args.fsync is not None and cfg.redis_url is not None:
        logging.getLogger(__name__).warning("--fsync %s ignored: it sets the embedded Redis; set appendfsync on "
                                            "the Redis at REDIS_URL (engine/deploy/README.md, 'Durability')", args.fsync)
    cfg.redis_fsync = args.fsync or "everysec"
    return serve(cfg)


def cmd_auth_token(args: argparse.Namespace) -> int:
    import secrets

    from engine.serving.security import check_expiry, token_hash

    if args.expires:
        check_expiry(args.expires, "--expires")
    token = secrets.token_urlsafe(32)
    print(f"token (give it to the caller, e.g. as NBA_TOKEN; it is not stored anywhere): {token}")
    print("auth file entry:")
    print(f"  - name: {args.name}\n    token_sha256: {token_hash(token)}\n    roles: [{', '.join(args.roles)}]"
          + (f"\n    expires: {args.expires}" if args.expires else ""))
    return 0


def cmd_loadtest(argv: list[str]) -> int:
    """Runs loadtest/loadgen.py with the rest of the command line (its own --help)."""
    import runpy

    from engine.config import REPO

    script = REPO / "loadtest" / "loadgen.py"
    sys.argv = ["nba loadtest", *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules
    from engine.sim import demo

    cfg = _config(args)
    ruleset, errors = load_rules(cfg.rules_dir)
    if ruleset is None:
        raise RuleErrors(errors)
    with _store(cfg) as store:  # the telco demo's world, or customers generated for the declared domain
        seconds = demo.seed_for(store, ruleset, args.customers, args.world_seed)
    print(f"seeded {args.customers} customers (C0000000..C{args.customers - 1:07d}) in {seconds:.1f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from engine.models import training
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile

    cfg = _config(args)
    rules = load_and_compile(cfg.rules_dir)
    catalog = [a.id for a in rules.ruleset.actions]
    try:
        if args.from_stream:
            with _store(cfg) as store:
                weights = {}
                for item in args.campaign_weight or []:
                    name, _, w = item.partition("=")
                    try:
                        weights[name] = float(w)
                    except ValueError:
                        print(f"error: --campaign-weight {item}: expected NAME=WEIGHT", file=sys.stderr)
                        return 1
                data = _recorded_training_rows(args, cfg, store, rules.schema, catalog, weights)
        elif args.from_file:
            data = training.read_csv(args.from_file, rules.schema, catalog)
        elif args.from_history:
            from engine.analytics.past import read_past, training_set

            now = time.time()
            past = read_past(args.from_history, rules.ruleset, now)
            if past.rejected:
                print(past.render(), file=sys.stderr)
            with _store(cfg) as store:
                data = training_set(store, rules.ruleset, past.offers, now)
        else:
            from engine.sim.demo import is_telco
            from engine.sim.training_data import simulate_responses
            from engine.sim.world import generate

            if not is_telco(rules.ruleset):
                print(f"error: the synthetic world is the telco demo's; {cfg.rules_dir}/domain.yaml declares another "
                      "business: train --from-history FILE or --from-stream", file=sys.stderr)
                return 1

            data = simulate_responses(generate(args.customers, args.world_seed), rules.ruleset.actions)
    finally:
        rules.close()
    print("training set: " + ", ".join(f"{k} {v}" for k, v in data.summary.items()
                                       if not isinstance(v, (dict, list))) + f"; {len(data)} labelled rows")
    if args.export:
        print(f"exported {training.export_csv(data, args.export)} rows to {args.export}")
    if args.export_only:
        return 0
    registry = ModelRegistry(cfg.models_dir, rules.schema)
    try:
        version, metrics, promoted = training.train_and_register(
            registry, data, args.rounds, promote="never" if args.no_promote else "if-better")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status = "champion" if promoted else "stored, not promoted" + (
        "" if args.no_promote else ": the champion did better on the same holdout (nba models promote to override)")
    print(f"model {version} in {registry.dir / version} ({status})")
    print(training.format_metrics(metrics))
    return 0


def _recorded_training_rows(args: argparse.Namespace, cfg: Config, store: ProfileStore, schema: FeatureSchema,
                            catalog: list[str], weights: dict[str, float]) -> TrainingSet:
    """``nba train --from-stream``: the rows of the decisions recorded from --since to --until (the archive
    plus the streams' tails), assembled in DuckDB."""
    from engine.analytics.training_rows import from_streams

    return from_streams(store.client, schema, catalog, args.window_days, args.as_of, campaigns=args.campaign or (),
                        campaign_weights=weights, archive=_archive_for(args, cfg), since=args.since, until=args.until)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Runs on a redis-server of its own (``engine.sim.simulate.private_store``), never on REDIS_URL's."""
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules
    from engine.sim.simulate import POLICIES, Settings, format_simulation, plot_curves, simulate, table

    cfg = _config(args)
    campaign = ""
    if args.campaign:
        from engine.analytics.campaign_plan import what_if_rules

        live, planned, found = what_if_rules(cfg.rules_dir, Path(args.campaign))
        ruleset, campaign = planned.ruleset, found.name
        live.close()
        planned.close()
        print(f"campaign {campaign} runs over the {args.rounds} simulated days (its own dates are "
              f"{found.describe_dates()}); plan first, then play", file=sys.stderr)
    else:
        loaded, errors = load_rules(cfg.rules_dir)
        if loaded is None:
            raise RuleErrors(errors)
        ruleset = loaded
    settings = Settings(world=args.world, customers=args.customers, rounds=args.rounds,
                        seeds=tuple(range(args.seed, args.seed + args.seeds)),
                        history_customers=args.history_customers, history_days=args.history_days,
                        retrain=not args.no_retrain, explore=args.explore, trees=args.trees,
                        policies=tuple(args.policies) if args.policies else POLICIES, campaign=campaign)
    progress = (lambda msg: print(msg, file=sys.stderr)) if args.verbose_progress else (lambda msg: None)
    sim = simulate(ruleset, settings, progress=progress)
    if args.png:
        plot_curves(sim, args.png)
        print(f"learning curves: {args.png}", file=sys.stderr)
    print(json.dumps(table(sim), indent=2) if args.json else format_simulation(sim))
    return 0


def _archive_for(args: argparse.Namespace, cfg: Config) -> Path | None:
    """The archive a report reads: ``--archive DIR|URL``, else NBA_ARCHIVE's or the data directory's when it
    holds one; None
    (the streams alone) with ``--no-archive``."""
    from engine.store.archive import has_archive
    from engine.store.archive_fs import local_path

    if args.no_archive:
        return None
    root = args.archive or cfg.archive_root()
    if not args.archive and not has_archive(root):
        return None
    # a URL stays a string: the reports pass it to archive.read_entries, which takes either
    return local_path(root) or cast("Path", root)


def cmd_archive_compact(args: argparse.Namespace, cfg: Config) -> int:
    """``nba archive compact``: one file per closed day and stream shard (prints a JSON line)."""
    from engine.store.archive_compact import compact, parse_day

    root = args.dir or cfg.archive_root()
    before = parse_day(args.before) if args.before else time.strftime("%Y-%m-%d", time.gmtime())
    with _store(cfg) as store:
        done = compact(store.client, root, before)
    print(json.dumps({"archive": str(root), "before": before, "files_before": done.files_before,
                      "files_after": done.files_after, "merged": done.merged}))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    import threading

    from engine.store.archive import ArchiveWriter

    cfg = _config(args)
    if args.archive_cmd == "compact":
        return cmd_archive_compact(args, cfg)
    root = args.dir or cfg.archive_root()
    with _store(cfg) as store, ArchiveWriter(store.client, root, file_entries=args.file_entries,
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


def cmd_report(args: argparse.Namespace) -> int:
    from engine.analytics.report import build_report, format_report
    from engine.rules.loader import load_rules

    cfg = _config(args)
    ruleset, _errors = load_rules(cfg.rules_dir)
    values = {a.id: a.value for a in ruleset.actions} if ruleset else {}
    types = {a.id: a.type for a in ruleset.actions} if ruleset else {}
    with _store(cfg) as store:
        report = build_report(store.client, since=args.since, customer_prefix=args.customer_prefix,
                              values=values, types=types, bootstrap=args.bootstrap, seed=args.seed,
                              archive=_archive_for(args, cfg), until=args.until)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_campaign_plan(args: argparse.Namespace) -> int:
    from engine.analytics.campaign_plan import (
        PlanError,
        Traffic,
        format_plan,
        plan_campaign,
        rejection_share,
        stored_customers,
        traffic_from_stream,
        what_if_rules,
    )
    from engine.analytics.campaign_report import plan_key
    from engine.rules.errors import RuleErrors

    def tell(stage: str) -> None:
        if not args.quiet:
            print(f"plan: {stage}", file=sys.stderr, flush=True)

    cfg = _config(args)
    tell("loading the model and the rules with the campaign")
    model = _live_model(cfg)
    if model is None:
        return 1
    try:
        live, planned, campaign = what_if_rules(cfg.rules_dir, Path(args.file))
    except RuleErrors as exc:
        return _rule_errors(exc.errors, ": no plan")
    try:
        with _store(cfg) as store:
            everyone = stored_customers(store.client)
            customers = everyone[: args.customers] if args.customers else everyone
            if args.decisions_per_day:
                given = {}
                for item in args.decisions_per_day:
                    channel, _, n = item.partition("=")
                    if channel not in planned.schema.channel_names or not n:
                        raise PlanError(f"--decisions-per-day {item}: expected CHANNEL=N with a channel of "
                                        + ", ".join(planned.schema.channel_names))
                    given[channel] = float(n) / max(len(everyone), 1)
                traffic = Traffic.given(given)
            else:
                tell(f"measuring traffic on the decision stream's last {args.traffic_days:g} days")
                traffic = traffic_from_stream(store.client, max(len(everyone), 1), args.traffic_days,
                                              planned.schema.channel_names, archive=_archive_for(args, cfg))
            reject = rejection_share(store.client, args.traffic_days, archive=_archive_for(args, cfg))
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


def cmd_campaign_report(args: argparse.Namespace) -> int:
    from engine.analytics.campaign_report import build_campaign_report, format_campaign_report, plan_key
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules

    cfg = _config(args)
    ruleset, errors = load_rules(cfg.rules_dir)
    if ruleset is None:
        raise RuleErrors(errors)
    campaign = ruleset.campaigns.get(args.name)
    if campaign is None:
        print(f"error: no campaign {args.name!r} in {cfg.rules_dir}/campaigns (campaigns: "
              f"{', '.join(ruleset.campaigns) or 'none'})", file=sys.stderr)
        return 1
    with _store(cfg) as store:
        saved = store.client.get(plan_key(campaign.name))
        report = build_campaign_report(store.client, campaign, json.loads(saved) if saved else None, since=args.since,
                                       archive=_archive_for(args, cfg), until=args.until)
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


def cmd_decide(args: argparse.Namespace) -> int:

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.serving.server import CHANNEL_TO_PB

    context = dict(kv.split("=", 1) for kv in args.context)
    request = pb.DecideRequest(customer_id=args.customer_id, channel_name=args.channel,
                               channel=CHANNEL_TO_PB.get(args.channel, pb.CHANNEL_UNSPECIFIED),
                               touchpoint=args.touchpoint, context=context,
                               max_actions=args.max_actions, explain=args.explain,
                               interaction_id=args.interaction, preview=args.preview)
    reply = _rpc(args, "DecisionService", "Decide", request)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    print(format_decision(reply))
    return 0


def cmd_event(args: argparse.Namespace) -> int:
    import uuid

    from engine.api.nba.v1 import nba_pb2 as pb

    request = pb.PublishEventRequest(event_id=args.event_id or uuid.uuid4().hex, customer_id=args.customer_id,
                                     type=args.type, attributes=dict(kv.split("=", 1) for kv in args.attributes))
    reply = _rpc(args, "DecisionService", "PublishEvent", request)
    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2) if args.json else (
        "duplicate: already processed" if reply.duplicate else
        f"event {request.event_id}: patterns {', '.join(reply.patterns) or '-'}; raised "
        f"{', '.join(reply.triggers_raised) or '-'}; cleared {', '.join(reply.triggers_cleared) or '-'}"
        + "".join(f"\noutbound {o.action_id} ({o.pattern}): {o.status}" + (f", {o.reason}" if o.reason else "")
                  for o in reply.outbound)))
    return 0


def cmd_respond(args: argparse.Namespace) -> int:

    from engine.api.nba.v1 import nba_pb2 as pb

    request = pb.RecordResponseRequest(decision_id=args.decision_id, action_id=args.action_id,
                                       outcome=f"OUTCOME_{args.outcome.upper()}")
    reply = _rpc(args, "DecisionService", "RecordResponse", request)
    print(f"recorded {args.outcome} of {args.action_id} in {args.decision_id}: {reply.response_id}")
    return 0


def cmd_customer(args: argparse.Namespace) -> int:
    """``nba customer forget ID`` / ``export ID``: queue the privacy job on a running server, wait for it
    (``--wait`` seconds, polling ``GetCustomerJob``) and print its result; exit 1 when it failed (every
    failure on stderr) or is still running at the end of the wait (its job id printed to ask again)."""

    from engine.api.nba.v1 import nba_pb2 as pb

    if args.customer_cmd == "job":
        job_id = args.job_id
    elif args.customer_cmd == "forget":
        job_id = _rpc(args, "AdminService", "ForgetCustomer", pb.ForgetCustomerRequest(customer_id=args.customer_id)).job_id
    else:
        job_id = _rpc(args, "AdminService", "ExportCustomer", pb.ExportCustomerRequest(customer_id=args.customer_id)).job_id
    deadline = time.monotonic() + args.wait
    while True:
        job = _rpc(args, "AdminService", "GetCustomerJob", pb.GetCustomerJobRequest(job_id=job_id))
        if job.state in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for failure in job.failures:
        print(f"failure: {failure}", file=sys.stderr)
    if job.state not in ("succeeded", "failed"):
        print(f"job {job_id} still {job.state} after {args.wait:g}s: ask again with nba customer job {job_id}",
              file=sys.stderr)
        return 1
    if job.kind == "forget":
        who = getattr(args, "customer_id", job.customer_pseudonym)
        print(f"forgot {who}: {job.keys_deleted} keys, {job.stream_entries_deleted} stream entries, "
              f"{job.members_removed} timers and reservations deleted; {job.persistence} "
              f"(job {job_id}, {job.state}; audited as {job.customer_pseudonym})")
        return 0 if job.state == "succeeded" else 1
    if job.state != "succeeded":
        return 1
    text = json.dumps(json.loads(job.json), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    if getattr(args, "out", None):
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # personal data: owner only
        os.fchmod(fd, 0o600)  # also when the file was there before
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        print(f"exported {job_id} to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def format_decision(reply) -> str:
    from engine.api.nba.v1 import nba_pb2 as pb

    lines = [
        f"decision {reply.decision_id}  ruleset {reply.ruleset_version}  model {reply.model_version}"
        + ("  DEGRADED" if reply.degraded else "") + ("  cold start" if reply.cold_start else "")
        + ("  control group" if reply.control_group else "") + ("  repeat" if reply.repeat else "")
        + ("  preview" if reply.preview else ""),
    ]
    if reply.situations:
        lines.append("situations: " + ", ".join(reply.situations))
    header = f"{'#':>2}  {'action':28} {'type':12} {'propensity':>10} {'value':>8} {'priority':>9}  reasons"
    lines += [header, "-" * len(header)]
    for a in reply.actions:
        type_name = a.type_name or pb.ActionType.Name(a.type).removeprefix("ACTION_TYPE_").lower()
        lines.append(f"{a.rank:>2}  {a.action_id:28} {type_name:12} {a.propensity:>10.4f} {a.value:>8.2f} "
                     f"{a.priority:>9.3f}  {'; '.join(a.reasons)}")
    for f in reply.funnel:
        lines.append(f"    funnel {f.action_id:28} {f.stage:13} {f.detail}")
    return "\n".join(lines)


def cmd_rules_check(args: argparse.Namespace) -> int:
    from engine.authoring.check import check

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    errors = check(rules_dir)
    if errors:
        return _rule_errors(errors, f" in {rules_dir}")
    print(f"{rules_dir}: ok")
    return 0


def cmd_rules_status(args: argparse.Namespace) -> int:
    """Whether the running service took the rule files on disk: 0 live, 1 refused, 2 not yet picked up."""
    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.authoring.watch import files_digest
    from engine.rules.loader import rules_version

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    reply = _rpc(args, "AdminService", "GetStatus", pb.GetStatusRequest())
    text, code = rules_status_text(reply, rules_dir, rules_version(rules_dir), files_digest(rules_dir))
    print(text)
    return code


def rules_status_text(reply, rules_dir: Path, version: str, digest: str) -> tuple[str, int]:
    """What a GetStatus ``reply`` says about the files in ``rules_dir`` (their ``version`` and files
    ``digest``), in words, and ``nba rules status``'s exit status."""
    from datetime import datetime

    def clock(seconds: float) -> str:
        when = datetime.fromtimestamp(seconds)
        return when.strftime("%H:%M:%S" if when.date() == datetime.now().date() else "%Y-%m-%d %H:%M:%S")

    live = reply.ruleset_version
    lines = [f"live: {live} (loaded {clock(reply.ruleset_loaded_at.ToNanoseconds() / 1e9)})"]
    served = Path(reply.rules_dir) if reply.rules_dir else None
    if served is not None and served != Path(rules_dir).resolve():
        lines.append(f"note: the service reads {served}; these are the files in {Path(rules_dir).resolve()}")
    refused = reply.rules_refused if reply.HasField("rules_refused") else None
    if digest == reply.ruleset_files_digest or (version == live and (refused is None or refused.files_digest != digest)):
        lines.append("your files are that version")
        code = 0
    elif refused is not None and refused.files_digest == digest:
        lines.append(f"your files ({version}) are newer and were refused at "
                     f"{clock(refused.at.ToNanoseconds() / 1e9)}; {live} stays live:")
        lines.extend(f"  {e}" for e in refused.errors)
        code = 1
    elif reply.rules_watch_seconds > 0:
        lines.append(f"your files ({version}) are not yet picked up: the service checks them every "
                     f"{reply.rules_watch_seconds:g} s; ask again in a moment")
        code = 2
    else:
        lines.append(f"your files ({version}) are not yet picked up: the service does not watch them "
                     "(--watch-rules 0); they go live on a ReloadRules call")
        code = 2
    lines.append(f"(worker {reply.worker_pid} answered; with several workers each reloads on its own)")
    return "\n".join(lines), code


def cmd_rules_test(args: argparse.Namespace) -> int:
    from engine.authoring.check import test
    from engine.authoring.contactscope import policy_scopes

    rules_dir = Path(args.dir) if args.dir else Config().rules_dir
    rules, errors, results = test(rules_dir)
    scopes = policy_scopes(rules.ruleset) if rules is not None else []
    if rules is not None:
        rules.close()
    if errors:
        return _rule_errors(errors, f" in {rules_dir}; no test ran")
    failed = [r for r in results if not r.passed]
    for r in results:
        if args.verbose_tests or not r.passed:
            print(r.render())
    for scope in scopes:  # a policy that limits more than its name says passes every test: say so
        if scope.warnings:
            print("contact policy " + "\n".join(scope.render()).strip(), file=sys.stderr)
    summary = f"{len(results)} rule tests: {len(results) - len(failed)} passed, {len(failed)} failed"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _rule_errors(errors: Sequence[RuleError], outcome: str) -> int:
    """Print each error as file:line:col, then how many and ``outcome``; the command's exit status (1)."""
    for e in errors:
        print(e.render())
    print(f"{len(errors)} error(s){outcome}", file=sys.stderr)
    return 1


def _schema(cfg: Config) -> FeatureSchema:
    """The feature schema of the configured rule directory's domain.yaml (raises ``RuleErrors``)."""
    from engine.rules.loader import load_domain_file

    return load_domain_file(cfg.rules_dir)


def _live_model(cfg: Config) -> LoadedModel | None:
    """The models directory's live model set, or None after saying why there is none."""
    from engine.models.registry import ModelRefused, ModelRegistry
    from engine.rules.errors import RuleErrors

    try:
        return ModelRegistry(cfg.models_dir, _schema(cfg)).load()
    except (ModelRefused, RuleErrors) as exc:
        print(f"error: {exc} (nba train makes one)", file=sys.stderr)
        return None


def cmd_rules_diff(args: argparse.Namespace) -> int:
    from engine.authoring.check import RuleErrors, test
    from engine.authoring.whatif import load_pair, sample_customers, what_if

    cfg = _config(args)
    model = _live_model(cfg)
    if model is None:
        return 1
    try:
        old, new = load_pair(Path(args.old_dir), Path(args.new_dir))
    except RuleErrors as exc:
        return _rule_errors(exc.errors, ": nothing compared")
    try:
        with _store(cfg) as store:
            customers = sample_customers(store, args.customers)
            if not customers:
                print("error: no stored customers (nba seed writes the demo ones)", file=sys.stderr)
                return 1
            report = what_if(store, model, old, new, customers, args.channel or ["web"], args.examples)
    finally:
        old.close()
        new.close()
    if args.json:
        print(json.dumps(report.as_dict(args.examples), indent=2))
    else:
        print(report.render(args.examples))
    rules, _, results = test(Path(args.new_dir))
    if rules is not None:
        rules.close()
    failed = [r for r in results if not r.passed]
    if failed:
        print(f"note: {len(failed)} of {len(results)} rule tests fail under {args.new_dir} "
              "(nba rules test shows them); it would be refused live", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine.models.registry import ModelRefused, ModelRegistry

    cfg = _config(args)
    registry = ModelRegistry(cfg.models_dir, _schema(cfg))
    if args.models_cmd == "promote":
        try:
            registry.promote(args.version)
        except ModelRefused as exc:
            _audit(cfg, "model_promotion_refused", model=args.version, reason=str(exc))
            print(f"refused: {exc}", file=sys.stderr)
            return 1
        _audit(cfg, "model_promoted", model=args.version)
        print(f"{args.version} is the champion")
        return 0
    if args.models_cmd == "show":
        from engine.models.training import format_metrics

        if args.version not in registry.versions():
            print(f"no model {args.version} in {registry.dir}", file=sys.stderr)
            return 1
        saved = registry.metrics(args.version)
        print(f"{args.version}: " + ", ".join(f"{k} {v}" for k, v in saved.get("training", {}).items()
                                              if not isinstance(v, (dict, list))))
        print(format_metrics(saved.get("metrics", {})))
        return 0
    from engine.models.experiment import ExperimentError, read_experiment

    champion = registry.champion()
    try:
        challenger = read_experiment(registry).challenger
    except ExperimentError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        challenger = None
    print("* champion, c challenger (experiment.yaml), ! cannot go live")
    for version in registry.versions():
        saved = registry.metrics(version)
        m, t = saved.get("metrics", {}), saved.get("training", {})
        mark = "*" if version == champion else "c" if challenger and version == challenger.version else " "
        problem = registry.problem(version)
        print(f"{mark}{'!' if problem else ' '} {version}  auc {m.get('holdout_auc', '?')}  "
              f"logloss {m.get('holdout_logloss', '?')}  rank-corr-with-truth {m.get('rank_correlation_with_truth', '-')}  "
              f"rows {t.get('rows', '?')}  source {t.get('source', '?')}" + (f"  ({problem})" if problem else ""))
    return 0


def cmd_import_customers(args: argparse.Namespace) -> int:
    """``nba import customers FILE``: exit 0 when every row loaded, 1 when rows were rejected (the good
    ones loaded), 2 when the input cannot be used at all (nothing written)."""
    import getpass

    from engine.rules.errors import RuleErrors
    from engine.store.audit import audit
    from engine.store.bulk import ImportRefused, import_customers

    cfg = _config(args)
    mapping: dict[str, str] = {}
    for pair in args.map:
        column, equals, attribute = pair.partition("=")
        if not equals or not column or not attribute.strip():
            print(f"error: --map {pair!r}: write COLUMN=ATTRIBUTE", file=sys.stderr)
            return 2
        if column in mapping:
            print(f"error: --map names column {column!r} twice", file=sys.stderr)
            return 2
        mapping[column] = attribute.strip()
    path = Path(args.file)
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    try:
        schema = _schema(cfg)
    except RuleErrors as exc:
        for e in exc.errors:
            print(e.render(), file=sys.stderr)
        print(f"{len(exc.errors)} error(s) in {cfg.rules_dir}/domain.yaml: nothing imported", file=sys.stderr)
        return 2
    progress = sys.stderr if args.progress or sys.stderr.isatty() else None
    try:
        with _store(cfg) as store:
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


def cmd_import_history(args: argparse.Namespace) -> int:
    """``nba import history FILE``: past presentations into the contact histories; exit 1 when rows were
    rejected (the others imported), 2 when the file cannot be used."""
    import getpass

    from engine.analytics.past import HistoryRefused, fill_contacts, read_past
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_rules
    from engine.store.audit import audit

    cfg = _config(args)
    ruleset, errors = load_rules(cfg.rules_dir)
    if ruleset is None:
        raise RuleErrors(errors)
    now = time.time()
    try:
        report = read_past(args.file, ruleset, now)
    except HistoryRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with _store(cfg) as store:
        report.contacts = fill_contacts(store.client, ruleset, report.offers, now)
        audit(store.client, getpass.getuser(), "history_imported", file=str(Path(args.file).resolve()),
              offers=len(report.offers), contacts=report.contacts)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 1 if report.rejected else 0


def cmd_profiles(args: argparse.Namespace) -> int:
    """``nba profiles layouts`` / ``migrate``: stored profiles per packing layout; the older ones rewritten."""
    from engine.store.updates import census, migrate_all

    cfg = _config(args)
    schema = _schema(cfg)
    with _store(cfg) as store:
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


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


def main(argv: list[str] | None = None) -> int:
    """Every command; a reader that closes its end of stdout early (``nba decide --json | head -1``) ends
    it quietly with ``SIGPIPE_EXIT``, as a command stopped by SIGPIPE would."""
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python's own flush of stdout at exit would hit the closed pipe again and print a warning
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nba", description="Next-best-action decision service")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def redis_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", help="use this Redis instead of the embedded one (env REDIS_URL): "
                       "redis://[user:password@]host:port/db, rediss://... for TLS")
        p.add_argument("--redis-ca", metavar="FILE", help="CA bundle for a rediss:// Redis (env REDIS_CA)")
        p.add_argument("--redis-cert", metavar="FILE", help="client certificate for Redis TLS (env REDIS_CERT)")
        p.add_argument("--redis-key", metavar="FILE", help="its private key (env REDIS_KEY)")
        p.add_argument("--data-dir", help="embedded Redis data directory (default .nba-data)")

    def archive_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--archive", metavar="DIR|URL", help="read the archive in DIR (or at an fsspec URL) plus the "
                       "streams' unarchived tails (default: NBA_ARCHIVE's, else the data directory's archive when "
                       "there is one)")
        p.add_argument("--no-archive", action="store_true", help="read the Redis streams alone")

    def range_options(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--since", default="-", help=f"first {what}: a UTC day (YYYY-MM-DD) or stream id (ms-seq or "
                       "ms); default: everything kept")
        p.add_argument("--until", default="+", help=f"last {what}: a UTC day (YYYY-MM-DD, all of it) or stream id; "
                       "default: the newest")

    def paths(p: argparse.ArgumentParser) -> None:
        redis_options(p)
        p.add_argument("--rules-dir", help="rule files (default ./rules)")
        p.add_argument("--models-dir", help="model registry (default ./models)")

    p = sub.add_parser("serve", help="run the gRPC service (embedded Redis unless REDIS_URL is set)")
    paths(p)
    p.add_argument("--address", default="127.0.0.1:50051", help="gRPC listen address")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: off)")
    p.add_argument("--customers", type=int, default=20_000, help="demo customers to seed when none exist")
    p.add_argument("--no-demo", action="store_true", help="do not seed demo data or train a demo model")
    p.add_argument("--no-contact-policies", action="store_true",
                   help="do not enforce contact.yaml limits or daily budgets (for comparisons)")
    p.add_argument("--watch-rules", type=float, default=1.0, metavar="SECONDS",
                   help="check the rule files for changes this often and reload them (0: only on ReloadRules)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="serving processes on the one port (default: number of cores)")
    p.add_argument("--tls-cert", type=Path, help="serve TLS only, with this certificate (PEM; reloaded on change)")
    p.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--auth", type=Path, help="callers and their roles (YAML; see engine/deploy/README.md, 'Running it securely')")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --address without TLS and --auth (logs a warning)")
    p.add_argument("--dev-open-admin", action="store_true",
                   help="without --auth: AdminService without the local admin token (<data dir>/admin.token); "
                        "for development only (logs a warning)")
    p.add_argument("--archive", choices=("auto", "on", "off"), default=Config.archive,
                   help="run the archive writer (into --archive-dir) in this process: auto (the default) = with "
                        "the embedded Redis only (with REDIS_URL run one `nba archive run` for the deployment "
                        "instead, and give this service its --dir as --archive-dir or NBA_ARCHIVE); customer "
                        "forget and export reach the archive whatever this says")
    p.add_argument("--archive-dir", metavar="DIR|URL",
                   help="the archive's root: a directory or an fsspec URL (s3://, gs://: install s3fs or gcsfs); "
                        "default NBA_ARCHIVE, else <data dir>/archive")
    p.add_argument("--max-in-flight", type=int, default=Config.max_in_flight,
                   help="calls at once per worker; more get RESOURCE_EXHAUSTED at once (load shedding)")
    p.add_argument("--reflection", action="store_true",
                   help="serve gRPC server reflection (grpcurl without .proto files; off by default); with --auth "
                        "only if the auth file's open list names reflection")
    p.add_argument("--traces", choices=("none", "console", "otlp"),
                   help="OpenTelemetry traces of every call: none (default; OTEL_TRACES_EXPORTER), console, or otlp "
                        "to OTEL_EXPORTER_OTLP_ENDPOINT (pip install 'nba-engine[otel]')")
    p.add_argument("--trace-sample", type=float, metavar="RATIO",
                   help="share of the traces started here that are sampled, 0-1 (default 1; OTEL_TRACES_SAMPLER_ARG); "
                        "a caller's sampled traceparent is always followed")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="log lines as text (default) or one JSON object each with trace, span and decision ids "
                        "(NBA_LOG_FORMAT)")
    p.add_argument("--fsync", choices=("everysec", "always"),
                   help="the embedded Redis's appendfsync (default everysec): always fsyncs every write before "
                        "the OK (survives power loss; costs latency, engine/deploy/README.md, 'Durability')")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("auth", help="make credentials for the auth file")
    auth = p.add_subparsers(dest="auth_cmd", required=True)
    p = auth.add_parser("token", help="a new random bearer token and its auth file entry (only the hash is stored)")
    p.add_argument("name", help="the caller's name, e.g. web-frontend")
    p.add_argument("--roles", nargs="+", default=["decide", "respond"],
                   choices=["decide", "respond", "events", "profiles", "operations", "privacy"],
                   help="operations: GetStatus, ReloadRules; privacy: ForgetCustomer, ExportCustomer and their jobs")
    p.add_argument("--expires", metavar="WHEN", help="the entry's expiry, e.g. 2027-03-01T00:00:00Z")
    p.set_defaults(fn=cmd_auth_token)

    sub.add_parser("loadtest", help="open-loop gRPC load test: nba loadtest --help", add_help=False)

    p = sub.add_parser("seed", help="write synthetic demo customers of the rule directory's domain.yaml to Redis")
    paths(p)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--world-seed", type=int, default=7)
    p.set_defaults(fn=cmd_seed)

    p = sub.add_parser("train", help="train a propensity model (synthetic world, recorded streams or a file)")
    paths(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from-stream", "--from-recorded", dest="from_stream", action="store_true",
                        help="recorded decisions joined with their responses (the archive plus the streams' tails)")
    source.add_argument("--from-file", metavar="FILE", help="a training set written by --export")
    source.add_argument("--from-history", metavar="FILE", help="past offers and outcomes (as nba import history "
                        "reads them) on the customers' stored profiles")
    p.add_argument("--window-days", type=float, default=7.0,
                   help="label window: an acceptance within it is positive; later, no acceptance is negative")
    p.add_argument("--as-of", type=float, help="epoch seconds that closes label windows (default: now)")
    p.add_argument("--export", metavar="FILE", help="also write the training set to FILE (CSV; .gz compresses)")
    p.add_argument("--export-only", action="store_true", help="write --export and stop")
    p.add_argument("--campaign", action="append", metavar="NAME",
                   help="--from-stream: only rows of actions presented for this campaign (repeat for several; "
                   "'-' for actions of no campaign)")
    p.add_argument("--campaign-weight", action="append", metavar="NAME=WEIGHT",
                   help="--from-stream: weigh the rows of a campaign's actions (e.g. fibre_migration=3; '-' for none)")
    range_options(p, "recorded decision (--from-stream)")
    archive_option(p)
    p.add_argument("--customers", type=int, default=50_000, help="synthetic world: customers")
    p.add_argument("--world-seed", type=int, default=7)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--no-promote", action="store_true",
                   help="store the model only (default: promote it unless the champion does better on the same holdout)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("simulate", help="play the synthetic world on a private Redis: NBA vs rules-only, generic, "
                       "random, and oracles under the same and under no contact limits")
    paths(p)
    p.add_argument("--world", choices=("realistic", "ideal"), default="realistic",
                   help="realistic (unobserved traits, fatigue, holdings, late responses, drift, new actions) or ideal")
    p.add_argument("--customers", type=int, default=1000, help="evaluated customers (the same for every policy)")
    p.add_argument("--rounds", type=int, default=8, help="rounds (simulated days)")
    p.add_argument("--seeds", type=int, default=5, help="world seeds (mean and 95%% CI over them)")
    p.add_argument("--seed", type=int, default=11, help="first world seed")
    p.add_argument("--history-customers", type=int, default=10_000,
                   help="customers of the other population whose recorded traffic trains the model")
    p.add_argument("--history-days", type=int, default=7, help="days of that recorded traffic")
    p.add_argument("--no-retrain", action="store_true", help="keep the starting model (default: retrain nightly "
                   "on the history plus the decisions and responses recorded in the run)")
    p.add_argument("--explore", type=float, default=0.1, help="share of nba decisions that explore (0: off)")
    p.add_argument("--trees", type=int, default=100, help="boosting rounds per training")
    p.add_argument("--policies", nargs="+", metavar="POLICY",
                   help="only these policies (nba rules_only generic random_eligible constrained_oracle oracle)")
    p.add_argument("--campaign", metavar="FILE", help="a campaign file: plan it on the evaluated customers (traffic "
                   "and model from the history), then play it over the simulated days; reports plan vs presented")
    p.add_argument("--json", action="store_true", help="one JSON object keyed by policy, plus world, seeds, model")
    p.add_argument("--png", metavar="FILE", help="learning curves: value per 1,000 decisions per round")
    p.add_argument("--progress", dest="verbose_progress", action="store_true", help="progress on stderr")
    p.set_defaults(fn=cmd_simulate)

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

    p = sub.add_parser("decide", help="ask a running server for a decision and print it")
    p.add_argument("customer_id")
    p.add_argument("--channel", default="web", help="a channel domain.yaml declares (default web)")
    p.add_argument("--touchpoint", default="")
    p.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-actions", type=int, default=0)
    p.add_argument("--explain", action="store_true", help="show where every catalog action dropped out")
    p.add_argument("--interaction", default="", metavar="ID",
                   help="interaction id: asking again with it returns the same decision (no second impression)")
    p.add_argument("--preview", action="store_true", help="decide without side effects (nothing counted or recorded)")
    client_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_decide)

    p = sub.add_parser("respond", help="record a customer's response to an action of a decision")
    p.add_argument("decision_id")
    p.add_argument("action_id")
    p.add_argument("outcome", choices=["impression", "clicked", "accepted", "rejected", "ignored"])
    client_options(p)
    p.set_defaults(fn=cmd_respond)

    p = sub.add_parser("event", help="publish an event to a running server (rules/events.yaml)")
    p.add_argument("customer_id")
    p.add_argument("type", help="an event type of rules/events.yaml, e.g. contact_request")
    p.add_argument("attributes", nargs="*", metavar="NAME=VALUE", help="e.g. topic=billing")
    p.add_argument("--event-id", default="", help="default: a new random id (send one twice to see a replay)")
    client_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_event)

    p = sub.add_parser("customer", help="privacy: erase or export everything stored about a customer")
    customer = p.add_subparsers(dest="customer_cmd", required=True)
    p = customer.add_parser("forget", help="erase the customer everywhere (profile, history, records, stream "
                                           "entries, then the AOF/RDB files); an audited job, waited for")
    p.add_argument("customer_id")
    p.add_argument("--wait", type=float, default=900.0, help="seconds to wait for the job (default 900)")
    client_options(p)
    p.set_defaults(fn=cmd_customer)
    p = customer.add_parser("export", help="everything stored about the customer in plain documented fields, as "
                                           "JSON; an audited job, waited for")
    p.add_argument("customer_id")
    p.add_argument("--out", metavar="FILE", help="write it to FILE (mode 0600) instead of stdout")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the job (default 300)")
    client_options(p)
    p.set_defaults(fn=cmd_customer)
    p = customer.add_parser("job", help="the state of a forget or export job (its id as forget/export printed)")
    p.add_argument("job_id")
    p.add_argument("--out", metavar="FILE", help="an export's document to FILE (mode 0600) instead of stdout")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the job to end (default 0)")
    client_options(p)
    p.set_defaults(fn=cmd_customer)

    rules = sub.add_parser("rules", help="rule file tools").add_subparsers(dest="rules_cmd", required=True)
    p = rules.add_parser("check", help="parse and type-check the rule files; lists every error")
    p.add_argument("dir", nargs="?")
    p.set_defaults(fn=cmd_rules_check)
    p = rules.add_parser("status", help="ask the running service whether it took the rule files on disk: live, "
                         "refused (with its errors) or not yet picked up (exit 0, 1, 2)")
    p.add_argument("dir", nargs="?", help="the rule files to compare (default ./rules)")
    client_options(p)
    p.set_defaults(fn=cmd_rules_status)
    p = rules.add_parser("test", help="run the rule tests in DIR/tests/*.yaml; lists every failure")
    p.add_argument("dir", nargs="?")
    p.add_argument("-v", dest="verbose_tests", action="store_true", help="list the tests that pass too")
    p.set_defaults(fn=cmd_rules_test)
    p = rules.add_parser("diff", help="what-if: decide for stored customers under two rule sets and compare")
    p.add_argument("old_dir", help="the rules in use, e.g. rules")
    p.add_argument("new_dir", help="the changed rules, e.g. a copy you edited")
    p.add_argument("--customers", type=int, default=2000, help="how many stored customers to decide for")
    p.add_argument("--channel", action="append", help="channel(s) to decide on (default web)")
    p.add_argument("--examples", type=int, default=10, help="customers to show whose top action changed")
    p.add_argument("--json", action="store_true")
    redis_options(p)
    p.add_argument("--models-dir", help="model registry (default ./models)")
    p.set_defaults(fn=cmd_rules_diff)

    p = sub.add_parser("models", help="model registry")
    p.add_argument("--models-dir")
    models = p.add_subparsers(dest="models_cmd", required=True)
    p = models.add_parser("list", help="versions and holdout metrics; * marks the champion")
    p.set_defaults(fn=cmd_models)
    p.add_argument("--models-dir", default=argparse.SUPPRESS, help="model registry (default ./models)")
    p = models.add_parser("show", help="a version's metrics: per action type, calibration, training data")
    p.add_argument("version")
    p.add_argument("--models-dir", default=argparse.SUPPRESS, help="model registry (default ./models)")
    p.set_defaults(fn=cmd_models)
    p = models.add_parser("promote", help="make VERSION the champion (running servers switch within a second)")
    p.add_argument("version")
    p.add_argument("--models-dir", default=argparse.SUPPRESS, help="model registry (default ./models)")
    p.set_defaults(fn=cmd_models)

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

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        return cmd_loadtest(argv[1:])
    args = parser.parse_args(argv)
    from engine.serving.telemetry import configure_logging

    configure_logging(getattr(args, "log_format", None), logging.DEBUG if args.verbose else logging.INFO)
    from engine.errors import NbaError
    from engine.rules.errors import RuleErrors

    try:
        return args.fn(args)
    except RuleErrors as exc:  # rules that do not load, compile or pass their tests: say where
        for e in exc.errors:
            print(e.render(), file=sys.stderr)
        print(f"{len(exc.errors)} error(s) in the rules", file=sys.stderr)
        return 1
    except NbaError as exc:  # a setting or input the user must fix: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
