"""Hot reload: rule files edited under a live gRPC server while clients keep deciding."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import grpc
import pytest

from engine import metrics
from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.live import Live
from engine.rules.runtime import CompiledRules, load_and_compile, open_rulesets
from engine.sim.telco import SCHEMA

from .conftest import RULES_DIR, as_admin, served_app
from .test_scenarios import customer


@pytest.fixture()
def watched(redis_url: str, models_dir: Path, tmp_path: Path):
    """A served App whose rule files (a copy) are watched every 0.1 s."""
    with served_app(redis_url, models_dir, tmp_path / "rules", demo_customers=200, rules_watch_seconds=0.1) as (
            app, address):
        channel = as_admin(grpc.insecure_channel(address))
        yield app, channel
        channel.close()


class Clients:
    """Threads that send Decide calls back to back and record every reply or error."""

    def __init__(self, channel: grpc.Channel, threads: int = 3):
        self.stub = pb_grpc.DecisionServiceStub(channel)
        self.stop = threading.Event()
        self.replies: list[list[tuple[str, str, float]]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def run(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                reply = self.stub.Decide(pb.DecideRequest(customer_id="HOT1", channel=pb.CHANNEL_WEB), timeout=5)
                top = reply.actions[0]
                self.replies[i].append((reply.ruleset_version, top.action_id, top.priority))
            except Exception as exc:  # every failure is a test failure
                self.errors.append(repr(exc))

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def wait_for(self, predicate, timeout: float = 20.0) -> tuple[str, str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [r[-1] for r in self.replies if r]
            if seen and all(predicate(r) for r in seen):
                return seen[0]
            time.sleep(0.05)
        raise AssertionError(f"replies never matched: {[r[-1] for r in self.replies if r]}")

    def calls(self) -> int:
        return sum(len(r) for r in self.replies)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def refused_reloads() -> float:
    return metrics.RULE_RELOADS.labels("refused")._value.get()


@pytest.mark.both_redis
def test_rule_edits_go_live_under_load_and_broken_edits_are_refused(watched) -> None:
    app, channel = watched
    admin = pb_grpc.AdminServiceStub(channel)
    app.store.save([customer("HOT1", open_cases=1)], SCHEMA)  # resolve_open_case tops the web list
    policies, catalog = app.config.rules_dir / "policies.yaml", app.config.rules_dir / "catalog.yaml"
    v0 = app.rules.current.version

    with Clients(channel) as clients:
        _, top, p0 = clients.wait_for(lambda r: r[0] == v0)
        assert top == "resolve_open_case"

        # 1. A good edit: the lever on open cases doubles. It goes live without a call failing.
        edit(policies, "targets: {groups: [service_case]}\n    weight: 10.0", "targets: {groups: [service_case]}\n    weight: 20.0")
        v1, top, p1 = clients.wait_for(lambda r: r[0] != v0)
        assert top == "resolve_open_case" and p1 == pytest.approx(2 * p0, rel=1e-9)
        assert app.rules.current.version == v1
        time.sleep(0.3)
        for replies in clients.replies:  # each client: the old version until its first new reply, never after
            versions = [r[0] for r in replies]
            first_new = versions.index(v1)
            assert set(versions[:first_new]) <= {v0} and set(versions[first_new:]) == {v1}
            assert all(p == pytest.approx(2 * p0, rel=1e-9) for v, _, p in replies[first_new:])

        # 2. A broken edit (a typo in a feature name): refused, with file:line:col; v1 stays live.
        refused = refused_reloads()
        edit(catalog, "eligible: 'open_cases > 0'", "eligible: 'open_casez > 0'")
        deadline = time.monotonic() + 20
        while refused_reloads() == refused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused_reloads() > refused, "the watcher did not try the broken files"
        assert metrics.RULE_RELOAD_ERRORS._value.get() >= 1
        reply = admin.ReloadRules(pb.ReloadRulesRequest(), timeout=10)
        assert not reply.applied and reply.ruleset_version == v1
        assert any("catalog.yaml:" in e and 'unknown feature "open_casez"' in e and '"open_cases"' in e
                   for e in reply.errors), reply.errors
        calls = clients.calls()
        time.sleep(0.5)
        assert clients.calls() > calls and {r[-1][0] for r in clients.replies} == {v1}

        # 3. An edit that compiles but breaks a rule test (scenario 7): refused with the failed test.
        edit(catalog, "eligible: 'open_casez > 0'", "eligible: 'open_cases > 0'")
        edit(policies, "  - name: fraud_hold_stops_sales\n    when: 'fraud_hold'", "  - name: fraud_hold_stops_sales\n    when: 'false'")
        reply = admin.ReloadRules(pb.ReloadRulesRequest(), timeout=10)
        assert not reply.applied and reply.ruleset_version == v1
        assert any("scenarios.yaml:" in e and 'rule test "many new lines in a month block every sale' in e
                   and "fraud_hold_stops_sales" in e for e in reply.errors), reply.errors

        # 4. Fixed (back to the files of v1): the watcher accepts them, nothing to swap.
        edit(policies, "  - name: fraud_hold_stops_sales\n    when: 'false'", "  - name: fraud_hold_stops_sales\n    when: 'fraud_hold'")
        deadline = time.monotonic() + 20
        while metrics.RULE_RELOAD_ERRORS._value.get() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics.RULE_RELOAD_ERRORS._value.get() == 0 and app.rules.current.version == v1
    assert clients.errors == []
    assert clients.calls() > 100


def test_in_flight_decisions_keep_their_rule_set_and_old_sets_are_freed() -> None:
    base = load_and_compile(RULES_DIR)
    try:
        gc.collect()
        opened = open_rulesets()
        live = Live(CompiledRules(base.ruleset, base.plan), retire=lambda r: r.close())
        fact = base.build_fact(channel="web", consents=["web"], products=["mobile"])
        expected = base.evaluate(fact)
        with live.use() as in_flight:  # a decision in progress
            live.swap(CompiledRules(base.ruleset, base.plan))
            assert live.current is not in_flight and not in_flight.closed
            assert in_flight.evaluate(fact) == expected  # finishes on the set it started with
        assert in_flight.closed  # freed as soon as its last decision ended
        for _ in range(2000):  # thousands of reloads, with decisions across each swap
            with live.use() as rules:
                live.swap(CompiledRules(base.ruleset, base.plan))
                assert rules.evaluate(fact) == expected
        assert open_rulesets() == opened + 1  # only the live set's durable ruleset is left
        live.current.close()
    finally:
        base.close()


def test_reloading_the_real_files_many_times_leaks_no_ruleset(watched) -> None:
    app, _ = watched
    app.watcher.stop()
    policies = app.config.rules_dir / "policies.yaml"
    original = policies.read_text()
    gc.collect()  # rule sets other tests left unreachable
    opened = open_rulesets()
    versions = set()
    for i in range(60):
        policies.write_text(original + f"\n# edit {i % 2}\n")
        applied, version, errors = app.reload_rules()
        assert applied and not errors
        versions.add(version)
    gc.collect()
    assert len(versions) == 2 and open_rulesets() == opened
