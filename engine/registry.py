"""The model registry: ``models/<name>/<version>/`` holds a LightGBM text model, its schema and metrics.

``models/<name>/CHAMPION`` names the version the server uses. A model whose feature schema does not
match the live one is refused with a message saying what differs; the current model stays.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine.features import SCHEMA
from engine.model_input import CATEGORICAL_FEATURES, FEATURES
from engine.scorer import CompiledModel

DEFAULT_NAME = "propensity"


class ModelRefused(Exception):
    """A model file or schema that must not go live."""


@dataclass
class LoadedModel:
    version: str
    scorer: CompiledModel
    action_levels: tuple[str, ...]
    loaded_at: float
    metrics: dict


def live_schema() -> dict:
    return {"features": list(FEATURES), "categorical": list(CATEGORICAL_FEATURES),
            "feature_schema": SCHEMA.fingerprint(), "schema_version": SCHEMA.version}


class ModelRegistry:
    def __init__(self, root: str | Path, name: str = DEFAULT_NAME) -> None:
        self.dir = Path(root) / name

    def save(self, model_text: str, actions: list[str], metrics: dict, summary: dict) -> str:
        """Store a trained model as a new version (not yet champion); returns the version."""
        version = datetime.now(timezone.utc).strftime("v%Y%m%d-%H%M%S-") + f"{time.time_ns() % 1000000:06d}"
        target = self.dir / version
        target.mkdir(parents=True)
        (target / "model.txt").write_text(model_text)
        schema = live_schema() | {"actions": actions}
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
        except (OSError, ValueError) as exc:
            raise ModelRefused(f"{folder}: unreadable schema.json: {exc}") from exc
        live = live_schema()
        for key in ("feature_schema", "features", "categorical"):
            if schema.get(key) != live[key]:
                raise ModelRefused(
                    f"{folder}: model {key} does not match the live feature schema "
                    f"(model {str(schema.get(key))[:80]!r}, live {str(live[key])[:80]!r})"
                )
        try:
            scorer = CompiledModel.from_file(folder / "model.txt")
        except Exception as exc:  # LightGBM raises its own error types for corrupt files
            raise ModelRefused(f"{folder / 'model.txt'}: not a usable LightGBM model: {exc}") from exc
        if scorer.num_features != len(FEATURES):
            raise ModelRefused(f"{folder}: model has {scorer.num_features} features, live schema {len(FEATURES)}")
        scorer.warmup()
        return LoadedModel(version, scorer, tuple(schema.get("actions", ())), time.time(),
                           self.metrics(version).get("metrics", {}))
