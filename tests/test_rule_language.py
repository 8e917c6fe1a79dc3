"""The condition language: parsing, precedence, evaluation, type errors, and file:line:col reporting."""

from __future__ import annotations

import ast as pyast
import builtins
import textwrap
from pathlib import Path

import pytest

from engine.rules.checker import Scope
from engine.rules.errors import ConditionError
from engine.rules.lang import compile_condition, evaluate, parse
from engine.rules.loader import load_rules
from engine.rules.nodes import And, Arith, Compare, Field, In, Name, Neg, Not, Num, Or, Str
from engine.sim.telco import SCHEMA

REPO = Path(__file__).resolve().parent.parent

SCOPE = Scope(SCHEMA, situations={"service_first", "fraud_hold"}, triggers={"callback_requested", "retention_save"})


def resolved(text: str, scope: Scope = SCOPE):
    tree, errors = compile_condition(text, scope)
    assert not errors, [str(e) for e in errors]
    return tree


def errors_of(text: str, scope: Scope = SCOPE) -> list[ConditionError]:
    tree, errors = compile_condition(text, scope)
    assert errors, f"expected an error for {text!r}"
    return errors


# --- parsing and precedence -----------------------------------------------------------------------
def test_and_binds_tighter_than_or():
    tree = parse("a or b and c")
    assert tree == Or((Name("a"), And((Name("b"), Name("c")))))


def test_not_binds_looser_than_comparison():
    assert parse("not a == 1") == Not(Compare("==", Name("a"), Num(1.0)))
    assert parse("not not a") == Not(Not(Name("a")))


def test_arithmetic_precedence_and_left_associativity():
    assert parse("a + b * c > 1").left == Arith("+", Name("a"), Arith("*", Name("b"), Name("c")))
    assert parse("a - b - c > 1").left == Arith("-", Arith("-", Name("a"), Name("b")), Name("c"))
    assert parse("(a + b) * c > 1").left == Arith("*", Arith("+", Name("a"), Name("b")), Name("c"))
    assert parse("-a * 2 > -3") == Compare(">", Arith("*", Neg(Name("a")), Num(2.0)), Num(-3.0))


def test_literals_lists_and_membership():
    tree = parse("""segment not in ["consumer", 'family'] and x in [1, -2.5, .5, 1e3]""")
    assert tree.items[0] == In(Name("segment"), (Str("consumer"), Str("family")), negated=True)
    assert tree.items[1] == In(Name("x"), (Num(1.0), Num(-2.5), Num(0.5), Num(1000.0)))
    assert parse(r'context.note == "say \"hi\" \\ bye"').right == Str('say "hi" \\ bye')


def test_parentheses_override_precedence():
    assert parse("(a or b) and c") == And((Or((Name("a"), Name("b"))), Name("c")))


def test_positions_point_into_the_text():
    tree = parse("tenure_months >= 12 and plan == 'x'")
    assert (tree.items[1].pos, tree.items[1].end) == (24, 35)
    assert tree.items[1].right.pos == 32


# --- resolution --------------------------------------------------------------------------------
def test_names_resolve_to_fact_fields():
    tree = resolved('tenure_months >= 12 and segment in ["consumer", "family"] and not holds("broadband")')
    assert tree.items[0].left == Field("tenure_months", "num")
    assert tree.items[1].left == Field("segment", "str")
    assert tree.items[2] == Not(Field("holds__broadband", "bool"))
    tree = resolved('consent("email") and has_consent and trigger("callback_requested") and context.intent == "x"')
    assert [i.name if isinstance(i, Field) else i.left.name for i in tree.items] == [
        "consent__email", "has_consent", "trg__callback_requested", "ctx__intent"]
    assert resolved('channel == "web" or touchpoint == "home"').items[0].left == Field("channel", "str")


def test_boolean_literal_comparisons_are_simplified():
    assert resolved("has_consent == false") == Not(Field("has_consent", "bool"))
    assert resolved("true == holds('tv')") == Field("holds__tv", "bool")


