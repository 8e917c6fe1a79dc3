"""``nba simulate``: the closed loop in the synthetic world, policy against policy, measured honestly.

**Where it runs.** On a redis-server of its own (``private_store``: an embedded server in a temporary
directory, gone when the run ends). It never connects to the service's Redis, so simulated decisions
and responses can never reach the live streams that feed exploration and ``nba train --from-stream``.

**Per world seed** ``s`` (five by default; each seed is one world: its hidden response laws, its drift,
two populations and every random draw):

1. *History.* A population of ``history_customers`` (``population_seeds(s)[0]``, disjoint from the
   evaluated one) lives ``history_days`` days before the evaluated period under an exploratory campaign
   (a random admitted action per decision) through the real funnel; decisions go to the decision stream
   and the responses that the world reports (late, or never) to the response stream, as in production.
2. *Training.* The model the ``nba`` policy starts with is trained by ``engine.models.training`` from
   those recorded streams only (``from_streams``: labels from recorded responses and closed label
   windows). The hidden truth never becomes a feature or a label: the true probability of each
   presented action is kept aside only to report the oracle's AUC next to the model's.
3. *Evaluation.* The evaluated population (``population_seeds(s)[1]``, customer ids ``C...``) is
   played once per policy, each time from the same starting state in a flushed database, with the same
   interactions and random draws (common random numbers). With ``retrain`` the ``nba`` policy is
   retrained every simulated night on the history plus the decisions and responses recorded during its
   own run so far (its exploration included), and explores with Thompson sampling (``explore`` share).

**Policies** (all see the same admitted actions; one action per decision):

- ``nba``: the service as deployed: propensity x value x levers x context weight, exploration, the
  control group (which gets the control policy).
- ``rules_only``: value x levers x context weight, no model.
- ``generic``: one offer for everybody (the offer with the most expected accepted value over the
  population, chosen with hindsight from the truth: the strongest single generic message), the
  channel's fallback where the rules do not allow it.
- ``random_eligible``: a random admitted action.
- ``constrained_oracle``: knows the truth (unobserved traits, fatigue, drift, what each customer has
  taken) and ranks by true probability x value, but goes through the same rules, contact limits,
  cool-downs and budgets: a greedy per-decision upper bound.
- ``oracle``: the same ranking with contact policies and budgets off (rules still decide eligibility):
  a reference, not a bound any policy can reach.

In the ``uplift`` world (sure things and sleeping dogs, organic purchases: ``engine.sim.world``) two more:

- ``nba_uplift``: the service with ``arbitration: uplift``: the same models' version, trained on the same
  rows, ranks by (P(take | shown) - P(take | not shown)) x value x levers and drops offers estimated to
  gain nothing. There the history explores with epsilon 1 (each slot drawn uniformly from what could be
  shown: the same random admitted action, now with its candidates and probabilities logged) and both
  ``nba`` and ``nba_uplift`` explore with epsilon ``explore`` (Thompson sampling logs no candidates), so
  every training has its untreated rows: the candidates not shown, labelled by ``offer_accepted`` events.
- ``uplift_oracle``: knows the truth and ranks by true incremental value, through the same limits.

There every row also counts *incremental value*: per presented action, value x (taken when shown - taken
without it), both outcomes from the same uniform draw (the customer's potential outcomes, coupled), so a
sure thing's acceptance counts 0 and a sleeping dog's lost purchase counts minus its value. Two
checks of ``nba_uplift``'s estimates: ``nba report``'s Qini curves on its recorded streams (after a
label window without decisions, so the last decisions' outcomes are in), and a diagnosis of its
decisions (``_Play._diagnose``): each decision's candidates taken alone, the true incremental value
of the top one by estimated propensity, by estimated uplift, by each with one estimated half swapped
for the truth, and by the true uplift. And of the organic model's rows (``_organic_labels``): per uplift
class and action type, the histories' untreated rows' rate of reported organic purchases, the rate the
world's organic law predicts for the span each was observed, and the model's estimate for a whole window.

**Counting.** Every row counts the same customers: those outside the control group (the control
group's customers are simulated in every run, and excluded from every row). Value is the value of
accepted actions when the customer accepts, whether or not the acceptance is ever reported.
Daily budgets are the catalog's per 20,000 customers (the demo base), scaled to each population.
"""

from __future__ import annotations

import heapq
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from engine.analytics.campaign_plan import Traffic, plan_campaign, rejection_share, traffic_from_stream
from engine.analytics.report import build_report
from engine.analytics.training_rows import ORGANIC_EVENT, from_streams
from engine.analytics.uplift_curve import qini
from engine.config import DEMO_CUSTOMERS
from engine.decision.funnel import DecisionEngine, without_offer
from engine.decision.request import DecideInput
from engine.decision.responses import ResponseRecorder
from engine.errors import NbaError
from engine.events.processor import EventProcessor
from engine.live import Live
from engine.models.experiment import ExplorationConfig, ModelSet
from engine.models.exploration import ExplorationCounts, Explorer
from engine.models.registry import LoadedModel, ModelRegistry
from engine.models.training import TrainingSet, auc, fit_version
from engine.rules.model import RuleSet
from engine.rules.runtime import CompiledRules, compile_rules
from engine.sim.dynamics import (
    DAY,
    ORGANIC_WINDOW_DAYS,
    REALISM,
    Draws,
    Drift,
    Population,
    Realism,
    drift_of,
    event_round,
    response,
)
from engine.sim.telco import CHANNELS, SCHEMA
from engine.sim.world import World, customer_id, generate, population_seeds
from engine.store.decision_log import DecisionLog
from engine.store.profiles import ProfileStore
from engine.store.redis_embedded import EmbeddedRedis

log = logging.getLogger(__name__)

POLICIES = ("nba", "rules_only", "generic", "random_eligible", "constrained_oracle", "oracle")
UPLIFT_POLICIES = ("nba", "nba_uplift", "rules_only", "constrained_oracle", "uplift_oracle")
LEARNING = ("nba", "nba_uplift")  # the service's own policies: trained, retrained, exploring
UPLIFT_CLASSES = ("persuadable", "sure_thing", "sleeping_dog")  # engine.sim.world's codes, in order
UPLIFT_DIAGNOSIS = ("estimated propensity", "estimated uplift", "estimated propensity, true shift",
                    "true propensity, estimated shift", "true uplift")
SIM_START = datetime(2030, 1, 7, tzinfo=UTC).timestamp()  # a Monday, midnight UTC
DAY_OPENS, DAY_HOURS = 9 * 3600.0, 10.0 * 3600.0  # decisions from 09:00 to 19:00 (no quiet hours)
LABEL_DAYS = 7  # the label window of training and reports
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


class SimulationError(NbaError, ValueError):
    """Settings a simulation cannot run with (too small a history to train on, no seeds...)."""


@dataclass(frozen=True)
class Settings:
    world: str = "realistic"
    customers: int = 1000
    rounds: int = 8
    seeds: tuple[int, ...] = (11, 12, 13, 14, 15)
    history_customers: int = 10_000
    history_days: int = 7
    retrain: bool = True
    explore: float = 0.1  # share of nba decisions that explore (Thompson sampling); 0: off
    trees: int = 100  # boosting rounds per training
    policies: tuple[str, ...] = POLICIES
    campaign: str = ""  # a campaign of the rule set to plan and then play (moved onto the simulated days)

    @property
    def realism(self) -> Realism:
        return REALISM[self.world]

    def check(self) -> None:
        if self.world not in REALISM:
            raise SimulationError(f"world must be one of {', '.join(REALISM)}, got {self.world!r}")
        for name in ("customers", "rounds", "history_customers", "history_days", "trees"):
            if getattr(self, name) < 1:
                raise SimulationError(f"{name.replace('_', '-')} must be at least 1")
        if not self.seeds:
            raise SimulationError("at least one world seed is needed")
        if not 0.0 <= self.explore <= 1.0:
            raise SimulationError(f"explore must be a share from 0 to 1, got {self.explore}")
        known = POLICIES + UPLIFT_POLICIES if self.realism.organic else POLICIES
        unknown = set(self.policies) - set(known)
        if unknown:
            raise SimulationError(f"unknown policies {', '.join(sorted(unknown))} in the {self.world} world "
                                  f"(known: {', '.join(dict.fromkeys(known))})")


