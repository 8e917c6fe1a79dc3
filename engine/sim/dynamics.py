"""What happens to simulated customers over time: the realistic world's dynamics.

``engine.sim.world`` says who the customers are and how likely each is to accept each action in their
current state. This module moves that state as a simulation runs, for one population and one policy:

- **Acceptance changes the customer.** An accepted product is held from the day the acceptance lands
  (``ACCEPT_EFFECTS``: a cross-sell adds the product, an upgrade changes the plan or resets the device
  age, a retention offer lowers churn risk...), so the profile the service reads changes and the rules
  stop offering it; the same action is never accepted twice (its value is earned once).
- **Contact fatigue.** Every marketing impression of the last ``fatigue_days`` lowers the acceptance
  logit of the next offer by ``fatigue_per_impression``.
- **Delayed and missing responses.** Of the acceptances, a share is reported within minutes, a share
  one to six days later and the rest never (bought elsewhere, not attributed: the customer changes but
  training sees a non-acceptance). Of the others, a share rejects, a share is reported as ignored,
  and the rest never answers (a negative only once the label window closes).
- **Drift.** From the drift round on, one segment's taste moves: one offer type gains
  ``drift_shift`` in the logit, another loses it (which ones: drawn from the world's laws).
- **New actions.** Some catalog actions go live only from a later round, with no history.
- **Uneven activity.** Each customer interacts on a given day with their own probability
  (Beta-distributed), on a channel of the channel mix.
- **Organic purchases** (the uplift world only). ``engine.sim.world``'s organic probability
  (``organic_shift``; drift applies, contact fatigue does not: nobody tires of not being contacted) is
  the chance to take an action within ``ORGANIC_WINDOW_DAYS`` without being shown it. Every day every
  customer takes each live offer they do not hold with the daily hazard that compounds to it over the
  window (in the shop or on the web: the web channel's law), except an offer shown to them in
  the last window: that window's outcome was the response to it (the customer's potential outcomes are
  coupled: a sure thing who declines the offer would not have bought it anyway). It changes the customer
  as an accepted offer does, and is reported to the engine as an ``offer_accepted`` event
  (``attr.action_id``) with the same share as acceptances (``accepted_now + accepted_late``).

The ideal world has none of these: every customer decides every day, responses arrive at once and
are all reported, nobody tires or changes.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from engine.sim.telco import ACTION_TYPES, CATEGORICAL, CHANNELS, NUMERIC, SETS
from engine.sim.world import ActionLike, World, organic_shift, true_logits
from engine.store.profiles import Profile

DAY = 86_400.0
_N = {name: i for i, name in enumerate(NUMERIC)}
_P = {name: i for i, name in enumerate(SETS["products"])}
_PLAN = CATEGORICAL["plan"]
_STAGE = CATEGORICAL["lifecycle_stage"]
_ALLOWANCE = {"prepaid": 5.0, "sim_only": 20.0, "standard": 40.0, "unlimited": 1000.0}
OFFER_TYPES = tuple(t for t in ACTION_TYPES if t != "service")
ORGANIC_WINDOW_DAYS = 7.0  # the organic probability's horizon: the label window of training and reports
CHANNEL_MIX = {"web": 0.30, "mobile_app": 0.25, "call_center": 0.20, "email": 0.15, "sms": 0.05, "branch": 0.05}
# New actions of the demo catalog: launched mid-run, never seen in training history.
NEW_ACTIONS = ("bundle_home_duo", "cross_sell_security_suite", "cross_sell_smart_home")

# What accepting an action does to the customer (the demo catalog; other actions are only "taken").
# add: products now held; plan: the new plan; set / scale: numeric features.
ACCEPT_EFFECTS: dict[str, dict] = {
    "resolve_open_case": {"set": {"open_cases": 0}},
    "payment_help_plan": {"set": {"failed_payments_90d": 0}},
    "upsell_unlimited": {"plan": "unlimited"},
    "upsell_standard_from_prepaid": {"plan": "standard"},
    "upsell_extra_data": {"scale": {"data_allowance_gb": 2.0}},
    "upsell_fiber_speed": {"add": ("fiber",)},
    "upsell_device_upgrade": {"set": {"device_age_months": 0}},
    "cross_sell_broadband": {"add": ("broadband",)},
    "cross_sell_tv": {"add": ("tv",)},
    "cross_sell_device_insurance": {"add": ("device_insurance",)},
    "cross_sell_streaming": {"add": ("streaming",)},
    "cross_sell_cloud_storage": {"add": ("cloud_storage",)},
    "cross_sell_roaming_pack": {"add": ("roaming_pack",)},
    "cross_sell_security_suite": {"add": ("security_suite",)},
    "cross_sell_smart_home": {"add": ("smart_home",)},
    "bundle_home_duo": {"add": ("fixed_voice",)},
    "bundle_triple_play": {"add": ("fixed_voice",)},
    "bundle_family_plan": {"add": ("family_plan",)},
    "retention_discount_20": {"scale": {"churn_risk": 0.5}, "set": {"contract_months_left": 12}},
    "retention_free_upgrade_month": {"scale": {"churn_risk": 0.6}},
    "retention_loyalty_points": {"scale": {"churn_risk": 0.8}},
    "retention_contract_renewal": {"scale": {"churn_risk": 0.7}, "set": {"contract_months_left": 24}},
    "acquire_sim_only_starter": {"add": ("mobile",), "plan": "sim_only", "stage": "new"},
    "acquire_fiber_welcome": {"add": ("fiber",), "stage": "new"},
    "acquire_family_welcome": {"add": ("mobile", "family_plan"), "plan": "standard", "stage": "new"},
    "acquire_student_deal": {"add": ("mobile",), "plan": "prepaid", "stage": "new"},
}


@dataclass(frozen=True)
class Realism:
    name: str
    activity: tuple[float, float] | None  # Beta(a, b): a customer's chance to interact on a day; None: every day
    fatigue_per_impression: float  # acceptance logit lost per marketing impression in the window
    fatigue_days: float
    holdings_change: bool  # acceptance changes the customer; an action is accepted at most once
    accepted_now: float  # of acceptances: reported within minutes
    accepted_late: float  # ... reported 1 to ``late_days`` days later (the rest: never reported)
    late_days: float
    rejected: float  # of the others: rejected (within minutes)
    ignored: float  # ... reported as ignored (within the hour); the rest never answer
    drift_shift: float  # logit moved by the drift (0: no drift)
    drift_at: float  # share of the run after which the drift holds
    new_actions: tuple[str, ...]  # go live mid-run
    new_actions_at: float  # share of the run after which they are live
    organic: bool = False  # customers take actions they were not shown (``organic_shift``)


REALISTIC = Realism("realistic", activity=(1.2, 1.8), fatigue_per_impression=0.3, fatigue_days=7.0,
                    holdings_change=True, accepted_now=0.55, accepted_late=0.35, late_days=6.0, rejected=0.3,
                    ignored=0.3, drift_shift=1.0, drift_at=0.5, new_actions=NEW_ACTIONS, new_actions_at=1 / 3)
IDEAL = Realism("ideal", activity=None, fatigue_per_impression=0.0, fatigue_days=7.0, holdings_change=False,
                accepted_now=1.0, accepted_late=0.0, late_days=0.0, rejected=0.3, ignored=0.7, drift_shift=0.0,
                drift_at=1.0, new_actions=(), new_actions_at=1.0)
UPLIFT = replace(REALISTIC, name="uplift", organic=True)
REALISM = {"realistic": REALISTIC, "uplift": UPLIFT, "ideal": IDEAL}


def event_round(rounds: int, at: float) -> int | None:
    """The round from which a mid-run event holds (None: not within ``rounds``)."""
    if at >= 1.0 or rounds < 2:
        return None
    return min(max(1, round(rounds * at)), rounds - 1)


@dataclass(frozen=True)
class Drift:
    segment: int  # code into CATEGORICAL["segment"]
    up: str  # action type that gains
    down: str  # action type that loses
    shift: float

    def describe(self) -> str:
        return (f"segment {CATEGORICAL['segment'][self.segment]}: {self.up} {self.shift:+g}, "
                f"{self.down} {-self.shift:+g} (logit)")


def drift_of(laws: int, realism: Realism) -> Drift | None:
    if realism.drift_shift == 0:
        return None
    digest = hashlib.sha256(f"{laws}:drift".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    up, down = rng.choice(len(OFFER_TYPES), 2, replace=False)
    return Drift(int(rng.integers(len(CATEGORICAL["segment"]))), OFFER_TYPES[up], OFFER_TYPES[down],
                 realism.drift_shift)


@dataclass
class Draws:
    """The random numbers of one population's run, shared by every policy (common random numbers)."""

    active: np.ndarray  # (rounds, n) bool: the customer interacts that day
    channel: np.ndarray  # (rounds, n) channel index
    accept: np.ndarray  # (rounds, n) uniform: accepted when below the true probability
    outcome: np.ndarray  # (rounds, n) uniform: which response (and whether reported)
    delay: np.ndarray  # (rounds, n) uniform: when a late response lands
    seed: int = 0

    def organic(self, r: int, actions: int) -> np.ndarray:
        """(2, n, actions) uniforms of round ``r``: whether (below the daily hazard) and when and whether
        reported (the second) each organic purchase happens; a stream of its own, so the other draws are
        those of the worlds without it."""
        return np.random.default_rng([self.seed, 0x0E6A, r]).random((2, self.active.shape[1], actions))

    @classmethod
    def draw(cls, n: int, rounds: int, seed: int, realism: Realism) -> Draws:
        rng = np.random.default_rng([seed, 0xD1CE])
        if realism.activity is None:
            active = np.ones((rounds, n), dtype=bool)
        else:
            rate = rng.beta(*realism.activity, n)
            active = rng.random((rounds, n)) < rate
        mix = np.array([CHANNEL_MIX.get(ch, 0.0) for ch in CHANNELS])
        channel = rng.choice(len(CHANNELS), size=(rounds, n), p=mix / mix.sum())
        return cls(active, channel, rng.random((rounds, n)), rng.random((rounds, n)), rng.random((rounds, n)), seed)


