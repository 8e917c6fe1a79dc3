"""Option sets several ``nba`` commands share: Redis, the rule and model paths, the archive a report
reads, a range of decisions, and the connection to a running server."""

from __future__ import annotations

import argparse


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