@dataclass
class PolicyRun:
    """One policy on one seed's evaluated population (control-group customers not counted)."""

    decisions: int = 0
    presented: int = 0
    accepted: int = 0
    value: float = 0.0
    round_decisions: list[int] = field(default_factory=list)
    round_value: list[float] = field(default_factory=list)
    round_new: list[int] = field(default_factory=list)  # decisions that presented a new action
    lost_responses: int = 0  # responses the service refused (should stay 0)
    control_decisions: int = 0  # the control group's (not counted above)
    control_value: float = 0.0
    campaign_presented: dict[str, int] = field(default_factory=dict)  # campaign -> presentations (every customer)
    incremental: float = 0.0  # uplift world: value x (taken when shown - taken without), presented actions
    organic: int = 0  # uplift world: actions customers took without being shown them
    diagnosis: dict[str, float] = field(default_factory=dict)  # nba_uplift: ``uplift_diagnosis``'s sums
    shifts: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (class, type) -> est., true, n

    @property
    def per_1000(self) -> float:
        return 1000.0 * self.value / self.decisions if self.decisions else 0.0

    @property
    def incremental_per_1000(self) -> float:
        return 1000.0 * self.incremental / self.decisions if self.decisions else 0.0


@dataclass
class SeedResult:
    seed: int
    history_seed: int
    evaluated_seed: int
    generic_action: str
    runs: dict[str, PolicyRun]
    model: dict  # the starting model's metrics (holdout AUC, oracle AUC...) and the retrained ones'
    drift: str
    lift: dict | None  # nba report on the nba run's recorded streams: lift over the control group
    campaign: dict | None = None  # the campaign's plan against what the nba run presented
    qini: dict | None = None  # nba report's uplift section on the nba_uplift run's recorded streams


@dataclass
class Simulation:
    settings: Settings
    seeds: list[SeedResult]
    seconds: float
    new_actions: tuple[str, ...]
    new_round: int | None
    drift_round: int | None


# --- where it runs ----------------------------------------------------------------------------------

