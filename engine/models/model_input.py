"""The model's input rows: one customer block shared by all candidate actions, plus an action block.

Serving and training build rows with the same functions so the model sees one layout. Categorical
values are integer codes (index into their level list); an unknown or empty level is NaN (missing).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.features import ACTION_TYPES, CATEGORICAL, CHANNELS, DERIVED, NUMERIC, SETS
from engine.models.derived import derive
from engine.store.profiles import Profile

PRODUCTS = SETS["products"]
CUSTOMER_FEATURES: tuple[str, ...] = (
    NUMERIC + DERIVED + tuple(CATEGORICAL) + tuple(f"holds_{p}" for p in PRODUCTS)
)
ACTION_FEATURES: tuple[str, ...] = ("action", "action_type", "action_value", "channel")
FEATURES: tuple[str, ...] = CUSTOMER_FEATURES + ACTION_FEATURES
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(CATEGORICAL) + ("action", "action_type", "channel")
# Columns a catalog action fills (``ActionTable.rows`` order); all others are shared by the rows of a
# decision: the customer block and the channel.
ROW_FEATURES: tuple[int, ...] = tuple(FEATURES.index(f) for f in ACTION_FEATURES[:3])
CHANNEL_INDEX = FEATURES.index("channel")

_CAT_OFFSET = len(NUMERIC) + len(DERIVED)
_PROD_OFFSET = _CAT_OFFSET + len(CATEGORICAL)


def _code(levels: Sequence[str], value: str) -> float:
    try:
        return float(levels.index(value))
    except ValueError:
        return float("nan")


_LEVEL_CODES = {name: {level: float(i) for i, level in enumerate(levels)} for name, levels in CATEGORICAL.items()}
_NAN = float("nan")


def customer_block(profile: Profile, derived: np.ndarray | None = None) -> np.ndarray:
    """The customer part of a row (float64, CUSTOMER_FEATURES order)."""
    out = np.empty(len(CUSTOMER_FEATURES), dtype=np.float64)
    out[: len(NUMERIC)] = profile.numeric
    out[len(NUMERIC): _CAT_OFFSET] = derive(profile.numeric) if derived is None else derived
    categories = profile.categorical
    out[_CAT_OFFSET: _PROD_OFFSET] = [codes.get(categories.get(name, ""), _NAN) for name, codes in _LEVEL_CODES.items()]
    held = profile.sets.get("products", frozenset())
    out[_PROD_OFFSET:] = [p in held for p in PRODUCTS]
    return out


def customer_blocks(numeric: np.ndarray, categorical: dict[str, np.ndarray],
                    products: np.ndarray) -> np.ndarray:
    """Vectorised ``customer_block`` for many customers given as column arrays (training)."""
    n = numeric.shape[0]
    out = np.empty((n, len(CUSTOMER_FEATURES)), dtype=np.float64)
    out[:, : len(NUMERIC)] = numeric
    out[:, len(NUMERIC): _CAT_OFFSET] = derive(numeric)
    for i, name in enumerate(CATEGORICAL):
        out[:, _CAT_OFFSET + i] = categorical[name]
    out[:, _PROD_OFFSET:] = products
    return out


@dataclass(frozen=True)
class ActionTable:
    """Action-feature rows for a catalog, in the level order a model was trained with."""

    action_ids: tuple[str, ...]
    rows: np.ndarray  # (len(action_ids), 3): action code, type code, value

    @classmethod
    def build(cls, actions: Sequence, model_actions: Sequence[str]) -> ActionTable:
        rows = np.empty((len(actions), 3), dtype=np.float64)
        for i, a in enumerate(actions):
            rows[i] = (_code(model_actions, a.id), _code(ACTION_TYPES, a.type), float(a.value))
        return cls(tuple(a.id for a in actions), rows)


def assemble(customer: np.ndarray, actions: ActionTable, idx: np.ndarray, channel: str) -> np.ndarray:
    """Rows for customer x actions[idx] on ``channel``: C-contiguous float64 for the scorer."""
    x = np.empty((len(idx), len(FEATURES)), dtype=np.float64)
    x[:, : len(CUSTOMER_FEATURES)] = customer
    x[:, len(CUSTOMER_FEATURES): -1] = actions.rows[idx]
    x[:, -1] = _code(CHANNELS, channel)
    return x


def shared_row(customer: np.ndarray, channel: str) -> np.ndarray:
    """The row a decision's actions share: customer block and channel (action columns NaN, unused)."""
    x = np.empty(len(FEATURES), dtype=np.float64)
    x[: len(CUSTOMER_FEATURES)] = customer
    x[len(CUSTOMER_FEATURES): CHANNEL_INDEX] = np.nan
    x[CHANNEL_INDEX] = _code(CHANNELS, channel)
    return x


def feature_types() -> list[str]:
    """Per FEATURES entry: "categorical" (integer codes), "binary" (0/1) or "numeric"."""
    return ["categorical" if f in CATEGORICAL_FEATURES else "binary" if f.startswith("holds_") else "numeric"
            for f in FEATURES]


def feature_levels() -> dict[str, list[str]]:
    """Levels of each categorical feature, code i = levels[i] ("action" levels are per model)."""
    levels = {name: list(values) for name, values in CATEGORICAL.items()}
    levels["action_type"] = list(ACTION_TYPES)
    levels["channel"] = list(CHANNELS)
    return levels


def encode_features(x: np.ndarray) -> str:
    """The customer block of a row as logged with a decision: base64 of little-endian float32."""
    return base64.b64encode(np.asarray(x[: len(CUSTOMER_FEATURES)], dtype="<f4").tobytes()).decode()


def decode_features(text: str) -> np.ndarray:
    """Inverse of ``encode_features`` (float64, CUSTOMER_FEATURES order)."""
    block = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if block.shape != (len(CUSTOMER_FEATURES),):
        raise ValueError(f"features hold {block.size} values, want {len(CUSTOMER_FEATURES)}")
    return block.astype(np.float64)
