"""Fault drills under open-loop load: what callers get while Redis, a worker or the whole service fails.

Starts its own redis-server (``EmbeddedRedis``: append-only file on, ``--fsync`` policy) on a fixed
loopback port and ``nba serve --workers 2`` on it (REDIS_URL; the supervisor seeds the 20,000 demo
customers). One client process sends at a constant arrival rate (open loop: latency counts from each
call's intended send time) over several connections without a retry policy: Decide mostly (customers
and channels as ``loadgen``), RecordResponse for decisions it got back and PublishEvent with event ids
it makes, every call with a gRPC deadline (most 100 ms, some 500 ms). It first finds a sustainable rate
(``--rate`` skips that), then runs one scenario at a time, each after a baseline period:

1. ``redis_sigkill``: SIGKILL redis-server, restart it on the same port and data dir (AOF replay);
   the service must recover without a restart;
2. ``client_pause``: ``CLIENT PAUSE 2000`` (all clients);
3. ``worker_sigkill``: SIGKILL one worker (pid from ``AdminService.GetStatus``); the supervisor
   starts another;
4. ``burst_3x``: three times the sustainable rate for 10 s;
5. ``maxmemory``: ``CONFIG SET maxmemory`` just above what is used and filler keys from a side client,
   so Redis refuses writes (OOM) for ``--oom-seconds``; then maxmemory 0 and the filler deleted;
6. ``service_sigterm``: SIGTERM to ``nba serve`` (it drains and stops), then start it again.

Afterwards the service is stopped, redis-server is killed with SIGKILL once more and restarted from its
append-only file, and every acknowledged write is looked up by id: a RecordResponse that returned OK in
its decision record (``r:<action>:<outcome>`` = the response id) and in ``nba:stream:responses``; a
PublishEvent that returned OK in ``nba:stream:events`` (its stream id) and the customer's event ids;
a Decide that returned OK, not degraded: its decision record, ``engine.decision.records`` (the impressions
and budget units are written by the same script). Separately, every Decide that returned OK is looked up by
its decision id in the decision stream ``nba:stream:decisions`` (every shard): that entry is written
after the reply by a background thread (``engine.store.decision_log``, best-effort by design,
engine/deploy/README.md "Durability"), so its losses are reported as ``decision_log_lost``, next to what the service counted
dropping (``nba_redis_errors_total{operation="decision_log"}`` per batch Redis refused,
``{operation="decision_log_full"}`` per record its queue had no room for; read from its ``/metrics``),
not as acknowledged writes lost. Per scenario (from the fault's start to the end of its observation)
the JSON has requests, ok, degraded, errors by code, p99, deadline misses, recovery time,
acknowledged writes lost and decision-log entries lost. Every loop is bounded in time; the whole run
took 3.5 minutes here.

    .venv/bin/python loadtest/faults.py --json /tmp/faults.json
    .venv/bin/python loadtest/faults.py --rate 150 --only redis_sigkill,client_pause --json /tmp/f.json

Two longer reliability runs are modes of this tool (their code in ``loadtest/reliability/``): ``--soak``, the
service under a steady open-loop mix for a long run, with memory, descriptors and p99 per interval and
their slopes; ``--durability``, what Redis's ``appendfsync always`` costs against ``everysec`` for
Decide, RecordResponse and PublishEvent, two servers alternating request by request.

    .venv/bin/python loadtest/faults.py --soak --rate 200 --duration 1800 --json /tmp/soak.json
    .venv/bin/python loadtest/faults.py --durability --rate 150 --duration 20 --rounds 4 --json /tmp/durability.json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))
# This process forks redis-server (subprocess with preexec_fn) while its gRPC threads carry the load; gRPC's
# fork handlers then abort the child ("Check failed: next_worker->state == KICKED"). It never uses gRPC in a
# forked child, so it turns them off (before grpc is imported; the service does not inherit this).
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

import grpc  # noqa: E402
import redis  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from harness import args as common  # noqa: E402
from loadgen import CHANNEL_MIX, TOUCHPOINTS  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from engine.api.nba.v1 import nba_pb2 as pb  # noqa: E402
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc  # noqa: E402
from engine.decision import records  # noqa: E402
from engine.decision.codes import Codes  # noqa: E402
from engine.events.processor import event_ids_key  # noqa: E402
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, RESPONSES_STREAM  # noqa: E402
from engine.store.redis_embedded import EmbeddedRedis, free_port  # noqa: E402
from engine.store.slots import customer_shard_key  # noqa: E402
from engine.store.streams import xrange_all  # noqa: E402

SCENARIOS = ("redis_sigkill", "client_pause", "worker_sigkill", "burst_3x", "maxmemory", "service_sigterm")
DECIDE, RESPOND, EVENT = 0, 1, 2
METHODS = ("Decide", "RecordResponse", "PublishEvent")
OUTCOMES = (pb.OUTCOME_IMPRESSION, pb.OUTCOME_CLICKED, pb.OUTCOME_ACCEPTED, pb.OUTCOME_REJECTED)
OUTCOME_NAME = {pb.OUTCOME_IMPRESSION: "impression", pb.OUTCOME_CLICKED: "clicked",
                pb.OUTCOME_ACCEPTED: "accepted", pb.OUTCOME_REJECTED: "rejected"}
# Reconnect quickly after a refused connection (a restarting service): gRPC's default backoff grows to 120 s.
CLIENT_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
FILLER = "nba:faults:filler:"
# What the service counts when the decision log drops entries (nba_redis_errors_total's operation label).
LOG_DROPS = ("decision_log", "decision_log_full")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --- the service -------------------------------------------------------------------------------------


class Service:
    """``nba serve --workers N`` on REDIS_URL as a child process (its output in ``log_path``)."""

    def __init__(self, redis_url: str, port: int, workdir: Path, models_dir: str, workers: int, customers: int,
                 extra: list[str]) -> None:
        self.address = f"127.0.0.1:{port}"
        metrics_port = free_port()  # what the service counted dropping from the decision log (log_drops)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.cmd = [sys.executable, "-m", "engine.cli", "serve", "--workers", str(workers), "--address", self.address,
                    "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
                    "--data-dir", str(workdir / "nba-data"), "--models-dir", models_dir,
                    "--customers", str(customers), *extra]
        self.env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "GRPC_ENABLE_FORK_SUPPORT")
                    } | {"REDIS_URL": redis_url}
        self.log_path = workdir / "serve.log"
        DATA_DIRS[self.address] = workdir / "nba-data"  # its local admin token, for GetStatus (worker_pid)
        self.proc: subprocess.Popen | None = None
        self.workers = workers

    def start(self) -> None:
        out = self.log_path.open("a")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def wait_serving(self, timeout: float = 300) -> float:
        """Seconds until every worker answers GetStatus (new connections spread over the workers)."""
        began = time.monotonic()
        pids: set[int] = set()
        while len(pids) < self.workers:
            if self.proc is None or self.proc.poll() is not None:
                raise SystemExit(f"nba serve exited ({self.log_path})")
            if time.monotonic() - began > timeout:
                raise SystemExit(f"nba serve not serving within {timeout:.0f}s ({self.log_path})")
            pid = worker_pid(self.address)
            if pid:
                pids.add(pid)
            else:
                time.sleep(0.1)
        return time.monotonic() - began

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_drops(self) -> dict[str, float] | None:
        """The decision-log drops this service counted so far (all its workers, dead ones too), or None
        when /metrics does not answer."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        return log_drops_in(text)