@contextmanager
def private_store() -> Iterator[ProfileStore]:
    """A ProfileStore on a redis-server of the simulation's own, deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="nba-simulate-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", persist=False).start()
        store = ProfileStore.from_url(server.admin_url)  # a private scratch server: each policy's run flushes it
        try:
            yield store
        finally:
            store.client.close()
            server.stop()


def _catalogs(ruleset: RuleSet, population: int, held_back: Sequence[str]) -> tuple[CompiledRules, CompiledRules]:
    """(catalog before the new actions, full catalog), daily budgets scaled to ``population``."""
    scale = population / DEMO_CUSTOMERS
    actions = tuple(replace(a, daily_budget=max(1, round(a.daily_budget * scale))) if a.daily_budget else a
                    for a in ruleset.actions)
    campaigns = {name: replace(c, total_budget=None if c.total_budget is None else max(1, round(c.total_budget * scale)),
                               daily_budget=None if c.daily_budget is None else max(1, round(c.daily_budget * scale)))
                 for name, c in ruleset.campaigns.items()}
    full = replace(ruleset, actions=actions, campaigns=campaigns, version=f"{ruleset.version}-sim{population}")
    early = replace(full, actions=tuple(a for a in actions if a.id not in held_back),
                    version=f"{full.version}-before-new")
    return compile_rules(early), compile_rules(full)


# --- one population under one policy ---------------------------------------------------------------

class _Play:
    """Plays ``rounds`` days of one population under one engine and ranking."""

    def __init__(self, store: ProfileStore, pop: Population, draws: Draws, clock: dict[str, float],
                 engine: DecisionEngine, ranking: str, recorder: ResponseRecorder | None, start: float,
                 counted: Callable[[str], bool], new_actions: Sequence[str] = (), new_round: int | None = None,
                 full_rules: CompiledRules | None = None, drift_round: int | None = None,
                 truth: dict[tuple[str, str], tuple[float, float]] | None = None,
                 events: EventProcessor | None = None,
                 organic_truth: dict[tuple[str, str], tuple[float, str, str]] | None = None) -> None:
        self.store, self.pop, self.draws, self.clock = store, pop, draws, clock
        self.engine, self.ranking, self.recorder, self.start = engine, ranking, recorder, start
        self.counted, self.new_actions, self.new_round = counted, frozenset(new_actions), new_round
        self.full_rules, self.drift_round, self.truth, self.events = full_rules, drift_round, truth, events
        self.organic_truth = organic_truth  # (decision, logged candidate) -> (organic law then, class, type)
        self.pending: list[tuple[float, int, int, str, str, str, bool]] = []
        self._seq = 0
        self.run = PolicyRun()
        self.round = 0
        contact = engine.rules.current.ruleset.contact
        self.on_impression = contact.interactions.on_impression if contact is not None else frozenset()

    @property
    def drifted(self) -> bool:
        return self.drift_round is not None and self.round >= self.drift_round

    def oracle(self, cands: list, req: DecideInput, profile, now: float, uplift: bool = False) -> list:
        """Ranked by true probability x value; ``uplift``: by true incremental value, offers that gain
        nothing dropped."""
        i, c = self.pop.row(req.customer_id), CHANNELS.index(req.channel)
        ids = [v.action.id for _, _, v in cands]
        p = self.pop.probability(i, ids, c, now, self.drifted)
        if uplift:
            p = p - self.pop.organic_probability(i, self.drifted)[[self.pop.index[a] for a in ids]]
        ranked = sorted(zip((p[k] * cands[k][2].action.value for k in range(len(cands))), cands),
                        key=lambda s: (-s[0], s[1][2].action.id))
        return [cand for g, cand in ranked if not uplift or g > 0 or cand[2].action.service]

    def uplift_oracle(self, cands: list, req: DecideInput, profile, now: float) -> list:
        return self.oracle(cands, req, profile, now, uplift=True)

    def _push(self, at: float, i: int, decision_id: str, action_id: str, outcome: str, report: bool) -> None:
        self._seq += 1
        heapq.heappush(self.pending, (at, self._seq, i, decision_id, action_id, outcome, report))

    def _due(self, now: float) -> None:
        """Responses and acceptances that land by ``now``."""
        while self.pending and self.pending[0][0] <= now:
            at, _, i, decision_id, action_id, outcome, report = heapq.heappop(self.pending)
            if outcome == "organic":
                k = self.pop.index[action_id]
                if self.pop.taken[i, k] or self.pop.shown_at[i, k] > at - ORGANIC_WINDOW_DAYS * DAY:
                    continue
                self.pop.accepted(i, action_id)
                self.run.organic += self.counted(customer_id(i, self.pop.world.prefix))
                if report and self.events is not None:
                    self.events.publish(f"organic-{i}-{action_id}-{at:.0f}", customer_id(i, self.pop.world.prefix),
                                        ORGANIC_EVENT, {"action_id": action_id}, ts=at, source="simulation")
                changed = self.pop.apply(i, action_id)
                if changed is not None:
                    self.store.save([changed], SCHEMA)
                continue
            if report and self.recorder is not None:
                try:
                    self.recorder.record(decision_id, action_id, outcome, ts=at)
                except NbaError as exc:
                    self.run.lost_responses += 1
                    log.warning("simulated response refused: %s", exc)
            if outcome == "accepted":
                changed = self.pop.apply(i, action_id)
                if changed is not None:
                    self.store.save([changed], SCHEMA)

    def day(self, r: int) -> None:
        self.round = r
        run, pop, draws = self.run, self.pop, self.draws
        run.round_decisions.append(0)
        run.round_value.append(0.0)
        run.round_new.append(0)
        if r == self.new_round and self.full_rules is not None:
            self.engine.rules.swap(self.full_rules)
        day_start = self.start + r * DAY
        n = pop.world.size
        realism = pop.realism
        if realism.organic:
            self._organic_day(r, day_start)
        for i in np.flatnonzero(draws.active[r]).tolist():
            now = day_start + DAY_OPENS + DAY_HOURS * i / n
            self.clock["now"] = now
            self._due(now)
            cid = customer_id(i, pop.world.prefix)
            c = int(draws.channel[r, i])
            channel = CHANNELS[c]
            d = self.engine.decide(DecideInput(customer_id=cid, channel=channel, max_actions=1, ranking=self.ranking))
            counted = self.counted(cid)
            if counted:
                run.decisions += 1
                run.round_decisions[r] += 1
            else:
                run.control_decisions += 1
            organic = pop.organic_probability(i, self.drifted) if realism.organic else None
            if self.organic_truth is not None and organic is not None:
                kind = UPLIFT_CLASSES[int(pop.world.uplift[i])]
                for candidate, _ in d.candidates:
                    k = pop.index[candidate]
                    self.organic_truth[(d.decision_id, candidate)] = (float(organic[k]), kind, str(pop.types[k]))
            if d.uplift and counted and organic is not None:
                self._diagnose(d.uplift, i, c, now, organic)
            for a in d.actions:
                if a.campaign:
                    run.campaign_presented[a.campaign] = run.campaign_presented.get(a.campaign, 0) + 1
                p = float(pop.probability(i, [a.action_id], c, now, self.drifted)[0])
                pop.presented(i, a.action_id, now)
                if self.truth is not None:
                    seen = float(pop.probability(i, [a.action_id], c, now, self.drifted, observed_only=True)[0])
                    self.truth[(d.decision_id, a.action_id)] = (p, seen)
                if self.recorder is not None and channel in self.on_impression:
                    self.recorder.record(d.decision_id, a.action_id, "impression", ts=now + 1.0)
                accepted = bool(draws.accept[r, i] < p)
                if organic is not None and counted:
                    anyway = bool(draws.accept[r, i] < organic[pop.index[a.action_id]])
                    run.incremental += a.value * (int(accepted) - int(anyway))
                answer = response(realism, accepted, float(draws.outcome[r, i]), float(draws.delay[r, i]), now)
                if accepted:
                    pop.accepted(i, a.action_id)
                    self._push(answer.lands or now, i, d.decision_id, a.action_id, "accepted", answer.at is not None)
                elif answer.at is not None:
                    self._push(answer.at, i, d.decision_id, a.action_id, answer.outcome, True)
                if counted:
                    run.presented += 1
                    run.round_new[r] += a.action_id in self.new_actions
                    if accepted:
                        run.accepted += 1
                        run.value += a.value
                        run.round_value[r] += a.value
                elif accepted:
                    run.control_value += a.value
        self.finish(day_start + DAY - 1.0)

    def _diagnose(self, estimates: dict[str, tuple[float, float, float]], i: int, c: int, now: float,
                  organic: np.ndarray) -> None:
        """One uplift-ranked decision's candidates, taken alone (no contact limits, one slot): the true
        incremental value of the top candidate by each ranking (``UPLIFT_DIAGNOSIS``), where the estimated
        P(take | shown) and the estimated shift to P(take | not shown) are each swapped for the truth."""
        ids = list(estimates)
        p_hat, q_hat, worth = (np.array(x) for x in zip(*estimates.values()))
        p = self.pop.probability(i, ids, c, now, self.drifted)
        q = organic[[self.pop.index[a] for a in ids]]
        gain = (p - q) * worth
        for name, score in (("estimated uplift", (p_hat - q_hat) * worth), ("estimated propensity", p_hat * worth),
                            ("estimated propensity, true shift", (p_hat - _shifted(p_hat, q, p)) * worth),
                            ("true propensity, estimated shift", (p - _shifted(p, q_hat, p_hat)) * worth),
                            ("true uplift", gain)):
            self.run.diagnosis[name] = self.run.diagnosis.get(name, 0.0) + float(gain[int(np.argmax(score))])
        self.run.diagnosis["decisions"] = self.run.diagnosis.get("decisions", 0.0) + 1
        kind = UPLIFT_CLASSES[int(self.pop.world.uplift[i])]
        for k, a in enumerate(ids):
            t = str(self.pop.types[self.pop.index[a]])
            if t != "service":
                acc = self.run.shifts.setdefault((kind, t), [0.0, 0.0, 0.0])
                acc[0] += _logit(q_hat[k]) - _logit(p_hat[k])
                acc[1] += _logit(q[k]) - _logit(p[k])
                acc[2] += 1

    def _organic_day(self, r: int, day_start: float) -> None:
        """The uplift world's organic purchases of day ``r`` (``engine.sim.dynamics``), each at its own time
        of the day (``_due`` lands them: not when the offer was shown or taken in the meantime)."""
        pop, realism = self.pop, self.pop.realism
        live = {a.id for a in self.engine.rules.current.ruleset.actions}
        offers = np.array([a.id in live and a.type != "service" for a in pop.actions])
        hazard = pop.organic_hazard(self.drifted, day_start) * offers
        u, v = self.draws.organic(r, len(pop.actions))
        reported = realism.accepted_now + realism.accepted_late
        for i, k in zip(*np.nonzero(u < hazard)):
            at = day_start + DAY_OPENS + DAY_HOURS * float(u[i, k] / hazard[i, k])
            self._push(at, int(i), "", pop.actions[int(k)].id, "organic", float(v[i, k]) < reported)

    def after(self, days: int) -> None:
        """``days`` more days without decisions (organic purchases go on): the label windows of the last
        decisions close on the same world as the first ones' (the uplift world; elsewhere nothing happens)."""
        if not self.pop.realism.organic:
            return
        for r in range(self.round + 1, self.round + 1 + days):
            self._organic_day(r, self.start + r * DAY)
            self.finish(self.start + (r + 1) * DAY - 1.0)

    def finish(self, until: float) -> None:
        """Let the responses and acceptances due by ``until`` land."""
        self.clock["now"] = max(self.clock["now"], until)
        self._due(until)


def _logit(x: np.ndarray | float) -> np.ndarray:
    x = np.clip(x, 1e-9, 1 - 1e-9)
    return np.log(x / (1 - x))


def _shifted(p: np.ndarray, q: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``p`` moved by the logit shift from ``base`` to ``q``."""
    return 1.0 / (1.0 + np.exp(-(_logit(p) + _logit(q) - _logit(base))))


def _engine(store: ProfileStore, rules: CompiledRules, models: Live[ModelSet], clock: dict[str, float],
            contacts: bool = True, decision_log: DecisionLog | None = None) -> DecisionEngine:
    return DecisionEngine(store, Live(rules), models, decision_log, contacts=contacts, clock=lambda: clock["now"])


def _events(store: ProfileStore, engine: DecisionEngine, clock: dict[str, float],
            realism: Realism) -> EventProcessor | None:
    """Where the uplift world's organic purchases are reported (the service's own event path)."""
    return EventProcessor(store, engine.rules, engine, clock=lambda: clock["now"]) if realism.organic else None


def _seed_profiles(store: ProfileStore, world: World) -> None:
    store.client.flushdb()
    profiles = list(world.profiles())
    for k in range(0, len(profiles), 2000):
        store.save(profiles[k: k + 2000], SCHEMA)


# --- training from recorded traffic -----------------------------------------------------------------

def _recorded(store: ProfileStore, levels: Sequence[str], as_of: float,
              truth: dict[tuple[str, str], tuple[float, float]]) -> TrainingSet:
    """Training rows from the recorded streams; the true probability of each row is attached for the
    oracle's AUC only (``TrainingSet.p_true`` is never a feature)."""
    data = from_streams(store.client, SCHEMA, catalog=levels, as_of=as_of)
    ids = data.decision_ids or []
    data.p_true = np.array([truth.get((d, a), (np.nan,))[0] for d, a in zip(ids, data.action_ids())], dtype=float)
    return data


def _organic_rows(store: ProfileStore, levels: Sequence[str], as_of: float, rules: CompiledRules) -> TrainingSet:
    """The untreated rows of the uplift world's recorded traffic (``training_rows``' organic arm)."""
    return from_streams(store.client, SCHEMA, catalog=levels, as_of=as_of, arm="organic",
                        actions={a.id: (a.type, a.value) for a in rules.ruleset.actions})


