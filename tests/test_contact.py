"""Contact policies, budgets, responses and the control group, decided by the real funnel on a real Redis."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import pytest

from engine.api.nba.v1 import nba_pb2 as pb
from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
from engine.authoring.check import RuleErrors
from engine.decision.contact import budget_key, contacts_key
from engine.decision.funnel import DecisionEngine
from engine.decision.history import counted, read_history
from engine.decision.request import DecideInput
from engine.decision.responses import NotFound, ResponseRecorder
from engine.live import Live
from engine.models.registry import ModelRegistry
from engine.rules.contact import ControlGroup
from engine.rules.runtime import load_and_compile
from engine.sim.telco import SCHEMA
from engine.store.profiles import RESPONSES_STREAM, ProfileStore, redis_client
from engine.store.streams import xrange_all

from .clock import DAY, Clock
from .conftest import RULES_DIR
from .test_scenarios import MARKETING, NOON, customer

pytestmark = pytest.mark.both_redis



def make_engine(redis_url: str, models_dir: Path, rules_dir: Path = RULES_DIR, clock=None) -> DecisionEngine:
    rules = load_and_compile(rules_dir)
    return DecisionEngine(ProfileStore.from_url(redis_url), Live(rules, retire=lambda r: r.close()),
                          Live(ModelRegistry(models_dir, SCHEMA).load()), clock=clock or Clock(NOON))


@pytest.fixture()
def clock() -> Clock:
    return Clock(NOON)


@pytest.fixture()
def engine(redis_url: str, models_dir: Path, clock: Clock):
    e = make_engine(redis_url, models_dir, clock=clock)
    yield e
    e.rules.current.close()


def decide(engine: DecisionEngine, cid: str, channel: str, **kw):
    return engine.decide(DecideInput(customer_id=cid, channel=channel, max_actions=kw.pop("max_actions", 3), **kw))


def seen(engine: DecisionEngine, d):
    """What a web page or an app reports once shown: the customer saw every action (on_impression channels)."""
    if d.channel in engine.rules.current.ruleset.contact.interactions.on_impression:
        for a in d.actions:
            engine.responses.record(d.decision_id, a.action_id, "impression")
    return d


def not_control(prefix: str) -> str:
    """A customer id outside the demo rules' control group (10%)."""
    control = ControlGroup(0.1)
    return next(f"{prefix}{i}" for i in range(100) if not control.contains(f"{prefix}{i}"))


def marketing_ids(d) -> list[str]:
    return [a.action_id for a in d.actions if a.type in MARKETING]


def test_an_action_is_shown_at_most_3_times_in_30_days_on_any_channel(engine: DecisionEngine, clock: Clock) -> None:
    cid = not_control("R")
    engine.store.save([customer(cid)], SCHEMA)
    shown: dict[str, int] = {}
    for k, channel in enumerate(["web", "call_center", "mobile_app", "web", "branch", "web", "call_center", "web"]):
        clock.now = NOON + k * 3600
        for action_id in marketing_ids(seen(engine, decide(engine, cid, channel))):
            shown[action_id] = shown.get(action_id, 0) + 1
    assert shown and max(shown.values()) == 3, shown
    top = next(a for a, n in shown.items() if n == 3)
    d = decide(engine, cid, "web", explain=True)
    assert top not in marketing_ids(d)
    assert any(f.action_id == top and f.stage == "contact" and "no_repeats" in f.detail for f in d.funnel)
    clock.now = NOON + 31 * DAY  # the window has passed
    assert shown.keys() & set(marketing_ids(decide(engine, cid, "web", max_actions=10)))


def test_a_rejection_starts_a_14_day_cool_down(engine: DecisionEngine, clock: Clock) -> None:
    cid = not_control("J")
    engine.store.save([customer(cid)], SCHEMA)
    recorder = ResponseRecorder(engine.store.client, engine.rules, clock=clock)
    d = decide(engine, cid, "web")
    rejected = marketing_ids(d)[0]
    recorder.record(d.decision_id, rejected, "rejected", ts=clock.now)
    for days in (1, 13):
        clock.now = NOON + days * DAY
        d = decide(engine, cid, "call_center", max_actions=10, explain=True)
        assert rejected not in marketing_ids(d)
        assert any(f.action_id == rejected and "cool_down_after_rejection" in f.detail for f in d.funnel)
    clock.now = NOON + 15 * DAY
    client = engine.store.client
    impressions = [f for f in client.hgetall(contacts_key(cid)) if f.startswith(b"i|")]
    client.hdel(contacts_key(cid), *impressions)  # keep the rejection, forget impressions (no_repeats)
    assert rejected in marketing_ids(decide(engine, cid, "web", max_actions=10))


