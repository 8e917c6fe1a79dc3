"""Who may call what: TLS (mTLS) on the transport, callers identified by their client certificate and/or a
bearer token and limited to their roles, a request rate per caller shared by every worker and replica.

The auth file (``nba serve --auth FILE``) maps identities to roles; it never holds a token, only its
SHA-256 (``nba auth token NAME`` makes one)::

    open: [health]                     # methods anyone may call (default: health; reflection only if named)
    rate_limit: {per_second: 2000, burst: 4000}   # per caller across all workers and replicas (the default)
    callers:
      - name: web-frontend
        token_sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
        roles: [decide, respond]
        expires: 2027-03-01T00:00:00Z                 # optional: refused from then on
      - name: agent-desktop
        certificate: {common_name: agent-desktop}     # or {san: desktop.bank.internal}
        roles: [decide, respond, events]
        rate_limit: {per_second: 200, burst: 400}

Roles: ``decide`` (Decide), ``respond`` (RecordResponse), ``events`` (PublishEvent), ``profiles``
(ProfileService), ``operations`` (AdminService GetStatus and ReloadRules) and ``privacy`` (every other
AdminService method: ForgetCustomer, ExportCustomer and their jobs). The former ``admin`` is refused.

Certificate and token together:
- an entry naming both a certificate and a token needs both on the same call;
- a token that is sent must be known and unexpired, whatever certificate comes with it;
- a verified client certificate and a token of a caller that names no certificate: the token's caller is
  the identity (the more specific credential: a person's token on a shared desk machine's connection);
- a certificate alone identifies the entry whose ``common_name`` or ``san`` it carries and that names no
  token; a certificate that names no caller is refused with its CN and SANs in the message.
With ``--tls-client-ca`` every connection must present a certificate of that CA: grpcio asks for a client
certificate only by requiring it (``require_client_authentication=False`` does not ask at all, so no
certificate caller could be identified). Token-only callers then connect with any certificate of the CA
(their machine's) and are identified by their token. Without ``--tls-client-ca`` only tokens identify.

Where the checks run: gRPC calls the interceptor before it counts the call against the worker's
concurrency limit and before the request is parsed, so calls with an unknown, expired or missing token,
or a role they lack, get a handler that aborts at once without parsing the request. The client
certificate is visible only on the call's context, so certificate identities (and the rate limit, which
may need a Redis round trip) are checked first thing in the handler. Failures are logged with the peer
and method (never the token): the first per peer host, then one summary line per host every 10 s.

The file is checked for changes (mtime, size, inode) at most every ``RELOAD_CHECK_SECONDS``, on the
next call: revoking or adding a caller needs no restart. A changed file that does not load keeps the
previous policy, and the reason is logged once per change.

Rate limits: a token bucket per caller in Redis (``nba:rate:{caller}``, one Lua script on Redis's clock);
each worker takes leases of several tokens per round trip, so most calls never touch Redis. With Redis
unreachable each worker limits on its own at its share (1/workers) of the caller's rate, and says so in
the log. Without ``rate_limit`` a caller gets ``DEFAULT_RATE`` (2,000/s, burst 4,000: about twice what
one 2-core pod decides, so a runaway client cannot starve the others, while no single legitimate caller
meets it).

Without an auth file (loopback development), DecisionService, ProfileService, health and reflection are
open, and AdminService needs the local admin token: a random token ``nba serve`` keeps in
``<data dir>/admin.token`` (mode 0600), which the ``nba`` commands send to loopback addresses.
``--dev-open-admin`` opens AdminService too (a warning at start).

Outcomes: no or unknown credentials, an expired token ``UNAUTHENTICATED``; a role missing
``PERMISSION_DENIED``; over the caller's rate ``RESOURCE_EXHAUSTED``; each is counted per caller (a name
from the auth file: a bounded label) and the check is timed.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import grpc
import redis
import yaml
from prometheus_client import Counter, Histogram

from engine.config import Config
from engine.errors import NbaError
from engine.metrics import LATENCY_BUCKETS
from engine.serving import admission, error_details

log = logging.getLogger(__name__)

ADMIN = "/nba.v1.AdminService/"
ROLES = {
    "decide": ("/nba.v1.DecisionService/Decide",),
    "respond": ("/nba.v1.DecisionService/RecordResponse",),
    "events": ("/nba.v1.DecisionService/PublishEvent",),
    "profiles": ("/nba.v1.ProfileService/",),
    "operations": (ADMIN + "GetStatus", ADMIN + "ReloadRules"),
    "privacy": (ADMIN,),  # after operations: every other AdminService method
}
OPEN_SERVICES = {
    "health": ("/grpc.health.v1.Health/",),
    "reflection": ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/"),
}
DEFAULT_OPEN = ("health",)
# without an auth file: everything but AdminService, which needs the local admin token
LOCAL_OPEN = ("/nba.v1.DecisionService/", "/nba.v1.ProfileService/", *OPEN_SERVICES["health"],
              *OPEN_SERVICES["reflection"])
MAX_MESSAGE_BYTES = 1 << 20  # a Decide or an event is a few hundred bytes; nothing legitimate comes near
ANONYMOUS = "anonymous"
LOCAL_ADMIN = "local-admin"
ADMIN_TOKEN_FILE = "admin.token"
DEFAULT_RATE = (2000.0, 4000.0)  # per_second, burst: see the module docstring
RELOAD_CHECK_SECONDS = 0.25
FAILURE_LOG_SECONDS = 10.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

CALLER_REQUESTS = Counter("nba_grpc_caller_requests_total", "Calls by authenticated caller (a name from the auth "
                          "file, or unknown), method and result (ok, unauthenticated, permission_denied, "
                          "rate_limited).", ["caller", "method", "result"])
AUTH_SECONDS = Histogram("nba_grpc_auth_duration_seconds", "Time to identify and check the caller of one call.",
                         buckets=LATENCY_BUCKETS)

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("nba_caller", default=ANONYMOUS)


def current_caller() -> str:
    """The caller of the call this thread is serving (``anonymous`` for an open method)."""
    return _caller.get()


class SecurityError(NbaError):
    """A security setting that cannot be used: a bad auth file, missing certificates, an unsafe bind."""


# --- transport ------------------------------------------------------------------------------------

def _stamp(paths: tuple[Path, ...]) -> tuple:
    return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


class ServerCertificates:
    """The server's certificate and key (and the CA its clients' certificates must chain to, for mTLS),
    read again for the next handshake whenever a file changes: rotation without a restart. A rotation
    that cannot be read (half-written files) keeps the previous certificate and is tried again."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.files = tuple(p for p in (Path(cert), Path(key), Path(client_ca) if client_ca else None) if p is not None)
        self.client_ca = client_ca is not None
        for f in self.files:
            if not f.is_file():
                raise SecurityError(f"TLS file {f} not found")
        self._lock = threading.Lock()
        self._seen = _stamp(self.files)
        self._config = self._read()

    def _read(self) -> Any:
        cert, key = self.files[0].read_bytes(), self.files[1].read_bytes()
        ca = self.files[2].read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> Any:
        """Called by gRPC at every new TLS handshake: a new configuration when the files changed."""
        with self._lock:
            try:
                seen = _stamp(self.files)
                if seen == self._seen:
                    return None
                config = self._read()
            except (OSError, ValueError) as exc:
                log.warning("TLS files changed but cannot be read (%s); keeping the current certificate", exc)
                return None
            self._seen, self._config = seen, config
            log.info("TLS certificate reloaded from %s", self.files[0])
            return config

    def credentials(self) -> grpc.ServerCredentials:
        # grpcio either requires a verified client certificate or does not ask for one: there is no
        # "verify if presented" (measured), hence load_auth's refusal of token-only callers under mTLS
        return grpc.dynamic_ssl_server_credentials(self._config, self._fetch,
                                                   require_client_authentication=self.client_ca)


