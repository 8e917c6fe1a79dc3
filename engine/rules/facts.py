"""The fact: one flat JSON object per decision that every compiled rule is matched against.

Field naming (only fields some rule references are put in the fact; durable-rules holds at most
about 253 properties per fact):

=====================  ==========================================  =======
field                  meaning                                     type
=====================  ==========================================  =======
``<numeric feature>``  stored or derived numeric feature            number
``<categorical>``      categorical feature level ("" when missing)  text
``channel``            channel of the request                       text
``touchpoint``         touchpoint of the request                    text
``has_consent``        consent for the request's channel            bool
``holds__<product>``   customer holds the product                   bool
``consent__<channel>`` consent for that channel                     bool
``in__<set>__<member>`` the customer's set attribute holds the member  bool
``ctx__<key>``         request context value ("" when absent)       text
``trg__<trigger>``     the trigger is active for the customer       bool
``z__``                constant 0 (used to compare two formulas)    number
``g__``                constant 0 (guard tests grouping rules)      number
=====================  ==========================================  =======
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numba
import numpy as np

from engine.features import FeatureSchema

ZERO_FIELD = "z__"
GUARD_FIELD = "g__"  # constant 0, read by the guard tests that group rules (see network.py)
MAX_TEXT = 1000  # context and touchpoint text is cut to this many characters


def holds_field(product: str) -> str:
    return f"holds__{product}"


def consent_field(channel: str) -> str:
    return f"consent__{channel}"


def set_field(attribute: str, member: str) -> str:
    return f"in__{attribute}__{member}"


def context_field(key: str) -> str:
    return f"ctx__{key}"


def trigger_field(name: str) -> str:
    return f"trg__{name}"


@dataclass(frozen=True)
class FactInputs:
    """What a decision knows, as plain data (the caller adapts its profile to this).

    numbers:    numeric features by name (stored and derived), or a sequence / numpy vector aligned
                with the schema's ``numbers`` (stored then derived; values from a vector are rounded to 7
                significant digits, the precision of the float32 store); missing or non-finite
                values count as 0.
    categories: categorical features by name; missing means "" (matches no level).
    products:   products the customer holds.
    consents:   channels the customer consented to.
    channel, touchpoint, context: the request.
    triggers:   names of the customer's active triggers.
    sets:       the customer's other set attributes (domain.yaml), by name.
    """

    numbers: Mapping[str, float] | Sequence[float] | np.ndarray = field(default_factory=dict)
    categories: Mapping[str, str] = field(default_factory=dict)
    products: Iterable[str] = ()
    consents: Iterable[str] = ()
    channel: str = ""
    touchpoint: str = ""
    context: Mapping[str, str] = field(default_factory=dict)
    triggers: Iterable[str] = ()
    sets: Mapping[str, Iterable[str]] = field(default_factory=dict)


def inputs_from_profile(profile, derived=None, channel: str = "", touchpoint: str = "",
                        context: Mapping[str, str] | None = None) -> FactInputs:
    """``FactInputs`` from a store profile (duck-typed: ``numeric`` vector in the schema's order,
    ``categorical`` dict, ``sets`` dict with "products" and "consent", ``triggers``) and the derived
    vector (the schema's derived order)."""
    numeric = profile.numeric.tolist() if hasattr(profile.numeric, "tolist") else list(profile.numeric)
    if derived is not None:
        numeric += derived.tolist() if hasattr(derived, "tolist") else list(derived)
    sets = getattr(profile, "sets", None) or {}
    return FactInputs(
        numbers=numeric,
        categories=getattr(profile, "categorical", None) or {},
        products=sets.get("products", ()),
        consents=sets.get("consent", ()),
        channel=channel or "",
        touchpoint=touchpoint or "",
        context=context or {},
        triggers=getattr(profile, "triggers", None) or (),
        sets=sets,
    )


class FactLayout:
    """The fields a compiled rule set references, and how to fill them from ``FactInputs``."""

    def __init__(self, fields: Mapping[str, str], schema: FeatureSchema):
        # fields: fact field name -> kind ("num", "str", "bool")
        self.fields = dict(sorted(fields.items()))
        nums = set(schema.numbers)
        self._numbers = [f for f in self.fields if f in nums]
        index = {n: i for i, n in enumerate(schema.numbers)}
        self._number_index = np.array([index[f] for f in self._numbers], dtype=np.intp)
        self._need = int(self._number_index.max()) + 1 if self._numbers else 0
        self._categories = [f for f in self.fields if f in schema.categorical]
        self._products = [(f, f[len("holds__") :]) for f in self.fields if f.startswith("holds__")]
        self._consents = [(f, f[len("consent__") :]) for f in self.fields if f.startswith("consent__")]
        self._contexts = [(f, f[len("ctx__") :]) for f in self.fields if f.startswith("ctx__")]
        self._triggers = [(f, f[len("trg__") :]) for f in self.fields if f.startswith("trg__")]
        self._in_sets = [(f, *f[len("in__"):].split("__", 1)) for f in self.fields if f.startswith("in__")]

    def build(self, inputs: FactInputs) -> dict:
        fact: dict = {}
        fields = self.fields
        numbers = inputs.numbers
        if isinstance(numbers, Mapping):
            for name in self._numbers:
                fact[name] = _finite(numbers.get(name, 0.0))
        else:
            # A packed vector (float32 in Redis): compare at float32 precision, so a stored 0.7
            # (0.699999988...) is 0.7 to the rules.
            values = np.asarray(numbers, dtype=np.float64)
            if values.shape[0] < self._need:
                values = np.concatenate((values, np.zeros(self._need - values.shape[0])))
            fact.update(zip(self._numbers, round7(values[self._number_index]).tolist()))
        for name in self._categories:
            value = inputs.categories.get(name, "")
            fact[name] = "" if value is None else str(value)
        if self._products:
            held = set(inputs.products)
            for f, product in self._products:
                fact[f] = product in held
        consents = set(inputs.consents)
        for f, channel in self._consents:
            fact[f] = channel in consents
        if "has_consent" in fields:
            fact["has_consent"] = inputs.channel in consents
        if "channel" in fields:
            fact["channel"] = inputs.channel or ""
        if "touchpoint" in fields:
            fact["touchpoint"] = _text(inputs.touchpoint)
        for f, key in self._contexts:
            fact[f] = _text(inputs.context.get(key, ""))
        if self._triggers:
            active = set(inputs.triggers)
            for f, name in self._triggers:
                fact[f] = name in active
        if self._in_sets:
            held_by = {name: set(members) for name, members in inputs.sets.items()}
            for f, attribute, member in self._in_sets:
                fact[f] = member in held_by.get(attribute, ())
        if ZERO_FIELD in fields:
            fact[ZERO_FIELD] = 0.0
        if GUARD_FIELD in fields:
            fact[GUARD_FIELD] = 0.0
        return fact


def json_number(value: float) -> str:
    """A JSON number durable-rules parses as a double: always with a "." (it rejects "1e-05")."""
    text = repr(float(value))
    if not math.isfinite(value):
        raise ValueError(f"cannot send {text} to the rule engine")
    if "." not in text:
        if "e" in text:
            mantissa, exponent = text.split("e")
            return f"{mantissa}.0e{exponent}"
        return text + ".0"
    return text


def to_json(value) -> str:
    """Compact JSON with durable-safe numbers (used for rule definitions and facts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json_number(float(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_fact(fact: Mapping, sid: str, keys: Iterable[str] | None = None) -> str:
    """The JSON text of a fact for ``assert_fact`` (``sid`` and ``id`` added); only ``keys`` when given."""
    parts = ['{"sid":"', sid, '","id":"f"']
    append = parts.append
    for key in fact if keys is None else keys:
        value = fact[key]
        t = type(value)
        if t is bool:
            text = "true" if value else "false"
        elif t is str:
            text = f'"{value}"' if _plain_text(value) else json.dumps(value, ensure_ascii=False)
        elif t is float:
            text = repr(value)
            if "." not in text or "e" in text:
                text = json_number(value)
        else:
            text = json_number(value)
        append(f',"{key}":{text}')
    append("}")
    return "".join(parts)


_plain_text = re.compile(r'[^"\\\x00-\x1f]*\Z').match


class FactEncoder:
    """``encode_fact`` for a fixed list of fields with known kinds, through one %-format (the fact
    is encoded on every decision): numbers first, then yes/no, then text."""

    _odd_number = re.compile(r':-?[0-9.]+e|:-?inf|:nan').search  # repr() that JSON/durable rejects

    def __init__(self, fields: Mapping[str, str]):
        by_kind = {kind: [k for k, v in fields.items() if v == kind] for kind in ("num", "bool", "str")}
        self.keys = tuple(by_kind["num"] + by_kind["bool"] + by_kind["str"])
        self._numbers = values_of(by_kind["num"])
        self._bools = values_of(by_kind["bool"])
        self._texts = values_of(by_kind["str"])
        self._format = '{"sid":"%s","id":"f"' + "".join(
            f',"{k}":%r' if kind == "num" else f',"{k}":%s' for kind in ("num", "bool", "str")
            for k in by_kind[kind]) + "}"

    def encode(self, fact: Mapping, sid: str) -> str:
        texts = [f'"{v}"' if _plain_text(v) else json.dumps(v, ensure_ascii=False) for v in self._texts(fact)]
        text = self._format % (sid, *self._numbers(fact), *map(_JSON_BOOL.__getitem__, self._bools(fact)), *texts)
        if self._odd_number(text):
            return encode_fact(fact, sid, self.keys)
        return text


_JSON_BOOL = {True: "true", False: "false"}


def values_of(keys: list[str]):
    """A function returning the values of ``keys`` in a mapping as a tuple (``operator.itemgetter``,
    which returns a bare value for one key)."""
    if not keys:
        return lambda fact: ()
    if len(keys) == 1:
        key = keys[0]
        return lambda fact: (fact[key],)
    return operator.itemgetter(*keys)


def _finite(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


@numba.njit(cache=True, nogil=True)
def _round7(values: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    for i in range(values.shape[0]):
        v = values[i]
        if v == 0.0 or not np.isfinite(v):
            out[i] = 0.0
            continue
        a = abs(v)
        e = int(np.floor(np.log10(a)))
        if 10.0 ** e > a:  # log10 may be off by one next to a power of ten
            e -= 1
        elif 10.0 ** (e + 1) <= a:
            e += 1
        k = 6 - e  # round to k decimals
        if k < 0:
            scale = 10.0 ** (-k)
            out[i] = np.rint(v / scale) * scale
        elif k <= 22:
            scale = 10.0 ** k
            out[i] = np.rint(v * scale) / scale
        else:
            out[i] = np.rint(v * 1e22 * 10.0 ** (k - 22)) / 1e22 / 10.0 ** (k - 22)


def round7(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to 7 significant digits, non-finite ones to 0.

    The same as ``float(f"{v:.7g}")`` for every float32 value from 1e-6 up (the products and
    quotients involved are exact there), which is what profiles hold; tested in test_rule_runtime.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty_like(values)
    _round7(values, out)
    return out


def _text(value) -> str:
    if value is None:
        return ""
    return str(value)[:MAX_TEXT]