@dataclass
class Response:
    """What a customer does about a presented action: ``outcome``, reported at ``at`` (None: never);
    an acceptance changes the customer at ``lands`` (when reported: then)."""

    accepted: bool
    outcome: str
    at: float | None
    lands: float | None = None


def response(realism: Realism, accepted: bool, u: float, v: float, now: float) -> Response:
    """The response to one presented action from the run's uniform draws ``u`` (which kind) and ``v`` (when)."""
    late = now + DAY * (1.0 + v * max(realism.late_days - 1.0, 0.0))
    if accepted:
        if u < realism.accepted_now:
            return Response(True, "accepted", now + 600.0, now + 600.0)
        if u < realism.accepted_now + realism.accepted_late:
            return Response(True, "accepted", late, late)
        return Response(True, "accepted", None, late)  # bought, but never attributed to the offer
    if u < realism.rejected:
        return Response(False, "rejected", now + 600.0)
    if u < realism.rejected + realism.ignored:
        return Response(False, "ignored", now + 3600.0)
    return Response(False, "ignored", None)


@dataclass
class Population:
    """One policy's copy of a population: the customers' current state and their hidden truth."""

    world: World
    actions: Sequence[ActionLike]
    realism: Realism
    drift: Drift | None = None
    logits: np.ndarray = field(init=False)  # (n, actions, channels) truth logit in the current state
    observed: np.ndarray = field(init=False)  # the same without the unobserved traits
    taken: np.ndarray = field(init=False)  # (n, actions) accepted already
    shown_at: np.ndarray = field(init=False)
    seen: list[deque] = field(init=False)  # per customer: times of recent marketing impressions
    index: dict[str, int] = field(init=False)
    types: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        w = self.world
        self.world = replace(w, numeric=w.numeric.copy(), products=w.products.copy(), consent=w.consent.copy(),
                             categorical={k: v.copy() for k, v in w.categorical.items()})
        self.index = {a.id: k for k, a in enumerate(self.actions)}
        self.types = np.array([a.type for a in self.actions])
        self.logits, self.observed = self._table(np.arange(self.world.size))
        self.taken = np.zeros((self.world.size, len(self.actions)), dtype=bool)
        self.shown_at = np.full((self.world.size, len(self.actions)), -np.inf)  # when each was last presented
        self.seen = [deque() for _ in range(self.world.size)]

    def _table(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, c = len(self.actions), len(CHANNELS)
        r = np.repeat(rows, a * c)
        action_idx = np.tile(np.repeat(np.arange(a), c), len(rows))
        channel_idx = np.tile(np.arange(c), len(rows) * a)
        shape = (len(rows), a, c)
        full, seen = true_logits(self.world, r, self.actions, action_idx, channel_idx)
        return full.reshape(shape), seen.reshape(shape)

    def row(self, customer_id: str) -> int:
        return int(customer_id[len(self.world.prefix):])

    def fatigue(self, i: int, now: float) -> int:
        """Marketing impressions of customer ``i`` in the fatigue window before ``now``."""
        seen, horizon = self.seen[i], now - self.realism.fatigue_days * DAY
        while seen and seen[0] < horizon:
            seen.popleft()
        return len(seen)

    def probability(self, i: int, action_ids: Sequence[str], channel: int, now: float, drifted: bool,
                    observed_only: bool = False) -> np.ndarray:
        """True acceptance probability of each action for customer ``i`` now (what only the oracle knows);
        ``observed_only``: the same without the unobserved traits (the best a model could learn)."""
        k = np.array([self.index[a] for a in action_ids], dtype=np.int64)
        logit = (self.observed if observed_only else self.logits)[i, k, channel].copy()
        if self.realism.fatigue_per_impression:
            logit -= self.realism.fatigue_per_impression * self.fatigue(i, now)
        if drifted and self.drift is not None and self.world.categorical["segment"][i] == self.drift.segment:
            kinds = self.types[k]
            logit += self.drift.shift * ((kinds == self.drift.up).astype(float) - (kinds == self.drift.down))
        p = 1.0 / (1.0 + np.exp(-logit))
        if self.realism.holdings_change:
            p[self.taken[i, k]] = 0.0
        return p

    def organic_probability(self, i: int | np.ndarray, drifted: bool) -> np.ndarray:
        """Per catalog action: the probability that customer ``i`` (or each of the customers ``i``, a row
        each) takes it within ``ORGANIC_WINDOW_DAYS`` without being shown it, in their current state (in
        the shop or on the web: the web channel's law)."""
        channel = CHANNELS.index("web")
        rows = np.atleast_1d(np.asarray(i, dtype=np.int64))
        a = len(self.actions)
        logit = self.logits[rows, :, channel] + organic_shift(self.world, np.repeat(rows, a),
                                                              np.tile(self.types, len(rows))).reshape(len(rows), a)
        if drifted and self.drift is not None:
            moved = self.drift.shift * ((self.types == self.drift.up).astype(float) - (self.types == self.drift.down))
            logit += np.outer(self.world.categorical["segment"][rows] == self.drift.segment, moved)
        p = 1.0 / (1.0 + np.exp(-logit))
        p[self.taken[rows]] = 0.0
        p[:, self.types == "service"] = 0.0  # customer care is given, not bought
        return p if np.ndim(i) else p[0]

    def organic_hazard(self, drifted: bool, now: float) -> np.ndarray:
        """(n, actions): the chance of an organic purchase today, compounding to ``organic_probability``
        over the window; 0 for an action shown to the customer within the last window."""
        p = self.organic_probability(np.arange(self.world.size), drifted)
        hazard = 1.0 - (1.0 - p) ** (1.0 / ORGANIC_WINDOW_DAYS)
        hazard[self.shown_at > now - ORGANIC_WINDOW_DAYS * DAY] = 0.0
        return hazard

    def presented(self, i: int, action_id: str, now: float) -> None:
        self.shown_at[i, self.index[action_id]] = now
        if self.types[self.index[action_id]] != "service":
            self.seen[i].append(now)

    def accepted(self, i: int, action_id: str) -> None:
        if self.realism.holdings_change:
            self.taken[i, self.index[action_id]] = True

    def apply(self, i: int, action_id: str) -> Profile | None:
        """The acceptance lands: change the customer; returns the new profile to store (None: no change)."""
        if not self.realism.holdings_change:
            return None
        effect = ACCEPT_EFFECTS.get(action_id)
        if not effect:
            return None
        w = self.world
        for product in effect.get("add", ()):
            w.products[i, _P[product]] = True
        plan = effect.get("plan")
        if plan:
            w.categorical["plan"][i] = _PLAN.index(plan)
            w.numeric[i, _N["data_allowance_gb"]] = _ALLOWANCE[plan]
        stage = effect.get("stage")
        if stage:
            w.categorical["lifecycle_stage"][i] = _STAGE.index(stage)
        for name, value in effect.get("set", {}).items():
            w.numeric[i, _N[name]] = value
        for name, factor in effect.get("scale", {}).items():
            w.numeric[i, _N[name]] *= factor
        full, seen = self._table(np.array([i]))
        self.logits[i], self.observed[i] = full[0], seen[0]
        return w.profile(i)
