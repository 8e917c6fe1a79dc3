"""``nba simulate --off-policy``: the off-policy estimators (``engine.analytics.evaluate``) against the truth,
in the synthetic world where the true acceptance probability of every action is known.

**Per world seed** (each its own hidden laws and populations, as ``nba simulate``): a model is trained on
the recorded history of another population (``simulate``'s steps 1 and 2). The evaluated population then
has one day of decisions (one action each) through the real funnel with the *logging policy*: that
model, epsilon-greedy (``epsilon`` per slot, ``engine.decision.choice``), every decision and response
recorded as in production; each customer accepts with the world's true probability, and every
acceptance is reported at once (lost reports would lower every estimate alike and are not what is
measured here).

**The truth** of a candidate is its expected value per 1,000 decisions *on the logged decisions*: at each
decision, the true probability x value of the action it would have picked from the logged feasible set
(the context and state as logged). That is what off-policy estimators estimate; a candidate deployed would
also change later states (budgets, fatigue), which no estimate from these logs can see. The logging
policy's own truth, ``(1 - epsilon)`` x its greedy pick + ``epsilon`` x the mean over the feasible set, set
against the greedy champion's, is the cost of exploring.

**Candidates**: the greedy champion (the logging policy without exploration), rules only (a constant
propensity: value x weight), retention x3 and cross-sell x0.2 (arbitration weights), and a weaker model
(the same history, a twentieth of the boosting rounds).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.analytics.evaluate import ESTIMATORS, Candidate, read_logged, rows_for, scores
from engine.analytics.offpolicy import estimate
from engine.decision.request import DecideInput
from engine.decision.responses import ResponseRecorder
from engine.live import Live
from engine.models.experiment import ExplorationConfig, ModelSet
from engine.models.registry import ModelRegistry, no_model
from engine.rules.model import RuleSet
from engine.sim.dynamics import DAY, REALISM, Draws, Population, drift_of
from engine.sim.simulate import (
    DAY_HOURS,
    DAY_OPENS,
    SIM_START,
    _catalogs,
    _engine,
    _placeholder,
    _Play,
    _random_eligible,
    _recorded,
    _seed_profiles,
    _train,
    mean_ci,
    private_store,
)
from engine.sim.telco import CHANNELS, SCHEMA
from engine.sim.world import customer_id, generate, population_seeds
from engine.store.decision_log import DecisionLog


@dataclass(frozen=True)
class CheckSettings:
    world: str = "realistic"
    seeds: tuple[int, ...] = (11, 12, 13, 14, 15)
    customers: int = 4000
    history_customers: int = 4000
    history_days: int = 5
    trees: int = 60
    epsilon: float = 0.2


def _one_seed(store, registry: ModelRegistry, rules: tuple, settings: CheckSettings, seed: int,
              progress: Callable[[str], None]) -> dict:
    realism = REALISM[settings.world]
    history_rules, evaluated_rules = rules
    actions = evaluated_rules.ruleset.actions
    history_seed, evaluated_seed = population_seeds(seed)
    drift = drift_of(seed, realism)
    clock = {"now": SIM_START}
    hist = generate(settings.history_customers, history_seed, settings.world, laws=seed, prefix="H")
    _seed_profiles(store, hist)
    truth_rows: dict[tuple[str, str], tuple[float, float]] = {}
    log = DecisionLog(store.client)
    ids = [a.id for a in actions]
    engine = _engine(store, history_rules, Live(ModelSet(_placeholder(registry, ids))), clock, decision_log=log)
    engine.rankings["random_eligible"] = _random_eligible(seed)
    play = _Play(store, Population(hist, actions, realism, drift),
                 Draws.draw(hist.size, settings.history_days, history_seed, realism), clock, engine, "random_eligible",
                 ResponseRecorder(store.client, engine.rules, clock=lambda: clock["now"]),
                 SIM_START - (settings.history_days + 7) * DAY, counted=lambda cid: True, truth=truth_rows)
    for r in range(settings.history_days):
        play.day(r)
    play.finish(SIM_START - 1.0)
    log.close()
    history = _recorded(store, ids, SIM_START, truth_rows)
    model, _ = _train(registry, history, settings.trees)
    weaker, _ = _train(registry, history, max(2, settings.trees // 20))

    # the logged day: the model, epsilon-greedy, through the real funnel
    world = generate(settings.customers, evaluated_seed, settings.world, laws=seed, prefix="C")
    draws = Draws.draw(world.size, 1, evaluated_seed, realism)
    _seed_profiles(store, world)
    pop = Population(world, actions, realism, drift)
    log = DecisionLog(store.client)
    exploration = ExplorationConfig(strategy="epsilon", share=settings.epsilon)
    engine = _engine(store, evaluated_rules, Live(ModelSet(champion=model, exploration=exploration)), clock,
                     decision_log=log)
    recorder = ResponseRecorder(store.client, engine.rules, clock=lambda: clock["now"])
    values = {a.id: a.value for a in actions}
    q_true: dict[str, dict[str, float]] = {}  # decision -> action -> true probability x value
    q_shown: dict[str, float] = {}  # decision -> the true value of what it showed
    for i in np.flatnonzero(draws.active[0]).tolist():
        now = SIM_START + DAY_OPENS + DAY_HOURS * i / world.size
        clock["now"] = now
        c = int(draws.channel[0, i])
        d = engine.decide(DecideInput(customer_id=customer_id(i, "C"), channel=CHANNELS[c], max_actions=1))
        shown = [a.action_id for a in d.actions]
        names = list(dict.fromkeys([a for a, _ in d.candidates] + shown))
        p = pop.probability(i, names, c, now, False) if names else np.empty(0)
        q_true[d.decision_id] = {a: float(x) * values[a] for a, x in zip(names, p.tolist())}
        q_shown[d.decision_id] = sum(q_true[d.decision_id][a] for a in shown)
        for a in shown:
            pop.presented(i, a, now)
            if draws.accept[0, i] < float(p[names.index(a)]):
                pop.accepted(i, a)
                recorder.record(d.decision_id, a, "accepted", ts=now)
    log.close()

    logged = read_logged(store.client, SCHEMA, evaluated_rules.ruleset)
    candidates = [Candidate("greedy champion", model), Candidate("rules only", no_model(SCHEMA)),
                  Candidate("retention x3", model, {"retention": 3.0}),
                  Candidate("cross-sell x0.2", model, {"cross_sell": 0.2}), Candidate("weaker model", weaker)]
    out: dict = {"seed": seed, "decisions": logged.counts["evaluated"], "candidates": {}}

    def true_value(slates: Sequence[Sequence[str]]) -> float:
        total = 0.0
        for d, slate in zip(logged.decisions, slates):
            q = q_true[d.decision_id]
            total += sum(q[a] for a in slate) if d.sets else q_shown[d.decision_id]  # as every policy would
        return 1000.0 * total / len(logged.decisions)

    reward_model = (model, scores(model, logged, SCHEMA, evaluated_rules.ruleset))
    for cand in candidates:
        slates: list[list[str]] = []
        rows = rows_for(logged, cand, reward_model, SCHEMA, evaluated_rules.ruleset, slates)
        est = estimate(rows)
        out["candidates"][cand.name] = {"truth": round(true_value(slates), 2),
                                        **{k: est.get(k) for k in (*ESTIMATORS, "effective_sample_size")}}
    logger = 0.0
    for row in logged.decisions:
        q = q_true[row.decision_id]
        if not row.sets:
            logger += q_shown[row.decision_id]
            continue
        feasible = [q[row.candidates[k]] for k in row.sets[0]]
        logger += (1 - settings.epsilon) * feasible[0] + settings.epsilon * sum(feasible) / len(feasible)
    out["logging_policy_truth"] = round(1000.0 * logger / len(logged.decisions), 2)
    out["logged_value"] = logged.logged_value.get("value")
    progress(f"seed {seed}: {out['decisions']:,} decisions; truth " + ", ".join(
        f"{name} {c['truth']:,.0f}" for name, c in out["candidates"].items()))
    return out


def check(ruleset: RuleSet, settings: CheckSettings = CheckSettings(),
          progress: Callable[[str], None] = lambda m: None) -> dict:
    """Every seed of ``settings``, then per candidate and estimator: the mean relative error and bias over
    the seeds, and how many seeds' 95% CIs covered the truth; and the exploration's cost."""
    rules = (_catalogs(ruleset, settings.history_customers, ())[1], _catalogs(ruleset, settings.customers, ())[1])
    try:
        with private_store() as store, tempfile.TemporaryDirectory(prefix="nba-ope-models-") as models:
            registry = ModelRegistry(models, SCHEMA)
            seeds = [_one_seed(store, registry, rules, settings, seed, progress) for seed in settings.seeds]
    finally:
        for r in rules:
            r.close()
    table: dict = {}
    for name in seeds[0]["candidates"]:
        truths = [s["candidates"][name]["truth"] for s in seeds]
        row: dict = {"truth_mean": round(float(np.mean(truths)), 1),
                     "effective_sample_size_mean": round(float(np.mean(
                         [s["candidates"][name]["effective_sample_size"] or 0 for s in seeds])), 1)}
        for est in ESTIMATORS:
            values = [s["candidates"][name][est] for s in seeds]
            rel = [(v["value"] - t) / t for v, t in zip(values, truths) if v and v.get("value") is not None and t]
            row[est] = {"relative_error": round(float(np.mean(np.abs(rel))), 4) if rel else None,
                        "bias": round(float(np.mean(rel)), 4) if rel else None,
                        "covered": sum(1 for v, t in zip(values, truths)
                                       if v and v.get("ci95") and v["ci95"][0] <= t <= v["ci95"][1]),
                        "seeds": len(seeds)}
        table[name] = row
    cost = [s["candidates"]["greedy champion"]["truth"] - s["logging_policy_truth"] for s in seeds]
    mean, ci = mean_ci(cost)
    return {"settings": settings.__dict__ | {"seeds": list(settings.seeds)}, "seeds": seeds, "table": table,
            "exploration_cost": {"epsilon": settings.epsilon, "per_1000": round(mean, 1),
                                 "ci95": [round(x, 1) for x in ci],
                                 "logging_policy_truth_mean": round(float(np.mean([s["logging_policy_truth"]
                                                                                    for s in seeds])), 1)}}


def format_check(result: dict) -> str:
    lines = ["candidate          truth/1000   ESS   " + "  ".join(f"{e.upper():>5} rel.err  bias  cover"
                                                          for e in ESTIMATORS)]
    for name, row in result["table"].items():
        cells = []
        for est in ESTIMATORS:
            r = row[est]
            cells.append(f"{'-' if r['relative_error'] is None else format(r['relative_error'], '.1%'):>13} "
                         f"{'-' if r['bias'] is None else format(r['bias'], '+.1%'):>6} {r['covered']}/{r['seeds']}")
        lines.append(f"{name:18} {row['truth_mean']:>10,.1f} {row['effective_sample_size_mean']:>6,.0f}  "
                     + "  ".join(cells))
    c = result["exploration_cost"]
    lines.append(f"exploration (epsilon {c['epsilon']:g} per slot) costs {c['per_1000']:,.1f} per 1,000 decisions "
                 f"(95% CI {c['ci95'][0]:,.1f}..{c['ci95'][1]:,.1f}; the logging policy's truth "
                 f"{c['logging_policy_truth_mean']:,.1f})")
    return "\n".join(lines)

