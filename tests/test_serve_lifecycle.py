"""`nba serve` on the embedded default: real process, real redis-server child, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.store.redis_embedded import free_port

from .conftest import REPO


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _start(tmp_path: Path, models_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--address", f"127.0.0.1:{port}", "--metrics-port", "0",
         "--data-dir", str(tmp_path / "data"), "--models-dir", str(models_dir), "--customers", "500"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(address) as channel:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, address
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server not SERVING within 120s"
            time.sleep(0.2)


def _redis_child(proc: subprocess.Popen) -> int:
    kids = [k for k in _children(proc.pid) if "redis-server" in Path(f"/proc/{k}/cmdline").read_text()]
    assert len(kids) == 1, kids
    return kids[0]


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_sigterm_stops_the_server_and_its_embedded_redis(tmp_path: Path, models_dir: Path) -> None:
    proc, address = _start(tmp_path, models_dir)
    try:
        redis_pid = _redis_child(proc)
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.DecisionServiceStub(channel).Decide(
                pb.DecideRequest(customer_id="C0000010", channel=pb.CHANNEL_CALL_CENTER), timeout=10)
        assert reply.actions and reply.model_version and reply.ruleset_version
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _wait_gone(redis_pid), "embedded redis-server outlived the server"
        assert list((tmp_path / "data" / "redis").glob("appendonly*")), "no append-only file written"
    finally:
        proc.kill()
        proc.wait()


def test_embedded_redis_dies_with_a_killed_server(tmp_path: Path, models_dir: Path) -> None:
    proc, _ = _start(tmp_path, models_dir)
    redis_pid = _redis_child(proc)
    proc.kill()
    proc.wait()
    assert _wait_gone(redis_pid), "embedded redis-server orphaned after kill -9 of the server"


def test_a_data_directory_serves_one_embedded_redis_at_a_time(tmp_path: Path) -> None:
    from engine.store.redis_embedded import DataDirInUse, EmbeddedRedis

    with EmbeddedRedis(tmp_path) as first:
        try:
            EmbeddedRedis(tmp_path).start()
        except DataDirInUse as busy:
            assert busy.url == first.url
        else:
            raise AssertionError("a second redis-server was started on the same data directory")
    with EmbeddedRedis(tmp_path):  # free again once the first has stopped
        pass
