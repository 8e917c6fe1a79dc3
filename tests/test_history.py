"""The contact history as bounded counters (``engine.decision.history``): judged like the per-contact
history it replaced, exactly except where a day's contacts straddle a window start, and then never more
permissive; its size does not grow with how often a customer is seen; an old history is folded in."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import redis

from engine.authoring.contactscope import unkept_contacts
from engine.decision.codes import Codes
from engine.decision.contact import PRESENT, present_args
from engine.decision.history import contacts_key, counted, read_history
from engine.decision.responses import ResponseRecorder
from engine.live import Live
from engine.rules.contact import DAY_MS, KINDS, PERS, ContactLimit, ContactRules
from engine.rules.runtime import load_and_compile

from .clock import DAY, at

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"
NOW = at(0, "12:00")


@dataclass(frozen=True)
class Act:
    id: str
    group: str
    type: str
    value: float = 10.0
    daily_budget: int | None = None


class Verdict:
    def __init__(self, action: Act) -> None:
        self.action = action


ACTS = [Act("up_a", "family_1", "upsell"), Act("up_b", "family_1", "upsell"), Act("ret", "family_2", "retention"),
        Act("care", "service_1", "service")]
CHANNELS = ("call_center", "web", "email")


def demo_limits() -> tuple[ContactLimit, ...]:
    rules = load_and_compile(RULES_DIR)
    try:
        return rules.ruleset.contact.limits
    finally:
        rules.close()


# the demo's limits (30, 14, 30 and 7 days) and two the rule language allows too: fractions of days
LIMITS = demo_limits() + (
    ContactLimit("half_day", 2, 0.5, "action", "impressions"),
    ContactLimit("fractional", 4, 2.25, "group", "impressions", frozenset({"web", "email"}), frozenset({"upsell"})),
    ContactLimit("rejections_per_customer", 2, 3.5, "customer", "rejections"),
)


# limits that count every contact and stop none: how these tests write a history (the history keeps only
# what a limit counts)
RECORD_ALL = ContactRules(tuple(ContactLimit(f"all_{kind}", 10**9, 40, "customer", kind)
                                for kind in ("impressions", "rejections", "acceptances")))


def recorder(client: redis.Redis, t: float, contact: ContactRules = RECORD_ALL) -> ResponseRecorder:
    return ResponseRecorder(client, Live(SimpleNamespace(ruleset=SimpleNamespace(contact=contact))),  # type: ignore[arg-type]
                            clock=lambda: t)


@dataclass(frozen=True)
class Contact:
    ts_ms: int
    kind: str
    act: Act
    channel: str


class Presenter:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.script = client.register_script(PRESENT)
        self.codes = Codes(client)
        self.n = 0

    def present(self, rules: ContactRules, cid: str, act: Act, channel: str, now: float, mode: str) -> str:
        self.n += 1
        did = f"{int(now * 1000):012x}{self.n:020x}"
        record = {"customer": cid, "channel": channel, "ts": f"{now:.3f}", "counted": "1"}
        keys, args, _ = present_args(rules, [(1.0, 0.5, Verdict(act))], None, 1, channel, did, now, record, cid, mode,
                                     codes=self.codes)
        verdicts = self.script(keys=keys, args=[args])[0]
        return f"{did}:{verdicts[0].decode()}"


def write(client: redis.Redis, presenter: Presenter, cid: str, contacts: list[Contact]) -> None:
    """Each contact through the production paths: an impression is a decision presenting the action
    (limits that count it and stop nothing), a rejection or acceptance the response to such a decision."""
    for c in sorted(contacts, key=lambda c: c.ts_ms):
        t = c.ts_ms / 1000
        did, verdict = presenter.present(RECORD_ALL, cid, c.act, c.channel, t, "decide").split(":")
        assert verdict == "ok"
        if c.kind != "i":
            recorder(client, t).record(did, c.act.id, "rejected" if c.kind == "r" else "accepted", t)


def exact(contacts: list[Contact], limits: tuple[ContactLimit, ...], act: Act, channel: str, now_ms: int) -> str:
    """The verdict of the per-contact history: every contact of the window counted."""
    for i, limit in enumerate(limits, 1):
        if not limit.applies(act, channel):  # type: ignore[arg-type]
            continue
        n = len(_counted(contacts, limit, act, now_ms - int(limit.days * DAY_MS)))
        if n >= limit.max:
            return f"limit:{i}:{n}"
    return "ok"


def _counted(contacts: list[Contact], limit: ContactLimit, act: Act, since: int) -> list[Contact]:
    return [c for c in _relevant(contacts, limit, act) if c.ts_ms >= since]


def _relevant(contacts: list[Contact], limit: ContactLimit, act: Act) -> list[Contact]:
    per = PERS[limit.per]
    return [c for c in contacts if c.kind == KINDS[limit.counts]
            and (not limit.channels or c.channel in limit.channels) and (not limit.types or c.act.type in limit.types)
            and (per == "c" or (per == "a" and c.act.id == act.id) or (per == "g" and c.act.group == act.group))]


def straddles(contacts: list[Contact], limits: tuple[ContactLimit, ...], act: Act, channel: str, now_ms: int) -> bool:
    """Whether 3 or more contacts of one counter (kind, action, channel, day) lie on both sides of the
    window start of a limit that judges ``act``: the one case the counters count more than there are."""
    for limit in limits:
        if not limit.applies(act, channel):  # type: ignore[arg-type]
            continue
        since = now_ms - int(limit.days * DAY_MS)
        days: dict[tuple, list[int]] = {}
        for c in _relevant(contacts, limit, act):
            days.setdefault((c.act.id, c.channel, c.ts_ms // DAY_MS), []).append(c.ts_ms)
        if any(len(ts) >= 3 and min(ts) < since <= max(ts) for ts in days.values()):
            return True
    return False


def at_most_as_permissive(new: str, old: str) -> bool:
    """``new`` forbids whatever ``old`` forbids, by the same limit with a count at least as high or by an
    earlier limit."""
    if old == "ok":
        return True
    if not new.startswith("limit:"):
        return False
    (_, i, n), (_, j, m) = old.split(":"), new.split(":")
    return int(j) < int(i) or (j == i and int(m) >= int(n))


def random_contacts(rng: random.Random, now_ms: int) -> list[Contact]:
    edges = sorted({limit.days for limit in LIMITS})
    contacts = []
    for _ in range(rng.randrange(5, 30)):
        kind, act, channel = rng.choice("iiirra"), rng.choice(ACTS), rng.choice(CHANNELS)
        if rng.random() < 0.6:  # a burst close to a window start: within hours, on either side
            edge = rng.choice(edges)
            contacts += [Contact(now_ms - int((edge + rng.uniform(-0.15, 0.15)) * DAY_MS), kind, act, channel)
                         for _ in range(rng.choice((1, 1, 2, 3, 4)))]
        else:
            contacts.append(Contact(now_ms - int(rng.uniform(0, 33) * DAY_MS), kind, act, channel))
    return contacts


def judge_all(presenter: Presenter, cid: str, contacts: list[Contact], now: float) -> tuple[int, int]:
    """Every action on every channel judged by the counters (a preview) and by the per-contact history:
    (how many verdicts were the same, how many stricter where a day straddles a window start)."""
    same = stricter = 0
    now_ms = int(now * 1000)
    for act in ACTS:
        for channel in CHANNELS:
            new = presenter.present(ContactRules(LIMITS), cid, act, channel, now, "dry").split(":", 1)[1]
            old = exact(contacts, LIMITS, act, channel, now_ms)
            if straddles(contacts, LIMITS, act, channel, now_ms):
                assert at_most_as_permissive(new, old), (cid, act.id, channel, new, old)
                stricter += new != old
            else:
                assert new == old, (cid, act.id, channel, new, old)
                same += 1
    return same, stricter


def test_counters_judge_every_limit_as_the_per_contact_history_or_more_strictly(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    presenter = Presenter(client)
    rng = random.Random(18)
    same = stricter = 0
    for trial in range(40):
        cid = f"HIST-{trial}"
        contacts = random_contacts(rng, int(NOW * 1000))
        write(client, presenter, cid, contacts)
        # a rejection or acceptance comes with the impression of its decision
        contacts += [Contact(c.ts_ms, "i", c.act, c.channel) for c in contacts if c.kind != "i"]
        s, t = judge_all(presenter, cid, contacts, NOW)
        same, stricter = same + s, stricter + t
    assert same > 300 and stricter > 0  # both cases were met


def test_what_no_limit_reads_is_dropped_and_every_verdict_stays_the_same(redis_url: str) -> None:
    """A history written while every contact was kept (the layout before the history kept only what
    the limits count): the first decision under the limits drops every field no limit counts and every
    field older than the windows that count it, and no verdict changes, then or later."""
    client = redis.Redis.from_url(redis_url)
    presenter = Presenter(client)
    rules = ContactRules(LIMITS)
    rng = random.Random(29)
    dropped = 0
    for trial in range(30):
        cid = f"KEEP-{trial}"
        contacts = random_contacts(rng, int(NOW * 1000))
        write(client, presenter, cid, contacts)
        contacts += [Contact(c.ts_ms, "i", c.act, c.channel) for c in contacts if c.kind != "i"]
        before = len(read_history(client, cid))
        for now in (NOW, NOW + 2 * 3_600):
            act, channel = ACTS[trial % len(ACTS)], CHANNELS[trial % len(CHANNELS)]
            verdict = presenter.present(rules, cid, act, channel, now, "decide").split(":", 1)[1]
            if verdict == "ok" and any(l.counts == "impressions" and l.applies(act, channel) for l in LIMITS):  # type: ignore[arg-type]
                contacts.append(Contact(int(now * 1000), "i", act, channel))
            judge_all(presenter, cid, contacts, now)
            judge_all(presenter, cid, contacts, now + 0.5 * DAY)
        history = read_history(client, cid)
        dropped += before - len(history)
        now_ms = int((NOW + 2 * 3_600) * 1000)
        for c in history:  # what stays, a limit counts and its window still reaches
            keep = rules.keep_ms(c.kind, c.action, c.group, c.type, c.channel)
            assert keep and (c.day + 1) * DAY_MS > now_ms - keep, c
    assert dropped > 100


def test_a_window_start_is_exact_to_the_millisecond(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    presenter = Presenter(client)
    week = ContactRules((ContactLimit("weekly", 2, 7, "action"),))
    act = ACTS[0]
    now_ms = int(NOW * 1000)
    start = now_ms - 7 * DAY_MS
    write(client, presenter, "EDGE-IN", [Contact(start, "i", act, "web"), Contact(start + 5, "i", act, "web")])
    write(client, presenter, "EDGE-OUT", [Contact(start - 1, "i", act, "web"), Contact(start + 5, "i", act, "web")])
    assert presenter.present(week, "EDGE-IN", act, "web", NOW, "dry").endswith(":limit:1:2")
    assert presenter.present(week, "EDGE-OUT", act, "web", NOW, "dry").endswith(":ok")  # 1 in the window


def test_three_contacts_of_one_day_across_a_window_start_count_more_never_fewer(redis_url: str) -> None:
    """The documented approximation: of 3 same-day contacts, 2 just before the window start and 1 after,
    the counters count 2 (the first is known to be outside, the others may not be), the exact count is 1."""
    client = redis.Redis.from_url(redis_url)
    presenter = Presenter(client)
    week = ContactRules((ContactLimit("weekly", 2, 7, "action"),))
    act = ACTS[0]
    start = int(NOW * 1000) - 7 * DAY_MS
    contacts = [Contact(start - 3_600_000, "i", act, "web"), Contact(start - 1, "i", act, "web"),
                Contact(start + 3_600_000, "i", act, "web")]
    write(client, presenter, "STRADDLE", contacts)
    assert exact(contacts, week.limits, act, "web", int(NOW * 1000)) == "ok"
    assert presenter.present(week, "STRADDLE", act, "web", NOW, "dry").endswith(":limit:1:2")
    assert presenter.present(week, "STRADDLE", act, "web", NOW + 3_600, "dry").endswith(":limit:1:2")  # exact: 1
    assert presenter.present(week, "STRADDLE", act, "web", NOW + 7_201, "dry").endswith(":ok")  # the last one is out


def test_the_history_does_not_grow_with_how_often_a_customer_is_seen(redis_url: str, redis_admin_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_admin_url)  # HLEN and OBJECT: not the service's
    presenter = Presenter(client)
    rules = ContactRules(LIMITS)
    sizes = []
    for n in range(600):  # 600 decisions in one day, then 600 the next: each day's fields, no more
        t = NOW + (n // 300) * DAY + (n % 300) * 60
        act = ACTS[n % len(ACTS)]
        presenter.present(RECORD_ALL, "OFTEN", act, CHANNELS[n % 3], t, "decide")
        if n % 100 == 99:
            sizes.append(admin.hlen(contacts_key("OFTEN")))
        assert presenter.present(rules, "OFTEN", act, "call_center", t, "dry")
    assert sizes == [len(ACTS) * 3] * 3 + [2 * len(ACTS) * 3] * 3  # (action, channel) per day
    assert counted(read_history(client, "OFTEN"), "i") == 600
    assert admin.object("encoding", contacts_key("OFTEN")) == b"ziplist"  # compact while under 128 fields


def test_fields_older_than_every_window_are_dropped_when_deciding(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    presenter = Presenter(client)
    rules = ContactRules(LIMITS)
    presenter.present(rules, "OLD", ACTS[0], "web", NOW - 40 * DAY, "decide")
    presenter.present(rules, "OLD", ACTS[1], "web", NOW - 29 * DAY, "decide")
    presenter.present(rules, "OLD", ACTS[2], "web", NOW, "dry")
    assert len(read_history(client, "OLD")) == 2  # a preview writes nothing
    presenter.present(rules, "OLD", ACTS[2], "web", NOW, "decide")
    assert sorted(c.action for c in read_history(client, "OLD")) == ["ret", "up_b"]


def test_thousands_of_old_fields_are_dropped_in_one_decision(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    old_day = int(NOW * 1000) // DAY_MS - 40
    client.hset(contacts_key("MANY"), mapping={f"i|a{i}|g|upsell|web|{old_day}": "1:0:0" for i in range(9_000)})
    Presenter(client).present(ContactRules(LIMITS), "MANY", ACTS[0], "web", NOW, "decide")
    assert [c.action for c in read_history(client, "MANY")] == ["up_a"]


def test_a_history_in_the_earlier_layout_is_folded_into_counters(redis_url: str) -> None:
    """Before issue 18 a history was a sorted set, one member per contact: the first script to touch it
    (a decision, a preview or a response) turns it into counters, keeping its expiry, and it is judged as
    before."""
    client = redis.Redis.from_url(redis_url)
    presenter = Presenter(client)
    rules = ContactRules(LIMITS)
    now_ms = int(NOW * 1000)
    rng = random.Random(7)
    for cid in ("LEGACY-D", "LEGACY-R"):
        contacts = [Contact(now_ms - int(rng.uniform(0, 20) * DAY_MS), rng.choice("iir"), rng.choice(ACTS[:2]), "web")
                    for _ in range(12)]
        client.zadd(contacts_key(cid), {f"{c.kind}|{c.act.id}|{c.act.group}|{c.act.type}|{c.channel}|d{i}|{i}": c.ts_ms
                                        for i, c in enumerate(contacts)})
        client.pexpire(contacts_key(cid), 10 * DAY_MS)
        if cid == "LEGACY-D":
            verdict = presenter.present(rules, cid, ACTS[0], "web", NOW, "dry").split(":", 1)[1]
            assert verdict == exact(contacts, LIMITS, ACTS[0], "web", now_ms)
        else:
            did = presenter.present(RECORD_ALL, cid, ACTS[3], "web", NOW, "reserve").split(":")[0]
            recorder(client, NOW).record(did, ACTS[3].id, "rejected", NOW)
            contacts.append(Contact(now_ms, "r", ACTS[3], "web"))
        assert client.type(contacts_key(cid)) == b"hash" and client.pttl(contacts_key(cid)) > 9 * DAY_MS
        history = read_history(client, cid)
        for kind in "ira":
            for act in ACTS:
                assert counted(history, kind, action=act.id) == sum(c.kind == kind and c.act == act for c in contacts)


def test_a_response_enters_the_history_only_when_a_limit_counts_it(redis_url: str) -> None:
    """Under the demo's limits a rejection of any action starts a 14-day cool-down, so it is kept; an
    acceptance counts only for marketing types, so a service action's acceptance is not."""
    client = redis.Redis.from_url(redis_url)
    presenter = Presenter(client)
    demo = ContactRules(demo_limits())
    care, upsell = ACTS[3], ACTS[0]
    for cid, act, outcome, kept in (("R-CARE", care, "rejected", ["r"]), ("A-CARE", care, "accepted", []),
                                    ("A-UP", upsell, "accepted", ["a", "i"])):
        did = presenter.present(demo, cid, act, "call_center", NOW, "decide").split(":")[0]
        recorder(client, NOW, demo).record(did, act.id, outcome, NOW)
        assert sorted(c.kind for c in read_history(client, cid)) == sorted(kept), cid
    assert client.pttl(contacts_key("R-CARE")) > 13 * DAY_MS
    assert demo.keep_ms("r", care.id, care.group, care.type, "web") == 14 * DAY_MS
    assert demo.keep_ms("i", care.id, care.group, care.type, "web") == 0


def test_a_policy_that_counts_what_the_live_ones_did_not_keep_is_named() -> None:
    """The reload's warning (and ``nba rules diff``'s): a new policy on service impressions, which no demo
    policy counts, finds none of them in the history at first."""
    rules = load_and_compile(RULES_DIR)
    try:
        live = rules.ruleset
        assert live.contact is not None and unkept_contacts(live, live) == []
        added = ContactLimit("service_twice_a_week", 2, 7, "action", types=frozenset({"service"}))
        wider = replace(live, contact=replace(live.contact, limits=(*live.contact.limits, added)))
        (why,) = unkept_contacts(wider, live)
        assert why.startswith("service_twice_a_week: the impressions it counts") and "were not kept" in why
        longer = replace(live, contact=replace(live.contact, limits=tuple(
            replace(l, days=21) if l.name == "cool_down_after_rejection" else l for l in live.contact.limits)))
        (why,) = unkept_contacts(longer, live)
        assert "were kept 14 days" in why and "for its first 21 days" in why
    finally:
        rules.close()