# --- evaluation (tree walking) -------------------------------------------------------------------
ENV = {
    "tenure_months": 12.0, "churn_risk": 0.5, "nps": -3.0, "segment": "family", "plan": "standard",
    "holds__tv": True, "holds__fiber": False, "has_consent": False, "ctx__intent": "", "channel": "web",
    "open_cases": 1.0, "new_lines_30d": 0.0,
}


@pytest.mark.parametrize("text, expected", [
    ("tenure_months >= 12", True),
    ("tenure_months > 12", False),
    ("tenure_months == 12 and churn_risk != 0.5", False),
    ("tenure_months * 2 - 4 == 20", True),
    ("(tenure_months + 4) / 2 == 8", True),
    ("-nps > 2", True),
    ("tenure_months / 4 * 2 == 6", True),
    ('segment in ["consumer", "family"]', True),
    ('segment not in ["consumer", "family"]', False),
    ("nps in [1, -3]", True),
    ('holds("tv") and not holds("fiber")', True),
    ("has_consent or churn_risk < 0.5", False),
    ('context.intent == ""', True),
    ('not (plan == "standard" or channel == "email")', False),
    ("service_first and not fraud_hold", True),
    ("true and not false", True),
    ("1 + 2 * 3 == 7", True),
])
def test_evaluate(text, expected):
    situations = {"service_first": resolved("open_cases > 0"), "fraud_hold": resolved("new_lines_30d >= 5")}
    assert evaluate(resolved(text), ENV, situations) is expected


# --- errors in conditions ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, pos, message", [
    ("tenure_month > 3", 0, 'unknown feature "tenure_month"; did you mean "tenure_months"?'),
    ('plan == "unlimted"', 8, '"unlimted" is not a level of plan (levels: none, prepaid, sim_only, standard, '
                              'unlimited); did you mean "unlimited"?'),
    ('holds("broadbnd")', 6, 'unknown product "broadbnd"; did you mean "broadband"?'),
    ('consent("e-mail")', 8, 'unknown channel "e-mail"; did you mean "email"?'),
    ('trigger("callback_request")', 8, 'unknown trigger "callback_request"; did you mean "callback_requested"?'),
    ('channel == "webb"', 11, '"webb" is not a level of channel'),
    ('hold("tv")', 0, 'unknown function "hold"; did you mean "holds"?'),
    ("servce_first", 0, 'unknown feature "servce_first"; did you mean "service_first"?'),
    ("plan = 'x'", 5, 'unexpected "="; use "==" to compare'),
    ("a && b", 2, 'unexpected "&&"; use "and"'),
    ("open_cases > 0 AND nps > 1", 15, '"AND" must be written in lower case'),
    ("0 < nps < 5", 8, "comparisons cannot be chained"),
    ("nps > 'x", 6, "text is not closed"),
    ("(nps > 1", 8, 'expected ")" but found the end of the condition'),
    ("nps > 1)", 7, 'expected "and", "or" or the end of the condition but found ")"'),
    ("nps >", 5, "expected a value"),
    ("", 0, "the condition is empty"),
    ("nps in []", 7, "the list is empty"),
    ("[1, 2] == nps", 0, 'a list [...] can only follow "in" or "not in"'),
    ("tenure_months", 0, "expected a condition (true or false) but this is a number"),
    ("tenure_months and has_consent", 0, 'expected a condition on each side of "and" but this is a number'),
    ('plan == 3', 0, "cannot compare a number with a category (plan)"),
    ('tenure_months == "12"', 0, "cannot compare a number with text"),
    ('plan < "standard"', 0, '"<" compares numbers; text can only be compared with == or !='),
    ('plan == segment', 0, "cannot compare plan with segment"),
    ('segment in ["family", 3]', 22, "expected text in quotes in the list"),
    ("nps in [1, 'x']", 11, "expected a number in the list"),
    ("data_usage_gb / has_consent > 1", 16, '"/" works on numbers but this is a condition'),
    ("nps / (2 - 2) > 1", 6, "division by zero"),
    ("holds('tv') > 1", 0, "conditions cannot be compared with >"),
    ("holds(tv)", 0, "holds() needs one name in quotes"),
    ("products == 'tv'", 0, '"products" is a set; use holds("...")'),
    ("context == 'x'", 0, '"context" needs a key'),
    ("nps > 1e999", 6, 'number "1e999" is too large'),
    ("12abc > 1", 0, '"12abc" is not a number'),
    ("__import__('os').system('true')", 0, 'syntax error: "__import__": names start with a letter'),
])
def test_condition_errors(text, pos, message):
    errors = errors_of(text)  # with the other mistakes of the same text (e.g. "a && b": unknown a and b)
    assert any(e.pos == pos and str(e).startswith(message) for e in errors), [str(e) for e in errors]


