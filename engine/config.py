"""Service configuration: defaults, environment (REDIS_URL, REDIS_ADMIN_URL, REDIS_CA, REDIS_CERT, REDIS_KEY,
NBA_DATA_DIR, NBA_ARCHIVE) and command-line overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEMO_CUSTOMERS = 20_000
REPO = Path(__file__).resolve().parent.parent


def _default_dir(name: str) -> Path:
    here = Path.cwd() / name
    return here if here.is_dir() else REPO / name


def _ratio(text: str | None) -> float:
    """A sampling ratio from the environment; -1 for one that is no number (nba serve refuses it, naming it)."""
    try:
        return float(text) if text else 1.0
    except ValueError:
        return -1.0


@dataclass
class Config:
    grpc_address: str = "127.0.0.1:50051"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0 disables the /metrics endpoint
    # redis://[user:password@]host:port/db (password alone or an ACL user), rediss:// for TLS; None: embedded
    redis_url: str | None = field(default_factory=lambda: os.environ.get("REDIS_URL") or None)
    # the same Redis as an admin user, for persistence steps the service user may not run (BGREWRITEAOF,
    # BGSAVE, CONFIG; engine/store/redis_acl.py); None: they are left to the operator. The embedded Redis
    # sets it to its own admin user
    redis_admin_url: str | None = field(default_factory=lambda: os.environ.get("REDIS_ADMIN_URL") or None)
    # TLS to a rediss:// REDIS_URL: the CA bundle that signed the server's certificate (default: the system's),
    # and a client certificate and key when Redis requires them (tls-auth-clients)
    redis_ca: str | None = field(default_factory=lambda: os.environ.get("REDIS_CA") or None)
    redis_cert: str | None = field(default_factory=lambda: os.environ.get("REDIS_CERT") or None)
    redis_key: str | None = field(default_factory=lambda: os.environ.get("REDIS_KEY") or None)
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("NBA_DATA_DIR", ".nba-data")))
    # the archive writer (engine/store/archive.py) in nba serve: "auto" runs it with the embedded Redis (the data
    # directory is this machine's) and not with REDIS_URL (several serving machines: one `nba archive run` instead)
    archive: str = "auto"
    # where the archive is (a directory or an fsspec URL; None: <data dir>/archive): written by the writer, erased
    # and exported by the privacy jobs, read by reports. A deployment running `nba archive run --dir X` sets
    # NBA_ARCHIVE=X for the service too, so that erasure reaches it
    archive_dir: str | None = field(default_factory=lambda: os.environ.get("NBA_ARCHIVE") or None)
    redis_fsync: str = "everysec"  # the embedded Redis's appendfsync: everysec or always (engine/deploy/README.md, "Durability")
    rules_dir: Path = field(default_factory=lambda: _default_dir("rules"))
    models_dir: Path = field(default_factory=lambda: _default_dir("models"))
    demo_customers: int = DEMO_CUSTOMERS
    demo: bool = True  # seed demo customers and train a demo model when missing
    workers: int = 1  # serving processes sharing the gRPC port
    contact_policies: bool = True  # enforce contact.yaml limits and daily budgets (off: for comparisons)
    tls_cert: Path | None = None  # serve TLS only, with this certificate and key (reloaded when they change)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates chaining to this CA (mTLS)
    auth_file: Path | None = None  # callers and their roles (engine/serving/security.py)
    insecure: bool = False  # allow a non-loopback address without TLS and auth
    dev_open_admin: bool = False  # without an auth file: AdminService open without the local admin token
    max_in_flight: int = 16  # calls at once per worker before RESOURCE_EXHAUSTED (load shedding)
    reflection: bool = False  # serve grpc.reflection (what grpcurl lists); a method like any other under --auth
    # traces (engine/serving/telemetry.py): none, console or otlp (OTEL_EXPORTER_OTLP_ENDPOINT says where); the share
    # of traces started here that are sampled (a caller's sampled traceparent is always followed)
    traces: str = field(default_factory=lambda: os.environ.get("OTEL_TRACES_EXPORTER") or "none")
    trace_sample: float = field(default_factory=lambda: _ratio(os.environ.get("OTEL_TRACES_SAMPLER_ARG")))
    log_format: str | None = None  # text or json log lines (None: NBA_LOG_FORMAT, else text)
    model_poll_seconds: float = 1.0  # how often a server checks models/ for a new champion or experiment
    rules_watch_seconds: float = 1.0  # poll rules_dir for changes this often and reload (0: off)
    events_poll_seconds: float = 0.5  # absence timers are checked this often; with 0 no timer poller and no
    #                                   ingest-stream consumer run in this process (PublishEvent still works)

    def archive_root(self) -> Path | str:
        """The archive's root: ``archive_dir`` (a directory or a URL), else ``<data dir>/archive``."""
        return self.archive_dir or self.data_dir / "archive"
