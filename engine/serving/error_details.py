"""The google.rpc error model on every error status the service returns (proto/README.md, "Errors").

Each error carries a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer with the same code
and message as the status itself, and in it: a ``google.rpc.ErrorInfo`` (``reason``, domain ``nba.v1``,
metadata such as the field), a ``google.rpc.BadRequest`` naming the field for INVALID_ARGUMENT, and a
``google.rpc.RetryInfo`` where the service knows how long to wait.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NoReturn

import grpc
from google.protobuf.any_pb2 import Any as AnyPb
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "nba.v1"

# The reasons (ErrorInfo.reason) the service gives; stable: clients branch on them. proto/README.md lists
# them with what a client should do.
INVALID_FIELD = "INVALID_FIELD"  # INVALID_ARGUMENT: the field named in BadRequest
MALFORMED_REQUEST = "MALFORMED_REQUEST"  # INVALID_ARGUMENT: bytes that do not parse, or no request message
PROFILE_EXISTS = "PROFILE_EXISTS"  # FAILED_PRECONDITION: create_only and the profile exists
PROFILE_STORE_UNAVAILABLE = "PROFILE_STORE_UNAVAILABLE"  # UNAVAILABLE: Redis down, stalled or refusing
INTERNAL = "INTERNAL"
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
RATE_LIMITED = "RATE_LIMITED"  # RESOURCE_EXHAUSTED: the caller is over its rate limit
OVERLOADED = "OVERLOADED"  # RESOURCE_EXHAUSTED: this worker sheds load
# NOT_FOUND without a reason of its own: "<THING>_NOT_FOUND" after the field (``not_found_reason``):
# ACTION_NOT_FOUND (not presented in that decision), JOB_NOT_FOUND. Errors that set ``reason`` themselves:
# DECISION_ID_MALFORMED, DECISION_UNKNOWN, DECISION_EXPIRED, OUTCOME_CONFLICT (engine/decision/responses.py)

# The least wait a client should make before retrying (it backs off further on its own). Shed calls:
# a worker's lane drains in a few milliseconds of decisions; Redis: the circuit breaker lets a probe
# through every 50 ms, but an outage that reaches callers is rarely over that soon.
OVERLOADED_RETRY_SECONDS = 0.1
UNAVAILABLE_RETRY_SECONDS = 1.0


def reason_of(exc: BaseException, default: str = "") -> str:
    """``exc``'s ``reason`` attribute (NbaError: on its class or the instance), else ``default``, else
    one derived from the class name (``ProfileExists`` -> ``PROFILE_EXISTS``)."""
    return getattr(exc, "reason", "") or default or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(exc).__name__).upper()


def not_found_reason(field: str) -> str:
    """``decision_id`` -> ``DECISION_NOT_FOUND``."""
    return f"{field.removesuffix('_id').upper() or 'RESOURCE'}_NOT_FOUND"


def status(code: grpc.StatusCode, message: str, reason: str, *, field: str = "",
           metadata: Mapping[str, str] | None = None, retry_after: float | None = None) -> grpc.Status:
    """The status to abort a call with: ``code`` and ``message`` as the caller sees them, and the details.
    ``field``: the request field at fault (ErrorInfo metadata ``field``; for INVALID_ARGUMENT a
    BadRequest violation described by ``message`` less its ``"<field>: "`` prefix)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})
    if field:
        info.metadata["field"] = field
    details = [info]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        prefix = f"{field or 'request'}: "
        description = message[len(prefix):] if message.startswith(prefix) else message
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field or "request", description=description)]))
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(retry)
    packed = []
    for detail in details:
        any_pb = AnyPb()
        any_pb.Pack(detail)
        packed.append(any_pb)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: str, *, field: str = "",
          metadata: Mapping[str, str] | None = None, retry_after: float | None = None) -> NoReturn:
    """``context.abort`` with the details (``status``); raises, as ``context.abort`` does."""
    context.abort_with_status(status(code, message, reason, field=field, metadata=metadata, retry_after=retry_after))
    raise AssertionError("unreachable: abort_with_status raises")