def test_every_error_in_one_condition_is_reported():
    errors = errors_of('tenure_month > 1 and plan == "x" and holds("tvv")')
    assert [e.pos for e in errors] == [0, 29, 43]


def test_triggers_are_free_when_not_declared():
    assert resolved('trigger("anything_new")', Scope(SCHEMA)) == Field("trg__anything_new", "bool")


# --- errors in files, with exact positions ----------------------------------------------------------
CATALOG = """\
fallback:
  default: generic
actions:
  - id: generic
    name: Generic
    type: service
    group: brand
    value: 1
    channels:
      web: {headline: "Hi"}
      call_center: {script: "Hi"}
      email: {subject: "Hi"}
      sms: {text: "Hi"}
      mobile_app: {title: "Hi"}
      branch: {talking_point: "Hi"}
      pos: {message: "Hi"}
  - id: upsell
    name: Upsell
    type: upsell
    group: plan
    value: 10
    eligible: 'plan != "none" and tenure_month > 12'
    channels:
      web: {headline: "More"}
"""

POLICIES = """\
situations:
  loyal: {when: 'tenure_months >= 24'}
policies:
  - name: no_sales_without_consent
    when: not has_consent and segmnt == "student"
    blocks: {types: [upsell]}
    reason: "no consent"
levers:
  - name: boost
    when: |
      loyal
        and churn_risk > "high"
    targets: {types: [upsell]}
    weight: 2
"""


def write_rules(tmp_path: Path, catalog: str = CATALOG, policies: str = POLICIES) -> Path:
    (tmp_path / "domain.yaml").write_bytes((REPO / "rules" / "domain.yaml").read_bytes())
    (tmp_path / "catalog.yaml").write_text(textwrap.dedent(catalog))
    (tmp_path / "policies.yaml").write_text(textwrap.dedent(policies))
    return tmp_path


def messages(tmp_path: Path, catalog: str = CATALOG, policies: str = POLICIES) -> list[str]:
    rules_dir = write_rules(tmp_path, catalog, policies)
    ruleset, errors = load_rules(rules_dir)
    assert ruleset is None or not errors
    return [str(e).replace(str(rules_dir) + "/", "") for e in errors]


def test_condition_errors_point_at_the_character_in_the_file(tmp_path):
    assert messages(tmp_path) == [
        'catalog.yaml:22:35: unknown feature "tenure_month"; did you mean "tenure_months"?',
        'policies.yaml:5:31: unknown feature "segmnt"; did you mean "segment"?',
        'policies.yaml:12:13: cannot compare a number with text; compare numbers with numbers (no quotes), '
        'e.g. churn_risk > 0.5',
    ]


def test_error_str_and_render(tmp_path):
    rules_dir = write_rules(tmp_path)
    _, errors = load_rules(rules_dir)
    err = errors[0]
    assert (err.file, err.line, err.column) == (str(rules_dir / "catalog.yaml"), 22, 35)
    assert str(err) == f'{rules_dir}/catalog.yaml:22:35: unknown feature "tenure_month"; did you mean "tenure_months"?'
    lines = err.render().splitlines()
    assert lines[1].strip() == "eligible: 'plan != \"none\" and tenure_month > 12'"
    assert lines[2].index("^") - 4 == 34  # caret under column 35 (after the 4-space indent)


