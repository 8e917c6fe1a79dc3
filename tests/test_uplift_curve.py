"""Qini curves, AUUC and the IPW uplift estimate per action (engine/analytics/uplift_curve.py) on a real Redis:
a randomised experiment written straight onto the decision, response and event streams with the logging
policy's exact probabilities (epsilon-greedy over the uplift ranking), where the true uplift of every
customer and action is known."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest

from engine.analytics.report import build_report, format_report
from engine.analytics.uplift_curve import format_qini, qini, qini_curve
from engine.store.archive import ArchiveWriter
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, RESPONSES_STREAM, redis_client

T0 = 1_700_000_000.0  # fixed: the outcomes are judged against an explicit as_of, never today's date
DAY = 86_400.0
EPS = 0.3
BASE = 0.1  # the organic conversion rate of every customer and action
ACTIONS = ("A", "B", "C")
# the true uplift of an offer shown first, per customer group: the even customers are swayed by A and B
UPLIFT = {"H": {"A": 0.3, "B": 0.2, "C": 0.0}, "L": {"A": 0.0, "B": -0.05, "C": 0.0}}
TRUTH = {a: (UPLIFT["H"][a] + UPLIFT["L"][a]) / 2 for a in ACTIONS}  # half the decisions are each group's
CUSTOMERS = 1_500
DECISIONS_EACH = 2  # 10 days apart: a customer's organic conversions fall in one decision's window only
AS_OF = T0 + 40 * DAY


@dataclass
class Written:
    """What the generator knows: per action, rows, treated rows and conversions per arm."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    treated: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    conversions: dict[str, list[int]] = field(default_factory=lambda: {a: [0, 0] for a in ACTIONS})


def write_experiment(client, scores: str = "true", seed: int = 7) -> Written:
    """The experiment onto the streams: ``scores`` "true" (the estimated uplift is the true one plus noise),
    "reversed" (minus it) or "shuffled" (unrelated to it); plus what must not count: pending decisions,
    control decisions, older decisions without ``arbitration``, duplicate events, outcomes outside the window
    or of other types."""
    rng = np.random.default_rng(seed)
    out = Written()
    pipe = client.pipeline(transaction=False)
    events = itertools.count()
    noise = rng.permutation(np.repeat([0.3, 0.2, 0.1, 0.0, -0.05], 10_000))
    for c, k in itertools.product(range(CUSTOMERS), range(DECISIONS_EACH)):
        customer, group = f"c{c:05d}", "H" if c % 2 == 0 else "L"
        did, ts = f"d{c:05d}-{k}", T0 + c * 60.0 + k * 10 * DAY
        truth = UPLIFT[group]
        if scores == "true":
            est = {a: truth[a] + rng.normal(0, 0.03) for a in ACTIONS}
        elif scores == "reversed":
            est = {a: -truth[a] + rng.normal(0, 0.03) for a in ACTIONS}
        else:
            est = {a: float(noise[rng.integers(len(noise))]) + rng.normal(0, 0.03) for a in ACTIONS}
        ranked = sorted(ACTIONS, key=lambda a: -est[a])  # the uplift arbitration's order
        pick = 0 if rng.random() < 1 - EPS else int(rng.integers(3))  # epsilon-greedy: P = 1-eps+eps/3, eps/3
        shown = ranked[pick]
        pipe.xadd(DECISIONS_STREAM, {
            "decision_id": did, "customer_id": customer, "ts": f"{ts:.3f}", "actions": shown, "control": "0",
            "epsilon": f"{EPS:g}", "arbitration": "uplift",
            "candidates": ",".join(f"{a}:{10 + i}" for i, a in enumerate(ranked)), "choice_sets": "0 1 2",
            "candidate_uplifts": ",".join(f"{est[a]:.6f}" for a in ranked)})
        for a in ranked:
            treated = a == shown
            converted = rng.random() < BASE + truth[a] * treated
            out.rows[a] += 1
            out.treated[a] += treated
            out.conversions[a][0 if treated else 1] += converted
            if converted and treated:
                pipe.xadd(RESPONSES_STREAM, {"decision_id": did, "action_id": a, "outcome": "accepted",
                                             "ts": f"{ts + 0.5 * DAY:.3f}"})
            elif converted:  # organic: the customer took the product without the offer (recorded twice)
                event = {"event_id": f"e{next(events)}", "customer_id": customer, "type": "offer_accepted",
                         "ts": f"{ts + 2 * DAY:.3f}", "attr.action_id": a, "source": "shop"}
                pipe.xadd(EVENTS_STREAM, event)
                pipe.xadd(EVENTS_STREAM, event)
            elif rng.random() < 0.3:  # what must not count: too late, too early, another type, a rejection
                late = {"event_id": f"e{next(events)}", "customer_id": customer, "type": "offer_accepted",
                        "ts": f"{ts + 7.5 * DAY:.3f}", "attr.action_id": a}
                early = late | {"event_id": f"e{next(events)}", "ts": f"{ts - 0.5 * DAY:.3f}"}
                other = late | {"event_id": f"e{next(events)}", "type": "page_view", "ts": f"{ts + DAY:.3f}"}
                for e in (late, early, other):
                    pipe.xadd(EVENTS_STREAM, e)
                pipe.xadd(RESPONSES_STREAM, {"decision_id": did, "action_id": a, "outcome": "rejected",
                                             "ts": f"{ts + DAY:.3f}"})
                if treated:
                    pipe.xadd(RESPONSES_STREAM, {"decision_id": did, "action_id": a, "outcome": "accepted",
                                                 "ts": f"{ts + 8 * DAY:.3f}"})
    # pending: decided a day before as_of, its window still open (its offers all accepted already)
    for i in range(50):
        did, ts = f"p{i}", AS_OF - DAY
        pipe.xadd(DECISIONS_STREAM, {
            "decision_id": did, "customer_id": f"c{i:05d}", "ts": f"{ts:.3f}", "actions": "A", "control": "0",
            "epsilon": "0.3", "arbitration": "uplift", "candidates": "A:1,B:1,C:1", "choice_sets": "0 1 2",
            "candidate_uplifts": "0.3,0.2,0.1"})
        pipe.xadd(RESPONSES_STREAM, {"decision_id": did, "action_id": "A", "outcome": "accepted", "ts": f"{ts + 60:.3f}"})
    # control decisions (never ranked for), and older decisions without the uplift fields: not rows
    for i in range(100):
        did, ts = f"k{i}", T0 + i
        pipe.xadd(DECISIONS_STREAM, {
            "decision_id": did, "customer_id": f"k{i:05d}", "ts": f"{ts:.3f}", "actions": "B", "control": "1",
            "epsilon": "0.3", "arbitration": "uplift", "candidates": "A:1,B:1,C:1", "choice_sets": "0 1 2",
            "candidate_uplifts": "0.3,0.2,0.1"})
        pipe.xadd(RESPONSES_STREAM, {"decision_id": did, "action_id": "B", "outcome": "accepted", "ts": f"{ts + 60:.3f}"})
        pipe.xadd(DECISIONS_STREAM, {
            "decision_id": f"o{i}", "customer_id": f"o{i:05d}", "ts": f"{ts:.3f}", "actions": "A", "control": "0",
            "epsilon": "0.3", "candidates": "A:1,B:1", "choice_sets": "0 1"})
    pipe.execute()
    return out


