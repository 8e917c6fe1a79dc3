"""Decision records in a compact layout: one hash per hash slot and minute, one field per decision.

What ``RecordResponse`` needs of a decision (who, on which channel, what was presented as what, and the
responses recorded so far) lives in ``nba:decisions:{<slot tag>}:<minute>`` (the minute of the decision,
since the epoch; the slot its id names, the customer's), field ``<id[8:12]><id[16:]>`` (the low 16 bits of
the decision's ms, unique within a minute, and its random part), value

    <customer> TAB <context code> TAB <action code>,<action code>,... TAB <ts offset> [TAB <mark>]...

The codes come from the append-only dictionary ``nba:codes`` (``engine.decision.codes``): a context is
``[channel, control, counted, ruleset, model]``, an action ``[action, group, type, value, budget keys]``
with the decision's UTC day in the budget keys written as ``\\x01`` (so an action keeps one code from day to
day). ``ts offset``: the decision's ``ts`` (ms, as it was formatted) less the id's ms ('' for 0). A mark is
a recorded response, ``<action index><outcome letter><stream id>``: the stream id's ms less the id's ms,
``-<seq>``; ``p`` while a cluster records it (``pending``).

Why: a key costs about 120 B before its value (CAPACITY.md), more than a whole record here; at 5,000
decisions/s over 16,384 slots a bucket holds about 18 records (73 at 20,000/s), below the 128 fields of a
listpack-encoded hash. A bucket expires ``accept_days`` after its minute ends.

Records written in the earlier layout (``nba:decision:{<tag>}:<id>`` or ``nba:decision:<id>``, a hash of
named fields) are read, and moved into this layout by the first response to them (``migrate``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

from engine.decision.codes import Codes
from engine.store.erasure import customer_minutes_key
from engine.store.slots import SLOTS, customer_slot, slot_tag

MINUTE_MS = 60_000
DAY_MARK = "\x01"
# outcome -> its letter in a mark
OUTCOME_LETTERS = {"impression": "i", "clicked": "c", "accepted": "a", "rejected": "r", "ignored": "g"}
_OUTCOMES = {v: k for k, v in OUTCOME_LETTERS.items()}

# Lua: rec_mark(value, mark key, id ms): the stream id of a recorded mark, 'pending', or nil;
# rec_enc(stream id, id ms): a stream id as a mark stores it.
LUA = r"""
local function rec_mark(v, mk, idms)
  local n = 0
  for tok in string.gmatch(v, '[^\t]*') do
    n = n + 1
    if n > 4 and tok ~= '' then
      local k, rest = string.match(tok, '^(%d+%a)(.*)$')
      if k == mk then
        if rest == 'p' then return 'pending' end
        local off, seq = string.match(rest, '^(%-?%d+)%-(%d+)$')
        return string.format('%d', idms + tonumber(off)) .. '-' .. seq
      end
    end
  end
  return nil
end
local function rec_enc(id, idms)
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  return string.format('%d', tonumber(ms) - idms) .. '-' .. seq
end
"""

# KEYS[1] bucket; ARGV: field, mark key, stream id, id ms. The pending mark replaced by the stream id.
SET_MARK = LUA + r"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local s, e = string.find(v, '\t' .. ARGV[2] .. 'p', 1, true)
while s do
  local nxt = string.sub(v, e + 1, e + 1)
  if nxt == '' or nxt == '\t' then
    redis.call('HSET', KEYS[1], ARGV[1], string.sub(v, 1, s) .. ARGV[2] .. rec_enc(ARGV[3], tonumber(ARGV[4]))
               .. string.sub(v, e + 1))
    return 1
  end
  s, e = string.find(v, '\t' .. ARGV[2] .. 'p', e + 1, true)
end
return 0
"""