def is_loopback(address: str) -> bool:
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(address: str, tls: bool, auth: bool, insecure: bool) -> None:
    """Off loopback the service needs TLS and an auth file, unless ``--insecure`` says otherwise."""
    if is_loopback(address) or (tls and auth):
        return
    missing = " and ".join(w for w, ok in (("TLS (--tls-cert/--tls-key)", tls), ("--auth", auth)) if not ok)
    if not insecure:
        raise SecurityError(f"refusing to listen on {address} without {missing}: anyone who reaches it could read "
                            "and change customer data; add them, or --insecure to accept that")
    log.warning("listening on %s without %s (--insecure): every caller may call every method but AdminService's",
                address, missing)


def server_security(config: Config) -> tuple[ServerCertificates | None, AuthPolicy]:
    """The TLS certificates and the auth policy ``config`` asks for, checked (``SecurityError``). Without an
    auth file the policy is the local one (``local_policy``), with the data directory's admin token."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise SecurityError("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS with client certificates)")
    if config.dev_open_admin and config.auth_file:
        raise SecurityError("--dev-open-admin and --auth exclude each other: with an auth file its callers' roles "
                            "decide who may call AdminService")
    tls = ServerCertificates(config.tls_cert, config.tls_key, config.tls_client_ca) \
        if config.tls_cert and config.tls_key else None
    check_bind(config.grpc_address, tls is not None, config.auth_file is not None, config.insecure)
    if config.auth_file:
        policy = load_auth(config.auth_file)
        if config.tls_client_ca:
            tokens = [c.name for c in policy.callers if not c.needs_certificate]
            if tokens:
                log.warning("%s: caller(s) %s identify by token only; with --tls-client-ca they must still connect "
                            "with a certificate of that CA (grpcio cannot make client certificates optional)",
                            config.auth_file, ", ".join(tokens))
        else:
            lonely = [c.name for c in policy.callers if c.needs_certificate]
            if lonely:
                log.warning("%s: caller(s) %s identify by certificate, but without --tls-client-ca no client "
                            "certificate is asked for: they cannot call", config.auth_file, ", ".join(lonely))
        return tls, policy
    if config.dev_open_admin:
        log.warning("--dev-open-admin: AdminService (GetStatus, ReloadRules, ForgetCustomer, ExportCustomer) is "
                    "open to every local user and process without credentials; for development only")
        return tls, local_policy(None, open_admin=True)
    token = local_admin_token(config.data_dir)
    log.info("no --auth: AdminService needs the local admin token in %s (the nba commands send it on loopback)",
             Path(config.data_dir) / ADMIN_TOKEN_FILE)
    return tls, local_policy(token)


# --- the local admin token ---------------------------------------------------------------------------

def local_admin_token(data_dir: str | Path) -> str:
    """The data directory's admin token: made at the first start (``secrets.token_urlsafe``) and kept in
    ``admin.token``, readable by its owner only. A token file other users may read is refused: they
    could have copied it."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / ADMIN_TOKEN_FILE
    for _ in range(3):
        try:
            token = _read_token(path)
        except FileNotFoundError:
            pass
        else:
            if token:
                return token
        # written under a temporary name and linked into place: a reader never sees a half-written file,
        # and of two servers starting at once one token wins
        tmp = directory / f".{ADMIN_TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    raise SecurityError(f"{path}: cannot make the local admin token (the file stays empty)")