def _organic_labels(truth: dict[tuple[str, str], tuple[float, str, str]], rows: TrainingSet, model: LoadedModel,
                    reported: float) -> dict[str, list[float]]:
    """The history's untreated rows per "uplift class|action type": how many, how many positive, the
    positives the world's organic law at the decision predicts for the span each row was observed (reported
    in the acceptances' share), and the sum of the organic model's estimates for a whole window."""
    law = [truth[(d, a)] for d, a in zip(rows.decision_ids or [], rows.action_ids())]
    q = np.array([x[0] for x in law])
    exposure = rows.exposure if rows.exposure is not None else np.ones(len(rows))
    expected = reported * (1.0 - (1.0 - q) ** exposure)
    if model.organic is None:
        raise SimulationError("the uplift world's model has no organic half")
    x = rows.recoded(model.action_levels)
    estimate = without_offer(model.scorer.predict(x), model.organic.scorer.predict(x))
    pairs = np.array([f"{kind}|{t}" for _, kind, t in law])
    return {pair: [float((m := pairs == pair).sum()), float(rows.y[m].sum()), float(expected[m].sum()),
                   float(estimate[m].sum())] for pair in sorted(set(pairs.tolist()))}


def _concat(first: TrainingSet, then: TrainingSet) -> TrainingSet:
    levels = list(then.actions)
    p1 = first.p_true if first.p_true is not None else np.full(len(first), np.nan)
    p2 = then.p_true if then.p_true is not None else np.full(len(then), np.nan)
    return TrainingSet(np.vstack([first.recoded(levels), then.x]), np.concatenate([first.y, then.y]),
                       np.concatenate([first.t, then.t]), levels, np.concatenate([p1, p2]),
                       (first.decision_ids or []) + (then.decision_ids or []),
                       summary={"source": "recorded decisions and responses", "history_rows": len(first),
                                "run_rows": len(then)}, schema=SCHEMA,
                       exposure=None if first.exposure is None and then.exposure is None else np.concatenate(
                           [np.ones(len(s)) if s.exposure is None else s.exposure for s in (first, then)]))


def _train(registry: ModelRegistry, data: TrainingSet, trees: int,
           organic: TrainingSet | None = None) -> tuple[LoadedModel, dict]:
    """A model version from ``data`` (with its organic half from ``organic``, uplift arbitration's)."""
    try:
        booster, metrics, summary, levels, second = fit_version(data, trees, organic)
    except ValueError as exc:
        raise SimulationError(f"{exc} (a larger --history-customers or --history-days records more)") from exc
    version = registry.save(booster.model_to_string(), levels, metrics, summary, organic=second)
    return registry.load(version), metrics


def _placeholder(registry: ModelRegistry, actions: Sequence[str]) -> LoadedModel:
    """A model for the history's engine, which must score although its random ranking ignores scores."""
    from engine.models.model_input import model_input

    features = model_input(SCHEMA).features
    rng = np.random.default_rng(0)
    x = rng.random((200, len(features)))
    x[:, features.index("action")] = rng.integers(0, len(actions), 200)
    data = TrainingSet(x, (rng.random(200) < 0.3).astype(float), np.arange(200.0), list(actions), schema=SCHEMA)
    return _train(registry, data, 1)[0]


def _auc_summary(metrics: dict, data: TrainingSet, *truths: dict[tuple[str, str], tuple[float, float]]) -> dict:
    """The model's holdout AUC, the oracle's on the same rows, and the AUC of the truth without the
    unobserved traits (the best a model of the observed features could do)."""
    _, hold = data.split()
    ids, actions = np.asarray(data.decision_ids or [], dtype=object)[hold], data.action_ids()[hold]
    seen = np.array([next((t[(d, a)][1] for t in truths if (d, a) in t), np.nan) for d, a in zip(ids, actions)])
    out = {k: metrics.get(k) for k in ("holdout_auc", "oracle_auc", "rank_correlation_with_truth", "holdout_rows")}
    out["observed_truth_auc"] = round(auc(data.y[hold], seen), 4) if len(seen) and not np.isnan(seen).any() else None
    return out


# --- rankings of the baselines ---------------------------------------------------------------------

def _rules_only(cands: list, req: DecideInput, profile, now: float) -> list:
    return sorted(cands, key=lambda c: (-c[2].action.value * c[2].weight, c[2].action.id))


