"""Partial profile updates: some attributes of one customer, checked against the schema, written at once.

``check_update`` turns attribute values (as a caller gives them) into a ``Change`` or raises
``InvalidAttribute`` naming the first bad one; nothing is written then. ``apply_update`` writes a change
with one script on the customer's profile hash: the numbers are spliced into the packed vector, the
categories and sets replace their fields, and a customer without a profile gets one with the declared
defaults first. A profile packed in an older layout is first rewritten in the current one (``migrate``,
compare-and-set on its layout), so an update never misreads or mixes layouts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import cast

import numpy as np

from engine.errors import NbaError
from engine.features import FeatureSchema
from engine.store.profiles import (
    SCHEMA_VERSION,
    Profile,
    ProfileStore,
    SchemaMismatch,
    customer_ids,
    encode_profile,
    profile_key,
)

DAY_SECONDS = 86_400.0
MAX_MEMBER = 64

# ARGV: layout, create_only, packed width in bytes, the default hash (n fields, then pairs), numeric
# splices (n, then name, byte offset, 4 bytes), field sets (n, then name, value). Returns
# {created, status, changed names...}; status 0 ok, 1 exists (create_only), 2 packed in another layout.
_UPDATE = """
local layout, create_only, width = ARGV[1], ARGV[2], tonumber(ARGV[3])
local i = 4
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and create_only == '1' then return {0, 1} end
local n = tonumber(ARGV[i]); i = i + 1
local num
if exists then
  local stored = redis.call('HMGET', KEYS[1], 'layout', 'num', 'schema')
  num = stored[2] or ''
  if stored[3] ~= '1' then return {0, 2} end
  -- no layout recorded: written before layouts were, read as the current one when its width is
  if stored[1] ~= layout and (stored[1] or string.len(num) ~= width) then return {0, 2} end
  i = i + 2 * n
else
  local pairs_ = {}
  for k = 0, n - 1 do
    table.insert(pairs_, ARGV[i + 2 * k]); table.insert(pairs_, ARGV[i + 2 * k + 1])
    if ARGV[i + 2 * k] == 'num' then num = ARGV[i + 2 * k + 1] end
  end
  redis.call('HSET', KEYS[1], unpack(pairs_))
  i = i + 2 * n
end
local changed = {exists and 0 or 1, 0}
local splices = tonumber(ARGV[i]); i = i + 1
local touched = false
for k = 0, splices - 1 do
  local name, off, bytes = ARGV[i + 3 * k], tonumber(ARGV[i + 3 * k + 1]), ARGV[i + 3 * k + 2]
  if string.sub(num, off + 1, off + 4) ~= bytes then
    num = string.sub(num, 1, off) .. bytes .. string.sub(num, off + 5)
    table.insert(changed, name)
    touched = true
  end
end
i = i + 3 * splices
if touched then redis.call('HSET', KEYS[1], 'num', num, 'layout', layout) end
local sets = tonumber(ARGV[i]); i = i + 1
for k = 0, sets - 1 do
  local name, value = ARGV[i + 2 * k], ARGV[i + 2 * k + 1]
  if redis.call('HGET', KEYS[1], name) ~= value then
    redis.call('HSET', KEYS[1], name, value)
    table.insert(changed, name)
  end
end
return changed
"""
# Rewrites a profile whole when it is still packed in the layout it was read in (ARGV[1]; "" for none).
_MIGRATE = """
local layout = redis.call('HGET', KEYS[1], 'layout') or ''
if layout ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


class InvalidAttribute(NbaError, ValueError):
    """A value the schema does not admit; ``field`` is ``attributes.<name>``."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"attributes.{name}: {message}")
        self.field = f"attributes.{name}"


class ProfileExists(NbaError):
    """``create_only`` and the customer already has a profile."""


@dataclass(frozen=True)
class Change:
    """What an update writes: packed numbers by attribute, and hash fields (categories, sets)."""

    numbers: dict[str, float] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.numbers or self.fields)


def epoch_days(value: date | datetime) -> float:
    """A date attribute's stored value: days since 1970-01-01 UTC (a time without an offset is UTC)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp() / DAY_SECONDS
    return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp() / DAY_SECONDS


