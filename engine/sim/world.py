"""The synthetic telecom world: customers plus a hidden ground-truth response model.

Everything is generated vectorised from seeds, so the same ``(customers, seed)`` always gives the same
customers. Two seeds matter: ``seed`` draws the *population* (who the customers are) and ``laws`` the
hidden *response laws* (how every action's acceptance depends on a customer), which two populations of
one market share. A model trained on one population is evaluated on another population under the same
laws (``engine.sim.simulate``). The ground truth is hidden from the engine: only responses drawn from
it (and recorded) reach training.

The kinds of world:

- ``realistic`` (the default): every customer also has unobserved traits (a general responsiveness and
  three latent tastes, drawn from their own random stream, never a feature nor in Redis) that move
  acceptance with per-action loadings: about a third of the variance of the acceptance logit comes from
  them, so no model of the observed features can reach the oracle's AUC. The dynamic parts (acceptance
  changes holdings, contact fatigue, delayed and missing responses, drift, new actions) are in
  ``engine.sim.dynamics``.
- ``uplift``: the realistic world whose customers also differ in what an offer *changes* (issue 31). Every
  customer and action has an *organic* probability: that the customer takes the action's product within
  the label window without being shown it (``organic_shift`` added to the treated logit on the web, where
  organic purchases happen). Most customers are *persuadable*:
  the organic logit is the treated one less ``ORGANIC_GAP`` (about one in twelve would buy anyway).
  ``SURE_THING_SHARE`` of them are *sure things* for up-sells, cross-sells and bundles (organic = treated:
  they buy what they buy whether shown it or not), ``SLEEPING_DOG_SHARE`` are *sleeping dogs* for
  retention offers and up-sells (organic = treated + ``SLEEPING_DOG_GAP``: a retention call or an upgrade
  pitch reminds a quiet customer to review the contract, and fewer stay or buy than if left alone). Who
  is which is a noisy function of observed features (``uplift_class``): frequent recent buyers tend to be
  sure things, long-tenured quiet customers sleeping dogs, so a model can learn it from the data. The
  organic purchases happen in ``engine.sim.dynamics`` and reach the engine as ``offer_accepted`` events.
- ``ideal``: acceptance is a fixed function of the observed features (no unobserved traits); the world
  before issue 16, kept for comparison.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import numpy as np

from engine.models.derived import derive
from engine.sim.telco import ACTION_TYPES, CATEGORICAL, CHANNELS, NUMERIC, SCHEMA, SETS
from engine.store.profiles import Profile

PRODUCTS = SETS["products"]
_N = {name: i for i, name in enumerate(NUMERIC)}
_STAGES = CATEGORICAL["lifecycle_stage"]
# Share of customers consenting per channel; a channel domain.yaml adds later: half of them.
CONSENT_SHARE = {"call_center": 0.92, "web": 0.97, "mobile_app": 0.8, "email": 0.6, "sms": 0.5, "branch": 0.95,
                 "pos": 0.95}
WORLDS = ("realistic", "uplift", "ideal")
LATENT_TRAITS = 4  # responsiveness, then three latent tastes
RESPONSIVENESS_SD = 0.8  # logit sd of the general responsiveness
LATENT_LOADING_SD = 0.6  # sd of each action's loading on each latent taste
PERSUADABLE, SURE_THING, SLEEPING_DOG = 0, 1, 2
SURE_THING_SHARE, SLEEPING_DOG_SHARE = 0.20, 0.15  # of the customers (of a large population; the draw is noisy)
ORGANIC_GAP = 2.5  # a persuadable customer's organic logit lies this far below the treated one
SLEEPING_DOG_GAP = 1.0  # a sleeping dog's organic logit lies this far above the treated one
SURE_THING_TYPES = frozenset({"upsell", "cross_sell", "bundle"})
SLEEPING_DOG_TYPES = frozenset({"retention", "upsell"})


class ActionLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def value(self) -> float: ...


def customer_id(i: int, prefix: str = "C") -> str:
    return f"{prefix}{i:07d}"


@dataclass
class World:
    """Column arrays for ``n`` customers (row i is customer ``customer_id(i)``)."""

    numeric: np.ndarray  # (n, len(NUMERIC)) float32
    categorical: dict[str, np.ndarray]  # name -> (n,) int codes into CATEGORICAL[name]
    products: np.ndarray  # (n, len(PRODUCTS)) bool
    consent: np.ndarray  # (n, len(CHANNELS)) bool
    seed: int  # the population's seed
    laws: int = -1  # seed of the hidden response laws (-1: the population's seed)
    kind: str = "realistic"
    latent: np.ndarray = field(default_factory=lambda: np.zeros((0, LATENT_TRAITS)))  # (n, 4): never observed
    uplift: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))  # (n,) uplift class; () but uplift
    prefix: str = "C"  # customer ids are prefix + 7 digits

    def __post_init__(self) -> None:
        if self.laws < 0:
            self.laws = self.seed

    @property
    def size(self) -> int:
        return self.numeric.shape[0]

    def profile(self, i: int) -> Profile:
        open_cases = int(self.numeric[i, _N["open_cases"]])
        return Profile(
            customer_id=customer_id(i, self.prefix),
            numeric=self.numeric[i].copy(),
            categorical={k: CATEGORICAL[k][v[i]] for k, v in self.categorical.items()},
            sets={
                "products": frozenset(p for p, h in zip(PRODUCTS, self.products[i]) if h),
                "consent": frozenset(c for c, h in zip(CHANNELS, self.consent[i]) if h),
            },
            open_cases=tuple(f"CASE-{i}-{k}" for k in range(open_cases)),
        )

    def profiles(self) -> Iterator[Profile]:
        for i in range(self.size):
            yield self.profile(i)

    def true_propensity(self, rows: np.ndarray, actions: Sequence[ActionLike],
                        action_idx: np.ndarray, channel_idx: np.ndarray) -> np.ndarray:
        """Hidden acceptance probability of ``actions[action_idx[k]]`` for customer ``rows[k]``."""
        return _truth(self, rows, actions, action_idx, channel_idx)


def population_seeds(world_seed: int) -> tuple[int, int]:
    """(training population seed, evaluated population seed) of a world seed: both under the laws
    ``world_seed``. They are ``1_000_003 * s + 1`` and ``+ 2``: different residues modulo a prime larger
    than the offsets, so no world seed's training population is any world seed's evaluated one."""
    base = 1_000_003 * world_seed
    return base + 1, base + 2


def generate(n: int, seed: int = 7, kind: str = "realistic", laws: int | None = None, prefix: str = "C") -> World:
    """``n`` customers of population ``seed`` under the response laws ``laws`` (default: ``seed``).
    The observed columns depend on ``seed`` and ``n`` only; the unobserved traits come from their own
    random stream, so the ideal and the realistic world of one seed have the same observed customers."""
    if kind not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {kind!r}")
    world = _observed(n, seed)
    world.laws = seed if laws is None else laws
    world.kind = kind
    world.prefix = prefix
    latent = np.random.default_rng([seed, 0x1A7E]).normal(0.0, 1.0, (n, LATENT_TRAITS))
    world.latent = latent if kind != "ideal" else np.zeros((n, LATENT_TRAITS))
    world.uplift = uplift_class(world) if kind == "uplift" else np.zeros(n, dtype=np.int8)
    return world


def uplift_class(world: World) -> np.ndarray:
    """Each customer's class (``PERSUADABLE``, ``SURE_THING``, ``SLEEPING_DOG``): a score of observed
    features plus noise of their own stream, cut at fixed thresholds of the reference population's scores
    (so the shares do not depend on who or how many are generated)."""
    sure, dog = _class_scores(world.numeric, np.random.default_rng([world.seed, 0x5EED]), world.size)
    sure_cut, dog_cut = _class_cuts()
    out = np.full(world.size, PERSUADABLE, dtype=np.int8)
    out[dog > dog_cut] = SLEEPING_DOG
    out[(sure > sure_cut) & (out == PERSUADABLE)] = SURE_THING
    return out


def _class_scores(numeric: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    num = numeric.astype(np.float64)
    mean, std = _trait_scale()
    z = {t: (num[:, _N[t]] - mean[k]) / std[k] for k, t in enumerate(_TRAITS)}
    purchases = num[:, _N["purchases_12m"]]
    recent = -np.log1p(num[:, _N["days_since_last_purchase"]]) + 4.5
    quiet = -(num[:, _N["support_calls_90d"]] + num[:, _N["complaints_90d"]])
    noise = rng.normal(0.0, 0.6, (2, n))
    sure = 0.5 * (purchases - 2.5) + 0.6 * recent + 0.4 * z["monthly_spend"] + noise[0]
    dog = 0.8 * z["tenure_months"] + 0.7 * quiet - 0.5 * z["nps"] + noise[1]
    return sure, dog


@cache
def _class_cuts() -> tuple[float, float]:
    ref = _observed(20_000, 0)
    sure, dog = _class_scores(ref.numeric, np.random.default_rng([0, 0x5EED]), ref.size)
    dog_cut = float(np.quantile(dog, 1 - SLEEPING_DOG_SHARE))
    rest = sure[dog <= dog_cut]
    return float(np.quantile(rest, 1 - SURE_THING_SHARE / (1 - SLEEPING_DOG_SHARE))), dog_cut


def organic_shift(world: World, rows: np.ndarray, types: np.ndarray) -> np.ndarray:
    """What to add to the treated logit of an action of type ``types[k]`` for customer ``rows[k]`` to get
    the organic logit (the customer takes it without being shown it)."""
    shift = np.full(len(rows), -ORGANIC_GAP)
    if not len(world.uplift):
        return shift
    cls = world.uplift[rows]
    shift[(cls == SURE_THING) & np.isin(types, list(SURE_THING_TYPES))] = 0.0
    shift[(cls == SLEEPING_DOG) & np.isin(types, list(SLEEPING_DOG_TYPES))] = SLEEPING_DOG_GAP
    return shift


def _observed(n: int, seed: int) -> World:
    rng = np.random.default_rng(seed)
    num = np.zeros((n, len(NUMERIC)), dtype=np.float64)

    def col(name: str) -> np.ndarray:
        return num[:, _N[name]]

    stage = rng.choice(len(_STAGES), size=n, p=[0.08, 0.12, 0.30, 0.15, 0.25, 0.10])
    prospect = stage == _STAGES.index("prospect")
    declining = stage == _STAGES.index("declining")
    new = stage == _STAGES.index("new")

    age = np.clip(rng.normal(44, 15, n), 18, 88).round()
    segment = np.where(age < 25, 1, np.where(age > 67, 2, rng.choice([0, 3, 4], size=n, p=[0.55, 0.3, 0.15])))
    plan = np.where(prospect, 0, rng.choice([1, 2, 3, 4], size=n, p=[0.15, 0.25, 0.4, 0.2]))
    tenure = np.where(prospect, 0, np.where(new, rng.integers(0, 7, n), rng.integers(6, 150, n)))
    allowance = np.array([0, 5, 20, 40, 1000], dtype=float)[plan]
    usage = np.where(plan == 4, rng.gamma(4, 8, n), allowance * rng.beta(4, 3, n) * 1.15)

    products = np.zeros((n, len(PRODUCTS)), dtype=bool)
    p = {name: i for i, name in enumerate(PRODUCTS)}
    products[:, p["mobile"]] = ~prospect
    products[:, p["broadband"]] = ~prospect & (rng.random(n) < 0.45)
    products[:, p["fiber"]] = products[:, p["broadband"]] & (rng.random(n) < 0.4)
    products[:, p["tv"]] = ~prospect & (rng.random(n) < 0.3)
    products[:, p["fixed_voice"]] = products[:, p["broadband"]] & (rng.random(n) < 0.35)
    for name, share in (("device_insurance", 0.2), ("streaming", 0.25), ("cloud_storage", 0.15),
                        ("roaming_pack", 0.1), ("security_suite", 0.12), ("smart_home", 0.05)):
        products[:, p[name]] = ~prospect & (rng.random(n) < share)
    products[:, p["family_plan"]] = ~prospect & (segment == 3) & (rng.random(n) < 0.5)

    extras = products.sum(axis=1) * 9.0
    spend = np.where(prospect, 0, np.array([0, 15, 25, 45, 70])[plan] + extras + rng.normal(0, 6, n)).clip(0)
    lines = np.where(prospect, 0, 1 + rng.poisson(np.where(segment == 3, 1.5, 0.3)))
    fraud = ~prospect & (rng.random(n) < 0.005)
    new_lines = np.where(fraud, rng.integers(5, 49, n), (rng.random(n) < 0.04).astype(int))
    complaints = rng.poisson(np.where(declining, 1.2, 0.25))
    failed = rng.poisson(np.where(declining, 0.6, 0.12))
    cases = (~prospect & (rng.random(n) < np.where(complaints > 0, 0.3, 0.04))).astype(int)
    days = np.where(prospect, 999, rng.exponential(140, n)).round()
    purchases = np.where(prospect, 0, rng.poisson(2.5, n))
    revenue = spend * 12 * rng.lognormal(-0.8, 1.3, n) + purchases * rng.lognormal(4.0, 2.1, n)
    contract_left = np.where(prospect | (plan == 1), 0, rng.integers(0, 25, n))
    trend = rng.normal(np.where(declining, -0.15, 0.02), 0.08, n)
    churn = 1 / (1 + np.exp(-(-2.2 + 0.6 * complaints + 0.5 * failed + 1.6 * declining
                              - tenure / 80 - 3 * trend + 0.8 * (contract_left < 3))))
    churn = np.where(prospect, 0, churn)

    col("tenure_months")[:] = tenure
    col("age")[:] = age
    col("monthly_spend")[:] = spend.round(2)
    col("spend_trend")[:] = trend.round(3)
    col("data_usage_gb")[:] = usage.round(2)
    col("data_allowance_gb")[:] = allowance
    col("voice_minutes")[:] = np.where(prospect, 0, rng.gamma(2, 150, n)).round()
    col("device_age_months")[:] = np.where(prospect, 0, rng.integers(0, 60, n))
    col("contract_months_left")[:] = contract_left
    col("num_lines")[:] = lines
    col("new_lines_30d")[:] = new_lines
    col("complaints_90d")[:] = complaints
    col("failed_payments_90d")[:] = failed
    col("support_calls_90d")[:] = rng.poisson(0.8 + complaints)
    col("open_cases")[:] = cases
    col("days_since_last_purchase")[:] = days
    col("purchases_12m")[:] = purchases
    col("revenue_12m")[:] = revenue.round(2)
    col("margin_12m")[:] = (revenue * rng.uniform(0.2, 0.45, n)).round(2)
    col("churn_risk")[:] = churn.round(3)
    col("credit_score")[:] = np.clip(rng.normal(680, 70, n), 300, 850).round()
    col("tv_hours_week")[:] = rng.gamma(2, 5, n).round(1)
    col("roaming_days_90d")[:] = rng.poisson(np.where(products[:, p["roaming_pack"]], 9, 1.5))
    col("nps")[:] = rng.integers(0, 11, n)

    # Value tiers: the top 20% by 12-month margin are A, the next 30% B.
    margin = col("margin_12m")
    order = np.argsort(-margin, kind="stable")
    tier = np.full(n, 2)
    tier[order[: n // 5]] = 0
    tier[order[n // 5: n // 2]] = 1

    consent = rng.random((n, len(CHANNELS))) < np.array([CONSENT_SHARE.get(c, 0.5) for c in CHANNELS])
    device_os = np.where(prospect, 0, rng.choice([1, 2, 3], size=n, p=[0.45, 0.5, 0.05]))
    categorical = {
        "plan": plan, "segment": segment, "lifecycle_stage": stage, "value_tier": tier,
        "region": rng.integers(0, len(CATEGORICAL["region"]), n), "device_os": device_os,
    }
    return World(numeric=num.astype(np.float32), categorical={k: v.astype(np.int16) for k, v in categorical.items()},
                 products=products, consent=consent, seed=seed)


_TYPE_BASE = {"upsell": -2.4, "cross_sell": -2.7, "bundle": -2.9, "retention": -2.2,
              "acquisition": -2.6, "service": -1.2}
# Standardised customer traits each action responds to with its own hidden weights.
_TRAITS = ("tenure_months", "age", "monthly_spend", "data_usage_gb", "device_age_months",
           "tv_hours_week", "roaming_days_90d", "num_lines", "credit_score", "nps")


@cache
def _action_weights(action_id: str, seed: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}:{action_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.normal(0, 0.55, len(_TRAITS))


@cache
def _latent_loadings(action_id: str, seed: int) -> np.ndarray:
    """An action's loadings on the unobserved traits: 1 on responsiveness (scaled), then three tastes."""
    digest = hashlib.sha256(f"{seed}:latent:{action_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.concatenate(([RESPONSIVENESS_SD], rng.normal(0, LATENT_LOADING_SD, LATENT_TRAITS - 1)))


@cache
def _stacked(of, action_ids: tuple[str, ...], laws: int) -> np.ndarray:
    """Per-action hidden weights (``_action_weights`` or ``_latent_loadings``) as one matrix."""
    return np.stack([of(a, laws) for a in action_ids])


@cache
def _trait_scale() -> tuple[np.ndarray, np.ndarray]:
    """Location and scale of the traits, from a fixed reference population: the laws must not depend
    on which (or how many) customers they are applied to."""
    ref = _observed(20_000, 0).numeric[:, [_N[t] for t in _TRAITS]].astype(np.float64)
    return ref.mean(0), ref.std(0) + 1e-9


def true_logit(world: World, rows: np.ndarray, actions: Sequence[ActionLike], action_idx: np.ndarray,
               channel_idx: np.ndarray) -> np.ndarray:
    """The hidden acceptance logit of ``actions[action_idx[k]]`` for customer ``rows[k]`` on channel
    ``channel_idx[k]`` in the customer's current state (holdings, plan...): observed traits and, in the
    realistic world, the unobserved ones. Dynamic terms (fatigue, drift) are ``engine.sim.dynamics``'."""
    return true_logits(world, rows, actions, action_idx, channel_idx)[0]


def true_logits(world: World, rows: np.ndarray, actions: Sequence[ActionLike], action_idx: np.ndarray,
                channel_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``true_logit``, the same without the unobserved traits): the second is the best any model of the
    observed features could learn."""
    observed = _observed_logit(world, rows, actions, action_idx, channel_idx)
    if world.kind == "ideal" or not len(world.latent):
        return observed, observed
    loadings = _stacked(_latent_loadings, tuple(a.id for a in actions), world.laws)
    return observed + (world.latent[rows] * loadings[action_idx]).sum(axis=1), observed


def _truth(world: World, rows: np.ndarray, actions: Sequence[ActionLike], action_idx: np.ndarray,
           channel_idx: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-true_logit(world, rows, actions, action_idx, channel_idx)))


def _observed_logit(world: World, rows: np.ndarray, actions: Sequence[ActionLike], action_idx: np.ndarray,
                    channel_idx: np.ndarray) -> np.ndarray:
    num = world.numeric[rows].astype(np.float64)
    derived = derive(num, SCHEMA)
    traits = np.stack([num[:, _N[t]] for t in _TRAITS], axis=1)
    mean, std = _trait_scale()
    z = (traits - mean) / std
    stage = world.categorical["lifecycle_stage"][rows]
    prospect = stage == _STAGES.index("prospect")
    declining = stage == _STAGES.index("declining")
    usage_ratio = np.clip(derived[:, 0], 0, 2)
    rfm = derived[:, 4] / 15.0
    churn = num[:, _N["churn_risk"]]
    cases = num[:, _N["open_cases"]] > 0
    held = world.products[rows].sum(axis=1)
    call_center = channel_idx == CHANNELS.index("call_center")
    email_sms = (channel_idx == CHANNELS.index("email")) | (channel_idx == CHANNELS.index("sms"))

    weights = _stacked(_action_weights, tuple(a.id for a in actions), world.laws)
    types = np.array([ACTION_TYPES.index(a.type) for a in actions])[action_idx]
    values = np.array([a.value for a in actions], dtype=float)[action_idx]
    logit = np.array([_TYPE_BASE[t] for t in ACTION_TYPES])[types] + (z * weights[action_idx]).sum(axis=1)
    by_type = {
        "upsell": 2.6 * (usage_ratio - 0.7) + 0.8 * (rfm - 0.5) - 1.5 * declining,
        "cross_sell": 1.2 * (rfm - 0.5) + 0.25 * (held - 3) - 1.0 * declining,
        "bundle": 0.45 * (held - 2) - 0.8 * declining,
        "retention": 4.0 * churn - 0.8 + 0.6 * call_center,
        "acquisition": np.where(prospect, 1.6, -2.5),
        "service": np.where(cases, 3.2, -1.0) + 0.5 * call_center,
    }
    for t, term in by_type.items():
        mask = types == ACTION_TYPES.index(t)
        logit[mask] += np.broadcast_to(term, logit.shape)[mask]
    logit += -0.35 * np.log1p(values / 40.0) - 0.4 * email_sms
    return logit
