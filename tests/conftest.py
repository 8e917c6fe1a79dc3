"""Shared fixtures: a real redis-server on an ephemeral loopback port, rules, a small trained model."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from engine.serving.security import AuthPolicy, local_policy, read_local_admin_token
from engine.sim.telco import SCHEMA
from engine.store.redis_cluster import LocalCluster
from engine.store.redis_embedded import EmbeddedRedis

from .clock import on_test_calendar

REPO = Path(__file__).resolve().parent.parent
# The demo rules on the test calendar (tests/clock.py): what the tests decide with. A test about the
# files as written reads REPO / "rules".
_CALENDAR = Path(tempfile.mkdtemp(prefix="nba-test-rules-"))
atexit.register(shutil.rmtree, _CALENDAR, ignore_errors=True)
RULES_DIR = on_test_calendar(REPO / "rules", _CALENDAR / "rules")
# The local admin token of the suite's in-process servers (``local_auth``): AdminService needs it on
# loopback, as it needs <data dir>/admin.token from a real ``nba serve`` (``served_admin_token``).
ADMIN_TOKEN = "suite-local-admin-token"
# A test that uses one of these talks to a real redis-server, gRPC server or trained model.
SERVICE_FIXTURES = {"redis_server", "redis_url", "redis_admin_url", "redis_cluster", "models_dir", "service"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that need real services ``service``: ``pytest -m "not service"`` runs the rest
    (rule language, scorers, checker, layout) in seconds."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _add(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._add(details), request)


def local_auth() -> AuthPolicy:
    """The policy ``nba serve`` runs without an auth file, with ``ADMIN_TOKEN`` as the local admin token:
    ``build_server(app, address, auth=local_auth())``."""
    return local_policy(ADMIN_TOKEN)


def as_admin(channel: grpc.Channel, token: str = ADMIN_TOKEN) -> grpc.Channel:
    """``channel`` sending the local admin token with every call, as the nba commands do on loopback."""
    return grpc.intercept_channel(channel, _Bearer(token))


class Served(subprocess.Popen):
    """``nba serve`` in a child process with its output in a file: a pipe nobody reads fills up and blocks
    the service on its next log line. ``tail()`` is for assertion messages."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            super().__init__([sys.executable, "-m", "engine.cli", "serve", *args], cwd=REPO, env=env, stdout=out,
                             stderr=subprocess.STDOUT, text=True)

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def served_admin_token(data_dir: Path, timeout: float = 60.0) -> str:
    """The local admin token a ``nba serve --data-dir data_dir`` made (waits for it up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (token := read_local_admin_token(data_dir)) is None:
        assert time.monotonic() < deadline, f"no {data_dir}/admin.token within {timeout:.0f}s"
        time.sleep(0.05)
    return token


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedRedis:
    """The embedded server, with its users: ``url`` is the least-privilege service user's (what the tests'
    services run as), ``admin_url`` the admin user's."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server
    server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``both_redis`` runs on one Redis node and again on a Redis Cluster."""
    if "redis_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_redis"):
        metafunc.parametrize("redis_mode", ["node", "cluster"], indirect=True)


@pytest.fixture()
def redis_mode(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "node")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 masters and 3 replicas on loopback, shared by the tests that run on a cluster (not killed by them)."""
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture()
def redis_url(request: pytest.FixtureRequest, redis_mode: str) -> str:
    """A clean database for each test: on one node, or on the cluster for ``redis_mode`` "cluster". The URL
    is the service user's (least privilege, ``engine.store.redis_acl``); flushing is the admin user's."""
    if redis_mode == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        for port in cluster.master_ports():
            node = cluster.node(port)
            node.flushall()
            node.close()
        return cluster.url
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.admin_url)
    client.flushdb()
    client.close()
    return server.url


