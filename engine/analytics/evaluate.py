"""``nba evaluate``: what a candidate policy would have earned on the recorded decisions, without showing it
to a single customer (off-policy evaluation, ``engine.analytics.offpolicy``'s estimators).

**What is read.** The exploring decisions recorded from ``since`` to ``until`` (the archive plus the
streams' tails, ``analytics/recorded.py``) with what the logging policy logged (``engine.decision.choice``):
each slot's feasible candidates, their value x weight, the exploration share, each presented action's
probability, and the customer block the model read. A decision's reward is the value of its presented
actions that were accepted within ``window_days``. Left out, and counted: control-group decisions (a
held-out baseline the candidate never decides for), decisions without logged probabilities (a
Thompson-sampled ranking, or logged before probabilities were), decisions that did not explore (epsilon 0:
they gave any other choice no chance, so they support no candidate that departs from them), and those whose
features or actions the current schema and catalog cannot read. With none left, the estimate is refused.

**A candidate** is a model (a registry version, scored on the logged features), arbitration weights
(multipliers by action id, group or type) and the catalog values of a rule set, on top of the logged value
x weight of each candidate. The candidate is the greedy policy: at each slot it takes the feasible
candidate of highest priority. Its probability of the logged slate is 1 when it would have picked every
logged action at its slot (the feasible sets it meets are then the logged ones) and 0 otherwise. What the
logs cannot tell: eligibility and levers a rule set would change (the logged ones are used), and actions
never logged as candidates (a candidate catalog adding actions is refused).

**Support.** In an exploring decision every action a slot could show had a chance, so every candidate that
ranks the logged feasible sets is supported; a candidate catalog with actions the logs never had as
candidates is refused (``commands/evaluate.candidate_values``).

**DR**'s reward model is the champion's propensity x value, summed over a slate; the candidate's slate past
the first slot where it departs from the log is approximated (the feasible set less the groups taken;
contact limits are not replayed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.analytics.offpolicy import EvaluationError, Logged, difference, estimate
from engine.analytics.recorded import Recorded
from engine.features import FeatureSchema
from engine.models.model_input import decode_block, model_input, row_columns
from engine.models.registry import LoadedModel
from engine.rules.model import RuleSet
from engine.store.profiles import DECISIONS_STREAM, RESPONSES_STREAM

_COLUMNS = ("decision_id", "customer_id", "ts", "channel", "control", "model_version", "actions", "values",
            "probabilities", "epsilon", "candidates", "choice_sets", "features", "feature_schema")
ESTIMATORS = ("dr", "snips", "ips")


@dataclass(frozen=True)
class Candidate:
    """A policy to evaluate: ``model`` scores the logged features; ``weights`` multiply the priority of
    actions by id, group or type (the first that names the action wins, in that order); ``values`` are a
    rule set's catalog values (action id -> value), replacing the logged ones in the priority; an action a
    rule set dropped is never picked."""

    name: str
    model: LoadedModel
    weights: dict[str, float] = field(default_factory=dict)
    values: dict[str, float] | None = None


@dataclass
class LoggedDecision:
    decision_id: str
    customer: str
    reward: float
    probability: float
    candidates: list[str]
    multipliers: np.ndarray
    sets: list[list[int]]
    picks: list[int]
    block: np.ndarray
    channel: str


@dataclass
class LoggedDecisions:
    """The recorded decisions an evaluation reads, and why others were left out."""

    decisions: list[LoggedDecision]
    counts: dict[str, int]
    logged_value: dict


def read_logged(client: Any, schema: FeatureSchema, ruleset: RuleSet, archive: Path | str | None = None,
                since: str = "-", until: str = "+", window_days: float = 7.0) -> LoggedDecisions:
    """The recorded decisions with their logging probabilities and rewards (see the module docstring)."""
    fingerprint = schema.fingerprint()
    width = len(model_input(schema).customer_features)
    window = window_days * 86_400.0
    with Recorded(client, archive, since, until) as rec:
        rec.view(DECISIONS_STREAM, _COLUMNS, name="decisions")
        rec.view(RESPONSES_STREAM, ("decision_id", "action_id", "outcome", "ts"), name="responses", until="+")
        accepted: dict[str, set[str]] = {}
        for did, aid in rec.sql(f"""
