"""Derived-feature formulas: random formulas compiled to the numba program compute what a plain Python
reading of the same formula computes (x / 0 is 0, log of a number not above 0 is 0, an unknown date
gives the fallback); random text is refused with a located error or compiles, never crashes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.models.derived import derive
from engine.rules.errors import RuleErrors
from engine.rules.loader import load_domain_file

from .properties import examples

NUMBERS = ("a", "b", "c")
DAY = 86_400.0
NOW = 20_000 * DAY + 3_600.0  # a fixed moment: the formulas never look at the real clock
HEAD = """\
attributes:
  a: {type: number}
  b: {type: number}
  c: {type: number}
  seen: {type: date}
channels: {desk: {direction: inbound}}
action_types: {offer: {}}
derived:
"""


def _leaf() -> st.SearchStrategy[tuple[str, object]]:
    return st.one_of(st.sampled_from(NUMBERS).map(lambda n: (n, ("num", n))),
                     st.sampled_from([0, 1, 2.5, 7, 100, 0.5]).map(lambda v: (repr(v), ("const", float(v)))),
                     st.just(("days_since(seen, 5)", ("since", 5.0))))


def _grow(children: st.SearchStrategy) -> st.SearchStrategy:
    binary = st.tuples(st.sampled_from("+-*/"), children, children).map(
        lambda t: (f"({t[1][0]} {t[0]} {t[2][0]})", ("op", t[0], t[1][1], t[2][1])))
    unary = st.tuples(st.sampled_from(["exp", "log", "abs"]), children).map(
        lambda t: (f"{t[0]}({t[1][0]})", ("fn", t[0], t[1][1])))
    minmax = st.tuples(st.sampled_from(["min", "max"]), st.lists(children, min_size=2, max_size=3)).map(
        lambda t: (f"{t[0]}({', '.join(c[0] for c in t[1])})", ("mm", t[0], [c[1] for c in t[1]])))
    clamp = st.tuples(children, st.sampled_from([(0, 1), (-5, 5), (2, 3)])).map(
        lambda t: (f"clamp({t[0][0]}, {t[1][0]}, {t[1][1]})", ("clamp", t[0][1], float(t[1][0]), float(t[1][1]))))
    bucket = st.tuples(st.booleans(), children, st.sampled_from([(1, 5, 9), (0, 2), (10,)])).map(
        lambda t: ((f"bucket({t[1][0]}, {', '.join(map(str, t[2]))})" if t[0] else
                    f"bucket_down({t[1][0]}, {', '.join(map(str, reversed(t[2])))})"),
                   ("bucket", t[0], t[1][1], [float(x) for x in (t[2] if t[0] else tuple(reversed(t[2])))])))
    neg = children.map(lambda c: (f"-({c[0]})", ("neg", c[1])))
    return st.one_of(binary, unary, minmax, clamp, bucket, neg)


FORMULAS = st.recursive(_leaf(), _grow, max_leaves=8)


def reference(tree, row: dict[str, float]) -> float:
    """The formula as plain Python reads it, with the documented special cases."""
    kind = tree[0]
    if kind == "num":
        return row[tree[1]]
    if kind == "const":
        return tree[1]
    if kind == "since":
        return tree[1] if math.isnan(row["seen"]) else NOW / DAY - row["seen"]
    if kind == "neg":
        return -reference(tree[1], row)
    if kind == "op":
        a, b = reference(tree[2], row), reference(tree[3], row)
        if tree[1] == "/":
            return a / b if b != 0 else 0.0
        return {"+": a + b, "-": a - b, "*": a * b}[tree[1]]
    if kind == "fn":
        x = reference(tree[2], row)
        return {"exp": lambda: math.exp(x) if x < 709 else math.inf, "abs": lambda: abs(x),
                "log": lambda: math.log(x) if x > 0 else 0.0}[tree[1]]()
    if kind == "mm":
        values = [reference(c, row) for c in tree[2]]
        out = values[0]
        for v in values[1:]:
            out = min(out, v) if tree[1] == "min" else max(out, v)
        return out
    if kind == "clamp":
        return min(max(reference(tree[1], row), tree[2]), tree[3])
    up, x, cuts = tree[1], reference(tree[2], row), tree[3]
    return 1.0 + sum((x >= c) if up else (x <= c) for c in cuts)


def same(got: float, want: float) -> bool:
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    return got == want or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(formula=FORMULAS, rows=st.lists(st.tuples(st.sampled_from([0.0, 1.0, -2.0, 3.5, 1e3, -0.5]),
                                                  st.sampled_from([0.0, 2.0, -1.0, 7.0]),
                                                  st.sampled_from([0.0, 1.0, 100.0]),
                                                  st.sampled_from([math.nan, 19_990.0, 20_000.0])),
                                        min_size=1, max_size=6))
def test_compiled_formulas_compute_what_they_say(tmp_path_factory, formula, rows) -> None:
    text, tree = formula
    folder = tmp_path_factory.mktemp("f")
    (folder / "domain.yaml").write_text(HEAD + f"  f: {{formula: '{text}'}}\n")
    schema = load_domain_file(folder)
    vectors = np.array(rows, dtype=np.float32)
    got = derive(vectors, schema, NOW)[:, 0]
    for i, row in enumerate(vectors.astype(np.float64)):
        want = reference(tree, dict(zip((*NUMBERS, "seen"), row.tolist())))
        assert same(float(got[i]), want), (text, row.tolist(), float(got[i]), want)


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(list("abc()+-*/, 0123456789.") + ["log", "bucket", "seen", "days_since",
                                                                        "clamp", "min", "x", "'", "f", "\\"]),
                     max_size=30).map("".join))
def test_any_formula_text_compiles_or_is_refused_where_it_goes_wrong(tmp_path_factory, text) -> None:
    folder: Path = tmp_path_factory.mktemp("t")
    quoted = text.replace("'", "''")
    (folder / "domain.yaml").write_text(HEAD + f"  f: {{formula: '{quoted}'}}\n")
    try:
        schema = load_domain_file(folder)
    except RuleErrors as exc:
        assert exc.errors and all(e.file.endswith("domain.yaml") and e.line >= 1 and e.column >= 1 for e in exc.errors)
        return
    if schema.derived:
        derive(np.zeros((1, len(schema.numeric)), dtype=np.float32), schema, NOW)


def test_a_formula_may_only_use_what_is_declared_above_it(tmp_path) -> None:
    (tmp_path / "domain.yaml").write_text(HEAD + "  g: {formula: 'f * 2'}\n  f: {formula: 'a + 1'}\n")
    try:
        load_domain_file(tmp_path)
    except RuleErrors as exc:
        assert [str(e).split(": ", 1)[1] for e in exc.errors] == [
            'derived feature "f" is declared below this one; a formula may use the derived features declared above it']
    else:
        raise AssertionError("a formula used a feature declared below it")
