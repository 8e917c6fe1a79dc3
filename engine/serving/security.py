"""Who may call what: TLS (mTLS) on the transport, callers identified by their client certificate or a
bearer token and limited to their roles, a request rate per caller.

The auth file (``nba serve --auth FILE``) maps identities to roles; it never holds a token, only its
SHA-256 (``nba auth token NAME`` makes one)::

    open: [health, reflection]         # methods anyone may call (default: both)
    rate_limit: {per_second: 2000, burst: 4000}   # per caller, unless the caller sets its own
    callers:
      - name: web-frontend
        token_sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
        roles: [decide, respond]
      - name: agent-desktop
        certificate: {common_name: agent-desktop}     # or {san: desktop.bank.internal}
        roles: [decide, respond, events]
        rate_limit: {per_second: 200, burst: 400}

Roles: ``decide`` (Decide), ``respond`` (RecordResponse), ``events`` (PublishEvent), ``profiles``
(ProfileService: creating and updating customer attributes), ``admin`` (AdminService). One interceptor
checks every call: no or unknown credentials ``UNAUTHENTICATED``, a role missing ``PERMISSION_DENIED``,
over the caller's rate ``RESOURCE_EXHAUSTED``; each outcome is counted per caller (a name from the auth
file: a bounded label) and the check is timed.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from prometheus_client import Counter, Histogram

from engine.config import Config
from engine.errors import NbaError
from engine.metrics import LATENCY_BUCKETS

log = logging.getLogger(__name__)

ROLES = {
    "decide": ("/nba.v1.DecisionService/Decide",),
    "respond": ("/nba.v1.DecisionService/RecordResponse",),
    "events": ("/nba.v1.DecisionService/PublishEvent",),
    "profiles": ("/nba.v1.ProfileService/",),
    "admin": ("/nba.v1.AdminService/",),
}
OPEN_SERVICES = {
    "health": ("/grpc.health.v1.Health/",),
    "reflection": ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/"),
}
MAX_MESSAGE_BYTES = 1 << 20  # a Decide or an event is a few hundred bytes; nothing legitimate comes near
ANONYMOUS = "anonymous"

CALLER_REQUESTS = Counter("nba_grpc_caller_requests_total", "Calls by authenticated caller (a name from the auth "
                          "file, or unknown), method and result (ok, unauthenticated, permission_denied, "
                          "rate_limited).", ["caller", "method", "result"])
AUTH_SECONDS = Histogram("nba_grpc_auth_duration_seconds", "Time to identify and check the caller of one call.",
                         buckets=LATENCY_BUCKETS)

_caller: contextvars.ContextVar[str] = contextvars.ContextVar("nba_caller", default=ANONYMOUS)


def current_caller() -> str:
    """The caller of the call this thread is serving (``anonymous`` without an auth file)."""
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
    log.warning("listening on %s without %s (--insecure): every caller may call every method", address, missing)


def server_security(config: Config) -> tuple[ServerCertificates | None, AuthPolicy | None]:
    """The TLS certificates and the auth policy ``config`` asks for, checked (``SecurityError``)."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise SecurityError("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        raise SecurityError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS with client certificates)")
    tls = ServerCertificates(config.tls_cert, config.tls_key, config.tls_client_ca) \
        if config.tls_cert and config.tls_key else None
    auth = load_auth(config.auth_file) if config.auth_file else None
    check_bind(config.grpc_address, tls is not None, auth is not None, config.insecure)
    return tls, auth


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