# KEYS[1] the record in the earlier layout, KEYS[2] its bucket; ARGV: field, value, ttl ms. Moves it
# (unless another call did): the bucket keeps the longer expiry.
MIGRATE = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if ttl > 0 and redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
redis.call('DEL', KEYS[1])
return 1
"""


def _id_ms(decision_id: str) -> int:
    """The id's ms; 0 for an id that is not one of this service's (tests pass their own)."""
    return int(decision_id[:12], 16) if _slot(decision_id) is not None or _is_hex32(decision_id) else 0


def _is_hex32(decision_id: str) -> bool:
    return len(decision_id) == 32 and _is_hex(decision_id)


def _slot(decision_id: str) -> int | None:
    if len(decision_id) != 32:
        return None
    try:
        int(decision_id, 16)
    except ValueError:
        return None
    slot = int(decision_id[12:16], 16)
    return slot if slot < SLOTS else None


def location(decision_id: str) -> tuple[str, str]:
    """(bucket key, field) of a decision id (32 hex digits); an id without a slot (made before ids
    carried one: only on one node) has an untagged bucket."""
    if not _is_hex32(decision_id):
        return "nba:decisions:other", decision_id
    minute = _id_ms(decision_id) // MINUTE_MS
    slot = _slot(decision_id)
    key = f"nba:decisions:{{{slot_tag(slot)}}}:{minute}" if slot is not None else f"nba:decisions:{minute}"
    return key, decision_id[8:12] + decision_id[16:]


def minute_index(decision_id: str, customer_id: str, accept_ms: int) -> tuple[str, int, int] | None:
    """What ``store.erasure.index_minute`` needs for this record: (its bucket's key less the minute, the
    minute, the oldest minute whose bucket may still hold a live record); None when the bucket is not on
    the customer's slot (an id from elsewhere: indexed by id instead)."""
    slot = _slot(decision_id)
    if slot is None or slot != customer_slot(customer_id):
        return None
    minute = _id_ms(decision_id) // MINUTE_MS
    return f"nba:decisions:{{{slot_tag(slot)}}}:", minute, minute - -(-accept_ms // MINUTE_MS) - 1


def customer_record_ids(client: Any, customer_id: str) -> set[str]:
    """The ids of the customer's records in the buckets of its minutes (``store.erasure.customer_minutes_key``)."""
    raw = client.get(customer_minutes_key(customer_id))
    if not raw:
        return set()
    data = raw if isinstance(raw, bytes) else raw.encode("latin-1")
    minutes = sorted({int.from_bytes(data[i:i + 4], "big") for i in range(0, len(data) - 3, 4)})
    slot = customer_slot(customer_id)
    prefix = f"{customer_id}\t".encode()
    out: set[str] = set()
    for start in range(0, len(minutes), 100):
        chunk = minutes[start:start + 100]
        pipe = client.pipeline(transaction=False)
        for m in chunk:
            pipe.hgetall(f"nba:decisions:{{{slot_tag(slot)}}}:{m}")
        for m, bucket in zip(chunk, pipe.execute()):
            for f, v in cast("dict[bytes, bytes]", bucket).items():
                value, name = (v if isinstance(v, bytes) else v.encode()), _s(f)
                if value.startswith(prefix) and len(name) == 20:
                    out.add(f"{_ms_of(m, int(name[:4], 16)):012x}{slot:04x}{name[4:]}")
    return out


def _ms_of(minute: int, low16: int) -> int:
    """The ms within ``minute`` whose low 16 bits are ``low16`` (a minute is 60,000 ms: one such)."""
    base = minute * MINUTE_MS
    return base + ((low16 - base) & 0xFFFF)


def ttl_ms(decision_id: str, accept_ms: int) -> int:
    """The bucket's time to live from the decision: ``accept_ms`` after its minute ends."""
    ms = _id_ms(decision_id)
    return accept_ms + (ms // MINUTE_MS + 1) * MINUTE_MS - ms


def _utc_day(ms: int) -> str:
    return utc_day(ms / 1000)


def utc_day(now: float) -> str:
    """``now``'s UTC day as yyyymmdd (formatted once per day: it is asked on every decision)."""
    return _day(int(now // 86_400))


@functools.lru_cache(maxsize=8)
def _day(days: int) -> str:
    return f"{datetime.fromtimestamp(days * 86_400, UTC):%Y%m%d}"


def decision_key(decision_id: str) -> str:
    """A record in the earlier layout: its own hash on the slot its id names (its customer's); an id
    without one (made before ids carried the slot) has the plain key, ``legacy_decision_key``."""
    slot = _slot(decision_id)
    return legacy_decision_key(decision_id) if slot is None else f"nba:decision:{{{slot_tag(slot)}}}:{decision_id}"


def legacy_decision_key(decision_id: str) -> str:
    return f"nba:decision:{decision_id}"


def context_code(codes: Codes, channel: str, control: str, counted: str, ruleset: str, model: str) -> str:
    return codes.code(json.dumps(["r", channel, control, counted, ruleset, model], separators=(",", ":")))


def action_code(codes: Codes, action: str, group: str, action_type: str, value: str, budgets: str, day: str) -> str:
    """``value`` as the record shows it; ``budgets``: the budget keys joined by spaces; ``day``: the
    decision's UTC day (yyyymmdd), stored as a mark in the keys."""
    return codes.code(json.dumps(["a", action, group, action_type, value,
                                  budgets.replace(day, DAY_MARK) if day else budgets], separators=(",", ":")))


def ts_offset(decision_id: str, ts_text: str) -> str:
    off = round(float(ts_text) * 1000) - _id_ms(decision_id)
    return "" if off == 0 else str(off)


def encode(codes: Codes, decision_id: str, fields: dict[str, str]) -> str:
    """The value of a record given as the earlier layout's fields (``actions``, ``groups``, ... and
    ``r:<action>:<outcome>`` -> stream id)."""
    def listed(name: str) -> list[str]:
        return fields.get(name, "").split(",") if fields.get(name) else []

    actions = listed("actions")
    groups, types, values = listed("groups"), listed("types"), fields.get("values", "").split(",")
    budgets = fields.get("budgets", "").split(",")
    day = _utc_day(_id_ms(decision_id))
    acts = [action_code(codes, a, _at(groups, i), _at(types, i), _at(values, i), _at(budgets, i), day)
            for i, a in enumerate(actions)]
    ctx = context_code(codes, fields.get("channel", ""), fields.get("control", "0"), fields.get("counted", "1"),
                       fields.get("ruleset", ""), fields.get("model", ""))
    out = [fields.get("customer", ""), ctx, ",".join(acts), ts_offset(decision_id, fields["ts"]) if fields.get("ts") else ""]
    base = _id_ms(decision_id)
    for name, entry in fields.items():
        if not name.startswith("r:"):
            continue
        action, _, outcome = name[2:].rpartition(":")
        if action not in actions or outcome not in OUTCOME_LETTERS:
            continue
        key = f"{actions.index(action)}{OUTCOME_LETTERS[outcome]}"
        if entry == "pending":
            out.append(key + "p")
        else:
            ms, _, seq = entry.partition("-")
            out.append(f"{key}{int(ms) - base}-{seq or '0'}")
    return "\t".join(out)


def _at(values: list[str], i: int) -> str:
    return values[i] if i < len(values) else ""


def decode(codes: Codes, decision_id: str, value: str) -> dict[str, str]:
    """A record as the earlier layout's fields (so readers see one shape)."""
    parts = value.split("\t")
    customer, ctx, acts, off = (parts + ["", "", "", ""])[:4]
    _, channel, control, counted, ruleset, model = json.loads(codes.text(ctx))
    base = _id_ms(decision_id)
    day = _utc_day(base)
    actions: list[list[str]] = [json.loads(codes.text(c))[1:] for c in acts.split(",") if c]
    out = {"customer": customer, "channel": channel, "control": control, "counted": counted, "ruleset": ruleset,
           "model": model, "ts": f"{(base + int(off or 0)) / 1000:.3f}",
           "actions": ",".join(a[0] for a in actions), "groups": ",".join(a[1] for a in actions),
           "types": ",".join(a[2] for a in actions), "values": ",".join(a[3] for a in actions),
           "budgets": ",".join(a[4].replace(DAY_MARK, day) for a in actions)}
    for mark in parts[4:]:
        i = 0
        while i < len(mark) and mark[i].isdigit():
            i += 1
        if not mark or i == 0 or i >= len(mark) or int(mark[:i]) >= len(actions):
            continue
        name = f"r:{actions[int(mark[:i])][0]}:{_OUTCOMES.get(mark[i], mark[i])}"
        rest = mark[i + 1:]
        if rest == "p":
            out[name] = "pending"
        else:
            off_ms, _, seq = rest.rpartition("-")
            out[name] = f"{base + int(off_ms)}-{seq}"
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read(client: Any, codes: Codes, decision_ids: Iterable[str], chunk: int = 1000) -> dict[str, tuple[str, dict[str, str]]]:
    """decision id -> (where: ``new`` or the earlier layout's key, record fields) of the ids that have a
    record, in either layout (malformed ids have none)."""
    ids = sorted({d for d in decision_ids if len(d) == 32 and _is_hex(d)})
    out: dict[str, tuple[str, dict[str, str]]] = {}
    for i in range(0, len(ids), chunk):
        batch = ids[i:i + chunk]
        pipe = client.pipeline(transaction=False)
        for d in batch:
            pipe.hget(*location(d))
        for d, raw in zip(batch, pipe.execute()):
            if raw is not None:
                out[d] = ("new", decode(codes, d, _s(raw)))
        old = [d for d in batch if d not in out]
        if not old:
            continue
        keys = [k for d in old for k in dict.fromkeys((decision_key(d), legacy_decision_key(d)))]
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(k)
        found = dict(zip(keys, pipe.execute()))
        for d in old:
            for k in dict.fromkeys((decision_key(d), legacy_decision_key(d))):
                raw = cast("dict[bytes, bytes]", found.get(k) or {})
                if raw:
                    out[d] = (k, {_s(f): _s(v) for f, v in raw.items()})
                    break
    return out


def delete(client: Any, where: dict[str, str]) -> int:
    """Delete records (decision id -> ``new`` or the earlier layout's key); how many were there."""
    pipe = client.pipeline(transaction=False)
    for d, at in sorted(where.items()):
        if at == "new":
            pipe.hdel(*location(d))
        else:
            pipe.unlink(at)
    return sum(int(x) for x in pipe.execute()) if where else 0


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
