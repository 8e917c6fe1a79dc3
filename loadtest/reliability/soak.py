"""Soak: the service under a steady open-loop mix for a long run; memory, descriptors and p99 per minute.

Starts its own redis-server (``EmbeddedRedis``, append-only persistence, in a temp dir), seeds the demo
customers, then ``nba serve --workers 2 --no-demo`` on loopback ports (its own copy of the rule files, so
edits in the checkout do not reload it mid-run). Takes the sustainable rate from ``--rate`` or finds it
(``loadgen.find_max``: Decide only, ``--slo-ms``), then offers ``--fraction`` (0.5) of it for ``--duration``
seconds as an open-loop mix of calls, each with a deadline:

- Decide (about 70% of calls): web 40%, mobile app 30%, call center 30%; 500 hot customers get 30% of
  them, unknown customers 5%; 25% carry an interaction id, and 10% of those re-ask a recent interaction
  (a repeat: same customer, interaction and placement).
- RecordResponse (about 23%): impressions for the top action of 40% of web/app decisions (0.2-1 s
  after the answer), and accepted (30%) / rejected for the top action of 5% of decisions (1-5 s after).
- PublishEvent (about 7%): every event type of rules/events.yaml with valid attributes, unique ids.

Every ``--interval`` (60 s) it records: Decide p50/p99 of the calls intended in that minute, errors by
gRPC code and method, degraded answers, the RSS (VmRSS) and open descriptors of each worker (the
children of the ``nba serve`` supervisor), the supervisor's RSS, redis-server's RSS, ``used_memory`` and
AOF size, and the server's degraded-decision counters by cause. Durable-rules sessions are not exported
by the service (each evaluation opens one and deletes it under the ruleset's lock; only
``PatternSet.sessions_open`` counts them, in-process), so the soak records what a leaked session would
cause instead: durable refuses the 1025th live session, which shows as decisions degraded by
``rule_engine`` and failed PublishEvent calls.

At the end it fits least-squares slopes over the last ``--window`` seconds (1200): RSS per hour (MB/h and
% growth over the window), Redis memory per hour, descriptors per hour, p99 drift (ms/h); prints a
table and writes ``--json``.

    python loadtest/faults.py --soak --rate 200 --duration 1800 --json /tmp/soak.json
    python loadtest/faults.py --soak --duration 300 --interval 20 --window 200      # a short try
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from harness.results import write_json
from harness.servers import ROOT, children, wait_serving
from loadgen import Workload, find_max, pick_customer

from engine.store.redis_embedded import EmbeddedRedis, free_port

DECIDE, RESPONSE, EVENT = 0, 1, 2
KINDS = ("Decide", "RecordResponse", "PublishEvent")
CHANNELS = (("CHANNEL_WEB", "web.home.hero", 0.4), ("CHANNEL_MOBILE_APP", "app.home.card", 0.3),
            ("CHANNEL_CALL_CENTER", "call_center.inbound", 0.3))
ON_IMPRESSION = ("CHANNEL_WEB", "CHANNEL_MOBILE_APP")
INTENTS = ("", "", "", "billing", "upgrade", "cancel", "tech_support")
# plausible ranges of the numeric event attributes of rules/events.yaml (others: 0..100)
NUMBER_RANGES = {"amount": (5.0, 150.0), "used_ratio": (0.5, 1.05), "days_left": (1.0, 90.0)}
EVENT_WEIGHTS = {"consent_withdrawn": 0.1}  # it changes a customer's consent for good: rare


@dataclass
class Mix(Workload):
    """What one client process sends (rates are per process); the customers as ``loadgen.Workload``'s."""

    decide_rate: float = 0.0
    event_rate: float = 0.0
    start: float = 0.0
    duration: float = 0.0
    interaction_share: float = 0.25
    repeat_share: float = 0.1
    impression_share: float = 0.4
    answer_share: float = 0.05
    accept_share: float = 0.3
    decide_deadline: float = 0.25
    other_deadline: float = 0.5
    event_types: list[tuple[str, dict, float]] = field(default_factory=list)  # (type, attributes, weight)
    action_ids: list[str] = field(default_factory=list)


