"""``nba serve`` (the supervisor, its workers and the embedded Redis) and ``nba auth token`` (a caller's
credentials for the auth file)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from engine.commands.common import config_for
from engine.commands.options import paths
from engine.config import Config


def register(sub: argparse._SubParsersAction) -> None:
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
    _security_options(p)
    _operation_options(p)
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


def _security_options(p: argparse.ArgumentParser) -> None:
    """TLS, callers, the admin token."""
    p.add_argument("--tls-cert", type=Path, help="serve TLS only, with this certificate (PEM; reloaded on change)")
    p.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--auth", type=Path, help="callers and their roles (YAML; see engine/deploy/README.md, 'Running it securely')")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --address without TLS and --auth (logs a warning)")
    p.add_argument("--dev-open-admin", action="store_true",
                   help="without --auth: AdminService without the local admin token (<data dir>/admin.token); "
                        "for development only (logs a warning)")


def _operation_options(p: argparse.ArgumentParser) -> None:
    """The archive writer, load shedding, reflection, traces, log lines, durability."""
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


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.serving.serve import serve

    cfg = config_for(args)
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
        # under the logger name `nba serve` has always given this warning
        logging.getLogger("engine.cli").warning("--fsync %s ignored: it sets the embedded Redis; set appendfsync on "
                                                "the Redis at REDIS_URL (engine/deploy/README.md, 'Durability')",
                                                args.fsync)
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
