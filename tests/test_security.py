"""TLS, mTLS, callers with roles, rate limits and the audit trail, on a real server with real
certificates made here (tests/certs.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.config import Config
from engine.serving.app import App
from engine.serving.client import open_channel
from engine.serving.security import (
    CALLER_REQUESTS,
    SecurityError,
    ServerCertificates,
    check_bind,
    load_auth,
    token_hash,
)
from engine.serving.server import build_server
from engine.store.audit import AUDIT_STREAM

from .certs import CA
from .conftest import REPO, RULES_DIR

TOKENS = {"decider": "tok-decide", "responder": "tok-respond", "publisher": "tok-events", "operator": "tok-admin",
          "crm": "tok-profiles"}
ROLE_OF = {"decider": "decide", "responder": "respond", "publisher": "events", "operator": "admin", "crm": "profiles"}


def _auth_file(path: Path, extra: str = "") -> Path:
    lines = ["callers:"]
    for name, token in TOKENS.items():
        lines += [f"  - name: {name}", f"    token_sha256: {token_hash(token)}", f"    roles: [{ROLE_OF[name]}]"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@contextlib.contextmanager
def served(redis_url: str, models_dir: Path, tmp_path: Path, tls: ServerCertificates | None = None,
           auth: Path | None = None) -> Iterator[tuple[App, int]]:
    app = App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=models_dir, demo_customers=200,
                     metrics_port=0, rules_watch_seconds=0)).start()
    server, port, health = build_server(app, "127.0.0.1:0", tls=tls, auth=load_auth(auth) if auth else None)
    server.start()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield app, port
    finally:
        server.stop(0).wait()
        app.close()


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _calls(channel: grpc.Channel) -> dict[str, object]:
    """One call per role's method; auth passes when the answer is anything but the auth codes."""
    stub, admin = pb_grpc.DecisionServiceStub(channel), pb_grpc.AdminServiceStub(channel)
    return {
        "decide": lambda: stub.Decide(pb.DecideRequest(customer_id="C0000001", channel=pb.CHANNEL_CALL_CENTER,
                                                       preview=True), timeout=10),
        "respond": lambda: stub.RecordResponse(pb.RecordResponseRequest(
            decision_id="0" * 32, action_id="x", outcome=pb.OUTCOME_CLICKED), timeout=10),  # NOT_FOUND: it got in
        "events": lambda: stub.PublishEvent(pb.PublishEventRequest(event_id="e", customer_id="C1", type="nope"),
                                            timeout=10),  # INVALID_ARGUMENT: it got in
        "admin": lambda: admin.GetStatus(pb.GetStatusRequest(), timeout=10),
        "profiles": lambda: pb_grpc.ProfileServiceStub(channel).UpdateProfile(pb.UpdateProfileRequest(
            customer_id="C1", attributes={"shoe_size": pb.AttributeValue(number=1)}), timeout=10),  # INVALID_ARGUMENT
    }