def event_types(rules_dir: Path) -> tuple[list[tuple[str, dict, float]], list[str]]:
    """The event types of ``events.yaml`` with their attribute specs, and the catalog's action ids."""
    events = yaml.safe_load((rules_dir / "events.yaml").read_text())
    catalog = yaml.safe_load((rules_dir / "catalog.yaml").read_text())
    types = [(name, dict((spec or {}).get("attributes") or {}), EVENT_WEIGHTS.get(name, 1.0))
             for name, spec in events["event_types"].items()]
    return types, [a["id"] for a in catalog["actions"]]


def _attributes(rng: random.Random, spec: dict, action_ids: list[str]) -> dict[str, str]:
    out = {}
    for name, kind in spec.items():
        if isinstance(kind, list):
            out[name] = str(rng.choice(kind))
        elif kind == "number":
            lo, hi = NUMBER_RANGES.get(name, (0.0, 100.0))
            out[name] = f"{rng.uniform(lo, hi):.2f}"
        elif kind == "bool":
            out[name] = rng.choice(("true", "false"))
        elif name == "action_id":
            out[name] = rng.choice(action_ids)
        else:
            out[name] = f"soak{rng.randrange(1000)}"
    return out


def _client(mix: Mix, seed: int, out: mp.Queue) -> None:
    """One client process: Decide and PublishEvent slots at constant rates from ``mix.start``, responses
    as follow-ups of the decisions; every completed call goes to ``out`` in batches (every 2 s)."""
    import grpc

    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.serving.client import open_channel

    rng = random.Random(seed)
    follow_rng = random.Random(seed + 1)  # used on gRPC callback threads
    channels = [(getattr(pb, name), name, tp) for name, tp, _ in CHANNELS]
    weights = [w for _, _, w in CHANNELS]
    types = [t for t, _, _ in mix.event_types]
    type_weights = [w for _, _, w in mix.event_types]
    specs = {t: spec for t, spec, _ in mix.event_types}
    conns = [open_channel(mix.address, options=[("grpc.use_local_subchannel_pool", 1)], retry=False)
             for _ in range(mix.connections)]
    stubs = [pb_grpc.DecisionServiceStub(c) for c in conns]
    lock = threading.Lock()
    records: list[tuple[int, float, float, int, bool]] = []  # kind, intended, latency s, code, degraded
    followups: list[tuple[float, int, object]] = []  # heap of (due, seq, request)
    seq = itertools.count()
    recent: deque[tuple[str, int, str, str]] = deque(maxlen=200)  # interactions to re-ask
    in_flight = [0]
    counter = itertools.count()
    end = mix.start + mix.duration

    def finished(kind: int, intended: float, req):
        def callback(fut: grpc.Future) -> None:
            latency = time.time() - intended
            code = fut.code()
            degraded = False
            if kind == DECIDE and code == grpc.StatusCode.OK:
                reply = fut.result()
                degraded = reply.degraded
                plan_followups(req, reply)
            with lock:
                records.append((kind, intended, latency, code.value[0], degraded))
                in_flight[0] -= 1
        return callback

    def plan_followups(req, reply) -> None:
        if not reply.actions or reply.repeat:
            return
        now, top = time.time(), reply.actions[0].action_id
        name = pb.Channel.Name(req.channel)
        later = []
        if name in ON_IMPRESSION and follow_rng.random() < mix.impression_share:
            later.append((now + follow_rng.uniform(0.2, 1.0), pb.RecordResponseRequest(
                decision_id=reply.decision_id, action_id=top, outcome=pb.OUTCOME_IMPRESSION)))
        if follow_rng.random() < mix.answer_share:
            outcome = pb.OUTCOME_ACCEPTED if follow_rng.random() < mix.accept_share else pb.OUTCOME_REJECTED
            later.append((now + follow_rng.uniform(1.0, 5.0), pb.RecordResponseRequest(
                decision_id=reply.decision_id, action_id=top, outcome=outcome)))
        if later:
            with lock:
                for due, r in later:
                    if due < end:
                        heapq.heappush(followups, (due, next(seq), r))

    def decide_request() -> pb.DecideRequest:
        if recent and rng.random() < mix.interaction_share * mix.repeat_share:
            cid, channel, tp, ix = rng.choice(recent)
            return pb.DecideRequest(customer_id=cid, channel=channel, touchpoint=tp, max_actions=3, interaction_id=ix)
        cid = pick_customer(rng, mix, lambda: f"SOAK-NEW-{seed}-{next(counter)}")
        channel, name, tp = rng.choices(channels, weights)[0]
        intent = rng.choice(INTENTS) if name == "CHANNEL_CALL_CENTER" else ""
        ix = ""
        if rng.random() < mix.interaction_share:
            ix = f"soak-{seed}-{next(counter)}"
            recent.append((cid, channel, tp, ix))
        return pb.DecideRequest(customer_id=cid, channel=channel, touchpoint=tp, max_actions=3,
                                context={"intent": intent} if intent else {}, interaction_id=ix)

    def event_request(i: int) -> pb.PublishEventRequest:
        etype = rng.choices(types, type_weights)[0]
        cid = f"C{rng.randrange(mix.customers):07d}"
        return pb.PublishEventRequest(event_id=f"soak-ev-{seed}-{i}", customer_id=cid, type=etype,
                                      attributes=_attributes(rng, specs[etype], mix.action_ids))

    def ship() -> None:
        nonlocal records
        with lock:
            batch, records = records, []
        if batch:
            out.put(("calls", np.array(batch, dtype=float)))

    shipping = threading.Event()

    def shipper() -> None:
        while not shipping.wait(2.0):
            ship()

    threading.Thread(target=shipper, daemon=True).start()
    sent = [0, 0, 0]
    try:
        di = ei = 0
        next_decide = mix.start
        next_event = mix.start + (0.5 / mix.event_rate if mix.event_rate else float("inf"))
        while True:
            with lock:
                due_follow = followups[0][0] if followups else float("inf")
            due = min(next_decide, next_event, due_follow)
            if due >= end:
                break
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            stub = stubs[sum(sent) % len(stubs)]
            if due == next_decide:
                req, kind, call, timeout = decide_request(), DECIDE, stub.Decide, mix.decide_deadline
                di += 1
                next_decide = mix.start + di / mix.decide_rate
            elif due == next_event:
                req, kind, call, timeout = event_request(ei), EVENT, stub.PublishEvent, mix.other_deadline
                ei += 1
                next_event = mix.start + (ei + 0.5) / mix.event_rate
            else:
                with lock:
                    _, _, req = heapq.heappop(followups)
                kind, call, timeout = RESPONSE, stub.RecordResponse, mix.other_deadline
            with lock:
                in_flight[0] += 1
            sent[kind] += 1
            call.future(req, timeout=timeout).add_done_callback(finished(kind, due, req))
        stop_at = time.time() + max(mix.decide_deadline, mix.other_deadline) + 5
        while time.time() < stop_at:
            with lock:
                if in_flight[0] <= 0:
                    break
            time.sleep(0.05)
    finally:
        shipping.set()
        ship()
        for c in conns:
            c.close()
        out.put(("done", sent))


