"""What the ``nba`` handlers share: the configuration their options give, a channel and a call to a
running server, a store on Redis, audit records, the archive a report reads, the live model and the
rule errors printed as file:line:col."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

from engine.config import Config

if TYPE_CHECKING:
    from collections.abc import Sequence

    from engine.features import FeatureSchema
    from engine.models.registry import LoadedModel
    from engine.rules.errors import RuleError


def config_for(args: argparse.Namespace) -> Config:
    """The configuration (environment and defaults) with the command's Redis, data, rule and model options."""
    cfg = Config()
    for name in ("redis_url", "redis_ca", "redis_cert", "redis_key", "data_dir", "rules_dir", "models_dir"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, Path(value) if name.endswith("_dir") else value)
    return cfg


def server_channel(args: argparse.Namespace):
    """A channel to a running server with the command's --address, TLS and token options."""
    from engine.serving.client import open_channel, read_token_file
    from engine.serving.security import is_loopback, read_local_admin_token

    token: str | None = read_token_file(args.token_file) if args.token_file else os.environ.get("NBA_TOKEN", "").strip()
    if not token and is_loopback(args.address):
        # a local nba serve without an auth file wants its admin token for AdminService (security.py)
        token = read_local_admin_token(getattr(args, "data_dir", None) or Config().data_dir)
    return open_channel(args.address, args.tls_ca, args.tls_cert, args.tls_key, token or "")


def rpc(args: argparse.Namespace, service: str, method: str, request):
    """One call to a running server with the command's connection options; a failed call is an
    ``NbaError`` that ``main`` prints as ``error: CODE: details``."""
    import grpc

    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.errors import NbaError

    with server_channel(args) as channel:
        try:
            return getattr(getattr(pb_grpc, f"{service}Stub")(channel), method)(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            raise NbaError(f"{exc.code().name}: {exc.details()}") from None


@contextmanager
def open_store(cfg: Config) -> Iterator:
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


def audit_by_user(cfg: Config, action: str, **detail: object) -> None:
    """An audit record by the user running this command: in the audit stream of REDIS_URL when set (the
    serving processes also audit what they pick up), else in the log only."""
    import getpass

    from engine.store.audit import audit, log_audit

    if cfg.redis_url is None:
        log_audit(getpass.getuser(), action, **detail)
        return
    with open_store(cfg) as store:
        audit(store.client, getpass.getuser(), action, **detail)


def archive_for(args: argparse.Namespace, cfg: Config) -> Path | None:
    """The archive a report reads: ``--archive DIR|URL``, else NBA_ARCHIVE's or the data directory's when it
    holds one; None (the streams alone) with ``--no-archive``."""
    from engine.store.archive import has_archive
    from engine.store.archive_fs import local_path

    if args.no_archive:
        return None
    root = args.archive or cfg.archive_root()
    if not args.archive and not has_archive(root):
        return None
    # a URL stays a string: the reports pass it to archive.read_entries, which takes either
    return local_path(root) or cast("Path", root)


def rule_errors(errors: Sequence[RuleError], outcome: str) -> int:
    """Print each error as file:line:col, then how many and ``outcome``; the command's exit status (1)."""
    for e in errors:
        print(e.render())
    print(f"{len(errors)} error(s){outcome}", file=sys.stderr)
    return 1


def domain_schema(cfg: Config) -> FeatureSchema:
    """The feature schema of the configured rule directory's domain.yaml (raises ``RuleErrors``)."""
    from engine.rules.loader import load_domain_file

    return load_domain_file(cfg.rules_dir)


def live_model(cfg: Config) -> LoadedModel | None:
    """The models directory's live model set, or None after saying why there is none."""
    from engine.models.registry import ModelRefused, ModelRegistry
    from engine.rules.errors import RuleErrors

    try:
        return ModelRegistry(cfg.models_dir, domain_schema(cfg)).load()
    except (ModelRefused, RuleErrors) as exc:
        print(f"error: {exc} (nba train makes one)", file=sys.stderr)
        return None
