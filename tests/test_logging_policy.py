"""The logging policy's exact probabilities (``engine.decision.choice``): every decision on the stream says
with what probability each presented action was chosen, and a test recomputes it from the logged inputs:
the feasible sets, the exploration share and the draws of the customer and period."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from engine.decision import choice
from engine.decision.funnel import DecisionEngine
from engine.live import Live
from engine.models.experiment import ExplorationConfig, ModelSet
from engine.models.exploration import Explorer
from engine.models.registry import ModelRegistry
from engine.rules.contact import ControlGroup
from engine.rules.runtime import load_and_compile
from engine.sim.telco import SCHEMA
from engine.store.decision_log import DecisionLog
from engine.store.profiles import DECISIONS_STREAM, ProfileStore
from engine.store.streams import xrange_all

from .clock import Clock
from .conftest import RULES_DIR
from .test_contact import decide
from .test_scenarios import NOON, customer

pytestmark = pytest.mark.both_redis

EPSILON = ExplorationConfig(strategy="epsilon", share=0.4)


def make(redis_url: str, models_dir: Path, exploration: ExplorationConfig = EPSILON,
         contacts: bool = True) -> DecisionEngine:
    store = ProfileStore.from_url(redis_url)
    models = ModelSet(ModelRegistry(models_dir, SCHEMA).load(), exploration=exploration)
    engine = DecisionEngine(store, Live(load_and_compile(RULES_DIR), retire=lambda r: r.close()), Live(models),
                            DecisionLog(store.client, linger=0), contacts=contacts, clock=Clock(NOON))
    return engine


def logged(engine: DecisionEngine) -> dict[str, dict[str, str]]:
    assert engine.decision_log is not None
    engine.decision_log.close()
    return {f[b"decision_id"].decode(): {k.decode(): v.decode() for k, v in f.items()}
            for _, f in xrange_all(engine.store.client, DECISIONS_STREAM)}


def recompute(entry: dict[str, str], exploration: ExplorationConfig) -> list[float]:
    """Each presented action's probability from the logged inputs alone, checking on the way that the
    customer's draws pick exactly the presented actions out of the logged feasible sets."""
    epsilon = float(entry["epsilon"])
    candidates = [c.split(":")[0] for c in entry["candidates"].split(",")] if entry.get("candidates") else []
    sets = [[int(i) for i in s.split()] for s in entry["choice_sets"].split(";")] if candidates else []
    shown = [a for a in entry["actions"].split(",") if a]
    draws = choice.draws(entry["customer_id"], Explorer.period(exploration, float(entry["ts"])), len(shown))
    out = []
    for slot, action in enumerate(shown):
        if slot >= len(sets):  # the channel's fallback: no draw chose it
            out.append(1.0)
            continue
        ids = [candidates[i] for i in sets[slot]]
        at = choice.pick(draws[slot], epsilon, len(ids))
        assert ids[at] == action, (slot, ids, action)
        out.append(choice.slot_probability(epsilon, len(ids), at))
    assert choice.slate_probability(epsilon, [[candidates[i] for i in s] for s in sets], shown[:len(sets)]) == \
        pytest.approx(math.prod(out))
    return out


def test_every_logged_probability_is_recomputed_from_the_logged_inputs(redis_url: str, models_dir: Path) -> None:
    """Many customers, every channel, three slots, contact limits that count the decision's own actions (two
    marketing e-mails a week: the third e-mail slot's feasible set has no offer left)."""
    engine = make(redis_url, models_dir)
    ids = [f"LP{i}" for i in range(60)]
    engine.store.save([customer(c) for c in ids], SCHEMA)
    for cid in ids:
        for channel in ("call_center", "email", "web"):
            decide(engine, cid, channel)
    entries = logged(engine)
    assert len(entries) == 180
    explored = 0
    for entry in entries.values():
        p = [float(x) for x in entry["probabilities"].split(",")]
        assert p == pytest.approx(recompute(entry, EPSILON), abs=1e-9)
        control = ControlGroup(0.1).contains(entry["customer_id"])
        assert float(entry["epsilon"]) == (0.0 if control else 0.4)
        explored += any(x < 0.5 for x in p)
    assert explored > 20  # exploration happened, and each such pick carries its small probability
    by_id = engine.rules.current.ruleset.by_id
    two_offers = [e for e in entries.values() if e["channel"] == "email" and len(e.get("choice_sets", "").split(";")) == 3
                  and not any(by_id[a].service for a in e["actions"].split(",")[:2])]
    assert two_offers, "some e-mail decisions show two offers, then fill a third slot"
    for e in two_offers:
        names = [c.split(":")[0] for c in e["candidates"].split(",")]
        third = [names[int(i)] for i in e["choice_sets"].split(";")[2].split()]
        assert all(by_id[a].service for a in third), third
    engine.rules.current.close()