def log_drops_in(text: str) -> dict[str, float]:
    """The decision-log drops in a Prometheus exposition: ``nba_redis_errors_total`` by ``LOG_DROPS`` label."""
    out = dict.fromkeys(LOG_DROPS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nba_redis_errors_total" and sample.labels.get("operation") in out:
                out[sample.labels["operation"]] += sample.value
    return out


def check_decision_log(client: Any, decided: list[tuple[str, str]],
                       degraded: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """Per phase: OK Decides (``decided``: not degraded, ``degraded``: flagged degraded; (phase, decision
    id)) looked up in every shard of the decision stream, and how many are missing from it."""
    logged = {fields.get(b"decision_id", b"").decode() for _, fields in xrange_all(client, DECISIONS_STREAM)}
    out: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    for kind, acked in (("decision_log", decided), ("decision_log_degraded", degraded)):
        for phase, decision_id in acked:
            out[phase][f"{kind}_checked"] += 1
            out[phase][f"{kind}_lost"] += decision_id not in logged
    return {phase: dict(v) for phase, v in out.items()}


DATA_DIRS: dict[str, Path] = {}  # a Service's address -> its data directory


def worker_pid(address: str, timeout: float = 1.0, data_dir: Path | None = None) -> int | None:
    """The pid of the worker a new connection reaches, or None (AdminService: with the local admin token
    of ``data_dir``, the server's ``--data-dir``; default: the one a ``Service`` at ``address`` has)."""
    from engine.serving.security import read_local_admin_token

    data_dir = data_dir or DATA_DIRS.get(address)
    token = read_local_admin_token(data_dir) if data_dir else None
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            return pb_grpc.AdminServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=timeout,
                                                          metadata=metadata).worker_pid
    except grpc.RpcError:
        return None


def worker_pids(address: str, wanted: int, timeout: float) -> set[int]:
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < wanted and time.monotonic() < deadline:
        pid = worker_pid(address)
        if pid:
            pids.add(pid)
        time.sleep(0.05)
    return pids


def serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1
    except grpc.RpcError:
        return False


# --- the load ----------------------------------------------------------------------------------------


class Load:
    """Open loop at ``rate`` calls/s (changed on the fly) until ``stop``. Every call is kept as
    [intended, sent, done, kind, deadline s, status code name, degraded]; acknowledged writes with the
    phase in which their OK arrived."""

    def __init__(self, address: str, customers: int, seed: int = 14, connections: int = 4,
                 respond_share: float = 0.1, event_share: float = 0.1, long_deadline_share: float = 0.2) -> None:
        self.rng = random.Random(seed)
        self.customers = customers
        self.respond_share, self.event_share, self.long_share = respond_share, event_share, long_deadline_share
        self.channels = [getattr(pb, name) for name, _ in CHANNEL_MIX]
        self.weights = [share for _, share in CHANNEL_MIX]
        self.conns = [grpc.insecure_channel(address, options=CLIENT_OPTIONS) for _ in range(connections)]
        self.stubs = [pb_grpc.DecisionServiceStub(c) for c in self.conns]
        self.rate = 0.0
        self.phase = "start"
        self.calls: list[list] = []
        self.decided: collections.deque[tuple[str, str]] = collections.deque(maxlen=20_000)
        self.acked_decisions: list[tuple[str, str]] = []  # (phase, decision id)
        self.acked_degraded: list[tuple[str, str]] = []  # (phase, decision id) of OK Decides flagged degraded
        self.acked_responses: list[tuple[str, str, str, str, str]] = []  # (phase, decision, action, outcome, id)
        self.acked_events: list[tuple[str, str, str, str]] = []  # (phase, event id, customer, stream id)
        self.lag_max = 0.0  # how far the sender fell behind its schedule (s)
        self._stop = threading.Event()
        self._n = 0
        self._run_id = f"{int(time.time()):x}"  # event ids unique across runs on one data directory
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> Load:
        # Python's collector would walk every call kept here (over 100,000 lists) with the GIL held, and the
        # sender's stall would show as latency; nothing kept here forms cycles.
        gc.disable()
        self._thread.start()
        return self

    def stop(self, drain: float = 1.0) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(drain)  # the last calls' deadlines (500 ms at most) pass
        for c in self.conns:
            c.close()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            rate = self.rate
            now = time.monotonic()
            if rate <= 0:
                time.sleep(0.01)
                next_t = time.monotonic()
                continue
            if next_t > now:
                time.sleep(next_t - now)
            else:
                self.lag_max = max(self.lag_max, now - next_t)
            self._send(next_t)
            next_t += 1.0 / rate

    def _customer(self) -> str:
        r = self.rng.random()
        if r < 0.05:
            return f"FAULT-NEW-{self._n}"
        return f"C{self.rng.randrange(500 if r < 0.35 else self.customers):07d}"

    def _send(self, intended: float) -> None:
        self._n += 1
        rng = self.rng
        deadline = 0.5 if rng.random() < self.long_share else 0.1
        r = rng.random()
        stub = self.stubs[self._n % len(self.stubs)]
        pick = self.decided.popleft() if r < self.respond_share and self.decided else None
        req: Any
        if pick is not None:
            kind, outcome = RESPOND, rng.choice(OUTCOMES)
            req = pb.RecordResponseRequest(decision_id=pick[0], action_id=pick[1], outcome=outcome)
            key: tuple = (pick[0], pick[1], OUTCOME_NAME[outcome])
            method = stub.RecordResponse
        elif r < self.respond_share + self.event_share:
            kind, customer = EVENT, f"C{rng.randrange(self.customers):07d}"
            event_id = f"fault-{self._run_id}-{self._n}"
            kind_of = rng.random()
            if kind_of < 0.5:
                req = pb.PublishEventRequest(event_id=event_id, customer_id=customer, type="data_usage",
                                             attributes={"used_ratio": f"{rng.uniform(0, 0.95):.2f}"})
            elif kind_of < 0.8:
                req = pb.PublishEventRequest(event_id=event_id, customer_id=customer, type="contact_request",
                                             attributes={"topic": rng.choice(("billing", "technical", "sales"))})
            else:
                req = pb.PublishEventRequest(event_id=event_id, customer_id=customer, type="call_completed")
            key = (event_id, customer)
            method = stub.PublishEvent
        else:
            kind = DECIDE
            channel = rng.choices(self.channels, self.weights)[0]
            req = pb.DecideRequest(customer_id=self._customer(), channel=channel,
                                   touchpoint=TOUCHPOINTS[pb.Channel.Name(channel)], max_actions=3)
            key = ()
            method = stub.Decide
        rec = [intended, time.monotonic(), 0.0, kind, deadline, "", False]
        self.calls.append(rec)
        try:
            fut = method.future(req, timeout=deadline)
        except Exception as exc:  # noqa: BLE001 - a channel that cannot even start the call
            rec[2], rec[5] = time.monotonic(), type(exc).__name__
            return
        fut.add_done_callback(lambda f: self._done(f, rec, key))

    def _done(self, fut, rec: list, key: tuple) -> None:
        rec[2] = time.monotonic()
        exc = fut.exception()
        if exc is not None:
            rec[5] = exc.code().name if hasattr(exc, "code") else type(exc).__name__
            return
        rec[5] = "OK"
        reply, phase = fut.result(), self.phase
        if rec[3] == DECIDE:
            rec[6] = reply.degraded
            if not reply.degraded:
                self.acked_decisions.append((phase, reply.decision_id))
                if reply.actions:
                    self.decided.append((reply.decision_id, reply.actions[0].action_id))
            elif reply.decision_id:
                self.acked_degraded.append((phase, reply.decision_id))
        elif rec[3] == RESPOND:
            self.acked_responses.append((phase, *key, reply.response_id))
        elif not reply.duplicate:
            self.acked_events.append((phase, key[0], key[1], reply.stream_id))

    def table(self, start: float = 0.0, end: float = float("inf")) -> dict[str, np.ndarray]:
        """The answered calls intended in [start, end) (the list is in intended order)."""
        calls = self.calls
        lo = bisect.bisect_left(calls, start, key=lambda c: c[0])
        hi = bisect.bisect_left(calls, end, key=lambda c: c[0])
        done = [c for c in calls[lo:hi] if c[5]]  # a call still without an answer has none yet
        a = np.array([c[:5] for c in done], dtype=float).reshape(-1, 5)
        return {"intended": a[:, 0], "sent": a[:, 1], "done": a[:, 2], "kind": a[:, 3].astype(int),
                "deadline": a[:, 4], "code": np.array([c[5] for c in done]),
                "degraded": np.array([c[6] for c in done], dtype=bool)}


# --- figures -----------------------------------------------------------------------------------------


def window(t: dict[str, np.ndarray], start: float, end: float) -> dict[str, np.ndarray]:
    m = (t["intended"] >= start) & (t["intended"] < end)
    return {k: v[m] for k, v in t.items()}


def p(ms: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(ms, q)), 3) if len(ms) else None