SELECT r.decision_id, r.action_id FROM responses r JOIN decisions d ON d.decision_id = r.decision_id
WHERE r.outcome = 'accepted' AND CAST(r.ts AS DOUBLE) - CAST(d.ts AS DOUBLE) <= {window!r}""").fetchall():
            accepted.setdefault(did, set()).add(aid)
        # only the exploring decisions come into Python; the others are counted where they are
        kind = """CASE WHEN control = '1' THEN 'control' WHEN probabilities IS NULL OR coalesce(epsilon, '') = ''
                  THEN 'no_probabilities' WHEN CAST(epsilon AS DOUBLE) <= 0 THEN 'not_exploring' ELSE 'read' END"""
        counts = {"decisions": 0, "control": 0, "no_probabilities": 0, "not_exploring": 0, "other_schema": 0,
                  "unknown_actions": 0, "evaluated": 0}
        for name, n in rec.sql(f"SELECT {kind} AS kind, count(*) FROM decisions GROUP BY ALL").fetchall():
            counts["decisions"] += n
            if name != "read":
                counts[name] = n
        quoted = ", ".join(f'"{c}"' for c in _COLUMNS)
        rows = rec.sql(f"SELECT {quoted} FROM decisions WHERE {kind} = 'read' ORDER BY _ms, _seq, _shard").fetchall()
    catalog = ruleset.by_id
    out: list[LoggedDecision] = []
    for row in rows:
        r = dict(zip(_COLUMNS, row))
        shown = [a for a in (r["actions"] or "").split(",") if a]
        names = [c.rpartition(":")[0] for c in r["candidates"].split(",")] if r["candidates"] else []
        sets = [[int(i) for i in s.split()] for s in r["choice_sets"].split(";") if s] if names else []
        if sets and (r["feature_schema"] != fingerprint or not r["features"]):
            counts["other_schema"] += 1
            continue
        if any(a not in catalog for a in names):
            counts["unknown_actions"] += 1
            continue
        block = decode_block(r["features"]) if sets else np.empty(0)
        if sets and block.shape != (width,):
            counts["other_schema"] += 1
            continue
        values = [float(v) for v in (r["values"] or "").split(",") if v]
        taken = accepted.get(r["decision_id"], set())
        reward = sum(v for a, v in zip(shown, values) if a in taken)
        index = {a: i for i, a in enumerate(names)}
        out.append(LoggedDecision(
            decision_id=r["decision_id"], customer=r["customer_id"], reward=reward,
            probability=math.prod(float(p) for p in r["probabilities"].split(",") if p),
            candidates=names, multipliers=np.array([float(c.rpartition(":")[2]) for c in r["candidates"].split(",")])
            if names else np.empty(0), sets=sets, picks=[index[a] for a in shown[:len(sets)]], block=block,
            channel=r["channel"]))
    counts["evaluated"] = len(out)
    rewards = np.array([d.reward for d in out])
    logged_value = estimate(Logged(np.array([d.customer for d in out]), rewards, np.ones(len(out)),
                                   np.ones(len(out))))["ips"] if out else {"value": None, "ci95": None}
    return LoggedDecisions(out, counts, logged_value)


def scores(model: LoadedModel, logged: LoggedDecisions, schema: FeatureSchema, ruleset: RuleSet) -> list[np.ndarray]:
    """``model``'s propensity of each logged decision's candidates, on its logged customer block and channel."""
    rows = model_input(schema)
    catalog = {a.id: i for i, a in enumerate(ruleset.actions)}
    table = rows.action_table(ruleset.actions, model.action_levels, model.levels.get("action_type"))
    scorer = model.scorer.bind(row_columns(len(model.features)) if model.features else rows.row_features, table.rows)
    adapter = rows.adapter(model.features, model.levels)
    out = []
    for d in logged.decisions:
        if not d.sets:
            out.append(np.empty(0))
            continue
        x = rows.shared_row(d.block, d.channel)
        idx = np.array([catalog[a] for a in d.candidates], dtype=np.int64)
        out.append(np.asarray(scorer.predict(x if adapter is None else adapter(x), idx), dtype=float))
    return out


def _factors(candidate: Candidate, ruleset: RuleSet) -> dict[str, float]:
    """Per action, what the candidate multiplies the logged value x weight by: its weight (by action id,
    group or type, the first that names it) and its catalog value over the live one; NaN for an action
    its catalog dropped (never picked)."""
    out = {}
    for a in ruleset.actions:
        weight = next((candidate.weights[k] for k in (a.id, a.group, a.type) if k in candidate.weights), 1.0)
        rescale = 1.0 if candidate.values is None else candidate.values.get(a.id, math.nan) / (a.value or 1.0)
        out[a.id] = weight * rescale
    return out


def _greedy(priority: np.ndarray, feasible: list[int], names: list[str]) -> int:
    """The feasible candidate of highest priority (ties: the action id, as ``arbitration.order``)."""
    return min(feasible, key=lambda i: (-priority[i], names[i]))


def rows_for(logged: LoggedDecisions, candidate: Candidate, champion: tuple[LoadedModel, list[np.ndarray]],
             schema: FeatureSchema, ruleset: RuleSet, slates: list[list[str]] | None = None) -> Logged:
    """The estimators' rows for ``candidate``: its probability of each logged slate, the logging
    probability, the reward and the DR terms (``champion``: the reward model and its ``scores``);
    ``slates`` receives the candidate's slate of each decision (past its first departure from the log,
    approximated; [] for the fallback)."""
    model, champion_p = champion
    candidate_p = champion_p if candidate.model.version == model.version else scores(
        candidate.model, logged, schema, ruleset)
    factor = _factors(candidate, ruleset)
    n = len(logged.decisions)
    target, q_logged, q_target = np.zeros(n), np.zeros(n), np.zeros(n)
    for k, d in enumerate(logged.decisions):
        if not d.sets:  # nothing could be shown but the fallback (if any): every policy shows the same
            target[k] = 1.0
            if slates is not None:
                slates.append([])
            continue
        f = np.array([factor[a] for a in d.candidates])
        priority = np.where(np.isnan(f), -np.inf, candidate_p[k] * d.multipliers * np.nan_to_num(f))
        q = champion_p[k] * np.array([ruleset.by_id[a].value for a in d.candidates])
        q_logged[k] = float(q[d.picks].sum())
        # the candidate's slate along the logged feasible sets while it agrees with the log, then approximated
        picks: list[int] = []
        agree = True
        feasible = list(d.sets[0])
        for slot in range(len(d.sets)):
            if agree:
                feasible = list(d.sets[slot])
            live = [i for i in feasible if priority[i] > -np.inf]
            if not live:
                break
            choice = _greedy(priority, live, d.candidates)
            picks.append(choice)
            agree = agree and choice == d.picks[slot]
            taken = ruleset.by_id[d.candidates[choice]].group
            feasible = [i for i in feasible if i != choice and ruleset.by_id[d.candidates[i]].group != taken]
        target[k] = 1.0 if agree and len(picks) == len(d.picks) else 0.0
        q_target[k] = float(q[picks].sum())
        if slates is not None:
            slates.append([d.candidates[i] for i in picks])
    return Logged(np.array([d.customer for d in logged.decisions]), np.array([d.reward for d in logged.decisions]),
                  np.array([d.probability for d in logged.decisions]), target, q_logged, q_target)


def evaluate(logged: LoggedDecisions, candidates: Sequence[Candidate], champion: LoadedModel, schema: FeatureSchema,
             ruleset: RuleSet, per: float = 1000.0) -> dict:
    """Each candidate's estimates (IPS, SNIPS, DR with customer-clustered CIs, effective sample size,
    support), and each one's difference from the first (the baseline), paired on the same decisions."""
    if not logged.decisions:
        raise EvaluationError("no recorded decision can be evaluated ("
                              + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in logged.counts.items())
                              + "): the logs support an estimate only where the decisions explored "
                              "(exploration strategy epsilon in experiment.yaml)")
    reward_model = (champion, scores(champion, logged, schema, ruleset))
    rows = [rows_for(logged, c, reward_model, schema, ruleset) for c in candidates]
    out: dict = {"decisions": logged.counts, "logged_value": logged.logged_value, "per": per, "candidates": []}
    for c, r in zip(candidates, rows):
        entry = {"name": c.name, "model": c.model.version, **estimate(r, per)}
        if c is not candidates[0] and "refused" not in entry:
            entry["versus_" + candidates[0].name] = difference(r, rows[0], per)
        out["candidates"].append(entry)
    return out


