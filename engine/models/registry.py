"""The model registry: ``models/<name>/<version>/`` holds a LightGBM text model, its schema and metrics.

- ``model.txt``: the LightGBM text model;
- ``schema.json``: feature names in column order, their types (numeric / binary / categorical), the
  levels of every categorical feature (code i is level i; ``actions`` lists the action levels this
  model was trained with), the feature-schema fingerprint;
- ``metrics.json``: holdout metrics (AUC, log loss, per action type, calibration table, the champion
  on the same holdout) and a summary of the training data.

``models/<name>/CHAMPION`` names the version the server uses (a running server picks up a change
within a second, see ``engine.models.experiment``). A model whose schema does not match the live one is
refused with a message saying what differs; the current model stays.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from engine.errors import NbaError
from engine.features import FeatureSchema
from engine.models.model_input import ACTION_FEATURES, FEATURE_TYPES, model_input, row_columns
from engine.models.scorer import CompiledModel

DEFAULT_NAME = "propensity"
NO_MODEL = "none"  # the model version of decisions made before any model was promoted
NO_MODEL_PROPENSITY = 0.05  # what every action scores then: arbitration ranks by value, weights and levers


class ModelRefused(NbaError):
    """A model file or schema that must not go live."""


class ConstantScorer:
    """Scores every action alike: what decides while no model has been trained (an empty production
    start). It binds and predicts like a ``CompiledModel``."""

    def __init__(self, propensity: float) -> None:
        self.propensity = propensity

    def bind(self, row_features: object, rows: object) -> ConstantScorer:
        return self

    def predict(self, x: np.ndarray, actions: np.ndarray | None = None) -> np.ndarray:
        return np.full(len(actions) if actions is not None else len(x), self.propensity)

    def warmup(self) -> None:
        pass


@dataclass
class LoadedModel:
    version: str
    scorer: CompiledModel | ConstantScorer
    action_levels: tuple[str, ...]
    loaded_at: float
    metrics: dict
    feature_schema: str = ""  # the fingerprint of the feature schema it was trained on
    features: tuple[str, ...] = ()  # its input columns by name (schema.json); () for the live schema's own
    levels: dict[str, list[str]] = field(default_factory=dict)  # categorical feature -> its codes' levels
    # uplift arbitration's second model (``nba train --uplift``, ``training.fit_organic``): the logit shift
    # from this model's P(take | shown) to P(take | not shown); None for a propensity-only version
    organic: LoadedModel | None = None


def live_schema(features: FeatureSchema) -> dict:
    """What a model's schema.json records of the feature schema it was trained on."""
    rows = model_input(features)
    return {"features": list(rows.features), "types": rows.feature_types(), "categorical": list(rows.categorical_features),
            "levels": rows.feature_levels(), "feature_schema": features.fingerprint(), "schema_version": features.version}


def _malformed(schema: dict) -> str | None:
    """What is wrong with the shape of a schema.json (None: nothing)."""
    for key in ("feature_schema", "features", "types", "categorical", "levels"):
        if key not in schema:
            return f"schema.json has no {key!r} (written by an older version); retrain the model"
    features, types, categorical, levels = schema["features"], schema["types"], schema["categorical"], schema["levels"]
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features) or len(set(features)) != len(features):
        return "schema.json features must be a list of distinct names"
    if features[-len(ACTION_FEATURES):] != list(ACTION_FEATURES):
        return f"schema.json features must end with {', '.join(ACTION_FEATURES)}"
    if not isinstance(types, list) or len(types) != len(features) or not set(types) <= set(FEATURE_TYPES):
        return f"schema.json types must give one of {', '.join(FEATURE_TYPES)} per feature"
    if not isinstance(categorical, list) or set(categorical) != {f for f, t in zip(features, types) if t == "categorical"}:
        return "schema.json categorical must list the features whose types are categorical"
    if not isinstance(levels, dict) or any(
            not isinstance(levels.get(c), list) or not all(isinstance(v, str) for v in levels[c])
            for c in categorical if c != "action"):
        return "schema.json levels must give the levels of every categorical feature"
    return None


def schema_mismatch(schema: object, features: FeatureSchema) -> str | None:
    """Why a model (its schema.json) cannot decide under the live feature schema (None: it can).

    A model reads its input by feature name: attributes, levels, channels and action types added since it
    was trained are unknown to it (missing values), which it takes like the values it never saw; a
    feature it was trained on must still exist, with the same type."""
    if not isinstance(schema, dict):
        return f"schema.json holds {type(schema).__name__}, not an object; retrain the model"
    actions = schema.get("actions", [])
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        return f"schema.json actions must be a list of action ids, got {actions!r:.80}"
    malformed = _malformed(schema)
    if malformed:
        return malformed
    rows = model_input(features)
    live = dict(zip(rows.features, rows.feature_types()))
    gone = [f for f in schema["features"] if f not in live]
    if gone:
        return (f"the model uses features domain.yaml no longer declares: {', '.join(gone[:8])}"
                + (f" and {len(gone) - 8} more" if len(gone) > 8 else "") + "; retrain it or declare them again")
    retyped = [f"{f} (model {t}, live {live[f]})" for f, t in zip(schema["features"], schema["types"]) if live[f] != t]
    if retyped:
        return "feature types differ from the live schema: " + ", ".join(retyped[:5]) + "; retrain the model"
    return None


