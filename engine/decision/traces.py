"""Traces of the decision funnel (OpenTelemetry): the process's tracer, the stage spans of a Decide and
the decision id its log lines carry.

Tracing is off until ``enable`` installs a tracer (``nba serve --traces``: ``serving/telemetry.py``):
until then ``tracer()`` is None and a decision pays one global read. The OpenTelemetry API is imported
only once tracing is on. Stage spans are made after the decision from the same clock reads that feed
``nba_decision_stage_duration_seconds`` (``funnel._Stages``), so the two cannot drift.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

STAGE_SPAN_PREFIX = "decide."

_tracer: Tracer | None = None
# the decision a log line belongs to, while one is known on this thread (funnel.decide sets it)
DECISION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("nba_decision_id", default="")


def tracer() -> Tracer | None:
    """The tracer of this process; None while tracing is off."""
    return _tracer


def enable(provider: Any) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``) from now on."""
    global _tracer
    _tracer = provider.get_tracer("engine", schema_url="https://opentelemetry.io/schemas/1.26.0")


def disable() -> None:
    global _tracer
    _tracer = None


def recording_span() -> Span | None:
    """The current span when tracing is on and it records (sampled), else None (cheap when off)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    span = trace.get_current_span()
    return span if span.is_recording() else None


def stage_spans(parent: Span, timings: Sequence[tuple[str, float]], starts: Sequence[float]) -> None:
    """Child spans of ``parent`` for the stages ``timings`` (name, seconds) that began at ``starts``
    (``time.perf_counter()``), placed on the wall clock."""
    if _tracer is None:
        return
    from opentelemetry import trace

    context = trace.set_span_in_context(parent)
    offset = time.time_ns() - time.perf_counter_ns()
    for (stage, seconds), start in zip(timings, starts):
        begin = int(start * 1e9) + offset
        # no attributes: the name says the stage, and each attribute costs as much as a quarter of a span
        span = _tracer.start_span(STAGE_SPAN_PREFIX + stage, context=context, start_time=begin)
        span.end(end_time=begin + int(seconds * 1e9))


def decided(span: Span, decision_id: str, channel: str, ruleset_version: str, model_version: str,
            degraded: bool) -> None:
    span.set_attributes({"nba.decision_id": decision_id, "nba.channel": channel,
                         "nba.ruleset_version": ruleset_version, "nba.model_version": model_version,
                         "nba.degraded": degraded})
