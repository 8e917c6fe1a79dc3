"""``nba serve``: the gRPC service on every core, plus the Prometheus endpoint.

With one worker everything runs in this process. With N workers this process is a supervisor: it
opens Redis (embedded or REDIS_URL), makes sure the demo data and model exist, then starts N worker
processes that each load the rules and model, warm every stage up and only then bind the shared port
(SO_REUSEPORT: the kernel spreads connections over them) and report SERVING. Metrics are collected
across workers through prometheus_client's multiprocess mode and served by this process. SIGINT or
SIGTERM drains in-flight calls in every worker, then stops Redis.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.context import SpawnProcess
from typing import TYPE_CHECKING

from engine.config import Config
from engine.errors import NbaError
from engine.serving import telemetry
from engine.store.redis_embedded import die_with_parent, free_port

if TYPE_CHECKING:  # the serving modules load numba and the rules: workers import them after the spawn
    from collections.abc import Iterator

    from grpc_health.v1.health import HealthServicer
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from engine.serving.app import App
    from engine.serving.health import RedisHealth, RedisOutage
    from engine.store.profiles import ProfileStore

log = logging.getLogger(__name__)


def stop_on_signals(stop: threading.Event, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """``signals`` set ``stop`` (call it on the main thread). A Python handler runs only when the main
    thread runs Python: blocked in ``stop.wait()`` while another thread took the signal it never does, and
    one that set the Event itself could be interrupted by a second signal while holding the Event's lock
    and wait for it for ever (Ctrl-C twice). So the interpreter's own C handler, in whatever thread the
    signal lands, writes its number to a pipe (``signal.set_wakeup_fd``) that a thread reads."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    wanted = {int(sig) for sig in signals}

    def relay() -> None:
        while not wanted.intersection(os.read(read_end, 64)):
            pass
        stop.set()

    threading.Thread(target=relay, name="nba-signals", daemon=True).start()
    for sig in signals:
        signal.signal(sig, lambda *_: None)  # a Python handler, so that the C handler writes to the pipe
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)


def serve(config: Config, stop: threading.Event | None = None, grace: float = 5.0) -> int:
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        stop_on_signals(stop)
    if config.workers <= 1:
        return _serve_here(config, stop, grace)
    return _supervise(config, stop, grace)


class _Archiving:
    """The archive writer on a thread of its own, with its own Redis client (long XRANGE reads are not the
    hot path's short deadlines)."""

    def __init__(self, config: Config, url: str) -> None:
        from engine.store.archive import ArchiveWriter
        from engine.store.profiles import redis_client

        self.stop_event = threading.Event()
        self.client = redis_client(url, config, timeout=30.0)
        self.writer = ArchiveWriter(self.client, config.archive_root())
        try:
            self.writer.open()
        except BaseException:
            self.client.close()
            raise
        self.thread = threading.Thread(target=self.writer.run, args=(self.stop_event,), name="nba-archive", daemon=True)
        self.thread.start()
        log.info("archiving the streams into %s", self.writer.root)

    @staticmethod
    def start(config: Config, url: str) -> _Archiving | None:
        from engine.store.archive import ArchiveError

        if config.archive == "off" or (config.archive == "auto" and config.redis_url is not None):
            return None
        try:
            return _Archiving(config, url)
        except ArchiveError as exc:  # a separate `nba archive run` holds this archive: it writes it, not us
            log.warning("not archiving here: %s", exc)
            return None

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30.0)  # the last flush is bounded (ArchiveWriter.run)
        self.writer.close()
        self.client.close()


def _announce(config: Config, port: int, detail: str) -> None:
    host = config.grpc_address.rsplit(":", 1)[0]
    metrics_at = f"http://{config.metrics_host}:{config.metrics_port}/metrics" if config.metrics_port else "off"
    log.info("serving nba.v1 on %s:%d, metrics %s, %s", host, port, metrics_at, detail)
    print(f"nba serving on {host}:{port} (metrics {metrics_at}); Ctrl-C stops", flush=True)


