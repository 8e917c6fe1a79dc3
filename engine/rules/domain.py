"""``domain.yaml``: the business's data model (attributes, derived features, channels, action types).

Loaded through the rule loader's validators, so every error names file:line:col. Derived features are
formulas in the condition language's arithmetic, compiled here to one postfix program (never to
Python) that ``engine/models/derived.py`` runs in a numba kernel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from engine.features import (
    CONSENT,
    OP_ABS,
    OP_ADD,
    OP_BUCKET,
    OP_BUCKET_DOWN,
    OP_CLAMP,
    OP_CONST,
    OP_DAYS_SINCE,
    OP_DERIVED,
    OP_DIV,
    OP_EXP,
    OP_LOG,
    OP_MAX,
    OP_MIN,
    OP_MUL,
    OP_NEG,
    OP_SAVE,
    OP_STORED,
    OP_SUB,
    ActionType,
    Channel,
    FeatureSchema,
    Program,
)
from engine.rules.checker import IDENT
from engine.rules.errors import ConditionError, RuleError, suggest
from engine.rules.nodes import Arith, Call, Name, Neg, Node, Num
from engine.rules.parser import parse

if TYPE_CHECKING:
    from engine.rules.yamlsrc import Loc

DOMAIN_FILE = "domain.yaml"
DOMAIN_KEYS = {"attributes": True, "derived": False, "channels": True, "action_types": True, "description": False}
ATTRIBUTE_KEYS = {"type": True, "default": False, "min": False, "max": False, "levels": False, "members": False,
                  "description": False}
ATTRIBUTE_TYPES = ("number", "date", "category", "set")
DERIVED_KEYS = {"formula": True, "description": False}
CHANNEL_KEYS = {"direction": True, "quiet_hours": False, "description": False}
TYPE_KEYS = {"needs_consent": False, "quiet_hours": False, "description": False}
# Names the rule language gives a meaning of its own: no attribute may take them.
RESERVED = frozenset({"channel", "touchpoint", "has_consent", "context", "holds", "consent", "trigger", "true",
                      "false", "and", "or", "not", "in", "today", "now"})
FORMULAS = {
    "min": "min(a, b, ...): the smallest", "max": "max(a, b, ...): the largest",
    "clamp": "clamp(x, low, high): x kept between low and high", "exp": "exp(x)",
    "log": "log(x): natural logarithm, 0 when x is not above 0", "abs": "abs(x)",
    "bucket": "bucket(x, 200, 500, 900): 1 below the first cut point, 2 from it, ... (cut points ascending)",
    "bucket_down": "bucket_down(x, 365, 90, 30): 1 above the first cut point, 2 at it or below, ... (descending)",
    "days_since": "days_since(date_attribute, fallback): days from that date to the decision, fallback when unknown",
}
_ARITH = {"+": OP_ADD, "-": OP_SUB, "*": OP_MUL, "/": OP_DIV}
_UNARY = {"exp": OP_EXP, "log": OP_LOG, "abs": OP_ABS}


def load_domain(loader) -> FeatureSchema | None:
    """The domain declared in ``domain.yaml`` (None when it has errors; they go to ``loader``)."""
    errors_before = len(loader.errors)
    if not loader.has(DOMAIN_FILE):
        loader.err(RuleError(str(loader.dir / DOMAIN_FILE), 1, 1, "file not found",
                             "every rule directory declares its customer attributes, channels and action types "
                             "there (see rules/README.md)"))
        return None
    tree = loader.yaml(DOMAIN_FILE)
    top = loader.keys(tree, DOMAIN_KEYS, DOMAIN_FILE) if tree is not None else None
    if not top:
        return None
    channels = _channels(loader, top.get("channels"))
    types = _types(loader, top.get("action_types"))
    numeric, categorical, sets, dates, defaults, bounds, docs = _attributes(loader, top.get("attributes"))
    sets[CONSENT] = tuple(c.name for c in channels)
    derived, formulas, program = _derived(loader, top.get("derived"), numeric, dates, set(categorical) | set(sets),
                                          docs)
    if len(loader.errors) > errors_before:
        return None
    return FeatureSchema(numeric=tuple(numeric), derived=tuple(derived), categorical=categorical, sets=sets,
                         channels=tuple(channels), action_types=tuple(types), dates=frozenset(dates),
                         defaults=defaults, bounds=bounds, docs=docs, formulas=formulas, program=program)


def _name(loader, name: str, loc: Loc, what: str, taken: set[str]) -> bool:
    if not IDENT.match(name):
        loader.err(loc.key_error(f'{what} name "{name}" must be lower case letters, digits and _, starting with a letter'))
        return False
    if name in RESERVED or "__" in name:
        loader.err(loc.key_error(f'{what} name "{name}" is reserved by the rule language', "choose another name"))
        return False
    if name in taken:
        loader.err(loc.key_error(f'"{name}" is declared twice', "attributes and derived features share one namespace"))
        return False
    taken.add(name)
    return True


def _entries(loader, loc: Loc | None, what: str, singular: str, keys: dict[str, bool], taken: set[str],
             examples: dict[str, str] | None = None, required: bool = True,
             bare: bool = False) -> Iterator[tuple[str, Loc, dict[str, Loc]]]:
    """(name, item, fields) of every entry of the mapping ``what`` that is well named and whose keys check
    out (``bare``: an entry may have no value); ``required``: an empty mapping is an error."""
    items = loader.mapping(loc, what) or {}
    if required and loc is not None and loc.is_map and not items:
        loader.err(loc.error(f"declare at least one {singular}"))
    for name, item in items.items():
        if not _name(loader, name, item, singular, taken):
            continue
        fields = {} if bare and item.value is None else loader.keys(item, keys, f'{singular} "{name}"', examples)
        if fields is not None:
            yield name, item, fields


def _flag(loader, loc: Loc | None, what: str, default: bool) -> bool:
    if loc is None:
        return default
    if not isinstance(loc.value, bool):
        loader.err(loc.error(f"expected true or false for {what}"))
        return default
    return loc.value


def _channels(loader, loc: Loc | None) -> list[Channel]:
    out: list[Channel] = []
    for name, _item, fields in _entries(loader, loc, "channels", "channel", CHANNEL_KEYS, set(),
                                        {"direction": "inbound"}):
        if "direction" not in fields:
            continue
        direction = loader.text(fields["direction"], f'channel "{name}" direction')
        if direction not in ("inbound", "outbound", "both"):
            loader.err(fields["direction"].error(f'direction "{direction}" is not inbound, outbound or both',
                                                 "inbound: the customer comes to us; outbound: we send"))
            continue
        out.append(Channel(name, direction != "outbound", direction != "inbound",
                           _flag(loader, fields.get("quiet_hours"), f'channel "{name}" quiet_hours', True),
                           loader.text(fields.get("description"), "description")))
    return out


def _types(loader, loc: Loc | None) -> list[ActionType]:
    out: list[ActionType] = []
    for name, _item, fields in _entries(loader, loc, "action_types", "action type", TYPE_KEYS, set(), bare=True):
        out.append(ActionType(name, _flag(loader, fields.get("needs_consent"), f'action type "{name}" needs_consent', True),
                              _flag(loader, fields.get("quiet_hours"), f'action type "{name}" quiet_hours', True),
                              loader.text(fields.get("description"), "description")))
    return out


def _members(loader, loc: Loc, what: str) -> tuple[str, ...]:
    out: list[str] = []
    for value, item in loader.names(loc, what):
        if "," in value or value != value.strip() or len(value) > 64:
            loader.err(item.error(f'"{value}" in {what}: at most 64 characters, no commas, no spaces around'))
        elif value in out:
            loader.err(item.error(f'"{value}" is listed twice in {what}'))
        else:
            out.append(value)
    if not out:
        loader.err(loc.error(f"{what} must list at least one value"))
    return tuple(out)


def _attributes(loader, loc: Loc | None):
    numeric: list[str] = []
    categorical: dict[str, tuple[str, ...]] = {}
    sets: dict[str, tuple[str, ...]] = {}
    dates: list[str] = []
    defaults: dict[str, float | str] = {}
    bounds: dict[str, tuple[float | None, float | None]] = {}
    docs: dict[str, str] = {}
    for name, item, fields in _entries(loader, loc, "attributes", "attribute", ATTRIBUTE_KEYS, set(),
                                       {"type": "number"}):
        what = f'attribute "{name}"'
        if "type" not in fields:
            continue
        kind = loader.text(fields["type"], f"{what} type")
        if kind not in ATTRIBUTE_TYPES:
            loader.err(fields["type"].error(f'{what} type "{kind}" is not one of: {", ".join(ATTRIBUTE_TYPES)}',
                                            suggest(kind, ATTRIBUTE_TYPES)))
            continue
        allowed = {"number": ("default", "min", "max"), "date": (), "category": ("levels", "default"),
                   "set": ("members",)}[kind]
        for key in ("default", "min", "max", "levels", "members"):
            if key in fields and key not in allowed:
                loader.err(fields[key].key_error(f'{what} is a {kind}: "{key}" does not apply'))
        if "description" in fields:
            docs[name] = loader.text(fields["description"], "description")
        if kind in ("number", "date"):
            numeric.append(name)
            if kind == "date":
                dates.append(name)
                defaults[name] = math.nan  # unknown until written
                continue
            low = loader.number(fields.get("min"), f"{what} min")
            high = loader.number(fields.get("max"), f"{what} max")
            if low is not None and high is not None and low > high:
                loader.err(fields["min"].error(f"{what} min is above its max"))
            if low is not None or high is not None:
                bounds[name] = (low, high)
            default = loader.number(fields.get("default"), f"{what} default")
            defaults[name] = float(default or 0.0)
            if (low is not None and defaults[name] < low) or (high is not None and defaults[name] > high):
                loader.err((fields.get("default") or item).error(
                    f"{what} default {defaults[name]:g} is outside its min..max",
                    "give a default within them (unknown customers and older profiles take it)"))
        elif kind == "category":
            if "levels" not in fields:
                loader.err(item.error(f'{what} is missing "levels"', "add it, e.g. levels: [basic, premium]"))
                continue
            levels = _members(loader, fields["levels"], f"{what} levels")
            categorical[name] = levels
            if "default" in fields:
                default_level = loader.text(fields["default"], f"{what} default")
                if default_level not in levels:
                    loader.err(fields["default"].error(f'{what} default "{default_level}" is not one of its levels',
                                                       suggest(default_level, levels) or ", ".join(levels)))
                defaults[name] = default_level
        else:
            if name == CONSENT:
                loader.err(item.key_error(f'"{CONSENT}" is built in: the channels a customer consented to'))
                continue
            if "members" not in fields:
                loader.err(item.error(f'{what} is missing "members"', "add it, e.g. members: [savings, card]"))
                continue
            sets[name] = _members(loader, fields["members"], f"{what} members")
    return numeric, categorical, sets, dates, defaults, bounds, docs


def _derived(loader, loc: Loc | None, numeric: list[str], dates: list[str], others: set[str],
             docs: dict[str, str]) -> tuple[list[str], dict[str, str], Program]:
    names: list[str] = []
    formulas: dict[str, str] = {}
    code: list[tuple[int, float]] = []
    cuts: list[tuple[float, ...]] = []
    depth = 1
    order = list(loc.value) if loc is not None and loc.is_map else []
    for name, _item, fields in _entries(loader, loc, "derived", "derived feature", DERIVED_KEYS,
                                        set(numeric) | others, {"formula": "'revenue_12m / 12'"}, required=False):
        later = set(order[order.index(name) + 1:])  # declared below this one
        if "formula" not in fields:
            continue
        text = loader.text(fields["formula"], f'derived feature "{name}" formula')
        if not text:
            continue
        if "description" in fields:
            docs[name] = loader.text(fields["description"], "description")
        compiler = _Formula(numeric, dates, names, later, others)
        try:
            compiler.emit(parse(text))
        except ConditionError as parse_error:
            compiler.errors.append(parse_error)
        for err in compiler.errors:
            loader.err(fields["formula"].error_at(err.pos, err.message, err.hint))
        if compiler.errors:
            continue
        base = len(cuts)
        code += [(op, arg + base if op in (OP_BUCKET, OP_BUCKET_DOWN) else arg) for op, arg in compiler.code]
        code.append((OP_SAVE, float(len(names))))
        cuts += compiler.cuts
        depth = max(depth, compiler.depth)
        names.append(name)
        formulas[name] = text
    return names, formulas, Program(tuple(code), tuple(cuts), depth)


class _Formula:
    """Compiles one formula's tree to postfix code, collecting errors (offsets into the formula)."""

    def __init__(self, numeric: list[str], dates: list[str], derived: list[str], later: set[str], others: set[str]):
        self.numeric, self.dates, self.derived, self.later, self.others = numeric, dates, derived, later, others
        self.code: list[tuple[int, float]] = []
        self.cuts: list[tuple[float, ...]] = []
        self.errors: list[ConditionError] = []
        self.height = self.depth = 0

    def push(self, op: int, arg: float = 0.0, pops: int = 0) -> None:
        self.code.append((op, arg))
        self.height += 1 - pops
        self.depth = max(self.depth, self.height)

    def fail(self, node: Node, message: str, hint: str = "") -> None:
        self.errors.append(ConditionError(node.pos, node.end, message, hint))

    def emit(self, node: Node) -> None:
        if isinstance(node, Num):
            self.push(OP_CONST, float(node.value))
        elif isinstance(node, Name):
            self.name(node)
        elif isinstance(node, Neg):
            self.emit(node.operand)
            self.push(OP_NEG, pops=1)
        elif isinstance(node, Arith):
            self.emit(node.left)
            self.emit(node.right)
            self.push(_ARITH[node.op], pops=2)
        elif isinstance(node, Call):
            self.call(node)
        else:
            self.fail(node, "a formula is arithmetic on numbers", "use + - * /, numbers, attributes and "
                      + ", ".join(FORMULAS))
            self.push(OP_CONST, 0.0)

    def name(self, node: Name) -> None:
        name = node.name
        if name in self.dates:
            self.fail(node, f'"{name}" is a date', f"write days_since({name}, <days when unknown>)")
        elif name in self.numeric:
            self.push(OP_STORED, float(self.numeric.index(name)))
            return
        elif name in self.derived:
            self.push(OP_DERIVED, float(self.derived.index(name)))
            return
        elif name in self.later:
            self.fail(node, f'derived feature "{name}" is declared below this one',
                      "a formula may use the derived features declared above it")
        elif name in self.others:
            self.fail(node, f'"{name}" is not a number', "formulas use number attributes and derived features")
        else:
            self.fail(node, f'unknown attribute "{name}"',
                      suggest(name, [*self.numeric, *self.derived]) or "declare it under attributes:")
        self.push(OP_CONST, 0.0)

    def constant(self, node: Node) -> float | None:
        value = -node.operand.value if isinstance(node, Neg) and isinstance(node.operand, Num) else (
            node.value if isinstance(node, Num) else None)
        if value is None:
            self.fail(node, "expected a fixed number here")
        return value

    def call(self, node: Call) -> None:
        func, args = node.func, node.args
        if func not in FORMULAS:
            self.fail(node, f'unknown function "{func}"', suggest(func, FORMULAS) or "functions: " + ", ".join(FORMULAS))
            self.push(OP_CONST, 0.0)
            return
        usage = FORMULAS[func].split(":")[0]
        arity = {"clamp": 3, "days_since": 2, **{f: 1 for f in _UNARY}}.get(func)
        if (arity is not None and len(args) != arity) or (arity is None and len(args) < 2):
            self.fail(node, f"{func}() takes {arity or 'at least 2'} arguments", f"write {usage}")
            self.push(OP_CONST, 0.0)
            return
        if func in ("bucket", "bucket_down"):
            self.emit(args[0])
            points = [self.constant(a) for a in args[1:]]
            if all(p is not None for p in points):
                ordered = sorted(points) if func == "bucket" else sorted(points, reverse=True)  # type: ignore[type-var]
                if points != ordered or len(set(points)) != len(points):
                    self.fail(node, f"{func}() cut points must be strictly "
                              + ("ascending" if func == "bucket" else "descending"), f"write {usage}")
            self.cuts.append(tuple(float(p or 0.0) for p in points))
            self.push(OP_BUCKET if func == "bucket" else OP_BUCKET_DOWN, float(len(self.cuts) - 1), pops=1)
        elif func == "days_since":
            date = args[0]
            if not (isinstance(date, Name) and date.name in self.dates):
                self.fail(date, "days_since() takes a date attribute first",
                          ("dates: " + ", ".join(self.dates)) if self.dates else "declare one with type: date")
                self.push(OP_CONST, math.nan)
            else:
                self.push(OP_STORED, float(self.numeric.index(date.name)))
            self.emit(args[1])
            self.push(OP_DAYS_SINCE, pops=2)
        elif func == "clamp":
            for arg in args:
                self.emit(arg)
            self.push(OP_CLAMP, pops=3)
        elif func in _UNARY:
            self.emit(args[0])
            self.push(_UNARY[func], pops=1)
        else:  # min, max of two or more
            self.emit(args[0])
            for arg in args[1:]:
                self.emit(arg)
                self.push(OP_MIN if func == "min" else OP_MAX, pops=2)
