"""Servers for the load tools: ``nba serve`` (this tree or another), the bare server, the wait for SERVING,
an embedded Redis seeded with the demo customers, and the CPU a process tree used (from /proc)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.store.redis_embedded import EmbeddedRedis, free_port  # noqa: E402

Servers = dict[str, tuple[subprocess.Popen, str]]  # name -> (process, address)


def default_models() -> str:
    """/tmp/nba-models when a champion was trained there (the load tools' habit), else ./models."""
    return "/tmp/nba-models" if Path("/tmp/nba-models/propensity/CHAMPION").is_file() else str(ROOT / "models")


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 300, channel: Any = None) -> None:
    """Until the gRPC health check at ``address`` says SERVING; exits if ``proc`` dies or time runs out.
    ``channel``: an already open channel to ask through (TLS, a token); default plaintext."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        if channel is None:
            channel = stack.enter_context(grpc.insecure_channel(address))
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server at {address} exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server at {address} not SERVING in {timeout:g}s")


def serve_command(address: str, *extra: str, workers: int = 1, models_dir: str | None = None,
                  demo: bool = False) -> list[str]:
    """``python -m engine.cli serve`` on ``address`` without a metrics port; ``--no-demo`` unless ``demo``."""
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--workers", str(workers), "--metrics-port", "0",
           "--address", address]
    if not demo:
        cmd.append("--no-demo")
    if models_dir:
        cmd += ["--models-dir", models_dir]
    return cmd + list(extra)


def bare_command(address: str, aio: bool = False) -> list[str]:
    """The bare transport server (``harness.bare_server``) on ``address``."""
    return [sys.executable, str(ROOT / "loadtest" / "bench_ceiling.py"), "--serve-bare", *(["--aio"] if aio else []),
            "--address", address]


def start(commands: dict[str, list[str]], redis_url: str | None = None, tree: Path = ROOT,
          trees: dict[str, Path] | None = None, output: Any = subprocess.DEVNULL,
          connect: Any = None) -> Servers:
    """Starts every command (name -> argv with ``--address``) at once and waits until all are SERVING.
    ``redis_url``: their REDIS_URL; ``trees``: a name's source tree (default ``tree``); ``connect(name,
    address)``: the channel to ask for health through (default plaintext); on failure all stop."""
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("REDIS_URL", None)
    if redis_url:
        env["REDIS_URL"] = redis_url
    servers: Servers = {}
    try:
        for name, cmd in commands.items():
            where = (trees or {}).get(name, tree)
            proc = subprocess.Popen(cmd, cwd=where, env=dict(env, PYTHONPATH=str(where)), stdout=output,
                                    stderr=subprocess.STDOUT if output is not subprocess.DEVNULL else subprocess.DEVNULL)
            servers[name] = (proc, cmd[cmd.index("--address") + 1])
        for name, (proc, address) in servers.items():
            if connect is None:
                wait_serving(address, proc)
            else:
                with connect(name, address) as channel:
                    wait_serving(address, proc, channel=channel)
    except BaseException:
        stop(servers)
        raise
    return servers


def stop(servers: Servers) -> None:
    """SIGTERM to all (they drain), then wait; a straggler after 60 s is killed."""
    for proc, _ in servers.values():
        proc.terminate()
    for proc, _ in servers.values():
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def loopback() -> str:
    """A free 127.0.0.1 address."""
    return f"127.0.0.1:{free_port()}"


@contextlib.contextmanager
def seeded_redis(customers: int) -> Iterator[EmbeddedRedis]:
    """An embedded Redis (no persistence) in a temporary directory, with ``customers`` demo customers."""
    from engine.sim import demo
    from engine.store.profiles import ProfileStore

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(tmp, persist=False) as server:
        demo.seed(ProfileStore.from_url(server.url), customers)
        yield server


@contextlib.contextmanager
def serving(commands: dict[str, list[str]], customers: int, **kwargs: Any) -> Iterator[Servers]:
    """``seeded_redis`` and ``start`` in one: the servers on the seeded Redis, stopped afterwards."""
    with seeded_redis(customers) as redis_server:
        servers = start(commands, redis_server.url, **kwargs)
        try:
            yield servers
        finally:
            stop(servers)


@contextlib.contextmanager
def embedded_serve(customers: int, *extra: str,
                   workers: int = os.cpu_count() or 1) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """``nba serve`` on its own embedded Redis in a temporary data directory with ``customers`` demo customers
    and the champion model in ./models (trained first if missing), once SERVING: (process, address, data
    directory; the Redis URL is in ``<data>/redis/redis.url``); its output in ``<data>/serve.log``."""
    with tempfile.TemporaryDirectory(prefix="nba-bench-") as tmp:
        address = loopback()
        cmd = serve_command(address, "--data-dir", tmp, "--customers", str(customers), *extra, workers=workers, demo=True)
        with open(Path(tmp) / "serve.log", "w") as output:
            servers = start({"serve": cmd}, output=output)
            try:
                yield servers["serve"][0], address, Path(tmp)
            finally:
                stop(servers)


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process, from /proc."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return stats


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (an ``nba serve`` supervisor's workers)."""
    return sorted(p for p, (parent, _) in _proc_stats().items() if parent == pid)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` and all its descendants (workers), from /proc."""
    stats = _proc_stats()
    tree = {pid}
    for _ in range(4):  # supervisor -> workers -> (none deeper today)
        tree |= {p for p, (parent, _) in stats.items() if parent in tree}
    return sum(stats.get(p, (0, 0.0))[1] for p in tree)


def worker_decides(pid: int) -> dict[int, float]:
    """Decide calls each worker of the ``nba serve`` supervisor ``pid`` has answered so far (worker pid ->
    count), from the workers' Prometheus multiprocess files: the spawned workers inherit the
    supervisor's PROMETHEUS_MULTIPROC_DIR and each writes ``counter_<pid>.db``. Empty for the bare server."""
    from prometheus_client.mmap_dict import MmapedDict

    counts: dict[int, float] = {}
    for child in children(pid):
        try:
            env = dict(v.split("=", 1) for v in (Path("/proc") / str(child) / "environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        path = Path(env.get("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")) / f"counter_{child}.db"
        if not path.is_file():
            continue
        keys = ((json.loads(key), value) for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)))
        counts[child] = sum(value for (_, name, labels, _), value in keys
                            if name == "nba_grpc_requests_total" and labels.get("method") == "Decide")
    return counts


def shares(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Each worker's share of the Decides answered between two ``worker_decides`` readings, largest first."""
    done = {p: after[p] - before.get(p, 0.0) for p in after}
    total = sum(done.values())
    return sorted((n / total for n in done.values()), reverse=True) if total else []


def cpu_ms_per_request(pid: int, before: float, requests: Sequence[int] | int) -> float:
    """Milliseconds of the tree's CPU since ``before`` (a ``tree_cpu_seconds`` reading) per request."""
    n = requests if isinstance(requests, int) else sum(requests)
    return (tree_cpu_seconds(pid) - before) * 1000 / n if n else float("nan")


@dataclass
class EngineParts:
    """What a ``DecisionEngine`` is built from, in this process: the store on a seeded embedded Redis, the
    compiled demo rules and the champion model (both live, as served)."""

    redis: EmbeddedRedis
    store: Any
    rules: Any
    model: Any


@contextlib.contextmanager
def engine_parts(customers: int, models_dir: str) -> Iterator[EngineParts]:
    """``EngineParts`` on a ``seeded_redis``; the rules closed afterwards."""
    from engine.live import Live
    from engine.models.registry import ModelRegistry
    from engine.rules.runtime import load_and_compile
    from engine.sim.telco import SCHEMA
    from engine.store.profiles import ProfileStore

    with seeded_redis(customers) as redis_server:
        rules = Live(load_and_compile(ROOT / "rules"), retire=lambda r: r.close())
        try:
            yield EngineParts(redis_server, ProfileStore.from_url(redis_server.url), rules,
                              Live(ModelRegistry(models_dir, SCHEMA).load()))
        finally:
            rules.current.close()