# --- the service's processes ----------------------------------------------------------------------

def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_mb(pid: int) -> float:
    return int(_status(pid)["VmRSS"].split()[0]) / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(supervisor: int) -> list[int]:
    """The serving processes: the supervisor's spawned children (not multiprocessing's resource tracker)."""
    found = []
    for pid in children(supervisor):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return found


def scrape(url: str) -> dict[str, float]:
    """The service's counters this soak reports (summed over label sets it does not split)."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nba_degraded_decisions_total{"):
            cause = line.split('cause="', 1)[1].split('"', 1)[0]
            out[f"degraded_{cause}"] = out.get(f"degraded_{cause}", 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("nba_events_processed_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[f"events_{result}"] = out.get(f"events_{result}", 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("nba_rule_reloads_total{"):
            out["rule_reloads"] = out.get("rule_reloads", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def ensure_model(models_dir: Path) -> None:
    if (models_dir / "propensity" / "CHAMPION").exists():
        return
    print(f"no model in {models_dir}: training one (nba train)", flush=True)
    subprocess.run([sys.executable, "-m", "engine.cli", "train", "--models-dir", str(models_dir)], cwd=ROOT, check=True)


# --- per-minute rows and slopes -------------------------------------------------------------------

def code_names() -> dict[int, str]:
    import grpc

    return {c.value[0]: c.name for c in grpc.StatusCode}


def minute_row(k: int, calls: np.ndarray, start: float, interval: float, names: dict[int, str]) -> dict:
    """Latency and errors of the calls intended in interval ``k``."""
    part = calls[(calls[:, 1] >= start + k * interval) & (calls[:, 1] < start + (k + 1) * interval)]
    decide = part[part[:, 0] == DECIDE]
    ok = decide[decide[:, 3] == 0]
    ms = ok[:, 2] * 1000
    errors: dict[str, int] = {}
    for kind, code in part[part[:, 3] != 0][:, [0, 3]].astype(int):
        key = f"{KINDS[kind]}:{names.get(code, code)}"
        errors[key] = errors.get(key, 0) + 1
    return {
        "minute": k,
        "calls": {KINDS[i]: int((part[:, 0] == i).sum()) for i in range(3)},
        "decide_p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "decide_p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "decide_max_ms": float(ms.max()) if len(ms) else None,
        "degraded": int(decide[:, 4].sum()),
        "errors": errors,
    }


def sample(supervisor: int, redis_pid: int, redis_client, metrics_url: str, t0: float) -> dict:
    workers = worker_pids(supervisor)
    info = redis_client.info("memory") | redis_client.info("persistence")
    out = {
        "t_s": round(time.time() - t0, 1),
        "workers": {str(p): {"rss_mb": round(rss_mb(p), 2), "fds": open_fds(p), "cpu_s": round(cpu_seconds(p), 2)}
                    for p in workers},
        "supervisor_rss_mb": round(rss_mb(supervisor), 2),
        "redis_rss_mb": round(rss_mb(redis_pid), 2),
        "redis_used_memory_mb": round(info["used_memory"] / 2**20, 3),
        "redis_aof_mb": round(info.get("aof_current_size", 0) / 2**20, 2),
        "redis_keys": redis_client.dbsize(),
        "load_avg_1m": os.getloadavg()[0],
    }
    out["workers_rss_mb"] = round(sum(w["rss_mb"] for w in out["workers"].values()), 2)
    out["server"] = scrape(metrics_url)
    return out


def fit(t_h: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope (per hour) and the fitted value at the first t."""
    if len(t_h) < 2:
        return 0.0, float(y[0]) if len(y) else 0.0
    slope, intercept = np.polyfit(t_h, y, 1)
    return float(slope), float(intercept + slope * t_h[0])


