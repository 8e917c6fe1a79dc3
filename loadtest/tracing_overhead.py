"""What traces cost a Decide: one App, tracing off (what ``nba serve`` does by default) against tracing on,
every call sampled (``--sample``: a share), spans batched to an exporter that drops them (the SDK's whole cost, no network).
``--via grpc``: sequential Decides through a real server on loopback (the interceptor, the stage spans);
``--via direct``: the decision core called in-process inside a SERVER span, as the interceptor makes it.
Alternating turns (off, on / on, off), the first turn dropped as warm-up; customers cycle over the demo's.

    python loadtest/tracing_overhead.py --via grpc --turns 12 --calls 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.decision import traces  # noqa: E402
from engine.decision.request import DecideInput  # noqa: E402
from engine.serving.app import App  # noqa: E402
from engine.serving.server import build_server  # noqa: E402

CUSTOMERS = 2_000


class Dropped(SpanExporter):
    """Counts the spans and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def _quantiles(values: list[float]) -> dict[float, float]:
    values = sorted(values)
    return {p: values[min(len(values) - 1, int(p * len(values)))] * 1e6 for p in (0.5, 0.99, 0.999)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--via", choices=("grpc", "direct"), default="grpc")
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--calls", type=int, default=300, help="sequential Decides per mode per turn")
    ap.add_argument("--sample", type=float, default=1.0, help="tracing on: the share of calls sampled (nba serve --trace-sample)")
    args = ap.parse_args()
    app = App(Config(data_dir=Path(tempfile.mkdtemp(prefix="nba-tracing-")), demo_customers=CUSTOMERS,
                     metrics_port=0)).start()
    exporter = Dropped()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(args.sample)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    server = channel = None
    try:
        call: Callable[[int], object]
        if args.via == "grpc":
            server, port, _ = build_server(app, "127.0.0.1:0")
            server.start()
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = pb_grpc.DecisionServiceStub(channel)

            def call(i: int) -> object:
                return stub.Decide(pb.DecideRequest(customer_id=f"C{i % CUSTOMERS:07d}", channel_name="web",
                                                    touchpoint="bench", max_actions=3), timeout=2)
        else:
            def call(i: int) -> object:
                req = DecideInput(customer_id=f"C{i % CUSTOMERS:07d}", channel="web", touchpoint="bench", max_actions=3)
                tracer = traces.tracer()
                if tracer is None:
                    return app.engine.decide(req)
                with tracer.start_as_current_span("nba.v1.DecisionService/Decide", kind=SpanKind.SERVER):
                    return app.engine.decide(req)

        took: dict[str, list[float]] = {"off": [], "on": []}
        i = 0
        for turn in range(args.turns):
            for mode in (("off", "on") if turn % 2 == 0 else ("on", "off")):
                if mode == "on":
                    traces.enable(provider)
                else:
                    traces.disable()
                for _ in range(args.calls):
                    i += 1
                    began = time.perf_counter()
                    call(i)
                    if turn:
                        took[mode].append(time.perf_counter() - began)
        traces.disable()
        provider.force_flush()
        q = {mode: _quantiles(values) for mode, values in took.items()}
        for mode, values in took.items():
            print(f"tracing {mode:3s} n={len(values)} p50 {q[mode][0.5]:.0f} us  p99 {q[mode][0.99]:.0f} us  "
                  f"p99.9 {q[mode][0.999]:.0f} us")
        print("on / off: " + "  ".join(f"p{p * 100:g} {q['on'][p] / q['off'][p]:.3f}" for p in (0.5, 0.99, 0.999)))
        print(f"--via {args.via} --sample {args.sample:g}: spans exported {exporter.spans} "
              f"({exporter.spans / (args.turns * args.calls):.2f} a call with tracing on)")
    finally:
        provider.shutdown()
        if channel is not None:
            channel.close()
        if server is not None:
            server.stop(0)
        app.close()


if __name__ == "__main__":
    main()
