"""grpc.health.v1 follows Redis: NOT_SERVING while this worker cannot reach Redis at all, SERVING again
when it can, so a load balancer stops sending it calls it could only answer degraded."""

from __future__ import annotations

import logging

import redis
from grpc_health.v1 import health, health_pb2

from engine.store.polling import Poller

log = logging.getLogger(__name__)

SERVICE_NAMES = ("", "nba.v1.DecisionService", "nba.v1.AdminService")


class RedisHealth(Poller):
    label = "health"

    def __init__(self, client: redis.Redis, servicer: health.HealthServicer, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.client = client
        self.servicer = servicer
        self.serving: bool | None = None

    def poll_once(self) -> int:
        try:
            self.client.ping()
            serving = True
        except redis.exceptions.RedisError as exc:
            serving = False
            if self.serving is not False:
                log.warning("Redis unreachable (%s): reporting NOT_SERVING", exc)
        if serving != self.serving:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in SERVICE_NAMES:
                self.servicer.set(name, status)
            if serving and self.serving is False:
                log.info("Redis reachable again: reporting SERVING")
            self.serving = serving
        return int(serving)