def test_at_most_2_marketing_emails_per_week(engine: DecisionEngine, clock: Clock) -> None:
    cid = not_control("E")
    engine.store.save([customer(cid)], SCHEMA)
    first = decide(engine, cid, "email", max_actions=5)
    assert len(marketing_ids(first)) == 2, first.actions  # the limit holds within one decision too
    clock.now += 2 * DAY
    d = decide(engine, cid, "email", max_actions=5, explain=True)
    assert marketing_ids(d) == []
    assert any(f.stage == "contact" and "email_marketing_per_week" in f.detail for f in d.funnel)
    assert marketing_ids(decide(engine, cid, "web"))  # other channels are not limited by it
    clock.now += 6 * DAY
    assert marketing_ids(decide(engine, cid, "email", max_actions=5))


def test_quiet_hours_stop_outbound_but_not_inbound(engine: DecisionEngine, clock: Clock) -> None:
    cid = not_control("Q")
    engine.store.save([customer(cid, open_cases=1)], SCHEMA)
    clock.now = NOON + 11 * 3600  # 23:00 UTC
    for channel in ("email", "sms"):
        d = decide(engine, cid, channel, explain=True)
        assert d.actions == [] and not d.degraded  # deliberately empty: not even the fallback
        assert any(f.stage == "quiet_hours" for f in d.funnel)
    assert decide(engine, cid, "web").actions[0].action_id == "resolve_open_case"
    clock.now = NOON + 20 * 3600  # 08:00 UTC
    assert decide(engine, cid, "email").actions[0].action_id == "resolve_open_case"


def test_consent_withdrawal_applies_to_the_next_outbound_decision_of_any_engine(
        engine: DecisionEngine, redis_url: str, models_dir: Path, clock: Clock) -> None:
    cid = not_control("W")
    engine.store.save([customer(cid)], SCHEMA)
    assert marketing_ids(decide(engine, cid, "email", max_actions=5))
    engine.store.save([customer(cid, consent={"web", "sms", "call_center"})], SCHEMA)
    other = make_engine(redis_url, models_dir, clock=clock)  # another server process, same Redis
    try:
        for e in (other, engine):
            d = decide(e, cid, "email", max_actions=5, explain=True)
            assert marketing_ids(d) == []
            assert any("marketing_needs_consent" in f.detail for f in d.funnel)
    finally:
        other.rules.current.close()


def budget_rules(tmp_path: Path, budget: int, quiet_hours: bool = True, on_impression: bool = True) -> Path:
    """The demo rules with a daily budget of ``budget`` on every offer; ``on_impression`` False: deciding
    counts the impression on every channel."""
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    catalog = rules_dir / "catalog.yaml"
    lines = []
    for line in catalog.read_text().splitlines():
        if line.strip().startswith("daily_budget:"):
            continue
        lines.append(line)
        if line.startswith("    type: ") and line.split()[-1] != "service":
            lines.append(f"    daily_budget: {budget}")
    catalog.write_text("\n".join(lines) + "\n")
    if not quiet_hours:
        contact = rules_dir / "contact.yaml"
        text = contact.read_text()
        start, end = text.index("quiet_hours:"), text.index("control_group:")
        contact.write_text(text[:start] + text[end:])
    if not on_impression:
        contact = rules_dir / "contact.yaml"
        text = contact.read_text()
        start, end = text.index("impressions:"), text.index("interactions:")
        contact.write_text(text[:start] + text[end:])
    return rules_dir