def _settle() -> None:
    """After warm-up: move everything loaded so far (modules, rules, models, JIT code) out of the
    garbage collector's reach, so collections during requests only walk what requests allocate; time
    them from now on (``nba_gc_pause_seconds``)."""
    from engine import metrics

    gc.collect()
    gc.freeze()
    metrics.time_gc()


def _serve_here(config: Config, stop: threading.Event, grace: float) -> int:
    from prometheus_client import start_http_server

    from engine.serving.security import server_security
    from engine.serving.server import build_server

    tls, auth = server_security(config)
    tracing = telemetry.setup_tracing(config.traces, config.trace_sample)
    app = _start_app(config, stop)
    if app is None:
        telemetry.shutdown_tracing(tracing)
        return 0
    http = None
    archiving = None
    try:
        archiving = _Archiving.start(config, app.redis_url)
        _settle()
        server, port, health = build_server(app, config.grpc_address, tls=tls, auth=auth,
                                            max_in_flight=config.max_in_flight, reflection=config.reflection)
        server.start()
        if config.metrics_port:
            http, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
        monitor = _watch_health(app, health)
        _announce(config, port, f"ruleset {app.rules.current.version}, model {app.model.current.version}"
                  + ("; Redis unreachable: answering degraded, readiness NOT_SERVING until it answers"
                     if app.redis_outage is not None else ""))
        stop.wait()
        log.info("stopping: draining in-flight calls (up to %.0fs)", grace)
        monitor.stop()
        health.enter_graceful_shutdown()
        server.stop(grace).wait()
        return 0
    finally:
        if archiving is not None:
            archiving.stop()
        if http is not None:
            http.shutdown()
        app.close()
        telemetry.shutdown_tracing(tracing)
        log.info("stopped")


def _start_app(config: Config, stop: threading.Event) -> App | None:
    """``App.start``, riding out an outage of an external Redis: one node is answered degraded at once; a
    cluster's client cannot exist before a node answers, so this waits for one (None: stopped meanwhile).
    Configuration errors (a wrong password, a failed TLS handshake) raise at once."""
    from engine.serving.app import App
    from engine.serving.health import RedisOutage

    delay = 1.0
    while True:
        app = App(config)
        try:
            return app.start(redis_outage_ok=True)
        except RedisOutage as outage:
            app.close()
            log.warning("%s: waiting for a Redis Cluster node to answer (next try in %.0f s)", outage, delay)
        except BaseException:
            app.close()
            raise
        if stop.wait(delay):
            return None
        delay = min(2 * delay, 30.0)


def _watch_health(app: App, health: HealthServicer) -> RedisHealth:
    """Liveness SERVING from now on; readiness follows Redis (engine/serving/health.py)."""
    from engine.serving.health import RedisHealth, live

    live(health)
    monitor = RedisHealth(app.store.client, health, on_reachable=app.redis_reachable)
    monitor.poll_once()
    return monitor.start()


def _worker(config: Config, index: int, ready: mp.Queue, grace: float) -> None:
    """One serving process; SIGTERM (from the supervisor or the service manager) makes it drain."""
    die_with_parent()
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    stop_on_signals(stop, (signal.SIGTERM,))
    telemetry.configure_logging(config.log_format, worker=index)
    from engine.serving.security import server_security
    from engine.serving.server import build_server

    app = None
    tracing = None
    try:
        tls, auth = server_security(config)
        tracing = telemetry.setup_tracing(config.traces, config.trace_sample, worker=index)  # its own, after the spawn
        app = _start_app(config, stop)  # rules compiled, JIT compiled or loaded from cache, stages warmed
        if app is None:
            return
        _settle()
        server, port, health = build_server(app, config.grpc_address, reuse_port=True, tls=tls, auth=auth,
                                            max_in_flight=config.max_in_flight, reflection=config.reflection)
        server.start()
        monitor = _watch_health(app, health)
        ready.put((index, os.getpid(), app.rules.current.version, app.model.current.version))
        stop.wait()
        monitor.stop()
        health.enter_graceful_shutdown()
        server.stop(grace).wait()
    except Exception as exc:
        if not isinstance(exc, NbaError):  # an NbaError's message says it all: the supervisor logs it
            log.exception("worker %d failed", index)
        ready.put((index, os.getpid(), None, f"{type(exc).__name__}: {exc}"))
    finally:
        if app is not None:
            app.close()
        telemetry.shutdown_tracing(tracing)


