"""The audit trail: who did what to the service, and when, in an append-only Redis Stream and the log.

Written for administrative actions (rule reloads applied or refused, model changes, customer erasures).
The stream is never trimmed by the service; its entries are ``who``, ``action``, ``ts`` (epoch
seconds), ``pid`` and the action's own fields.
"""

from __future__ import annotations

import logging
import os
import time

import redis

from engine.metrics import REDIS_ERRORS

log = logging.getLogger("nba.audit")

AUDIT_STREAM = "nba:stream:audit"


def log_audit(who: str, action: str, **detail: object) -> dict[str, str]:
    """The audit record, written to the log only (and returned)."""
    fields = {"who": who, "action": action, "ts": f"{time.time():.3f}", "pid": str(os.getpid()),
              **{k: str(v) for k, v in detail.items()}}
    log.info("audit: %s", " ".join(f"{k}={v}" for k, v in fields.items()))
    return fields


def audit(client: redis.Redis, who: str, action: str, **detail: object) -> None:
    fields = log_audit(who, action, **detail)
    try:
        client.xadd(AUDIT_STREAM, fields)  # type: ignore[arg-type]  # redis-py: the key type is invariant
    except redis.exceptions.RedisError as exc:  # the log line above still holds it
        REDIS_ERRORS.labels("audit").inc()
        log.error("audit record not stored in %s: %s", AUDIT_STREAM, exc)