def summary(w: dict[str, np.ndarray]) -> dict:
    ok = w["code"] == "OK"
    latency_ms = (w["done"] - w["intended"]) * 1000
    took = w["done"] - w["sent"]
    errors = collections.Counter(w["code"][~ok].tolist())
    late = ok & (took > w["deadline"])
    over_ms = (took - w["deadline"])[late] * 1000
    missed = w["code"] == "DEADLINE_EXCEEDED"
    out = {
        "requests": int(len(ok)), "ok": int(ok.sum()), "degraded": int((ok & w["degraded"]).sum()),
        "errors_by_code": dict(sorted(errors.items())),
        "p50_ms": p(latency_ms[ok], 50), "p99_ms": p(latency_ms[ok], 99), "max_ms": p(latency_ms[ok], 100),
        "sender_lag_max_ms": p((w["sent"] - w["intended"]) * 1000, 100),
        "answered_after_deadline": int(late.sum()),
        "answered_after_deadline_max_over_ms": p(over_ms, 100),
        "deadline_exceeded": {f"{int(d * 1000)}ms": int((missed & (w["deadline"] == d)).sum())
                              for d in sorted(set(w["deadline"].tolist()))},
    }
    by_method: dict[str, dict] = {}
    out["by_method"] = by_method
    for kind, name in enumerate(METHODS):
        k = w["kind"] == kind
        if k.any():
            by_method[name] = {
                "requests": int(k.sum()), "ok": int((ok & k).sum()), "degraded": int((ok & k & w["degraded"]).sum()),
                "errors_by_code": dict(sorted(collections.Counter(w["code"][k & ~ok].tolist()).items())),
                "p50_ms": p(latency_ms[ok & k], 50), "p99_ms": p(latency_ms[ok & k], 99),
            }
    return out


