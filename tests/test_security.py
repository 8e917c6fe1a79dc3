"""TLS, mTLS, callers with roles, certificate and token together, the local admin token, live reloads of
the auth file, rate limits shared through Redis and the audit trail, on real servers with real
certificates made here (tests/certs.py)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.config import Config
from engine.serving.app import App
from engine.serving.client import open_channel
from engine.serving.security import (
    ADMIN_TOKEN_FILE,
    CALLER_REQUESTS,
    AuthPolicy,
    Caller,
    FailureLog,
    SecurityError,
    ServerCertificates,
    SharedBucket,
    check_bind,
    load_auth,
    local_admin_token,
    local_policy,
    server_security,
    token_hash,
)
from engine.serving.server import build_server
from engine.store.audit import AUDIT_STREAM
from engine.store.redis_embedded import free_port

from .certs import CA
from .clock import Clock
from .conftest import REPO, RULES_DIR

TOKENS = {"decider": "tok-decide", "responder": "tok-respond", "publisher": "tok-events", "operator": "tok-operations",
          "dpo": "tok-privacy", "crm": "tok-profiles"}
ROLE_OF = {"decider": "decide", "responder": "respond", "publisher": "events", "operator": "operations",
           "dpo": "privacy", "crm": "profiles"}
UNAUTH, DENIED, OK = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK


def _auth_file(path: Path, extra: str = "", drop: tuple[str, ...] = (), entry_extra: dict[str, str] | None = None) -> Path:
    lines = ["callers:"]
    for name, token in TOKENS.items():
        if name in drop:
            continue
        lines += [f"  - name: {name}", f"    token_sha256: {token_hash(token)}", f"    roles: [{ROLE_OF[name]}]"]
        if entry_extra and name in entry_extra:
            lines.append(f"    {entry_extra[name]}")
    text = "\n".join(lines) + "\n" + extra
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # as a config manager swaps files in
    return path


@contextlib.contextmanager
def served(redis_url: str, models_dir: Path, tls: ServerCertificates | None = None,
           auth: Path | AuthPolicy | None = None, max_in_flight: int = 16) -> Iterator[tuple[App, int]]:
    app = App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=models_dir, demo_customers=200,
                     metrics_port=0, rules_watch_seconds=0)).start()
    policy = load_auth(auth) if isinstance(auth, Path) else auth
    server, port, health = build_server(app, "127.0.0.1:0", tls=tls, auth=policy, max_in_flight=max_in_flight,
                                        reflection=True)  # registered, so that the policy decides who may use it
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


def _error(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _calls(channel: grpc.Channel, metadata: tuple = ()) -> dict[str, object]:
    """One call per role's method; auth passes when the answer is anything but the auth codes."""
    stub, admin = pb_grpc.DecisionServiceStub(channel), pb_grpc.AdminServiceStub(channel)
    kw = {"timeout": 10, "metadata": metadata or None}
    return {
        "decide": lambda: stub.Decide(pb.DecideRequest(customer_id="C0000001", channel=pb.CHANNEL_CALL_CENTER,
                                                       preview=True), **kw),
        "respond": lambda: stub.RecordResponse(pb.RecordResponseRequest(
            decision_id="0" * 32, action_id="x", outcome=pb.OUTCOME_CLICKED), **kw),  # NOT_FOUND: it got in
        "events": lambda: stub.PublishEvent(pb.PublishEventRequest(event_id="e", customer_id="C1", type="nope"),
                                            **kw),  # INVALID_ARGUMENT: it got in
        "operations": lambda: admin.GetStatus(pb.GetStatusRequest(), **kw),
        "privacy": lambda: admin.ExportCustomer(pb.ExportCustomerRequest(customer_id="C0000001"), **kw),
        "profiles": lambda: pb_grpc.ProfileServiceStub(channel).UpdateProfile(pb.UpdateProfileRequest(
            customer_id="C1", attributes={"shoe_size": pb.AttributeValue(number=1)}), **kw),  # INVALID_ARGUMENT
    }


