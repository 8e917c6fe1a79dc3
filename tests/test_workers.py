"""`nba serve --workers 2`: two processes on one port, one /metrics scrape that sums them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.store.redis_embedded import free_port

from .conftest import Served, as_admin, served_admin_token


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _lint(port: int) -> None:
    """Prometheus naming conventions, and ``promtool check metrics`` when it is installed."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("nba_") or family.name.startswith(("process_", "python_")), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check


def test_two_workers_share_the_port_and_metrics_sum_across_them(tmp_path: Path, models_dir: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
    proc = Served(["--workers", "2", "--address", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port),
                   "--data-dir", str(tmp_path), "--models-dir", str(models_dir), "--customers", "500"],
                  env, tmp_path / "serve.log")
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.tail()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
                break  # the supervisor serves /metrics once every worker is SERVING
            except OSError:
                assert time.monotonic() < deadline, f"not serving within 120s\n{proc.tail()}"
                time.sleep(0.2)

        pids: dict[int, int] = {}
        calls = 0
        for attempt in range(60):  # fresh connections until both workers have answered several calls
            with as_admin(grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]),
                          served_admin_token(tmp_path)) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                pid = pb_grpc.AdminServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5).worker_pid
                stub = pb_grpc.DecisionServiceStub(channel)
                for k in range(3):
                    reply = stub.Decide(pb.DecideRequest(customer_id=f"C{(attempt * 3 + k) % 500:07d}",
                                                         channel=pb.CHANNEL_CALL_CENTER), timeout=10)
                    assert reply.actions
                pids[pid] = pids.get(pid, 0) + 3
                calls += 3
            if len(pids) == 2 and attempt >= 10:
                break
        assert len(pids) == 2, f"all calls reached one worker: {pids}"

        samples = _scrape(metrics_port)
        assert samples['nba_decisions_total{channel="call_center"}'] == calls
        assert samples['nba_decide_duration_seconds_count{channel="call_center"}'] == calls
        assert samples['nba_grpc_requests_total{code="OK",method="Decide"}'] == calls
        assert samples['nba_grpc_requests_total{code="OK",method="GetStatus"}'] == attempt + 1
        presented = sum(v for k, v in samples.items() if k.startswith("nba_actions_presented_total{"))
        assert presented >= calls
        assert any(k.startswith("nba_ruleset_info{") and v == 1 for k, v in samples.items())
        assert sum(v for k, v in samples.items() if k.startswith("nba_gc_pause_seconds_count{")) > 0  # calls allocate
        _lint(metrics_port)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


_GC_IN_A_METRIC = """
import gc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.multiprocess import MultiProcessCollector
from engine import metrics
metrics.time_gc()
gc.set_threshold(1)  # a collection on nearly every allocation, so some start inside prometheus_client's lock
counter = Counter("nba_probe_total", "labels made one after another", ["k"])
for i in range(300):
    counter.labels(str(i)).inc()
gc.set_threshold(700)
metrics.observe_decision("web", 0.001, [])
registry = CollectorRegistry()
MultiProcessCollector(registry)
print(sum(s.value for f in registry.collect() if f.name == "nba_gc_pause_seconds"
          for s in f.samples if s.name.endswith("_count")))
"""


def test_a_collection_inside_a_metric_update_is_timed_without_waiting_for_the_metrics_lock(tmp_path: Path) -> None:
    """A worker's collections start in whichever thread allocates, also one inside prometheus_client's
    multiprocess lock (building a new child's key): timing it there waited for that lock forever, and so
    did every thread of the worker touching a metric (Decide calls hung until their deadline)."""
    import sys

    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _GC_IN_A_METRIC], cwd=Path(__file__).resolve().parent.parent,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) > 0  # the pauses are in the histogram
