"""Entry points for ``nba rules check`` and for (re)loading rules in the server."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.authoring.ruletests import TestResult, load_tests, run_tests
from engine.rules.errors import RuleError, RuleErrors
from engine.rules.loader import load_rules
from engine.rules.runtime import CompiledRules, compile_rules

__all__ = ["RuleError", "RuleErrors", "check", "prepare", "test"]


def check(rules_dir: Path) -> list[RuleError]:
    """Every error in the rule files and rule test files (empty when they load and compile)."""
    ruleset, errors = load_rules(Path(rules_dir))
    if errors or ruleset is None:
        return errors
    _, test_errors = load_tests(Path(rules_dir), ruleset)
    try:
        compile_rules(ruleset).close()  # also builds the durable ruleset once, as a reload would
    except RuleErrors as err:
        return err.errors + test_errors
    return test_errors


def test(rules_dir: Path) -> tuple[CompiledRules | None, list[RuleError], list[TestResult]]:
    """Load and compile the rules and run their tests: (the compiled rules, or None when there are
    errors; every error in the rule and test files; the test results)."""
    ruleset, errors = load_rules(Path(rules_dir))
    if errors or ruleset is None:
        return None, errors, []
    tests, errors = load_tests(Path(rules_dir), ruleset)
    try:
        rules = compile_rules(ruleset)
    except RuleErrors as err:
        return None, err.errors + errors, []
    if errors:
        rules.close()
        return None, errors, []
    return rules, [], run_tests(rules, tests)


def prepare(rules_dir: Path) -> CompiledRules:
    """A rule set fit to go live: it loads, compiles and passes its rule tests. Raises ``RuleErrors``
    otherwise (a failed test is an error at the test's file:line:col)."""
    rules, errors, results = test(rules_dir)
    failed = [r.as_error() for r in results if not r.passed]
    if errors or failed or rules is None:
        if rules is not None:
            rules.close()
        raise RuleErrors(errors + failed)
    return rules


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.authoring.check [rules_dir]``: print every error with its source line."""
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
