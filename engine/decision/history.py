"""A customer's contact history as bounded counters: what the contact limits count, and how.

``nba:{c:<id>}:contacts`` is a hash with one field per kind of contact and UTC day:
``<kind>|<action>|<group>|<type>|<channel>|<day>`` (kind ``i`` impression, ``r`` rejected, ``a``
accepted; day: days since 1970-01-01 UTC), valued ``<count>:<first>:<last>``, the milliseconds into that
day of the first and last such contact. A contact increments its field; nothing is kept per contact. So
the history of a customer seen 10,000 times a day is as large, and as quick to judge, as that of one
seen once a day with the same actions on the same channels: it holds at most (kinds x actions x
channels seen) x (days kept + 1) fields, whatever the number of contacts.

What is kept is what the live contact policies can read (``ContactRules.keep_ms``): a contact no limit
counts (e.g. a service action's impression when every impression limit is scoped to marketing types) is
not written, and a field is removed by the next presentation once it is older than the longest window
of the limits that count it (a rejection kept for a 14-day cool-down is gone after 15 days, an impression
under a 30-day limit stays 31). A limit that a later rule set adds therefore counts only what the
earlier limits kept, from before its reload, as a window longer than the earlier ones sees only the
days they kept. The limits themselves bound the rest: a customer is shown an action at most ``max``
times in a window that counts it.

How a limit of ``days`` counts a field against its window start ``s = now - days`` (exact, as the
per-contact history counted, except in one case where it counts more, never fewer):

- ``last < s``: no contact of the field is in the window: 0 (exact);
- ``first >= s``: all are: ``count`` (exact);
- ``first < s <= last``: the day's contacts straddle the window start: the first is outside, the
  others may be inside, so ``count - 1``, exact for up to 2 contacts, otherwise at most ``count - 2``
  too many. A rolling window over bounded state cannot be exact in general; this errs on the side of
  not contacting (a limit may hold up to a day longer for that action and channel), never the other.

Lua helpers shared by the scripts of ``engine.decision.contact`` (``PRESENT``, ``RESPOND``); a
history written in the earlier layout (a sorted set with one member per contact) is folded into
counters by the first script that touches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from engine.rules.contact import DAY_MS


def contacts_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:contacts"


def contact_head(kind: str, action: str, group: str, action_type: str, channel: str) -> str:
    """A contact's field without its day, as ``RESPOND`` takes it."""
    return f"{kind}|{action}|{group}|{action_type}|{channel}"


@dataclass(frozen=True)
class Contacts:
    """One field of the history: ``count`` contacts of this kind on ``day``, the first and the last at
    epoch ms ``first`` and ``last``."""

    kind: str
    action: str
    group: str
    type: str
    channel: str
    day: int
    count: int
    first: int
    last: int


def parse(field: str, value: str) -> Contacts | None:
    parts = field.split("|")
    numbers = value.split(":")
    if len(parts) != 6 or len(numbers) != 3 or not parts[5].isdigit():
        return None
    day = int(parts[5])
    count, first, last = (int(x) for x in numbers)
    kind, action, group, action_type, channel = parts[:5]
    return Contacts(kind, action, group, action_type, channel, day, count, day * DAY_MS + first, day * DAY_MS + last)


def read_history(client: redis.Redis, customer_id: str) -> list[Contacts]:
    """Every field of the customer's contact history (for tests, tools and explanations)."""
    raw: dict[bytes | str, bytes | str] = client.hgetall(contacts_key(customer_id))
    return [c for f, v in raw.items() if (c := parse(_text(f), _text(v))) is not None]


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def counted(history: list[Contacts], kind: str, **match: str) -> int:
    """How many contacts of ``kind`` the history holds in all, of fields matching ``match`` (e.g.
    ``action="x"``)."""
    return sum(c.count for c in history if c.kind == kind and all(getattr(c, k) == v for k, v in match.items()))


# hist_field(head, ts): the field of a contact at epoch ms ``ts`` and its ms into the day;
# hist_merge(value or false, off): the field's value with one more contact at ``off``;
# hist_weight(count, first, last, since): how many of the field's contacts a window from ``since`` counts (see above);
# hist_fold(key): a sorted-set history (one member per contact, before issue 18) into counters, in place;
# hist_call(cmd, key, ...): a command on the history key, folding it first if it is a sorted set;
# hist_contact(key, head, ts, keep): one more contact in the history (what a response adds).
LUA = r"""
local DAY_MS = 86400000
local function hist_field(head, ts)
  local day = math.floor(ts / DAY_MS)
  return head .. '|' .. day, ts - day * DAY_MS
end
local function hist_merge(v, off)
  if not v then return '1:' .. off .. ':' .. off end
  local n, lo, hi = string.match(v, '^(%d+):(%d+):(%d+)$')
  return (tonumber(n) + 1) .. ':' .. math.min(tonumber(lo), off) .. ':' .. math.max(tonumber(hi), off)
end
local function hist_fold(key)
  local old = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local ttl = redis.call('PTTL', key)
  redis.call('DEL', key)
  local vals, flat = {}, {}
  for i = 1, #old, 2 do
    local head = string.match(old[i], '^([^|]*|[^|]*|[^|]*|[^|]*|[^|]*)')
    if head then
      local f, off = hist_field(head, tonumber(old[i + 1]))
      vals[f] = hist_merge(vals[f], off)
    end
  end
  for f, v in pairs(vals) do
    flat[#flat + 1] = f; flat[#flat + 1] = v
    if #flat >= 1000 then redis.call('HSET', key, unpack(flat)); flat = {} end
  end
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
  if ttl > 0 and redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ttl) end
end
-- a command on the history, folding a sorted-set history first
local function hist_call(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then
    if redis.call('TYPE', key).ok == 'zset' then hist_fold(key) end
    r = redis.call(cmd, key, ...)
  end
  return r
end
-- one more contact ``head`` at epoch ms ``ts`` in history ``key``, kept at least ``keep`` ms ('' head: none)
local function hist_contact(key, head, ts, keep)
  if head == '' then return end
  local f, off = hist_field(head, ts)
  redis.call('HSET', key, f, hist_merge(hist_call('HGET', key, f), off))
  if keep > 0 and redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
end
local function hist_weight(n, first, last, since)
  if last < since then return 0 end
  if first < since then return n - 1 end
  return n
end
"""