def slopes(samples: list[dict], rows: list[dict], window: float, interval: float) -> dict:
    end = samples[-1]["t_s"]
    last = [s for s in samples if s["t_s"] >= end - window - 1e-6]
    t_h = np.array([s["t_s"] for s in last]) / 3600
    span_h = (t_h[-1] - t_h[0]) if len(t_h) > 1 else 0.0

    def memory(values: list[float]) -> dict:
        y = np.array(values)
        slope, first = fit(t_h, y)
        return {"mb_per_h": round(slope, 3), "fitted_growth_pct": round(100 * slope * span_h / first, 3) if first else None,
                "first_mb": round(float(y[0]), 2), "last_mb": round(float(y[-1]), 2),
                "raw_growth_pct": round(100 * (y[-1] - y[0]) / y[0], 3) if y[0] else None}

    pids = [p for p in last[0]["workers"] if all(p in s["workers"] for s in last)]
    out: dict = {"window_s": round(span_h * 3600, 1), "samples": len(last)}
    out["workers_rss_total"] = memory([s["workers_rss_mb"] for s in last])
    out["worker_rss"] = {p: memory([s["workers"][p]["rss_mb"] for s in last]) for p in pids}
    out["supervisor_rss"] = memory([s["supervisor_rss_mb"] for s in last])
    out["redis_rss"] = memory([s["redis_rss_mb"] for s in last])
    out["redis_used_memory"] = memory([s["redis_used_memory_mb"] for s in last])
    out["worker_fds_per_h"] = {p: round(fit(t_h, np.array([s["workers"][p]["fds"] for s in last], float))[0], 3)
                               for p in pids}
    out["worker_fds"] = {p: [last[0]["workers"][p]["fds"], last[-1]["workers"][p]["fds"]] for p in pids}
    in_window = [r for r in rows if r["decide_p99_ms"] is not None
                 and (r["minute"] + 0.5) * interval >= end - window]
    tm = np.array([(r["minute"] + 0.5) * interval / 3600 for r in in_window])
    out["decide_p99_ms_per_h"] = round(fit(tm, np.array([r["decide_p99_ms"] for r in in_window]))[0], 3)
    out["decide_p50_ms_per_h"] = round(fit(tm, np.array([r["decide_p50_ms"] for r in in_window]))[0], 3)
    out["worker_restarts"] = sorted({p for s in samples for p in s["workers"]} - set(samples[0]["workers"]))
    grows = [out["workers_rss_total"]["fitted_growth_pct"], *(w["fitted_growth_pct"] for w in out["worker_rss"].values())]
    out["rss_growth_under_5pct"] = bool(grows) and all(g is not None and g < 5.0 for g in grows)
    return out


