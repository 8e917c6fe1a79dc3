"""A channel to the service as its callers should open one: the retry policy, TLS (mTLS) and a token."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc

# The client retry policy the README documents: a Decide, RecordResponse or PublishEvent that fails with
# UNAVAILABLE (or times out on a server that did the work) is safe to send again with the same
# interaction, decision or event id.
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "nba.v1.DecisionService", "method": "Decide"},
             {"service": "nba.v1.DecisionService", "method": "RecordResponse"},
             {"service": "nba.v1.DecisionService", "method": "PublishEvent"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
CLIENT_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]


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
                 options: list[tuple[str, object]] | None = None, retry: bool = True) -> grpc.Channel:
    """TLS when ``tls_ca`` is given (with a client certificate when ``tls_cert``/``tls_key`` are);
    ``token`` (default: env ``NBA_TOKEN``) is sent as a bearer token. ``retry`` False: no retry policy
    (a load generator counts every failure)."""
    options = (CLIENT_OPTIONS if retry else []) + list(options or [])
    if tls_ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes(),
            private_key=Path(tls_key).read_bytes() if tls_key else None,
            certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None)
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = token if token is not None else os.environ.get("NBA_TOKEN")
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel
