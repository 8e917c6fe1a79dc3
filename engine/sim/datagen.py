"""Synthetic customers and offer history for any declared domain, driven only by its ``FeatureSchema``.

``domain.yaml`` says what a customer is; this module makes up a population of them and a history of
past offers and outcomes, for demos, for a first model and for import tests of a business that has no
data yet. It knows no attribute, channel or action by name: everything follows from the schema's
types, bounds, defaults, levels and members, and from the catalog's actions.

- ``customers(schema, n, seed, now)``: one row per customer, ``customer_id`` then one column per stored
  attribute (numbers in packed order, dates as calendar days, categories, then the sets ``products``
  and ``consent`` as ``;``-joined members).
- ``history(schema, actions, customers_table, n_per_customer, seed, now)``: one row per presentation
  of an action on a channel in the 90 days before ``now``, with its outcome.
- ``write(table, path)``: CSV (``.csv``) or Parquet (``.parquet``, ``.pq``) by the file's suffix.

The world behind the data:

- Every customer has four correlated **hidden traits** (affluence, digital engagement, financial strain,
  maturity), a function of the customer id alone: ``history`` recovers them from the id, and they are
  never written anywhere. Every attribute is drawn from a latent score that loads on the traits (the
  loadings drawn per attribute name from ``seed``) plus noise, so attributes are correlated with each
  other the way a population's are.
- Numbers get a shape from their declared bounds: a fraction (a span of at most 1) is skewed low; a
  signed range (a balance that may go negative) is mostly positive on a log scale with a thin negative
  tail; a wide range (the top 1,000 times the bottom or more) is log-scaled; a narrow range whose
  default is its minimum is a count (a share at the minimum, a long tail); other narrow ranges are bell
  shaped (a score). Integer bounds spanning at most 1,000 give integers. Declare ``min`` and ``max`` for
  plausible values: a number with one bound or none gets a generic scale.
- Dates fall in the ``DATE_YEARS`` before ``now``; a few are unknown (null).
- Acceptance follows a **hidden logistic model**: per action a base rate (service types higher), weights
  on a few observed features, loadings on the hidden traits and a small per-channel effect, all drawn
  from ``laws`` (so two populations can share one market's laws). Only outcomes drawn from it are
  written; the probabilities are the generator's truth.

Everything is drawn from seeded generators keyed by names (attribute, action, channel), so the same
arguments give the same tables, and adding an attribute or an action does not change the others' draws.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pa_parquet  # type: ignore[import-untyped, unused-ignore]

from engine.features import CONSENT, FeatureSchema

__all__ = ["OUTCOMES", "customers", "hidden_traits", "history", "main", "write"]

DAY = 86_400.0
DATE_YEARS = 6  # dates fall within this many years before ``now``
MISSING_DATE_SHARE = 0.04  # of each date attribute: unknown
HISTORY_DAYS = 90  # presentations fall within this many days before ``now``
OUTCOMES = ("impression", "accepted", "rejected", "ignored")
# Of the presentations not accepted: rejected, then ignored; the rest are impressions with no response.
REJECTED_SHARE, IGNORED_SHARE = 0.3, 0.45
SEPARATOR = ";"
# The hidden response model: each feature has a weight for an action with this chance; all the weights
# together move an action's acceptance logit by about FEATURE_SD (sd over customers), the traits by
# about TRAIT_SD per trait.
WEIGHT_SHARE = 0.25
FEATURE_SD = 0.9
TRAIT_SD = 0.45

TRAITS = ("affluence", "engagement", "strain", "maturity")
_TRAIT_CORRELATION = np.array([
    [1.00, 0.25, -0.50, 0.40],
    [0.25, 1.00, -0.10, -0.30],
    [-0.50, -0.10, 1.00, -0.20],
    [0.40, -0.30, -0.20, 1.00],
])
_TRAIT_CHOLESKY = np.linalg.cholesky(_TRAIT_CORRELATION)
_TRAIT_KEY = b"nba-datagen-hidden-traits"


class ActionLike(Protocol):
    """What ``history`` needs of a catalog action (``engine.rules.model.Action`` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def channels(self) -> Mapping[str, object]: ...


# --- seeded helpers ---------------------------------------------------------------------------------
def _rng(seed: int, *names: str) -> np.random.Generator:
    """A generator for ``seed`` and a path of names: the same names always draw the same numbers."""
    digest = hashlib.sha256("\0".join(names).encode()).digest()
    return np.random.default_rng([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int.from_bytes(digest[:8], "little")])


def _phi(x: np.ndarray) -> np.ndarray:
    """The standard normal CDF (its logistic approximation, within 0.01)."""
    return 1.0 / (1.0 + np.exp(-1.702 * x))


def _epoch(now: float | datetime | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return (now if now.tzinfo else now.replace(tzinfo=UTC)).timestamp()
    return float(now)


def hidden_traits(ids: Sequence[str]) -> np.ndarray:
    """The hidden traits of customers (rows) as correlated standard normals (columns: ``TRAITS``),
    a function of each customer id alone."""
    if not len(ids):
        return np.zeros((0, len(TRAITS)))
    raw = b"".join(hashlib.blake2b(str(i).encode(), digest_size=32, key=_TRAIT_KEY).digest() for i in ids)
    bits = np.frombuffer(raw, dtype="<u8").reshape(-1, 4)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53  # in (0, 1)
    radius = np.sqrt(-2.0 * np.log(u[:, [0, 2]]))
    angle = 2.0 * np.pi * u[:, [1, 3]]
    z = np.column_stack((radius[:, 0] * np.cos(angle[:, 0]), radius[:, 0] * np.sin(angle[:, 0]),
                         radius[:, 1] * np.cos(angle[:, 1]), radius[:, 1] * np.sin(angle[:, 1])))
    return z @ _TRAIT_CHOLESKY.T


def _latent(rng: np.random.Generator, traits: np.ndarray, share: tuple[float, float],
            lean: np.ndarray | None = None) -> np.ndarray:
    """A standard normal score per customer: a share of its variance from the traits (loadings drawn
    from ``rng``, plus ``lean``), the rest noise."""
    loadings = rng.normal(0.0, 1.0, len(TRAITS))
    if lean is not None:
        loadings = loadings * 0.5 + lean
    scale = float(np.sqrt(loadings @ _TRAIT_CORRELATION @ loadings)) or 1.0
    r2 = rng.uniform(*share)
    noise = rng.standard_normal(traits.shape[0])
    return np.sqrt(r2) * (traits @ loadings) / scale + np.sqrt(1.0 - r2) * noise


# --- customers --------------------------------------------------------------------------------------
def _shape(low: float | None, high: float | None, default: float) -> str:
    if low is None and high is None:
        return "normal"
    if low is None or high is None:
        return "wide" if low is not None else "score"
    span = high - low
    if span <= 1:
        return "fraction"
    if low < 0 < high:
        return "signed"
    if low >= 0 and high >= 1000 * max(low, 1.0):
        return "wide"
    return "count" if default == low else "score"


_AFFLUENT = np.array([1.0, 0.0, 0.0, 0.0])  # amounts lean on affluence


def _log_scale(v: np.ndarray, low: float, high: float) -> np.ndarray:
    """``v`` in [0, 1] to [low, high] (low >= 0) on a log scale, the middle of ``v`` well inside."""
    a, b = np.log1p(low), np.log1p(high)
    return np.expm1(a + (b - a) * (0.35 + 0.55 * v))


def _number(name: str, schema: FeatureSchema, traits: np.ndarray, seed: int) -> np.ndarray:
    low, high = schema.bounds.get(name, (None, None))
    default = float(schema.defaults.get(name, 0.0))
    shape = _shape(low, high, default)
    rng = _rng(seed, "number", name)
    shares = _rng(seed, "number", name, "shares")  # apart from the per-customer draws: a prefix of n is stable
    s = _latent(rng, traits, (0.25, 0.7), _AFFLUENT if shape in ("wide", "signed") else None)
    u = _phi(s)
    if shape == "normal":
        return np.round(default + s * max(1.0, abs(default)), 2) + 0.0
    if low is not None:
        lo = float(low)
        hi = float(high) if high is not None else lo + 1000.0
    else:
        hi = float(high if high is not None else 0.0)
        lo = hi - 1000.0
    span = hi - lo
    if shape == "fraction":
        values = lo + span * _phi(0.9 * s - 0.7)
    elif shape == "score":
        values = lo + span * _phi(0.6 * s - 0.2)
    elif shape == "count":
        zero = shares.uniform(0.15, 0.6)
        v = np.clip((u - zero) / (1.0 - zero), 0.0, 1.0)
        values = np.where(u < zero, lo, lo + span * 0.75 * v**3)
    elif shape == "wide":
        zero = shares.uniform(0.0, 0.3) if default == lo else 0.0
        v = np.clip((u - zero) / (1.0 - zero), 0.0, 1.0)
        values = np.where(u < zero, lo, _log_scale(v, max(lo, 0.0), hi))
    else:  # signed: mostly positive on a log scale, a thin tail below zero
        negative = shares.uniform(0.05, 0.15)
        v = np.clip((u - negative) / (1.0 - negative), 0.0, 1.0)
        below = lo * ((negative - np.minimum(u, negative)) / negative) ** 3
        above = _log_scale(v, 0.0, hi) if hi >= 1000 else hi * v**1.5
        values = np.where(u < negative, below, above)
    integral = lo.is_integer() and hi.is_integer() and span <= 1000 and shape != "fraction"
    values = np.round(values, 3 if shape == "fraction" else 0 if integral else 2) + 0.0  # + 0.0: no -0
    return np.clip(values, low if low is not None else -np.inf, high if high is not None else np.inf)


def _date(name: str, traits: np.ndarray, seed: int, today: int) -> np.ndarray:
    """Days since 1970-01-01 within ``DATE_YEARS`` before ``today``; NaN for the unknown ones."""
    rng = _rng(seed, "date", name)
    u = _phi(_latent(rng, traits, (0.2, 0.5)))
    days = today - np.floor(DATE_YEARS * 365 * u**1.3)
    unknown = _rng(seed, "date", name, "unknown").random(traits.shape[0]) < MISSING_DATE_SHARE
    return np.where(unknown, np.nan, days)


def _category(name: str, levels: tuple[str, ...], default: str, traits: np.ndarray, seed: int) -> np.ndarray:
    """Level indexes: level shares drawn per attribute (the default level gets a good one), assigned by
    a latent score so that categories go with the traits."""
    rng = _rng(seed, "category", name)
    weights = rng.gamma(1.5, 1.0, len(levels))
    if default in levels:
        weights[levels.index(default)] += weights.max()
    order = rng.permutation(len(levels))
    cumulative = np.cumsum(weights[order]) / weights.sum()
    u = _phi(_latent(rng, traits, (0.2, 0.5)))
    return order[np.minimum(np.searchsorted(cumulative, u, side="right"), len(levels) - 1)]


def _members(set_name: str, members: tuple[str, ...], traits: np.ndarray, seed: int) -> np.ndarray:
    """A boolean matrix (customers x members): consent is common, products less so."""
    rates = (0.55, 0.9) if set_name == CONSENT else (0.08, 0.6)
    out = np.zeros((traits.shape[0], len(members)), dtype=bool)
    for j, member in enumerate(members):
        rng = _rng(seed, "set", set_name, member)
        rate = rng.uniform(*rates)
        out[:, j] = _phi(_latent(rng, traits, (0.2, 0.5))) > 1.0 - rate
    return out


def _joined(held: np.ndarray, members: tuple[str, ...]) -> list[str]:
    return [SEPARATOR.join(m for m, h in zip(members, row) if h) for row in held.tolist()]


def customers(schema: FeatureSchema, n: int, seed: int, now: float | datetime | None = None,
              prefix: str = "C") -> pa.Table:
    """``n`` synthetic customers of ``schema`` (ids ``C0000000``...; ``prefix`` for another letter):
    ``customer_id``, the stored numbers and dates in packed order (dates as date32, null when unknown),
    the categories, then each set (``products``, ``consent``) as ``;``-joined members. ``now`` (epoch
    seconds or a datetime; default the real clock) is the moment the dates lead up to."""
    if n < 0:
        raise ValueError("n must not be negative")
    ids = [f"{prefix}{i:07d}" for i in range(n)]
    traits = hidden_traits(ids)
    today = int(_epoch(now) // DAY)
    columns: dict[str, pa.Array] = {"customer_id": pa.array(ids, type=pa.string())}
    for name in schema.numeric:
        if name in schema.dates:
            days = _date(name, traits, seed, today)
            mask = np.isnan(days)
            columns[name] = pa.array(np.where(mask, 0, days).astype(np.int32), type=pa.date32(), mask=mask)
        else:
            columns[name] = pa.array(_number(name, schema, traits, seed).astype(np.float64), type=pa.float64())
    for name, levels in schema.categorical.items():
        index = _category(name, levels, str(schema.defaults.get(name, "")), traits, seed)
        columns[name] = pa.array(np.array(levels, dtype=object)[index].tolist(), type=pa.string())
    for name, members in schema.sets.items():
        columns[name] = pa.array(_joined(_members(name, members, traits, seed), members), type=pa.string())
    return pa.table(columns)


# --- history ----------------------------------------------------------------------------------------
def _standardize(x: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(x), x, np.nan)
    mean = np.nanmean(x) if np.isfinite(x).any() else 0.0
    sd = np.nanstd(x) if np.isfinite(x).any() else 0.0
    return np.nan_to_num((x - mean) / sd if sd > 0 else x - mean, nan=0.0)


def _split(column: Iterable[str | None]) -> list[set[str]]:
    return [set(v.split(SEPARATOR)) if v else set() for v in column]


def _features(schema: FeatureSchema, table: pa.Table, today: float) -> tuple[list[str], np.ndarray]:
    """The observed features the truth may weigh (standardized): numbers, days since each date,
    category levels and products held; their names for keying the weights."""
    names: list[str] = []
    cols: list[np.ndarray] = []
    present = set(table.column_names)
    for name in schema.numeric:
        if name not in present:
            continue
        if name in schema.dates:
            days = table.column(name).cast(pa.int32()).to_numpy(zero_copy_only=False)
            values = today - np.asarray(days, dtype=np.float64)
        else:
            values = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        names.append(name)
        cols.append(_standardize(values))
    for name, levels in schema.categorical.items():
        if name not in present:
            continue
        values = np.array(table.column(name).to_pylist(), dtype=object)
        for level in levels:
            names.append(f"{name}={level}")
            cols.append(_standardize((values == level).astype(np.float64)))
    for name, members in schema.sets.items():
        if name == CONSENT or name not in present:
            continue
        held = _split(table.column(name).to_pylist())
        for member in members:
            names.append(f"{name}:{member}")
            cols.append(_standardize(np.array([member in h for h in held], dtype=np.float64)))
    n = table.num_rows
    return names, (np.column_stack(cols) if cols else np.zeros((n, 0)))


def _truth(schema: FeatureSchema, actions: Sequence[ActionLike], features: list[str], channels: Sequence[str],
           laws: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The hidden laws: per action a bias, feature weights (most 0), trait loadings; per action and
    channel an offset."""
    bias = np.zeros(len(actions))
    weight_sd = FEATURE_SD / np.sqrt(max(1.0, WEIGHT_SHARE * len(features)))
    weights = np.zeros((len(actions), len(features)))
    loadings = np.zeros((len(actions), len(TRAITS)))
    offsets = np.zeros((len(actions), len(channels)))
    for i, action in enumerate(actions):
        rng = _rng(laws, "action", action.id)
        bias[i] = rng.uniform(-4.2, -2.2) + (0.7 if action.type in schema.service_types else 0.0)
        loadings[i] = rng.normal(0.0, TRAIT_SD, len(TRAITS))
        for j, feature in enumerate(features):
            w = _rng(laws, "weight", action.id, feature)
            if w.random() < WEIGHT_SHARE:
                weights[i, j] = w.normal(0.0, weight_sd)
        for k, channel in enumerate(channels):
            offsets[i, k] = _rng(laws, "channel", action.id, channel).normal(0.0, 0.3)
    return bias, weights, loadings, offsets


def _iso(seconds: np.ndarray) -> list[str]:
    stamps = np.datetime_as_string(np.floor(seconds).astype("int64").astype("datetime64[s]"), unit="s")
    return [f"{s}Z" for s in stamps.tolist()]


def history(schema: FeatureSchema, actions: Sequence[ActionLike], customers_table: pa.Table, n_per_customer: int,
            seed: int, now: float | datetime | None = None, *, laws: int = 0) -> pa.Table:
    """Past presentations and outcomes: columns ``customer_id``, ``action_id``, ``channel``, ``ts`` (ISO UTC,
    within ``HISTORY_DAYS`` before ``now``), ``outcome`` (one of ``OUTCOMES``: accepted, rejected,
    ignored, or an impression without a response), sorted by time.

    Each customer is shown ``n_per_customer`` actions, each on one of the action's channels (in the
    schema); an action whose type needs consent only on a channel the customer consented to (a few
    draws find none and are left out). Acceptance follows the hidden logistic model drawn from ``laws``.
    """
    channels = list(schema.channel_names)
    channel_index = {c: k for k, c in enumerate(channels)}
    usable = [a for a in actions if any(c in channel_index for c in a.channels)]
    ids = customers_table.column("customer_id").to_pylist() if customers_table.num_rows else []
    n = len(ids)
    if not usable or n == 0 or n_per_customer <= 0:
        return _history_table([], [], [], [], [])
    moment = _epoch(now)
    features, x = _features(schema, customers_table, moment / DAY)
    bias, weights, loadings, offsets = _truth(schema, usable, features, channels, laws)
    traits = hidden_traits(ids)
    if CONSENT in customers_table.column_names:
        consented = _split(customers_table.column(CONSENT).to_pylist())
        consent = np.array([[c in row for c in channels] for row in consented], dtype=bool).reshape(n, len(channels))
    else:
        consent = np.ones((n, len(channels)), dtype=bool)
    needs = np.array([a.type not in schema.service_types for a in usable])
    options = [[channel_index[c] for c in a.channels if c in channel_index] for a in usable]
    counts = np.array([len(o) for o in options])
    table = np.zeros((len(usable), counts.max()), dtype=np.int64)
    for i, o in enumerate(options):
        table[i, : len(o)] = o

    rng = _rng(seed, "history")
    rows = n * n_per_customer
    who = np.repeat(np.arange(n), n_per_customer)
    act = np.zeros(rows, dtype=np.int64)
    chan = np.zeros(rows, dtype=np.int64)
    todo = np.ones(rows, dtype=bool)
    for _ in range(8):  # draw again where the channel lacks the consent the action needs
        k = int(todo.sum())
        if not k:
            break
        act[todo] = rng.integers(0, len(usable), k)
        chan[todo] = table[act[todo], (rng.random(k) * counts[act[todo]]).astype(np.int64)]
        todo = needs[act] & ~consent[who, chan]
    keep = ~todo
    who, act, chan = who[keep], act[keep], chan[keep]

    logit = bias[act] + np.einsum("ij,ij->i", x[who], weights[act]) + np.einsum("ij,ij->i", traits[who], loadings[act])
    logit += offsets[act, chan]
    accepted = rng.random(who.size) < 1.0 / (1.0 + np.exp(-logit))
    r = rng.random(who.size)
    outcome = np.where(accepted, 1, np.where(r < REJECTED_SHARE, 2, np.where(r < REJECTED_SHARE + IGNORED_SHARE, 3, 0)))
    ts = moment - rng.uniform(0.0, HISTORY_DAYS * DAY, who.size)
    order = np.lexsort((act, who, ts))
    action_ids = np.array([a.id for a in usable], dtype=object)
    return _history_table(np.array(ids, dtype=object)[who[order]].tolist(), action_ids[act[order]].tolist(),
                          np.array(channels, dtype=object)[chan[order]].tolist(), _iso(ts[order]),
                          np.array(OUTCOMES, dtype=object)[outcome[order]].tolist())


def _history_table(ids: list, action_ids: list, channels: list, ts: list, outcomes: list) -> pa.Table:
    return pa.table({"customer_id": pa.array(ids, type=pa.string()), "action_id": pa.array(action_ids, type=pa.string()),
                     "channel": pa.array(channels, type=pa.string()), "ts": pa.array(ts, type=pa.string()),
                     "outcome": pa.array(outcomes, type=pa.string())})


# --- files ------------------------------------------------------------------------------------------
def write(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as CSV (``.csv``) or Parquet (``.parquet``, ``.pq``), chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(f"{path}: write .csv, .parquet or .pq")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        pa_csv.write_csv(table, str(path))
    else:
        pa_parquet.write_table(table, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.sim.datagen RULES_DIR --customers N --out FILE [--history FILE]``."""
    from engine.rules.errors import RuleErrors
    from engine.rules.loader import load_domain_file, load_rules

    p = argparse.ArgumentParser(prog="python -m engine.sim.datagen", description=__doc__.split("\n\n")[0])
    p.add_argument("rules_dir", type=Path, help="a rule directory (its domain.yaml, and catalog.yaml for --history)")
    p.add_argument("--customers", type=int, default=1000, help="how many customers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="C", help="customer ids are this prefix and 7 digits")
    p.add_argument("--out", type=Path, required=True, help="customers file: .csv, .parquet or .pq")
    p.add_argument("--history", type=Path, help="also write past offers and outcomes to this file")
    p.add_argument("--per-customer", type=int, default=5, help="presentations per customer in --history")
    args = p.parse_args(argv)
    now = time.time()
    try:
        schema = load_domain_file(args.rules_dir)
    except RuleErrors as err:
        for e in err.errors:
            print(e.render(), file=sys.stderr)
        return 1
    table = customers(schema, args.customers, args.seed, now, prefix=args.prefix)
    print(f"{write(table, args.out)}: {table.num_rows} customers")
    if args.history:
        ruleset, errors = load_rules(args.rules_dir)
        if ruleset is None:
            for e in errors:
                print(e.render(), file=sys.stderr)
            return 1
        past = history(ruleset.schema, ruleset.actions, table, args.per_customer, args.seed, now)
        print(f"{write(past, args.history)}: {past.num_rows} presentations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
