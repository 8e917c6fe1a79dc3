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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from engine.errors import NbaError
from engine.features import FeatureSchema
from engine.models.model_input import model_input
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


def live_schema(features: FeatureSchema) -> dict:
    """What a model's schema.json records of the feature schema it was trained on."""
    rows = model_input(features)
    return {"features": list(rows.features), "types": rows.feature_types(), "categorical": list(rows.categorical_features),
            "levels": rows.feature_levels(), "feature_schema": features.fingerprint(), "schema_version": features.version}


def schema_mismatch(schema: object, features: FeatureSchema) -> str | None:
    """What differs between a model's schema.json and the live feature schema (None: it matches)."""
    if not isinstance(schema, dict):
        return f"schema.json holds {type(schema).__name__}, not an object; retrain the model"
    actions = schema.get("actions", [])
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        return f"schema.json actions must be a list of action ids, got {actions!r:.80}"
    live = live_schema(features)
    for key in ("feature_schema", "features", "types", "categorical", "levels"):
        if key not in schema:
            return f"schema.json has no {key!r} (written by an older version); retrain the model"
        if schema[key] != live[key]:
            if isinstance(live[key], list) and isinstance(schema[key], list):
                diffs = [f"#{i}: model {a!r}, live {b!r}" for i, (a, b) in
                         enumerate(zip(schema[key], live[key])) if a != b]
                if len(schema[key]) != len(live[key]):
                    diffs.insert(0, f"model has {len(schema[key])}, live {len(live[key])}")
                detail = "; ".join(diffs[:3])
            elif isinstance(live[key], dict) and isinstance(schema[key], dict):
                names = sorted(k for k in set(live[key]) | set(schema[key]) if live[key].get(k) != schema[key].get(k))
                detail = "; ".join(f"{k}: model {schema[key].get(k)!r}, live {live[key].get(k)!r}" for k in names[:3])
            else:
                detail = f"model {schema[key]!r}, live {live[key]!r}"
            return f"model {key} does not match the live feature schema ({detail})"
    return None


def no_model(schema: FeatureSchema) -> LoadedModel:
    """The stand-in while the registry has no champion: decisions are ranked without propensities."""
    return LoadedModel(NO_MODEL, ConstantScorer(NO_MODEL_PROPENSITY), (), time.time(), {}, schema.fingerprint())


class ModelRegistry:
    """Model versions under ``root``/``name``; ``schema`` is the live feature schema models must match."""

    def __init__(self, root: str | Path, schema: FeatureSchema, name: str = DEFAULT_NAME) -> None:
        self.dir = Path(root) / name
        self.schema = schema

    def save(self, model_text: str, actions: list[str], metrics: dict, summary: dict) -> str:
        """Store a trained model as a new version (not yet champion); returns the version."""
        version = datetime.now(UTC).strftime("v%Y%m%d-%H%M%S-") + f"{time.time_ns() % 1000000:06d}"
        target = self.dir / version
        target.mkdir(parents=True)
        (target / "model.txt").write_text(model_text)
        schema = live_schema(self.schema) | {"actions": actions}
        (target / "schema.json").write_text(json.dumps(schema, indent=2))
        (target / "metrics.json").write_text(json.dumps({"metrics": metrics, "training": summary}, indent=2))
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
        try:
            scorer = CompiledModel.from_file(folder / "model.txt")
        except Exception as exc:  # LightGBM raises its own error types for corrupt files
            raise ModelRefused(f"{folder / 'model.txt'}: not a usable LightGBM model: {exc}") from exc
        rows = model_input(self.schema)
        if scorer.num_features != len(rows.features):
            raise ModelRefused(f"{folder}: model has {scorer.num_features} features, live schema {len(rows.features)}")
        if not scorer.probabilities:
            raise ModelRefused(f"{folder}: objective {scorer.objective!r} does not score probabilities; "
                               "a propensity model is binary")
        scorer.warmup()
        actions = tuple(schema.get("actions", ()))
        # Compile the decision kernels and build their layout now, never on a customer's request.
        scorer.bind(rows.row_features, np.zeros((1, len(rows.row_features)))).warmup()
        return LoadedModel(version, scorer, actions, time.time(), self.metrics(version).get("metrics", {}),
                           str(schema.get("feature_schema", "")))
