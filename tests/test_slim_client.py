"""The slim client package (proto/client: ``pip install ./proto/client``) installs with grpcio and protobuf
only, and calls a real server with the service's retry policy; its stubs and retry policy cannot drift
from the service's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import venv
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from engine.config import Config
from engine.serving.app import App
from engine.serving.client import RETRY_SERVICE_CONFIG
from engine.serving.protogen import CLIENT_DIR, generate
from engine.serving.server import build_server

from .conftest import ADMIN_TOKEN, REPO, RULES_DIR, local_auth

CLIENT = REPO / "proto" / "client"

SCRIPT = """
import sys
from nba_client import connect, pb

try:  # a token never goes out in plaintext off this machine
    connect("10.20.30.40:50051", token="secret")
    sys.exit("a token was accepted for a plaintext channel off loopback")
except ValueError:
    pass
with connect(sys.argv[1], token=sys.argv[2]) as client:
    reply = client.decisions.Decide(pb.DecideRequest(customer_id="C0000042", channel=pb.CHANNEL_WEB,
                                                     touchpoint="web.home.hero", max_actions=3), timeout=20)
    print("decision", reply.decision_id, *[a.action_id for a in reply.actions])
"""


def test_the_client_stubs_are_current() -> None:
    stale = [rel for rel, text in generate("nba_client").items()
             if not (CLIENT_DIR / rel).is_file() or (CLIENT_DIR / rel).read_text() != text]
    assert not stale, f"stale client stubs {stale} in {CLIENT_DIR}: run `python -m engine.serving.protogen`"


def test_the_client_retries_as_the_service_client_does() -> None:
    shipped = json.loads((CLIENT_DIR / "service_config.json").read_text())
    assert shipped == json.loads(RETRY_SERVICE_CONFIG), \
        "proto/client/nba_client/service_config.json and engine/serving/client.py's RETRY_SERVICE_CONFIG differ"


class UnavailableOnce(grpc.ServerInterceptor):
    """The first Decide fails with UNAVAILABLE (as from a worker going away): only a retry answers it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decides = 0

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler_call_details.method != "/nba.v1.DecisionService/Decide":
            return handler
        with self.lock:
            self.decides += 1
            first = self.decides == 1
        if not first:
            return handler

        def unavailable(request, context):  # type: ignore[no-untyped-def]
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker going away (test)")

        return grpc.unary_unary_rpc_method_handler(unavailable, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


@pytest.mark.service
def test_the_slim_client_installs_alone_and_decides_with_retries(redis_url: str, models_dir: Path,
                                                                  tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # a copy: pip builds in the source tree, and the build must not leave files in the repository
    source = tmp_path / "client-src"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    # pip on the real calendar: under .ci/shifted-clock a date 400 days ahead fails PyPI's TLS certificates
    real_clock = {k: v for k, v in env.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")}
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
                         env=real_clock, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert pip.returncode == 0, f"pip install ./proto/client failed:\n{pip.stdout}\n{pip.stderr}"

    absent = subprocess.run(
        [python, "-c", "import importlib.util as u; print(*[m for m in ('numba', 'lightgbm', 'durable', 'engine', "
                       "'grpc_tools') if u.find_spec(m)])"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert absent.returncode == 0 and absent.stdout.strip() == "", absent.stdout + absent.stderr

    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    app = App(Config(redis_url=redis_url, rules_dir=rules_dir, models_dir=models_dir, demo_customers=100,
                     metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0)).start()
    flaky = UnavailableOnce()
    server, port, health = build_server(app, "127.0.0.1:0", auth=local_auth(), interceptors=(flaky,))
    server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        script = tmp_path / "decide.py"
        script.write_text(SCRIPT)
        run = subprocess.run([python, str(script), f"127.0.0.1:{port}", ADMIN_TOKEN], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    finally:
        server.stop(0).wait()
        app.close()
    assert run.returncode == 0, run.stdout + run.stderr
    words = run.stdout.split()
    assert words[0] == "decision" and len(words) >= 3, run.stdout  # a decision id and at least one action
    assert flaky.decides == 2, f"expected one refused Decide and its retry, saw {flaky.decides} attempts"