@pytest.mark.parametrize("scalar, line, col", [
    ("'nps == 1 and tenure_month > 1'", 22, 29),  # single-quoted
    ('"nps == 1 and tenure_month > 1"', 22, 29),  # double-quoted
    ("nps == 1 and tenure_month > 1", 22, 28),  # plain
    ("'context.a != ''x'' and tenure_month > 1'", 22, 39),  # '' escapes take two columns
    ('"context.a != \\"x\\" and tenure_month > 1"', 22, 39),  # \" escapes take two columns
    ("|\n      nps == 1\n        and tenure_month > 1", 24, 13),  # literal block
    (">-\n      nps == 1\n      and tenure_month > 1", 24, 11),  # folded block
    ("nps == 1\n      and tenure_month > 1", 23, 11),  # multi-line plain
])
def test_positions_for_every_scalar_style(tmp_path, scalar, line, col):
    catalog = CATALOG.replace("""'plan != "none" and tenure_month > 12'""", scalar)
    errors = messages(tmp_path, catalog)
    assert errors[0] == f'catalog.yaml:{line}:{col}: unknown feature "tenure_month"; did you mean "tenure_months"?'


STRUCTURE_CATALOG = """\
fallback:
  default: generic
  call_centre: generic
  web: nothing_here
actions:
  - id: generic
    name: Generic
    type: service
    group: brand
    value: 1
    channels:
      web: {headline: "Hi"}
  - id: generic
    name: Twin
    type: servise
    group: brand
    value: -5
    daily_budget: 2.5
    valid_from: 2026-05-01
    valid_to: 2026-04-01
    channels:
      webb: {headline: "x"}
      sms: {text: 12}
  - name: No id
    type: upsell
    group: plan
    value: 1
    eligble: 'true'
    channels: {}
"""

STRUCTURE_POLICIES = """\
situations:
  a: {when: 'b and nps > 0'}
  b: {when: 'c'}
  c: {when: 'a or nps < 0'}
  plan: {when: 'true'}
policies:
  - name: p1
    when: 'a'
    blocks: {types: [upsel], groups: [brand, brnd], actions: [generc]}
  - name: p1
    when: 'true'
    blocks: {}
levers:
  - name: l1
    when: 'true'
    targets: {types: [upsell]}
    weight: 0
context_weights:
  call_center: {service: 2.0, retention: -1}
  fax: {service: 1.0}
"""


def test_structure_errors_are_all_reported_with_positions(tmp_path):
    got = messages(tmp_path, STRUCTURE_CATALOG, STRUCTURE_POLICIES)
    expected = [
        'catalog.yaml:2:12: default fallback "generic" has no treatment for call_center, mobile_app, email, '
        'branch, pos; add a fallback per channel (channel: <action id>) or those treatments to the action',
        'catalog.yaml:3:3: unknown channel "call_centre" in fallback; did you mean "call_center"?',
        'catalog.yaml:4:8: fallback names an unknown action "nothing_here"',
        'catalog.yaml:13:9: duplicate action id "generic"; first defined at line 6',
        'catalog.yaml:15:11: unknown action type "servise"; did you mean "service"?',
        'catalog.yaml:17:12: action "generic" value must not be negative',
        'catalog.yaml:18:19: daily_budget must be a whole number',
        'catalog.yaml:20:15: valid_to is before valid_from',
        'catalog.yaml:22:7: unknown channel "webb"; did you mean "web"?',
        'catalog.yaml:23:19: treatment field "text" must be text; put it in quotes',
        'catalog.yaml:24:5: action is missing "id"',
        'catalog.yaml:28:5: unknown key "eligble" in action; did you mean "eligible"?',
        'catalog.yaml:29:15: action "?" has no channels; list at least one channel with its treatment',
        'policies.yaml:4:14: situation "a" depends on itself: a -> b -> c -> a; situations may use other '
        'situations, but not in a circle',
        'policies.yaml:5:3: situation name "plan" is already a feature or built-in name; choose another name',
        'policies.yaml:9:22: unknown action type "upsel" in policy "p1" blocks; did you mean "upsell"?',
        'policies.yaml:9:46: unknown group "brnd" in policy "p1" blocks; did you mean "brand"?',
        'policies.yaml:9:63: unknown action "generc" in policy "p1" blocks; did you mean "generic"?',
        'policies.yaml:10:11: duplicate policy name "p1"',
        'policies.yaml:12:13: policy "p1" blocks names no types, groups or actions',
        'policies.yaml:17:13: lever "l1" weight must be greater than 0',
        'policies.yaml:19:42: context weight call_center.retention must be greater than 0',
        'policies.yaml:20:3: unknown channel "fax" in context_weights; channels: call_center, web, mobile_app, '
        'email, sms, branch, pos',
    ]
    assert sorted(got) == sorted(expected)
    assert len(got) == len(expected)