def _read_token(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise SecurityError(f"{path}: other users may read the local admin token (mode {mode & 0o777:o}); delete "
                            "the file (nba serve makes a new one) or chmod 600 it if no one else could have read it")
    return path.read_text().strip()


def read_local_admin_token(data_dir: str | Path) -> str | None:
    """The admin token a local ``nba serve`` keeps in ``data_dir`` (None when there is none), for the
    ``nba`` commands to send on loopback."""
    try:
        return _read_token(Path(data_dir) / ADMIN_TOKEN_FILE) or None
    except (FileNotFoundError, PermissionError):
        return None


# --- callers --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    name: str
    roles: frozenset[str]
    token_sha256: str = ""
    common_name: str = ""
    san: str = ""
    per_second: float = 0.0  # 0: no limit
    burst: float = 0.0
    expires: float | None = None  # epoch seconds; None: never

    @property
    def needs_certificate(self) -> bool:
        return bool(self.common_name or self.san)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def expiry(self) -> str:
        return datetime.fromtimestamp(self.expires or 0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def matches(self, common_names: list[str], sans: list[str]) -> bool:
        return bool((self.common_name and self.common_name in common_names) or (self.san and self.san in sans))


@dataclass(frozen=True)
class AuthPolicy:
    callers: tuple[Caller, ...]
    open: tuple[str, ...]  # method prefixes anyone may call
    path: Path | None = None  # the auth file, watched for changes; None: a fixed policy
    stamp: tuple = ()
    # how to get credentials, for the message to a caller that sent none
    hint: str = "send 'authorization: Bearer <token>' or a client certificate known to --auth"
    _tokens: dict[str, Caller] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._tokens.update({c.token_sha256: c for c in self.callers if c.token_sha256})

    def by_token(self, token: str) -> Caller | None:
        return self._tokens.get(token_hash(token))

    def by_certificate(self, common_names: list[str], sans: list[str]) -> Caller | None:
        """The certificate-only caller the certificate names."""
        return next((c for c in self.callers if not c.token_sha256 and c.matches(common_names, sans)), None)

    def is_open(self, method: str) -> bool:
        return method.startswith(self.open) if self.open else False



def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def local_policy(admin_token: str | None, open_admin: bool = False) -> AuthPolicy:
    """The policy without an auth file: all but AdminService open; AdminService for the holder of
    ``admin_token`` (the local admin token), or for anyone with ``open_admin`` (``--dev-open-admin``).
    With neither, AdminService is closed."""
    callers = (Caller(LOCAL_ADMIN, frozenset({"operations", "privacy"}), token_hash(admin_token)),) \
        if admin_token else ()
    return AuthPolicy(callers, LOCAL_OPEN + ((ADMIN,) if open_admin else ()),
                      hint="AdminService needs the local admin token: nba serve keeps it in <data dir>/"
                           f"{ADMIN_TOKEN_FILE} and the nba commands send it on loopback; send it as "
                           "'authorization: Bearer <token>' (or serve with --auth FILE, or --dev-open-admin)")


def _file_stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


def load_auth(path: Path) -> AuthPolicy:
    """The auth file; a ``SecurityError`` names the file and the entry at fault."""
    where = str(path)
    try:
        stamp = _file_stamp(Path(path))
        doc = yaml.safe_load(Path(path).read_text())
    # RecursionError: nested too deeply for the parser; ValueError: a date that is none (2026-13-01)
    except (OSError, yaml.YAMLError, RecursionError, ValueError) as exc:
        raise SecurityError(f"{where}: cannot read the auth file: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("callers"), list):
        raise SecurityError(f"{where}: expected a mapping with a 'callers' list")
    unknown = set(doc) - {"open", "rate_limit", "callers"}
    if unknown:
        raise SecurityError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (allowed: open, "
                            "rate_limit, callers)")
    opened = doc.get("open", list(DEFAULT_OPEN))
    if not isinstance(opened, list) or not all(isinstance(o, str) and o in OPEN_SERVICES for o in opened):
        raise SecurityError(f"{where}: open must be a list of {', '.join(OPEN_SERVICES)}")
    default_rate = _rate(doc.get("rate_limit"), f"{where}: rate_limit") or DEFAULT_RATE
    callers: list[Caller] = []
    names: set[str] = set()
    hashes: set[str] = set()
    for i, entry in enumerate(doc["callers"]):
        what = f"{where}: callers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise SecurityError(f"{what}: needs a name")
        if not _NAME.fullmatch(entry["name"]):
            raise SecurityError(f"{what}: name {entry['name'][:80]!r} must be 1-64 letters, digits, '.', '_' or '-' "
                                "(it names the caller in logs, metrics and Redis keys)")
        what = f"{where}: caller {entry['name']}"
        extra = set(entry) - {"name", "token_sha256", "certificate", "roles", "rate_limit", "expires"}
        if extra:
            raise SecurityError(f"{what}: unknown key(s) {', '.join(sorted(map(str, extra)))}")
        if entry["name"] in names:
            raise SecurityError(f"{what}: the name is used twice")
        names.add(entry["name"])
        roles = entry.get("roles")
        if isinstance(roles, list) and "admin" in roles:
            raise SecurityError(f"{what}: role admin was split into operations (GetStatus, ReloadRules) and "
                                "privacy (ForgetCustomer, ExportCustomer and their jobs): name the one(s) it needs")
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r in ROLES for r in roles):
            raise SecurityError(f"{what}: roles must be a list of {', '.join(ROLES)}")
        token = str(entry.get("token_sha256") or "").lower()
        if token and (len(token) != 64 or any(ch not in "0123456789abcdef" for ch in token)):
            raise SecurityError(f"{what}: token_sha256 must be 64 hex digits (the SHA-256 of the token, never the "
                                "token itself: nba auth token NAME prints both)")
        if token and token in hashes:
            raise SecurityError(f"{what}: the same token_sha256 as another caller")
        hashes.add(token)
        cert = entry.get("certificate") or {}
        if not isinstance(cert, dict) or not cert or set(cert) - {"common_name", "san"} \
                or not all(isinstance(v, str) and v for v in cert.values()):
            if cert or "certificate" in entry:
                raise SecurityError(f"{what}: certificate takes common_name and/or san (non-empty strings)")
        if not token and not cert:
            raise SecurityError(f"{what}: needs token_sha256 or certificate")
        per_second, burst = _rate(entry.get("rate_limit"), f"{what}: rate_limit") or default_rate
        callers.append(Caller(entry["name"], frozenset(roles), token, str(cert.get("common_name", "")),
                              str(cert.get("san", "")), per_second, burst,
                              check_expiry(entry.get("expires"), f"{what}: expires")))
    return AuthPolicy(tuple(callers), tuple(p for name in opened for p in OPEN_SERVICES[name]), Path(path), stamp)


def check_expiry(value: object, what: str) -> float | None:
    """An ``expires`` value as epoch seconds (None: never); ``SecurityError`` naming ``what`` otherwise."""
    if value is None:
        return None
    moment = value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        kind = "a date without a time" if isinstance(value, date) and not isinstance(value, datetime) else repr(value)
        raise SecurityError(f"{what}: expected a date and time with its zone, like 2027-03-01T00:00:00Z (got {kind})")
    return moment.timestamp()


def _rate(value: object, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"per_second", "burst"} \
            or not isinstance(value.get("per_second"), (int, float)) \
            or not isinstance(value.get("burst", 1), (int, float)):
        raise SecurityError(f"{what}: expected {{per_second: N, burst: M}}")
    per_second = float(value["per_second"])
    burst = float(value.get("burst", max(1.0, per_second)))
    if not (0 < per_second < math.inf) or not (1 <= burst < math.inf):
        raise SecurityError(f"{what}: per_second must be > 0 and burst >= 1")
    return per_second, burst


# --- rate limits ------------------------------------------------------------------------------------

class TokenBucket:
    def __init__(self, per_second: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second, self.burst, self.clock = per_second, burst, clock
        self.tokens, self.last = burst, clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.per_second)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


# KEYS[1] the caller's bucket; ARGV: per_second, burst, tokens wanted. Returns the tokens granted (0..wanted).
# Redis's clock, so workers and replicas with skewed clocks share one bucket.
_LEASE = """
redis.replicate_commands()
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(v[1]) or burst, tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local got = math.min(want, math.floor(tokens))
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens - got), 'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return got
"""
LEASE_SECONDS = 1.0  # unused leased tokens are dropped after this: a worker does not hoard the bucket


class SharedBucket:
    """One caller's rate, shared by every worker and replica through Redis. Tokens come in leases of
    about 1/20 s of the rate (at most a quarter of the burst), so a busy caller costs one round trip per
    lease; an empty bucket is not asked again before a token can have refilled. With Redis unreachable:
    a local bucket at ``share`` of the rate, Redis tried again every second."""

    def __init__(self, caller: Caller, client: Any, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.caller, self.client, self.share, self.clock = caller, client, share, clock
        self.key = f"nba:rate:{{{caller.name}}}"
        self.want = max(1, min(int(caller.per_second / 20), int(caller.burst / 4)))
        self.script = client.register_script(_LEASE) if client is not None else None
        self.local = TokenBucket(caller.per_second * share, max(1.0, caller.burst * share), clock)
        self.leased, self.lease_until, self.empty_until, self.down_until = 0, 0.0, 0.0, 0.0
        self.down = self.script is None
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            if self.leased > 0 and now < self.lease_until:
                self.leased -= 1
                return True
            if now < self.empty_until:
                return False
            if self.script is None or now < self.down_until:
                return self.local.take()
            try:
                got = int(self.script(keys=[self.key], args=[self.caller.per_second, self.caller.burst, self.want]))
            except redis.exceptions.RedisError as exc:
                self.down_until = now + 1.0
                if not self.down:
                    self.down = True
                    log.warning("rate limit of caller %s: Redis unreachable (%s); limiting in this worker at its "
                                "share (%.3g/s) until it answers", self.caller.name, exc,
                                self.caller.per_second * self.share)
                return self.local.take()
            if self.down:
                self.down = False
                log.info("rate limit of caller %s: shared through Redis again", self.caller.name)
            if got <= 0:
                self.empty_until = now + min(1.0, 1.0 / self.caller.per_second)
                return False
            self.leased, self.lease_until = got - 1, now + LEASE_SECONDS
            return True


# --- failed authentication in the log ------------------------------------------------------------------

class FailureLog:
    """Failed calls in the log with peer and method: the first per peer host at once, then one summary
    line per host per ``every`` seconds (at its next failure) with the count; at most ``hosts`` hosts tracked."""

    def __init__(self, every: float = FAILURE_LOG_SECONDS, hosts: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.hosts, self.clock = every, hosts, clock
        self.seen: dict[str, list] = {}  # host -> [window start, failures since, last method, last reason]
        self._lock = threading.Lock()

    def failed(self, peer: str, method: str, reason: str) -> None:
        host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer  # ipv4:1.2.3.4:5678 -> ipv4:1.2.3.4
        now = self.clock()
        with self._lock:
            entry = self.seen.get(host)
            if entry is None:
                if len(self.seen) >= self.hosts:
                    self.seen = {h: e for h, e in self.seen.items() if now - e[0] < self.every}
                    if len(self.seen) >= self.hosts:
                        host, entry = "other peers", self.seen.get("other peers")
                if entry is None:
                    self.seen[host] = [now, 0, method, reason]
                    log.warning("call refused: %s from %s: %s", method, host, reason)
                    return
            entry[1:] = [entry[1] + 1, method, reason]
            if now - entry[0] < self.every:
                return
            count, entry[0], entry[1] = entry[1], now, 0
        log.warning("calls refused: %d more from %s in the last %.0fs (last: %s: %s)", count, host, self.every,
                    method, reason)


# --- the interceptor -----------------------------------------------------------------------------------

def _role_of(method: str) -> str | None:
    return next((role for role, prefixes in ROLES.items() if method.startswith(prefixes)), None)


def _bearer(metadata: Iterable[Any] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return ""


def _certificate(context: grpc.ServicerContext) -> tuple[list[str], list[str]]:
    auth = context.auth_context()
    return ([v.decode(errors="replace") for v in auth.get("x509_common_name", ())],
            [v.decode(errors="replace") for v in auth.get("x509_subject_alternative_name", ())])


class Refusal(NbaError):
    """Why a call is refused: its status code, the message for the caller, and the caller's label."""

    def __init__(self, code: grpc.StatusCode, message: str, label: str = "unknown",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.label, self.retry_after = code, message, label, retry_after


RESULTS = {grpc.StatusCode.UNAUTHENTICATED: "unauthenticated", grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
           grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited"}


class CallerInterceptor(grpc.ServerInterceptor):
    """Identifies the caller of every call that is not open, checks its role for the method and its rate,
    and makes it ``current_caller()`` for the handler (the rules in the module docstring).

    ``policy``: a loaded auth file (reloaded when it changes) or a fixed policy. ``certificates``: the
    server requires client certificates (mTLS). ``client``: the Redis client rate limits are shared
    through (None: each worker limits alone, at ``share`` of each rate)."""

    def __init__(self, policy: AuthPolicy, certificates: bool = False, client: Any = None, share: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy, self.certificates, self.client, self.share, self.clock = policy, certificates, client, share, clock
        self.failures = FailureLog()
        self._buckets: dict[Caller, SharedBucket] = {}
        self._next_check = time.monotonic() + RELOAD_CHECK_SECONDS
        self._rejected: tuple = ()
        self._reload = threading.Lock()
        self._buckets_lock = threading.Lock()

    # the policy, reloaded when its file changed (checked at most every RELOAD_CHECK_SECONDS)
    def current(self) -> AuthPolicy:
        policy = self.policy
        now = time.monotonic()
        if policy.path is None or now < self._next_check or not self._reload.acquire(blocking=False):
            return policy
        try:
            self._next_check = now + RELOAD_CHECK_SECONDS
            try:
                stamp = _file_stamp(policy.path)
            except OSError as exc:
                stamp = ("missing", str(exc))
                if stamp != self._rejected:
                    self._rejected = stamp
                    log.error("auth file %s cannot be read (%s); keeping the previous callers", policy.path, exc)
                return policy
            if stamp in (policy.stamp, self._rejected):
                return policy
            try:
                new = load_auth(policy.path)
            except SecurityError as exc:
                self._rejected = stamp
                log.error("auth file changed but is refused, keeping the previous callers: %s", exc)
                return policy
            self.policy, self._rejected = new, ()
            log.info("auth file %s reloaded: %d callers (%s)", policy.path, len(new.callers),
                     ", ".join(c.name for c in new.callers))
            return new
        finally:
            self._reload.release()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        policy = self.current()
        method = handler_call_details.method
        if policy.is_open(method):
            return handler
        started = time.perf_counter()
        token = _bearer(handler_call_details.invocation_metadata)
        try:
            caller = self._by_token(policy, method, token) if token else None
            if caller is None and not token and not self.certificates:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"no credentials: {policy.hint}")
        except Refusal as refusal:
            AUTH_SECONDS.observe(time.perf_counter() - started)
            return self._refused(handler, method, refusal)
        return _wrap(handler, lambda context: self._admit(policy, method, token, caller, context))

    def _by_token(self, policy: AuthPolicy, method: str, token: str) -> Caller:
        """The token's caller, its expiry and role checked (``Refusal``); its certificate, if its entry
        names one, is checked in the handler."""
        caller = policy.by_token(token)
        if caller is None:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown token (revoked, mistyped or another server's); "
                          + policy.hint)
        if caller.expired(self.clock()):
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                          f"token of caller {caller.name} expired at {caller.expiry()}", caller.name)
        role = _role_of(method)
        if role is None or role not in caller.roles:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"caller {caller.name} may not call "
                          f"{method.rsplit('/', 1)[-1]}" + (f" (needs role {role})" if role else ""), caller.name)
        return caller

    def _admit(self, policy: AuthPolicy, method: str, token: str, caller: Caller | None,
               context: grpc.ServicerContext) -> str:
        """In the handler: the certificate (when the token's entry names one, or no token came), the rate;
        the caller's name, or the call aborted with the status that says why."""
        started = time.perf_counter()
        short = method.rsplit("/", 1)[-1]
        try:
            if caller is None or caller.needs_certificate:
                caller = self._by_certificate(policy, method, caller, context)
            if not self._bucket(caller).take():
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"caller {caller.name} is over its rate limit "
                              f"({caller.per_second:g}/s, burst {caller.burst:g})", caller.name,
                              retry_after=1 / caller.per_second)  # one token's refill
        except Refusal as refusal:
            AUTH_SECONDS.observe(time.perf_counter() - started)
            self._fail(context, method, refusal)
            raise AssertionError("unreachable: abort raises") from None
        AUTH_SECONDS.observe(time.perf_counter() - started)
        CALLER_REQUESTS.labels(caller.name, short, "ok").inc()
        return caller.name

    def _by_certificate(self, policy: AuthPolicy, method: str, by_token: Caller | None,
                        context: grpc.ServicerContext) -> Caller:
        names, sans = _certificate(context)
        sent = (", ".join([f"CN={n}" for n in names] + [f"SAN={s}" for s in sans]) or "none")[:300]
        if by_token is not None:
            if not by_token.matches(names, sans):
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"caller {by_token.name} needs its certificate too "
                              f"(certificate sent: {sent})", by_token.name)
            return by_token
        if (not names and not sans) or not any(c.needs_certificate for c in policy.callers):
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"no credentials: {policy.hint}")
        caller = policy.by_certificate(names, sans)
        if caller is None:
            both = next((c for c in policy.callers if c.matches(names, sans)), None)
            if both is not None:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"caller {both.name} needs its token too", both.name)
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"unknown caller: the certificate sent ({sent}) names no "
                                                           "caller of the auth file")
        if caller.expired(self.clock()):
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"caller {caller.name} expired at {caller.expiry()}",
                          caller.name)
        role = _role_of(method)
        if role is None or role not in caller.roles:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"caller {caller.name} may not call "
                          f"{method.rsplit('/', 1)[-1]}" + (f" (needs role {role})" if role else ""), caller.name)
        return caller

    def _bucket(self, caller: Caller) -> TokenBucket | SharedBucket:
        if not caller.per_second:
            return _UNLIMITED
        bucket = self._buckets.get(caller)
        if bucket is None:
            with self._buckets_lock:
                bucket = self._buckets.get(caller)
                if bucket is None:
                    # a reloaded file makes new Caller objects: forget the buckets of those gone
                    live = set(self.policy.callers)
                    self._buckets = {c: b for c, b in self._buckets.items() if c in live}
                    bucket = self._buckets[caller] = SharedBucket(caller, self.client, self.share)
        return bucket

    def _fail(self, context: grpc.ServicerContext, method: str, refusal: Refusal) -> None:
        short = method.rsplit("/", 1)[-1]
        CALLER_REQUESTS.labels(refusal.label, short, RESULTS.get(refusal.code, "refused")).inc()
        self.failures.failed(context.peer(), short, f"{refusal.code.name}: {refusal.message}")
        # reasons UNAUTHENTICATED, PERMISSION_DENIED, RATE_LIMITED
        reason = error_details.reason_of(refusal, RESULTS.get(refusal.code, "refused").upper())
        metadata = {"method": short} | ({"caller": refusal.label} if refusal.label != "unknown" else {})
        error_details.abort(context, refusal.code, refusal.message, reason, metadata=metadata,
                            retry_after=refusal.retry_after)

    def _refused(self, handler: grpc.RpcMethodHandler, method: str, refusal: Refusal) -> grpc.RpcMethodHandler:
        """A handler of ``handler``'s kind that aborts with ``refusal`` at once; the request bytes are
        never parsed (no deserializer) and a stream's messages never read."""

        @admission.refusal
        def refuse(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            self._fail(context, method, refusal)

        @admission.refusal
        def refuse_stream(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            self._fail(context, method, refusal)
            yield from ()

        codec = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(refuse, **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse, **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)


class _Unlimited:
    def take(self) -> bool:
        return True


_UNLIMITED: Any = _Unlimited()


def caller_interceptor(app: Any, auth: AuthPolicy | None, tls: ServerCertificates | None) -> CallerInterceptor:
    """``build_server``'s interceptor: ``auth`` (None: the local policy with AdminService closed, as no
    admin token was given), client certificates when ``tls`` requires them, rate limits shared through
    the app's Redis, each worker's share 1/workers when Redis is unreachable."""
    store = getattr(app, "store", None)
    config = getattr(app, "config", None)
    workers = max(1, int(getattr(config, "workers", 1) or 1))
    return CallerInterceptor(auth if auth is not None else local_policy(None),
                             certificates=tls is not None and tls.client_ca,
                             client=getattr(store, "client", None), share=1.0 / workers)


def _wrap(handler: grpc.RpcMethodHandler, admit: Callable[[grpc.ServicerContext], str]) -> grpc.RpcMethodHandler:
    """``handler`` with ``admit`` run first, and the caller's name current while it runs."""

    def guard(behavior):
        def run(request_or_iterator, context):
            reset = _caller.set(admit(context))
            try:
                return behavior(request_or_iterator, context)
            finally:
                _caller.reset(reset)

        def run_stream(request_or_iterator, context):
            reset = _caller.set(admit(context))
            try:
                yield from behavior(request_or_iterator, context)
            finally:
                _caller.reset(reset)

        return run, run_stream

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary)[0], **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary)[0], **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream)[1], **codec)
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream)[1], **codec)
