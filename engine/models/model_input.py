"""The model's input rows: one customer block shared by all candidate actions, plus an action block.

Serving and training build rows with the same functions so the model sees one layout. Categorical
values are integer codes (index into their level list); an unknown or empty level is NaN (missing).
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.features import CONSENT, FeatureSchema
from engine.models.derived import derive
from engine.store.profiles import Profile

ACTION_FEATURES: tuple[str, ...] = ("action", "action_type", "action_value", "channel")
FEATURE_TYPES = ("numeric", "binary", "categorical")
_NAN = float("nan")


def _code(levels: Sequence[str], value: str) -> float:
    try:
        return float(levels.index(value))
    except ValueError:
        return _NAN


class ModelInput:
    """The row layout for one feature schema: the customer block (stored numbers, derived numbers,
    category codes, one 0/1 per member of each set attribute but consent: ``holds_<product>``,
    ``<set>__<member>``) then the action block (action, type, value) and the channel."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self._members = [(name, member) for name, members in schema.sets.items() if name != CONSENT
                         for member in members]
        self._binary = tuple(f"holds_{m}" if name == "products" else f"{name}__{m}" for name, m in self._members)
        self.customer_features: tuple[str, ...] = (
            schema.numeric + schema.derived + tuple(schema.categorical) + self._binary)
        self.features: tuple[str, ...] = self.customer_features + ACTION_FEATURES
        self.categorical_features: tuple[str, ...] = tuple(schema.categorical) + ("action", "action_type", "channel")
        # Columns a catalog action fills (``ActionTable.rows`` order); the others are shared by a decision's rows.
        self.row_features = row_columns(len(self.features))
        self.channel_index = self.features.index("channel")
        self._cat = len(schema.numeric) + len(schema.derived)
        self._prod = self._cat + len(schema.categorical)
        self._level_codes = {name: {level: float(i) for i, level in enumerate(levels)}
                             for name, levels in schema.categorical.items()}

    def customer_block(self, profile: Profile, derived: np.ndarray | None = None) -> np.ndarray:
        """The customer part of a row (float64, ``customer_features`` order)."""
        n = len(self.schema.numeric)
        out = np.empty(len(self.customer_features), dtype=np.float64)
        out[:n] = profile.numeric
        out[n: self._cat] = derive(profile.numeric, self.schema) if derived is None else derived
        categories = profile.categorical
        out[self._cat: self._prod] = [codes.get(categories.get(name, ""), _NAN) for name, codes in self._level_codes.items()]
        sets = profile.sets
        out[self._prod:] = [member in sets.get(name, ()) for name, member in self._members]
        return out

    def customer_blocks(self, numeric: np.ndarray, categorical: dict[str, np.ndarray], products: np.ndarray,
                        now: float | None = None) -> np.ndarray:
        """Vectorised ``customer_block`` for many customers given as column arrays (training); ``products``
        holds the 0/1 columns of every set attribute's members, in ``customer_features`` order."""
        n = len(self.schema.numeric)
        out = np.empty((numeric.shape[0], len(self.customer_features)), dtype=np.float64)
        out[:, :n] = numeric
        out[:, n: self._cat] = derive(numeric, self.schema, now)
        for i, name in enumerate(self.schema.categorical):
            out[:, self._cat + i] = categorical[name]
        out[:, self._prod:] = products
        return out

    def action_table(self, actions: Sequence, model_actions: Sequence[str],
                     model_types: Sequence[str] | None = None) -> ActionTable:
        """The catalog's action rows coded as a model was trained: its action and action type levels."""
        types = self.schema.type_names if model_types is None else model_types
        rows = np.empty((len(actions), 3), dtype=np.float64)
        for i, a in enumerate(actions):
            rows[i] = (_code(model_actions, a.id), _code(types, a.type), float(a.value))
        return ActionTable(tuple(a.id for a in actions), rows)

    def adapter(self, features: Sequence[str], levels: dict[str, list[str]]) -> Adapter | None:
        """How a shared row of this layout becomes the row of a model trained on ``features`` (by name,
        categories recoded by level name); None when the model was trained on this very layout."""
        if not features or (tuple(features) == self.features and all(
                levels.get(name) == values for name, values in self.feature_levels().items())):
            return None
        return Adapter(self.features, self.feature_levels(), features, levels)

    def assemble(self, customer: np.ndarray, actions: ActionTable, idx: np.ndarray, channel: str) -> np.ndarray:
        """Rows for customer x actions[idx] on ``channel`` (``customer``: one block, or one per row):
        C-contiguous float64 for the scorer."""
        x = np.empty((len(idx), len(self.features)), dtype=np.float64)
        x[:, : len(self.customer_features)] = customer
        x[:, len(self.customer_features): -1] = actions.rows[idx]
        x[:, -1] = _code(self.schema.channel_names, channel)
        return x

    def shared_row(self, customer: np.ndarray, channel: str) -> np.ndarray:
        """The row a decision's actions share: customer block and channel (action columns NaN, unused)."""
        x = np.empty(len(self.features), dtype=np.float64)
        x[: len(self.customer_features)] = customer
        x[len(self.customer_features): self.channel_index] = np.nan
        x[self.channel_index] = _code(self.schema.channel_names, channel)
        return x

    def feature_types(self) -> list[str]:
        """Per feature: "categorical" (integer codes), "binary" (0/1) or "numeric"."""
        binary = set(self._binary)
        return ["categorical" if f in self.categorical_features else "binary" if f in binary else "numeric"
                for f in self.features]

    def feature_levels(self) -> dict[str, list[str]]:
        """Levels of each categorical feature, code i = levels[i] ("action" levels are per model)."""
        levels = {name: list(values) for name, values in self.schema.categorical.items()}
        levels["action_type"] = list(self.schema.type_names)
        levels["channel"] = list(self.schema.channel_names)
        return levels

    def encode_features(self, x: np.ndarray) -> str:
        """The customer block of a row as logged with a decision: base64 of little-endian float32."""
        return base64.b64encode(np.asarray(x[: len(self.customer_features)], dtype="<f4").tobytes()).decode()

    def decode_features(self, text: str) -> np.ndarray:
        """Inverse of ``encode_features`` (float64, ``customer_features`` order)."""
        block = decode_block(text)
        if block.shape != (len(self.customer_features),):
            raise ValueError(f"features hold {block.size} values, want {len(self.customer_features)}")
        return block


