"""OpenTelemetry traces of the calls (a real server, the SDK's in-memory exporter) and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.decision import traces
from engine.serving import telemetry
from engine.store.redis_embedded import free_port

from .conftest import REPO, RULES_DIR

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STAGES = ["profile", "derive", "rules", "scoring", "arbitration", "logging"]


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process for one test, every span kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces.enable(provider)
    try:
        yield exporter
    finally:
        traces.disable()
        provider.shutdown()


def _decide(channel: grpc.Channel, metadata: tuple = (), **kw) -> pb.DecideResponse:
    kw.setdefault("channel", pb.CHANNEL_WEB)
    return pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(**kw), timeout=10, metadata=metadata)


def _stage_sums() -> dict[str, float]:
    return {s: REGISTRY.get_sample_value("nba_decision_stage_duration_seconds_sum", {"stage": s}) or 0.0 for s in STAGES}


def test_a_decide_is_a_server_span_with_the_funnel_stages_as_children(service, spans: InMemorySpanExporter) -> None:
    app, channel = service
    before = _stage_sums()
    reply = _decide(channel, (("traceparent", TRACEPARENT),), customer_id="C0000042", touchpoint="web.home.hero")
    after = _stage_sums()
    finished = spans.get_finished_spans()
    [rpc] = [s for s in finished if s.kind == SpanKind.SERVER]
    assert rpc.name == "nba.v1.DecisionService/Decide"
    assert format(rpc.context.trace_id, "032x") == TRACE_ID  # the caller's trace
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == PARENT_ID and rpc.parent.is_remote
    attrs = rpc.attributes or {}
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == "nba.v1.DecisionService"
    assert attrs["rpc.method"] == "Decide" and attrs["rpc.grpc.status_code"] == 0
    assert attrs["nba.decision_id"] == reply.decision_id
    assert attrs["nba.ruleset_version"] == reply.ruleset_version == app.rules.current.version
    assert attrs["nba.model_version"] == reply.model_version
    assert rpc.status.status_code == StatusCode.UNSET
    children = sorted((s for s in finished if s.parent is not None and s.parent.span_id == rpc.context.span_id),
                      key=lambda s: s.start_time or 0)
    assert [s.name for s in children] == [traces.STAGE_SPAN_PREFIX + s for s in STAGES]
    assert rpc.start_time is not None and rpc.end_time is not None
    for child in children:
        assert child.context.trace_id == rpc.context.trace_id
        assert child.start_time is not None and child.end_time is not None
        # within the call (the wall clock placed from perf_counter may differ by a microsecond)
        assert rpc.start_time - 5_000 <= child.start_time <= child.end_time <= rpc.end_time + 5_000
        # the same clock reads as the Prometheus stage histogram: they cannot drift apart
        stage = child.name.removeprefix(traces.STAGE_SPAN_PREFIX)
        assert (child.end_time - child.start_time) / 1e9 == pytest.approx(after[stage] - before[stage], abs=2e-6)
    for earlier, later in zip(children, children[1:]):
        assert earlier.end_time <= later.start_time + 1_000  # type: ignore[operator]


def test_a_call_without_traceparent_starts_a_trace_and_errors_carry_their_code(service, spans) -> None:
    _, channel = service
    _decide(channel, customer_id="C0000007")
    with pytest.raises(grpc.RpcError) as bad:
        _decide(channel, customer_id="")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["nba.v1.DecisionService/Decide"] * 2  # health checks are not traced
    ok, invalid = servers
    assert ok.parent is None
    assert (invalid.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert invalid.status.status_code == StatusCode.UNSET  # the caller's mistake, not the server's
    assert "nba.decision_id" not in (invalid.attributes or {})


def test_tracing_off_makes_no_spans(service) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces.disable()
    _, channel = service
    assert _decide(channel, (("traceparent", TRACEPARENT),), customer_id="C0000042").decision_id
    assert traces.tracer() is None and traces.recording_span() is None
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


def test_json_log_lines_carry_the_trace_span_and_decision_ids(spans) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(telemetry.JsonFormatter(worker=3))
    logger = logging.getLogger("engine.test_tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before any span")
        tracer = traces.tracer()
        assert tracer is not None
        with tracer.start_as_current_span("rpc") as span:
            named = traces.DECISION_ID.set("d-123")
            try:
                logger.warning("inside %s", "the decision")
            finally:
                traces.DECISION_ID.reset(named)
            logger.error("passed in extra", extra={"decision_id": "d-456"})
    finally:
        logger.removeHandler(handler)
    first, inside, extra = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "before any span" and first["level"] == "WARNING" and first["worker"] == 3
    assert first["logger"] == "engine.test_tracing" and first["time"].endswith("Z")
    assert "trace_id" not in first and "decision_id" not in first
    assert inside["message"] == "inside the decision" and inside["decision_id"] == "d-123"
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")
    assert extra["decision_id"] == "d-456" and extra["level"] == "ERROR"


def test_tracing_settings_are_checked() -> None:
    from engine.errors import NbaError

    with pytest.raises(NbaError, match="one of none, console, otlp"):
        telemetry.check_tracing("jaeger", 1.0)
    with pytest.raises(NbaError, match="ratio from 0 to 1"):
        telemetry.check_tracing("console", 1.5)
    assert telemetry.setup_tracing("none") is None and traces.tracer() is None
    telemetry.check_tracing("otlp", 0.1)  # the otel extra is installed with the test extra


def test_nba_serve_workers_log_json_and_trace_with_their_own_provider(redis_url: str, models_dir: Path,
                                                                      tmp_path: Path) -> None:
    """``nba serve --workers 2 --log-format json --traces console``: the supervisor's and the workers'
    log lines are JSON objects; the workers export the spans of the calls they answered."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"REDIS_URL": redis_url}
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--workers", "2", "--address", f"127.0.0.1:{port}",
             "--metrics-port", "0", "--rules-dir", str(RULES_DIR), "--models-dir", str(models_dir), "--no-demo",
             "--watch-rules", "0", "--data-dir", str(tmp_path / "data"), "--log-format", "json",
             "--traces", "console"], cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        while "nba serving on" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-4000:]
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(3):
                _decide(channel, (("traceparent", TRACEPARENT),), customer_id="C0000042")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in err.read_text().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message", "worker"} <= set(lines[0])
    workers = {entry["worker"] for entry in lines}
    assert None in workers and {0, 1} <= workers, workers  # the supervisor's lines and both workers'
    assert any(e["worker"] is None and "serving nba.v1" in e["message"] for e in lines)
    exported = out.read_text()  # the console exporter's JSON, flushed when each worker stopped
    assert exported.count('"name": "nba.v1.DecisionService/Decide"') == 3, exported[-3000:]
    assert f'"trace_id": "0x{TRACE_ID}"' in exported
    assert '"name": "decide.profile"' in exported and '"nba.worker": ' in exported


