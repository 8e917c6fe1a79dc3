"""YAML files as trees that remember where every value is (file, line, column).

Built on ``yaml.compose`` (node marks) so errors can point at a key, a value, or a single character
inside a condition string, for plain, quoted and block scalars alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from engine.rules.errors import RuleError


@dataclass
class Source:
    path: str
    text: str
    lines: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.lines = self.text.splitlines()

    def error(self, line0: int, col0: int, message: str, hint: str = "") -> RuleError:
        """A RuleError at 0-based ``line0``/``col0``."""
        snippet = self.lines[line0] if 0 <= line0 < len(self.lines) else ""
        return RuleError(self.path, line0 + 1, col0 + 1, message, hint, snippet)


@dataclass
class Loc:
    """A YAML value with its node. ``value`` is dict[str, Loc] / list[Loc] / a Python scalar."""

    value: Any
    node: yaml.Node
    source: Source
    key_node: yaml.Node | None = None  # the key this value sits under, if any
    _positions: list[tuple[int, int]] | None = field(default=None, repr=False)

    @property
    def is_map(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    @property
    def is_seq(self) -> bool:
        return isinstance(self.node, yaml.SequenceNode)

    @property
    def is_scalar(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode)

    def plain(self) -> Any:
        """The value as plain Python data (dicts, lists, scalars)."""
        if self.is_map:
            return {k: v.plain() for k, v in self.value.items()}
        if self.is_seq:
            return [v.plain() for v in self.value]
        return self.value

    def error(self, message: str, hint: str = "") -> RuleError:
        mark = self.node.start_mark
        return self.source.error(mark.line, mark.column, message, hint)

    def key_error(self, message: str, hint: str = "") -> RuleError:
        node = self.key_node or self.node
        return self.source.error(node.start_mark.line, node.start_mark.column, message, hint)

    def where(self) -> str:
        """``file:line:col`` (1-based) of this value."""
        mark = self.node.start_mark
        return f"{self.source.path}:{mark.line + 1}:{mark.column + 1}"

    def error_at(self, offset: int, message: str, hint: str = "") -> RuleError:
        """A RuleError at character ``offset`` of this scalar's string value."""
        if self._positions is None:
            assert isinstance(self.node, yaml.ScalarNode)
            self._positions = _char_positions(self.source.text, self.node, str(self.value))
        offset = max(0, min(offset, len(self._positions) - 1))
        line0, col0 = self._positions[offset]
        return self.source.error(line0, col0, message, hint)


# libyaml when PyYAML has it (12x faster on the demo catalog; the same nodes and marks).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path, display: str | None = None,
              data: bytes | None = None) -> tuple[Loc | None, Source | None, list[RuleError]]:
    """Read (or take ``data``, the file's bytes as read before) and compose one YAML file.
    Returns (tree, source, errors)."""
    shown = display or str(path)
    try:
        text = path.read_text(encoding="utf-8") if data is None else data.decode("utf-8")
    except FileNotFoundError:
        return None, None, [RuleError(shown, 1, 1, "file not found")]
    except (OSError, UnicodeDecodeError) as err:
        return None, None, [RuleError(shown, 1, 1, f"cannot read the file: {err}")]
    source = Source(shown, text)
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, col = (mark.line, mark.column) if mark else (0, 0)
        problem = err.problem or "invalid YAML"
        hint = "check indentation and quoting; conditions with : or # must be in quotes"
        return None, source, [source.error(line, col, f"YAML syntax error: {problem}", hint)]
    except yaml.YAMLError as err:
        return None, source, [source.error(0, 0, f"YAML error: {err}")]
    if node is None:
        return None, source, [source.error(0, 0, "the file is empty")]
    errors: list[RuleError] = []
    # one constructor per file: a constructor remembers every node it built (``constructed_objects``),
    # so a shared one kept every rule file ever loaded alive (about 0.4 MB per reload)
    tree = _build(node, source, errors, None, SafeConstructor())
    return tree, source, errors