def good(w: dict[str, np.ndarray], slo_ms: float) -> bool:
    """A window meets the SLO: every call answered OK, no Decide degraded, p99 of all calls <= slo_ms."""
    if not len(w["code"]) or (w["code"] != "OK").any() or w["degraded"].any():
        return False
    return float(np.percentile((w["done"] - w["intended"]) * 1000, 99)) <= slo_ms


def timeline(t: dict[str, np.ndarray], start: float, end: float) -> list[list]:
    """One-second windows from ``start``: [offset s, calls, not OK, degraded, p99 ms of the OK ones, how far
    the client's sender fell behind its schedule (ms, max)]."""
    rows = []
    s = start
    while s + 1 <= end + 1e-9:
        w = window(t, s, s + 1)
        ok = w["code"] == "OK"
        rows.append([round(s - start), int(len(ok)), int((~ok).sum()), int((ok & w["degraded"]).sum()),
                     p((w["done"] - w["intended"])[ok] * 1000, 99), p((w["sent"] - w["intended"]) * 1000, 100)])
        s += 1
    return rows


def recovery(t: dict[str, np.ndarray], fault_end: float, until: float, slo_ms: float, step: float = 0.1) -> float | None:
    """Seconds from ``fault_end`` to the start of the first one-second window that meets the SLO and is
    followed by another that does (windows slide by ``step``); None if none before ``until``."""
    s = fault_end
    while s + 2.0 <= until:
        if good(window(t, s, s + 1), slo_ms) and good(window(t, s + 1, s + 2), slo_ms):
            return round(s - fault_end, 1)
        s += step
    return None


# --- the drills --------------------------------------------------------------------------------------