def _open_store(url: str, config: Config, external: bool,
                stop: threading.Event) -> tuple[ProfileStore | None, RedisOutage | None]:
    """A store on ``url`` and None when Redis answers; with the outage when an external Redis cannot be
    reached (one node: its client connects once it answers). A cluster's client needs a node's slot map,
    so for a cluster this waits until one answers ((None, outage): stopped meanwhile)."""
    from engine.serving.health import outage_or_raise
    from engine.store.profiles import ProfileStore, RedisUnavailable

    name = "REDIS_URL" if external else "embedded redis-server"
    delay = 1.0
    while True:
        try:
            return ProfileStore.open(url, config, name), None
        except RedisUnavailable as exc:
            if not external:
                raise
            outage = outage_or_raise(exc)
        try:
            return ProfileStore.from_url(url, config), outage
        except RedisUnavailable as exc:
            outage = outage_or_raise(exc)
        log.warning("%s: waiting for a Redis Cluster node to answer before starting workers (next try in %.0f s)",
                    outage, delay)
        if stop.wait(delay):
            return None, outage
        delay = min(2 * delay, 30.0)


class _Restarts:
    """When to restart a worker that exited: at once after it had served, with a growing pause (up to
    ``MAX_PAUSE`` s) while it keeps failing before it serves, so a broken start does not spin."""

    MAX_PAUSE = 30.0

    def __init__(self) -> None:
        self.failures: dict[int, int] = {}
        self.served: set[int] = set()  # the pids that reported SERVING
        self.next_try: dict[int, float] = {}

    def reported(self, ready: mp.Queue) -> None:
        """Logs what the restarted workers reported: serving again, or why they failed to start."""
        while True:
            try:
                index, pid, ruleset, model = ready.get_nowait()
            except queue.Empty:
                return
            if ruleset is None:
                log.error("worker %d (pid %d) failed to start: %s", index, pid, model)
            else:
                self.served.add(pid)
                self.failures.pop(index, None)
                log.info("worker %d (pid %d) serving again: ruleset %s, model %s", index, pid, ruleset, model)

    def due(self, index: int, proc: SpawnProcess) -> bool:
        """Whether to start the exited worker ``index`` again now."""
        now = time.monotonic()
        if index in self.next_try:
            if now < self.next_try[index]:
                return False
            del self.next_try[index]
            return True
        failures = 0 if proc.pid in self.served else self.failures.get(index, 0) + 1
        self.failures[index] = failures
        pause = min(self.MAX_PAUSE, 2.0 ** (failures - 1)) if failures else 0.0
        log.error("worker %d (pid %s) exited with %s: restarting it%s", index, proc.pid, proc.exitcode,
                  f" in {pause:.0f} s ({failures} failed starts in a row)" if pause else "")
        if pause:
            self.next_try[index] = now + pause
            return False
        return True


def _local_archive_metrics(registry: CollectorRegistry) -> None:
    """The supervisor's own archive metrics on its /metrics: this process loaded prometheus_client before
    it set PROMETHEUS_MULTIPROC_DIR, so they live in its memory, not in the workers' files."""
    from prometheus_client import values

    from engine import metrics

    if values.ValueClass is not values.MutexValue:
        return  # multiprocess values: the MultiProcessCollector reads them already
    parts = (metrics.ARCHIVE_LAG_ENTRIES, metrics.ARCHIVE_LAG_SECONDS, metrics.ARCHIVED_ENTRIES, metrics.ARCHIVE_FILES)

    class Collector:
        def collect(self) -> Iterator[Metric]:
            for part in parts:
                yield from part.collect()

    registry.register(Collector())


