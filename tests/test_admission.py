"""Transport admission through a real server on 127.0.0.1, real channels and a real Redis: idle streams,
floods and withheld messages keep neither Decide nor health from answering; reflection only when asked
for; the client keeps tokens off plaintext channels to other hosts and off the command line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine import cli, metrics
from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.config import Config
from engine.serving.admission import Admission
from engine.serving.app import App
from engine.serving.client import ClientSecurityError, is_loopback_target, open_channel, read_token_file
from engine.serving.security import load_auth, token_hash
from engine.serving.server import MAX_STREAMS_PER_CONNECTION, build_server

from .certs import CA
from .conftest import RULES_DIR

TOKEN = "a-decide-token-for-the-admission-tests"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel with a connection of its own
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@contextlib.contextmanager
def served(redis_url: str, models_dir: Path, tmp_path: Path, auth: bool = False,
           **server: object) -> Iterator[tuple[App, str]]:
    app = App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=models_dir, demo_customers=200,
                     metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0)).start()
    policy = None
    if auth:
        path = tmp_path / "auth.yaml"
        path.write_text(f"open: [health, reflection]\ncallers:\n  - name: desk\n    token_sha256: {token_hash(TOKEN)}\n"
                        "    roles: [decide]\n")
        policy = load_auth(path)
    grpc_server, port, health = build_server(app, "127.0.0.1:0", auth=policy, **server)  # type: ignore[arg-type]
    grpc_server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield app, f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(0).wait()
        app.close()


def _decide(channel: grpc.Channel, timeout: float) -> pb.DecideResponse:
    return pb_grpc.DecisionServiceStub(channel).Decide(
        pb.DecideRequest(customer_id="C0000042", channel=pb.CHANNEL_WEB, max_actions=2), timeout=timeout)


def _check(channel: grpc.Channel, timeout: float) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


class Idle:
    """Request iterators that send nothing more until ``release``: idle client streams."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def requests(self, first: list | None = None) -> Iterator:
        yield from first or []
        self.released.wait(60)


class Outcomes:
    """Drains each call's responses in a thread of its own and records how the call ended."""

    def __init__(self) -> None:
        self.ended: dict[int, tuple[str, grpc.StatusCode | None, str]] = {}
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def watch(self, kind: str, call) -> None:
        def drain() -> None:
            try:
                for _ in call:
                    pass
                code, details = None, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            with self._lock:
                self.ended[id(call)] = (kind, code, details)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        self.threads.append(thread)

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ended) < n:
            assert time.monotonic() < deadline, f"{len(self.ended)} of {n} calls ended within {timeout}s"
            time.sleep(0.05)