class Drills:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.redis_dir = workdir / "redis"
        self.redis_port = free_port()
        self.redis = EmbeddedRedis(self.redis_dir, port=self.redis_port, fsync=args.fsync).start()
        extra = ["--max-in-flight", str(args.max_in_flight)] if args.max_in_flight else []
        self.service = Service(self.redis.url, free_port(), workdir, args.models_dir, args.workers, args.customers, extra)
        self.load: Load | None = None
        self.marks: list[tuple] = []
        self.results: list[dict] = []
        self.began = time.monotonic()
        self.drops: dict[str, float] = dict.fromkeys(LOG_DROPS, 0.0)  # over every service run of the drill
        self._drops_seen: dict[str, float] = dict.fromkeys(LOG_DROPS, 0.0)  # the running service's counters
        self.drops_unread = 0  # scrapes /metrics did not answer (the one before a restart: its last counts missed)

    def log_drops(self) -> dict[str, float]:
        """The decision-log drops the service counted since the drill began, across restarts."""
        now = self.service.log_drops()
        if now is None:
            self.drops_unread += 1
            return dict(self.drops)
        for op, value in now.items():
            # a restarted service counts from 0 again
            self.drops[op] += value - self._drops_seen[op] if value >= self._drops_seen[op] else value
            self._drops_seen[op] = value
        return dict(self.drops)

    def admin(self) -> redis.Redis:
        """The fault injector's client: Redis's admin user (INFO, CONFIG, CLIENT PAUSE, the filler keys are
        beyond the service user's ACL)."""
        return redis.Redis.from_url(self.redis.admin_url, socket_timeout=5)

    def restart_redis(self) -> float:
        """After a SIGKILL: the same port and data directory; seconds until it answers (AOF replayed)."""
        assert self.redis.process is not None
        self.redis.process.wait(10)
        self.redis.stop()  # releases the data directory's lock
        began = time.monotonic()
        self.redis = EmbeddedRedis(self.redis_dir, port=self.redis_port, fsync=self.args.fsync).start(timeout=60)
        return time.monotonic() - began

    # -- sustainable rate --

    def find_rate(self) -> tuple[float, list[dict]]:
        """Steps up the rate (4 s each) until a step misses the SLO (any error, degraded answer, or p99 of
        all calls above it); the last step that met it. Bounded by the list of rates."""
        assert self.load is not None
        steps: list[dict] = []
        passed = 0.0
        for rate in self.args.rate_steps:
            ok, s = self._hold(rate, f"rate {rate:g}", 3.0)
            steps.append({"rate": rate, "p99_ms": s["p99_ms"], "errors_by_code": s["errors_by_code"],
                          "degraded": s["degraded"], "met_slo": ok})
            log(f"rate {rate:g}/s: p99 {s['p99_ms']} ms, errors {s['errors_by_code']}, degraded {s['degraded']}"
                f" -> {'ok' if ok else 'missed'}")
            if not ok:
                break
            passed = rate
        # one short step can pass by luck on a shared machine: the rate must hold for 6 s more, else the
        # next lower step is tried (at most three)
        lower = [r for r in self.args.rate_steps if r <= passed][::-1][:3]
        for rate in lower:
            ok, s = self._hold(rate, f"confirm {rate:g}", 5.0)
            steps.append({"rate": rate, "confirm": True, "p99_ms": s["p99_ms"], "errors_by_code": s["errors_by_code"],
                          "degraded": s["degraded"], "met_slo": ok})
            log(f"confirm {rate:g}/s for 5 s: p99 {s['p99_ms']} ms, errors {s['errors_by_code']} -> "
                f"{'ok' if ok else 'missed'}")
            if ok:
                return rate, steps
        return (lower[-1] if lower else self.args.rate_steps[0]), steps

    def _hold(self, rate: float, phase: str, seconds: float) -> tuple[bool, dict]:
        """Load at ``rate`` for a second of settling and ``seconds`` measured: whether it met the SLO, and
        the measured window's summary."""
        assert self.load is not None
        self.load.phase = phase
        self.load.rate = rate
        t0 = time.monotonic()
        time.sleep(seconds + 1.6)
        w = self.load.table(t0 + 1.0, t0 + 1.0 + seconds)
        return good(w, self.args.slo_ms), summary(w)

    # -- one scenario --

    def scenario(self, name: str, fault) -> None:
        """Baseline, the fault (returns when it ends, with details), observation until recovered (two good
        windows after the fault plus a second) or ``--observe`` seconds."""
        assert self.load is not None
        args = self.args
        self.load.phase = f"{name} baseline"
        drops_before = self.log_drops()
        base_start = time.monotonic()
        time.sleep(args.baseline)
        fault_start = time.monotonic()
        self.load.phase = name
        log(f"{name}: fault")
        detail = fault() or {}
        fault_end = time.monotonic()
        log(f"{name}: fault over after {fault_end - fault_start:.1f}s {detail}")
        # Little work in this process while the load runs (its sender shares the GIL): one aligned window a
        # second; three good ones in a row end the observation early. The figures are computed after the run.
        streak, checked = 0, fault_end
        while time.monotonic() - fault_end < args.observe:
            time.sleep(0.25)
            while checked + 1.6 <= time.monotonic():  # answers of calls sent in the window are in by now
                streak = streak + 1 if good(self.load.table(checked, checked + 1), args.slo_ms) else 0
                checked += 1
            if streak >= 3 and time.monotonic() - fault_end >= args.min_observe:
                break
        obs_end = time.monotonic()
        time.sleep(0.1)  # the decision log's last batch of the window (it lingers 20 ms)
        drops = {op: v - drops_before[op] for op, v in self.log_drops().items()}
        self.marks.append((name, base_start, fault_start, fault_end, obs_end, {**detail, "decision_log_drops": drops}))
        log(f"{name}: observed {obs_end - fault_end:.0f}s after the fault")

    def rows(self) -> list[dict]:
        """Per scenario, once the load has stopped (every call answered or past its deadline)."""
        assert self.load is not None
        out = []
        for name, base_start, fault_start, fault_end, obs_end, detail in self.marks:
            table = self.load.table(base_start, obs_end)
            base = summary(window(table, base_start + 0.5, fault_start))
            row = {"scenario": name, **summary(window(table, fault_start, obs_end)),
                   "recovery_s": recovery(table, fault_end, obs_end, self.args.slo_ms),
                   "fault_s": round(fault_end - fault_start, 2), "observed_s": round(obs_end - fault_end, 1),
                   "baseline": {k: base[k] for k in ("requests", "ok", "degraded", "errors_by_code", "p50_ms",
                                                     "p99_ms")},
                   **detail,
                   # [s from the fault's start (negative: baseline), calls, not OK, degraded, p99 ms, sender lag ms]
                   "timeline": [[r[0] - round(fault_start - base_start), *r[1:]]
                                for r in timeline(table, base_start, obs_end)]}
            out.append(row)
            log(f"{name}: requests {row['requests']} ok {row['ok']} degraded {row['degraded']} errors "
                f"{row['errors_by_code']} p99 {row['p99_ms']} ms recovery {row['recovery_s']} s")
        return out

    def redis_sigkill(self) -> dict:
        assert self.redis.process is not None
        pid = self.redis.process.pid
        os.kill(pid, signal.SIGKILL)
        time.sleep(self.args.redis_down)
        replay = self.restart_redis()
        return {"redis_down_s": self.args.redis_down, "restart_s": round(replay, 2)}

    def client_pause(self) -> dict:
        self.admin().execute_command("CLIENT", "PAUSE", 2000)
        time.sleep(2.0)
        return {}

    def worker_sigkill(self) -> dict:
        pids = worker_pids(self.service.address, self.args.workers, 10)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        replaced = None
        deadline = killed + 150
        while time.monotonic() < deadline:  # the supervisor notices within 0.5 s and starts another
            now_pids = worker_pids(self.service.address, self.args.workers, 2)
            if victim not in now_pids and len(now_pids - pids) >= 1:
                replaced = round(time.monotonic() - killed, 1)
                break
            time.sleep(0.5)
        return {"worker_replaced_s": replaced}  # the fault: one worker fewer, until its replacement answers

    def burst_3x(self) -> dict:
        assert self.load is not None
        rate = self.load.rate
        self.load.rate = 3 * rate
        time.sleep(10.0)
        self.load.rate = rate
        return {"burst_rate": 3 * rate}

    def maxmemory(self) -> dict:
        admin = self.admin()
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used + 2 * 1024 * 1024)
        filler, refused_at = 0, None
        value = b"x" * 65536
        try:
            while filler < 2000:  # 128 MB at most; normally OOM after about 32
                try:
                    admin.set(f"{FILLER}{filler}", value)
                    filler += 1
                except redis.exceptions.OutOfMemoryError:
                    refused_at = filler
                    break
            time.sleep(self.args.oom_seconds)
        finally:
            admin.config_set("maxmemory", 0)
            for start in range(0, filler, 500):
                admin.unlink(*[f"{FILLER}{i}" for i in range(start, min(filler, start + 500))])
        return {"filler_keys": filler, "writes_refused": refused_at is not None, "oom_s": self.args.oom_seconds}

    def service_sigterm(self) -> dict:
        assert self.service.proc is not None
        self.log_drops()  # what this service counted, before its counters go with it
        self.service.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        try:
            code = self.service.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.service.proc.kill()
            code = self.service.proc.wait()
        stopped = time.monotonic() - began
        self.service.proc = None
        self._drops_seen = dict.fromkeys(LOG_DROPS, 0.0)
        self.service.start()
        up = self.service.wait_serving(timeout=240)
        return {"stopped_s": round(stopped, 1), "exit_code": code, "restarted_s": round(up, 1)}

    # -- acknowledged writes --

    def check_acknowledged(self) -> dict[str, dict[str, int]]:
        """Each acknowledged write looked up by id; per phase: checked and lost, by kind."""
        assert self.load is not None
        client = self.admin()
        out: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))

        def batched(items: list, lookup, lost) -> None:
            for start in range(0, len(items), 1000):
                chunk = items[start:start + 1000]
                pipe = client.pipeline(transaction=False)
                for item in chunk:
                    lookup(pipe, item)
                replies = pipe.execute()
                for i, item in enumerate(chunk):
                    out[item[0]][lost[0] + "_checked"] += 1
                    if lost[1](replies, i, item):
                        out[item[0]][lost[0] + "_lost"] += 1

        codes = Codes(client)

        def mark(raw: bytes | None, r: tuple) -> str | None:  # the stream id the record holds for the response
            return None if raw is None else records.decode(codes, r[1], raw.decode()).get(f"r:{r[2]}:{r[3]}")

        batched(self.load.acked_responses,
                lambda pipe, r: (pipe.hget(*records.location(r[1])), pipe.xrange(RESPONSES_STREAM, r[4], r[4])),
                ("responses", lambda rep, i, r: mark(rep[2 * i], r) != r[4] or not rep[2 * i + 1]))
        batched(self.load.acked_events,
                lambda pipe, e: (pipe.xrange(customer_shard_key(EVENTS_STREAM, e[2], client), e[3], e[3]),
                                 pipe.zscore(event_ids_key(e[2]), e[1])),
                ("events", lambda rep, i, e: not rep[2 * i] or rep[2 * i + 1] is None))
        batched(self.load.acked_decisions, lambda pipe, d: pipe.hexists(*records.location(d[1])),
                ("decisions", lambda rep, i, d: not rep[i]))
        # the decision log is best-effort: its entries are checked and reported, but not as acknowledged writes
        for phase, counts in check_decision_log(client, self.load.acked_decisions, self.load.acked_degraded).items():
            out[phase].update(counts)
        return {phase: dict(v) for phase, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(__doc__)
    common.add_modes(ap, {"--soak": "the soak (loadtest/reliability/soak.py)",
                          "--durability": "appendfsync always against everysec (loadtest/reliability/durability.py)"})
    common.add_json(ap)
    ap.add_argument("--rate", type=float, help="calls/s (drills and --soak: default find the sustainable rate first; "
                                               "--soak offers --fraction of it; --durability: in total, default 150)")
    ap.add_argument("--rate-steps", type=lambda s: [float(x) for x in s.split(",")],
                    default=[50, 100, 150, 200, 250, 300, 350, 400, 500, 600, 700, 800])
    ap.add_argument("--slo-ms", type=float, default=10.0,
                    help="p99 of all calls per one-second window (default 10: with 2 workers on 2 cores no rate "
                         "holds 5 ms); --soak: the Decide p99 the found sustainable rate meets")
    ap.add_argument("--only", help="comma-separated scenarios (default: all, in order)")
    ap.add_argument("--workers", type=int, default=2, help="nba serve --workers (--durability: always 1)")
    ap.add_argument("--max-in-flight", type=int, help="nba serve --max-in-flight (default: the service's)")
    common.add_customers(ap)
    common.add_models_dir(ap, "/tmp/nba-models")
    ap.add_argument("--fsync", choices=("everysec", "always"), default="everysec", help="the Redis appendfsync")
    ap.add_argument("--baseline", type=float, default=5.0, help="seconds before each fault")
    ap.add_argument("--observe", type=float, default=30.0, help="at most this many seconds after a fault")
    ap.add_argument("--min-observe", type=float, default=8.0)
    ap.add_argument("--redis-down", type=float, default=1.0, help="seconds between the SIGKILL and the restart")
    ap.add_argument("--oom-seconds", type=float, default=5.0, help="seconds Redis refuses writes")
    ap.add_argument("--respond-share", type=float, default=0.1, help="share of calls that are RecordResponse")
    ap.add_argument("--event-share", type=float, help="share of calls that are PublishEvent (default 0.1; --soak 0.07)")
    ap.add_argument("--calls", help="also write every call (times, method, deadline, code) here (.npz)")
    ap.add_argument("--workdir", help="keep the data and the service log here (default: a temporary directory)")
    ap.add_argument("--duration", type=float,
                    help="--soak: soak seconds (60..14400, default 1800); --durability: measured seconds per round (default 20)")
    common.add_rounds(ap, 4, "--durability: rounds, the modes' order alternating")
    ap.add_argument("--warmup", type=float, default=2, help="--durability: seconds of each round not measured")
    ap.add_argument("--fraction", type=float, default=0.5, help="--soak: share of the sustainable rate offered")
    ap.add_argument("--interval", type=float, default=60, help="--soak: seconds per recorded row")
    ap.add_argument("--window", type=float, default=1200, help="--soak: slopes over the last this many seconds")
    common.add_processes(ap)
    ap.add_argument("--decide-deadline", type=float, default=0.25, help="--soak: seconds")
    ap.add_argument("--other-deadline", type=float, default=0.5, help="--soak: RecordResponse / PublishEvent deadline, s")
    args = ap.parse_args(argv)
    if args.soak:
        from reliability import soak

        args.event_share = 0.07 if args.event_share is None else args.event_share
        return soak.run(args, argv)
    if args.durability:
        from reliability import durability

        return durability.run(args)
    args.event_share = 0.1 if args.event_share is None else args.event_share
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nba-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    drills = Drills(args, workdir)
    try:
        log(f"redis-server pid {drills.redis.pid} on port {drills.redis_port} (appendfsync {args.fsync}); "
            f"starting nba serve --workers {args.workers} (log {drills.service.log_path})")
        drills.service.start()
        up = drills.service.wait_serving()
        log(f"serving after {up:.1f}s on {drills.service.address}")
        drills.load = load = Load(drills.service.address, args.customers, respond_share=args.respond_share,
                                  event_share=args.event_share).start()
        load.rate = args.rate_steps[0]
        time.sleep(3.0)  # connections, warm paths
        steps: list[dict] = []
        if args.rate:
            rate = args.rate
        else:
            rate, steps = drills.find_rate()
            log(f"sustainable rate: {rate:g} calls/s")
        load.rate = rate
        for name in names:
            drills.scenario(name, getattr(drills, name))
        load.phase = "end"
        time.sleep(1.0)
        load.stop()
        drills.results = drills.rows()
        if args.calls:
            marks = {name: [b, s, e, o] for name, b, s, e, o, _ in drills.marks}
            arrays: dict[str, Any] = {"marks": np.array(json.dumps(marks)), **load.table()}
            np.savez_compressed(args.calls, **arrays)
        drills.log_drops()
        drills.service.stop()
        # the strongest check: everything acknowledged must be in the append-only file, so kill once more
        assert drills.redis.process is not None
        os.kill(drills.redis.process.pid, signal.SIGKILL)
        drills.restart_redis()
        acked = drills.check_acknowledged()
        for row in drills.results:
            phases = [acked.get(row["scenario"], {}), acked.get(f"{row['scenario']} baseline", {})]
            for kind in ("responses", "events", "decisions", "decision_log", "decision_log_degraded"):
                row[f"{kind}_acknowledged"] = sum(ph.get(f"{kind}_checked", 0) for ph in phases)
                row[f"{kind}_lost"] = sum(ph.get(f"{kind}_lost", 0) for ph in phases)
            row["acknowledged_lost"] = row["responses_lost"] + row["events_lost"]
            row["decision_log_drops_counted"] = row.pop("decision_log_drops")
        totals = {k: sum(ph.get(k, 0) for ph in acked.values())
                  for k in ("responses_checked", "responses_lost", "events_checked", "events_lost",
                            "decisions_checked", "decisions_lost", "decision_log_checked", "decision_log_lost",
                            "decision_log_degraded_checked", "decision_log_degraded_lost")}
        result = {
            "command": " ".join(["loadtest/faults.py", *sys.argv[1:]]),
            "rate": rate, "rate_steps": steps, "slo_ms": args.slo_ms, "workers": args.workers,
            "rate_confirmed": bool(args.rate) or any(s.get("confirm") and s["met_slo"] for s in steps),
            "max_in_flight": args.max_in_flight or "default",
            "fsync": args.fsync, "deadlines": "80% 100 ms, 20% 500 ms",
            "mix": f"Decide {1 - args.respond_share - args.event_share:.0%}, RecordResponse {args.respond_share:.0%} "
                   f"(for decisions answered before), PublishEvent {args.event_share:.0%}",
            "sender_lag_max_s": round(load.lag_max, 3), "seconds": round(time.monotonic() - drills.began, 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "acknowledged_total": totals, "acknowledged_by_phase": acked,
            "decision_log_drops_counted": drills.drops, "metrics_unread": drills.drops_unread,
            "scenarios": drills.results,
            "notes": NOTES,
        }
    finally:
        if drills.load is not None and not drills.load._stop.is_set():
            drills.load.stop(drain=0)
        drills.service.stop()
        drills.redis.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(r["acknowledged_lost"] == 0 for r in result["scenarios"]) else 1


NOTES = {
    "window": "counts and p99 cover the calls sent from the fault's start to the end of its observation; "
              "baseline: the seconds before the fault",
    "p99_ms": "of answered calls (OK), all methods, from each call's intended send time (open loop)",
    "sender_lag_max_ms": "how far the client's sender fell behind its schedule (the client shares the 2 cores): "
                         "latency counts from the intended time, so a stalled client shows up as latency too",
    "answered_after_deadline": "OK answers whose client-measured time from the call to its answer exceeded the "
                               "call's deadline; gRPC enforces the deadline in the client, so a late answer "
                               "arrives as DEADLINE_EXCEEDED instead: those are counted in deadline_exceeded, by "
                               "the call's deadline, and in errors_by_code",
    "recovery_s": "from the fault's end to the first one-second window (sliding by 0.1 s) that, with the next "
                  "one, has every call OK, no degraded Decide and p99 <= slo_ms; null: not within the observation",
    "acknowledged_lost": "RecordResponse and PublishEvent calls answered OK whose response (decision record field "
                         "r:<action>:<outcome> = the response id, and the entry in nba:stream:responses) or event "
                         "(its entry in nba:stream:events, and the customer's event ids) is missing after the run, "
                         "the service stopped, and redis-server killed with SIGKILL and restarted from its "
                         "append-only file; decisions_lost: Decide answered OK and not degraded whose decision "
                         "record is missing (the same script counts impressions and budget units)",
    "decision_log_lost": "Decide answered OK, not degraded, whose decision id is in no shard of nba:stream:decisions "
                         "after the run (decision_log_degraded_lost: the same for OK answers flagged degraded). "
                         "That entry is written by a background thread after the reply (engine.store.decision_log), "
                         "best-effort: lost when Redis refuses its batch, when its queue is full, or when the worker "
                         "dies with entries queued. Not an acknowledged write: the decision record (decisions_lost) "
                         "is. decision_log_drops_counted: what the service's /metrics counted meanwhile, "
                         "nba_redis_errors_total{operation=decision_log} once per refused batch (not per entry), "
                         "{operation=decision_log_full} once per entry; a worker killed with entries queued counts "
                         "nothing",
    "worker_sigkill": "the fault lasts from the kill until GetStatus answers from a new worker pid "
                      "(worker_replaced_s); meanwhile the other worker serves",
    "service_sigterm": "the fault ends when every worker of the restarted service answers",
    "burst_3x": "runs 10 s after worker_sigkill: the client's connections went to the surviving worker while "
                "its replacement started, and come back only as the server makes clients reconnect (about "
                "every 30 s), so the burst lands mostly on one worker; past what that worker's gRPC polling "
                "thread can turn away, calls wait in gRPC's C core and miss their deadline "
                "(deadline_exceeded). --only burst_3x measures a burst on balanced workers",
}


def print_table(result: dict) -> None:
    cols = ("scenario", "requests", "ok", "degraded", "errors_by_code", "p99_ms", "answered_after_deadline",
            "deadline_exceeded", "recovery_s", "acknowledged_lost", "decision_log_lost")
    print(f"rate {result['rate']:g} calls/s, SLO p99 {result['slo_ms']:g} ms, appendfsync {result['fsync']}, "
          f"{result['seconds']:.0f} s")
    print(" | ".join(cols))
    for r in result["scenarios"]:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"acknowledged: {result['acknowledged_total']}")
    print(f"decision-log drops the service counted: {result['decision_log_drops_counted']}")


if __name__ == "__main__":
    raise SystemExit(main())