def _supervise(config: Config, stop: threading.Event, grace: float) -> int:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    from engine.authoring.check import prepare
    from engine.models.registry import ModelRegistry
    from engine.serving.app import ensure_demo, open_redis
    from engine.serving.security import server_security

    server_security(config)  # refuse a bad auth file, missing certificates or an unsafe bind once, here
    telemetry.check_tracing(config.traces, config.trace_sample)
    metrics_dir = tempfile.mkdtemp(prefix="nba-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the spawned workers
    redis_server, url = open_redis(config)
    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()
    workers: dict[int, SpawnProcess] = {}
    http = None
    archiving = None
    try:
        # a wrong password fails here, once, with one line (not in every worker); an unreachable REDIS_URL
        # is an outage to serve through (degraded), not a reason to stay down
        store, outage = _open_store(url, config, redis_server is None, stop)
        if store is None:
            return 0
        try:
            if outage is not None:
                log.warning("%s: starting %d workers anyway; they answer degraded (the channels' fallback "
                            "actions) with readiness NOT_SERVING until Redis answers, liveness SERVING%s", outage,
                            config.workers, "; demo data and model not checked" if config.demo else "")
            elif config.demo:
                rules = prepare(config.rules_dir)  # fail here, not in every worker, when the rules are broken
                try:
                    ensure_demo(store, ModelRegistry(config.models_dir, rules.schema), rules.ruleset,
                                config.demo_customers)
                finally:
                    rules.close()
        finally:
            store.client.close()
        host, _, port_text = config.grpc_address.rpartition(":")
        port = int(port_text) or free_port(host)
        # the workers join the same Redis: REDIS_URL, or the embedded server's URL with its password (the
        # Config reaches them through the spawn pipe, never argv or the environment); TLS files only for rediss://
        worker_config = dataclasses.replace(config, redis_url=url, demo=False, grpc_address=f"{host}:{port}")
        if redis_server is not None:
            worker_config.redis_ca = worker_config.redis_cert = worker_config.redis_key = None

        def spawn(index: int) -> None:
            proc = ctx.Process(target=_worker, args=(worker_config, index, ready, grace),
                               name=f"nba-worker-{index}")
            proc.start()
            workers[index] = proc

        archiving = _Archiving.start(config, url)
        for index in range(config.workers):
            spawn(index)
        versions = set()
        restarts = _Restarts()
        for _ in range(config.workers):
            index, pid, ruleset, model = ready.get(timeout=600)
            if ruleset is None:
                raise NbaError(f"worker {index} failed to start: {model}")
            versions.add((ruleset, model))
            restarts.served.add(pid)
        if config.metrics_port:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            _local_archive_metrics(registry)
            http, _ = start_http_server(config.metrics_port, addr=config.metrics_host, registry=registry)
        detail = ", ".join(f"ruleset {r}, model {m}" for r, m in sorted(versions))
        if outage is not None:
            detail += "; Redis unreachable at start: answering degraded, readiness NOT_SERVING until it answers"
        _announce(config, port, f"{config.workers} workers, {detail}")
        while not stop.wait(0.5):
            restarts.reported(ready)
            for index, proc in list(workers.items()):
                if not proc.is_alive() and restarts.due(index, proc):
                    multiprocess.mark_process_dead(proc.pid)
                    spawn(index)
        log.info("stopping: draining in-flight calls in %d workers (up to %.0fs)", len(workers), grace)
        return 0
    finally:
        for proc in workers.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + grace + 10
        for proc in workers.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        if archiving is not None:
            archiving.stop()
        if http is not None:
            http.shutdown()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("stopped")