def decode_block(text: str) -> np.ndarray:
    """A logged customer block (base64 of little-endian float32) as float64, whatever its layout."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


class Adapter:
    """Maps a row of one layout (the live schema's) to another (a model's, or the live schema's from an
    older one): each target column takes the source column of its name (NaN, i.e. missing, for a feature
    the source lacks), category codes translated by level name (NaN for a level the target never saw)."""

    def __init__(self, source: Sequence[str], source_levels: dict[str, list[str]], target: Sequence[str],
                 target_levels: dict[str, list[str]]) -> None:
        index = {name: i for i, name in enumerate(source)}
        self.width = len(source)  # what a source row holds
        self.take = np.array([index.get(f, -1) for f in target], dtype=np.intp)
        self.recode: list[tuple[int, np.ndarray]] = []  # (target column, source code -> target code)
        for j, name in enumerate(target):
            if name in source_levels and name in target_levels and source_levels[name] != target_levels[name]:
                theirs = {level: float(k) for k, level in enumerate(target_levels[name])}
                self.recode.append((j, np.array([theirs.get(level, np.nan) for level in source_levels[name]])))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.where(self.take >= 0, x[np.maximum(self.take, 0)], np.nan)
        for j, table in self.recode:
            code = out[j]
            out[j] = table[int(code)] if code == code and 0 <= code < len(table) else np.nan
        return out


@dataclass(frozen=True)
class ActionTable:
    """Action-feature rows for a catalog, in the level order a model was trained with."""

    action_ids: tuple[str, ...]
    rows: np.ndarray  # (len(action_ids), 3): action code, type code, value


@functools.lru_cache(maxsize=16)
def model_input(schema: FeatureSchema) -> ModelInput:
    """The ``ModelInput`` of ``schema`` (built once per schema object: a schema hashes by identity)."""
    return ModelInput(schema)


def row_columns(width: int) -> tuple[int, ...]:
    """The columns a catalog action fills (action, type, value) in a row of ``width`` features: the
    action block sits just before the channel, the last column."""
    return tuple(range(width - len(ACTION_FEATURES), width - 1))
