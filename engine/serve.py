"""``nba serve``: the gRPC server plus the Prometheus endpoint, stopped cleanly by SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

from grpc_health.v1 import health_pb2
from prometheus_client import start_http_server

from engine.app import App, Config
from engine.server import build_server

log = logging.getLogger(__name__)


def serve(config: Config, stop: threading.Event | None = None, grace: float = 5.0) -> int:
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    app = App(config)
    http = None
    try:
        app.start()
        server, port, health = build_server(app, config.grpc_address)
        server.start()
        if config.metrics_port:
            http, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
        for name in ("", "nba.v1.DecisionService", "nba.v1.AdminService"):
            health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = config.grpc_address.rsplit(":", 1)[0]
        metrics_at = f"http://{config.metrics_host}:{config.metrics_port}/metrics" if config.metrics_port else "off"
        log.info("serving nba.v1 on %s:%d, metrics %s, ruleset %s, model %s", host, port, metrics_at,
                 app.rules.current.version, app.model.current.version)
        print(f"nba serving on {host}:{port} (metrics {metrics_at}); Ctrl-C stops", flush=True)
        stop.wait()
        log.info("stopping: draining in-flight calls (up to %.0fs)", grace)
        health.enter_graceful_shutdown()
        server.stop(grace).wait()
        return 0
    finally:
        if http is not None:
            http.shutdown()
        app.close()
        log.info("stopped")
