"""The telco demo's domain, which the synthetic world generates customers for: the repository's
``rules/domain.yaml`` (in the image, ``/srv/nba/rules``, the working directory's ``rules/``)."""

from __future__ import annotations

from pathlib import Path

from engine.config import REPO
from engine.errors import NbaError
from engine.rules.loader import load_domain_file


def _demo_rules() -> Path:
    for folder in (REPO / "rules", Path.cwd() / "rules"):
        if (folder / "domain.yaml").is_file():
            return folder
    raise NbaError("the demo world needs the telco demo's rules/domain.yaml (the repository's rules/ folder)")


DEMO_RULES = _demo_rules()
SCHEMA = load_domain_file(DEMO_RULES)
NUMERIC = SCHEMA.numeric
DERIVED = SCHEMA.derived
CATEGORICAL = SCHEMA.categorical
SETS = SCHEMA.sets
CHANNELS = SCHEMA.channel_names
ACTION_TYPES = SCHEMA.type_names
