"""Contact policies, volume budgets, interactions and the control group, applied atomically in Redis.

Contact history is a hash of counters per customer, ``nba:{c:<id>}:contacts``: how many impressions,
rejections and acceptances of each action on each channel per UTC day, of those a contact limit counts
(``engine.decision.history``: its size and a decision's cost do not grow with how often the customer
was seen). It is read and judged by one Lua script when a decision presents its actions (``PRESENT``),
the decision's second and last Redis round trip: the script counts the history once per limit, walks
the ranked candidates, skips any that a contact limit or an exhausted budget forbids *now* (whatever
other server processes did meanwhile), and says which limit and count stopped each one (for
explanations). Then, by the channel's mode:

- ``decide`` (call center, branch, outbound): deciding is presenting; the impressions are recorded and
  the budgets (``nba:budget:<action>:<yyyymmdd>``) consumed.
- ``reserve`` (web, app: ``impressions: counted: on_impression``): a budget unit is reserved (consumed,
  and listed in ``nba:reservations`` by expiry); the impression is recorded when the channel reports it,
  and ``RELEASE`` gives unreported units back after the reservation time.
- ``dry`` (preview): nothing is written.

It stores the decision record (``engine.decision.records``) that ``RecordResponse`` checks and, for a request
with an interaction id, the decision itself in ``nba:{c:<id>}:ix:<interaction>`` (one field per
placement); if another call of the same interaction and placement got there first, the script
returns that one instead of presenting. Several processes deciding at once for one customer therefore
never exceed a limit, and N processes together never exceed a budget.

On a Redis Cluster every script touches one slot. The decision record's key carries the customer's
slot (the decision id names it), so the script touches only the customer's keys; budget counters are
shared by all customers and live on other slots, so there ``PRESENT`` judges them from states the
caller passes (``engine.decision.budget_claims``): a candidate it would show whose budget was not
claimed yet makes it return ``need`` without writing anything; the caller claims a unit of each such
budget (one single-slot script per counter, never above the budget), then calls again, and gives back
the units of claimed candidates that were not shown in the end.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import TYPE_CHECKING

from engine.decision import history, records
from engine.decision.campaigns import budget_specs
from engine.decision.codes import Codes
from engine.decision.history import contacts_key
from engine.decision.records import utc_day
from engine.rules.contact import DAY_MS, ContactLimit, ContactRules, ControlGroup
from engine.store.erasure import MINUTES_LUA, customer_index_key, customer_minutes_key, own_member
from engine.store.slots import customer_slot

if TYPE_CHECKING:
    from engine.rules.model import Action

BUDGET_TTL_SECONDS = 2 * 86_400
RESERVATIONS_KEY = "nba:reservations"
DECIDE, RESERVE, DRY = "decide", "reserve", "dry"


def interaction_key(customer_id: str, interaction_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:ix:{interaction_id}"


def budget_key(action_id: str, now: float) -> str:
    return f"nba:budget:{action_id}:{utc_day(now)}"


def new_decision_id(now: float, customer_id: str) -> str:
    """32 hex digits: the decision time in ms (so a response can tell an expired decision from an unknown
    one), the customer's hash slot (where the decision record lives on a cluster), then 64 random bits."""
    return f"{int(now * 1000):012x}{customer_slot(customer_id):04x}{secrets.randbits(64):016x}"


def decided_at(decision_id: str) -> float | None:
    """When a decision with this id was made (epoch seconds), if the id says."""
    if len(decision_id) != 32:
        return None
    try:
        return int(decision_id[:12], 16) / 1000
    except ValueError:
        return None