def _date_days(name: str, value: object) -> float:
    if isinstance(value, date):
        return epoch_days(value)
    if isinstance(value, str):
        try:
            return epoch_days(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
    raise InvalidAttribute(name, f"expected a date (YYYY-MM-DD or an ISO timestamp), got {str(value)[:40]!r}")


def _number(schema: FeatureSchema, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidAttribute(name, f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidAttribute(name, f"expected a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise InvalidAttribute(name, "expected a finite number")
    low, high = schema.bounds.get(name, (None, None))
    if (low is not None and number < low) or (high is not None and number > high):
        raise InvalidAttribute(name, f"{number:g} is outside {'' if low is None else f'{low:g}'}.."
                                     f"{'' if high is None else f'{high:g}'}")
    return number


def _members(schema: FeatureSchema, name: str, value: object) -> str:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidAttribute(name, "expected a list of members")
    members = set()
    known = schema.sets[name]
    for member in cast("Iterable[object]", value):
        if not isinstance(member, str) or member not in known:
            shown = str(member)[:MAX_MEMBER]
            raise InvalidAttribute(name, f"unknown member {shown!r}; members: {', '.join(known)}")
        members.add(member)
    return ",".join(sorted(members))


def check_update(schema: FeatureSchema, values: Mapping[str, object]) -> Change:
    """The change ``values`` make (attribute -> value; None sets the declared default), or
    ``InvalidAttribute`` for the first value the schema does not admit."""
    numbers: dict[str, float] = {}
    fields: dict[str, str] = {}
    for name, value in values.items():
        if name in schema.numeric:
            if value is None:
                numbers[name] = float(schema.defaults.get(name, 0.0))
            elif name in schema.dates:
                numbers[name] = _date_days(name, value)
            else:
                numbers[name] = _number(schema, name, value)
        elif name in schema.categorical:
            if value is None:
                fields[name] = str(schema.defaults.get(name, ""))
            elif not isinstance(value, str) or value not in schema.categorical[name]:
                raise InvalidAttribute(name, f"unknown level {str(value)[:MAX_MEMBER]!r}; levels: "
                                             + ", ".join(schema.categorical[name]))
            else:
                fields[name] = value
        elif name in schema.sets:
            fields[name] = "" if value is None else _members(schema, name, value)
        else:
            known = [*schema.numeric, *schema.categorical, *schema.sets]
            if name in schema.derived:
                raise InvalidAttribute(name, "is a derived feature: it is computed, not stored")
            raise InvalidAttribute(name, "unknown attribute; domain.yaml declares: " + ", ".join(known))
    return Change(numbers, fields)


def _hash_args(fields: Mapping[str, bytes | str | int]) -> list[bytes | str | int]:
    out: list[bytes | str | int] = []
    for name, value in fields.items():
        out += (name, value)
    return out


def migrate(store: ProfileStore, customer_id: str, schema: FeatureSchema) -> bool:
    """Rewrite one profile in ``schema``'s layout if it is packed in another (read by name, defaults for
    what it lacks); True when it was rewritten. Safe against concurrent writers: the rewrite happens only
    if the profile is still in the layout it was read in."""
    key = profile_key(customer_id)
    for _ in range(5):
        raw = cast("dict[bytes, bytes]", store.client.hgetall(key))
        layout = raw.get(b"layout", b"").decode()
        if not raw or layout == schema.layout():
            return False
        profile = store.decode(customer_id, raw, {}, 0, schema)  # SchemaMismatch: a layout nobody recorded
        store.register_layout(schema)
        if store.client.eval(_MIGRATE, 1, key, layout, *_hash_args(encode_profile(profile, schema))):
            return True
    raise SchemaMismatch(f"profile {customer_id} kept changing while it was migrated")


def apply_update(store: ProfileStore, customer_id: str, change: Change, schema: FeatureSchema,
                 create_only: bool = False) -> tuple[bool, list[str]]:
    """Write ``change`` to one customer's profile at once: (created, the attributes whose value changed).
    Raises ``ProfileExists`` with ``create_only`` when the customer has a profile."""
    store.register_layout(schema)
    default = encode_profile(Profile.cold(customer_id, schema), schema)
    index = {name: i for i, name in enumerate(schema.numeric)}
    splices: list[bytes | str | int] = []
    for name, value in change.numbers.items():
        splices += (name, 4 * index[name], np.array([value], dtype="<f4").tobytes())
    args: list[bytes | str | int] = [schema.layout(), "1" if create_only else "0", 4 * len(schema.numeric), len(default),
                                     *_hash_args(default), len(change.numbers), *splices,
                                     len(change.fields), *_hash_args(change.fields)]
    for _ in range(5):
        reply = cast("list", store.client.eval(_UPDATE, 1, profile_key(customer_id), *args))
        status = int(reply[1])
        if status == 1:
            raise ProfileExists(f"customer {customer_id} already has a profile")
        if status == 0:
            return bool(int(reply[0])), [r.decode() if isinstance(r, bytes) else str(r) for r in reply[2:]]
        migrate(store, customer_id, schema)  # another layout: rewrite it in this one, then update
    raise SchemaMismatch(f"profile {customer_id}: packing version {SCHEMA_VERSION} expected")


def census(store: ProfileStore, schema: FeatureSchema, batch: int = 1000) -> dict[str, int]:
    """How many stored profiles are packed in each layout (``""``: none recorded, written before layouts
    were), scanning every profile key; ``schema.layout()`` is the current one."""
    counts: dict[str, int] = {}
    ids = customer_ids(store.client)
    while chunk := list(itertools.islice(ids, batch)):
        pipe = store.client.pipeline(transaction=False)
        for cid in chunk:
            pipe.hget(profile_key(cid), "layout")
        for layout in pipe.execute():
            name = layout.decode() if isinstance(layout, bytes) else ""
            counts[name] = counts.get(name, 0) + 1
    return counts


def migrate_all(store: ProfileStore, schema: FeatureSchema,
                progress: Callable[[int, int], None] | None = None) -> tuple[int, list[str]]:
    """Rewrite every profile packed in another layout in ``schema``'s, online (each one compare-and-set,
    so a concurrent update or decision is never lost); (profiles migrated, the ids that could not be read:
    a layout nba:layouts does not hold)."""
    store.read_layouts()
    migrated, unreadable, seen = 0, [], 0
    for cid in customer_ids(store.client):
        seen += 1
        try:
            migrated += migrate(store, cid, schema)
        except SchemaMismatch:
            unreadable.append(cid)
        if progress is not None and seen % 1000 == 0:
            progress(seen, migrated)
    return migrated, unreadable


__all__ = ["Change", "InvalidAttribute", "ProfileExists", "apply_update", "census", "check_update", "epoch_days",
           "migrate", "migrate_all"]
