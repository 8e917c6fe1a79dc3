"""Uplift arbitration (issue 31, part 4): the uplift world's sure things and sleeping dogs, the organic
rows the second model trains on, a version with both models, the funnel ranking on incremental value, and
``nba simulate`` comparing it with propensity arbitration."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.analytics.training_rows import ORGANIC_EVENT, from_streams
from engine.decision.funnel import DecisionEngine
from engine.decision.request import DecideInput
from engine.errors import NbaError
from engine.live import Live
from engine.models.experiment import ExperimentError, ExplorationConfig, ModelSet, load_model_set, parse_experiment
from engine.models.registry import ConstantScorer, LoadedModel, ModelRefused, ModelRegistry
from engine.rules.loader import load_rules
from engine.rules.runtime import load_and_compile
from engine.sim import world as sim_world
from engine.sim.dynamics import UPLIFT, Population
from engine.sim.simulate import Settings, format_simulation, simulate, table
from engine.sim.telco import ACTION_TYPES, CHANNELS, SCHEMA
from engine.store.decision_log import DecisionLog
from engine.store.profiles import DECISIONS_STREAM, EVENTS_STREAM, ProfileStore
from engine.store.streams import xrange_all

from .clock import Clock
from .conftest import RULES_DIR
from .test_contact import not_control
from .test_scenarios import NOON, customer

DAY = 86_400.0


def test_the_uplift_world_has_its_documented_shares_and_laws() -> None:
    w = sim_world.generate(20_000, 3, "uplift")
    shares = np.bincount(w.uplift, minlength=3) / w.size
    assert shares[sim_world.SURE_THING] == pytest.approx(sim_world.SURE_THING_SHARE, abs=0.02)
    assert shares[sim_world.SLEEPING_DOG] == pytest.approx(sim_world.SLEEPING_DOG_SHARE, abs=0.02)
    assert not sim_world.generate(500, 3, "realistic").uplift.any()  # the other worlds: everyone persuadable
    # the same observed customers as the realistic world of the seed: only what an offer changes differs
    assert np.array_equal(sim_world.generate(500, 3, "realistic").numeric, sim_world.generate(500, 3, "uplift").numeric)

    class A:
        def __init__(self, id: str, type: str) -> None:
            self.id, self.type, self.value = id, type, 30.0

    actions = [A(f"a_{t}", t) for t in ACTION_TYPES]
    pop = Population(w, actions, UPLIFT)
    by_type = {t: k for k, t in enumerate(ACTION_TYPES)}
    for cls in (sim_world.PERSUADABLE, sim_world.SURE_THING, sim_world.SLEEPING_DOG):
        i = int(np.flatnonzero(w.uplift == cls)[0])
        organic = pop.organic_probability(i, False)
        treated = pop.probability(i, [a.id for a in actions], CHANNELS.index("web"), 0.0, False)
        for t, k in by_type.items():
            if t == "service":
                assert organic[k] == 0  # customer care is given, not bought
            elif cls == sim_world.SLEEPING_DOG and t in sim_world.SLEEPING_DOG_TYPES:
                assert organic[k] > treated[k]  # the offer pushes them away
            elif cls == sim_world.SURE_THING and t in sim_world.SURE_THING_TYPES:
                assert organic[k] == pytest.approx(treated[k])  # they take it anyway
            else:
                logit = np.log(organic[k] / (1 - organic[k])) - np.log(treated[k] / (1 - treated[k]))
                assert logit == pytest.approx(-sim_world.ORGANIC_GAP)  # few would take it anyway
    # learnable: the classes lean on observed features (frequent recent buyers, long-tenured quiet customers);
    # a classifier of the observed numbers trained on one population finds them in another
    import lightgbm as lgb

    from engine.models.training import auc

    other = sim_world.generate(20_000, 4, "uplift")
    for cls in (sim_world.SURE_THING, sim_world.SLEEPING_DOG):
        booster = lgb.train({"objective": "binary", "verbose": -1, "seed": 1},
                            lgb.Dataset(w.numeric, (w.uplift == cls).astype(float)), 100)
        assert auc((other.uplift == cls).astype(float), booster.predict(other.numeric)) > 0.9


def _two_halves(registry: ModelRegistry, source: Path) -> str:
    """A version whose organic half is the demo model itself (a real LightGBM file)."""
    text = (source / "model.txt").read_text()
    actions = list(registry.load().action_levels)
    return registry.save(text, actions, {}, {}, organic=(text, {"holdout_auc": 0.5}, {"rows": 1}))


def test_a_version_with_an_organic_model_and_an_experiment_that_needs_one(models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    registry = ModelRegistry(root, SCHEMA)
    plain = registry.champion()
    assert plain is not None and registry.load().organic is None
    (registry.dir / "experiment.yaml").write_text("arbitration: uplift\n")
    with pytest.raises(ExperimentError, match=f"{plain} has no organic model"):
        load_model_set(registry)  # refused: the running set stays
    version = _two_halves(registry, registry.dir / plain)
    registry.promote(version)
    models = load_model_set(registry)
    assert models.arbitration == "uplift" and models.champion.organic is not None
    assert models.champion.organic.version == f"{version}+organic"
    assert "uplift arbitration" in models.describe()
    assert registry.metrics(version)["organic"]["metrics"] == {"holdout_auc": 0.5}
    (registry.dir / version / "organic.txt").write_text("not a model")
    with pytest.raises(ModelRefused, match="organic.txt: not a usable LightGBM model"):
        registry.load(version)
    with pytest.raises(ExperimentError, match="arbitration: must be one of propensity, uplift"):
        parse_experiment("arbitration: lift\n")
    assert isinstance(ExperimentError("x"), NbaError)


def _engine(redis_url: str, model: LoadedModel, exploration: ExplorationConfig | None = None
            ) -> DecisionEngine:
    store = ProfileStore.from_url(redis_url)
    models = ModelSet(model, exploration=exploration or ExplorationConfig(), arbitration="uplift")
    return DecisionEngine(store, Live(load_and_compile(RULES_DIR), retire=lambda r: r.close()), Live(models),
                          DecisionLog(store.client, linger=0), clock=Clock(NOON))


def _with_organic(model: LoadedModel, p: float) -> LoadedModel:
    return replace(model, organic=replace(model, version=f"{model.version}+organic", scorer=ConstantScorer(p)))


def _stream(engine: DecisionEngine) -> dict[str, dict[str, str]]:
    assert engine.decision_log is not None
    engine.decision_log.close()
    return {f[b"decision_id"].decode(): {k.decode(): v.decode() for k, v in f.items()}
            for _, f in xrange_all(engine.store.client, DECISIONS_STREAM)}


def _without(p: float, shift: float) -> float:
    """What the funnel computes: sigmoid(logit p + logit shift)."""
    return 1 / (1 + (1 - p) * (1 - shift) / (p * shift))


@pytest.mark.both_redis
def test_the_funnel_ranks_on_incremental_value_and_drops_offers_that_gain_nothing(redis_url: str,
                                                                                  models_dir: Path) -> None:
    champion = ModelRegistry(models_dir, SCHEMA).load()
    engine = _engine(redis_url, _with_organic(champion, 0.2))  # a shift of logit(0.2): a quarter of the odds
    cid = not_control("UP")
    engine.store.save([customer(cid, data_usage_gb=38)], SCHEMA)
    plain = DecisionEngine(engine.store, engine.rules, Live(ModelSet(champion)), clock=Clock(NOON))
    weights = {e.action_id: e.priority / (e.propensity * a.value)  # levers x context weight, as propensity ranks
               for e in plain.decide(DecideInput(customer_id=cid, channel="web", max_actions=3, explain=True,
                                                 preview=True)).funnel
               for a in engine.rules.current.ruleset.actions if a.id == e.action_id and e.propensity > 0}
    d = engine.decide(DecideInput(customer_id=cid, channel="web", max_actions=3, explain=True))
    assert d.actions
    for a in d.actions:
        without = _without(a.propensity, 0.2)
        assert f"uplift arbitration: {a.propensity:.3f} if shown, {without:.3f} without" in a.reasons
        assert a.priority == pytest.approx((a.propensity - without) * a.value * weights[a.action_id], rel=1e-6)
    priorities = [a.priority for a in d.actions]
    assert priorities == sorted(priorities, reverse=True)
    entry = _stream(engine)[d.decision_id]
    assert entry["arbitration"] == "uplift"
    assert [float(u) for u in entry["uplifts"].split(",")] == pytest.approx(
        [a.propensity - _without(a.propensity, 0.2) for a in d.actions], abs=1e-5)

    # no shift: every customer would take every offer anyway, so no offer gains anything
    everything = _engine(redis_url, _with_organic(champion, 0.5))
    other = not_control("UQ")
    everything.store.save([customer(other)], SCHEMA)
    d = everything.decide(DecideInput(customer_id=other, channel="web", max_actions=3, explain=True))
    assert all(a.type == "service" or a.reasons[0].startswith("fallback") for a in d.actions)
    dropped = [e for e in d.funnel if e.stage == "no_uplift"]
    assert dropped and all("showing it gains nothing" in e.detail for e in dropped)
    # the control group keeps its control policy: nothing is dropped for it
    control = next(f"UC{i}" for i in range(1000) if everything.rules.current.ruleset.contact.control.contains(f"UC{i}"))
    everything.store.save([customer(control)], SCHEMA)
    d = everything.decide(DecideInput(customer_id=control, channel="web", max_actions=3, explain=True))
    assert d.control and not any(e.stage == "no_uplift" for e in d.funnel)


@pytest.mark.both_redis
def test_exploring_uplift_decisions_log_each_candidates_estimate(redis_url: str, models_dir: Path) -> None:
    champion = ModelRegistry(models_dir, SCHEMA).load()
    engine = _engine(redis_url, _with_organic(champion, 0.1), ExplorationConfig(strategy="epsilon", share=0.5))
    ids = [not_control(f"UX{i}") for i in range(8)]
    engine.store.save([customer(c) for c in ids], SCHEMA)
    decisions = [engine.decide(DecideInput(customer_id=c, channel="call_center", max_actions=1, explain=True))
                 for c in ids]
    stream = _stream(engine)
    for d in decisions:
        entry = stream[d.decision_id]
        candidates = [c.split(":")[0] for c in entry["candidates"].split(",")]
        uplifts = [float(u) for u in entry["candidate_uplifts"].split(",")]
        assert len(uplifts) == len(candidates)
        ranked = {e.action_id: e.propensity for e in d.funnel if e.propensity}
        assert set(candidates) <= set(ranked)
        for c, u in zip(candidates, uplifts):
            assert u == pytest.approx(ranked[c] - _without(ranked[c], 0.1), abs=1e-5)


def test_organic_rows_are_the_candidates_not_shown_labelled_by_offer_accepted_events(redis_url: str,
                                                                                    models_dir: Path) -> None:
    engine = _engine(redis_url, _with_organic(ModelRegistry(models_dir, SCHEMA).load(), 0.01),
                     ExplorationConfig(strategy="epsilon", share=1.0, control=True))
    ids = [f"OR{i}" for i in range(12)]
    engine.store.save([customer(c) for c in ids], SCHEMA)
    for c in ids:
        engine.decide(DecideInput(customer_id=c, channel="call_center", max_actions=1))
    stream = _stream(engine)
    client = engine.store.client
    expected: dict[tuple[str, str], float] = {}
    event = 0
    for k, (did, entry) in enumerate(sorted(stream.items())):
        candidates = [c.split(":")[0] for c in entry["candidates"].split(",")]
        first = [candidates[int(i)] for i in entry["choice_sets"].split(";")[0].split()]
        ts = float(entry["ts"])
        for j, action in enumerate(a for a in first if a != entry["actions"]):
            # within the window: a purchase; before the decision or after the window: not this row's
            at = {0: ts + 3600, 1: ts - 60, 2: ts + 8 * DAY}.get((k + j) % 4, None)
            if at is not None:
                event += 1
                client.xadd(EVENTS_STREAM, {"event_id": f"e{event}", "customer_id": entry["customer_id"],
                                            "type": ORGANIC_EVENT, "ts": f"{at:.3f}", "attr.action_id": action})
            expected[(did, action)] = 1.0 if (k + j) % 4 == 0 else 0.0
    client.xadd(EVENTS_STREAM, {"event_id": "other", "customer_id": ids[0], "type": "payment_failed",
                                "ts": f"{NOON + 3600:.3f}", "attr.amount": "3"})
    actions = {a.id: (a.type, a.value) for a in engine.rules.current.ruleset.actions}
    data = from_streams(client, SCHEMA, as_of=NOON + 30 * DAY, arm="organic", actions=actions)
    got = {(d, a): y for d, a, y in zip(data.decision_ids or [], data.action_ids(), data.y)}
    assert got == expected and sum(expected.values()) > 0
    assert data.summary["arm"].startswith("organic")
    layout_value = data.rows.row_features[2]
    assert {data.x[k, layout_value] for k in range(len(data))} <= {v for _, v in actions.values()}
    pending = from_streams(client, SCHEMA, as_of=NOON + DAY, arm="organic", actions=actions)
    assert len(pending) == sum(expected.values())  # only the rows already positive: the rest wait for the window
    assert pending.summary["pending"] == len(expected) - len(pending)


def test_an_untreated_row_counts_only_the_time_no_showing_of_its_action_is_within_the_window(
        redis_url: str, models_dir: Path) -> None:
    """A candidate not shown now but shown to the same customer within the window before (its effect not
    over) or after (the rest is treated): the row is observed untreated from the window's end after the
    earlier showing to the later showing, its label from that span alone, its exposure that span's share
    of the window (the organic model's offset); a row with no span left is dropped."""
    engine = _engine(redis_url, _with_organic(ModelRegistry(models_dir, SCHEMA).load(), 0.01),
                     ExplorationConfig(strategy="epsilon", share=1.0, control=True))
    clock = engine.clock
    assert isinstance(clock, Clock)
    ids = [f"EXP{i}" for i in range(10)]
    engine.store.save([customer(c) for c in ids], SCHEMA)
    for day in range(0, 15, 2):
        clock.now = NOON + day * DAY
        for c in ids:
            engine.decide(DecideInput(customer_id=c, channel="call_center", max_actions=1))
    stream = _stream(engine)
    window = 7 * DAY
    shows: dict[tuple[str, str], list[float]] = {}
    for entry in stream.values():
        for a in entry["actions"].split(","):
            shows.setdefault((entry["customer_id"], a), []).append(float(entry["ts"]))
    spans: dict[tuple[str, str], tuple[float, float]] = {}
    dropped = 0
    for did, entry in stream.items():
        candidates = [c.split(":")[0] for c in entry["candidates"].split(",")]
        ts, cust = float(entry["ts"]), entry["customer_id"]
        for a in (candidates[int(i)] for i in entry["choice_sets"].split(";")[0].split()):
            if a in entry["actions"].split(","):
                continue
            near = shows.get((cust, a), [])
            t0 = max([ts] + [s + window for s in near if ts - window < s < ts])
            t1 = min([ts + window] + [s for s in near if ts < s <= ts + window])
            if t1 > t0:
                spans[(did, a)] = (t0, t1)
            else:
                dropped += 1
    assert dropped and any(t1 - t0 < window for t0, t1 in spans.values())
    client = engine.store.client
    for k, ((did, a), (t0, t1)) in enumerate(sorted(spans.items())):
        at = (t0 + t1) / 2 if k % 3 == 0 else t0 - 60 if k % 3 == 1 else t1 + 60  # in its span, or just outside
        client.xadd(EVENTS_STREAM, {"event_id": f"x{k}", "customer_id": stream[did]["customer_id"],
                                    "type": ORGANIC_EVENT, "ts": f"{at:.3f}", "attr.action_id": a})
    events = [(f[b"customer_id"].decode(), f[b"attr.action_id"].decode(), float(f[b"ts"]))
              for _, f in xrange_all(client, EVENTS_STREAM)]
    actions = {a.id: (a.type, a.value) for a in engine.rules.current.ruleset.actions}
    data = from_streams(client, SCHEMA, as_of=NOON + 60 * DAY, arm="organic", actions=actions)
    got = {(d, a): (y, e) for d, a, y, e in zip(data.decision_ids or [], data.action_ids(), data.y, data.exposure)}
    expected = {(did, a): (float(any(c == stream[did]["customer_id"] and b == a and t0 < t <= t1 for c, b, t in events)),
                           (t1 - t0) / window) for (did, a), (t0, t1) in spans.items()}
    assert got.keys() == expected.keys()
    for key, (y, e) in expected.items():
        assert got[key][0] == y and got[key][1] == pytest.approx(e), key
    assert 0 < data.y.sum() < len(data)


def test_the_organic_model_learns_the_whole_windows_probability_from_rows_seen_for_part_of_it() -> None:
    """Rows untreated for a share e of the window buy with 1 - (1 - q)^e: with the exposure in its offset the
    organic model finds q for a whole window; without it, about half of q (the mean share here)."""
    from engine.models.model_input import model_input
    from engine.models.training import TrainingSet, fit, fit_organic

    rng = np.random.default_rng(5)
    n, q = 20_000, 0.1
    x = np.zeros((n, len(model_input(SCHEMA).features)))
    x[:, 0] = rng.random(n)  # a feature with nothing to say: the trees need one to split on
    t = np.arange(n, dtype=np.float64)
    treated, _, _ = fit(TrainingSet(x, (rng.random(n) < 0.3).astype(float), t, ["a"], schema=SCHEMA), 60)
    e = rng.uniform(0.05, 1.0, n)
    seen = TrainingSet(x, (rng.random(n) < 1 - (1 - q) ** e).astype(float), t, ["a"], schema=SCHEMA, exposure=e)
    whole = []
    for data in (seen, replace(seen, exposure=None)):
        organic, _, _ = fit_organic(treated, data, 60)
        raw = treated.predict(x, raw_score=True) + organic.predict(x, raw_score=True)
        whole.append(float(np.mean(1 / (1 + np.exp(-raw)))))
    assert whole[0] == pytest.approx(q, abs=0.015) and whole[1] < 0.07, whole


def test_simulate_compares_uplift_with_propensity_arbitration_in_the_uplift_world() -> None:
    ruleset, errors = load_rules(RULES_DIR)
    assert ruleset is not None, errors
    settings = Settings(world="uplift", customers=120, rounds=2, seeds=(5,), history_customers=900, history_days=2,
                        trees=10, policies=("nba", "nba_uplift", "uplift_oracle"))
    sim = simulate(ruleset, settings)
    out = table(sim)
    runs = sim.seeds[0].runs
    assert runs["nba"].round_decisions == runs["nba_uplift"].round_decisions  # the same customers and days
    assert all(r.organic > 0 for r in runs.values())  # customers take actions they were not shown
    paired = out["nba_uplift_vs_nba"]["incremental"]
    assert paired["difference_per_1000"] == pytest.approx(runs["nba_uplift"].incremental_per_1000
                                                          - runs["nba"].incremental_per_1000, abs=0.1)
    assert out["uplift_oracle"]["incremental_per_1000"] > 0
    labelled = {(r["class"], r["type"]): r for r in out["uplift_organic_labels"]}
    assert sum(r["rows"] for r in labelled.values()) == sim.seeds[0].model["trained_on"]["organic_rows"]
    for (_, action_type), r in labelled.items():  # nobody takes a service unasked; a sure thing buys anyway
        assert (r["label_rate"] == r["expected_rate"] == 0) == (action_type == "service"), r
    assert labelled["sure_thing", "cross_sell"]["expected_rate"] > 3 * labelled["persuadable", "cross_sell"]["expected_rate"]
    assert "the histories' untreated rows" in format_simulation(sim)  # printed too, Qini or none
    with pytest.raises(NbaError, match="unknown policies nba_uplift in the realistic world"):
        Settings(policies=("nba_uplift",)).check()


def test_nba_train_uplift_stores_both_models_from_recorded_traffic(redis_url: str, models_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from engine.cli import main

    engine = _engine(redis_url, _with_organic(ModelRegistry(models_dir, SCHEMA).load(), 0.1),
                     ExplorationConfig(strategy="epsilon", share=1.0, control=True))
    ids = [f"TU{i}" for i in range(90)]
    engine.store.save([customer(c, data_usage_gb=5 + i % 40) for i, c in enumerate(ids)], SCHEMA)
    decisions = [engine.decide(DecideInput(customer_id=c, channel=ch, max_actions=1))
                 for c in ids for ch in ("web", "call_center")]
    for k, d in enumerate(decisions):
        if d.actions and k % 3 == 0:
            engine.responses.record(d.decision_id, d.actions[0].action_id, "accepted", ts=NOON + 60)
    stream = _stream(engine)
    for k, (_, entry) in enumerate(sorted(stream.items())):
        candidates = [c.split(":")[0] for c in entry["candidates"].split(",")]
        unshown = [a for a in candidates if a != entry["actions"]]
        if unshown and k % 4 == 0:
            engine.store.client.xadd(EVENTS_STREAM, {"event_id": f"t{k}", "customer_id": entry["customer_id"],
                                                     "type": ORGANIC_EVENT, "ts": f"{NOON + DAY:.3f}",
                                                     "attr.action_id": unshown[0]})
    target = tmp_path / "models"
    args = ["train", "--redis-url", redis_url, "--rules-dir", str(RULES_DIR), "--models-dir", str(target),
            "--rounds", "5", "--as-of", str(NOON + 30 * DAY)]
    assert main([*args[:1], "--uplift", *args[1:]]) == 2
    assert "--uplift trains from recorded decisions and events: add --from-stream" in capsys.readouterr().err
    assert main([*args, "--from-stream", "--uplift"]) == 0
    out = capsys.readouterr().out
    assert "organic rows:" in out and "arm organic" in out
    registry = ModelRegistry(target, SCHEMA)
    model = registry.load()
    assert model.organic is not None
    assert registry.metrics(model.version)["organic"]["training"]["learns"].startswith("the logit shift")
