"""`nba serve` as a real process: on the embedded default (a redis-server child, a clean stop), and on an
external REDIS_URL that goes away: started while it is unreachable, and through a 3-minute outage, the
worker stays alive (liveness) and answers degraded while readiness says it cannot answer in full."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.serving.health import LIVENESS, RedisOutage, outage_or_raise
from engine.store.profiles import ProfileStore, RedisUnavailable
from engine.store.redis_embedded import find_redis_server, free_port

from .conftest import REPO, RULES_DIR, Served

# Kubernetes restarts a pod after failureThreshold x periodSeconds of failed liveness probes: the review
# found pods crash-looping after two minutes of Redis outage. Three minutes outlasts that.
OUTAGE_SECONDS = 180
PASSWORD = "outage-test-password"


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


def _start(tmp_path: Path, models_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = Served(["--address", f"127.0.0.1:{port}", "--metrics-port", "0", "--data-dir", str(tmp_path / "data"),
                   "--models-dir", str(models_dir), "--customers", "500", *args], env, tmp_path / "serve.log")
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(address) as channel:
        while True:
            assert proc.poll() is None, proc.tail()
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, address
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"server not SERVING within 120s\n{proc.tail()}"
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


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_burst_of_signals_stops_the_server(tmp_path: Path, models_dir: Path, workers: str) -> None:
    """Ctrl-C pressed again and again, or SIGTERM from both a service manager and a script: a second
    signal while the first one's handler holds the stop event's lock used to hang the server."""
    proc, _ = _start(tmp_path, models_dir, "--workers", workers)
    try:
        for i in range(200):
            proc.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
        assert proc.wait(60) == 0, proc.tail()
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_stops_the_server_and_its_embedded_redis(tmp_path: Path, models_dir: Path) -> None:
    proc, address = _start(tmp_path, models_dir, "--archive", "auto")
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
        # the supervisor archived the streams (embedded Redis: --archive auto runs it), the last decision included
        files = list((tmp_path / "data" / "archive" / "decisions").glob("day=*/*.parquet"))
        assert reply.decision_id in {d for f in files for d in pq.read_table(f).column("decision_id").to_pylist()}
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


# --- an external Redis that goes away -------------------------------------------------------------------


class _Redis:
    """A password-protected redis-server on a fixed loopback port that a test stops and starts again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> _Redis:
        self.proc = subprocess.Popen(
            [find_redis_server(), "-", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"requirepass {PASSWORD}\n".encode())  # not on the command line
        self.proc.stdin.close()
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
                try:
                    client.ping()
                    return self
                except redis.exceptions.ConnectionError:
                    assert time.monotonic() < deadline, "redis-server not answering within 10s"
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # an outage, not a shutdown
            self.proc.wait(10)
            self.proc = None


def _status(address: str, service: str) -> str:
    """One Check on a connection of its own (as every probe makes): the status, or the RPC error's code."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _decide(address: str) -> pb.DecideResponse:
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return pb_grpc.DecisionServiceStub(channel).Decide(
            pb.DecideRequest(customer_id="C0000010", channel=pb.CHANNEL_CALL_CENTER), timeout=5)


def _wait_status(proc: subprocess.Popen, address: str, service: str, want: str, timeout: float,
                 in_a_row: int = 1) -> None:
    """Until ``in_a_row`` checks on fresh connections (several, to reach every worker) answer ``want``."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < in_a_row:
        assert proc.poll() is None, f"nba serve exited with {proc.returncode}"
        seen = seen + 1 if _status(address, service) == want else 0
        assert time.monotonic() < deadline, f"{service or 'readiness'} not {want} within {timeout:.0f}s"
        time.sleep(0.1)


def _serve_on(url: str, workers: int, tmp_path: Path, models_dir: Path) -> tuple[subprocess.Popen, str, Path]:
    """``nba serve --no-demo`` on REDIS_URL ``url``; returns once liveness answers SERVING. The output goes
    to a file: a pipe nobody reads would fill up with the outage's warnings and block the workers."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"REDIS_URL": url}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--workers", str(workers), "--address", f"127.0.0.1:{port}",
             "--metrics-port", "0", "--rules-dir", str(RULES_DIR), "--models-dir", str(models_dir), "--no-demo",
             "--watch-rules", "0", "--data-dir", str(tmp_path / "data")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        _wait_status(proc, address, LIVENESS, "SERVING", timeout=120)
    except BaseException:
        _stop(proc)
        raise AssertionError(log.read_text()[-4000:]) from None
    return proc, address, log


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()


def test_an_unreachable_redis_is_an_outage_a_refusal_is_not() -> None:
    """Unreachable (nothing listens, no cluster node answers): an outage to serve through. A wrong password
    or a URL that is none: configuration errors, raised as they are."""
    server = _Redis(free_port()).start()
    try:
        wrong = server.url.replace(PASSWORD, "wrong")
        with pytest.raises(RedisUnavailable, match="authentication failed") as refused:
            ProfileStore.open(wrong, name="REDIS_URL")
        with pytest.raises(RedisUnavailable, match="authentication failed"):
            outage_or_raise(refused.value)
        with pytest.raises(RedisUnavailable) as bad_url:
            ProfileStore.open("localhost:6379")
        with pytest.raises(RedisUnavailable):
            outage_or_raise(bad_url.value)
        nothing = free_port()
        for url in (f"redis://:{PASSWORD}@127.0.0.1:{nothing}/0", f"redis+cluster://:{PASSWORD}@127.0.0.1:{nothing}"):
            with pytest.raises(RedisUnavailable) as unreachable:
                ProfileStore.open(url)
            outage = outage_or_raise(unreachable.value)
            assert isinstance(outage, RedisOutage) and "***" in str(outage) and PASSWORD not in str(outage), url
    finally:
        server.stop()


def test_nba_serve_starts_without_redis_and_becomes_ready_when_it_answers(tmp_path: Path, models_dir: Path) -> None:
    """One process (`--workers 1`): up while nothing answers at REDIS_URL, deciding degraded with
    readiness NOT_SERVING; ready once Redis answers, and what had to wait for Redis (the ingest stream's
    consumer group) is there."""
    server = _Redis(free_port())
    proc, address, log = _serve_on(server.url, 1, tmp_path, models_dir)
    try:
        assert _status(address, "") == "NOT_SERVING" and _status(address, "nba.v1.DecisionService") == "NOT_SERVING"
        assert _decide(address).degraded
        server.start()
        _wait_status(proc, address, "", "SERVING", timeout=30)
        assert not _decide(address).degraded
        client = redis.Redis.from_url(server.url)
        try:
            assert [g["name"] for g in client.xinfo_groups("nba:stream:events:in")] == [b"nba-events"]
        finally:
            client.close()
    finally:
        _stop(proc)
        server.stop()
    text = log.read_text()
    assert "Redis unreachable: answering degraded" in text and PASSWORD not in text, text[-4000:]


def test_liveness_outlasts_a_three_minute_redis_outage_that_readiness_reports(tmp_path: Path,
                                                                             models_dir: Path) -> None:
    """`nba serve --workers 2` on a REDIS_URL that is down at start, comes up, goes away for three minutes
    and comes back. Probed as Kubernetes does (a new connection per check, so both workers answer):
    liveness SERVING throughout; readiness NOT_SERVING while Redis is away, SERVING otherwise; Decide
    answers all along, degraded during the outage. The one test of the suite that takes minutes."""
    server = _Redis(free_port())
    proc, address, log = _serve_on(server.url, 2, tmp_path, models_dir)
    try:
        assert _status(address, "") == "NOT_SERVING" and _decide(address).degraded
        server.start()
        _wait_status(proc, address, "", "SERVING", timeout=30, in_a_row=8)
        assert not _decide(address).degraded

        server.stop()
        start = time.monotonic()
        checks = decisions = 0
        next_decide = start
        while (now := time.monotonic()) - start < OUTAGE_SECONDS:
            assert proc.poll() is None, f"nba serve exited during the outage: {log.read_text()[-4000:]}"
            assert _status(address, LIVENESS) == "SERVING", f"liveness failed {now - start:.0f}s into the outage"
            if now - start > 3:  # each worker notices within its 0.5 s poll
                ready = _status(address, "")
                assert ready == "NOT_SERVING", f"readiness {ready} {now - start:.0f}s into the outage"
                checks += 1
            if now >= next_decide:
                assert _decide(address).degraded
                decisions += 1
                next_decide = now + 15
            time.sleep(1)
        assert checks >= OUTAGE_SECONDS // 3 and decisions >= OUTAGE_SECONDS // 15, (checks, decisions)

        server.start()
        _wait_status(proc, address, "", "SERVING", timeout=30, in_a_row=8)
        assert _status(address, LIVENESS) == "SERVING"
        assert not _decide(address).degraded
    finally:
        _stop(proc)
        server.stop()
    text = log.read_text()
    assert "starting 2 workers anyway" in text and "Redis reachable again: readiness SERVING" in text, text[-4000:]


def test_on_an_unreachable_redis_cluster_nba_serve_waits_and_stops_cleanly(tmp_path: Path) -> None:
    """A cluster client cannot exist before a node gives it the slot map, so `nba serve` waits for one
    (saying so) instead of exiting, and a SIGTERM meanwhile stops it at once."""
    nothing = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {
        "REDIS_URL": f"redis+cluster://:{PASSWORD}@127.0.0.1:{nothing}"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--workers", "2", "--address", f"127.0.0.1:{free_port()}",
             "--metrics-port", "0", "--no-demo", "--data-dir", str(tmp_path / "data")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "waiting for a Redis Cluster node" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.5)  # a second try
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert PASSWORD not in text and "Traceback" not in text, text