def test_when_a_budget_runs_out_the_next_best_action_takes_its_place(redis_url: str, models_dir: Path,
                                                                      tmp_path: Path, clock: Clock) -> None:
    engine = make_engine(redis_url, models_dir, budget_rules(tmp_path, 2), clock)
    try:
        ids = [not_control(f"B{k}-") for k in range(6)]
        engine.store.save([customer(cid) for cid in ids], SCHEMA)
        tops = [decide(engine, cid, "web", max_actions=1, explain=True) for cid in ids]
        first = tops[0].actions[0].action_id
        assert [d.actions[0].action_id for d in tops[:2]] == [first, first]  # same state, same top
        for d in tops[2:]:
            assert d.actions[0].action_id != first and d.actions[0].type in MARKETING
            assert any(f.action_id == first and f.stage == "budget" for f in d.funnel)
        assert int(engine.store.client.get(budget_key(first, clock.now))) == 2
        from prometheus_client import REGISTRY

        assert REGISTRY.get_sample_value("nba_contact_suppressed_total", {"reason": "budget"}) >= 4
        clock.now += DAY  # a new day, a new budget
        engine.store.save([customer(not_control("B9-"))], SCHEMA)
        assert decide(engine, not_control("B9-"), "web", max_actions=1).actions[0].action_id == first
    finally:
        engine.rules.current.close()


def test_responses_are_checked_idempotent_and_streamed(engine: DecisionEngine, clock: Clock) -> None:
    cid = not_control("P")
    engine.store.save([customer(cid)], SCHEMA)
    d = decide(engine, cid, "web")
    recorder = ResponseRecorder(engine.store.client, engine.rules, clock=clock)
    with pytest.raises(NotFound) as err:
        recorder.record("0" * 32, d.actions[0].action_id, "accepted")  # well-formed, never issued
    assert err.value.field == "decision_id"
    with pytest.raises(NotFound) as err:
        recorder.record(d.decision_id, "upsell_premium_tv_not_shown", "accepted")
    assert err.value.field == "action_id"
    a = recorder.record(d.decision_id, d.actions[0].action_id, "accepted")
    b = recorder.record(d.decision_id, d.actions[0].action_id, "accepted")
    assert a.first and not b.first and a.response_id == b.response_id
    recorder.record(d.decision_id, d.actions[0].action_id, "clicked")
    entries = list(xrange_all(engine.store.client, RESPONSES_STREAM))
    assert [e[b"outcome"] for _, e in entries] == [b"accepted", b"clicked"]
    assert entries[0][1][b"customer_id"] == cid.encode() and entries[0][1][b"value"]
    assert counted(read_history(engine.store.client, cid), "a") == 1  # the acceptance counted once


def test_record_response_over_grpc_not_found_and_idempotent(service) -> None:
    _, channel = service
    stub = pb_grpc.DecisionServiceStub(channel)
    reply = stub.Decide(pb.DecideRequest(customer_id="C0000003", channel=pb.CHANNEL_WEB), timeout=5)
    request = pb.RecordResponseRequest(decision_id=reply.decision_id, action_id=reply.actions[0].action_id,
                                       outcome=pb.OUTCOME_REJECTED)
    first, again = stub.RecordResponse(request, timeout=5), stub.RecordResponse(request, timeout=5)
    assert first.response_id == again.response_id
    for decision_id, action_id, field in (("0" * 32, reply.actions[0].action_id, "decision_id"),
                                          (reply.decision_id, "not_presented", "action_id")):
        with pytest.raises(grpc.RpcError) as err:
            stub.RecordResponse(pb.RecordResponseRequest(decision_id=decision_id, action_id=action_id,
                                                         outcome=pb.OUTCOME_ACCEPTED), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details().startswith(field)


def test_the_control_group_is_stable_and_gets_the_control_policy(engine: DecisionEngine) -> None:
    control = engine.rules.current.ruleset.contact.control
    members = [f"K{i}" for i in range(400) if control.contains(f"K{i}")]
    assert 0.05 < len(members) / 400 < 0.15 and members == [f"K{i}" for i in range(400) if control.contains(f"K{i}")]
    engine.store.save([customer(members[0])], SCHEMA)
    d = decide(engine, members[0], "web")
    assert d.control and marketing_ids(d)
    assert not decide(engine, not_control("K"), "web").control


def test_contact_file_errors_name_file_line_and_column(tmp_path: Path) -> None:
    rules_dir = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules_dir)
    contact = rules_dir / "contact.yaml"
    contact.write_text(contact.read_text().replace("per: customer", "per: custmer").replace('"21:00"', '"9pm"'))
    with pytest.raises(RuleErrors) as err:
        load_and_compile(rules_dir)
    messages = [str(e) for e in err.value.errors]
    assert any("contact.yaml:" in m and "custmer" in m for m in messages), messages
    assert any("contact.yaml:" in m and "9pm" in m for m in messages), messages