@pytest.fixture()
def client(redis_url: str):
    c = redis_client(redis_url)
    yield c
    c.close()


def test_ipw_uplift_covers_the_truth_and_the_ranked_scores_have_a_positive_qini(client) -> None:
    written = write_experiment(client, "true")
    result = qini(client, as_of=AS_OF, window_days=7.0, points=10)
    n = CUSTOMERS * DECISIONS_EACH
    assert result["decisions"] == {"uplift_arbitrated": n + 50 + 100, "control": 100, "not_exploring": 0,
                                   "no_candidates": 0, "unreadable": 0, "read": n + 50}
    assert result["pending"] == 50 * 3 and result["rows"] == 3 * n  # pending rows left out, counted
    assert list(result["actions"]) == ["A", "B", "C"]
    for a, g in result["actions"].items():
        # exact counts: duplicate events count once; late, early, other-type outcomes and control not at all
        assert g["rows"] == written.rows[a] == n and g["treated"] == written.treated[a]
        assert [g["conversions"]["treated"], g["conversions"]["untreated"]] == written.conversions[a]
        lo, hi = g["uplift"]["ci95"]
        assert lo <= TRUTH[a] <= hi, (a, g["uplift"])
        assert hi - lo < 0.15
        assert g["uplift"]["customers"] == CUSTOMERS
        assert len(g["curve"]["share"]) == len(g["curve"]["incremental"]) == 11
        assert g["curve"]["incremental"][0] == 0.0
        assert g["curve"]["incremental"][-1] == pytest.approx(g["uplift"]["estimate"], abs=1e-4)  # Q(all)
    # the scores put the swayed customers first: clearly better than random targeting (perfect: +0.0375)
    assert result["actions"]["A"]["qini_coefficient"] > 0.02
    assert result["actions"]["B"]["qini_coefficient"] > 0.01
    assert abs(result["actions"]["C"]["qini_coefficient"]) < 0.015  # no one is swayed by C
    assert result["all"]["qini_coefficient"] > 0.015
    assert result["all"]["rows"] == 3 * n
    lo, hi = result["all"]["uplift"]["ci95"]
    assert lo <= sum(TRUTH.values()) / 3 <= hi
    # targeting the top half of A's scores (the swayed half) earns most of what offering A to all would
    curve = result["actions"]["A"]["curve"]
    assert curve["share"][5] == 0.5 and curve["incremental"][5] > 0.75 * curve["incremental"][-1]
    assert result["actions"]["A"]["peak"]["incremental"] >= curve["incremental"][-1]
    text = format_qini(result)
    assert "A " in text and "AUUC" in text and "Qini coefficient" in text


