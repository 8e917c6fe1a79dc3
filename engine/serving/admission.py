"""Admission: each kind of call has its own threads and its own limit, so no kind can starve another.

How grpcio's sync server (1.85, ``grpc/_server.py``) admits a call, which this module builds on:

* One polling thread takes every new call off the completion queue and, under the server's lock,
  first runs the interceptor chain (``_find_method_handler``: ``intercept_service`` runs there, with
  the method name and metadata only; no peer, no certificate, no request), then applies
  ``maximum_concurrent_rpcs`` (``concurrency_exceeded`` was computed before the interceptors ran; a
  call over it gets RESOURCE_EXHAUSTED without a thread), then submits the call to a thread pool.
* The pool is the server's, unless the handler's behaviour carries an ``experimental_thread_pool``
  (a ``ThreadPoolExecutor``): that one runs it. A call counts against ``maximum_concurrent_rpcs``
  from its submission until its pool future is done, so calls queued for a busy pool count too.
* In the pool thread a unary request is read before the behaviour runs: a caller that sends the
  headers and withholds the message holds a thread until its deadline or the connection's end. A
  streaming handler gets a lazy request iterator and runs at once; reflection then blocks in
  ``next(request_iterator)`` and ``Health.Watch`` in its own queue, each holding its thread as long
  as the caller keeps the stream open.

So here: the interceptor (first in the chain, in the polling thread) picks the lane of the call,
compares the lane's calls in flight with its limit and hands the call to the lane's own pool, or to a
small shedding pool that answers RESOURCE_EXHAUSTED at once without reading the request. Lane counts
are exact: a call counts from its submission to its pool until its future is done, whatever happens
in between (cancelled before its message came, rejected by the backstop before submission: never
counted). Health checks and streaming calls are made request-streaming, so the handler runs at once
and waits for the caller's message under a watchdog: a health check's message must arrive within
``HEALTH_MESSAGE_WAIT_SECONDS``, a streaming call ends ``stream_idle_seconds`` after the caller's last
message (ended calls are cancelled: the caller sees CANCELLED, the server logs
why). Health and streaming calls need no credentials, so one client host holds at most ``PER_HOST``
of either lane. Lanes: nba.v1 (and any other unary) calls ``max_in_flight``; ``Health.Check``
``HEALTH_CALLS``; streaming calls (reflection, ``Health.Watch``) ``MAX_STREAMS``.

The nba.v1 calls stay plain unary calls on their lane's threads: grpc reads the message before the
handler runs, so a caller that withholds it holds a thread until its deadline or the connection's
maximum age. Only callers past the credential check reach that lane (an unknown token is refused
before its message is read, mTLS admits only the CA's certificates), and the watchdog would cost about 3%
of a Decide's p50 (loadtest/bench_ceiling.py --ab admission: median ratio of five runs 1.03, range 0.96-1.05).

An interceptor that refuses a call (an unknown token) marks its behaviour with ``refusal``: it then
runs on the shedding threads, outside every lane, and its request is never read.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from engine import metrics
from engine.serving import error_details

log = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_CALLS = 4  # Health.Check calls at once per worker: probes (liveness, readiness, a load balancer)
MAX_STREAMS = 4  # streaming calls (reflection, Health.Watch) at once per worker
# of those, at once from one client host: health and reflection need no credentials, so one host must not
# hold them all (a kubelet runs a liveness and a readiness probe at once)
PER_HOST = 2
STREAM_IDLE_SECONDS = 10.0  # a streaming call ends this long after the caller's last message
HEALTH_MESSAGE_WAIT_SECONDS = 1.0  # a probe's request message must arrive this soon after its headers
SHED_THREADS = 2  # answer RESOURCE_EXHAUSTED (no request read, no handler run: microseconds each)
# calls queued for the shedding threads in a burst, on top of the lanes' threads, before grpc's own
# maximum_concurrent_rpcs (the backstop) refuses calls in the polling thread
SHED_QUEUE = 64


class _LanePool(futures.ThreadPoolExecutor):
    """A thread pool that knows how many calls it holds (submitted, not yet done)."""

    def __init__(self, threads: int, name: str) -> None:
        super().__init__(max_workers=threads, thread_name_prefix=f"grpc-{name}")
        self.held = 0
        self.taken = 0  # calls submitted since the start
        self._count = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        with self._count:
            self.held += 1
            self.taken += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: futures.Future | None) -> None:
        with self._count:
            self.held -= 1


@dataclass
class Lane:
    name: str
    what: str  # for the caller: "server busy: 16 calls at once ..."
    limit: int
    pool: _LanePool
    per_host: int = 0  # calls at once from one client host (0: no such limit)
    hosts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, name: str, what: str, limit: int, per_host: int = 0) -> Lane:
        if limit < 1:
            raise ValueError(f"{name}: the limit must be at least 1, not {limit}")
        return cls(name, what, limit, _LanePool(limit, name), min(per_host, limit))

    def full(self) -> bool:
        return self.pool.held >= self.limit

    @contextlib.contextmanager
    def host_slot(self, context: grpc.ServicerContext, method: str) -> Iterator[None]:
        """One of the caller's host's ``per_host`` slots for the call, or RESOURCE_EXHAUSTED at once."""
        if not self.per_host:
            yield
            return
        host = context.peer().rsplit(":", 1)[0]  # ipv4:10.1.2.3:PORT, ipv6:[::1]:PORT: the host, not the port
        with self.lock:
            held = self.hosts.get(host, 0)
            if held < self.per_host:
                self.hosts[host] = held + 1
        if held >= self.per_host:
            metrics.rpcs.inc(_short(method), "RESOURCE_EXHAUSTED")
            error_details.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self.per_host} {self.what} at once from {host} on this worker",
                                error_details.OVERLOADED, retry_after=error_details.OVERLOADED_RETRY_SECONDS,
                                metadata={"method": _short(method), "lane": self.name, "perHost": str(self.per_host)})
        try:
            yield
        finally:
            with self.lock:
                if self.hosts[host] <= 1:
                    del self.hosts[host]
                else:
                    self.hosts[host] -= 1


class _Watchdog:
    """Cancels calls whose time is up: one thread for all of them, started when the first call is
    armed and ended after a while with none (so servers built and dropped leave no thread behind)."""

    TICK = 0.1
    LINGER = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, grpc.ServicerContext, str, str]] = {}
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, until: float, context: grpc.ServicerContext, method: str, why: str, key: int | None = None) -> int:
        key = next(self._keys) if key is None else key
        with self._lock:
            self._due[key] = (until, context, method, why)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grpc-watchdog", daemon=True)
                self._thread.start()
        return key

    def disarm(self, key: int) -> None:
        with self._lock:
            self._due.pop(key, None)

    def _run(self) -> None:
        empty_since = time.monotonic()
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                late = [(key, entry) for key, entry in self._due.items() if entry[0] <= now]
                for key, _ in late:
                    del self._due[key]
                if self._due or late:
                    empty_since = now
                elif now - empty_since > self.LINGER:
                    self._thread = None
                    return
            for _, (_, context, method, why) in late:
                metrics.rpcs.inc(_short(method), "CANCELLED")
                log.info("ending %s from %s: %s", method, context.peer(), why)
                context.cancel()  # wakes the thread waiting for the message; the caller sees CANCELLED


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


F = TypeVar("F", bound=Callable[..., Any])


def refusal(behavior: F) -> F:
    """Marks an interceptor's behaviour that only refuses the call (``context.abort``, e.g. an unknown
    token): ``Admission`` runs it on the shedding threads, outside every lane, without reading the request."""
    behavior.nba_refusal = True  # type: ignore[attr-defined]
    return behavior


class Admission(grpc.ServerInterceptor):
    """First in the interceptor chain: the call's lane (nba.v1 and other unary methods; Health.Check;
    streaming calls) and its limit; over it RESOURCE_EXHAUSTED at once, counted in
    ``nba_grpc_requests_total``."""

    def __init__(self, max_in_flight: int, health_calls: int = HEALTH_CALLS, max_streams: int = MAX_STREAMS,
                 stream_idle_seconds: float = STREAM_IDLE_SECONDS,
                 per_host: int = PER_HOST) -> None:
        self.calls = Lane.of("calls", "calls", max_in_flight)
        self.health = Lane.of("health", "health checks", health_calls, per_host)
        self.streams = Lane.of("streams", "streaming calls (reflection, Health.Watch)", max_streams, per_host)
        self.shed = _LanePool(SHED_THREADS, "shed")
        self.stream_idle_seconds = stream_idle_seconds
        self.watchdog = _Watchdog()

    def backstop(self) -> int:
        """grpc's ``maximum_concurrent_rpcs``: every lane full and a burst queued for shedding."""
        return self.calls.limit + self.health.limit + self.streams.limit + SHED_THREADS + SHED_QUEUE

    def lane(self, method: str, handler: grpc.RpcMethodHandler) -> Lane:
        if handler.request_streaming or handler.response_streaming:
            return self.streams
        return self.health if method == HEALTH_CHECK else self.calls

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED, from grpc, without a thread
        method = handler_call_details.method
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if getattr(behavior, "nba_refusal", False):
            return self._refuse(behavior, handler)
        lane = self.lane(method, handler)
        if lane.full():
            return self._shed(method, handler, lane)
        return self._admit(method, handler, lane)

    def _refuse(self, behavior: Callable[..., Any], handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        def answer(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            result = behavior(requests, context)  # the request is never read
            if inspect.isgenerator(result):
                for _ in result:
                    pass

        answer.experimental_thread_pool = self.shed  # type: ignore[attr-defined]
        return grpc.stream_unary_rpc_method_handler(answer, response_serializer=handler.response_serializer)

    def _shed(self, method: str, handler: grpc.RpcMethodHandler, lane: Lane) -> grpc.RpcMethodHandler:
        short = _short(method)
        details = f"server busy: {lane.limit} {lane.what} at once on this worker; retry with backoff"

        def answer(_requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            metrics.rpcs.inc(short, "RESOURCE_EXHAUSTED")
            error_details.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, details, error_details.OVERLOADED,
                                metadata={"method": short, "lane": lane.name, "limit": str(lane.limit)},
                                retry_after=error_details.OVERLOADED_RETRY_SECONDS)

        answer.experimental_thread_pool = self.shed  # type: ignore[attr-defined]
        return grpc.stream_unary_rpc_method_handler(answer, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)

    def _admit(self, method: str, handler: grpc.RpcMethodHandler, lane: Lane) -> grpc.RpcMethodHandler:
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary and lane is self.calls:
            inner_plain = handler.unary_unary
            # grpc reads the message before the behaviour runs; the watchdog below costs about 3% of a
            # Decide's p50, and only callers that passed the credential check (or loopback without
            # --auth) reach this lane, so a withheld message is bounded by its deadline and max_connection_age
            def plain(request: Any, context: grpc.ServicerContext) -> Any:
                return inner_plain(request, context)

            plain.experimental_thread_pool = lane.pool  # type: ignore[attr-defined]
            return grpc.unary_unary_rpc_method_handler(plain, **codec)
        if handler.unary_unary:
            inner = handler.unary_unary
            wait = HEALTH_MESSAGE_WAIT_SECONDS

            def unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                with lane.host_slot(context, method):
                    return inner(self._one_message(method, requests, context, wait), context)

            unary.experimental_thread_pool = lane.pool  # type: ignore[attr-defined]
            return grpc.stream_unary_rpc_method_handler(unary, **codec)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def unary_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                with lane.host_slot(context, method):
                    request = self._one_message(method, requests, context, self.stream_idle_seconds)
                    key = self.watchdog.arm(time.monotonic() + self.stream_idle_seconds, context, method,
                                            f"no message for {self.stream_idle_seconds:g}s")
                    try:
                        yield from inner_stream(request, context)
                    finally:
                        self.watchdog.disarm(key)

            unary_stream.experimental_thread_pool = lane.pool  # type: ignore[attr-defined]
            return grpc.stream_stream_rpc_method_handler(unary_stream, **codec)
        idle = self.stream_idle_seconds
        why = f"no message for {idle:g}s"
        if handler.stream_unary:
            inner_su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                with lane.host_slot(context, method):
                    watched = _Watched(self.watchdog, requests, context, method, idle, why)
                    try:
                        return inner_su(watched, context)
                    finally:
                        watched.done()

            stream_unary.experimental_thread_pool = lane.pool  # type: ignore[attr-defined]
            return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)
        inner_ss = handler.stream_stream

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            with lane.host_slot(context, method):
                watched = _Watched(self.watchdog, requests, context, method, idle, why)
                try:
                    yield from inner_ss(watched, context)
                finally:
                    watched.done()

        stream_stream.experimental_thread_pool = lane.pool  # type: ignore[attr-defined]
        return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)

    def _one_message(self, method: str, requests: Iterator[Any], context: grpc.ServicerContext,
                     wait: float) -> Any:
        """The call's one request message, awaited at most ``wait`` seconds (then the call is cancelled)."""
        key = self.watchdog.arm(time.monotonic() + wait, context, method, f"no request message within {wait:g}s")
        try:
            request = next(requests, None)
        finally:
            self.watchdog.disarm(key)
        if request is None:
            error_details.abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                                f"{_short(method)} needs exactly one request message", error_details.MALFORMED_REQUEST,
                                field="request", metadata={"method": _short(method)})
        return request


class _Watched:
    """A streaming call's request iterator whose every message re-arms the idle watchdog."""

    def __init__(self, watchdog: _Watchdog, requests: Iterator[Any], context: grpc.ServicerContext, method: str,
                 idle: float, why: str) -> None:
        self.watchdog, self.requests, self.context, self.method = watchdog, requests, context, method
        self.idle, self.why = idle, why
        self.key = watchdog.arm(time.monotonic() + idle, context, method, why)

    def __iter__(self) -> _Watched:
        return self

    def __next__(self) -> Any:
        message = next(self.requests)
        self.watchdog.arm(time.monotonic() + self.idle, self.context, self.method, self.why, key=self.key)
        return message

    def done(self) -> None:
        self.watchdog.disarm(self.key)
