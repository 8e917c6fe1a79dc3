"""Operating a serving process: its tracer provider and exporter (``nba serve --traces``, the OTEL_*
environment) and its log lines, as text or one JSON object each carrying the trace, span and decision ids.
The SDK is imported only when tracing is turned on."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from engine.decision import traces
from engine.errors import NbaError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TRACES_EXPORTERS = ("none", "console", "otlp")
LOG_FORMATS = ("text", "json")
SERVICE_NAME = "nba-engine"


def check_tracing(exporter: str, sample_ratio: float) -> None:
    """NbaError unless ``setup_tracing`` can work with these settings (the supervisor checks once)."""
    if exporter not in TRACES_EXPORTERS:
        raise NbaError(f"--traces {exporter!r} (OTEL_TRACES_EXPORTER): one of {', '.join(TRACES_EXPORTERS)}")
    if not 0.0 <= sample_ratio <= 1.0:
        raise NbaError(f"--trace-sample {sample_ratio} (OTEL_TRACES_SAMPLER_ARG): a ratio from 0 to 1")
    if exporter == "otlp":
        try:
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        except ImportError:
            raise NbaError("--traces otlp needs the OTLP exporter: pip install 'nba-engine[otel]'") from None


def setup_tracing(exporter: str, sample_ratio: float = 1.0, worker: int | None = None) -> TracerProvider | None:
    """A tracer provider for this process exporting with ``exporter`` (none: tracing stays off, None
    returned), sampling ``sample_ratio`` of the traces that start here; calls with a sampled incoming
    ``traceparent`` follow the caller's decision. OTEL_EXPORTER_OTLP_ENDPOINT (and the other OTEL_*
    exporter settings) configure the OTLP exporter; OTEL_SERVICE_NAME overrides the service name."""
    check_tracing(exporter, sample_ratio)
    if exporter == "none":
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    span_exporter: SpanExporter
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    else:
        span_exporter = ConsoleSpanExporter()
    attributes: dict[str, Any] = {"service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME,
                                  "process.pid": os.getpid()}
    if worker is not None:
        attributes["nba.worker"] = worker
    provider = TracerProvider(resource=Resource.create(attributes), sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    # spans are exported off the request threads, in batches; a full queue drops spans, never waits
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    traces.enable(provider)
    return provider


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Exports the spans still queued and stops tracing (a draining server's last calls included)."""
    if provider is not None:
        traces.disable()
        provider.shutdown()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, worker, and trace_id,
    span_id, decision_id when known (the current span's; a ``decision_id`` passed in ``extra``)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "worker": self.worker,
        }
        if traces.tracer() is not None:
            from opentelemetry import trace

            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                entry["trace_id"] = format(ctx.trace_id, "032x")
                entry["span_id"] = format(ctx.span_id, "016x")
        decision = getattr(record, "decision_id", None) or traces.DECISION_ID.get()
        if decision:
            entry["decision_id"] = decision
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: str | None = None, level: int = logging.INFO, worker: int | None = None) -> None:
    """The root logger's one handler (stderr): ``text`` lines or ``json`` objects (``log_format`` None:
    NBA_LOG_FORMAT, else text; a format not known: text, with a warning). Like ``logging.basicConfig`` it
    leaves a root logger that has handlers alone (a host program's, or pytest's when a test calls the CLI)."""
    if logging.getLogger().handlers:
        return
    wanted = log_format or os.environ.get("NBA_LOG_FORMAT") or "text"
    log_format = wanted if wanted in LOG_FORMATS else "text"
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = f" worker-{worker}" if worker is not None else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if wanted != log_format:
        logging.getLogger(__name__).warning("log format %r unknown (NBA_LOG_FORMAT): text lines; one of %s",
                                            wanted, ", ".join(LOG_FORMATS))
