"""Contact policies, volume budgets and the control group: ``rules/contact.yaml``.

Contact history is a sorted set per customer, ``nba:{c:<id>}:contacts``, scored by epoch
milliseconds, one member per contact: ``<kind>|<action>|<group>|<type>|<channel>|<decision id>`` where
kind is ``i`` (presented), ``r`` (rejected) or ``a`` (accepted). It is read and judged by one Lua
script when a decision presents its actions (``PRESENT``), the decision's second and last Redis round
trip: the script counts the history once per limit, walks the ranked candidates, skips any that a
contact limit or an exhausted budget forbids *now* (whatever other server processes did meanwhile),
and says which limit and count stopped each one (for explanations), records the impressions, consumes the budgets
(``nba:budget:<action>:<yyyymmdd>``) and stores the decision record (``nba:decision:<id>``) that
``RecordResponse`` checks. Several processes deciding at once for one customer therefore never exceed
a limit, and N processes together never exceed a budget.

On a Redis Cluster the budget and decision keys would live on other nodes than the customer's keys;
this script assumes one Redis node (what the service runs on today).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from engine.rules.contact import DAY_MS, ContactLimit, ContactRules, ControlGroup

if TYPE_CHECKING:
    from engine.rules.model import Action

DECISION_TTL_DAYS = 30
BUDGET_TTL_SECONDS = 2 * 86_400


def contacts_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:contacts"


def decision_key(decision_id: str) -> str:
    return f"nba:decision:{decision_id}"


def budget_key(action_id: str, now: float) -> str:
    return f"nba:budget:{action_id}:{datetime.fromtimestamp(now, UTC):%Y%m%d}"


def control_order(control: ControlGroup, candidates: list, customer_id: str, now: float) -> list:
    """The control policy's order of the admitted candidates ``(priority, propensity, verdict)``.

    Only offers change: service actions keep their ranked places (customer care is never the
    experiment); the offers' places are taken by the generic offer alone, or by the eligible offers
    in a random order that is stable for one customer within one day."""
    offers = [c for c in candidates if c[2].action.type != "service"]
    if control.policy == "generic":
        offers = [c for c in offers if c[2].action.id == control.generic_action]
    else:
        rng = random.Random(f"{customer_id}:{int(now // 86_400)}")
        rng.shuffle(offers)
    out, pending = [], iter(offers)
    for c in candidates:
        if c[2].action.type == "service":
            out.append(c)
        else:
            nxt = next(pending, None)
            if nxt is not None:
                out.append(nxt)
    return out


# --- the authoritative check, atomic in Redis ---------------------------------------------------------

# KEYS[1] contacts zset, KEYS[2] decision record, KEYS[3..] budget counters.
# ARGV[1] JSON: now, n (max actions), ch, id, since (oldest window start), keep_ms (history kept),
#   ttl_ms (decision record), bttl (budget ttl, s), lim (limit specs), cand (ranked candidates:
#   [action, group, type, value, [limit indexes], budget key index or 0, budget]), fb (fallback
#   candidate or 0), rec (decision record fields).
# Returns {verdict per candidate ('ok', 'group', 'limit:<i>:<count>', 'budget', 'cutoff'), 'fb' or ''}.
PRESENT = r"""
local a = cjson.decode(ARGV[1])
-- per limit: how many counted contacts in its window, in all and per action and per group
local cnt = {}
for li, L in ipairs(a.lim) do cnt[li] = {c = 0, a = {}, g = {}} end
local function count(li, act, grp)
  local t = cnt[li]
  t.c = t.c + 1
  t.a[act] = (t.a[act] or 0) + 1
  t.g[grp] = (t.g[grp] or 0) + 1
end
if #a.lim > 0 then
  local hist = redis.call('ZRANGEBYSCORE', KEYS[1], a.since, '+inf', 'WITHSCORES')
  for i = 1, #hist, 2 do
    local k, act, grp, typ, ch = string.match(hist[i], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)')
    if k then
      local ts = tonumber(hist[i + 1])
      for li, L in ipairs(a.lim) do
        if k == L[1] and ts >= L[4] and (L[5] == 0 or L[5][ch]) and (L[6] == 0 or L[6][typ]) then
          count(li, act, grp)
        end
      end
    end
  end