def format_evaluation(result: dict) -> str:
    c = result["decisions"]
    lines = [f"{c['evaluated']:,} of {c['decisions']:,} recorded decisions evaluated (left out: control group "
             f"{c['control']:,}, no logged probabilities {c['no_probabilities']:,}, not exploring "
             f"{c['not_exploring']:,}, other feature schema "
             f"{c['other_schema']:,}, actions not in the catalog {c['unknown_actions']:,})"]
    lv = result["logged_value"]
    if lv.get("value") is not None:
        lines.append(f"logged (what the logging policy earned): {lv['value']:,.1f} per {result['per']:,.0f} decisions, "
                     f"95% CI {lv['ci95'][0]:,.1f}..{lv['ci95'][1]:,.1f}")
    for e in result["candidates"]:
        head = f"{e['name']} (model {e['model']})"
        if "refused" in e:
            lines.append(f"{head}: refused: {e['refused']}")
            continue
        lines.append(f"{head}: effective sample size {e['effective_sample_size']:,.1f} of {e['decisions']:,} "
                     f"decisions ({e['customers']:,} customers)")
        for name in ESTIMATORS:
            est = e.get(name)
            if est and est.get("value") is not None:
                lines.append(f"  {name.upper():5} {est['value']:>10,.1f}  95% CI {est['ci95'][0]:,.1f}..{est['ci95'][1]:,.1f}")
        for key, diff in e.items():
            if key.startswith("versus_") and diff.get("value") is not None:
                lines.append(f"  {key.replace('_', ' ')} ({diff['estimator'].upper()}): {diff['value']:+,.1f}, "
                             f"95% CI {diff['ci95'][0]:+,.1f}..{diff['ci95'][1]:+,.1f}")
    return "\n".join(lines)