class Streams:
    """Idle streaming calls (reflection sending nothing, Health.Watch after its request) opened by an
    asyncio client in a thread of its own: the sync client does not see the status of many idle streams."""

    def __init__(self, address: str, connections: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ended: list[tuple[str, grpc.StatusCode]] = []
        self.calls: list = []
        async def channels() -> list:
            return [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(connections)]

        self.channels = self._run(channels())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def open(self, per_kind: int, kinds: tuple[str, ...] = ("reflection", "watch")) -> None:
        async def drain(kind: str, call) -> None:
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                self.ended.append((kind, exc.code()))

        async def start() -> None:
            for i in range(per_kind):
                channel = self.channels[i % len(self.channels)]
                for kind in kinds:
                    call = (reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo() if kind == "reflection"
                            else health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()))
                    self.calls.append(call)
                    self.loop.create_task(drain(kind, call))

        self._run(start())

    def codes(self) -> Counter:
        return Counter(code for _, code in list(self.ended))

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ended) < n:
            assert time.monotonic() < deadline, f"{len(self.ended)} of {n} streams ended within {timeout}s: {self.codes()}"
            time.sleep(0.05)

    def close(self) -> None:
        async def close() -> None:
            for call in self.calls:
                call.cancel()
            for channel in self.channels:
                await channel.close()

        try:
            self._run(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.mark.parametrize("auth", [False, True], ids=["plain", "token"])
def test_idle_streams_leave_decide_and_health_their_threads(redis_url: str, models_dir: Path, tmp_path: Path,
                                                            auth: bool) -> None:
    admission = Admission(16, stream_idle_seconds=60)  # the idle streams stay for the whole test
    with served(redis_url, models_dir, tmp_path, auth=auth, reflection=True, admission=admission) as (_, address):
        streams = Streams(address, connections=4)  # 32 streams per connection
        try:
            streams.open(64)  # 64 idle reflection streams and 64 Health.Watch
            admitted = admission.streams.per_host  # all from one host: 2 of the 4 slots
            streams.wait_for(128 - admitted, timeout=30)
            assert streams.codes() == {grpc.StatusCode.RESOURCE_EXHAUSTED: 128 - admitted}
            assert admission.streams.pool.held == admitted  # the admitted ones are still open
            with open_channel(address, token=TOKEN if auth else "", retry=False) as channel:
                for _ in range(5):
                    assert _check(channel, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
                    assert _decide(channel, timeout=2.0).actions
            assert len(streams.ended) == 128 - admitted  # and still open now
        finally:
            streams.close()


class Peers(grpc.ServerInterceptor):
    """Records the peer (client address and port: its connection) of every streaming call that runs."""

    def __init__(self) -> None:
        self.seen: Counter = Counter()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not handler.unary_stream:
            return handler
        inner = handler.unary_stream

        def watch(request, context):
            self.seen[context.peer()] += 1
            yield from inner(request, context)

        return grpc.unary_stream_rpc_method_handler(watch, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)


def test_one_connection_carries_at_most_256_calls(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    admission, peers = Admission(4, max_streams=300, stream_idle_seconds=60, per_host=300), Peers()
    with served(redis_url, models_dir, tmp_path, admission=admission, interceptors=(peers,)) as (_, address):
        streams = Streams(address, connections=1)
        try:
            streams.open(300, kinds=("watch",))
            deadline = time.monotonic() + 30
            while sum(peers.seen.values()) < MAX_STREAMS_PER_CONNECTION:
                assert time.monotonic() < deadline, (peers.seen, streams.codes())
                time.sleep(0.05)
            time.sleep(1.0)
            # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: the other 44 wait in the client for a free stream
            assert list(peers.seen.values()) == [MAX_STREAMS_PER_CONNECTION] and not streams.ended, streams.codes()
        finally:
            streams.close()


def test_an_idle_stream_is_ended_and_its_slot_freed(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    admission = Admission(4, max_streams=2, stream_idle_seconds=1.0)
    list_services = reflection_pb2.ServerReflectionRequest(list_services="")
    with served(redis_url, models_dir, tmp_path, reflection=True, admission=admission) as (_, address):
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            idle, outcomes = Idle(), Outcomes()
            try:
                began = time.monotonic()
                outcomes.watch("idle", stub.ServerReflectionInfo(idle.requests([list_services])))

                def chatty() -> Iterator:  # a message every 0.4 s for 2.4 s: never idle for 1 s
                    for _ in range(6):
                        yield list_services
                        time.sleep(0.4)

                busy = stub.ServerReflectionInfo(chatty())
                time.sleep(0.3)
                with pytest.raises(grpc.RpcError) as over:  # both slots held
                    list(stub.ServerReflectionInfo(iter([list_services]), timeout=5))
                assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert len(list(busy)) == 6  # outlived the idle timeout, each message re-armed it
                outcomes.wait_for(1, timeout=5)
                assert list(outcomes.ended.values())[0][1] == grpc.StatusCode.CANCELLED
                assert 1.0 <= time.monotonic() - began
                replies = list(stub.ServerReflectionInfo(iter([list_services]), timeout=5))  # the slot is free again
                assert {s.name for s in replies[0].list_services_response.service} >= {"nba.v1.DecisionService"}
            finally:
                idle.released.set()
                for thread in outcomes.threads:
                    thread.join(10)
    assert admission.streams.pool.held == 0


def test_a_flood_beyond_max_in_flight_is_shed_at_once_while_health_answers(
        redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    from .test_reliability import Slow  # every Decide takes 300 ms

    shed_before = metrics.RPCS.labels("Decide", "RESOURCE_EXHAUSTED")._value.get()
    with served(redis_url, models_dir, tmp_path, max_in_flight=4, interceptors=(Slow(),)) as (_, address):
        with grpc.insecure_channel(address) as channel:
            _decide(channel, timeout=5.0)  # connected and warm
            results: list[tuple[grpc.StatusCode, float, str]] = []
            start = threading.Barrier(41)

            def call() -> None:
                start.wait()
                began = time.monotonic()
                try:
                    _decide(channel, timeout=5.0)
                    results.append((grpc.StatusCode.OK, time.monotonic() - began, ""))
                except grpc.RpcError as exc:
                    results.append((exc.code(), time.monotonic() - began, exc.details() or ""))

            threads = [threading.Thread(target=call) for _ in range(40)]
            for t in threads:
                t.start()
            start.wait()
            health_took = []
            while any(t.is_alive() for t in threads):
                began = time.monotonic()
                assert _check(channel, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
                health_took.append(time.monotonic() - began)
                time.sleep(0.02)
            for t in threads:
                t.join()
    shed = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert Counter(code for code, _, _ in results) == {grpc.StatusCode.OK: 4, grpc.StatusCode.RESOURCE_EXHAUSTED: 36}
    # at once: not after waiting for a slot (a Decide holds one for 300 ms)
    assert max(took for _, took, _ in shed) < 0.25 and all("server busy" in d for _, _, d in shed)
    assert len(health_took) >= 5  # each within its 1 s deadline while Decide was shed
    assert metrics.RPCS.labels("Decide", "RESOURCE_EXHAUSTED")._value.get() - shed_before == 36


def _refusals_marked(app: App, tmp_path: Path) -> bool:
    """Whether the caller interceptor hands ``Admission`` an unknown token's refusal as one."""
    from engine.serving.security import caller_interceptor

    class Details(NamedTuple):
        method: str
        invocation_metadata: tuple

    decide = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    interceptor = caller_interceptor(app, load_auth(tmp_path / "auth.yaml"), None)
    handler = interceptor.intercept_service(lambda _: decide, Details(
        "/nba.v1.DecisionService/Decide", (("authorization", "Bearer a-token-nobody-has"),)))
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    return bool(getattr(behavior, "nba_refusal", False))


def test_unauthenticated_floods_take_no_call_slot(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    """Calls with an unknown token are refused on the shedding threads: the callers' slots stay theirs."""
    from .test_reliability import Slow  # every Decide takes 300 ms

    admission = Admission(4)
    with served(redis_url, models_dir, tmp_path, auth=True, admission=admission, interceptors=(Slow(),)) as (app, address):
        assert _refusals_marked(app, tmp_path)
        stop, refused = threading.Event(), Counter()

        def flood() -> None:
            with open_channel(address, token="a-token-nobody-has", retry=False, options=OWN_CONNECTION) as channel:
                while not stop.is_set():
                    try:
                        _decide(channel, timeout=2.0)
                    except grpc.RpcError as exc:
                        refused[exc.code()] += 1

        threads = [threading.Thread(target=flood) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            with open_channel(address, token=TOKEN, retry=False) as channel:
                for _ in range(4):
                    assert _decide(channel, timeout=2.0).actions
                    assert _check(channel, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    assert set(refused) == {grpc.StatusCode.UNAUTHENTICATED} and sum(refused.values()) > 20, refused
    assert admission.calls.pool.taken == 4  # the four authenticated Decides, nothing else


def test_one_host_holds_at_most_two_health_checks(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    """Health needs no credentials: withheld Health.Check requests from one host take 2 of the 4 health
    threads, for 1 s; the others from that host are answered RESOURCE_EXHAUSTED at once."""
    admission = Admission(4)
    with served(redis_url, models_dir, tmp_path, admission=admission) as (_, address):
        with grpc.insecure_channel(address) as channel:
            withheld = channel.stream_unary("/grpc.health.v1.Health/Check",
                                            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                            response_deserializer=health_pb2.HealthCheckResponse.FromString)
            idle = Idle()
            try:
                began = time.monotonic()
                futures = [withheld.future(idle.requests()) for _ in range(4)]
                codes = [f.exception(timeout=5).code() for f in futures]  # type: ignore[union-attr]
                assert sorted(c.name for c in codes) == ["CANCELLED", "CANCELLED", "RESOURCE_EXHAUSTED",
                                                         "RESOURCE_EXHAUSTED"]
                assert 1.0 <= time.monotonic() - began < 3.0
                assert _check(channel, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING
            finally:
                idle.released.set()
    assert admission.health.pool.held == 0 and not admission.health.hosts


def test_reflection_is_unimplemented_unless_enabled(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with served(redis_url, models_dir, tmp_path) as (_, address), grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as off:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=5))
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert _check(channel, timeout=2) == health_pb2.HealthCheckResponse.SERVING
    with served(redis_url, models_dir, tmp_path, reflection=True) as (_, address), \
            grpc.insecure_channel(address) as channel:
        replies = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]),
                                                                                             timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"nba.v1.DecisionService", "nba.v1.AdminService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_the_serve_command_has_reflection_off_unless_asked() -> None:
    assert Config().reflection is False


# --- the client ------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["10.0.0.5:50051", "nba.bank.internal:443", "dns:///nba:50051",
                                     "[2001:db8::1]:50051", "ipv4:192.0.2.1:50051", "127.0.0.1.evil.example:1"])
def test_the_client_refuses_a_token_in_plaintext_off_loopback(address: str, monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(ClientSecurityError, match="--tls-ca") as refused:
        open_channel(address, token="secret")
    assert address in str(refused.value) and "secret" not in str(refused.value)
    monkeypatch.setenv("NBA_TOKEN", "from-the-environment")
    with pytest.raises(ClientSecurityError):
        open_channel(address)
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    token_file.chmod(0o600)
    with pytest.raises(ClientSecurityError):
        open_channel(address, token_file=token_file)
    open_channel(address, token="").close()  # no token at all: fine
    monkeypatch.delenv("NBA_TOKEN")
    open_channel(address).close()


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.8.9.10:1",
                                     "unix:/run/nba.sock", "dns:///localhost:50051", "ipv4:127.0.0.1:50051"])
def test_the_client_sends_a_token_to_loopback_or_over_tls(address: str, tmp_path: Path) -> None:
    assert is_loopback_target(address)
    open_channel(address, token="secret").close()
    ca = CA(tmp_path / "ca")
    open_channel("nba.bank.internal:443", tls_ca=ca.pem, token="secret").close()


def test_the_token_reaches_the_server_from_a_file(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with served(redis_url, models_dir, tmp_path, auth=True) as (_, address):
        with open_channel(address, token_file=token_file) as channel:
            assert _decide(channel, timeout=5).actions
        with open_channel(address, token="") as channel, pytest.raises(grpc.RpcError) as anonymous:
            _decide(channel, timeout=5)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_bad_token_file_is_named(tmp_path: Path) -> None:
    for content, why in ((b"", "one token"), (b"two words\n", "one token"), (b"\xff\xfe", "not a token"),
                         (b"x" * 5000, "larger than")):
        path = tmp_path / "token"
        path.write_bytes(content)
        with pytest.raises(ClientSecurityError, match=why) as bad:
            read_token_file(path)
        assert str(path) in str(bad.value)
    with pytest.raises(ClientSecurityError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_the_cli_refuses_a_token_on_the_command_line(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NBA_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["decide", "C0000001", "--token", "secret"])
    assert exited.value.code == 2
    assert "--token-file" in capsys.readouterr().err
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    assert cli.main(["decide", "C0000001", "--address", "10.0.0.5:50051", "--token-file", str(token_file)]) != 0
    assert "--tls-ca" in capsys.readouterr().err
    assert os.environ.get("NBA_TOKEN") is None
