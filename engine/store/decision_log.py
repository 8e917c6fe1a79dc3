"""Writes decisions to a Redis Stream from a background thread, off the hot path (on a Redis Cluster to
the customer's shard of it, ``engine.store.slots.customer_shard_key``)."""

from __future__ import annotations

import logging
import queue
import threading
import time

import redis

from engine.metrics import REDIS_ERRORS
from engine.store.erasure import index_minute, index_record
from engine.store.profiles import DECISIONS_STREAM, STREAM_MAXLEN
from engine.store.slots import customer_shard_key, shard_maxlen

log = logging.getLogger(__name__)

# key, fields, ttl ms, customer, decision id, minute index (``DecisionLog.write_record``)
_Record = tuple[str, dict[str, str], int, str, str, tuple[str, int, int] | None]


class DecisionLog:
    """Batches decision records into pipelined XADDs; drops (and counts) when Redis can't keep up."""

    def __init__(self, client: redis.Redis, stream: str = DECISIONS_STREAM, capacity: int = 100_000,
                 linger: float = 0.02) -> None:
        self.client = client
        self.stream = stream
        self.linger = linger
        self._queue: queue.Queue[dict[str, str] | _Record | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, str]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            REDIS_ERRORS.labels("decision_log_full").inc()

    def write_record(self, key: str, fields: dict[str, str], ttl_ms: int, customer: str = "",
                     decision_id: str = "", minute: tuple[str, int, int] | None = None) -> None:
        """Hash fields written with the next batch (the decision record when contacts are not enforced:
        ``engine.decision.records``), the key living ``ttl_ms``, indexed under ``customer`` by its
        ``minute`` (``erasure.index_minute``'s prefix, minute and cutoff) or else by ``decision_id``."""
        try:
            self._queue.put_nowait((key, fields, ttl_ms, customer, decision_id, minute))
        except queue.Full:
            REDIS_ERRORS.labels("decision_log_full").inc()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, dict):
                # Waking for every decision costs the serving threads the GIL and a Redis round trip
                # each; stream records can wait a few ms to share one. Decision records can't:
                # RecordResponse may come right after the decision.
                time.sleep(self.linger)
            batch = [item]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [r for r in batch if r is not None]
            if records:
                try:
                    pipe = self.client.pipeline(transaction=False)
                    for r in records:
                        # redis-py types fields as a dict / Mapping of every encodable key: invariant, so no dict[str, str]
                        if isinstance(r, tuple):
                            pipe.hset(r[0], mapping=r[1])  # type: ignore[arg-type]
                            pipe.pexpire(r[0], r[2])
                            if r[3] and r[4]:  # the customer's index, as decision/contact.PRESENT keeps it
                                if r[5] is not None:
                                    index_minute(pipe, r[3], *r[5], r[2])
                                else:
                                    index_record(pipe, r[3], "d:" + r[4], r[2])
                        else:
                            stream = customer_shard_key(self.stream, r.get("customer_id", ""), self.client)
                            pipe.xadd(stream, r, maxlen=shard_maxlen(STREAM_MAXLEN, self.client), approximate=True)  # type: ignore[arg-type]
                    pipe.execute()
                except redis.exceptions.RedisError as exc:
                    REDIS_ERRORS.labels("decision_log").inc()
                    log.warning("decision log: %d records lost: %s", len(records), exc)
                except Exception:  # a bug must not end the writer thread: every later record would be lost
                    REDIS_ERRORS.labels("decision_log").inc()
                    log.exception("decision log: %d records lost", len(records))
            if None in batch:
                return

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)
