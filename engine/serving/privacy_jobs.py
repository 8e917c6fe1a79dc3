"""Forget and export as audited jobs, run off the gRPC call slots.

``ForgetCustomer`` / ``ExportCustomer`` queue a job in Redis and answer its id at once;
``GetCustomerJob`` reports its state (queued, running, succeeded, failed), counts and every failure.
A background thread in each worker that served a privacy call (``PrivacyJobs.start``) takes queued
jobs: every queued erasure at once (one pass per stream serves them all, ``privacy.forget_customers``),
then the persistence files (``store.erasure.rewrite_persistence``), then each export.

Jobs survive the worker that took them: a worker takes a job with a lease (``LEASE_MS``) that it
renews while working; a job whose lease ran out (its worker died) is taken again by any worker's
thread, and erasure is safe to run twice (the retaken job's counts are those of its second run, and
it says so in its failures). The thread starts on a worker's first privacy call, including
``GetCustomerJob``, so a caller polling a job whose worker died brings it back.

Keys, all on one slot (``{privacy}``): ``nba:{privacy}:queue`` (sorted set: job ids not finished, by
creation), ``nba:{privacy}:jobs`` (every job kept, by creation) and ``nba:{privacy}:job:<id>`` (hash:
kind, state, customer id while the job waits or runs (deleted before the persistence rewrite, so the
files keep no trace of it), pseudonym, who, times, counts, failures (JSON list), persistence, and an
export's document, kept ``EXPORT_KEEP_MS`` then deleted; a forget deletes the documents of the
customer's earlier exports). Finished erasure jobs are kept ``JOB_KEEP_MS``: the audit trail is the
permanent record.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from engine.features import FeatureSchema
from engine.serving.privacy import check_customer_id, export_customer, forget_customers
from engine.store.archive_fs import Root
from engine.store.audit import audit
from engine.store.erasure import rewrite_persistence
from engine.store.pseudonym import pseudonym

log = logging.getLogger(__name__)

QUEUE_KEY = "nba:{privacy}:queue"
JOBS_KEY = "nba:{privacy}:jobs"
JOB_PREFIX = "nba:{privacy}:job:"
LEASE_MS = 60_000
JOB_KEEP_MS = 7 * 86_400_000
EXPORT_KEEP_MS = 3_600_000
BATCH = 100  # erasures per batch
KINDS = ("forget", "export")

# KEYS[1] queue; ARGV: now ms, lease ms, owner, batch, job key prefix. Takes queued jobs and running
# jobs whose lease ran out; drops ids whose job is gone. Returns {id, previous state, ...}.
_CLAIM = r"""
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local got = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[4]) - 1)) do
  local k = ARGV[5] .. id
  local state = redis.call('HGET', k, 'state')
  local until_ = tonumber(redis.call('HGET', k, 'lease') or '0')
  if not state or state == 'succeeded' or state == 'failed' then redis.call('ZREM', KEYS[1], id)
  elseif state == 'queued' or until_ < now then
    redis.call('HSET', k, 'state', 'running', 'owner', ARGV[3], 'lease', now + lease)
    got[#got + 1] = id
    got[#got + 1] = state
  end
end
return got
"""


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


class JobNotFound(LookupError):
    """No job with that id (never made, or expired)."""


class PrivacyJobs:
    """The job queue and this worker's thread that runs it. ``admin``: a client of the admin Redis user
    for the persistence step (None: left to the operator); ``schema``: the live schema, for exports;
    ``archive``: the archive's root, erased and exported with the streams (None: no archive)."""

    def __init__(self, client: Any, admin: Any | None, schema: Callable[[], FeatureSchema | None],
                 clock: Callable[[], float] = time.time, poll_seconds: float = 0.2,
                 persistence_timeout: float = 300.0, archive: Root | None = None) -> None:
        self.client = client
        self.archive = archive
        self.admin = admin
        self.schema = schema
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.persistence_timeout = persistence_timeout
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- the caller's side --------------------------------------------------------------------

    def submit(self, kind: str, customer_id: str, who: str) -> str:
        """Queue a job; its id. ``InvalidRequest`` for a bad customer id."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        check_customer_id(customer_id)
        job_id = secrets.token_hex(16)
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)  # the service user has no MULTI
        pipe.hset(job_key(job_id), mapping={"kind": kind, "state": "queued", "customer": customer_id,
                                            "pseudonym": pseudonym(customer_id), "who": who,
                                            "created_ms": now_ms, "failures": "[]"})
        pipe.pexpire(job_key(job_id), JOB_KEEP_MS)
        pipe.zadd(QUEUE_KEY, {job_id: now_ms})
        pipe.zadd(JOBS_KEY, {job_id: now_ms})
        pipe.execute()
        audit(self.client, who, f"{kind}_customer_requested", customer=pseudonym(customer_id), job=job_id)
        return job_id

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's fields (``failures`` a list, numbers as ints, never the customer id)."""
        if not job_id or len(job_id) > 64:
            raise JobNotFound(job_id)
        raw = cast("dict[bytes, bytes]", self.client.hgetall(job_key(job_id)))
        if not raw:
            raise JobNotFound(job_id)
        f = {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}
        f.pop("customer", None)
        f["failures"] = json.loads(f.get("failures") or "[]")
        f["job_id"] = job_id
        return f

    # --- the worker's side --------------------------------------------------------------------

    def start(self) -> PrivacyJobs:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="privacy-jobs", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_once() == 0:
                    self._stop.wait(self.poll_seconds)
            except redis.exceptions.RedisError as exc:
                log.warning("privacy jobs: %s", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("privacy jobs")
                self._stop.wait(1.0)

    def _claim(self) -> list[tuple[str, str]]:
        flat = cast("list[bytes]", self.client.eval(_CLAIM, 1, QUEUE_KEY, int(time.time() * 1000), LEASE_MS,
                                                    self.owner, BATCH, JOB_PREFIX))
        return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat) - 1, 2)]

    def _heartbeat(self, job_ids: list[str]) -> None:
        until = int(time.time() * 1000) + LEASE_MS
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hset(job_key(job_id), "lease", until)
        pipe.execute()

    def _finish(self, job_id: str, fields: dict[str, Any], failures: list[str], keep_ms: int) -> None:
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)  # the service user has no MULTI
        pipe.hset(job_key(job_id), mapping={**fields, "failures": json.dumps(failures),
                                            "state": "failed" if failures else "succeeded",
                                            "finished_ms": now_ms})
        pipe.hdel(job_key(job_id), "customer", "owner", "lease")
        pipe.pexpire(job_key(job_id), keep_ms)
        pipe.zrem(QUEUE_KEY, job_id)
        pipe.execute()

    def run_once(self) -> int:
        """Take and run what is queued now; how many jobs were run."""
        claimed = self._claim()
        if not claimed:
            return 0
        jobs: dict[str, dict[str, str]] = {}
        for job_id, previous in claimed:
            raw = cast("dict[bytes, bytes]", self.client.hgetall(job_key(job_id)))
            f = {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}
            if previous == "running":
                f["retaken"] = "1"
            jobs[job_id] = f
        forgets = {j: f for j, f in jobs.items() if f.get("kind") == "forget"}
        if forgets:
            self._forget(forgets)
        for job_id, f in jobs.items():
            if f.get("kind") == "export":
                self._export(job_id, f)
        return len(jobs)

    def _forget(self, jobs: dict[str, dict[str, str]]) -> None:
        ids = list(jobs)
        customers = {f["customer"] for f in jobs.values() if f.get("customer")}
        whos = {f["customer"]: f.get("who", "?") for f in jobs.values() if f.get("customer")}
        for job_id in ids:
            self.client.hset(job_key(job_id), "started_ms", int(time.time() * 1000))
        erased = forget_customers(self.client, customers, who=whos, heartbeat=lambda: self._heartbeat(ids),
                                  archive=self.archive)
        self._drop_exports({pseudonym(c) for c in customers})
        results: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for job_id, f in jobs.items():
            e = erased.get(f.get("customer", ""))
            failures = list(e.failures) if e is not None else ["the job lost its customer id (taken over after "
                                                                 "its erasure ran): run forget again"]
            if f.get("retaken"):
                failures.append("taken over from a worker that stopped: the counts are this run's only")
            counts = {"keys_deleted": e.keys_deleted, "stream_entries_deleted": e.stream_entries_deleted,
                      "members_removed": e.members_removed, "budget_units_returned": e.budget_units_returned,
                      "archive_rows_deleted": e.archive_rows_deleted} \
                if e is not None else {}
            results[job_id] = (counts, failures)
            # before the persistence rewrite: the files must not keep the id through the job either
            self.client.hset(job_key(job_id), mapping={**counts, "state": "running"})
            self.client.hdel(job_key(job_id), "customer")
        self._heartbeat(ids)
        persisted = self._persist(ids)
        for job_id, (counts, failures) in results.items():
            self._finish(job_id, {**counts, "persistence": persisted.summary}, failures + persisted.failures,
                         JOB_KEEP_MS)
            audit(self.client, jobs[job_id].get("who", "?"), "forget_customer_done",
                  customer=jobs[job_id].get("pseudonym", ""), job=job_id, persistence=persisted.summary,
                  failures=len(failures) + len(persisted.failures))

    def _persist(self, ids: list[str]) -> Any:
        done = threading.Event()

        def beat() -> None:  # persistence may take minutes: keep the lease meanwhile
            while not done.wait(LEASE_MS / 3000):
                try:
                    self._heartbeat(ids)
                except redis.exceptions.RedisError:
                    pass

        threading.Thread(target=beat, name="privacy-jobs-lease", daemon=True).start()
        try:
            return rewrite_persistence(self.admin, self.persistence_timeout)
        finally:
            done.set()

    def _drop_exports(self, pseudonyms: set[str]) -> None:
        """The documents of earlier exports of the erased customers are personal data too."""
        for job_id in cast("list[bytes]", self.client.zrange(JOBS_KEY, 0, -1)):
            key = job_key(job_id.decode())
            kind, who = cast("list[bytes | None]", self.client.hmget(key, "kind", "pseudonym"))
            if kind == b"export" and who is not None and who.decode() in pseudonyms:
                self.client.hdel(key, "json")
        self.client.zremrangebyscore(JOBS_KEY, "-inf", int(time.time() * 1000) - JOB_KEEP_MS)

    def _export(self, job_id: str, f: dict[str, str]) -> None:
        customer = f.get("customer", "")
        self.client.hset(job_key(job_id), "started_ms", int(time.time() * 1000))
        try:
            document = export_customer(self.client, customer, who=f.get("who", "?"), now=self.clock(),
                                       schema=self.schema(), archive=self.archive)
        except (redis.exceptions.RedisError, ValueError, OSError) as exc:  # OSError: the archive's files
            self._finish(job_id, {}, [f"export failed: {exc}"], EXPORT_KEEP_MS)
            return
        self._finish(job_id, {"json": json.dumps(document, ensure_ascii=False, sort_keys=True)}, [],
                     EXPORT_KEEP_MS)


__all__ = ["JobNotFound", "PrivacyJobs", "job_key"]
