"""grpc.health.v1: liveness and readiness are different questions with different answers.

Liveness (service ``nba.liveness``): SERVING as long as this worker's gRPC server answers, whatever Redis
does and however loaded the worker is; a restart would not fix a Redis outage or an overload, it would
only turn degraded answers into none. Readiness (``""`` and the ``nba.v1`` service names): NOT_SERVING
while this worker cannot reach Redis, SERVING again when it can, so a load balancer sends its calls to
replicas that can answer them in full. Readiness does not follow load shedding: when every replica sheds,
taking them all out of the endpoints would turn an overload into an outage.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator

import redis
from grpc_health.v1 import health, health_pb2
from redis.exceptions import RedisClusterException

from engine.store.polling import Poller
from engine.store.profiles import RedisUnavailable

log = logging.getLogger(__name__)

LIVENESS = "nba.liveness"
READINESS = ("", "nba.v1.DecisionService", "nba.v1.AdminService", "nba.v1.ProfileService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RedisOutage(RedisUnavailable):
    """Redis could not be reached (refused, timed out, no such host, no cluster node answering): an
    outage to ride out. Refused credentials, a failed TLS handshake or a bad URL stay ``RedisUnavailable``:
    configuration errors that no waiting mends."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (raised while connecting, possibly wrapped) means Redis is unreachable rather
    than misconfigured. Anything that says the server answered and refused us is configuration."""
    causes = list(_chain(exc))
    down = (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError)  # the cluster is failing over
    refused = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
               redis.exceptions.ResponseError, ssl.SSLError, ValueError)
    if any(isinstance(e, refused) and not isinstance(e, down) for e in causes):
        return False
    # something listens and hangs up on us (plaintext to a TLS port): a configuration error to report at once
    if any(isinstance(e, ConnectionResetError) or "closed by server" in str(e) for e in causes):
        return False
    unreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, RedisClusterException,
                   *down)
    return any(isinstance(e, unreachable) and not isinstance(e, RedisUnavailable) for e in causes)


def outage_or_raise(exc: RedisUnavailable) -> RedisOutage:
    """``exc`` as a ``RedisOutage`` when it is one; else ``exc`` itself is raised (a configuration error)."""
    if isinstance(exc, RedisOutage):
        return exc
    if not is_outage(exc):
        raise exc
    outage = RedisOutage(str(exc))
    outage.__cause__ = exc
    return outage


def live(servicer: health.HealthServicer) -> None:
    """Liveness from now on: the server has started and answers."""
    servicer.set(LIVENESS, SERVING)


class RedisHealth(Poller):
    """Readiness of one worker: PINGs Redis every ``interval`` seconds and sets the readiness names.
    ``on_reachable`` runs (in this thread) each time Redis answers after not answering, and at the first
    answer: for the parts of the worker that could not start during an outage."""

    label = "health"

    def __init__(self, client: redis.Redis, servicer: health.HealthServicer, interval: float = 0.5,
                 on_reachable: Callable[[], None] | None = None) -> None:
        super().__init__(interval)
        self.client = client
        self.servicer = servicer
        self.on_reachable = on_reachable
        self.serving: bool | None = None

    def poll_once(self) -> int:
        try:
            self.client.ping()
            serving = True
        except (redis.exceptions.RedisError, RedisClusterException) as exc:
            serving = False
            if self.serving is not False:
                log.warning("Redis unreachable (%s): readiness NOT_SERVING, answering degraded; liveness stays "
                            "SERVING", " ".join(str(exc).split()))
        if serving and self.on_reachable is not None and self.serving is not True:
            try:
                self.on_reachable()
            except (redis.exceptions.RedisError, RedisClusterException) as exc:
                log.warning("Redis answered, but starting what waited for it failed (%s): trying again", exc)
                serving = False
        if serving != self.serving:
            for name in READINESS:
                self.servicer.set(name, SERVING if serving else NOT_SERVING)
            if serving and self.serving is False:
                log.info("Redis reachable again: readiness SERVING")
            self.serving = serving
        return int(serving)