def print_row(row: dict, s: dict, before: dict) -> None:
    cpu = ""
    if before:
        dt = s["t_s"] - before["t_s"]
        cpu = " ".join(f"{100 * (w['cpu_s'] - before['workers'][p]['cpu_s']) / dt:4.0f}%"
                       for p, w in s["workers"].items() if p in before["workers"])
    p50 = f"{row['decide_p50_ms']:7.2f}" if row["decide_p50_ms"] is not None else "      -"
    p99 = f"{row['decide_p99_ms']:7.2f}" if row["decide_p99_ms"] is not None else "      -"
    workers = " ".join(f"{w['rss_mb']:6.1f}/{w['fds']}" for w in s["workers"].values())
    errors = ",".join(f"{k}={v}" for k, v in sorted(row["errors"].items())) or "0"
    calls = "/".join(str(row["calls"][k]) for k in KINDS)
    print(f"{row['minute']:3d} {calls:>16} {p50} {p99} {row['degraded']:4d}  {workers}  sup {s['supervisor_rss_mb']:6.1f}"
          f"  redis {s['redis_used_memory_mb']:7.2f} rss {s['redis_rss_mb']:6.1f} aof {s['redis_aof_mb']:6.1f}"
          f"  cpu {cpu}  load {s['load_avg_1m']:.2f}  errors {errors}", flush=True)