def test_each_role_may_call_exactly_its_methods(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    auth = _auth_file(tmp_path / "auth.yaml")
    with served(redis_url, models_dir, tmp_path, auth=auth) as (app, port):
        address = f"127.0.0.1:{port}"
        for name, token in TOKENS.items():
            with open_channel(address, token=token) as channel:
                codes = {role: _code(call) for role, call in _calls(channel).items()}
            denied = {role for role, code in codes.items() if code == grpc.StatusCode.PERMISSION_DENIED}
            assert denied == set(ROLE_OF.values()) - {ROLE_OF[name]}, (name, codes)
            assert codes[ROLE_OF[name]] not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        for token in (None, "not-a-known-token"):
            with open_channel(address, token=token or "") as channel:
                codes = {role: _code(call) for role, call in _calls(channel).items()}
                assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
                # health checks stay open to load balancers
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert CALLER_REQUESTS.labels("decider", "Decide", "ok")._value.get() >= 1
        assert CALLER_REQUESTS.labels("unknown", "Decide", "unauthenticated")._value.get() >= 2
        # the admin who reloads the rules is in the audit trail
        with open_channel(address, token=TOKENS["operator"]) as channel:
            assert pb_grpc.AdminServiceStub(channel).ReloadRules(pb.ReloadRulesRequest(), timeout=30).applied
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        entries = [f for _, f in client.xrange(AUDIT_STREAM)]
        assert [(f["who"], f["action"]) for f in entries] == [("operator", "rules_unchanged")]


def test_a_caller_over_its_rate_gets_resource_exhausted(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    auth = _auth_file(tmp_path / "auth.yaml", "rate_limit: {per_second: 0.5, burst: 3}\n")
    with served(redis_url, models_dir, tmp_path, auth=auth) as (_, port):
        with open_channel(f"127.0.0.1:{port}", token=TOKENS["decider"]) as channel:
            decide = _calls(channel)["decide"]
            codes = [_code(decide) for _ in range(5)]
        assert codes[:3] == [grpc.StatusCode.OK] * 3
        assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        with open_channel(f"127.0.0.1:{port}", token=TOKENS["responder"]) as channel:  # each caller has its own
            assert _code(_calls(channel)["respond"]) == grpc.StatusCode.NOT_FOUND


def test_tls_refuses_plaintext_and_mtls_refuses_callers_without_a_certificate(
        redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server", "nba.test", server=True)
    desk = ca.issue("desk", "agent-desktop")
    stranger = CA(tmp_path / "other", "someone else's CA").issue("stranger", "agent-desktop")
    auth = tmp_path / "auth.yaml"
    auth.write_text("callers:\n  - name: desk\n    certificate: {common_name: agent-desktop}\n    roles: [decide]\n")
    tls = ServerCertificates(server.cert, server.key, client_ca=ca.pem)
    with served(redis_url, models_dir, tmp_path, tls=tls, auth=auth) as (_, port):
        address = f"127.0.0.1:{port}"
        with open_channel(address) as plain:
            assert _code(_calls(plain)["decide"]) == grpc.StatusCode.UNAVAILABLE
        with open_channel(address, tls_ca=ca.pem) as no_cert:
            assert _code(_calls(no_cert)["decide"]) == grpc.StatusCode.UNAVAILABLE
        with open_channel(address, tls_ca=ca.pem, tls_cert=stranger.cert, tls_key=stranger.key) as wrong_ca:
            assert _code(_calls(wrong_ca)["decide"]) == grpc.StatusCode.UNAVAILABLE
        with open_channel(address, tls_ca=ca.pem, tls_cert=desk.cert, tls_key=desk.key) as ok:
            codes = {role: _code(call) for role, call in _calls(ok).items()}
        assert codes["decide"] == grpc.StatusCode.OK
        assert {codes[r] for r in ("respond", "events", "admin")} == {grpc.StatusCode.PERMISSION_DENIED}


def test_a_rotated_certificate_is_served_without_a_restart(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    old_ca, new_ca = CA(tmp_path / "old"), CA(tmp_path / "new", "new CA")
    old_ca.issue("server", "nba.test", server=True, into=live)
    tls = ServerCertificates(live / "server.crt", live / "server.key")
    with served(redis_url, models_dir, tmp_path, tls=tls) as (_, port):
        address = f"127.0.0.1:{port}"
        with open_channel(address, tls_ca=old_ca.pem) as channel:
            assert _code(_calls(channel)["decide"]) == grpc.StatusCode.OK
        rotated = new_ca.issue("server", "nba.test", server=True, into=tmp_path / "staged")
        for src, dst in ((rotated.key, live / "server.key"), (rotated.cert, live / "server.crt")):
            os.replace(src, dst)  # the way a certificate manager swaps files in
        with open_channel(address, tls_ca=new_ca.pem) as channel:
            assert _code(_calls(channel)["decide"]) == grpc.StatusCode.OK
        with open_channel(address, tls_ca=old_ca.pem) as channel:
            assert _code(_calls(channel)["decide"]) == grpc.StatusCode.UNAVAILABLE


def test_a_non_loopback_address_needs_tls_and_auth_or_insecure(tmp_path: Path) -> None:
    check_bind("127.0.0.1:50051", tls=False, auth=False, insecure=False)
    check_bind("[::1]:50051", tls=False, auth=False, insecure=False)
    check_bind("0.0.0.0:50051", tls=True, auth=True, insecure=False)
    for tls, auth in ((False, False), (True, False), (False, True)):
        with pytest.raises(SecurityError, match="refusing to listen on 0.0.0.0:50051"):
            check_bind("0.0.0.0:50051", tls=tls, auth=auth, insecure=False)
    check_bind("0.0.0.0:50051", tls=False, auth=False, insecure=True)  # said explicitly: a warning
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"NBA_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--address", "0.0.0.0:0", "--no-demo",
                           "--metrics-port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "refusing to listen on 0.0.0.0:0" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_auth_file_is_checked_and_never_holds_a_token(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    for text, words in (
        ("callers:\n  - name: web\n    token_sha256: my-secret-token\n    roles: [decide]\n", "64 hex digits"),
        ("callers:\n  - name: web\n    roles: [decide]\n", "needs token_sha256 or certificate"),
        ("callers:\n  - name: web\n    token_sha256: " + "a" * 64 + "\n    roles: [decide, superuser]\n", "roles"),
        ("callers:\n  - name: web\n    certificate: {cn: x}\n    roles: [decide]\n", "certificate takes"),
        ("callers: []\nopen: [metrics]\n", "open must be"),
        ("callers: [\n", "cannot read"),
        ("callers: []\nexpires: 2026-13-01\n", "cannot read.*month must be in 1..12"),  # ValueError escaped
        ("callers: " + "[" * 5_000 + "]" * 5_000 + "\n", "cannot read"),  # RecursionError escaped
    ):
        path.write_text(text)
        with pytest.raises(SecurityError, match=words) as err:
            load_auth(path)
        assert str(path) in str(err.value)


def test_free_text_never_becomes_a_metric_label(service) -> None:
    """Context values, event types and attributes, customer and action ids are the callers' free text:
    sending many different ones must not add label values to any nba_* metric."""
    from prometheus_client import REGISTRY

    _, channel = service
    stub = pb_grpc.DecisionServiceStub(channel)

    def labels() -> set[tuple]:
        return {(m.name, tuple(sorted(s.labels.items()))) for m in REGISTRY.collect() if m.name.startswith("nba_")
                for s in m.samples}

    def burst(k: int) -> None:
        for i in range(k, k + 30):
            stub.Decide(pb.DecideRequest(customer_id=f"X{i}", channel=pb.CHANNEL_WEB, touchpoint=f"tp-{i}",
                                         context={"intent": f"free text {i}"}, interaction_id=f"ix-{i}"), timeout=10)
            event = pb.PublishEventRequest(event_id=f"e{i}", customer_id=f"X{i}", type=f"made_up_{i}",
                                           attributes={"note": f"text {i}"})
            response = pb.RecordResponseRequest(decision_id=f"{i:032x}", action_id=f"act{i}",
                                                outcome=pb.OUTCOME_CLICKED)
            _code(lambda: stub.PublishEvent(event, timeout=10))  # noqa: B023 - called at once
            _code(lambda: stub.RecordResponse(response, timeout=10))  # noqa: B023 - called at once

    burst(0)
    time.sleep(0.1)
    before = labels()
    burst(1000)
    assert labels() - before == set()
