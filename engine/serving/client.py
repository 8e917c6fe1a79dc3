"""A channel to the service as its callers should open one: the retry policy, TLS (mTLS) and a token.

A bearer token is sent only where it cannot be read on the way: over TLS, or in plaintext to a loopback
address (or a Unix socket). It comes from a file (``--token-file``) or ``NBA_TOKEN``, never from the
command line, which every local user can read (``ps``, ``/proc/PID/cmdline``)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import stat
from pathlib import Path

import grpc

from engine.errors import NbaError

log = logging.getLogger(__name__)

# The client retry policy proto/README.md documents: a Decide, RecordResponse or PublishEvent that fails with
# UNAVAILABLE (or times out on a server that did the work) is safe to send again with the same
# interaction, decision or event id. The slim client ships the same policy in
# proto/client/nba_client/service_config.json; tests/test_slim_client.py keeps the two equal.
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "nba.v1.DecisionService", "method": "Decide"},
             {"service": "nba.v1.DecisionService", "method": "RecordResponse"},
             {"service": "nba.v1.DecisionService", "method": "PublishEvent"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
CLIENT_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
MAX_TOKEN_FILE_BYTES = 4096


class ClientSecurityError(NbaError):
    """A client setting that would expose a credential: a token for a plaintext channel off loopback, a
    token file that cannot be used."""


def is_loopback_target(address: str) -> bool:
    """Whether a gRPC target names this machine only: a Unix socket, ``localhost``, or a loopback IP
    (``127.0.0.1:50051``, ``[::1]:50051``, ``dns:///localhost:50051``, ``ipv4:127.0.0.1:50051``)."""
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if "/" in target or "," in target:  # dns://AUTHORITY/host, or several addresses: not one local host
        return False
    if target.startswith("["):
        host = target[1:target.find("]")] if "]" in target else target
    elif target.count(":") == 1:
        host = target.rsplit(":", 1)[0]
    else:
        host = target  # no port, or a bare IPv6 address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed); ``ClientSecurityError`` naming the
    file when it cannot be read or holds no token. A file other local users may read is used with a
    warning (Kubernetes mounts secrets 0644 by default, in a container of one user)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ClientSecurityError(f"--token-file {path}: not a regular file")
        with path.open("rb") as f:
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ClientSecurityError(f"--token-file {path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ClientSecurityError(f"--token-file {path}: larger than {MAX_TOKEN_FILE_BYTES} bytes; expected one token")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ClientSecurityError(f"--token-file {path}: not a token (a token is printable ASCII)") from None
    if not token or any(not ch.isprintable() or ch.isspace() for ch in token):
        raise ClientSecurityError(f"--token-file {path}: expected one token on one line (no spaces)")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("--token-file %s can be read by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    return token


class _Bearer(grpc.UnaryUnaryClientInterceptor):
    """``authorization: Bearer <token>`` on every call (also on a plaintext loopback channel, where gRPC
    refuses call credentials)."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, details, request):
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request)


def open_channel(address: str, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, token: str | None = None,
                 options: list[tuple[str, object]] | None = None, retry: bool = True,
                 token_file: str | Path | None = None) -> grpc.Channel:
    """TLS when ``tls_ca`` is given (with a client certificate when ``tls_cert``/``tls_key`` are).
    The bearer token: ``token``, else the one in ``token_file``, else env ``NBA_TOKEN`` ("" for none);
    refused (``ClientSecurityError``) for a plaintext channel to an address off this machine.
    ``retry`` False: no retry policy (a load generator counts every failure)."""
    if token is None:
        token = read_token_file(token_file) if token_file else os.environ.get("NBA_TOKEN", "").strip()
    if token and not tls_ca and not is_loopback_target(address):
        raise ClientSecurityError(
            f"refusing to send a bearer token to {address} in plaintext: anyone on the path could read and "
            "replay it; give the CA of the server's certificate with --tls-ca (TLS), or call a loopback address")
    options = (CLIENT_OPTIONS if retry else []) + list(options or [])
    if tls_ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes(),
            private_key=Path(tls_key).read_bytes() if tls_key else None,
            certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel
