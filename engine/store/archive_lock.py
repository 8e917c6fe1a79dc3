"""The archive's two locks, and the erasure generation.

- The writer lock: one archive writer per archive, held from ``ArchiveWriter.open`` to ``close``.
- The files lock: held briefly by whoever changes files: the writer around each file it writes (and the
  clean-up of temporary files), an erasure around its pass over a shard's files, compaction around each
  merge. So an erasure never races a writer, or a compaction, on the same files.

On a local directory both are ``flock``s on files in the root (``.lock``, ``.files.lock``): the kernel
drops them when the process dies. Object storage has no lock and fsspec no portable conditional PUT, so
a lock object could not be taken atomically; there both are Redis keys with a lease (``SET NX PX``,
renewed while held, released only by their holder's token): the writer and the service already talk to
that Redis (it holds the streams the archive copies), and a holder that dies frees the lock when its
lease runs out.

The erasure generation (``ERASURES_KEY``, a Redis counter) closes the last gap: the writer holds entries
read from the streams before it writes them; an erasure that rewrote the streams and then the files
meanwhile would miss those. An erasure increments the counter before it releases the files lock; the
writer notes the counter before it reads entries, and under the files lock drops what it holds when the
counter moved (it reads the entries again, from the rewritten streams).
"""

from __future__ import annotations

import fcntl
import hashlib
import secrets
import time
from pathlib import Path
from typing import IO, Any

from engine.errors import NbaError
from engine.store.archive_fs import Root, is_remote, local_path

ERASURES_KEY = "nba:archive:erasures"
WRITER_LEASE_MS = 60_000
FILES_LEASE_MS = 120_000

# KEYS[1] lock; ARGV[1] token, ARGV[2] lease ms (0: release). 1 when the caller holds it (and renewed or
# released it), 0 when it does not.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


class ArchiveLocked(NbaError):
    """The archive's lock is held by another process (named in the message)."""


def _lock_key(root: Root, name: str) -> str:
    digest = hashlib.sha1(str(root).rstrip("/").encode()).hexdigest()[:16]
    return f"nba:archive:{{{digest}}}:{name}"


class Lock:
    """An exclusive lock: ``acquire(wait)`` (``ArchiveLocked`` when still held by another after ``wait``
    seconds), ``renew`` (False when it was lost: a lease ran out), ``release``."""

    def acquire(self, wait: float = 0.0) -> Lock:
        deadline = time.monotonic() + wait
        while not self._try():
            if time.monotonic() >= deadline:
                raise ArchiveLocked(f"{self.what} is held by another process")
            time.sleep(0.02)
        return self

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    what = "the lock"

    def _try(self) -> bool:
        raise NotImplementedError

    def renew(self) -> bool:
        return True

    def release(self) -> None:
        raise NotImplementedError


class FileLock(Lock):
    def __init__(self, path: Path) -> None:
        self.path, self.what = path, f"{path}"
        self._file: IO[str] | None = None

    def _try(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the flock
            self._file = None


class RedisLease(Lock):
    def __init__(self, client: Any, key: str, lease_ms: int) -> None:
        self.client, self.key, self.lease_ms, self.what = client, key, lease_ms, f"Redis lock {key}"
        self.token = secrets.token_hex(16)
        self._held = False

    def _try(self) -> bool:
        self._held = bool(self.client.set(self.key, self.token, nx=True, px=self.lease_ms))
        return self._held

    def renew(self) -> bool:
        if not self._held:
            return False
        self._held = bool(self.client.eval(_RENEW, 1, self.key, self.token, self.lease_ms))
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self.client.eval(_RENEW, 1, self.key, self.token, 0)


def _lock(root: Root, client: Any, name: str, lease_ms: int) -> Lock:
    if is_remote(root):
        return RedisLease(client, _lock_key(root, name), lease_ms)
    base = local_path(root)
    assert base is not None
    return FileLock(base / (".lock" if name == "writer" else f".{name}.lock"))


def writer_lock(root: Root, client: Any) -> Lock:
    return _lock(root, client, "writer", WRITER_LEASE_MS)


def files_lock(root: Root, client: Any) -> Lock:
    return _lock(root, client, "files", FILES_LEASE_MS)


def erasures(client: Any) -> int:
    """The erasure generation (see the module's docstring)."""
    return int(client.get(ERASURES_KEY) or 0)


def erased(client: Any) -> None:
    client.execute_command("INCR", ERASURES_KEY)  # redis-py's incr sends INCRBY, which the service user lacks