def _random_eligible(seed: int) -> Callable:
    def rank(cands: list, req: DecideInput, profile, now: float) -> list:
        out = sorted(cands, key=lambda c: c[2].action.id)  # not the model's order: the same draw for every model
        np.random.default_rng([seed, int(req.customer_id[1:]), int(now // DAY)]).shuffle(out)
        return out
    return rank


def _generic(action_id: str) -> Callable:
    def rank(cands: list, req: DecideInput, profile, now: float) -> list:
        return [c for c in cands if c[2].action.id == action_id]
    return rank


def _generic_offer(store: ProfileStore, rules: CompiledRules, pop: Population, channels: np.ndarray) -> str:
    """The single offer with the most expected accepted value if everybody got it where the rules allow,
    on the first day's channels: the best generic message in hindsight (it uses the truth, which favours
    the baseline)."""
    from engine.models.derived import derive
    from engine.rules.facts import FactInputs

    best, best_ev = "", -1.0
    ev: dict[str, float] = {}
    for i in range(pop.world.size):
        profile = store.fetch(customer_id(i, pop.world.prefix), SCHEMA)
        channel = CHANNELS[int(channels[i])]
        outcome = rules.evaluate(rules.build_fact(FactInputs(
            numbers=np.concatenate((profile.numeric, derive(profile.numeric, SCHEMA))), categories=profile.categorical,
            products=profile.sets.get("products", ()), consents=profile.sets.get("consent", ()),
            channel=channel, touchpoint="", context={}, triggers=profile.triggers)))
        offers = [v.action for v in rules.verdicts(outcome, channel) if v.admitted and v.action.type != "service"]
        if offers:
            p = pop.probability(i, [a.id for a in offers], int(channels[i]), SIM_START, False)
            for a, q in zip(offers, p.tolist()):
                ev[a.id] = ev.get(a.id, 0.0) + q * a.value
    for action_id, value in sorted(ev.items()):
        if value > best_ev:
            best, best_ev = action_id, value
    return best


# --- the run ----------------------------------------------------------------------------------------

def simulate(ruleset: RuleSet, settings: Settings = Settings(), progress: Callable[[str], None] = lambda m: None,
             on_training: Callable[[str, TrainingSet, ProfileStore], None] | None = None) -> Simulation:
    """Play every seed of ``settings`` on a private Redis. ``on_training(stage, data, store)`` sees each
    training set before it is fitted (stage ``history`` or ``retrain``), with the private store."""
    settings.check()
    started = time.perf_counter()
    realism = settings.realism
    if settings.campaign:
        ruleset = on_simulated_days(ruleset, settings.campaign, settings.rounds)
    catalog_ids = {a.id for a in ruleset.actions}
    new_actions = tuple(a for a in realism.new_actions if a in catalog_ids)
    new_round = event_round(settings.rounds, realism.new_actions_at) if new_actions else None
    drift_round = event_round(settings.rounds, realism.drift_at) if realism.drift_shift else None
    early_h, full_h = _catalogs(ruleset, settings.history_customers, new_actions)
    early_e, full_e = _catalogs(ruleset, settings.customers, new_actions)
    results: list[SeedResult] = []
    try:
        with private_store() as store, tempfile.TemporaryDirectory(prefix="nba-simulate-models-") as models:
            registry = ModelRegistry(models, SCHEMA)
            for seed in settings.seeds:
                results.append(_one_seed(store, registry, ruleset, settings, seed, (early_h, full_h),
                                         (early_e, full_e), new_actions, new_round, drift_round, progress,
                                         on_training))
    finally:
        for rules in (early_h, full_h, early_e, full_e):
            rules.close()
    return Simulation(settings, results, time.perf_counter() - started, new_actions, new_round, drift_round)


def _one_seed(store: ProfileStore, registry: ModelRegistry, ruleset: RuleSet, settings: Settings, seed: int,
              history_rules: tuple[CompiledRules, CompiledRules], rules: tuple[CompiledRules, CompiledRules],
              new_actions: tuple[str, ...], new_round: int | None, drift_round: int | None,
              progress: Callable[[str], None],
              on_training: Callable[[str, TrainingSet, ProfileStore], None] | None) -> SeedResult:
    realism = settings.realism
    actions = rules[1].ruleset.actions
    history_seed, evaluated_seed = population_seeds(seed)
    drift: Drift | None = drift_of(seed, realism)
    clock = {"now": SIM_START}

    # 1. history: another population, an exploratory campaign, recorded like production traffic
    hist = generate(settings.history_customers, history_seed, settings.world, laws=seed, prefix="H")
    _seed_profiles(store, hist)
    hist_start = SIM_START - (settings.history_days + 7) * DAY  # a week between history and evaluation
    truth: dict[tuple[str, str], tuple[float, float]] = {}
    organic_truth: dict[tuple[str, str], tuple[float, str, str]] | None = {} if realism.organic else None
    decision_log = DecisionLog(store.client)
    # the uplift world's history logs what it could have shown: epsilon 1 draws each slot uniformly (a random
    # admitted action, as elsewhere), with its candidates and probabilities
    uniform = ExplorationConfig(strategy="epsilon", share=1.0, control=True) if realism.organic else ExplorationConfig()
    engine = _engine(store, history_rules[0], Live(ModelSet(_placeholder(registry, [a.id for a in ruleset.actions]),
                                                            exploration=uniform)), clock, decision_log=decision_log)
    engine.rankings["random_eligible"] = _random_eligible(seed)
    play = _Play(store, Population(hist, actions, realism, drift), Draws.draw(hist.size, settings.history_days,
                 history_seed, realism), clock, engine, "" if realism.organic else "random_eligible",
                 ResponseRecorder(store.client, engine.rules, clock=lambda: clock["now"]), hist_start,
                 counted=lambda cid: True, truth=truth, events=_events(store, engine, clock, realism),
                 organic_truth=organic_truth)
    for r in range(settings.history_days):
        play.day(r)
    play.after(LABEL_DAYS)  # a week later every label window of the history has closed
    play.finish(SIM_START - 1.0)
    decision_log.close()
    traffic, rejections = (Traffic({}), 0.0) if not settings.campaign else (
        traffic_from_stream(store.client, hist.size, settings.history_days, CHANNELS, until=SIM_START - 7 * DAY),
        rejection_share(store.client, settings.history_days, until=SIM_START - 7 * DAY))
    history = _recorded(store, [a.id for a in history_rules[0].ruleset.actions], SIM_START, truth)
    history_organic = (_organic_rows(store, list(history.actions), SIM_START, history_rules[0])
                       if realism.organic else None)
    if on_training is not None:
        on_training("history", history, store)
    model, metrics = _train(registry, history, settings.trees, history_organic)
    model_info: dict = {"trained_on": {"customers": hist.size, "population_seed": history_seed,
                                       "days": settings.history_days, "rows": len(history),
                                       "positives": int(history.y.sum()),
                                       **({"organic_rows": len(history_organic),
                                           "organic_positives": int(history_organic.y.sum())}
                                          if history_organic is not None else {})},
                        "start": _auc_summary(metrics, history, truth), "retrained": []}
    if history_organic is not None and organic_truth is not None:
        model_info["organic_labels"] = _organic_labels(organic_truth, history_organic, model,
                                                       realism.accepted_now + realism.accepted_late)
    progress(f"seed {seed}: model from {len(history):,} recorded rows of {hist.size:,} other customers: holdout AUC "
             f"{metrics.get('holdout_auc')}, oracle AUC {metrics.get('oracle_auc')}")

    # 2. the evaluated population, once per policy, from the same start with the same draws
    world = generate(settings.customers, evaluated_seed, settings.world, laws=seed, prefix="C")
    draws = Draws.draw(world.size, settings.rounds, evaluated_seed, realism)
    contact = rules[0].ruleset.contact
    control = contact.control if contact is not None else None

    def counted(cid: str) -> bool:
        return control is None or not control.contains(cid)

    _seed_profiles(store, world)
    planned = _plan(store, model, rules[0], settings, world, traffic, rejections) if settings.campaign else None
    generic = _generic_offer(store, rules[0], Population(world, actions, realism, drift), draws.channel[0])
    runs: dict[str, PolicyRun] = {}
    lift = qini_result = None
    for name in settings.policies:
        _seed_profiles(store, world)
        pop = Population(world, actions, realism, drift)
        clock["now"] = SIM_START
        run_truth: dict[tuple[str, str], tuple[float, float]] = {}
        learning = name in LEARNING
        run_log = DecisionLog(store.client) if learning else None
        exploration = ExplorationConfig(strategy="epsilon" if realism.organic else "thompson",
                                        share=settings.explore if learning else 0.0)
        arbitration = "uplift" if name == "nba_uplift" else "propensity"
        models = Live(ModelSet(champion=model, exploration=exploration, arbitration=arbitration))
        engine = _engine(store, rules[0], models, clock, contacts=name != "oracle", decision_log=run_log)
        recorder = None if name == "oracle" else ResponseRecorder(store.client, engine.rules,
                                                                   clock=lambda: clock["now"])
        ranking = "" if learning else name
        play = _Play(store, pop, draws, clock, engine, ranking, recorder, SIM_START, counted, new_actions, new_round,
                     rules[1], drift_round, run_truth, _events(store, engine, clock, realism))
        counts = None
        if exploration.enabled and exploration.strategy == "thompson":
            counts = ExplorationCounts(store.client)
            engine.explorer = Explorer(counts)
        engine.rankings.update({"rules_only": _rules_only, "random_eligible": _random_eligible(seed),
                                "generic": _generic(generic), "constrained_oracle": play.oracle,
                                "oracle": play.oracle, "uplift_oracle": play.uplift_oracle})
        for r in range(settings.rounds):
            if counts is not None:
                counts.step()
            play.day(r)
            if not learning:
                continue
            assert run_log is not None
            run_log.close()  # flushed: the night's training and tomorrow's exploration counts see today
            run_log = DecisionLog(store.client)
            engine.decision_log = run_log
            if settings.retrain and r < settings.rounds - 1:
                as_of = SIM_START + (r + 1) * DAY
                recorded = _recorded(store, [a.id for a in actions], as_of, run_truth)
                data = _concat(history, recorded)
                organic = (None if history_organic is None else
                           _concat(history_organic, _organic_rows(store, list(data.actions), as_of, rules[1])))
                if on_training is not None:
                    on_training("retrain", data, store)
                new, m = _train(registry, data, settings.trees, organic)
                models.swap(ModelSet(champion=new, exploration=exploration, arbitration=arbitration))
                if name == "nba":
                    model_info["retrained"].append({"round": r + 1, "rows": len(data),
                                                    **_auc_summary(m, data, truth, run_truth)})
        if run_log is not None:
            run_log.close()
        if name == "nba":
            report = build_report(store.client)
            run = play.run
            lift = {k: report["lift"].get(k) for k in ("lift", "ci95")}
            lift["control_decisions"] = report["policy"]["control"]["decisions"]
            lift["true_lift"] = (round((run.value / run.decisions) / (run.control_value / run.control_decisions) - 1, 4)
                                 if run.decisions and run.control_decisions and run.control_value else None)
        if name == "nba_uplift":
            play.after(LABEL_DAYS)  # the last decisions' label windows close (nothing more is counted)
            qini_result = qini(store.client, as_of=SIM_START + (settings.rounds + LABEL_DAYS) * DAY)
        runs[name] = play.run
        progress(f"seed {seed}: {name:18} {play.run.per_1000:>10,.1f} per 1,000 decisions "
                 f"({play.run.decisions:,} decisions" + (f"; incremental {play.run.incremental_per_1000:,.1f}"
                                                         if realism.organic else "") + ")")
    check = None
    if planned is not None and "nba" in runs:
        presented = runs["nba"].campaign_presented.get(settings.campaign, 0)
        check = {"campaign": settings.campaign, "planned_presentations": round(planned.presentations_in_budget, 1),
                 "nba_presented": presented,
                 "plan_error": round(planned.presentations_in_budget / presented - 1, 4) if presented else None,
                 "planned_acceptances": round(planned.acceptances, 1), "plan_seconds": planned.seconds,
                 "rejection_share": round(rejections, 4), "never_presented": planned.never_presented,
                 "traffic": {k: round(v, 4) for k, v in planned.traffic.items()}}
        progress(f"seed {seed}: campaign {settings.campaign}: planned {planned.presentations_in_budget:,.0f} "
                 f"presentations, nba presented {presented:,}")
    return SeedResult(seed, history_seed, evaluated_seed, generic, runs, model_info,
                      drift.describe() if drift is not None else "", lift, check, qini_result)


# --- a campaign: planned, then played ------------------------------------------------------------------

def on_simulated_days(ruleset: RuleSet, name: str, rounds: int) -> RuleSet:
    """``ruleset`` with campaign ``name`` running exactly over the simulated days (and no other campaign
    running then: they are moved after them), budgets as written (scaled to the population later)."""
    if name not in ruleset.campaigns:
        raise SimulationError(f"no campaign {name!r} in the rules (campaigns: {', '.join(ruleset.campaigns) or 'none'})")
    end = SIM_START + rounds * DAY
    campaigns = {n: replace(c, start=SIM_START, end=end) if n == name else replace(c, start=end + DAY, end=end + 2 * DAY)
                 for n, c in ruleset.campaigns.items()}
    return replace(ruleset, campaigns=campaigns, version=f"{ruleset.version}-{name}")


def _plan(store: ProfileStore, model: LoadedModel, rules: CompiledRules, settings: Settings, world: World,
          traffic: Traffic, rejections: float):
    """``nba campaign plan`` on the evaluated population before it plays: the model trained on the history,
    the traffic and the share of rejections measured on the history's recorded streams (never the draws or
    the truth of this population)."""
    customers = [customer_id(i, world.prefix) for i in range(world.size)]
    return plan_campaign(store, model, None, rules, rules.ruleset.campaigns[settings.campaign], customers, traffic,
                         max_actions=1, days=settings.rounds, at=SIM_START + DAY_OPENS, reject_share=rejections)


# --- results ----------------------------------------------------------------------------------------

def mean_ci(values: Sequence[float]) -> tuple[float, list[float]]:
    """Mean and 95% confidence interval (Student t over the seeds)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean()) if len(v) else float("nan")
    if len(v) < 2:
        return m, [m, m]
    df = len(v) - 1
    t = _T975.get(df) or next((q for d, q in sorted(_T975.items(), reverse=True) if d <= df), 1.96)
    half = t * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, [m - half, m + half]


def _rounded(x: float | None, digits: int = 1) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def new_action_learning(sim: Simulation) -> dict | None:
    """How soon nba presents the new actions half as often as the constrained oracle does: nba decisions
    (per seed) from their launch until the end of the first round in which its share of decisions showing
    a new action reaches half of the constrained oracle's share (seeds pooled)."""
    if sim.new_round is None or not sim.seeds or not {"nba", "constrained_oracle"} <= set(sim.seeds[0].runs):
        return None
    rounds = sim.settings.rounds
    share = {}
    for name in ("nba", "constrained_oracle"):
        new = np.array([[s.runs[name].round_new[r] for r in range(rounds)] for s in sim.seeds], dtype=float)
        dec = np.array([[s.runs[name].round_decisions[r] for r in range(rounds)] for s in sim.seeds], dtype=float)
        share[name] = new.sum(0) / np.maximum(dec.sum(0), 1)
    nba_dec = np.array([[s.runs["nba"].round_decisions[r] for r in range(rounds)] for s in sim.seeds], dtype=float)
    reached = None
    for r in range(sim.new_round, rounds):
        if share["constrained_oracle"][r] > 0 and share["nba"][r] >= 0.5 * share["constrained_oracle"][r]:
            reached = r
            break
    after = slice(sim.new_round, rounds)
    return {
        "actions": list(sim.new_actions), "from_round": sim.new_round + 1,
        "nba_share_by_round": [round(float(x), 4) for x in share["nba"]],
        "constrained_oracle_share_by_round": [round(float(x), 4) for x in share["constrained_oracle"]],
        "nba_share_after_launch": round(float(share["nba"][after].mean()), 4),
        "constrained_oracle_share_after_launch": round(float(share["constrained_oracle"][after].mean()), 4),
        "half_of_oracle_share_in_round": None if reached is None else reached + 1,
        "decisions_to_half_of_oracle_share": None if reached is None
        else int(round(nba_dec[:, sim.new_round: reached + 1].sum(1).mean())),
    }


def curves(sim: Simulation) -> dict[str, list[float]]:
    """Accepted value per 1,000 decisions per round, per policy, seeds pooled."""
    out = {}
    for name in sim.settings.policies:
        value = np.array([s.runs[name].round_value for s in sim.seeds], dtype=float).sum(0)
        dec = np.array([s.runs[name].round_decisions for s in sim.seeds], dtype=float).sum(0)
        out[name] = [round(float(v), 1) for v in 1000 * value / np.maximum(dec, 1)]
    return out


def table(sim: Simulation) -> dict:
    """The JSON of ``nba simulate --json``: a key per policy, then the world, seeds and the model."""
    names = sim.settings.policies
    per_seed = {name: [s.runs[name].per_1000 for s in sim.seeds] for name in names}
    out: dict = {}
    for name in names:
        mean, ci = mean_ci(per_seed[name])
        row: dict = {"value_per_1000": _rounded(mean), "ci95": [_rounded(ci[0]), _rounded(ci[1])]}
        for key, base in (("x_generic", "generic"), ("pct_of_constrained_oracle", "constrained_oracle")):
            if base not in per_seed:
                row[key], row[f"{key}_ci95"] = None, None
                continue
            scale = 100.0 if key.startswith("pct") else 1.0
            ratios = [scale * v / b if b else float("nan") for v, b in zip(per_seed[name], per_seed[base])]
            m, c = mean_ci(ratios)
            digits = 1 if scale == 100.0 else 2
            row[key], row[f"{key}_ci95"] = _rounded(m, digits), [_rounded(c[0], digits), _rounded(c[1], digits)]
        runs = [s.runs[name] for s in sim.seeds]
        decisions, presented = sum(r.decisions for r in runs), sum(r.presented for r in runs)
        row.update({"acceptance_rate": round(sum(r.accepted for r in runs) / presented, 4) if presented else 0.0,
                    "decisions": decisions, "per_seed": [_rounded(v) for v in per_seed[name]]})
        if sim.settings.realism.organic:
            inc, inc_ci = mean_ci([r.incremental_per_1000 for r in runs])
            row.update({"incremental_per_1000": _rounded(inc), "incremental_ci95": [_rounded(x) for x in inc_ci],
                        "incremental_per_seed": [_rounded(r.incremental_per_1000) for r in runs],
                        "organic_purchases": sum(r.organic for r in runs)})
        out[name] = row
    if {"nba", "rules_only"} <= set(per_seed):
        diff, diff_ci = mean_ci([a - b for a, b in zip(per_seed["nba"], per_seed["rules_only"])])
        out["nba_vs_rules_only"] = {
            "difference_per_1000": _rounded(diff), "ci95": [_rounded(diff_ci[0]), _rounded(diff_ci[1])],
            "row_cis_overlap": bool(out["nba"]["ci95"][0] <= out["rules_only"]["ci95"][1]),
            "seeds_nba_ahead": sum(a > b for a, b in zip(per_seed["nba"], per_seed["rules_only"]))}
    if {"nba", "nba_uplift"} <= set(per_seed):
        out["nba_uplift_vs_nba"] = _paired(sim, "nba_uplift", "nba")
    diagnosed = [s.runs["nba_uplift"].diagnosis for s in sim.seeds if "nba_uplift" in s.runs
                 and s.runs["nba_uplift"].diagnosis.get("decisions")]
    if diagnosed:
        out["uplift_diagnosis"] = {}
        for name in UPLIFT_DIAGNOSIS:
            m, ci = mean_ci([1000 * d[name] / d["decisions"] for d in diagnosed])
            out["uplift_diagnosis"][name] = {"per_1000": _rounded(m), "ci95": [_rounded(x) for x in ci]}
        shifts: dict[tuple[str, str], list[float]] = {}
        for s in sim.seeds:
            for pair, acc in s.runs["nba_uplift"].shifts.items():
                shifts[pair] = [a + b for a, b in zip(shifts.get(pair, [0.0, 0.0, 0.0]), acc)]
        out["uplift_shifts"] = [{"class": c, "type": t, "candidates": int(n), "estimated": _rounded(e / n, 2),
                                 "true": _rounded(tr / n, 2)} for (c, t), (e, tr, n) in sorted(shifts.items())]
    labelled: dict[str, list[float]] = {}
    for s in sim.seeds:
        for pair, acc in s.model.get("organic_labels", {}).items():
            labelled[pair] = [a + b for a, b in zip(labelled.get(pair, [0.0] * 4), acc)]
    if labelled:
        out["uplift_organic_labels"] = [
            {"class": pair.split("|")[0], "type": pair.split("|")[1], "rows": int(n), "label_rate": _rounded(y / n, 4),
             "expected_rate": _rounded(e / n, 4), "estimated_rate": _rounded(q / n, 4)}
            for pair, (n, y, e, q) in sorted(labelled.items())]
    pooled = [s.qini["all"] for s in sim.seeds if s.qini and s.qini.get("all")]
    if pooled:
        coefficients = [p["qini_coefficient"] for p in pooled if p["qini_coefficient"] is not None]
        actions = [(name, g["qini_coefficient"]) for s in sim.seeds if s.qini for name, g in s.qini["actions"].items()
                   if g["qini_coefficient"] is not None]
        out["nba_uplift_qini"] = {
            "qini_coefficient_all": _rounded(float(np.mean(coefficients)), 5) if coefficients else None,
            "per_seed": [{"qini_coefficient": p["qini_coefficient"], "auuc": p["auuc"], "uplift": p["uplift"],
                          "rows": p["rows"]} for p in pooled],
            "actions_with_a_curve": len(actions), "actions_positive": sum(c > 0 for _, c in actions)}
    start = [s.model["start"] for s in sim.seeds]
    last = [s.model["retrained"][-1] for s in sim.seeds if s.model["retrained"]]

    def aucs(rows: list[dict]) -> dict:
        return {key: _rounded(mean_ci([m[key] if m.get(key) is not None else float("nan") for m in rows])[0], 4)
                for key in ("holdout_auc", "oracle_auc", "observed_truth_auc")}

    model: dict = {
        "trained_on": "recorded decisions and responses of a disjoint population (per seed: "
                      f"{sim.settings.history_customers} customers, {sim.settings.history_days} days, random "
                      "admitted actions)",
        **aucs(start),
        "per_seed": start,
    }
    organic = [s.model["trained_on"] for s in sim.seeds if "organic_rows" in s.model["trained_on"]]
    if organic:
        model["organic_rows"] = [t["organic_rows"] for t in organic]
        model["organic_positives"] = [t["organic_positives"] for t in organic]
    if last:
        model["retrained"] = {**aucs(last), "retrainings_per_seed": len(sim.seeds[0].model["retrained"])}
    checks = [s.campaign for s in sim.seeds if s.campaign]
    if checks:
        planned, presented = sum(c["planned_presentations"] for c in checks), sum(c["nba_presented"] for c in checks)
        out["campaign_check"] = {"campaign": checks[0]["campaign"], "planned_presentations": round(planned, 1),
                                 "nba_presented": presented,
                                 "plan_error": round(planned / presented - 1, 4) if presented else None,
                                 "within_15_percent": bool(presented and abs(planned / presented - 1) <= 0.15),
                                 "per_seed": checks}
    lifts = [s.lift["lift"] for s in sim.seeds if s.lift and s.lift.get("lift") is not None]
    true_lifts = [s.lift["true_lift"] for s in sim.seeds if s.lift and s.lift.get("true_lift") is not None]
    out.update({
        "world": sim.settings.world,
        "seeds": list(sim.settings.seeds),
        "customers": sim.settings.customers,
        "rounds": sim.settings.rounds,
        "generic_action": [s.generic_action for s in sim.seeds],
        "model": model,
        "events": {"new_actions": list(sim.new_actions),
                   "new_actions_round": None if sim.new_round is None else sim.new_round + 1,
                   "drift_round": None if sim.drift_round is None else sim.drift_round + 1,
                   "drift": [s.drift for s in sim.seeds]},
        "new_action_learning": new_action_learning(sim),
        "nba_report_lift": {"mean": _rounded(float(np.mean(lifts)), 4) if lifts else None,
                            "true_mean": _rounded(float(np.mean(true_lifts)), 4) if true_lifts else None,
                            "per_seed": [s.lift for s in sim.seeds]},
        "targets": targets(per_seed),
        "curves": curves(sim),
        "seconds": round(sim.seconds, 1),
    })
    return out


def _paired(sim: Simulation, a: str, b: str) -> dict:
    """``a`` less ``b`` per seed (the same customers, draws and limits): incremental and accepted value."""
    out: dict = {}
    for key, of in (("incremental", lambda r: r.incremental_per_1000), ("value", lambda r: r.per_1000)):
        diffs = [of(s.runs[a]) - of(s.runs[b]) for s in sim.seeds]
        m, ci = mean_ci(diffs)
        out[key] = {"difference_per_1000": _rounded(m), "ci95": [_rounded(ci[0]), _rounded(ci[1])],
                    "seeds_ahead": sum(d > 0 for d in diffs), "ci_excludes_0": bool(ci[0] > 0 or ci[1] < 0)}
    return out


def targets(per_seed: dict[str, list[float]]) -> dict | None:
    """Issue 16's targets on the realistic world, judged on the lower 95% bounds (unrounded): nba >= 2.7x
    generic, >= 80% of the constrained oracle, and above rules_only with non-overlapping CIs."""
    if not {"nba", "rules_only", "generic", "constrained_oracle"} <= set(per_seed):
        return None
    nba = per_seed["nba"]
    _, (lo_x, _) = mean_ci([v / b if b else float("nan") for v, b in zip(nba, per_seed["generic"])])
    _, (lo_pct, _) = mean_ci([100 * v / b if b else float("nan") for v, b in zip(nba, per_seed["constrained_oracle"])])
    _, nba_ci = mean_ci(nba)
    _, rules_ci = mean_ci(per_seed["rules_only"])
    return {
        "x_generic_at_least_2.7": {"lower_ci95": _rounded(lo_x, 3), "met": lo_x >= 2.7},
        "pct_of_constrained_oracle_at_least_80": {"lower_ci95": _rounded(lo_pct, 2), "met": lo_pct >= 80.0},
        "beats_rules_only_cis_apart": {"nba_ci95": [_rounded(x) for x in nba_ci],
                                       "rules_only_ci95": [_rounded(x) for x in rules_ci],
                                       "met": nba_ci[0] > rules_ci[1]},
    }


def format_simulation(sim: Simulation) -> str:
    t = table(sim)
    s = sim.settings
    lines = [f"world {s.world}: {s.customers} customers x {s.rounds} rounds (days), seeds "
             f"{', '.join(map(str, s.seeds))}; one action per decision; {sim.seconds:.1f}s",
             f"{'policy':20} {'value/1000 dec':>14} {'95% CI':>18} {'x generic (95% CI)':>22} "
             f"{'% constr. oracle (95% CI)':>27} {'accept':>7} {'decisions':>9}"]
    for name in s.policies:
        r = t[name]
        ci = f"{r['ci95'][0]:,.0f} .. {r['ci95'][1]:,.0f}"
        xg = (f"{r['x_generic']:.2f} ({r['x_generic_ci95'][0]:.2f}..{r['x_generic_ci95'][1]:.2f})"
              if r["x_generic"] is not None else "-")
        pct = (f"{r['pct_of_constrained_oracle']:.1f}% ({r['pct_of_constrained_oracle_ci95'][0]:.1f}.."
               f"{r['pct_of_constrained_oracle_ci95'][1]:.1f})" if r["pct_of_constrained_oracle"] is not None else "-")
        lines.append(f"{name:20} {r['value_per_1000']:>14,.1f} {ci:>18} {xg:>22} {pct:>27} "
                     f"{r['acceptance_rate']:>7.2%} {r['decisions']:>9,}")
    if s.realism.organic:
        lines.append(f"{'incremental value':20} " + "; ".join(
            f"{name} {t[name]['incremental_per_1000']:,.1f} ({t[name]['incremental_ci95'][0]:,.0f} .. "
            f"{t[name]['incremental_ci95'][1]:,.0f})" for name in s.policies)
                     + " per 1,000 decisions (value x (taken when shown - taken without))")
    up = t.get("nba_uplift_vs_nba")
    if up:
        lines.append("nba_uplift - nba (paired by seed): incremental "
                     f"{up['incremental']['difference_per_1000']:+,.1f} per 1,000 decisions (95% CI "
                     f"{up['incremental']['ci95'][0]:+,.1f} .. {up['incremental']['ci95'][1]:+,.1f}; ahead on "
                     f"{up['incremental']['seeds_ahead']} of {len(s.seeds)} seeds), accepted value "
                     f"{up['value']['difference_per_1000']:+,.1f} ({up['value']['ci95'][0]:+,.1f} .. "
                     f"{up['value']['ci95'][1]:+,.1f})")
    diagnosis = t.get("uplift_diagnosis")
    if diagnosis:
        lines.append("nba_uplift's decisions, candidates taken alone (no limits): true incremental value per 1,000 "
                     "of the top candidate by " + "; ".join(f"{name} {d['per_1000']:,.0f}" for name, d in diagnosis.items()))
    if t.get("uplift_shifts"):
        lines.append("  mean logit shift from shown to not shown, estimated / true: " + "; ".join(
            f"{r['class']} {r['type']} {r['estimated']:+.2f} / {r['true']:+.2f}" for r in t["uplift_shifts"]))
    if t.get("uplift_organic_labels"):
        lines.append("  the histories' untreated rows, organic purchase rate labelled / the world's law for the span "
                     "observed / the organic model's estimate for a whole window: " + "; ".join(
                         f"{r['class']} {r['type']} {r['label_rate']:.3f} / {r['expected_rate']:.3f} / "
                         f"{r['estimated_rate']:.3f}" for r in t["uplift_organic_labels"]))
    q = t.get("nba_uplift_qini")
    if q:
        c = q["qini_coefficient_all"]  # None: no curve had enough rows
        lines.append(f"nba report on the nba_uplift run's streams: Qini coefficient of its uplift estimates, all "
                     f"actions pooled, {'none' if c is None else f'{c:+.5f}'} (mean over seeds); positive for "
                     f"{q['actions_positive']} of {q['actions_with_a_curve']} (action, seed) curves")
    m = t["model"]
    lines.append(f"model: {m['trained_on']}")
    lines.append(f"  holdout AUC {m['holdout_auc']}; on the same rows the oracle's {m['oracle_auc']}, the truth "
                 f"without the unobserved traits {m['observed_truth_auc']}"
                 + (f"; last nightly retraining: {m['retrained']['holdout_auc']} (oracle "
                    f"{m['retrained']['oracle_auc']}, without unobserved traits {m['retrained']['observed_truth_auc']})"
                    if "retrained" in m else ""))
    ev = t["events"]
    if ev["new_actions_round"] or ev["drift_round"]:
        lines.append(f"new actions ({', '.join(ev['new_actions'])}) from round {ev['new_actions_round']}; "
                     f"drift from round {ev['drift_round']}")
    learning = t["new_action_learning"]
    if learning:
        reached = learning["decisions_to_half_of_oracle_share"]
        lines.append("new actions: nba share of decisions after launch "
                     f"{learning['nba_share_after_launch']:.1%} vs constrained oracle "
                     f"{learning['constrained_oracle_share_after_launch']:.1%}; half of the oracle's share "
                     + (f"after {reached:,} nba decisions (round {learning['half_of_oracle_share_in_round']})"
                        if reached is not None else "not reached"))
    vs = t.get("nba_vs_rules_only")
    if vs:
        lines.append(f"nba - rules_only (paired by seed): {vs['difference_per_1000']:+,.1f} per 1,000 decisions "
                     f"(95% CI {vs['ci95'][0]:+,.1f} .. {vs['ci95'][1]:+,.1f}); nba ahead on {vs['seeds_nba_ahead']} "
                     f"of {len(s.seeds)} seeds; the rows' CIs {'overlap' if vs['row_cis_overlap'] else 'do not overlap'}")
    lift = t["nba_report_lift"]
    if lift["mean"] is not None:
        lines.append(f"nba report on the nba run's recorded streams: lift over the control group {lift['mean']:+.1%} "
                     f"(mean over seeds; the true lift, unreported acceptances included: "
                     + (f"{lift['true_mean']:+.1%})" if lift["true_mean"] is not None else "-)"))
    check = t.get("campaign_check")
    if check:
        error = f"{check['plan_error']:+.1%}" if check["plan_error"] is not None else "-"
        lines.append(f"campaign {check['campaign']}: planned {check['planned_presentations']:,.0f} presentations, "
                     f"nba presented {check['nba_presented']:,} (plan error {error}; "
                     f"{'within' if check['within_15_percent'] else 'NOT within'} 15%)")
    goals = t.get("targets")
    if goals:
        lines.append("targets (lower 95% bounds): " + "; ".join(
            f"{name} {'met' if g['met'] else 'NOT met'}" for name, g in goals.items()))
    lines.append("every row counts the same customers (the control group excluded); x generic and % are means "
                 "of per-seed ratios")
    return "\n".join(lines)


def plot_curves(sim: Simulation, path: str | Path) -> None:
    """Learning curves: accepted value per 1,000 decisions per round, and the new actions' share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves(sim)
    rounds = np.arange(1, sim.settings.rounds + 1)
    learning = new_action_learning(sim)
    fig, axes = plt.subplots(2 if learning else 1, 1, figsize=(9, 7.5 if learning else 4.5), squeeze=False,
                             sharex=True)
    ax = axes[0][0]
    styles = {"nba": ("C0", "-", "nba (retrained nightly, exploring)" if sim.settings.retrain else "nba"),
              "rules_only": ("C1", "-", "rules_only"), "generic": ("C2", "-", "generic"),
              "constrained_oracle": ("0.4", "--", "constrained oracle")}
    for name, (color, style, label) in styles.items():
        if name in c:
            ax.plot(rounds, c[name], style, color=color, label=label, marker="o", markersize=3)
    for r, what in ((sim.new_round, "new actions"), (sim.drift_round, "drift")):
        if r is not None:
            for a in axes[:, 0]:
                a.axvline(r + 1, color="0.6", linestyle=":")
            ax.annotate(what, (r + 1, ax.get_ylim()[1]), textcoords="offset points", xytext=(3, -12), fontsize=8)
    ax.set_ylabel("accepted value / 1,000 decisions")
    ax.set_title(f"{sim.settings.world} world: {sim.settings.customers} customers, seeds "
                 f"{', '.join(map(str, sim.settings.seeds))} pooled")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if learning:
        ax2 = axes[1][0]
        ax2.plot(rounds, learning["nba_share_by_round"], "-o", color="C0", markersize=3, label="nba")
        ax2.plot(rounds, learning["constrained_oracle_share_by_round"], "--o", color="0.4", markersize=3,
                 label="constrained oracle")
        ax2.set_ylabel("share of decisions showing a new action")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    axes[-1][0].set_xlabel("round (simulated day)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
