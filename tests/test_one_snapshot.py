"""One snapshot per decision: two server processes decide while their rules reload every 50 ms; no
decision mixes two rule versions and no budget is over-spent."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import redis

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.rules.loader import rules_version
from engine.store.redis_embedded import free_port

from .conftest import Served, as_admin, served_admin_token
from .test_contact import budget_rules

BUDGET = 40
DECISIONS = 2_000
THREADS = 8
MARK = " (B)"


def _variants(base: Path) -> dict[str, tuple[str, str]]:
    """catalog.yaml and contact.yaml in two versions, A (as is) and B (every action name and contact
    policy reason marked), in every combination a reload between two file writes could read."""
    catalog, contact = (base / "catalog.yaml").read_text(), (base / "contact.yaml").read_text()
    marked_catalog = "\n".join(line + MARK if line.startswith("    name: ") else line for line in catalog.splitlines()) + "\n"
    marked_contact = "\n".join(line[:-1] + MARK + '"' if line.strip().startswith("reason: ") else line
                               for line in contact.splitlines()) + "\n"
    assert marked_catalog != catalog and marked_contact != contact
    return {"A": (catalog, contact), "B": (marked_catalog, marked_contact)}


def _write(rules_dir: Path, name: str, text: str) -> None:
    tmp = rules_dir / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, rules_dir / name)


def _serve(rules_dir: Path, models_dir: Path, redis_url: str) -> tuple[subprocess.Popen, int]:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"REDIS_URL": redis_url}
    proc = Served(["--workers", "1", "--address", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port),
                   "--rules-dir", str(rules_dir), "--models-dir", str(models_dir), "--customers", "300",
                   "--watch-rules", "0", "--data-dir", str(rules_dir.parent / "serve-data")],
                  env, rules_dir.parent / "serve.log")
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.tail()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
            return proc, port
        except OSError:
            assert time.monotonic() < deadline, f"not serving within 120s\n{proc.tail()}"
            time.sleep(0.2)


def test_no_decision_mixes_rule_versions_while_rules_reload_every_50ms(redis_url: str, models_dir: Path,
                                                                       tmp_path: Path) -> None:
    rules_dir = budget_rules(tmp_path, BUDGET, quiet_hours=False)
    variants = _variants(rules_dir)
    expected = {}  # rule version -> (catalog marked, contact marked), for all four combinations
    for (cat, cat_text), (con, con_text) in itertools.product(
            ((k, v[0]) for k, v in variants.items()), ((k, v[1]) for k, v in variants.items())):
        probe = tmp_path / f"probe-{cat}{con}"
        shutil.copytree(rules_dir, probe)
        _write(probe, "catalog.yaml", cat_text)
        _write(probe, "contact.yaml", con_text)
        expected[rules_version(probe)] = (cat == "B", con == "B")
    procs = []
    stop = threading.Event()
    try:
        for _ in range(2):  # one after the other: the first seeds the demo customers
            procs.append(_serve(rules_dir, models_dir, redis_url))
        token = served_admin_token(rules_dir.parent / "serve-data")  # both keep their admin token there
        channels = [as_admin(grpc.insecure_channel(f"127.0.0.1:{port}"), token) for _, port in procs]
        reloads: list[pb.ReloadRulesResponse] = []

        def flip() -> None:
            for turn in itertools.cycle("BA"):
                catalog, contact = variants[turn]
                _write(rules_dir, "catalog.yaml", catalog)
                _write(rules_dir, "contact.yaml", contact)
                for ch in channels:
                    reloads.append(pb_grpc.AdminServiceStub(ch).ReloadRules(pb.ReloadRulesRequest(), timeout=30))
                if stop.wait(0.05):
                    return

        customers = [f"C{i:07d}" for i in range(0, 300, 3)]
        kinds = [pb.CHANNEL_CALL_CENTER, pb.CHANNEL_WEB, pb.CHANNEL_BRANCH, pb.CHANNEL_MOBILE_APP]
        replies: list[pb.DecideResponse] = []
        errors: list[Exception] = []
        counter = itertools.count()

        def client(k: int) -> None:
            stub = pb_grpc.DecisionServiceStub(channels[k % 2])
            try:
                while (n := next(counter)) < DECISIONS:
                    replies.append(stub.Decide(pb.DecideRequest(
                        customer_id=customers[n % len(customers)], channel=kinds[(n // len(customers) + k) % 4],
                        max_actions=3, explain=True), timeout=30))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        flipper = threading.Thread(target=flip)
        flipper.start()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        flipper.join()
        assert not errors, errors[:3]
        assert len(replies) == DECISIONS
        assert all(r.applied for r in reloads) and len(reloads) >= 10
        versions = {r.ruleset_version for r in replies}
        assert versions <= set(expected) and len(versions) >= 2, versions  # decisions under both sets
        mixed = []
        contact_checked = 0
        for r in replies:
            catalog_b, contact_b = expected[r.ruleset_version]
            if any(a.name.endswith(MARK) != catalog_b for a in r.actions if not a.campaign):  # a live demo campaign's are not marked
                mixed.append(("catalog", r.decision_id))
            for f in r.funnel:
                if f.stage == "contact":
                    contact_checked += 1
                    if (f"{MARK} (" in f.detail) != contact_b:  # "contact policy name: reason (B) (3 impressions ...)"
                        mixed.append(("contact", r.decision_id))
        assert not mixed, mixed[:5]
        assert contact_checked > 100  # the contact policies' reasons were seen under both versions
        client_ = redis.Redis.from_url(redis_url, decode_responses=True)
        for key in client_.scan_iter("nba:budget:*"):
            assert int(client_.get(key)) <= BUDGET, key
        shown: dict[str, int] = {}
        for r in replies:
            for a in r.actions:
                shown[a.action_id] = shown.get(a.action_id, 0) + 1
        budgeted = {k.split(":")[2] for k in client_.scan_iter("nba:budget:*")}
        assert budgeted and max(shown[a] for a in budgeted) == BUDGET  # budgets ran out, never over
        assert all(shown[a] <= BUDGET for a in budgeted)
        client_.close()
    finally:
        stop.set()
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(30)
            finally:
                proc.kill()
