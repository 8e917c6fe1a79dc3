"""``nba simulate``: the closed loop in the synthetic world, policy against policy.

Every policy decides for its own copy of the same simulated customers (ids ``sim-<policy>-<n>``) through
the real funnel on a real Redis: rules, contact policies, budgets, one action per decision. Customers
respond from the world's hidden ground truth (``World.true_propensity``), with the same random draws for
every policy, and the responses are recorded as ``RecordResponse`` records them (contact history, a
rejection's cool-down). Rounds are simulated days; ``--retrain`` retrains the model between rounds on
the responses recorded so far plus the exploration data the demo model learns from.

Policies (all see the same admitted actions; they differ only in how they order them):

- ``nba``: the service as deployed: propensity x value x levers x context weight. Its customers include
  the configured control group, who get the control policy; the ``nba`` row counts the others, and
  ``nba report`` measures the lift over the control group from the recorded streams.
- ``rules_only``: value x levers x context weight, no model.
- ``generic``: one offer for everybody (the offer with the best population-wide expected value, chosen
  with hindsight from the ground truth: the strongest single generic message), the channel's fallback
  where it is not allowed.
- ``random_eligible``: a random admitted action.
- ``oracle``: knows the truth: the admitted action with the highest true propensity x value.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np

from engine.decision.contact import budget_key, contacts_key
from engine.decision.funnel import DecisionEngine
from engine.decision.request import DecideInput
from engine.decision.responses import ResponseRecorder
from engine.features import CHANNELS
from engine.live import Live
from engine.models.registry import LoadedModel, ModelRegistry
from engine.sim.world import World, generate
from engine.store.decision_log import DecisionLog
from engine.store.profiles import ProfileStore

log = logging.getLogger(__name__)

POLICIES = ("nba", "rules_only", "generic", "random_eligible", "oracle")
CHANNEL_MIX = {"web": 0.30, "mobile_app": 0.25, "call_center": 0.20, "email": 0.15, "sms": 0.05, "branch": 0.05}
REJECT_SHARE = 0.3  # of the customers who do not accept, this share rejects (the rest ignore)
RESPONSE_DELAY = 600.0  # seconds from a decision to the customer's response
SIM_START = datetime(2030, 1, 7, 12, 0, tzinfo=UTC).timestamp()  # noon: no quiet hours
DAY = 86_400.0


@dataclass
class PolicyResult:
    decisions: int = 0
    presented: int = 0
    accepted: int = 0
    value: float = 0.0
    by_round: list[float] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "value_per_1000_decisions": round(1000 * self.value / self.decisions, 1) if self.decisions else 0.0,
            "acceptance_rate": round(self.accepted / self.presented, 4) if self.presented else 0.0,
            "decisions": self.decisions, "presented": self.presented, "accepted": self.accepted,
            "accepted_value": round(self.value, 1),
        }


@dataclass
class Simulation:
    results: dict[str, PolicyResult]
    generic_action: str
    customers: int
    rounds: int
    seconds: float
    since: str  # first stream id of this run (for nba report --since)
    control_decisions: int
    models: list[str]


def _truth_table(world: World, actions) -> np.ndarray:
    """(customers, actions, channels) hidden acceptance probabilities."""
    n, a, c = world.size, len(actions), len(CHANNELS)
    rows = np.repeat(np.arange(n), a * c)
    action_idx = np.tile(np.repeat(np.arange(a), c), n)
    channel_idx = np.tile(np.arange(c), n * a)
    return world.true_propensity(rows, actions, action_idx, channel_idx).reshape(n, a, c)


def _admitted(store: ProfileStore, rules, customer_ids: list[str], channels: list[str]) -> list[set[str]]:
    """The actions the rules admit for each customer on its channel (eligibility and policies)."""
    from engine.models.derived import derive
    from engine.rules.facts import FactInputs

    out = []
    for cid, channel in zip(customer_ids, channels):
        profile = store.fetch(cid)
        derived = derive(profile.numeric)
        outcome = rules.evaluate(rules.build_fact(FactInputs(
            numbers=np.concatenate((profile.numeric, derived)), categories=profile.categorical,
            products=profile.sets.get("products", ()), consents=profile.sets.get("consent", ()),
            channel=channel, touchpoint="", context={}, triggers=profile.triggers)))
        out.append({v.action.id for v in rules.verdicts(outcome, channel) if v.admitted})
    return out


def _generic_offer(truth: np.ndarray, actions, admitted: list[set[str]], channel_idx: np.ndarray) -> str:
    """The single offer with the most accepted value if everybody got it where the rules allow it:
    the best generic message in hindsight (it uses the ground truth, which favours the baseline)."""
    best, best_ev = "", -1.0
    rows = np.arange(len(admitted))
    for k, a in enumerate(actions):
        if a.type == "service":
            continue
        allowed = np.array([a.id in s for s in admitted])
        ev = float((truth[rows, k, channel_idx] * allowed).mean() * a.value)
        if ev > best_ev:
            best, best_ev = a.id, ev
    return best


def _retrain(world: World, actions, rows, action_idx, channel_idx, y, registry: ModelRegistry,
             base_customers: int, rounds: int = 100) -> LoadedModel:
    import lightgbm as lgb

    from engine.models.model_input import CATEGORICAL_FEATURES, FEATURES, ActionTable, customer_blocks
    from engine.models.training import PARAMS
    from engine.sim.training_data import simulate_responses

    base = simulate_responses(generate(base_customers, world.seed), actions)
    table = ActionTable.build(actions, [a.id for a in actions])
    blocks = customer_blocks(world.numeric.astype(np.float64), world.categorical, world.products)
    x = np.empty((len(rows), len(FEATURES)))
    x[:, : blocks.shape[1]] = blocks[rows]
    x[:, blocks.shape[1]: -1] = table.rows[action_idx]
    x[:, -1] = channel_idx
    data = lgb.Dataset(np.vstack([base.x, x]), np.concatenate([base.y, y]), feature_name=list(FEATURES),
                       categorical_feature=[FEATURES.index(c) for c in CATEGORICAL_FEATURES])
    booster = lgb.train(PARAMS, data, num_boost_round=rounds)
    version = registry.save(booster.model_to_string(), [a.id for a in actions], {},
                            {"source": "nba simulate", "rows": int(len(y)) + len(base.y)})
    return registry.load(version)


def simulate(store: ProfileStore, rules_live, model: LoadedModel, customers: int = 1000, rounds: int = 3,
             seed: int = 11, world_seed: int = 7, retrain: bool = False, policies=POLICIES,
             progress=lambda msg: None) -> Simulation:
    started = time.perf_counter()
    client = store.client
    rules = rules_live.current
    actions = rules.ruleset.actions
    index = {a.id: k for k, a in enumerate(actions)}
    world = generate(customers, world_seed)
    truth = _truth_table(world, actions)
    profiles = list(world.profiles())
    for name in policies:
        store.save([replace(p, customer_id=f"sim-{name}-{p.customer_id}") for p in profiles])
        pipe = client.pipeline(transaction=False)
        for p in profiles:
            pipe.delete(contacts_key(f"sim-{name}-{p.customer_id}"))
        pipe.execute()
    rng = np.random.default_rng(seed)
    mix = np.array([CHANNEL_MIX.get(ch, 0.0) for ch in CHANNELS])
    channel_draw = rng.choice(len(CHANNELS), size=(rounds, customers), p=mix / mix.sum())
    u_accept = rng.random((rounds, customers))
    u_reject = rng.random((rounds, customers))
    budgeted = [a.id for a in actions if a.daily_budget is not None]
    generic = _generic_offer(truth, actions, _admitted(
        store, rules, [f"sim-{policies[0]}-{p.customer_id}" for p in profiles],
        [CHANNELS[c] for c in channel_draw[0]]), channel_draw[0])

    clock = {"now": SIM_START}
    model_live = Live(model)
    log_stream = DecisionLog(client)
    since = f"{int(time.time() * 1000)}-0"
    engines: dict[str, DecisionEngine] = {}
    for name in policies:
        engines[name] = DecisionEngine(store, rules_live, model_live, log_stream if name == "nba" else None,
                                       clock=lambda: clock["now"])

    def row_of(customer_id: str) -> int:
        return int(customer_id.rsplit("-C", 1)[1])

    def oracle(cands, req, profile, now):
        i, c = row_of(req.customer_id), CHANNELS.index(req.channel)
        return sorted(((truth[i, index[v.action.id], c] * v.action.value, p, v) for _, p, v in cands),
                      key=lambda s: (-s[0], s[2].action.id))

    def rules_only(cands, req, profile, now):
        return sorted(((v.action.value * v.weight, p, v) for _, p, v in cands), key=lambda s: (-s[0], s[2].action.id))

    def random_eligible(cands, req, profile, now):
        order = list(cands)
        np.random.default_rng([seed, row_of(req.customer_id), int(now // DAY)]).shuffle(order)
        return order

    def generic_offer(cands, req, profile, now):
        return [c for c in cands if c[2].action.id == generic]

    for name, fn in (("oracle", oracle), ("rules_only", rules_only), ("random_eligible", random_eligible),
                     ("generic", generic_offer)):
        for e in engines.values():
            e.rankings[name] = fn

    contact = next(iter(engines.values())).rules.current.ruleset.contact
    on_impression = contact.interactions.on_impression if contact is not None else frozenset()
    results = {name: PolicyResult() for name in policies}
    recorders = {name: ResponseRecorder(client, stream="nba:stream:responses" if name == "nba"
                                        else f"nba:sim:responses:{name}", clock=lambda: clock["now"] + RESPONSE_DELAY)
                 for name in policies}
    learned: tuple[list, list, list, list] = ([], [], [], [])
    control_decisions = 0
    models = [model.version]
    registry_dir = tempfile.TemporaryDirectory(prefix="nba-simulate-") if retrain else None
    try:
        for r in range(rounds):
            day_start = SIM_START + r * DAY
            for name in policies:
                if budgeted:  # each policy gets the full day's budgets
                    client.delete(*[budget_key(a, day_start) for a in budgeted])
                engine, result = engines[name], results[name]
                round_value = 0.0
                for i in range(customers):
                    clock["now"] = day_start + i * (3600.0 / customers)
                    channel = CHANNELS[channel_draw[r, i]]
                    d = engine.decide(DecideInput(customer_id=f"sim-{name}-C{i:07d}", channel=channel,
                                                  max_actions=1, ranking="" if name == "nba" else name))
                    if d.control:
                        control_decisions += 1
                    counted = not d.control
                    if counted:
                        result.decisions += 1
                    seen_on_report = channel in on_impression  # the channel reports what the customer saw
                    for a in d.actions:
                        if seen_on_report:
                            recorders[name].record(d.decision_id, a.action_id, "impression", ts=clock["now"] + 1)
                        p = truth[i, index[a.action_id], channel_draw[r, i]]
                        accepted = u_accept[r, i] < p
                        outcome = "accepted" if accepted else ("rejected" if u_reject[r, i] < REJECT_SHARE else "ignored")
                        recorders[name].record(d.decision_id, a.action_id, outcome, ts=clock["now"] + RESPONSE_DELAY)
                        if name == "nba":
                            for lst, v in zip(learned, (i, index[a.action_id], channel_draw[r, i], float(accepted))):
                                lst.append(v)
                        if counted:
                            result.presented += 1
                            result.accepted += int(accepted)
                            result.value += a.value if accepted else 0.0
                            round_value += a.value if accepted else 0.0
                result.by_round.append(round_value)
                progress(f"round {r + 1}/{rounds} {name:16} value/1000 so far "
                         f"{1000 * result.value / max(result.decisions, 1):,.1f}")
            if registry_dir is not None and r < rounds - 1 and "nba" in policies:
                registry = ModelRegistry(registry_dir.name)
                rows, action_idx, channel_idx, y = (np.asarray(x) for x in learned)
                new = _retrain(world, actions, rows, action_idx, channel_idx, y, registry,
                               base_customers=max(10_000, customers))
                model_live.swap(new)
                models.append(new.version)
                progress(f"retrained on {len(learned[0])} recorded responses: {new.version}")
    finally:
        log_stream.close()
        for name in policies:
            if name != "nba":
                client.delete(f"nba:sim:responses:{name}")
        if registry_dir is not None:
            registry_dir.cleanup()
    return Simulation(results, generic, customers, rounds, time.perf_counter() - started, since,
                      control_decisions, models)


def format_simulation(sim: Simulation) -> str:
    rows = {name: r.row() for name, r in sim.results.items()}
    generic = rows.get("generic", {}).get("value_per_1000_decisions") or None
    oracle = rows.get("oracle", {}).get("value_per_1000_decisions") or None
    lines = [f"{sim.customers} customers x {sim.rounds} rounds, one action per decision, "
             f"{sim.seconds:.1f}s; generic offer: {sim.generic_action}",
             f"{'policy':16} {'decisions':>9} {'accepted':>8} {'accept rate':>11} {'value/1000 dec':>15} "
             f"{'x generic':>9} {'% oracle':>8}"]
    for name, r in rows.items():
        v = r["value_per_1000_decisions"]
        lines.append(f"{name:16} {r['decisions']:>9} {r['accepted']:>8} {r['acceptance_rate']:>11.2%} {v:>15,.1f} "
                     f"{(v / generic if generic else float('nan')):>9.2f} "
                     f"{(100 * v / oracle if oracle else float('nan')):>7.1f}%")
    lines.append(f"nba excludes its {sim.control_decisions} control-group decisions; "
                 f"lift from the recorded streams: nba report --since {sim.since}")
    return "\n".join(lines)