@pytest.mark.parametrize("scores", ["reversed", "shuffled"])
def test_reversed_or_shuffled_scores_have_no_positive_qini(client, scores: str) -> None:
    write_experiment(client, scores, seed=11)
    result = qini(client, as_of=AS_OF)
    a = result["actions"]["A"]
    lo, hi = a["uplift"]["ci95"]
    assert lo <= TRUTH["A"] <= hi  # the estimate does not depend on the scores
    if scores == "reversed":
        assert a["qini_coefficient"] < -0.02 and result["all"]["qini_coefficient"] < -0.01
    else:
        assert abs(a["qini_coefficient"]) < 0.015 and abs(result["all"]["qini_coefficient"]) < 0.01


def test_the_archive_plus_the_trimmed_streams_give_the_same_result(client, redis_url: str, tmp_path) -> None:
    write_experiment(client, "true")
    streams = qini(client, as_of=AS_OF)
    with ArchiveWriter(redis_client(redis_url), tmp_path / "archive", trim=True) as writer:
        assert writer.once() > 0
    assert client.xlen(EVENTS_STREAM) == 0 and client.xlen(DECISIONS_STREAM) == 0  # all of it archived, trimmed
    assert qini(client, archive=tmp_path / "archive", as_of=AS_OF) == streams


def test_pending_until_the_window_closes(client) -> None:
    write_experiment(client, "true")
    early = qini(client, as_of=AS_OF - 1.5 * DAY)  # the 50 late decisions: logged after as_of, pending
    assert early["pending"] == 50 * 3
    # before the second round's windows close, its rows are pending too
    mid = qini(client, as_of=T0 + 12 * DAY)
    assert mid["pending"] > 0 and mid["rows"] + mid["pending"] == 3 * (CUSTOMERS * DECISIONS_EACH + 50)
    later = qini(client, as_of=AS_OF + 8 * DAY)
    assert later["pending"] == 0 and later["rows"] == 3 * (CUSTOMERS * DECISIONS_EACH + 50)


def test_qini_curve_is_the_weighted_formula_and_order_free_within_ties() -> None:
    rng = np.random.default_rng(3)
    n = 200
    score = rng.normal(size=n)
    treated = rng.random(n) < 0.4
    p = rng.uniform(0.1, 0.9, n)
    y = (rng.random(n) < 0.3).astype(float)
    share, q = qini_curve(score, treated, p, y)
    order = np.argsort(-score)
    total = sum(1 / p[i] for i in range(n) if treated[i])
    for k in (10, 50, 120, 200):
        top = order[:k]
        wt = sum(1 / p[i] for i in top if treated[i])
        wu = sum(1 / (1 - p[i]) for i in top if not treated[i])
        yt = sum(y[i] / p[i] for i in top if treated[i])
        yu = sum(y[i] / (1 - p[i]) for i in top if not treated[i])
        assert share[k] == pytest.approx(k / n)
        assert q[k] == pytest.approx((yt - yu * wt / wu) / total)
    # tied scores: one point per tie, whatever the rows' order
    tied = np.round(score, 0)
    s1, q1 = qini_curve(tied, treated, p, y)
    perm = rng.permutation(n)
    s2, q2 = qini_curve(tied[perm], treated[perm], p[perm], y[perm])
    assert np.allclose(s1, s2) and np.allclose(q1, q2) and len(s1) == len(np.unique(tied)) + 1


def test_nba_report_shows_the_section(client) -> None:
    plain = build_report(client)
    assert "uplift" not in plain  # nothing yet
    write_experiment(client, "true")
    report = build_report(client)
    assert set(report) - {"uplift"} == set(plain) and report["uplift"]["decisions"]["control"] == 100
    assert report["uplift"]["actions"]["A"]["qini_coefficient"] > 0.02
    text = format_report(report)
    assert "uplift of offering first, from 3050 uplift-arbitrated exploring decisions" in text
    assert "Qini coefficient" in text and "\nA " in text


def test_too_few_rows_for_a_curve_and_no_exploring_decisions(client) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(20):
        pipe.xadd(DECISIONS_STREAM, {
            "decision_id": f"d{i}", "customer_id": f"c{i}", "ts": f"{T0 + i:.3f}", "actions": "A", "control": "0",
            "epsilon": "0.3", "arbitration": "uplift", "candidates": "A:1,B:1", "choice_sets": "0 1",
            "candidate_uplifts": "0.2,0.1"})
        pipe.xadd(DECISIONS_STREAM, {"decision_id": f"n{i}", "customer_id": f"c{i}", "ts": f"{T0 + i:.3f}",
                                     "actions": "A", "control": "0", "epsilon": "0", "arbitration": "uplift"})
    pipe.execute()
    result = qini(client, as_of=AS_OF)
    assert result["decisions"]["not_exploring"] == 20 and result["decisions"]["read"] == 20
    a = result["actions"]["A"]
    assert a["curve"] is None and a["qini_coefficient"] is None and "fewer than 30" in a["reason"]
    assert "no curve" in format_qini(result)
    none = qini(client, as_of=AS_OF, customer_prefix="zz")
    assert none["decisions"]["read"] == 0 and none["all"] is None
    assert format_qini(none).startswith("uplift: no uplift-arbitrated exploring decisions")
