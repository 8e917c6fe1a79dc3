"""The transport's ceiling: the service's gRPC server answering Decide with a fixed response, no work.

The server is ``engine.serving.server.build_server`` itself (same options, thread pool, load shedding,
interceptors, health and reflection), started after the same ``gc.collect(); gc.freeze()`` as
``nba serve``; one extra interceptor answers ``Decide`` with a prebuilt ``DecideResponse`` (three
ranked actions of the demo catalog, with treatments, reasons and versions, as a call-center decision
carries them), parsing the request and serialising the response as the real server does. Other
methods (health, admin) are the real ones.

    python loadtest/bare_server.py --address 127.0.0.1:50061
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402

DECIDE = "/nba.v1.DecisionService/Decide"


def fixed_response(rules_dir: Path = ROOT / "rules", channel: str = "call_center") -> pb.DecideResponse:
    """A realistic answer: the first three offers of distinct groups that ``channel`` can show, with the
    fields, treatments and reasons a real decision fills."""
    from engine.decision.arbitration import RankedAction
    from engine.decision.contact import new_decision_id
    from engine.decision.funnel import Decision
    from engine.rules.loader import load_rules
    from engine.serving.server import decision_to_pb

    ruleset, errors = load_rules(rules_dir)
    if ruleset is None:
        raise SystemExit(f"rules in {rules_dir} do not load: {errors[0]}")
    picked: list[Any] = []
    for action in ruleset.actions:
        if channel in action.channels and action.group not in {a.group for a in picked}:
            picked.append(action)
        if len(picked) == 3:
            break
    now = time.time()
    actions = [RankedAction(action_id=a.id, name=a.name, type=a.type, group=a.group, propensity=0.1234 / (i + 1),
                            value=a.value, priority=0.1234 / (i + 1) * a.value,
                            treatment=dict(a.channels[channel]),
                            reasons=[f"propensity {0.1234 / (i + 1):.3f} x value {a.value:g}", "weight x1.2 (levers: loyal)"],
                            rank=i + 1)
               for i, a in enumerate(picked)]
    return decision_to_pb(Decision(
        decision_id=new_decision_id(now, "C0000042"), customer_id="C0000042", channel=channel, actions=actions,
        ruleset_version=ruleset.version, model_version="v20261130-202424-907899", degraded=False, cold_start=False,
        situations=["high_value"], decided_at=now))


class FixedDecide(grpc.ServerInterceptor):
    """Answers ``Decide`` with ``response``; every other method goes on to the real handlers."""

    def __init__(self, response: pb.DecideResponse) -> None:
        self.response = response
        self.handler = grpc.unary_unary_rpc_method_handler(
            lambda request, context: self.response,
            request_deserializer=pb.DecideRequest.FromString,
            response_serializer=pb.DecideResponse.SerializeToString)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method == DECIDE:
            return self.handler
        return continuation(handler_call_details)


class _NoApp:
    """``build_server`` only hands the app to the servicers; the fixed ``Decide`` never reaches them."""


def serve_bare(address: str, stop: threading.Event) -> None:
    from engine.serving.server import build_server

    response = fixed_response()
    gc.collect()
    gc.freeze()
    server, port, _health = build_server(_NoApp(), address, interceptors=[FixedDecide(response)])  # type: ignore[arg-type]
    server.start()
    print(f"bare server on port {port}: Decide answers {response.ByteSize()} bytes", flush=True)
    stop.wait()
    server.stop(1).wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", default="127.0.0.1:50061")
    args = ap.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve_bare(args.address, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
