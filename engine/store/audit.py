"""The audit trail: who did what to the service, and when.

Written for administrative actions (rule reloads applied or refused, model changes, customer exports
and erasures). Each record goes to three places:

- the Redis Stream ``nba:stream:audit`` (never trimmed by the service; its entries are ``who``,
  ``action``, ``ts`` (epoch seconds), ``pid`` and the action's own fields). The service's own Redis
  user can delete a stream, so this copy is for reading, not for proof;
- shipped out of Redis as one JSON line per record: to the logger ``nba.audit.trail`` (route it to a
  log pipeline the service cannot rewrite), and, when ``NBA_AUDIT_FILE`` names a file, appended to it
  (opened ``O_APPEND``, created 0600; the service only ever appends: make it append-only for the
  service's user with ``chattr +a`` or ship it with a log agent);
- the service log (``nba.audit``), one line.

Records never carry a customer id: privacy records name the customer by pseudonym
(``store/pseudonym.py``), so the trail proves an erasure without keeping whom it erased.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import redis

from engine.metrics import REDIS_ERRORS

log = logging.getLogger("nba.audit")
trail = logging.getLogger("nba.audit.trail")  # JSON lines, shipped out of Redis

AUDIT_STREAM = "nba:stream:audit"
_file_lock = threading.Lock()


def _append_file(line: str) -> None:
    path = os.environ.get("NBA_AUDIT_FILE", "").strip()
    if not path:
        return
    data = (line + "\n").encode()
    with _file_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)  # one write of one line: O_APPEND keeps concurrent writers' lines whole
        finally:
            os.close(fd)


def log_audit(who: str, action: str, **detail: object) -> dict[str, str]:
    """The audit record, shipped as a JSON line and written to the log (and returned)."""
    fields = {"who": who, "action": action, "ts": f"{time.time():.3f}", "pid": str(os.getpid()),
              **{k: str(v) for k, v in detail.items()}}
    line = json.dumps(fields, sort_keys=True, ensure_ascii=False)
    trail.info("%s", line)
    try:
        _append_file(line)
    except OSError as exc:
        log.error("audit record not appended to NBA_AUDIT_FILE: %s", exc)
    log.info("audit: %s", " ".join(f"{k}={v}" for k, v in fields.items()))
    return fields


def audit(client: redis.Redis, who: str, action: str, **detail: object) -> None:
    fields = log_audit(who, action, **detail)
    try:
        client.xadd(AUDIT_STREAM, fields)  # type: ignore[arg-type]  # redis-py: the key type is invariant
    except redis.exceptions.RedisError as exc:  # the shipped line above still holds it
        REDIS_ERRORS.labels("audit").inc()
        log.error("audit record not stored in %s: %s", AUDIT_STREAM, exc)
