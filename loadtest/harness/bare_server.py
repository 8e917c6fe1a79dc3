"""The transport's ceiling: the service's gRPC server answering Decide with a fixed response, no work.

Two modes, doing the same work per ``Decide`` call: the request parsed by ``DecideRequest.FromString``,
a handler returning one prebuilt ``DecideResponse`` (three ranked actions of the demo catalog, with
treatments, reasons and versions, as a call-center decision carries them), serialised by
``SerializeToString`` as the real server does (``decide_handler``: one handler for both modes).

* default (sync): ``engine.serving.server.build_server`` itself (same options, per-call threads,
  admission and load shedding, the caller interceptor, health; no reflection, as ``nba serve`` without
  ``--reflection``); one extra interceptor, after build_server's admission and caller interceptors (as
  a real call passes them), hands ``Decide`` to ``decide_handler``, whose plain function runs on the
  call's thread. Other methods are the real ones: health answers; AdminService is refused, as no local
  admin token is given (``caller_interceptor``'s default policy).
* ``--aio``: a ``grpc.aio.server`` with ``build_server``'s channel options (``channel_options``),
  ``maximum_concurrent_rpcs`` = ``MAX_IN_FLIGHT`` and no thread pool: ``Decide`` comes from a generic
  handler (the first one registered) whose coroutine returns the response on the event loop; health
  (``grpc_health`` aio servicer) is registered, reflection and the admin service are not.

Both modes run ``gc.collect(); gc.freeze()`` once the response is built, before the server is built and
started, as ``nba serve`` does after its warm-up.

    python loadtest/bench_ceiling.py --serve-bare --address 127.0.0.1:50061
    python loadtest/bench_ceiling.py --serve-bare --aio --address 127.0.0.1:50062
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402

DECIDE = "/nba.v1.DecisionService/Decide"
DECISION_SERVICE, DECIDE_METHOD = DECIDE[1:].rsplit("/", 1)
DECIDED_AT = 1_764_547_200.123456  # a fixed instant and decision id: both modes send the very same bytes


def fixed_response(rules_dir: Path = ROOT / "rules", channel: str = "call_center") -> pb.DecideResponse:
    """A realistic answer: the first three offers of distinct groups that ``channel`` can show, with the
    fields, treatments and reasons a real decision fills; the same bytes every time (fixed time and id)."""
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
    now = DECIDED_AT
    actions = [RankedAction(action_id=a.id, name=a.name, type=a.type, group=a.group, propensity=0.1234 / (i + 1),
                            value=a.value, priority=0.1234 / (i + 1) * a.value,
                            treatment=dict(a.channels[channel]),
                            reasons=[f"propensity {0.1234 / (i + 1):.3f} x value {a.value:g}", "weight x1.2 (levers: loyal)"],
                            rank=i + 1)
               for i, a in enumerate(picked)]
    decision_id = new_decision_id(now, "C0000042")[:-16] + "5eed5eed5eed5eed"  # its random part fixed
    return decision_to_pb(Decision(
        decision_id=decision_id, customer_id="C0000042", channel=channel, actions=actions,
        ruleset_version=ruleset.version, model_version="v20261130-202424-907899", degraded=False, cold_start=False,
        situations=["high_value"], decided_at=now))


def decide_handler(response: pb.DecideResponse, asynchronous: bool) -> grpc.RpcMethodHandler:
    """``Decide`` for both modes: the request parsed and ``response`` serialised on every call; the behaviour
    is a plain function (the sync server runs it on its thread pool) or a coroutine (the aio server awaits
    it on its event loop; a plain function there would go to a default executor)."""

    def answer(request: pb.DecideRequest, context: grpc.ServicerContext) -> pb.DecideResponse:
        return response

    async def answer_async(request: pb.DecideRequest, context: Any) -> pb.DecideResponse:
        return response

    return grpc.unary_unary_rpc_method_handler(answer_async if asynchronous else answer,
                                               request_deserializer=pb.DecideRequest.FromString,
                                               response_serializer=pb.DecideResponse.SerializeToString)


class FixedDecide(grpc.ServerInterceptor):
    """Hands ``Decide`` to ``handler``; every other method goes on to the real handlers."""

    def __init__(self, handler: grpc.RpcMethodHandler) -> None:
        self.handler = handler

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
    server, port, _health = build_server(_NoApp(), address,  # type: ignore[arg-type]
                                         interceptors=[FixedDecide(decide_handler(response, asynchronous=False))])
    server.start()
    print(f"bare server on port {port}: Decide answers {response.ByteSize()} bytes", flush=True)
    stop.wait()
    server.stop(1).wait()


def serve_bare_aio(address: str) -> None:
    """The asyncio twin of ``serve_bare``, until SIGINT or SIGTERM."""
    from grpc_health.v1 import health, health_pb2_grpc

    from engine.serving.server import MAX_IN_FLIGHT, channel_options

    response = fixed_response()

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        gc.collect()
        gc.freeze()
        server = grpc.aio.server(options=channel_options(reuse_port=False), maximum_concurrent_rpcs=MAX_IN_FLIGHT)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            DECISION_SERVICE, {DECIDE_METHOD: decide_handler(response, asynchronous=True)}),))
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await server.start()
        print(f"bare aio server on port {port}: Decide answers {response.ByteSize()} bytes", flush=True)
        await stop.wait()
        await server.stop(1)

    asyncio.run(run())


def serve(address: str, aio: bool) -> int:
    """The bare server on ``address`` until SIGINT or SIGTERM (``aio``: the asyncio twin)."""
    if aio:
        serve_bare_aio(address)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve_bare(address, stop)
    return 0
