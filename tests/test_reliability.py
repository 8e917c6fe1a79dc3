"""Short versions of the fault drills (loadtest/faults.py runs the long ones): deadlines honoured while
Redis is paused or gone, health following Redis, load shedding, a killed worker replaced."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.config import Config
from engine.decision import records
from engine.decision.codes import Codes
from engine.decision.contact import contacts_key
from engine.decision.history import read_history
from engine.decision.request import DecideInput
from engine.rules.contact import ControlGroup
from engine.serving.app import App
from engine.serving.health import RedisHealth
from engine.serving.server import build_server
from engine.store.redis_embedded import EmbeddedRedis, free_port

from .conftest import RULES_DIR, AroundDecide, Served, as_admin, served_admin_token

CONTROL = ControlGroup(0.1)


def _customer(start: int) -> str:
    return next(c for c in (f"C{i:07d}" for i in range(start, 1000)) if not CONTROL.contains(c))


@contextlib.contextmanager
def served(redis_url: str, models_dir: Path, **server: object) -> Iterator[tuple[App, grpc.Channel, RedisHealth]]:
    app = App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=models_dir, demo_customers=300,
                     metrics_port=0, rules_watch_seconds=0, events_poll_seconds=0)).start()
    grpc_server, port, health = build_server(app, "127.0.0.1:0", **server)  # type: ignore[arg-type]
    grpc_server.start()
    monitor = RedisHealth(app.store.client, health, interval=0.2)
    monitor.poll_once()
    monitor.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield app, channel, monitor
    finally:
        monitor.stop()
        channel.close()
        grpc_server.stop(0).wait()
        app.close()


def timed_decide(channel: grpc.Channel, customer: str, deadline: float) -> tuple[pb.DecideResponse, float]:
    started = time.monotonic()
    reply = pb_grpc.DecisionServiceStub(channel).Decide(
        pb.DecideRequest(customer_id=customer, channel=pb.CHANNEL_CALL_CENTER, max_actions=3), timeout=deadline)
    return reply, time.monotonic() - started


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_a_paused_redis_gives_degraded_answers_within_the_deadline_and_records_nothing_late(
        redis_url: str, redis_admin_url: str, models_dir: Path) -> None:
    with served(redis_url, models_dir) as (app, channel, _):
        admin = redis.Redis.from_url(redis_admin_url)  # CLIENT PAUSE
        cid = _customer(10)
        normal, _ = timed_decide(channel, cid, 1.0)
        assert not normal.degraded and normal.actions
        for mode, customer in (("ALL", _customer(20)), ("WRITE", _customer(30))):
            seen = read_history(admin, customer)
            admin.execute_command("CLIENT", "PAUSE", 1500, mode)
            try:
                reply, took = timed_decide(channel, customer, 0.1)
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
            assert reply.degraded and took < 0.12, (mode, took)  # answered, not DEADLINE_EXCEEDED; the client may see it late
            assert [a.action_id for a in reply.actions] == ["account_health_check"]  # the call center's fallback
            time.sleep(0.2)  # the presenting script, if it ran after the pause, had to find itself late
            assert not admin.hexists(*records.location(reply.decision_id)), mode
            assert read_history(admin, customer) == seen  # no impression of the late decision
        again, _ = timed_decide(channel, cid, 1.0)
        assert not again.degraded
        # too little time left for a decision at all: the fallback at once, nothing read
        hurried = app.engine.decide(DecideInput(customer_id=cid, channel="call_center",
                                                deadline=time.monotonic() + 0.001))
        assert hurried.degraded and [a.action_id for a in hurried.actions] == ["account_health_check"]


def test_redis_gone_answers_degraded_reports_not_serving_and_recovers_without_a_restart(
        tmp_path: Path, models_dir: Path) -> None:
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", port=port).start()
    try:
        with served(server.url, models_dir) as (_, channel, monitor):
            cid = _customer(40)
            assert not timed_decide(channel, cid, 1.0)[0].degraded
            server.process.kill()  # SIGKILL
            server.process.wait()
            reply, took = timed_decide(channel, cid, 0.2)
            assert reply.degraded and reply.actions and took < 0.2
            deadline = time.monotonic() + 5
            while health_status(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "still SERVING without Redis"
                time.sleep(0.1)
            server.stop()
            server = EmbeddedRedis(tmp_path / "redis", port=port).start()  # the same data: AOF replay
            deadline = time.monotonic() + 10
            while health_status(channel) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "not SERVING again after Redis came back"
                time.sleep(0.1)
            assert monitor.serving
            while timed_decide(channel, cid, 1.0)[0].degraded:  # the pool reconnects on the next call
                assert time.monotonic() < deadline, "still degraded after Redis came back"
            reply, _ = timed_decide(channel, cid, 1.0)
            assert not reply.degraded and not reply.cold_start
    finally:
        server.stop()


class Slow(AroundDecide):
    """Every Decide takes 300 ms (a slow dependency), so calls pile up."""

    def around(self, decide, request, context):
        time.sleep(0.3)
        return decide(request, context)


def test_overload_is_answered_resource_exhausted_at_once(redis_url: str, models_dir: Path) -> None:
    with served(redis_url, models_dir, max_in_flight=4, interceptors=(Slow(),)) as (_, channel, _):
        results: list[tuple[grpc.StatusCode, float]] = []
        start = threading.Barrier(12)

        def call() -> None:
            start.wait()
            began = time.monotonic()
            try:
                timed_decide(channel, _customer(50), 5.0)
                results.append((grpc.StatusCode.OK, time.monotonic() - began))
            except grpc.RpcError as exc:
                results.append((exc.code(), time.monotonic() - began))

        threads = [threading.Thread(target=call) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shed = [took for code, took in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(shed) == 8 and max(shed) < 0.1, results
        assert sum(code == grpc.StatusCode.OK for code, _ in results) == 4


@contextlib.contextmanager
def workers_on_own_redis(tmp_path: Path, models_dir: Path,
                         *args: str) -> Iterator[tuple[Served, Callable[..., set[int]]]]:
    """``nba serve --workers 2`` on its own embedded Redis, and a function that returns the pids of the
    workers that answer GetStatus on fresh connections (until it has seen ``wanted`` of them)."""
    port, data_dir = free_port(), tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
    proc = Served(["--workers", "2", "--address", f"127.0.0.1:{port}", "--metrics-port", "0", "--data-dir",
                   str(data_dir), "--models-dir", str(models_dir), "--customers", "300", *args], env,
                  tmp_path / "serve.log")

    def pids(wanted: int, timeout: float = 120) -> set[int]:
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < wanted:
            assert proc.poll() is None and time.monotonic() < deadline, f"workers not serving\n{proc.tail()}"
            try:
                with as_admin(grpc.insecure_channel(f"127.0.0.1:{port}",
                                                    options=[("grpc.use_local_subchannel_pool", 1)]),
                              served_admin_token(data_dir)) as ch:
                    seen.add(pb_grpc.AdminServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=2).worker_pid)
            except grpc.RpcError:
                time.sleep(0.2)
        return seen

    try:
        yield proc, pids
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"not stopped 60 s after SIGTERM\n{proc.tail()}") from None
        finally:
            proc.kill()


def logged(proc: Served, text: str, timeout: float = 90) -> str:
    """The service's log once it holds ``text``."""
    deadline = time.monotonic() + timeout
    while text not in (log := proc.log.read_text(errors="replace")):
        assert proc.poll() is None and time.monotonic() < deadline, f"no {text!r} logged\n{proc.tail()}"
        time.sleep(0.2)
    return log


