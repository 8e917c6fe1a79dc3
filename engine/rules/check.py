"""Entry points for ``nba rules check`` and for (re)loading rules in the server."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.features import SCHEMA, FeatureSchema

from .errors import RuleError, RuleErrors
from .loader import load_rules
from .runtime import CompiledRules, compile_rules

__all__ = ["RuleError", "RuleErrors", "check", "load_and_compile"]


def check(rules_dir: Path, schema: FeatureSchema = SCHEMA) -> list[RuleError]:
    """Every error in the rule files (empty when they load and compile)."""
    ruleset, errors = load_rules(Path(rules_dir), schema)
    if errors:
        return errors
    try:
        compile_rules(ruleset).close()  # also builds the durable ruleset once, as a reload would
    except RuleErrors as err:
        return err.errors
    return []


def load_and_compile(rules_dir: Path, schema: FeatureSchema = SCHEMA) -> CompiledRules:
    """Load, check and compile the rules in ``rules_dir``; raises ``RuleErrors`` listing every problem."""
    ruleset, errors = load_rules(Path(rules_dir), schema)
    if errors:
        raise RuleErrors(errors)
    return compile_rules(ruleset)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.rules.check [rules_dir]``: print every error with its source line."""
    args = sys.argv[1:] if argv is None else argv
    rules_dir = Path(args[0]) if args else Path("rules")
    errors = check(rules_dir)
    for err in errors:
        print(err.render())
    if errors:
        print(f"{len(errors)} error(s) in {rules_dir}", file=sys.stderr)
        return 1
    print(f"{rules_dir}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