def _bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def _within(seconds: float, what: str, check) -> float:
    """Seconds until ``check()`` is true, polled every 20 ms; fails after ``seconds``."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < seconds, f"{what} not within {seconds}s"
        time.sleep(0.02)
    return time.monotonic() - began


def test_each_role_may_call_exactly_its_methods(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    auth = _auth_file(tmp_path / "auth.yaml")
    with served(redis_url, models_dir, auth=auth) as (app, port):
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            for name, token in TOKENS.items():
                codes = {role: _code(call) for role, call in _calls(channel, _bearer(token)).items()}
                denied = {role for role, code in codes.items() if code == DENIED}
                assert denied == set(ROLE_OF.values()) - {ROLE_OF[name]}, (name, codes)
                assert codes[ROLE_OF[name]] not in (UNAUTH, DENIED), (name, codes)
            for metadata in ((), _bearer("not-a-known-token")):
                codes = {role: _code(call) for role, call in _calls(channel, metadata).items()}
                assert set(codes.values()) == {UNAUTH}, codes
            # health checks stay open to load balancers; reflection is closed unless the file opens it
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert _code(lambda: _reflect(channel)) == UNAUTH
            assert _reflect(channel, _bearer(TOKENS["operator"])) == DENIED  # a method like any other
        assert CALLER_REQUESTS.labels("decider", "Decide", "ok")._value.get() >= 1
        assert CALLER_REQUESTS.labels("unknown", "Decide", "unauthenticated")._value.get() >= 2
        # the operator who reloads the rules is in the audit trail
        with open_channel(address, token=TOKENS["operator"]) as channel:
            assert pb_grpc.AdminServiceStub(channel).ReloadRules(pb.ReloadRulesRequest(), timeout=30).applied
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        entries = [f for _, f in client.xrange(AUDIT_STREAM)]
        assert [(f["who"], f["action"]) for f in entries if f["action"].startswith("rules")] == [
            ("operator", "rules_unchanged")]
    _auth_file(tmp_path / "auth.yaml", "open: [health, reflection]\n")
    with served(redis_url, models_dir, auth=tmp_path / "auth.yaml") as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert "nba.v1.DecisionService" in _reflect(channel)


def _reflect(channel: grpc.Channel, metadata: tuple = ()) -> object:
    """The services reflection lists, or the status code it answered with."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    try:
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10, metadata=metadata or None)
        return {s.name for r in replies for s in r.list_services_response.service}
    except grpc.RpcError as exc:
        if not metadata:
            raise
        return exc.code()