def test_a_killed_worker_is_replaced_and_serves_again(tmp_path: Path, models_dir: Path) -> None:
    with workers_on_own_redis(tmp_path, models_dir) as (proc, pids):
        first = pids(2)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:  # the survivor keeps answering while the supervisor starts a replacement
            now = pids(2, timeout=deadline - time.monotonic())
            if victim not in now and len(now - first) >= 1:
                break
        logged(proc, "serving again")


def test_a_worker_that_cannot_start_is_retried_with_a_growing_pause(tmp_path: Path, models_dir: Path) -> None:
    """A replacement that fails to start (here: a rule file broken since the service started) is logged
    with the reason and retried after 1 s, 2 s, ... while the survivor serves; once the file is mended
    the next try serves."""
    rules = shutil.copytree(RULES_DIR, tmp_path / "rules")
    catalog = rules / "catalog.yaml"
    good = catalog.read_text()

    with workers_on_own_redis(tmp_path, models_dir, "--rules-dir", str(rules), "--watch-rules", "0") as (proc,
                                                                                                        pids):
        first = pids(2)
        catalog.write_text(good + "\n  - [not closed\n")
        os.kill(min(first), signal.SIGKILL)
        log = logged(proc, "(2 failed starts in a row)")
        assert "restarting it in 1 s (1 failed starts in a row)" in log
        assert "failed to start:" in log and "catalog.yaml" in log.split("failed to start:")[1].splitlines()[0]
        assert pids(1) == {max(first)}  # the survivor answers (what it compiled at the start)
        catalog.write_text(good)
        logged(proc, "serving again")
        assert len(pids(2) - first) == 1


