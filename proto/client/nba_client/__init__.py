"""Slim client for the nba.v1 next-best-action API: the generated messages (``pb``) and stubs
(``pb_grpc``), the service's retry policy (``SERVICE_CONFIG``) and ``connect()``.

The stubs in ``nba_client/nba/v1`` are generated from ``proto/nba/v1/nba.proto`` by
``python -m engine.serving.protogen`` in the service's repository; do not edit them.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import grpc

from nba_client.nba.v1 import nba_pb2 as pb
from nba_client.nba.v1 import nba_pb2_grpc as pb_grpc

__all__ = ["SERVICE_CONFIG", "Client", "connect", "pb", "pb_grpc"]

# Decide, RecordResponse and PublishEvent are retried on UNAVAILABLE (safe with the same interaction,
# decision or event id): the same policy as the service's own client (engine/serving/client.py).
SERVICE_CONFIG: str = json.dumps(json.loads(resources.files(__name__).joinpath("service_config.json").read_text()))


@dataclass
class Client:
    """A channel with the retry policy and a stub per service; ``with connect(...) as c:`` closes it."""

    channel: grpc.Channel
    decisions: pb_grpc.DecisionServiceStub
    profiles: pb_grpc.ProfileServiceStub
    admin: pb_grpc.AdminServiceStub

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bearer(grpc.UnaryUnaryClientInterceptor):
    """``authorization: Bearer <token>`` on every call; gRPC refuses call credentials on a plaintext
    channel, even to loopback."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request)


def _loopback(address: str) -> bool:
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    if "/" in target or "," in target:
        return False
    if target.startswith("["):
        host = target[1:target.find("]")]
    else:
        host = target.rsplit(":", 1)[0] if target.count(":") == 1 else target
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(address: str, token: str | None = None, tls: bool | grpc.ChannelCredentials = False,
            root_certificates: bytes | None = None, options: list[tuple[str, Any]] | None = None) -> Client:
    """A client for the service at ``address`` ("host:port") with the retry policy.

    ``tls``: True for TLS verified against ``root_certificates`` (the system roots when None), or your own
    ``grpc.ssl_channel_credentials(...)`` (mTLS: give it your certificate and key). ``token``: the bearer
    token of your caller entry; refused (ValueError) on a plaintext channel off this machine, where
    anyone on the path could read it.
    """
    if token and tls is False and not _loopback(address):
        raise ValueError(f"refusing to send a bearer token to {address} in plaintext: use tls=True")
    opts = [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG), *(options or [])]
    if tls is False:
        channel = grpc.insecure_channel(address, options=opts)
    else:
        creds = tls if isinstance(tls, grpc.ChannelCredentials) else grpc.ssl_channel_credentials(root_certificates)
        channel = grpc.secure_channel(address, creds, options=opts)
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    return Client(channel, pb_grpc.DecisionServiceStub(channel), pb_grpc.ProfileServiceStub(channel),
                  pb_grpc.AdminServiceStub(channel))
