"""Is the contract in ``proto/`` still wire- and JSON-compatible with the last released one?

The released contract is a descriptor set committed at ``proto/released/nba.v1.binpb`` (written by
``python -m engine.serving.protogen --release`` when a version is released). ``breaking_changes``
compares two descriptor sets and names every change a v1 client could trip over (proto/README.md, "What
may change within v1"); ``python -m engine.serving.proto_compat`` checks ``proto/`` against the released
set and exits 1 listing them. ``tests/test_proto_compat.py`` runs the check in CI.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2 as d

from engine.errors import NbaError

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTOS = ("nba/v1/nba.proto",)
RELEASED = PROTO_DIR / "released" / "nba.v1.binpb"

F = d.FieldDescriptorProto
_TYPE_NAMES = {v: k.removeprefix("TYPE_").lower() for k, v in F.Type.items()}


class ProtoCompileError(NbaError):
    """protoc refused the .proto files."""


def descriptor_set(proto_dir: Path = PROTO_DIR, protos: Iterable[str] = PROTOS) -> d.FileDescriptorSet:
    """The descriptors protoc compiles from ``protos`` under ``proto_dir`` (imports included, no source
    info: the bytes depend on the contract only)."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        if protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", "--include_imports",
                        f"--descriptor_set_out={out}", *protos]) != 0:
            raise ProtoCompileError(f"protoc failed on {', '.join(protos)} in {proto_dir}")
        return d.FileDescriptorSet.FromString(out.read_bytes())


def released_set(path: Path = RELEASED) -> d.FileDescriptorSet:
    return d.FileDescriptorSet.FromString(path.read_bytes())


def _messages(prefix: str, messages: Iterable[d.DescriptorProto]) -> Iterator[tuple[str, d.DescriptorProto]]:
    for m in messages:
        name = f"{prefix}.{m.name}"
        yield name, m
        yield from _messages(name, m.nested_type)


class _Contract:
    """One descriptor set's messages, enums and services by full name (".nba.v1.DecideRequest"); map
    entry messages apart, since they are part of their map field's type."""

    def __init__(self, files: d.FileDescriptorSet) -> None:
        self.messages: dict[str, d.DescriptorProto] = {}
        self.map_entries: dict[str, d.DescriptorProto] = {}
        self.enums: dict[str, d.EnumDescriptorProto] = {}
        self.services: dict[str, d.ServiceDescriptorProto] = {}
        for f in files.file:
            if f.package.startswith("google.protobuf"):
                continue  # well-known types change with protobuf, not with us
            prefix = f".{f.package}" if f.package else ""
            self.enums.update((f"{prefix}.{e.name}", e) for e in f.enum_type)
            for name, m in _messages(prefix, f.message_type):
                (self.map_entries if m.options.map_entry else self.messages)[name] = m
                self.enums.update((f"{name}.{e.name}", e) for e in m.enum_type)
            self.services.update((f"{prefix}.{s.name}", s) for s in f.service)

    def type(self, field: d.FieldDescriptorProto) -> str:
        entry = self.map_entries.get(field.type_name)
        if entry is not None:
            key, value = entry.field
            return f"map<{self.type(key)}, {self.type(value)}>"
        return field.type_name.lstrip(".") if field.type_name else _TYPE_NAMES[field.type]

    def cardinality(self, field: d.FieldDescriptorProto) -> str:
        if field.label == F.LABEL_REPEATED:
            return "map" if field.type_name in self.map_entries else "repeated"
        return "optional" if field.proto3_optional else "singular"


def _reserved(ranges: Iterable[d.DescriptorProto.ReservedRange | d.EnumDescriptorProto.EnumReservedRange],
              number: int, end_inclusive: bool) -> bool:
    return any(r.start <= number < r.end + (1 if end_inclusive else 0) for r in ranges)


def _oneof(message: d.DescriptorProto, field: d.FieldDescriptorProto) -> str:
    """The real oneof a field belongs to ("" for none; proto3 ``optional``'s synthetic oneof is not one)."""
    if not field.HasField("oneof_index") or field.proto3_optional:
        return ""
    return message.oneof_decl[field.oneof_index].name