def _all_at_once(target, args: list[tuple]) -> tuple[float, list[Exception]]:
    """``target(*a)`` for every ``a`` on threads of their own, started together; when they started (epoch
    s) and what they raised."""
    import threading

    errors: list[Exception] = []
    start = threading.Barrier(len(args))

    def run(*a) -> None:
        start.wait()
        try:
            target(*a)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in args]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return started, errors


def _budgets_used(redis_url: str, rules_dir: Path, days: set[float]) -> dict[str, int]:
    """Units used of each budgeted action's daily budget on ``days`` (epoch s within them)."""
    client = redis_client(redis_url, decode_responses=True)
    catalog = load_and_compile(rules_dir)
    try:
        budgeted = {a for a, x in catalog.ruleset.by_id.items() if x.daily_budget}
    finally:
        catalog.close()
    return {a: sum(int(client.get(k) or 0) for k in {budget_key(a, t) for t in days}) for a in budgeted}


def test_limits_and_budgets_hold_across_server_processes_deciding_at_once(redis_url: str, models_dir: Path,
                                                                          tmp_path: Path) -> None:
    """``nba serve --workers 2`` and 8 client threads deciding for the same 8 customers at once."""
    from .conftest import two_workers

    budget = 4
    rules_dir = budget_rules(tmp_path, budget, quiet_hours=False, on_impression=False)
    with two_workers(redis_url, rules_dir, models_dir) as (channels, _):
        customers = [f"C{i:07d}" for i in range(8)]
        kinds = [pb.CHANNEL_WEB, pb.CHANNEL_CALL_CENTER, pb.CHANNEL_MOBILE_APP, pb.CHANNEL_EMAIL]
        replies: list[pb.DecideResponse] = []

        def client(ch: grpc.Channel, k: int) -> None:
            stub = pb_grpc.DecisionServiceStub(ch)
            for r in range(6):
                for i, cid in enumerate(customers):
                    replies.append(stub.Decide(pb.DecideRequest(
                        customer_id=cid, channel=kinds[(i + r + k) % len(kinds)], max_actions=3), timeout=10))

        started, errors = _all_at_once(client, [(ch, k) for k, ch in enumerate(channels)])
        assert not errors, errors[:3]
        assert len(replies) == len(channels) * 6 * len(customers)
        assert all(r.actions or r.situations for r in replies)

        client_ = redis_client(redis_url, decode_responses=True)
        catalog = load_and_compile(rules_dir)
        try:
            actions = catalog.ruleset.by_id
        finally:
            catalog.close()
        per_action: dict[str, int] = {}
        for cid in customers:
            shown = [h for h in read_history(client_, cid) if h.kind == "i"]
            for action_id in {h.action for h in shown}:
                n = counted(shown, "i", action=action_id)
                per_action[action_id] = per_action.get(action_id, 0) + n
                if actions[action_id].type in MARKETING:
                    assert n <= 3, (cid, action_id, n)  # no_repeats, across both processes
            assert sum(h.count for h in shown if h.channel == "email" and h.type in MARKETING) <= 2, cid  # e-mails per week
        used = _budgets_used(redis_url, rules_dir, {started, time.time()})  # both days should the run cross midnight
        assert max(used.values()) == budget  # budgets ran out ...
        for a, n in used.items():  # ... and were never exceeded, by the two processes together
            assert n <= budget and per_action.get(a, 0) == n, (a, n, per_action.get(a))
        presented = sum(len(r.actions) for r in replies)
        assert presented > sum(used.values())  # the next-best actions took the exhausted ones' places


def test_2_processes_x_8_threads_present_an_action_exactly_its_budget_of_100(redis_url: str, models_dir: Path,
                                                                             tmp_path: Path) -> None:
    """2,000 decisions (10 for each of the 200 demo customers) at once, against a budget of 100 on every
    offer: each offer is presented as often as its counter says, never more than 100 times, and the most
    wanted exactly 100."""
    from collections import Counter

    from .conftest import two_workers

    budget, customers = 100, [f"C{i % 200:07d}" for i in range(2_000)]
    rules_dir = budget_rules(tmp_path, budget, quiet_hours=False, on_impression=False)
    with two_workers(redis_url, rules_dir, models_dir, max_in_flight=32) as (channels, _):  # 16 callers
        shown: Counter[str] = Counter()

        def client(k: int) -> None:
            stub = pb_grpc.DecisionServiceStub(channels[k % len(channels)])
            for cid in customers[k::16]:
                reply = stub.Decide(pb.DecideRequest(customer_id=cid, channel=pb.CHANNEL_CALL_CENTER, max_actions=3),
                                    timeout=10)
                shown.update(a.action_id for a in reply.actions)

        started, errors = _all_at_once(client, [(k,) for k in range(16)])
        assert not errors, errors[:3]
        used = _budgets_used(redis_url, rules_dir, {started, time.time()})
        assert {a: shown[a] for a in used} == used
        assert max(used.values()) == budget and all(n <= budget for n in used.values())