def test_the_pick_frequencies_match_the_logged_probabilities(redis_url: str, models_dir: Path) -> None:
    """Identical customers in one state: how often each top action is shown matches its logged probability
    (the draws are uniform), within four standard errors."""
    engine = make(redis_url, models_dir, contacts=False)
    control = ControlGroup(0.1)
    ids = [c for c in (f"FQ{i}" for i in range(900)) if not control.contains(c)][:800]
    engine.store.save([customer(c) for c in ids], SCHEMA)
    firsts = Counter()
    probability: dict[str, float] = {}
    for cid in ids:
        d = decide(engine, cid, "call_center", max_actions=1)
        firsts[d.actions[0].action_id] += 1
        probability.setdefault(d.actions[0].action_id, d.probabilities[0])
        assert probability[d.actions[0].action_id] == pytest.approx(d.probabilities[0])
    assert len(firsts) > 3 and sum(probability.values()) == pytest.approx(1.0)
    for action, n in firsts.items():
        p = probability[action]
        assert abs(n / len(ids) - p) < 4 * (p * (1 - p) / len(ids)) ** 0.5 + 1e-9, (action, n, p)
    engine.rules.current.close()


def test_without_exploration_every_probability_is_one_and_nothing_more_is_logged(redis_url: str,
                                                                                models_dir: Path) -> None:
    """Not exploring, the walk judges each candidate once in ranked order (as it always did) and the
    decision records probability 1 for each action, without the feasible sets an evaluation would need."""
    engine = make(redis_url, models_dir, ExplorationConfig())
    engine.store.save([customer("NX1")], SCHEMA)
    d = decide(engine, "NX1", "call_center")
    entry = logged(engine)[d.decision_id]
    assert len(d.actions) == 3 and d.probabilities == [1.0, 1.0, 1.0]
    assert entry["epsilon"] == "0" and entry["probabilities"] == "1,1,1"
    assert "choice_sets" not in entry and "candidates" not in entry
    engine.rules.current.close()


def test_a_thompson_ranked_decision_logs_no_probability_and_evaluation_leaves_it_out(redis_url: str,
                                                                                     models_dir: Path) -> None:
    """A Thompson sample's chance of a ranking has no closed form: such a decision carries no
    ``probabilities`` (rather than a wrong one), and ``nba evaluate`` counts it among those left out."""
    from engine.analytics.evaluate import read_logged
    from engine.models.exploration import ExplorationCounts

    engine = make(redis_url, models_dir, ExplorationConfig(strategy="thompson", share=1.0))
    engine.explorer = Explorer(ExplorationCounts(engine.store.client))
    cid = next(c for c in (f"TS{i}" for i in range(50)) if not ControlGroup(0.1).contains(c))
    engine.store.save([customer(cid)], SCHEMA)
    d = decide(engine, cid, "call_center")
    assert d.explored and d.probabilities is None
    entry = logged(engine)[d.decision_id]
    assert "probabilities" not in entry and entry["explored"] == "1"
    assert read_logged(engine.store.client, SCHEMA, engine.rules.current.ruleset).counts["no_probabilities"] == 1
    engine.rules.current.close()


def test_exploring_every_slot_keeps_contact_limits_groups_and_the_control_group(redis_url: str,
                                                                                models_dir: Path) -> None:
    """With epsilon 1 every slot is a uniform draw, yet no decision shows two actions of one group, the
    e-mail limit (two marketing e-mails a week) holds within and across decisions, and the control group's
    decisions do not explore."""
    from .test_contact import marketing_ids

    engine = make(redis_url, models_dir, ExplorationConfig(strategy="epsilon", share=1.0))
    control = ControlGroup(0.1)
    ids = [f"XL{i}" for i in range(40)]
    engine.store.save([customer(c) for c in ids], SCHEMA)
    clock = engine.clock
    assert isinstance(clock, Clock)
    by_id = engine.rules.current.ruleset.by_id
    for cid in ids:
        emails = 0
        for day in range(3):
            clock.now = NOON + day * 86_400
            for channel in ("email", "call_center"):
                d = decide(engine, cid, channel, max_actions=5)
                groups = [by_id[a.action_id].group for a in d.actions]
                assert len(groups) == len(set(groups)), d.actions
                emails += len(marketing_ids(d)) if channel == "email" else 0
                assert d.epsilon == (0.0 if control.contains(cid) else 1.0)
        assert emails <= 2, cid
    engine.rules.current.close()


@pytest.mark.parametrize("strategy", ["epsilon", "thompson"])
def test_asked_again_an_interaction_says_whether_its_decision_explored(redis_url: str, models_dir: Path,
                                                                       strategy: str) -> None:
    """The interaction's stored header is written before the script draws: it says the decision explored, as
    the decision and its stream entry do, and a repeat of the interaction answers the same."""
    from engine.models.exploration import ExplorationCounts

    engine = make(redis_url, models_dir, ExplorationConfig(strategy=strategy, share=1.0))
    engine.explorer = Explorer(ExplorationCounts(engine.store.client))
    control = ControlGroup(0.1)
    explorer, held = (next(c for c in (f"HX{i}" for i in range(60)) if control.contains(c) == k) for k in (False, True))
    engine.store.save([customer(explorer), customer(held)], SCHEMA)
    made = {}
    for cid, exploring in ((explorer, True), (held, False)):
        first = decide(engine, cid, "call_center", interaction_id=f"call-{cid}")
        again = decide(engine, cid, "call_center", interaction_id=f"call-{cid}")
        assert again.repeat and again.decision_id == first.decision_id
        assert first.explored is again.explored is exploring, (cid, first.explored, again.explored)
        made[first.decision_id] = "1" if exploring else "0"
    entries = logged(engine)
    assert {d: entries[d]["explored"] for d in made} == made
    engine.rules.current.close()