@dataclass(frozen=True)
class AuthPolicy:
    callers: tuple[Caller, ...]
    open: tuple[str, ...]  # method prefixes anyone may call

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tokens", {c.token_sha256: c for c in self.callers if c.token_sha256})

    def by_token(self, token: str) -> Caller | None:
        return self._tokens.get(hashlib.sha256(token.encode()).hexdigest())  # type: ignore[attr-defined]

    def by_certificate(self, common_names: list[str], sans: list[str]) -> Caller | None:
        for c in self.callers:
            if (c.common_name and c.common_name in common_names) or (c.san and c.san in sans):
                return c
        return None

    def is_open(self, method: str) -> bool:
        return method.startswith(self.open) if self.open else False


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_auth(path: Path) -> AuthPolicy:
    """The auth file; a ``SecurityError`` names the file and the entry at fault."""
    where = str(path)
    try:
        doc = yaml.safe_load(Path(path).read_text())
    # RecursionError: nested too deeply for the parser; ValueError: a date that is none (2026-13-01)
    except (OSError, yaml.YAMLError, RecursionError, ValueError) as exc:
        raise SecurityError(f"{where}: cannot read the auth file: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("callers"), list):
        raise SecurityError(f"{where}: expected a mapping with a 'callers' list")
    unknown = set(doc) - {"open", "rate_limit", "callers"}
    if unknown:
        raise SecurityError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: open, rate_limit, callers)")
    opened = doc.get("open", list(OPEN_SERVICES))
    if not isinstance(opened, list) or set(opened) - set(OPEN_SERVICES):
        raise SecurityError(f"{where}: open must be a list of {', '.join(OPEN_SERVICES)}")
    default_rate = _rate(doc.get("rate_limit"), f"{where}: rate_limit")
    callers, names, hashes = [], set(), set()
    for i, entry in enumerate(doc["callers"]):
        what = f"{where}: callers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise SecurityError(f"{what}: needs a name")
        what = f"{where}: caller {entry['name']}"
        extra = set(entry) - {"name", "token_sha256", "certificate", "roles", "rate_limit"}
        if extra:
            raise SecurityError(f"{what}: unknown key(s) {', '.join(sorted(extra))}")
        if entry["name"] in names:
            raise SecurityError(f"{what}: the name is used twice")
        names.add(entry["name"])
        roles = entry.get("roles")
        if not isinstance(roles, list) or not roles or set(roles) - set(ROLES):
            raise SecurityError(f"{what}: roles must be a list of {', '.join(ROLES)}")
        token = str(entry.get("token_sha256") or "").lower()
        if token and (len(token) != 64 or any(ch not in "0123456789abcdef" for ch in token)):
            raise SecurityError(f"{what}: token_sha256 must be 64 hex digits (the SHA-256 of the token, never the "
                                "token itself: nba auth token NAME prints both)")
        if token in hashes:
            raise SecurityError(f"{what}: the same token_sha256 as another caller")
        hashes.add(token)
        cert = entry.get("certificate") or {}
        if not isinstance(cert, dict) or set(cert) - {"common_name", "san"}:
            raise SecurityError(f"{what}: certificate takes common_name and/or san")
        if not token and not cert:
            raise SecurityError(f"{what}: needs token_sha256 or certificate")
        per_second, burst = _rate(entry.get("rate_limit"), f"{what}: rate_limit") or default_rate or (0.0, 0.0)
        callers.append(Caller(entry["name"], frozenset(roles), token, str(cert.get("common_name", "")),
                              str(cert.get("san", "")), per_second, burst))
    return AuthPolicy(tuple(callers), tuple(p for name in opened for p in OPEN_SERVICES[name]))


def _rate(value: object, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"per_second", "burst"} or not isinstance(value.get("per_second"),
                                                                                             (int, float)):
        raise SecurityError(f"{what}: expected {{per_second: N, burst: M}}")
    per_second = float(value["per_second"])
    burst = float(value.get("burst", per_second))
    if per_second <= 0 or burst < 1:
        raise SecurityError(f"{what}: per_second must be > 0 and burst >= 1")
    return per_second, burst


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


def _role_of(method: str) -> str | None:
    return next((role for role, prefixes in ROLES.items() if method.startswith(prefixes)), None)


class CallerInterceptor(grpc.ServerInterceptor):
    """Identifies the caller of every call (client certificate first, then ``authorization: Bearer``),
    checks its role for the method and its rate, and makes it ``current_caller()`` for the handler."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy
        self.buckets = {c.name: TokenBucket(c.per_second, c.burst) for c in policy.callers if c.per_second}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.policy.is_open(method):
            return handler
        token = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                token = value[7:].strip()
        return _wrap(handler, lambda context: self._admit(method, token, context))

    def _admit(self, method: str, token: str, context: grpc.ServicerContext) -> str:
        """The caller's name, or abort the call with the status that says why."""
        started = time.perf_counter()
        auth = context.auth_context()
        names = [v.decode() for v in auth.get("x509_common_name", ())]
        sans = [v.decode() for v in auth.get("x509_subject_alternative_name", ())]
        caller = (self.policy.by_certificate(names, sans) if names or sans else None) or (
            self.policy.by_token(token) if token else None)
        role = _role_of(method)
        short = method.rsplit("/", 1)[-1]
        if caller is None:
            AUTH_SECONDS.observe(time.perf_counter() - started)
            CALLER_REQUESTS.labels("unknown", short, "unauthenticated").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "unknown caller: send a client certificate or 'authorization: Bearer <token>' known to --auth"
                          if names or sans or token else "no credentials: send 'authorization: Bearer <token>' or a "
                          "client certificate")
        assert caller is not None
        if role is None or role not in caller.roles:
            AUTH_SECONDS.observe(time.perf_counter() - started)
            CALLER_REQUESTS.labels(caller.name, short, "permission_denied").inc()
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"caller {caller.name} may not call {short}" + (f" (needs role {role})" if role else ""))
        bucket = self.buckets.get(caller.name)
        if bucket is not None and not bucket.take():
            AUTH_SECONDS.observe(time.perf_counter() - started)
            CALLER_REQUESTS.labels(caller.name, short, "rate_limited").inc()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"caller {caller.name} is over its rate limit ({caller.per_second:g}/s)")
        AUTH_SECONDS.observe(time.perf_counter() - started)
        CALLER_REQUESTS.labels(caller.name, short, "ok").inc()
        return caller.name


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