def test_the_schema_describes_contact_yaml_as_the_loader_reads_it() -> None:
    import json

    from engine.rules.contact import CONTACT_KEYS, CONTROL_KEYS, LIMIT_KEYS, QUIET_KEYS

    from .conftest import REPO
    from .test_rule_language import _validate, _yaml_as_json

    schema = json.loads((REPO / "rules" / "schema" / "rules.schema.json").read_text())
    contact = _yaml_as_json(REPO / "rules" / "contact.yaml")
    assert _validate(contact, schema, schema) == []
    contact["contact_policies"][0]["per"] = "househld"
    contact["quiet_hours"]["from"] = "9pm"
    assert len(_validate(contact, schema, schema)) == 2
    props = schema["properties"]
    assert set(CONTACT_KEYS) <= set(props)
    assert set(props["contact_policies"]["items"]["properties"]) == set(LIMIT_KEYS)
    assert set(props["quiet_hours"]["properties"]) == set(QUIET_KEYS)
    assert set(props["control_group"]["properties"]) == set(CONTROL_KEYS)


def scoped_rules(tmp_path: Path, policies: str) -> Path:
    """The demo rules with ``policies`` (YAML list items) added to contact.yaml's contact policies."""
    rules_dir = tmp_path / "scoped_rules"
    shutil.copytree(RULES_DIR, rules_dir)
    contact = rules_dir / "contact.yaml"
    text = contact.read_text()
    contact.write_text(text.replace("contact_policies:\n", "contact_policies:\n" + policies, 1))
    return rules_dir


def test_a_policy_scoped_to_one_action_caps_only_that_action(redis_url: str, models_dir: Path, clock: Clock,
                                                             tmp_path: Path) -> None:
    cid = not_control("S")
    plain = make_engine(redis_url, models_dir, clock=clock)
    plain.store.save([customer(cid)], SCHEMA)
    first = marketing_ids(decide(plain, cid, "call_center", preview=True))
    assert len(first) >= 3, first
    once, other = first[0], first[1]
    group = plain.rules.current.ruleset.action(other).group
    plain.rules.current.close()
    # once a week for `once` alone; and at most 2 of `other` per customer: counted over `other` only,
    # so the other actions this customer is shown never use it up
    rules_dir = scoped_rules(tmp_path, f"""  - name: once_a_week_only_this
    per: action
    max: 1
    days: 7
    actions: [{once}]
  - name: other_twice
    per: customer
    max: 2
    days: 7
    actions: [{other}]
    groups: [{group}]
""")
    engine = make_engine(redis_url, models_dir, rules_dir, clock)
    try:
        assert marketing_ids(decide(engine, cid, "call_center")) == first  # presented: counted
        clock.now += 3600
        d = decide(engine, cid, "call_center", explain=True)
        again = marketing_ids(d)
        assert once not in again
        assert any(f.action_id == once and f.stage == "contact" and "once_a_week_only_this" in f.detail
                   for f in d.funnel), d.funnel
        assert set(first) - {once} <= set(again), (first, again)  # the others still come
        assert not any(f.stage == "contact" and "other_twice" in f.detail for f in d.funnel)
        clock.now += 8 * DAY
        assert once in marketing_ids(decide(engine, cid, "call_center", max_actions=10))
    finally:
        engine.rules.current.close()


def test_contact_policy_actions_and_groups_must_exist(tmp_path: Path) -> None:
    rules_dir = scoped_rules(tmp_path, """  - name: typo
    max: 1
    days: 7
    actions: [upsell_extra_dta]
    groups: [mobile_plans]
""")
    with pytest.raises(RuleErrors) as err:
        load_and_compile(rules_dir)
    messages = [str(e) for e in err.value.errors]
    assert any("contact.yaml:" in m and "upsell_extra_dta" in m and "upsell_extra_data" in m for m in messages), messages
    assert any("contact.yaml:" in m and "mobile_plans" in m and "mobile_plan" in m for m in messages), messages