def test_admin_on_loopback_needs_the_local_admin_token(redis_url: str, models_dir: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    _, policy = server_security(Config(data_dir=data, grpc_address="127.0.0.1:0"))  # what nba serve does
    token_file = data / ADMIN_TOKEN_FILE
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40 and local_admin_token(data) == token  # made once, kept
    with served(redis_url, models_dir, auth=policy) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls = _calls(channel)
        for role in ("operations", "privacy"):
            code, message = _error(calls[role])
            assert code == UNAUTH and ADMIN_TOKEN_FILE in message, message
        assert _code(_calls(channel, _bearer("guessed"))["operations"]) == UNAUTH
        for role in ("decide", "profiles"):  # development and the quick start: open on loopback
            assert _code(calls[role]) not in (UNAUTH, DENIED)
        assert "nba.v1.AdminService" in _reflect(channel)
        assert _code(_calls(channel, _bearer(token))["operations"]) == OK
        # the nba commands' channel finds the token in the data directory, for loopback addresses only
        from engine.commands.common import server_channel as _channel
        args = argparse.Namespace(address=f"127.0.0.1:{port}", tls_ca=None, tls_cert=None, tls_key=None, token_file=None,
                                  data_dir=str(data))
        with _channel(args) as cli:
            assert _code(_calls(cli)["operations"]) == OK
        with _channel(argparse.Namespace(**{**vars(args), "data_dir": str(tmp_path / "elsewhere")})) as cli:
            assert _code(_calls(cli)["operations"]) == UNAUTH
    # build_server without a policy: AdminService closed to everyone
    with served(redis_url, models_dir) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert _code(_calls(channel, _bearer(token))["operations"]) == UNAUTH
        assert _code(_calls(channel)["decide"]) == OK
    # --dev-open-admin: open, with a warning
    with caplog.at_level(logging.WARNING):
        _, open_policy = server_security(Config(data_dir=data, grpc_address="127.0.0.1:0", dev_open_admin=True))
    assert "--dev-open-admin" in caplog.text
    with served(redis_url, models_dir, auth=open_policy) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert _code(_calls(channel)["operations"]) == OK
    with pytest.raises(SecurityError, match="exclude each other"):
        server_security(Config(data_dir=data, dev_open_admin=True, auth_file=_auth_file(tmp_path / "auth.yaml")))
    token_file.chmod(0o644)  # another user may have copied it
    with pytest.raises(SecurityError, match="other users may read"):
        local_admin_token(data)


def test_revoked_and_expired_tokens_are_refused_within_a_second_without_a_restart(
        redis_url: str, models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = _auth_file(tmp_path / "auth.yaml")
    with served(redis_url, models_dir, auth=auth) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        def code(name: str) -> grpc.StatusCode:
            return _code(_calls(channel, _bearer(TOKENS[name]))[ROLE_OF[name]])

        assert code("decider") == OK and code("operator") == OK
        _auth_file(auth, drop=("decider",))  # revoked
        assert _within(1.0, "the revocation", lambda: code("decider") == UNAUTH) < 1.0
        assert code("operator") == OK
        past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
        _auth_file(auth, drop=("decider",), entry_extra={"operator": f"expires: {past}"})
        _within(1.0, "the expiry", lambda: code("operator") == UNAUTH)
        status, message = _error(_calls(channel, _bearer(TOKENS["operator"]))["operations"])
        assert message == f"token of caller operator expired at {past}", message
        # a file that does not load keeps the previous policy, and says why once
        with caplog.at_level(logging.ERROR, logger="engine.serving.security"):
            auth.write_text("callers:\n  - name: ops\n    token_sha256: " + "a" * 64 + "\n    roles: [admin]\n")
            time.sleep(0.6)
            for _ in range(5):
                assert code("responder") != UNAUTH and code("operator") == UNAUTH
                time.sleep(0.1)
        refused = [r for r in caplog.records if "refused, keeping the previous callers" in r.getMessage()]
        assert len(refused) == 1 and "role admin was split into operations" in refused[0].getMessage()
        future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        _auth_file(auth, entry_extra={"operator": f"expires: {future}"})  # fixed: back
        _within(1.0, "the fixed file", lambda: code("operator") == OK and code("decider") == OK)


def test_certificate_and_token_together_over_real_mtls(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("server", "nba.test", server=True)
    desk, kiosk, nobody = ca.issue("desk", "agent-desktop"), ca.issue("kiosk", "kiosk"), ca.issue("nobody", "nobody")
    stranger = CA(tmp_path / "other", "someone else's CA").issue("stranger", "agent-desktop")
    auth = tmp_path / "auth.yaml"
    auth.write_text(f"""callers:
  - name: desk
    certificate: {{common_name: agent-desktop}}
    roles: [decide]
  - name: ops
    token_sha256: {token_hash("ops-token")}
    roles: [operations]
  - name: kiosk
    certificate: {{common_name: kiosk}}
    token_sha256: {token_hash("kiosk-token")}
    roles: [decide, respond]
""")
    tls = ServerCertificates(server.cert, server.key, client_ca=ca.pem)
    with served(redis_url, models_dir, tls=tls, auth=auth) as (_, port):
        address = f"127.0.0.1:{port}"

        def answers(pair, token: str = "") -> dict[str, tuple[grpc.StatusCode, str]]:
            with open_channel(address, tls_ca=ca.pem, tls_cert=pair.cert, tls_key=pair.key, token="") as channel:
                calls = _calls(channel, _bearer(token) if token else ())
                return {role: _error(calls[role]) for role in ("decide", "respond", "operations")}

        desk_alone = answers(desk)
        assert desk_alone["decide"][0] == OK and desk_alone["operations"][0] == DENIED
        assert {c for c, _ in answers(desk, "bogus").values()} == {UNAUTH}  # a token sent must be known
        with_ops = answers(desk, "ops-token")  # the token's caller on the desk's connection
        assert with_ops["operations"][0] == OK and with_ops["decide"][0] == DENIED
        assert "caller ops may not call Decide" in with_ops["decide"][1]
        code, message = answers(kiosk)["decide"]  # an entry naming both needs both
        assert code == UNAUTH and "caller kiosk needs its token too" in message
        code, message = answers(desk, "kiosk-token")["decide"]
        assert code == UNAUTH and "caller kiosk needs its certificate too" in message and "CN=agent-desktop" in message
        both = answers(kiosk, "kiosk-token")
        assert both["decide"][0] == OK and both["respond"][0] == grpc.StatusCode.NOT_FOUND
        code, message = answers(nobody)["decide"]
        assert code == UNAUTH and "CN=nobody" in message, message  # the unknown certificate is named
        # the transport: no plaintext, and grpcio requires (cannot merely request) a certificate of the CA
        with open_channel(address, token="") as plain:
            assert _code(_calls(plain)["decide"]) == grpc.StatusCode.UNAVAILABLE
        with open_channel(address, tls_ca=ca.pem, token="ops-token") as no_cert:
            assert _code(_calls(no_cert)["operations"]) == grpc.StatusCode.UNAVAILABLE
        with open_channel(address, tls_ca=ca.pem, tls_cert=stranger.cert, tls_key=stranger.key, token="") as wrong_ca:
            assert _code(_calls(wrong_ca)["decide"]) == grpc.StatusCode.UNAVAILABLE
    # TLS without client certificates: tokens identify, a call without one is refused before its handler
    with served(redis_url, models_dir, tls=ServerCertificates(server.cert, server.key), auth=auth) as (_, port):
        with open_channel(f"127.0.0.1:{port}", tls_ca=ca.pem, token="") as channel:
            assert _code(_calls(channel, _bearer("ops-token"))["operations"]) == OK
            assert _code(_calls(channel)["operations"]) == UNAUTH
            assert _code(_calls(channel, _bearer("kiosk-token"))["decide"]) == UNAUTH  # no certificate to go with it


def test_a_flood_of_unauthenticated_calls_is_refused_before_parsing_and_real_callers_go_on(
        redis_url: str, models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = _auth_file(tmp_path / "auth.yaml")
    with served(redis_url, models_dir, auth=auth) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        decide_raw = channel.unary_unary("/nba.v1.DecisionService/Decide")
        # bytes that do not parse: refused as unauthenticated, never parsed (that would be INVALID_ARGUMENT)
        assert _code(lambda: decide_raw(b"\xff\xff\xff", timeout=5)) == UNAUTH
        assert _code(lambda: decide_raw(b"\xff\xff\xff", timeout=5, metadata=_bearer("forged-secret"))) == UNAUTH
        # 32 reflection streams that never send: each refused at once, none holds a call slot
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        idle = threading.Event()

        def never() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            idle.wait(30)
            yield from ()

        streams = [stub.ServerReflectionInfo(never(), timeout=20) for _ in range(32)]
        try:
            for s in streams:
                assert _code(lambda s=s: list(s)) == UNAUTH
        finally:
            idle.set()
        stop, flood = threading.Event(), [0]

        def flooder() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as own:
                call = own.unary_unary("/nba.v1.DecisionService/Decide")
                while not stop.is_set():
                    assert _code(lambda: call(b"\x0a\x01x", timeout=5)) == UNAUTH
                    flood[0] += 1

        threads = [threading.Thread(target=flooder) for _ in range(6)]
        with caplog.at_level(logging.WARNING, logger="engine.serving.security"):
            for t in threads:
                t.start()
            try:
                calls = _calls(channel, _bearer(TOKENS["decider"]))
                codes = [_code(calls["decide"]) for _ in range(40)]
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            finally:
                stop.set()
                for t in threads:
                    t.join(10)
        assert codes == [OK] * 40 and health.status == health_pb2.HealthCheckResponse.SERVING
        assert flood[0] >= 100, flood
        # logged with peer and method, once per peer host (then a summary per 10 s), never the token
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and lines[0].startswith("call refused: Decide from ipv4:127.0.0.1"), lines
        assert "forged-secret" not in caplog.text


def test_failure_log_summarises_per_peer_every_10_seconds(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(1000.0)
    failures = FailureLog(clock=clock)
    with caplog.at_level(logging.WARNING, logger="engine.serving.security"):
        for i in range(20):
            clock.now = 1000.0 + i * 0.5  # 20 failures over 9.5 s
            failures.failed(f"ipv4:10.0.0.7:{40000 + i}", "Decide", "UNAUTHENTICATED: unknown token")
        failures.failed("ipv6:[::1]:5000", "GetStatus", "UNAUTHENTICATED: no credentials")
        clock.now = 1010.5
        failures.failed("ipv4:10.0.0.7:41000", "Decide", "UNAUTHENTICATED: unknown token")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["call refused: Decide from ipv4:10.0.0.7: UNAUTHENTICATED: unknown token",
                     "call refused: GetStatus from ipv6:[::1]: UNAUTHENTICATED: no credentials",
                     "calls refused: 20 more from ipv4:10.0.0.7 in the last 10s (last: Decide: UNAUTHENTICATED: "
                     "unknown token)"], lines


def test_a_rate_limit_is_shared_by_two_servers_on_one_redis(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    auth = _auth_file(tmp_path / "auth.yaml", "rate_limit: {per_second: 0.1, burst: 6}\n")
    with served(redis_url, models_dir, auth=auth) as (_, port_a), served(redis_url, models_dir, auth=auth) as (_, port_b), \
            grpc.insecure_channel(f"127.0.0.1:{port_a}") as a, grpc.insecure_channel(f"127.0.0.1:{port_b}") as b:
        decide = [_calls(ch, _bearer(TOKENS["decider"]))["decide"] for ch in (a, b)]
        codes = [_code(decide[i % 2]) for i in range(12)]
        assert codes.count(OK) == 6 and codes[:6] == [OK] * 6, codes  # one bucket for both, not 6 each
        assert set(codes[6:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        code, message = _error(decide[0])
        assert "caller decider is over its rate limit (0.1/s, burst 6)" in message
        assert _code(_calls(a, _bearer(TOKENS["responder"]))["respond"]) == grpc.StatusCode.NOT_FOUND  # its own
        assert redis.Redis.from_url(redis_url).exists("nba:rate:{decider}")


def test_with_redis_unreachable_each_worker_limits_at_its_share(caplog: pytest.LogCaptureFixture) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    caller = Caller("web", frozenset({"decide"}), per_second=0.001, burst=8)
    clock = Clock(100.0)
    with caplog.at_level(logging.WARNING, logger="engine.serving.security"):
        bucket = SharedBucket(caller, dead, share=0.5, clock=clock)
        taken = [bucket.take() for _ in range(6)]
    assert taken == [True] * 4 + [False] * 2  # half the burst: the other worker has the other half
    assert "Redis unreachable" in caplog.text and "limiting in this worker at its share" in caplog.text
    assert len([r for r in caplog.records if "Redis unreachable" in r.getMessage()]) == 1


def test_the_readme_example_auth_file_loads(tmp_path: Path) -> None:
    readme = (REPO / "engine" / "deploy" / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "callers:" in b]
    assert blocks, "engine/deploy/README.md has no yaml block with callers:"
    path = tmp_path / "auth.yaml"
    path.write_text(blocks[0])
    policy = load_auth(path)
    certified = [c for c in policy.callers if c.needs_certificate and not c.token_sha256]
    assert len(certified) >= 2  # certificate-only callers do not collide on an empty token hash
    assert all(c.roles for c in policy.callers)


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
    sha = "a" * 64
    for text, words in (
        ("callers:\n  - name: web\n    token_sha256: my-secret-token\n    roles: [decide]\n", "64 hex digits"),
        ("callers:\n  - name: web\n    roles: [decide]\n", "needs token_sha256 or certificate"),
        (f"callers:\n  - name: web\n    token_sha256: {sha}\n    roles: [decide, superuser]\n", "roles"),
        (f"callers:\n  - name: ops\n    token_sha256: {sha}\n    roles: [admin]\n",
         "caller ops: role admin was split into operations .* and privacy"),
        ("callers:\n  - name: web\n    certificate: {cn: x}\n    roles: [decide]\n", "certificate takes"),
        ("callers:\n  - name: web\n    certificate: {}\n    token_sha256: " + sha + "\n    roles: [decide]\n",
         "certificate takes"),
        (f"callers:\n  - name: 'web {{x}}'\n    token_sha256: {sha}\n    roles: [decide]\n", "must be 1-64 letters"),
        (f"callers:\n  - name: web\n    token_sha256: {sha}\n    roles: [decide]\n    expires: 2027-03-01\n",
         "caller web: expires: expected a date and time with its zone.*a date without a time"),
        (f"callers:\n  - name: web\n    token_sha256: {sha}\n    roles: [decide]\n    expires: 2027-03-01T00:00:00\n",
         "with its zone"),
        (f"callers:\n  - name: a\n    token_sha256: {sha}\n    roles: [decide]\n  - name: b\n    token_sha256: {sha}\n"
         "    roles: [decide]\n", "caller b: the same token_sha256"),
        (f"callers:\n  - name: web\n    token_sha256: {sha}\n    roles: [decide]\n    rate_limit: {{per_second: .inf}}\n",
         "per_second must be > 0"),
        ("callers: []\nopen: [metrics]\n", "open must be"),
        ("callers: [\n", "cannot read"),
        ("callers: []\nexpires: 2026-13-01\n", "cannot read.*month must be in 1..12"),  # ValueError escaped
        ("callers: " + "[" * 5_000 + "]" * 5_000 + "\n", "cannot read"),  # RecursionError escaped
    ):
        path.write_text(text)
        with pytest.raises(SecurityError, match=words) as err:
            load_auth(path)
        assert str(path) in str(err.value)
    path.write_text(f"callers:\n  - name: web\n    token_sha256: {sha}\n    roles: [decide]\n"
                    "    expires: 2027-03-01T00:00:00Z\n")
    assert load_auth(path).callers[0].expiry() == "2027-03-01T00:00:00Z"
    assert load_auth(path).callers[0].per_second == 2000.0  # the default limit
    assert local_policy(None).callers == ()


def test_a_rotated_certificate_is_served_without_a_restart(redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    old_ca, new_ca = CA(tmp_path / "old"), CA(tmp_path / "new", "new CA")
    old_ca.issue("server", "nba.test", server=True, into=live)
    tls = ServerCertificates(live / "server.crt", live / "server.key")
    with served(redis_url, models_dir, tls=tls) as (_, port):
        address = f"127.0.0.1:{port}"
        with open_channel(address, tls_ca=old_ca.pem) as channel:
            assert _code(_calls(channel)["decide"]) == OK
        rotated = new_ca.issue("server", "nba.test", server=True, into=tmp_path / "staged")
        for src, dst in ((rotated.key, live / "server.key"), (rotated.cert, live / "server.crt")):
            os.replace(src, dst)  # the way a certificate manager swaps files in
        with open_channel(address, tls_ca=new_ca.pem) as channel:
            assert _code(_calls(channel)["decide"]) == OK
        with open_channel(address, tls_ca=old_ca.pem) as channel:
            assert _code(_calls(channel)["decide"]) == grpc.StatusCode.UNAVAILABLE


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