def no_model(schema: FeatureSchema) -> LoadedModel:
    """The stand-in while the registry has no champion: decisions are ranked without propensities."""
    return LoadedModel(NO_MODEL, ConstantScorer(NO_MODEL_PROPENSITY), (), time.time(), {}, schema.fingerprint())


class ModelRegistry:
    """Model versions under ``root``/``name``; ``schema`` is the live feature schema models must match."""

    def __init__(self, root: str | Path, schema: FeatureSchema, name: str = DEFAULT_NAME) -> None:
        self.dir = Path(root) / name
        self.schema = schema

    def save(self, model_text: str, actions: list[str], metrics: dict, summary: dict,
             organic: tuple[str, dict, dict] | None = None) -> str:
        """Store a trained model as a new version (not yet champion); returns the version. ``organic``:
        the uplift model's untreated half (model text, metrics, training summary), in ``organic.txt``."""
        version = datetime.now(UTC).strftime("v%Y%m%d-%H%M%S-") + f"{time.time_ns() % 1000000:06d}"
        target = self.dir / version
        target.mkdir(parents=True)
        (target / "model.txt").write_text(model_text)
        schema = live_schema(self.schema) | {"actions": actions}
        (target / "schema.json").write_text(json.dumps(schema, indent=2))
        record: dict = {"metrics": metrics, "training": summary}
        if organic is not None:
            (target / "organic.txt").write_text(organic[0])
            record["organic"] = {"metrics": organic[1], "training": organic[2]}
        (target / "metrics.json").write_text(json.dumps(record, indent=2))
        return version

    def versions(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if (p / "model.txt").is_file())

    def champion(self) -> str | None:
        pointer = self.dir / "CHAMPION"
        if not pointer.is_file():
            return None
        version = pointer.read_text().strip()
        return version if (self.dir / version / "model.txt").is_file() else None

    def problem(self, version: str) -> str | None:
        """Why ``version`` cannot go live (unreadable or mismatched schema.json), or None; cheap: the
        model itself is only compiled by ``load``."""
        try:
            schema = json.loads((self.dir / version / "schema.json").read_text())
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            return f"unreadable schema.json: {exc}"
        return schema_mismatch(schema, self.schema)

    def champion_problem(self) -> str | None:
        """Why the champion cannot go live (missing, unreadable or mismatched schema), or None."""
        version = self.champion()
        if version is None:
            return f"no champion model in {self.dir}"
        problem = self.problem(version)
        return f"champion {version} refused: {problem}" if problem else None

    def promote(self, version: str) -> None:
        self.load(version)  # refuse before pointing at it
        tmp = self.dir / "CHAMPION.tmp"
        tmp.write_text(version + "\n")
        os.replace(tmp, self.dir / "CHAMPION")

    def metrics(self, version: str) -> dict:
        path = self.dir / version / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self, version: str | None = None) -> LoadedModel:
        version = version or self.champion()
        if version is None:
            raise ModelRefused(f"no champion model in {self.dir}")
        folder = self.dir / version
        try:
            schema = json.loads((folder / "schema.json").read_text())
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise ModelRefused(f"{folder}: unreadable schema.json: {exc}") from exc
        mismatch = schema_mismatch(schema, self.schema)
        if mismatch is not None:
            raise ModelRefused(f"{folder}: {mismatch}")
        actions = tuple(schema.get("actions", ()))
        record = self.metrics(version)

        def half(name: str, file: str, metrics: dict) -> LoadedModel:
            return LoadedModel(name, _compiled(folder / file, schema), actions, time.time(), metrics,
                               str(schema["feature_schema"]), tuple(schema["features"]), dict(schema["levels"]))

        organic = (half(f"{version}+organic", "organic.txt", record.get("organic", {}).get("metrics", {}))
                   if (folder / "organic.txt").is_file() else None)
        model = half(version, "model.txt", record.get("metrics", {}))
        model.organic = organic
        return model


def _compiled(path: Path, schema: dict) -> CompiledModel:
    """A model file compiled for scoring, its decision kernels warmed up (never on a customer's request)."""
    try:
        scorer = CompiledModel.from_file(path)
    except Exception as exc:  # LightGBM raises its own error types for corrupt files
        raise ModelRefused(f"{path}: not a usable LightGBM model: {exc}") from exc
    if scorer.num_features != len(schema["features"]):
        raise ModelRefused(f"{path.parent}: {path.name} has {scorer.num_features} features, schema.json "
                           f"{len(schema['features'])}")
    if not scorer.probabilities:
        raise ModelRefused(f"{path.parent}: objective {scorer.objective!r} does not score probabilities; "
                           "a propensity model is binary")
    scorer.warmup()
    columns = row_columns(len(schema["features"]))
    scorer.bind(columns, np.zeros((1, len(columns)))).warmup()
    return scorer
