"""What admission's message watchdog would cost a Decide: two gRPC servers on one App in one process,
one admitting nba.v1 calls as plain unary calls on their lane (what ``nba serve`` does), one running them
request-streaming under the watchdog that health checks and streams get; sequential Decides over
loopback, alternating turns, the first turn dropped as warm-up.

    python loadtest/admission_overhead.py --turns 12 --calls 300
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.serving.admission import Admission  # noqa: E402
from engine.serving.app import App  # noqa: E402
from engine.serving.server import build_server  # noqa: E402


class Watched(Admission):
    """nba.v1 calls run like health checks: request-streaming, their message awaited under the watchdog."""

    def _admit(self, method: str, handler: grpc.RpcMethodHandler, lane: Any) -> grpc.RpcMethodHandler:
        if lane is self.calls:
            lane = dataclasses.replace(self.calls)  # the same pool and limit, past the plain branch
        return super()._admit(method, handler, lane)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--calls", type=int, default=300, help="sequential Decides per server per turn")
    args = ap.parse_args()
    app = App(Config(data_dir=Path(tempfile.mkdtemp(prefix="nba-admission-")), demo=False)).start()
    servers: dict[str, tuple[grpc.Server, grpc.Channel]] = {}
    try:
        for name, admission in (("plain", Admission(16)), ("watchdog", Watched(16))):
            server, port, _ = build_server(app, "127.0.0.1:0", admission=admission)
            server.start()
            servers[name] = (server, grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = pb.DecideRequest(customer_id="C0000042", channel_name="call_center", touchpoint="bench",
                                   max_actions=3)
        took: dict[str, list[float]] = {name: [] for name in servers}
        for turn in range(args.turns):
            order = list(servers) if turn % 2 == 0 else list(reversed(servers))
            for name in order:
                stub = pb_grpc.DecisionServiceStub(servers[name][1])
                for _ in range(args.calls):
                    began = time.perf_counter()
                    stub.Decide(request, timeout=2)
                    if turn:
                        took[name].append(time.perf_counter() - began)
        p50 = {}
        for name, values in took.items():
            values.sort()
            p50[name] = values[len(values) // 2]
            q = {p: values[min(len(values) - 1, int(p * len(values)))] * 1e6 for p in (0.5, 0.99, 0.999)}
            print(f"{name:9s} n={len(values)} p50 {q[0.5]:.0f} us  p99 {q[0.99]:.0f} us  p99.9 {q[0.999]:.0f} us")
        print(f"p50 watchdog / plain: {p50['watchdog'] / p50['plain']:.3f}")
    finally:
        for server, channel in servers.values():
            channel.close()
            server.stop(0)
        app.close()


if __name__ == "__main__":
    main()
