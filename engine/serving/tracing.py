"""A SERVER span for every unary call while tracing is on (``serving/telemetry.py``), parented by the
caller's W3C ``traceparent``; the Decide funnel's stages become its children.

Second in ``build_server``'s chain, after ``Admission``: calls shed by admission (RESOURCE_EXHAUSTED
before any thread runs them) get no span, calls refused by the credential check do (the span shows the
refusal). The span starts when the call's thread runs it, so time queued for a lane is not in it.
Health checks and streaming calls (reflection, Health.Watch) are not traced: probes every few seconds
would bury the calls that matter.
"""

from __future__ import annotations

import functools
from typing import Any

import grpc

from engine.decision import traces
from engine.serving.admission import refusal

HEALTH = "/grpc.health.v1.Health/"
# gRPC codes that make a server span an error (OpenTelemetry's RPC semantic conventions); the others
# (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's mistake, recorded in rpc.grpc.status_code only
SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                           grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


class TracingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        tracer = traces.tracer()
        method = handler_call_details.method
        if tracer is None or handler is None or handler.unary_unary is None or method.startswith(HEALTH):
            return handler
        inner = handler.unary_unary
        service, _, name = method[1:].rpartition("/")
        metadata = handler_call_details.invocation_metadata or ()

        def traced(request: Any, context: grpc.ServicerContext) -> Any:
            carrier = {k: v for k, v in metadata if k in ("traceparent", "tracestate") and isinstance(v, str)}
            parent = _otel().w3c.extract(carrier) if carrier else None
            with tracer.start_as_current_span(
                    method[1:], context=parent, kind=_otel().SpanKind.SERVER, record_exception=False,
                    set_status_on_exception=False,
                    attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}) as span:
                try:
                    reply = inner(request, context)
                except BaseException:
                    _status(span, context.code() or grpc.StatusCode.UNKNOWN, context.details())
                    raise
                _status(span, context.code() or grpc.StatusCode.OK, None)
                return reply

        if getattr(inner, "nba_refusal", False):
            traced = refusal(traced)
        return handler._replace(unary_unary=traced)


def _status(span: Any, code: grpc.StatusCode, details: Any) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERRORS:
        text = details.decode("utf-8", "replace") if isinstance(details, bytes) else details
        otel = _otel()
        span.set_status(otel.Status(otel.StatusCode.ERROR, text or code.name))


@functools.cache
def _otel() -> Any:
    """The OpenTelemetry API, imported once tracing is on (about 0.1 s: commands that import this module
    without serving do not pay it)."""
    from types import SimpleNamespace

    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # traceparent and tracestate only (the global propagator also parses baggage, at twice the cost)
    return SimpleNamespace(SpanKind=SpanKind, Status=Status, StatusCode=StatusCode,
                           w3c=TraceContextTextMapPropagator())