def _message_changes(name: str, old: d.DescriptorProto, new: d.DescriptorProto, before: _Contract,
                     after: _Contract) -> Iterator[str]:
    name = name.lstrip(".")
    new_by_number = {f.number: f for f in new.field}
    new_by_name = {f.name: f for f in new.field}
    for was in old.field:
        now = new_by_number.get(was.number)
        if now is None:
            moved = new_by_name.get(was.name)
            if moved is not None:
                yield (f"{name}.{was.name}: field number changed {was.number} -> {moved.number} (a renumbered field "
                       f"is a different field on the wire; keep {was.number})")
            elif not (_reserved(new.reserved_range, was.number, False) and was.name in new.reserved_name):
                yield (f"{name}.{was.name} = {was.number}: field removed without reserving it; add "
                       f'`reserved {was.number};` and `reserved "{was.name}";`')
            continue
        label = f"{name}.{was.name} = {was.number}"
        if now.name != was.name:
            yield (f"{label}: renamed to {now.name} (field number {was.number} unchanged; the JSON name changes, "
                   "so JSON clients break)")
        elif now.json_name != was.json_name:
            yield f"{label}: JSON name changed {was.json_name!r} -> {now.json_name!r}"
        if after.type(now) != before.type(was):
            yield f"{label}: type changed {before.type(was)} -> {after.type(now)}"
        if after.cardinality(now) != before.cardinality(was):
            yield f"{label}: cardinality changed {before.cardinality(was)} -> {after.cardinality(now)}"
        if _oneof(new, now) != _oneof(old, was):
            yield (f"{label}: oneof membership changed {_oneof(old, was) or '(none)'} -> "
                   f"{_oneof(new, now) or '(none)'}")
    yield from _reuses(name, "field", old, old.field, new.field, enum=False)


def _reuses(name: str, what: str, old: Any, was: Sequence[Any], now: Sequence[Any], enum: bool) -> Iterator[str]:
    """New fields or enum values (``now``) that take a number or name the released ``old`` reserved."""
    numbers, names = {w.number for w in was}, {w.name for w in was}
    for item in now:
        if item.number not in numbers and _reserved(old.reserved_range, item.number, enum):
            yield f"{name}.{item.name} = {item.number}: reuses {what} number {item.number}, reserved in the released contract"
        if item.name in old.reserved_name and item.name not in names:
            yield (f"{name}.{item.name} = {item.number}: reuses the reserved {'enum value' if enum else 'field'} "
                   f"name {item.name!r}")


def _enum_changes(name: str, old: d.EnumDescriptorProto, new: d.EnumDescriptorProto) -> Iterator[str]:
    name = name.lstrip(".")
    new_by_number = {v.number: v for v in new.value}
    new_by_name = {v.name: v for v in new.value}
    for was in old.value:
        now = new_by_number.get(was.number)
        if now is None:
            moved = new_by_name.get(was.name)
            if moved is not None:
                yield f"{name}.{was.name}: enum value number changed {was.number} -> {moved.number}"
            elif not (_reserved(new.reserved_range, was.number, True) and was.name in new.reserved_name):
                yield (f"{name}.{was.name} = {was.number}: enum value removed without reserving it; add "
                       f'`reserved {was.number};` and `reserved "{was.name}";`')
        elif now.name != was.name and was.name not in new_by_name:  # an added alias is not a rename
            yield f"{name}.{was.name} = {was.number}: renamed to {now.name} (JSON carries enum names)"
    yield from _reuses(name, "enum", old, old.value, new.value, enum=True)


def _service_changes(name: str, old: d.ServiceDescriptorProto, new: d.ServiceDescriptorProto) -> Iterator[str]:
    name = name.lstrip(".")
    methods = {m.name: m for m in new.method}
    for was in old.method:
        now = methods.get(was.name)
        if now is None:
            yield f"{name}.{was.name}: method removed (deprecate it with `option deprecated = true;` instead)"
            continue
        for what, before, after in (("request type", was.input_type, now.input_type),
                                    ("response type", was.output_type, now.output_type)):
            if before != after:
                yield f"{name}.{was.name}: {what} changed {before.lstrip('.')} -> {after.lstrip('.')}"
        for what, before_s, after_s in (("client streaming", was.client_streaming, now.client_streaming),
                                        ("server streaming", was.server_streaming, now.server_streaming)):
            if before_s != after_s:
                yield f"{name}.{was.name}: {what} changed {before_s} -> {after_s}"


def breaking_changes(released: d.FileDescriptorSet, current: d.FileDescriptorSet) -> list[str]:
    """Every change from ``released`` to ``current`` that v1 clients could break on, one line each naming
    the message, field or method and the numbers; empty when ``current`` is a compatible v1 evolution."""
    before, after = _Contract(released), _Contract(current)
    problems: list[str] = []
    for name, old in before.messages.items():
        if name not in after.messages:
            problems.append(f"{name.lstrip('.')}: message removed (clients that use it break; deprecate it instead)")
        else:
            problems.extend(_message_changes(name, old, after.messages[name], before, after))
    for name, old_enum in before.enums.items():
        if name not in after.enums:
            problems.append(f"{name.lstrip('.')}: enum removed")
        else:
            problems.extend(_enum_changes(name, old_enum, after.enums[name]))
    for name, old_service in before.services.items():
        if name not in after.services:
            problems.append(f"{name.lstrip('.')}: service removed")
        else:
            problems.extend(_service_changes(name, old_service, after.services[name]))
    return problems


def main() -> int:
    problems = breaking_changes(released_set(), descriptor_set())
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{len(problems)} breaking change(s) from {RELEASED.relative_to(ROOT)}: see proto/README.md", file=sys.stderr)
        return 1
    print(f"{', '.join(PROTOS)} is compatible with {RELEASED.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
