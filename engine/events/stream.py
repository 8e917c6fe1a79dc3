"""The ingest stream: systems that write events in bulk XADD them to ``nba:stream:events:in``.

Each server process reads it in a consumer group (one background thread, ``XREADGROUP``) and feeds
every entry to the same ``EventProcessor.publish`` as ``PublishEvent``, then ``XACK``s it. Entries a
dead consumer left pending are taken over with ``XAUTOCLAIM`` after ``CLAIM_IDLE_MS``. An entry that
is not a valid event is acknowledged and copied to ``nba:stream:events:invalid`` with the error.

Entry fields: ``event_id``, ``customer_id``, ``type``, optional ``ts`` (epoch seconds) and one
``attr.<name>`` per attribute, as ``PublishEvent`` logs them in ``nba:stream:events``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import cast

import redis

from engine import metrics
from engine.decision.request import InvalidRequest
from engine.events.processor import EventProcessor
from engine.store.profiles import STREAM_MAXLEN, StreamReadReply

log = logging.getLogger(__name__)

INGEST_STREAM = "nba:stream:events:in"
INVALID_STREAM = "nba:stream:events:invalid"
GROUP = "nba-events"
CLAIM_IDLE_MS = 30_000
BATCH = 100


def parse_entry(fields: dict[bytes, bytes]) -> tuple[str, str, str, dict[str, str], float | None]:
    f = {k.decode(): v.decode() for k, v in fields.items()}
    attrs = {k[5:]: v for k, v in f.items() if k.startswith("attr.")}
    ts = f.get("ts")
    try:
        ts_value = float(ts) if ts else None
    except ValueError:
        raise InvalidRequest("ts", f'"{ts}" is not epoch seconds') from None
    return f.get("event_id", ""), f.get("customer_id", ""), f.get("type", ""), attrs, ts_value


class EventStreamConsumer:
    def __init__(self, client: redis.Redis, processor: EventProcessor, stream: str = INGEST_STREAM,
                 group: str = GROUP, block_ms: int = 500, claim_idle_ms: int = CLAIM_IDLE_MS,
                 consumer: str = "") -> None:
        self.client = client
        self.processor = processor
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_claim = 0.0

    def start(self) -> EventStreamConsumer:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._thread = threading.Thread(target=self._run, name="event-stream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.read_once()
            except redis.exceptions.RedisError as exc:
                if self._stop.is_set():  # shutting down: Redis may already be gone
                    return
                metrics.REDIS_ERRORS.labels("event_stream").inc()
                log.warning("ingest stream: %s", exc)
                self._stop.wait(1.0)

    def read_once(self) -> int:
        """Take over stuck entries (now and then), then read and process one batch; returns entries done."""
        done = 0
        now = time.monotonic()
        if now - self._last_claim > self.claim_idle_ms / 1000 / 2:
            self._last_claim = now
            claimed = self.client.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0",
                                             count=BATCH)
            done += self._handle(claimed[1])
        reply = cast(StreamReadReply,
                     self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=BATCH, block=self.block_ms))
        for _stream, entries in reply or ():
            done += self._handle(entries)
        return done

    def _handle(self, entries) -> int:
        ids = []
        for entry_id, fields in entries:
            if fields is None:  # deleted meanwhile
                ids.append(entry_id)
                continue
            try:
                event_id, customer_id, event_type, attrs, ts = parse_entry(fields)
                self.processor.publish(event_id, customer_id, event_type, attrs, ts, source="stream")
            except InvalidRequest as exc:
                self._invalid(entry_id, fields, str(exc))
            except redis.exceptions.RedisError:
                raise  # left pending: claimed again later
            except Exception as exc:
                log.exception("ingest entry %s failed", entry_id)
                self._invalid(entry_id, fields, f"{type(exc).__name__}: {exc}")
            ids.append(entry_id)
        if ids:
            self.client.xack(self.stream, self.group, *ids)
        return len(ids)

    def _invalid(self, entry_id, fields: dict, error: str) -> None:
        copy = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        copy.update({"error": error, "entry": entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)})
        self.client.xadd(INVALID_STREAM, copy, maxlen=STREAM_MAXLEN, approximate=True)