def test_the_presenting_script_presents_nothing_once_the_caller_stopped_waiting(redis_url: str,
                                                                                 models_dir: Path) -> None:
    """A script that Redis runs after the caller's deadline (it sat behind a slow command) changes nothing:
    the caller was answered with the fallback, so nothing may count as shown."""
    from engine.decision.contact import PRESENT, present_args
    from engine.rules.runtime import load_and_compile

    rules = load_and_compile(RULES_DIR)
    try:
        client = redis.Redis.from_url(redis_url)
        script = client.register_script(PRESENT)
        action = rules.ruleset.actions[0]

        class Verdict:
            pass

        verdict = Verdict()
        verdict.action = action  # type: ignore[attr-defined]
        now = time.time()
        for late_ms, expect in ((int(now * 1000) - 1, b"late"), (int(now * 1000) + 60_000, None)):
            keys, args, _ = present_args(rules.ruleset.contact, [(1.0, 0.5, verdict)], None, 3, "call_center",
                                         f"d{late_ms}", now, {"customer": "LATE-1", "ts": f"{now:.3f}"}, "LATE-1",
                                         "decide", late_ms=late_ms, codes=Codes(client))
            verdicts = script(keys=keys, args=[args])[0]
            if expect is not None:
                assert verdicts == expect and not client.hexists(*records.location(f"d{late_ms}"))
                assert not client.exists(contacts_key("LATE-1"))
            else:
                assert verdicts == [b"ok"] and client.hexists(*records.location(f"d{late_ms}"))
    finally:
        rules.close()


def test_a_stalled_redis_opens_the_breaker_so_later_calls_answer_degraded_at_once(redis_url: str, redis_admin_url: str,
                                                                                   models_dir: Path) -> None:
    """During a stall, the calls already waiting answer degraded before their deadline; once one of them
    has timed out, new calls do not wait at all. 30 at once all have a thread (no queueing behind the
    stall). The deadlines leave room for a slow, busy machine: the 30 answers come in a burst."""
    from engine.store.breaker import breaker_for

    with served(redis_url, models_dir, max_in_flight=32) as (app, channel, _):
        admin = redis.Redis.from_url(redis_admin_url)  # CLIENT PAUSE
        host = app.store.client.connection_pool.connection_kwargs
        breaker = breaker_for(f"{host['host']}:{host['port']}")
        assert not timed_decide(channel, _customer(70), 1.0)[0].degraded
        results: list[tuple[str, float]] = []

        def call(customer: str) -> None:
            try:
                reply, took = timed_decide(channel, customer, 1.0)
                results.append(("degraded" if reply.degraded else "ok", took))
            except grpc.RpcError as exc:
                results.append((exc.code().name, 0.0))

        admin.execute_command("CLIENT", "PAUSE", 5000, "ALL")
        try:
            first = [threading.Thread(target=call, args=(_customer(100 + i),)) for i in range(30)]
            for t in first:
                t.start()
            for t in first:
                t.join()
            assert breaker.is_open
            later = []
            for i in range(10):  # within the pause (about 1 s of its 5 s have passed)
                reply, took = timed_decide(channel, _customer(200 + i), 0.5)
                later.append(took)
                assert reply.degraded and [a.action_id for a in reply.actions] == ["account_health_check"]
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        # all answered within their deadline (else DEADLINE_EXCEEDED); the later ones at once, not after
        # waiting 0.4 s for the stalled Redis
        assert [r for r, _ in results] == ["degraded"] * 30, results
        assert sorted(later)[5] < 0.1, later
        deadline = time.monotonic() + 2
        while timed_decide(channel, _customer(70), 1.0)[0].degraded:  # the next probe closes it
            assert time.monotonic() < deadline, "still degraded after the stall"
        assert not breaker.is_open