def test_otlp_exports_to_a_collector_over_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--traces otlp`` sends the spans to OTEL_EXPORTER_OTLP_ENDPOINT (here a real OTLP/gRPC receiver)."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

    received: list[otlp.ExportTraceServiceRequest] = []

    class Collector(otlp_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return otlp.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    provider = telemetry.setup_tracing("otlp", 1.0, worker=7)
    try:
        assert provider is not None
        tracer = traces.tracer()
        assert tracer is not None
        with tracer.start_as_current_span("nba.v1.DecisionService/Decide"):
            pass
    finally:
        telemetry.shutdown_tracing(provider)  # flushes the batch
        server.stop(0).wait()
    assert traces.tracer() is None
    [resource_spans] = [rs for r in received for rs in r.resource_spans]
    resource = {a.key: a.value for a in resource_spans.resource.attributes}
    assert resource["service.name"].string_value == "nba-engine" and resource["nba.worker"].int_value == 7
    assert [s.name for ss in resource_spans.scope_spans for s in ss.spans] == ["nba.v1.DecisionService/Decide"]


def test_a_refused_call_is_traced_and_still_refused_before_its_lane(service, spans) -> None:
    from engine.serving.server import build_server

    from .conftest import local_auth

    app, _ = service
    server, port, _ = build_server(app, "127.0.0.1:0", auth=local_auth())
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # no admin token: AdminService refuses
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.AdminServiceStub(plain).GetStatus(pb.GetStatusRequest(), timeout=5,
                                                          metadata=(("traceparent", TRACEPARENT),))
    finally:
        server.stop(0).wait()
    code = refused.value.code()
    assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    [span] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert span.name == "nba.v1.AdminService/GetStatus" and format(span.context.trace_id, "032x") == TRACE_ID
    assert (span.attributes or {})["rpc.grpc.status_code"] == code.value[0]
    # the traced behaviour keeps the refusal mark, so Admission still answers it on its shedding threads
    from engine.serving.admission import refusal
    from engine.serving.tracing import TracingInterceptor

    @refusal
    def refuse(request, context) -> None:
        pass

    class Details:
        method, invocation_metadata = "/nba.v1.AdminService/GetStatus", ()

    traced = TracingInterceptor().intercept_service(lambda _: grpc.unary_unary_rpc_method_handler(refuse), Details())
    assert traced.unary_unary is not refuse and traced.unary_unary.nba_refusal