@pytest.fixture()
def redis_admin_url(request: pytest.FixtureRequest, redis_mode: str) -> str:
    """The admin user's URL for the same server or cluster as ``redis_url`` (CONFIG, BGREWRITEAOF, BGSAVE,
    CLIENT PAUSE, FLUSHDB: what the service user may not run)."""
    if redis_mode == "cluster":
        return request.getfixturevalue("redis_cluster").admin_url
    return request.getfixturevalue("redis_server").admin_url


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding a small demo model trained on the demo catalog (a few seconds)."""
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.sim import demo

    root = tmp_path_factory.mktemp("models")
    rules = load_and_compile(RULES_DIR)
    try:
        demo.train_demo(ModelRegistry(root, SCHEMA), rules.ruleset.actions, customers=6_000, rounds=60)
    finally:
        rules.close()
    return root


class AroundDecide(grpc.ServerInterceptor):
    """A server interceptor that runs ``around(decide, request, context)`` in place of each Decide."""

    def around(self, decide: Callable, request, context: grpc.ServicerContext):
        raise NotImplementedError

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith("/Decide"):
            return handler
        inner = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.around(inner, request, context),
                                                   request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


@pytest.fixture()
def rules_copy(tmp_path: Path) -> Path:
    """A copy of the demo rules (on the test calendar) the test may edit."""
    target = tmp_path / "rules"
    shutil.copytree(RULES_DIR, target)
    return target


@contextlib.contextmanager
def served_app(redis_url: str, models_dir: Path, rules_dir: Path, **config: object):
    """An App on a copy of the demo rules in ``rules_dir`` (made here), served by a real gRPC server in
    this process on an ephemeral loopback port, SERVING: yields (app, address)."""
    from grpc_health.v1 import health_pb2

    from engine.config import Config
    from engine.serving.app import App
    from engine.serving.server import build_server

    shutil.copytree(RULES_DIR, rules_dir)
    settings: dict = {"demo_customers": 1_000, "metrics_port": 0} | config
    app = App(Config(redis_url=redis_url, rules_dir=rules_dir, models_dir=models_dir, **settings)).start()
    try:
        server, port, health = build_server(app, "127.0.0.1:0", auth=local_auth())
        server.start()
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        try:
            yield app, f"127.0.0.1:{port}"
        finally:
            server.stop(0).wait()
    finally:
        app.close()


@pytest.fixture()
def service(redis_url: str, models_dir: Path, tmp_path: Path):
    """A real gRPC server (one process, in this one) on an ephemeral port: yields (app, channel)."""
    with served_app(redis_url, models_dir, tmp_path / "rules") as (app, address):
        plain = grpc.insecure_channel(address)
        yield app, as_admin(plain)  # the local admin token on every call, as the nba commands send it on loopback
        plain.close()


@contextlib.contextmanager
def two_workers(redis_url: str, rules_dir: Path, models_dir: Path,
                max_in_flight: int = 16) -> Iterator[tuple[list[grpc.Channel], int]]:
    """``nba serve --workers 2`` on ``redis_url``, and 8 or more channels with both workers among them
    (the kernel balances connections, not calls); yields the channels and the metrics port. A worker
    frees a call's slot only after its caller has the answer, so ``max_in_flight`` must exceed the
    callers one worker may get at once."""
    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.store.redis_embedded import free_port

    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"REDIS_URL": redis_url}
    data_dir = Path(tempfile.mkdtemp(prefix="nba-serve-data-"))  # where it keeps its local admin token
    proc = Served(["--workers", "2", "--address", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port),
                   "--rules-dir", str(rules_dir), "--models-dir", str(models_dir), "--customers", "200",
                   "--max-in-flight", str(max_in_flight), "--data-dir", str(data_dir)], env, data_dir / "serve.log")
    channels: list[grpc.Channel] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.tail()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, f"not serving within 120s\n{proc.tail()}"
                time.sleep(0.2)
        pids = set()
        token = served_admin_token(data_dir)
        for _ in range(40):  # fresh connections until both workers hold some
            ch = as_admin(grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]),
                          token)
            pids.add(pb_grpc.AdminServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10).worker_pid)
            channels.append(ch)
            if len(channels) >= 8 and len(pids) == 2:
                break
        assert len(pids) == 2
        yield channels, metrics_port
    finally:
        for ch in channels:
            ch.close()
        proc.terminate()
        try:
            proc.wait(30)
        finally:
            proc.kill()
            shutil.rmtree(data_dir, ignore_errors=True)
