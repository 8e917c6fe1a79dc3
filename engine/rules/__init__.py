"""Rules owned by marketers: the condition language, the YAML loader, durable-rules at run time,
rule tests, and hot reload.

Typical use::

    rules = prepare(Path("rules"))                   # load, compile, pass the rule tests; or RuleErrors
    fact = rules.build_fact(FactInputs(numbers=..., categories=..., products=..., consents=...,
                                       channel="web", touchpoint="home", context={}, triggers=[]))
    outcome = rules.evaluate(fact)                   # RuleOutcome: durable-rules, then the numba program
    index, admitted = rules.admitted(outcome, "web") # the admitted actions (the decision's hot path)
    verdicts = rules.verdicts(outcome, "web")        # one ActionVerdict per catalog action (explanations)
"""

from .check import check, load_and_compile, prepare
from .errors import ConditionError, RuleError, RuleErrors
from .facts import FactInputs
from .loader import load_rules
from .model import ACTION_TYPES, Action, Lever, Policy, RuleSet, Situation, Targets
from .runtime import ActionVerdict, CompiledRules, RuleOutcome, compile_rules

__all__ = [
    "ACTION_TYPES",
    "Action",
    "ActionVerdict",
    "CompiledRules",
    "ConditionError",
    "FactInputs",
    "Lever",
    "Policy",
    "RuleError",
    "RuleErrors",
    "RuleOutcome",
    "RuleSet",
    "Situation",
    "Targets",
    "check",
    "compile_rules",
    "load_and_compile",
    "load_rules",
    "prepare",
]