def test_duplicate_yaml_keys_and_syntax_errors(tmp_path):
    dup = CATALOG.replace("    group: plan\n", "    group: plan\n    group: other\n")
    assert 'catalog.yaml:21:5: duplicate key "group"; each key may appear once here; ' \
           'the later one would win silently' in messages(tmp_path, dup)
    broken = POLICIES.replace("    reason: \"no consent\"", "   reason: [unclosed")
    got = messages(tmp_path, CATALOG.replace("tenure_month", "tenure_months"), broken)
    assert len(got) == 1 and got[0].startswith("policies.yaml:7:") and "YAML syntax error" in got[0]


def test_missing_files_are_errors(tmp_path):
    _, errors = load_rules(tmp_path)
    assert [str(e).replace(str(tmp_path) + "/", "").split(";")[0] for e in errors] == ["domain.yaml:1:1: file not found"]
    (tmp_path / "domain.yaml").write_bytes((REPO / "rules" / "domain.yaml").read_bytes())
    _, errors = load_rules(tmp_path)
    assert sorted(str(e).replace(str(tmp_path) + "/", "") for e in errors) == [
        "catalog.yaml:1:1: file not found", "policies.yaml:1:1: file not found"]


def test_situation_shorthand_and_bool_conditions(tmp_path):
    policies = """\
    situations:
      loyal: 'tenure_months >= 24'
    policies: []
    levers:
      - name: boost
        when: loyal
        targets: {types: [upsell]}
        weight: 2
    """
    catalog = CATALOG.replace("tenure_month > 12'", "tenure_months > 12'").replace(
        "    value: 1\n", "    value: 1\n    eligible: true\n", 1)
    ruleset, errors = load_rules(write_rules(tmp_path, catalog, policies))
    assert errors == []
    assert ruleset.situations["loyal"].when_text == "tenure_months >= 24"
    assert ruleset.action("generic").eligible is None


def test_demo_rules_load_cleanly():
    ruleset, errors = load_rules(REPO / "rules")
    assert errors == [], "\n".join(e.render() for e in errors)
    assert ruleset.version.startswith("rules-") and len(ruleset.version) == len("rules-") + 12


# --- no eval ----------------------------------------------------------------------------------------
def test_rules_never_evaluate_text_as_python(monkeypatch):
    """Loading, compiling, evaluating and testing rules works with eval/exec/compile disabled."""
    from engine.authoring.check import prepare
    from engine.rules.runtime import load_and_compile

    def forbidden(*args, **kwargs):
        raise AssertionError("rule text must never be evaluated as Python")

    prepare(REPO / "rules").close()  # numba compiles its kernels (its own code, with exec) once first
    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, forbidden)
    rules = load_and_compile(REPO / "rules")
    try:
        fact = rules.build_fact(channel="web", consents=["web"], products=["mobile"])
        assert rules.evaluate(fact) == rules.evaluate(fact)
        prepare(REPO / "rules").close()  # the rule tests too
    finally:
        rules.close()


def test_source_has_no_eval_exec_compile_or_durable_dsl():
    for path in sorted((REPO / "engine" / "rules").glob("*.py")):
        tree = pyast.parse(path.read_text(), str(path))
        for node in pyast.walk(tree):
            if isinstance(node, pyast.Call) and isinstance(node.func, pyast.Name):
                assert node.func.id not in ("eval", "exec", "compile", "__import__"), f"{path}:{node.lineno}"
            if isinstance(node, pyast.ImportFrom):
                assert not (node.module or "").startswith("durable"), f"{path}:{node.lineno}"
                assert not (node.module == "durable" or "lang" in [a.name for a in node.names
                                                                    if node.module == "durable"])
            if isinstance(node, pyast.Import):
                assert all(not a.name.startswith("durable.") and a.name != "durable" for a in node.names), \
                    f"{path}:{node.lineno}"