end
local groups, verdicts, shown = {}, {}, {}
local function present(c, tag)
  if c[6] > 0 then
    redis.call('INCR', KEYS[c[6]])
    redis.call('EXPIRE', KEYS[c[6]], a.bttl)
  end
  redis.call('ZADD', KEYS[1], a.now, 'i|' .. c[1] .. '|' .. c[2] .. '|' .. c[3] .. '|' .. a.ch .. '|' .. a.id .. '|' .. tag)
  for li, L in ipairs(a.lim) do
    if L[1] == 'i' and (L[5] == 0 or L[5][a.ch]) and (L[6] == 0 or L[6][c[3]]) then count(li, c[1], c[2]) end
  end
  groups[c[2]] = true
  shown[#shown + 1] = c
end
for ci, c in ipairs(a.cand) do
  local v = nil
  if #shown >= a.n then v = 'cutoff' elseif groups[c[2]] then v = 'group' end
  if not v then
    for _, li in ipairs(c[5]) do
      local L, t = a.lim[li], cnt[li]
      local n = t.c
      if L[2] == 'a' then n = t.a[c[1]] or 0 elseif L[2] == 'g' then n = t.g[c[2]] or 0 end
      if n >= L[3] then v = 'limit:' .. li .. ':' .. n; break end
    end
  end
  if not v and c[6] > 0 then
    if tonumber(redis.call('GET', KEYS[c[6]]) or '0') >= c[7] then v = 'budget' end
  end
  if not v then v = 'ok'; present(c, ci) end
  verdicts[ci] = v
end
local fb = ''
if #shown == 0 and a.fb ~= 0 then present(a.fb, 'fb'); fb = 'fb' end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', a.now - a.keep_ms)
redis.call('PEXPIRE', KEYS[1], a.keep_ms)
local acts, grps, typs, vals = {}, {}, {}, {}
for _, c in ipairs(shown) do
  acts[#acts + 1] = c[1]; grps[#grps + 1] = c[2]; typs[#typs + 1] = c[3]; vals[#vals + 1] = tostring(c[4])
end
local rec = {'actions', table.concat(acts, ','), 'groups', table.concat(grps, ','), 'types', table.concat(typs, ','),
             'values', table.concat(vals, ',')}
for k, v in pairs(a.rec) do rec[#rec + 1] = k; rec[#rec + 1] = v end
redis.call('HSET', KEYS[2], unpack(rec))
redis.call('PEXPIRE', KEYS[2], a.ttl_ms)
return {verdicts, fb}
"""

# KEYS[1] decision record, KEYS[2] contacts zset, KEYS[3] responses stream.
# ARGV: field (response key), contact member ('' for none), now ms, keep ms, maxlen, then stream fields.
# The same response twice is stored once: the second returns the first one's stream id.
RESPOND = r"""
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if seen then return {0, seen} end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
redis.call('HSET', KEYS[1], ARGV[1], id)
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  if tonumber(ARGV[4]) > 0 then
    local ttl = redis.call('PTTL', KEYS[2])
    if ttl < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
  end
end
return {1, id}
"""


def present_args(rules: ContactRules, candidates: list, fallback: Action | None, max_actions: int,
                 channel: str, decision_id: str, now: float, record: dict[str, str],
                 customer_id: str) -> tuple[list[str], str, list[ContactLimit]]:
    """KEYS and ARGV of ``PRESENT`` for ranked ``candidates`` (``(priority, propensity, verdict)``)."""
    now_ms = int(now * 1000)
    limits = list(rules.limits)
    keys = [contacts_key(customer_id), decision_key(decision_id)]
    cand = []
    day = ""
    for _priority, _p, verdict in candidates:
        action = verdict.action
        bkey = 0
        if action.daily_budget is not None:
            day = day or f"{datetime.fromtimestamp(now, UTC):%Y%m%d}"
            keys.append(f"nba:budget:{action.id}:{day}")
            bkey = len(keys)
        cand.append([action.id, action.group, action.type, action.value, rules.applicable(action, channel), bkey,
                     action.daily_budget or 0])
    fb: list[object] | int = 0
    if fallback is not None:
        fb = [fallback.id, fallback.group, fallback.type, fallback.value, [], 0, 0]
    keep_ms = int(max(rules.history_days, DECISION_TTL_DAYS) * DAY_MS)  # history kept (and its key's TTL)
    args = {
        "now": now_ms, "n": max_actions, "ch": channel, "id": decision_id,
        "since": now_ms - int(rules.history_days * DAY_MS), "keep_ms": keep_ms, "ttl_ms": DECISION_TTL_DAYS * DAY_MS,
        "bttl": BUDGET_TTL_SECONDS, "lim": [l.spec(now_ms) for l in limits], "cand": cand, "fb": fb,
        "rec": record,
    }
    return keys, json.dumps(args, separators=(",", ":")), limits