def control_order(control: ControlGroup, candidates: list, customer_id: str, now: float) -> list:
    """The control policy's order of the admitted candidates ``(priority, propensity, verdict)``.

    Only offers change: service actions keep their ranked places (customer care is never the
    experiment); the offers' places are taken by the generic offer alone, or by the eligible offers
    in a random order that is stable for one customer within one day. Each offer draws its own place
    (a hash of customer, day and action id), so the order of two offers never depends on the other
    candidates or their priorities: a rule change that leaves a control customer's eligible offers
    alone leaves their order alone (``nba rules diff`` sees the change's effect, not a reshuffle)."""
    offers = [c for c in candidates if not c[2].action.service]
    if control.policy == "generic":
        offers = [c for c in offers if c[2].action.id == control.generic_action]
    else:
        day = int(now // 86_400)
        offers.sort(key=lambda c: _draw(customer_id, day, c[2].action.id))
    out, pending = [], iter(offers)
    for c in candidates:
        if c[2].action.service:
            out.append(c)
        else:
            nxt = next(pending, None)
            if nxt is not None:
                out.append(nxt)
    return out


def _draw(customer_id: str, day: int, action_id: str) -> bytes:
    return hashlib.blake2b(f"{customer_id}:{day}:{action_id}".encode(), digest_size=8).digest()


# --- the authoritative check, atomic in Redis ---------------------------------------------------------

# KEYS[1] contact history hash, KEYS[2] decision record, KEYS[3] interaction hash, KEYS[4] reservations zset,
# KEYS[5] the customer's index of records (``store.erasure.customer_index_key``), KEYS[6] the minutes of its
# decision records (``store.erasure.customer_minutes_key``), KEYS[7..] budget counters.
# ARGV[1] JSON: now, n (max actions), ch, id, mode (decide | reserve | dry), keep_ms (history kept),
#   ttl_ms (decision record), bttl (budget ttl, s), rsv (reservation expiry ms), lim (limit specs),
#   cand (ranked candidates: [action, group, type, value, [limit indexes], budget key index or 0, budget, body,
#   campaign budgets [[key index, budget, verdict, ttl s]...], and on a cluster two more: the budgets' state
#   (0 none, 1 claimed, 2 not claimed yet, or the verdict that stopped the claim) and their keys]),
#   fb (fallback candidate or 0), codes, fbcode, rf, cust, ctx, tsd (the record: ``engine.decision.records``),
#   rmin, rpre, rcut (its minute, its bucket's key less the minute, the oldest minute that may be live; rmin 0:
#   its bucket is not on the customer's slot, it is indexed by id),
#   ix (interaction placement field or ''), ixttl (ms), ixm (its index member), head (the decision's JSON
#   header), replace (true: overwrite the placement's stored decision rather than return it), late_ms
#   (epoch ms after which the caller no longer waits for this answer: the script then changes nothing;
#   0: no deadline).
#   eps, u: the exploration share per slot and the slots' draws (``engine.decision.choice``).
# Returns {verdict per candidate ('ok', 'group', 'limit:<i>:<count>', 'budget', 'campaign_total:<name>',
# 'campaign_daily:<name>', 'cutoff'), 'fb' or '', per slot the feasible candidates' indexes (0-based), the
# shown candidates' indexes in the order of their slots},
# or {'replay', stored decision} when the interaction's placement was decided already, or {'late', ''},
# or {'need', [candidate indexes]}: these would be shown but their budgets are not claimed yet (nothing written).
PRESENT = history.LUA + MINUTES_LUA + r"""
local a = cjson.decode(ARGV[1])
if a.late_ms > 0 then  -- the caller has had its (degraded) answer by now: present nothing
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > a.late_ms then return {'late', ''} end
end
if a.ix ~= '' and not a.replace then
  local prev = redis.call('HGET', KEYS[3], a.ix)
  if prev then return {'replay', prev} end
end
local write = a.mode ~= 'dry'
-- per limit: how many counted contacts in its window, in all and per action and per group
local cnt = {}
for li, L in ipairs(a.lim) do cnt[li] = {c = 0, a = {}, g = {}} end
local function count(li, act, grp, n)
  local t = cnt[li]
  t.c = t.c + n
  t.a[act] = (t.a[act] or 0) + n
  t.g[grp] = (t.g[grp] or 0) + n
end
-- whether a limit counts contacts with this action, group, type and channel (its filters: 0 = all)
local function scoped(L, act, grp, typ, ch)
  return (L[5] == 0 or L[5][ch]) and (L[6] == 0 or L[6][typ]) and (L[7] == 0 or L[7][act]) and (L[8] == 0 or L[8][grp])
end
-- the history's counters (engine/decision/history.py): read whole when a limit needs them
local hist, stale, marks = nil, {}, {}
if #a.lim > 0 then
  hist = {}
  local flat = hist_call('HGETALL', KEYS[1])
  -- kind|type|channel (|action|group) -> {the limits that count such contacts, the earliest of their window
  -- starts}; a field no limit counts, or older than every window that counts it, is never read again
  local which = {}
  local by_action = false  -- a limit scoped to action ids or groups: the key names them too
  for _, L in ipairs(a.lim) do if L[7] ~= 0 or L[8] ~= 0 then by_action = true end end
  for i = 1, #flat, 2 do
    local k, act, grp, typ, ch, day = string.match(flat[i], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(%d+)$')
    if k then
      local wk = k .. '|' .. typ .. '|' .. ch
      if by_action then wk = wk .. '|' .. act .. '|' .. grp end
      local w = which[wk]
      if not w then
        w = {{}, nil}
        for li, L in ipairs(a.lim) do
          if k == L[1] and scoped(L, act, grp, typ, ch) then
            w[1][#w[1] + 1] = li
            if not w[2] or L[4] < w[2] then w[2] = L[4] end
          end
        end
        which[wk] = w
      end
      local base = tonumber(day) * DAY_MS
      if not w[2] or base + DAY_MS <= w[2] then stale[#stale + 1] = flat[i] else
        hist[flat[i]] = flat[i + 1]
        local n, lo, hi = string.match(flat[i + 1], '^(%d+):(%d+):(%d+)$')
        if n then
          n = tonumber(n)
          local first, last = base + tonumber(lo), base + tonumber(hi)
          for _, li in ipairs(w[1]) do
            local wt = hist_weight(n, first, last, a.lim[li][4])
            if wt > 0 then count(li, act, grp, wt) end
          end
        end
      end
    end
  end
end
local function mark(head)  -- one more impression now, written with the decision
  local f, off = hist_field(head, a.now)
  local v
  if hist then v = hist[f] else v = hist_call('HGET', KEYS[1], f) end
  v = hist_merge(v, off)
  if hist then hist[f] = v end
  marks[#marks + 1] = f; marks[#marks + 1] = v
end
local groups, verdicts, shown, budgets, need = {}, {}, {}, {}, {}
-- budget counters read once per call; kept as the presentations add to them
local bval = {}
local function budget_used(k)
  local v = bval[k]
  if v == nil then v = tonumber(redis.call('GET', KEYS[k]) or '0'); bval[k] = v end
  return v
end
local codes = {}
local function present(c, code)
  local bkey = c[11] or ''
  if write and not c[11] then
    local used = {}
    if c[6] > 0 then
      used[1] = KEYS[c[6]]
      bval[c[6]] = redis.call('INCR', KEYS[c[6]])
      redis.call('EXPIRE', KEYS[c[6]], a.bttl)
    end
    for _, b in ipairs(c[9]) do  -- the campaign's budgets: {key index, budget, verdict, ttl}
      used[#used + 1] = KEYS[b[1]]
      bval[b[1]] = redis.call('INCR', KEYS[b[1]])
      redis.call('EXPIRE', KEYS[b[1]], b[4])
    end
    bkey = table.concat(used, ' ')
    if a.mode == 'reserve' and bkey ~= '' then redis.call('ZADD', KEYS[4], a.rsv, a.id .. '|' .. c[1] .. '|' .. bkey) end
  end
  -- this decision's own actions count against its limits whether they count now or when seen; the
  -- history keeps only what a limit counts
  local counted = false
  for li, L in ipairs(a.lim) do
    if L[1] == 'i' and scoped(L, c[1], c[2], c[3], a.ch) then count(li, c[1], c[2], 1); counted = true end
  end
  if a.mode == 'decide' and counted then mark('i|' .. c[1] .. '|' .. c[2] .. '|' .. c[3] .. '|' .. a.ch) end
  groups[c[2]] = true
  codes[#shown + 1] = code
  shown[#shown + 1] = c
end
-- why a candidate cannot be shown now (nil: it can; a cluster's unclaimed budget counts as showable)
local function blocked(c)
  if groups[c[2]] then return 'group' end
  for _, li in ipairs(c[5]) do
    local L, t = a.lim[li], cnt[li]
    local n = t.c
    if L[2] == 'a' then n = t.a[c[1]] or 0 elseif L[2] == 'g' then n = t.g[c[2]] or 0 end
    if n >= L[3] then return 'limit:' .. li .. ':' .. n end
  end
  if c[6] > 0 and budget_used(c[6]) >= c[7] then return 'budget' end
  for _, b in ipairs(c[9]) do
    if budget_used(b[1]) >= b[2] then return b[3] end
  end
  if c[10] and c[10] ~= 0 and c[10] ~= 1 and c[10] ~= 2 then return c[10] end
  return nil
end
local sets, picks = {}, {}
local function take(ci)
  local c = a.cand[ci]
  if c[10] == 2 then need[#need + 1] = ci end
  verdicts[ci] = 'ok'
  picks[#picks + 1] = ci - 1
  present(c, a.codes[ci])
end
if a.eps == 0 then
  -- no exploration: the ranked order, each candidate judged once, when the walk reaches it
  for ci, c in ipairs(a.cand) do
    if #shown >= a.n then verdicts[ci] = 'cutoff' else
      local v = blocked(c)
      if v then verdicts[ci] = v else take(ci) end
    end
  end
else
  -- slot by slot (engine/decision/choice.py): the feasible candidates in ranked order, the first of them,
  -- or with draw u < eps the one u picks uniformly; a candidate ranked above the pick that cannot be
  -- shown is settled with the reason the slot saw, the others are judged again at the next slot
  local pending = {}
  for ci = 1, #a.cand do pending[ci] = ci end
  while #pending > 0 and #shown < a.n do
    local feasible, why = {}, {}
    for k, ci in ipairs(pending) do
      local v = blocked(a.cand[ci])
      if v then why[k] = v else feasible[#feasible + 1] = k end
    end
    if #feasible == 0 then
      for k, ci in ipairs(pending) do verdicts[ci] = why[k] end
      pending = {}
      break
    end
    local j, u = 1, a.u[#shown + 1]
    if u and u < a.eps then j = math.min(math.floor(u / a.eps * #feasible) + 1, #feasible) end
    local set = {}
    for i, k in ipairs(feasible) do set[i] = pending[k] - 1 end
    sets[#sets + 1] = set
    local chosen, rest = feasible[j], {}
    for k, ci in ipairs(pending) do
      if k < chosen and why[k] then verdicts[ci] = why[k] elseif k ~= chosen then rest[#rest + 1] = ci end
    end
    take(pending[chosen])
    pending = rest
  end
  for _, ci in ipairs(pending) do verdicts[ci] = 'cutoff' end
end
if #need > 0 then return {'need', need} end
local fb = ''
if #shown == 0 and a.fb ~= 0 then present(a.fb, a.fbcode); fb = 'fb' end
if not write then return {verdicts, fb, sets, picks} end
for i = 1, #stale, 1000 do redis.call('HDEL', KEYS[1], unpack(stale, i, math.min(i + 999, #stale))) end
if #marks > 0 then
  redis.call('HSET', KEYS[1], unpack(marks))
  redis.call('PEXPIRE', KEYS[1], a.keep_ms)
end
local bodies = {}
for i, c in ipairs(shown) do bodies[i] = c[8] end
-- the record (engine/decision/records.py): customer, context code, action codes, ts offset
redis.call('HSET', KEYS[2], a.rf, a.cust .. '\t' .. a.ctx .. '\t' .. table.concat(codes, ',') .. '\t' .. a.tsd)
redis.call('PEXPIRE', KEYS[2], a.ttl_ms)
-- what erasure and export read instead of scanning the keyspace: the record's minute (its bucket), or
-- an index member (expiry, server ms as PEXPIRE) for a record elsewhere and for the interaction hash
if a.rmin ~= 0 then index_minute(KEYS[6], a.rpre, a.rmin, a.rcut, a.ttl_ms) end
if a.rmin == 0 or a.ix ~= '' then
  local st = redis.call('TIME')
  local snow = tonumber(st[1]) * 1000 + math.floor(tonumber(st[2]) / 1000)
  if a.rmin == 0 then redis.call('ZADD', KEYS[5], snow + a.ttl_ms, 'd:' .. a.id) end
  if a.ix ~= '' then
    redis.call('HSET', KEYS[3], a.ix, '{"h":' .. a.head .. ',"fb":' .. (fb == 'fb' and 'true' or 'false') ..
               ',"a":[' .. table.concat(bodies, ',') .. ']}')
    if redis.call('PTTL', KEYS[3]) < 0 then redis.call('PEXPIRE', KEYS[3], a.ixttl) end
    redis.call('ZADD', KEYS[5], snow + a.ixttl, a.ixm)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', snow)
  local top = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')  -- the index outlives its longest entry
  redis.call('PEXPIREAT', KEYS[5], top[2])
end
return {verdicts, fb, sets, picks}
"""

# KEYS[1] the decision record's bucket (``engine.decision.records``), KEYS[2] contact history hash, KEYS[3]
# responses stream, KEYS[4] reservations zset. ARGV: the record's field, the response's mark key
# (``<action index><outcome letter>``), contact (``history.contact_head``, '' for none), its time (epoch
# ms), keep ms, maxlen, reservation member ('' for none), the decision id's ms, n, the n mark keys this
# response contradicts (``responses.CONTRADICTS``), then stream fields. The same response twice is stored
# once: the second returns the first one's stream id. Returns {first, stream id, late} where late is 1
# when the impression came after its reserved budget unit had been released, {-1, stream id, mark key}
# of a recorded response it contradicts (nothing changed), or {-2, '', 0} when the record is gone.
RESPOND = history.LUA + records.LUA + r"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return {-2, '', 0} end
local idms = tonumber(ARGV[8])
local seen = rec_mark(v, ARGV[2], idms)
if seen then return {0, seen, 0} end
local n = tonumber(ARGV[9])
for i = 10, 9 + n do
  local other = rec_mark(v, ARGV[i], idms)
  if other then return {-1, other, ARGV[i]} end
end
local late = 0
if ARGV[7] ~= '' and redis.call('ZREM', KEYS[4], ARGV[7]) == 0 then late = 1 end
local fields = {}
for i = 10 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', unpack(fields))
redis.call('HSET', KEYS[1], ARGV[1], v .. '\t' .. ARGV[2] .. rec_enc(id, idms))
hist_contact(KEYS[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
return {1, id, late}
"""

# On a cluster, the customer's part of ``RESPOND`` (the stream and the reservations are on other slots):
# KEYS[1] the record's bucket, KEYS[2] contact history hash; ARGV: field, mark key, contact, its time, keep
# ms, the id's ms, n, the n mark keys it contradicts. Returns {0, stream id} for a response recorded
# before, {-1, stream id or 'pending', mark key} for a recorded one it contradicts, {-2, ''} when the
# record is gone; else marks the response pending (the caller appends it to the stream, then stores the
# stream id in its place: ``records.SET_MARK``), counts the contact once, and returns {1, ''}. A retry of
# a call that died after this (the mark still pending) appends it again and counts nothing.
RESPOND_CUSTOMER = history.LUA + records.LUA + r"""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return {-2, ''} end
local idms = tonumber(ARGV[6])
local seen = rec_mark(v, ARGV[2], idms)
if seen and seen ~= 'pending' then return {0, seen} end
for i = 8, 7 + tonumber(ARGV[7]) do
  local other = rec_mark(v, ARGV[i], idms)
  if other then return {-1, other, ARGV[i]} end
end
if not seen then
  redis.call('HSET', KEYS[1], ARGV[1], v .. '\t' .. ARGV[2] .. 'p')
  hist_contact(KEYS[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
end
return {1, ''}
"""

# KEYS[1] reservations zset; ARGV: now ms, batch. Gives back the budget unit of every reservation
# whose impression did not come in time. Returns how many were released.
RELEASE = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  local bkeys = string.match(m, '^[^|]*|[^|]*|(.+)$') or ''
  for bkey in string.gmatch(bkeys, '%S+') do
    if redis.call('EXISTS', bkey) == 1 then redis.call('DECR', bkey) end
  end
end
return #due
"""


def reservation_member(decision_id: str, action_id: str, budget: str) -> str:
    return f"{decision_id}|{action_id}|{budget}"


def candidate_budgets(action: Action, campaigns: dict | None, now: float) -> list[tuple[str, int, str, int]]:
    """(counter key, budget, verdict when used up, counter TTL s) of each budget a presentation of
    ``action`` consumes: its own daily budget, then its campaign's."""
    own = [] if action.daily_budget is None else [(budget_key(action.id, now), action.daily_budget, "budget",
                                                   BUDGET_TTL_SECONDS)]
    return own + budget_specs(campaigns.get(action.campaign) if campaigns and action.campaign else None, now)


def present_args(rules: ContactRules, candidates: list, fallback: Action | None, max_actions: int,
                 channel: str, decision_id: str, now: float, record: dict[str, str], customer_id: str,
                 mode: str, interaction: str = "", placement: str = "", bodies: list[str] | None = None,
                 head: str = "", replace: bool = False, late_ms: int = 0,
                 campaigns: dict | None = None,
                 claims: list[int | str] | None = None,
                 codes: Codes | None = None, epsilon: float = 0.0,
                 draws: list[float] | None = None) -> tuple[list[str], str, list[ContactLimit]]:
    """KEYS and ARGV of ``PRESENT`` for ranked ``candidates`` (``(priority, propensity, verdict)``).
    ``bodies``: with an interaction id, each candidate's stored JSON (then the fallback's); ``replace``:
    this decision replaces the placement's stored one (else a stored one is returned instead);
    ``campaigns``: the rule set's campaigns by name (their budgets are judged with the actions');
    ``claims``: on a cluster, each candidate's budget state (see ``PRESENT``): then the script touches no
    budget key. ``codes``: the dictionary of record codes (``engine.decision.records``); ``record``: the
    record's ``customer``, ``channel``, ``control``, ``ts``, ``ruleset``, ``model`` and ``counted``;
    ``epsilon`` and ``draws``: the logging policy's exploration and its draws per slot (``engine.decision.choice``)."""
    now_ms = int(now * 1000)
    limits = list(rules.limits)
    ix = rules.interactions
    if codes is None:
        raise ValueError("present_args: codes (the record dictionary) is required")
    bucket, field = records.location(decision_id)
    day = utc_day(now)
    keys = [contacts_key(customer_id), bucket,
            interaction_key(customer_id, interaction) if interaction else contacts_key(customer_id),
            contacts_key(customer_id) if claims is not None else RESERVATIONS_KEY, customer_index_key(customer_id),
            customer_minutes_key(customer_id)]
    cand, action_codes = [], []
    for i, (_priority, _p, verdict) in enumerate(candidates):
        action = verdict.action
        specs = candidate_budgets(action, campaigns, now)
        action_codes.append(records.action_code(codes, action.id, action.group, action.type, _lua_number(action.value),
                                                " ".join(spec[0] for spec in specs), day))
        entry = [action.id, action.group, action.type, action.value, rules.applicable(action, channel), 0,
                 action.daily_budget or 0, bodies[i] if bodies else "", []]
        if claims is not None:
            entry[8:] = [[], claims[i], " ".join(spec[0] for spec in specs)]
        else:
            for key, budget, verdict_, ttl in specs:
                keys.append(key)
                if verdict_ == "budget":
                    entry[5] = len(keys)
                else:
                    entry[8].append([len(keys), budget, verdict_, ttl])
        cand.append(entry)
    fb: list[object] | int = 0
    fbcode = ""
    if fallback is not None:
        fbcode = records.action_code(codes, fallback.id, fallback.group, fallback.type, _lua_number(fallback.value),
                                     "", day)
        fb = [fallback.id, fallback.group, fallback.type, fallback.value, [], 0, 0, bodies[-1] if bodies else "", []]
    keep_ms = max(int(rules.history_days * DAY_MS), DAY_MS)  # history kept (and its key's TTL)
    minute = records.minute_index(decision_id, customer_id, ix.accept_ms)
    args = {
        "now": now_ms, "n": max_actions, "ch": channel, "id": decision_id, "mode": mode,
        "keep_ms": keep_ms, "ttl_ms": records.ttl_ms(decision_id, ix.accept_ms),
        "bttl": BUDGET_TTL_SECONDS, "rsv": now_ms + ix.reservation_ms, "lim": [l.spec(now_ms) for l in limits],
        "cand": cand, "fb": fb, "codes": action_codes, "fbcode": fbcode, "rf": field,
        "cust": record["customer"], "tsd": records.ts_offset(decision_id, record["ts"]),
        "ctx": records.context_code(codes, record.get("channel", channel), record.get("control", "0"),
                                    record.get("counted", "1"), record.get("ruleset", ""), record.get("model", "")),
        "rpre": minute[0] if minute else "", "rmin": minute[1] if minute else 0, "rcut": minute[2] if minute else 0,
        "ix": f"d:{placement}" if interaction else "", "ixttl": ix.window_ms,
        "ixm": own_member(customer_id, interaction_key(customer_id, interaction)) if interaction else "",
        "head": head or "{}", "replace": replace, "late_ms": late_ms, "eps": epsilon, "u": draws or [],
    }
    return keys, json.dumps(args, separators=(",", ":")), limits


def _lua_number(value: float) -> str:
    """A number as Lua's ``tostring`` writes it (what the record showed when the script wrote it)."""
    return f"{float(value):.14g}"