HEADER = ("min  decide/resp/event  p50 ms  p99 ms degr  worker RSS MB/fds        supervisor  redis used_memory MB, "
          "RSS, AOF       worker CPU  load")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The soak with ``faults.py``'s arguments (``--soak``)."""
    args.duration = 1800 if args.duration is None else args.duration
    args.models_dir = Path(args.models_dir)
    if not 60 <= args.duration <= 14_400:
        raise SystemExit("--duration must be 60..14400 seconds")
    if args.interval < 5 or args.interval > args.duration / 2:
        raise SystemExit("--interval must be at least 5 s and at most half the duration")

    ensure_model(args.models_dir)
    names = code_names()
    with tempfile.TemporaryDirectory(prefix="nba-soak-") as tmp:
        tmp_path = Path(tmp)
        rules_dir = tmp_path / "rules"
        shutil.copytree(ROOT / "rules", rules_dir)
        types, action_ids = event_types(rules_dir)
        redis_server = EmbeddedRedis(tmp_path / "redis", persist=True).start()
        proc = None
        try:
            from engine.sim import demo
            from engine.store.profiles import ProfileStore, redis_client

            seconds = demo.seed(ProfileStore.from_url(redis_server.url), args.customers)
            print(f"redis-server pid {redis_server.pid} (appendonly yes), seeded {args.customers} customers "
                  f"in {seconds:.1f}s", flush=True)
            port, metrics_port = free_port(), free_port()
            address = f"127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "engine.cli", "serve", "--workers", str(args.workers), "--no-demo",
                   "--address", address, "--metrics-port", str(metrics_port), "--models-dir", str(args.models_dir),
                   "--rules-dir", str(rules_dir)]
            with open(tmp_path / "serve.log", "wb") as server_log:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, REDIS_URL=redis_server.url),
                                        stdout=server_log, stderr=subprocess.STDOUT)
            wait_serving(address, proc, timeout=600)
            time.sleep(1.0)
            print(f"nba serve pid {proc.pid}, workers {worker_pids(proc.pid)} on {address}", flush=True)

            search = None
            if args.rate is None:
                print(f"finding the sustainable rate (Decide only, p99 <= {args.slo_ms:g} ms)", flush=True)
                search = find_max(Workload(address, customers=args.customers), {"p99_ms": args.slo_ms}, 100.0, 2000.0,
                                  1.25, 10.0, 2.0, args.processes)
                sustainable = search["max_rps_meeting_slo"]
                if not sustainable:
                    raise SystemExit("no rate met the SLO: give --rate")
            else:
                sustainable = args.rate
            total = args.fraction * sustainable
            # ~0.33 responses per decision (0.7 web/app x 0.4 impressions + 0.05 answers)
            decide_rate = total * (1 - args.event_share) / 1.33
            event_rate = total * args.event_share
            print(f"sustainable {sustainable:.0f} calls/s; soak at {args.fraction:g} of it: {total:.1f} calls/s "
                  f"(Decide {decide_rate:.1f}/s, PublishEvent {event_rate:.1f}/s, RecordResponse ~{0.33 * decide_rate:.1f}/s) "
                  f"for {args.duration:.0f}s", flush=True)

            rclient = redis_client(redis_server.admin_url)  # INFO and DBSIZE are beyond the service user's ACL
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            ctx = mp.get_context("spawn")
            out: mp.Queue = ctx.Queue()
            start = time.time() + 3.0 + 0.3 * args.processes
            mixes = [Mix(address, decide_rate=decide_rate / args.processes, event_rate=event_rate / args.processes,
                         start=start + k / max(decide_rate, 1.0), duration=args.duration, customers=args.customers,
                         decide_deadline=args.decide_deadline, other_deadline=args.other_deadline,
                         event_types=types, action_ids=action_ids) for k in range(args.processes)]
            clients = [ctx.Process(target=_client, args=(m, 1000 * (k + 1), out), daemon=True)
                       for k, m in enumerate(mixes)]
            for c in clients:
                c.start()
            batches: list[np.ndarray] = []
            sent_by_client: list[list[int]] = []

            def drain(block_until: float | None = None) -> None:
                while True:
                    try:
                        timeout = max(0.0, block_until - time.time()) if block_until else 0
                        kind, payload = out.get(timeout=timeout) if timeout else out.get_nowait()
                    except queue.Empty:
                        return
                    if kind == "calls":
                        batches.append(payload)
                    else:
                        sent_by_client.append(payload)
                        if len(sent_by_client) == len(clients):
                            return

            while time.time() < start:
                time.sleep(0.05)
            samples = [sample(proc.pid, redis_server.pid, rclient, metrics_url, start)]
            rows: list[dict] = []
            minutes = int(round(args.duration / args.interval))
            print(HEADER, flush=True)
            for k in range(minutes):
                boundary = start + (k + 1) * args.interval
                while time.time() < boundary:
                    drain(min(boundary, time.time() + 1.0))
                    if proc.poll() is not None:
                        raise SystemExit(f"nba serve exited with {proc.returncode} in minute {k}")
                samples.append(sample(proc.pid, redis_server.pid, rclient, metrics_url, start))
                drain(time.time() + max(args.decide_deadline, args.other_deadline) + 2.5)
                calls = np.concatenate(batches) if batches else np.empty((0, 5))
                row = minute_row(k, calls, start, args.interval, names)
                rows.append(row)
                print_row(row, samples[-1], samples[-2])
            deadline = time.time() + 30
            while len(sent_by_client) < len(clients) and time.time() < deadline:
                drain(deadline)
            for c in clients:
                c.join(10)
            calls = np.concatenate(batches) if batches else np.empty((0, 5))
            rows = [minute_row(k, calls, start, args.interval, names) for k in range(minutes)]  # every straggler in
            sent = [sum(s[i] for s in sent_by_client) for i in range(3)]
            result = {
                "command": " ".join(sys.argv if argv is None else ["loadtest/faults.py", *argv]),
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "sustainable_rate": sustainable, "rate_search": search,
                "offered": {"calls_per_s": total, "decide_per_s": decide_rate, "event_per_s": event_rate},
                "sent": dict(zip(KINDS, sent)),
                "answered": {KINDS[i]: int((calls[:, 0] == i).sum()) for i in range(3)},
                "ok": {KINDS[i]: int(((calls[:, 0] == i) & (calls[:, 3] == 0)).sum()) for i in range(3)},
                "decide_degraded": int(calls[calls[:, 0] == DECIDE][:, 4].sum()),
                "mix": {k: v for k, v in asdict(mixes[0]).items()
                        if k not in ("event_types", "action_ids", "start") and not k.startswith(("tls_", "token"))},
                "durable_sessions": "not observable from outside (not in /metrics or GetStatus); proxies: "
                                    "degraded_rule_engine in server counters, PublishEvent errors",
                "rows": rows, "samples": samples,
            }
            result["slopes"] = slopes(samples, rows, args.window, args.interval)
            report(result)
            write_json(args.json, result)
            return 0
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc is not None and proc.returncode not in (0, None):
                print((tmp_path / "serve.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            redis_server.stop()


def report(result: dict) -> None:
    s = result["slopes"]
    print(f"\nsent {result['sent']}, ok {result['ok']}, Decide degraded {result['decide_degraded']}")
    print(f"slopes over the last {s['window_s']:.0f} s ({s['samples']} samples), least squares:")

    def pct(value: float | None) -> str:  # None: nothing to grow from (--workers 1 serves in the supervisor)
        return f"{value:7.3f}%" if value is not None else "      -%"

    def line(name: str, m: dict) -> None:
        print(f"  {name:26} {m['mb_per_h']:9.3f} MB/h  growth {pct(m['fitted_growth_pct'])} (fitted), "
              f"{pct(m['raw_growth_pct'])} (first {m['first_mb']:.1f} -> last {m['last_mb']:.1f} MB)")

    line("workers' RSS (sum)", s["workers_rss_total"])
    for pid, m in s["worker_rss"].items():
        line(f"worker {pid} RSS", m)
    line("supervisor RSS", s["supervisor_rss"])
    line("redis-server RSS", s["redis_rss"])
    line("redis used_memory", s["redis_used_memory"])
    print(f"  worker fds per hour {s['worker_fds_per_h']} (first, last {s['worker_fds']})")
    print(f"  Decide p99 drift {s['decide_p99_ms_per_h']:.3f} ms/h, p50 drift {s['decide_p50_ms_per_h']:.3f} ms/h")
    print(f"  worker restarts: {s['worker_restarts'] or 'none'}")
    print(f"  RSS growth under 5% over the window: {'yes' if s['rss_growth_under_5pct'] else 'NO'}")
    print(f"  server counters at the end: {result['samples'][-1]['server']}")