def _build(node: yaml.Node, source: Source, errors: list[RuleError], key_node, constructor: SafeConstructor,
           inside: set[int] | None = None) -> Loc:
    """``inside``: ids of the collections being built around ``node`` (an alias can make a cycle)."""
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        inside = set() if inside is None else inside
        if id(node) in inside:  # e.g. "a: &x [1, *x]"
            mark = node.start_mark
            errors.append(source.error(mark.line, mark.column, "this value contains an alias of itself",
                                       "an alias (*name) may only repeat a value that ends before it"))
            return Loc(None, yaml.ScalarNode("tag:yaml.org,2002:null", "", node.start_mark, node.end_mark), source, key_node)
        inside.add(id(node))
        try:
            return _build_collection(node, source, errors, key_node, constructor, inside)
        finally:
            inside.discard(id(node))
    try:
        value = constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError) as err:  # e.g. 2026-13-01 looks like a date but is none
        if node.tag != "tag:yaml.org,2002:timestamp":  # a bad date is reported where a date is expected
            errors.append(source.error(node.start_mark.line, node.start_mark.column, f"invalid value: {err}"))
        value = node.value
    return Loc(value, node, source, key_node)


def _build_collection(node: yaml.Node, source: Source, errors: list[RuleError], key_node, constructor: SafeConstructor,
                      inside: set[int]) -> Loc:
    if isinstance(node, yaml.MappingNode):
        items: dict[str, Loc] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                errors.append(source.error(k.start_mark.line, k.start_mark.column, "keys must be plain names"))
                continue
            key = k.value
            if key in items:
                errors.append(source.error(k.start_mark.line, k.start_mark.column, f'duplicate key "{key}"',
                                           "each key may appear once here; the later one would win silently"))
                continue
            items[key] = _build(v, source, errors, k, constructor, inside)
        return Loc(items, node, source, key_node)
    return Loc([_build(v, source, errors, None, constructor, inside) for v in node.value], node, source, key_node)


# --- mapping characters of a scalar's value back to the file ----------------------------------------
def _char_positions(text: str, node: yaml.ScalarNode, value: str) -> list[tuple[int, int]]:
    """(line0, col0) in the file for each character of ``value`` (plus one for its end)."""
    start, end = node.start_mark, node.end_mark
    raw = text[start.index : end.index]
    raw_pos: list[tuple[int, int]] = []
    line, col = start.line, start.column
    for ch in raw:
        raw_pos.append((line, col))
        if ch == "\n":
            line, col = line + 1, 0
        else:
            col += 1
    raw_pos.append((line, col))
    style = node.style
    p = 0
    if style in ("|", ">"):
        p = raw.find("\n") + 1 if "\n" in raw else len(raw)
    elif style in ("'", '"'):
        p = 1
    n = len(raw)
    out: list[tuple[int, int]] = []
    for ch in value:
        if p >= n:
            out.append(raw_pos[n])
            continue
        if style == '"' and raw[p] == "\\":
            out.append(raw_pos[p])
            p += _escape_length(raw, p)
            continue
        if raw[p] == ch:
            out.append(raw_pos[p])
            p += 1
            if style == "'" and ch == "'" and p < n and raw[p] == "'":
                p += 1
            continue
        if ch in " \n" and raw[p] in " \t\r\n":
            # a folded line break: the value has one space / newline where the file breaks the line
            out.append(raw_pos[p])
            while p < n and raw[p] in " \t\r\n":
                p += 1
            continue
        q = raw.find(ch, p)
        if q < 0:
            out.append(raw_pos[p])
            continue
        out.append(raw_pos[q])
        p = q + 1
    out.append(raw_pos[min(p, n)])
    return out


def _escape_length(raw: str, p: int) -> int:
    code = raw[p + 1 : p + 2]
    return {"x": 4, "u": 6, "U": 10}.get(code, 2)