# --- docs and editor schema ------------------------------------------------------------------------
def test_readme_feature_list_is_generated_from_the_schema():
    from engine.rules.reference import END, START, feature_reference

    text = (REPO / "rules" / "README.md").read_text()
    assert text[text.index(START): text.index(END) + len(END)] == feature_reference(SCHEMA), \
        "run: python -m engine.rules.reference --write"


def _validate(value, schema, root, path="$") -> list[str]:
    """A small JSON Schema (draft-07 subset) validator: enough for rules.schema.json."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _validate(value, {**target, **{k: v for k, v in schema.items() if k != "$ref"}}, root, path)
    errors = []
    if "oneOf" in schema:
        matches = sum(not _validate(value, option, root, path) for option in schema["oneOf"])
        if matches != 1:
            errors.append(f"{path}: matches {matches} alternatives")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in enum")
    kinds = schema.get("type") or []
    kinds = [kinds] if isinstance(kinds, str) else kinds
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float),
             "null": type(None)}
    if kinds and not any(isinstance(value, types[k]) and not (k in ("number", "integer") and isinstance(value, bool))
                         for k in kinds):
        return errors + [f"{path}: expected {' or '.join(kinds)}"]
    if isinstance(value, str):
        if "pattern" in schema and not __import__("re").match(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below minimum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: not above {schema['exclusiveMinimum']}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            errors += _validate(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key}")
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{path}: too few properties")
        props = schema.get("properties", {})
        for key, item in value.items():
            if "propertyNames" in schema:
                errors += _validate(key, schema["propertyNames"], root, f"{path}.{key}(name)")
            if key in props:
                errors += _validate(item, props[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unknown key {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _validate(item, schema["additionalProperties"], root, f"{path}.{key}")
    return errors


def _yaml_as_json(path: Path):
    import json

    import yaml

    return json.loads(json.dumps(yaml.safe_load(path.read_text()), default=str))  # dates -> "YYYY-MM-DD"


def test_json_schema_accepts_the_demo_files_and_rejects_mistakes():
    import json

    from engine.rules import loader

    schema = json.loads((REPO / "rules" / "schema" / "rules.schema.json").read_text())
    for name in ("catalog.yaml", "policies.yaml"):
        assert _validate(_yaml_as_json(REPO / "rules" / name), schema, schema) == [], name
    catalog = _yaml_as_json(REPO / "rules" / "catalog.yaml")
    catalog["actions"][0]["type"] = "Servise"  # names are domain.yaml's: the schema checks their shape only
    catalog["actions"][1]["chanels"] = {}
    catalog["actions"][2]["channels"]["Fax"] = {"text": "x"}
    catalog["actions"][3]["value"] = -1
    assert len(_validate(catalog, schema, schema)) == 4
    # the schema and the loader agree on the keys
    assert set(schema["definitions"]["action"]["properties"]) == set(loader.ACTION_KEYS)
    from engine.rules import patterns
    from engine.rules.contact import CONTACT_KEYS

    assert set(schema["properties"]) == (set(loader.CATALOG_KEYS) | set(loader.POLICIES_KEYS) | set(CONTACT_KEYS)
                                         | set(patterns.FILE_KEYS))
    assert _validate(_yaml_as_json(REPO / "rules" / "events.yaml"), schema, schema) == []
    pattern_schema = schema["properties"]["patterns"]["items"]["properties"]
    assert set(pattern_schema) == set(patterns.PATTERN_KEYS)
    assert all(set(pattern_schema[k]["properties"]) == set(patterns.SPEC_KEYS[k]) for k in patterns.KINDS)
    assert set(schema["properties"]["policies"]["items"]["properties"]) == set(loader.POLICY_KEYS)
    assert set(schema["properties"]["levers"]["items"]["properties"]) == set(loader.LEVER_KEYS)
    assert set(schema["properties"]["groups"]["additionalProperties"]["properties"]) == set(loader.GROUP_KEYS)