def test_a_retried_event_applies_the_effects_its_first_call_lost(redis_url: str, models_dir: Path) -> None:
    """The first call recorded the event, then failed before raising its trigger; the retry (a duplicate
    by event id) applies what was lost, and a third call changes nothing."""
    from engine.store.profiles import triggers_key

    with served(redis_url, models_dir) as (_, channel, _):
        admin = redis.Redis.from_url(redis_url)
        stub = pb_grpc.DecisionServiceStub(channel)
        cid = _customer(300)
        event = pb.PublishEventRequest(event_id="retry-1", customer_id=cid, type="contact_request",
                                       attributes={"topic": "billing"})
        admin.set(triggers_key(cid), "not a hash")  # the trigger update fails: WRONGTYPE
        with pytest.raises(grpc.RpcError) as first:
            stub.PublishEvent(event, timeout=5)
        assert first.value.code() == grpc.StatusCode.UNAVAILABLE
        admin.delete(triggers_key(cid))
        again = stub.PublishEvent(event, timeout=5)
        assert again.duplicate and again.triggers_raised == ["callback_requested"]
        assert admin.hexists(triggers_key(cid), "callback_requested")
        third = stub.PublishEvent(event, timeout=5)
        assert third.duplicate and not third.triggers_raised and not third.patterns


def test_a_retried_response_clears_the_trigger_its_first_call_did_not(redis_url: str, redis_admin_url: str,
                                                                      models_dir: Path) -> None:
    from engine.store.profiles import triggers_key

    with served(redis_url, models_dir) as (_, channel, _):
        admin = redis.Redis.from_url(redis_admin_url)  # parks a key outside nba:
        stub = pb_grpc.DecisionServiceStub(channel)
        cid = _customer(320)
        stub.PublishEvent(pb.PublishEventRequest(event_id="retry-2", customer_id=cid, type="contact_request",
                                                 attributes={"topic": "billing"}), timeout=5)
        decision, _ = timed_decide(channel, cid, 5.0)
        assert decision.actions[0].action_id == "callback_customer"
        response = pb.RecordResponseRequest(decision_id=decision.decision_id, action_id="callback_customer",
                                            outcome=pb.OUTCOME_ACCEPTED)
        admin.rename(triggers_key(cid), "parked")
        admin.set(triggers_key(cid), "not a hash")  # recording works, clearing the trigger fails
        with pytest.raises(grpc.RpcError) as first:
            stub.RecordResponse(response, timeout=5)
        assert first.value.code() == grpc.StatusCode.UNAVAILABLE
        admin.delete(triggers_key(cid))
        admin.rename("parked", triggers_key(cid))
        stored = records.read(admin, Codes(admin), [decision.decision_id])[decision.decision_id][1]
        first_id = stored.get("r:callback_customer:accepted")
        assert first_id  # the first call did record the response
        again = stub.RecordResponse(response, timeout=5)
        assert again.response_id == first_id
        assert not admin.hexists(triggers_key(cid), "callback_requested")


def test_a_redis_server_killed_before_it_answered_is_started_again(tmp_path: Path) -> None:
    """Between fork and exec the child runs the parent's fork handlers, and gRPC's can abort it while the
    parent's gRPC threads are busy: a child that dies of a signal before answering is started again (here
    a wrapper that aborts on its first start, then runs the real server)."""
    from engine.store.redis_embedded import find_redis_server

    marker = tmp_path / "aborted-once"
    wrapper = tmp_path / "redis-server"
    wrapper.write_text(f"#!/bin/sh\n[ \"$1\" = - ] && [ ! -e {marker} ] && touch {marker} && kill -ABRT $$\n"
                       f"exec {find_redis_server()} \"$@\"\n")
    wrapper.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "data", persist=False, binary=str(wrapper)).start()
    try:
        assert marker.exists() and redis.Redis.from_url(server.admin_url).ping()
    finally:
        server.stop()
