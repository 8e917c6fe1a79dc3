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

import hashlib
import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from engine.features import ACTION_TYPES, CHANNELS

if TYPE_CHECKING:
    from engine.rules.model import Action

CONTACT_FILE = "contact.yaml"
DAY_MS = 86_400_000
DECISION_TTL_DAYS = 30
BUDGET_TTL_SECONDS = 2 * 86_400
KINDS = {"impressions": "i", "rejections": "r", "acceptances": "a"}
PERS = {"action": "a", "group": "g", "customer": "c"}


def contacts_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:contacts"


def decision_key(decision_id: str) -> str:
    return f"nba:decision:{decision_id}"


def budget_key(action_id: str, now: float) -> str:
    return f"nba:budget:{action_id}:{datetime.fromtimestamp(now, timezone.utc):%Y%m%d}"


@dataclass(frozen=True)
class ContactLimit:
    """At most ``max`` contacts of kind ``counts`` per ``per`` within ``days``, counted over
    ``channels`` (all when empty) and action ``types`` (all when empty); it applies to actions of those
    types decided on those channels."""

    name: str
    max: int
    days: float
    per: str = "action"  # action | group | customer
    counts: str = "impressions"  # impressions | rejections | acceptances
    channels: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    reason: str = ""
    source: str = ""

    def applies(self, action: "Action", channel: str) -> bool:
        return (not self.types or action.type in self.types) and (not self.channels or channel in self.channels)

    def spec(self, now_ms: int) -> list:
        """The limit as the Lua script reads it."""
        return [KINDS[self.counts], PERS[self.per], self.max, now_ms - int(self.days * DAY_MS),
                {c: 1 for c in self.channels} if self.channels else 0,
                {t: 1 for t in self.types} if self.types else 0]


@dataclass(frozen=True)
class QuietHours:
    """No contact on ``channels`` from ``start`` to ``end`` (minutes after midnight, UTC offset applied)."""

    channels: frozenset[str]
    start: int
    end: int
    utc_offset_minutes: int = 0

    def quiet(self, channel: str, now: float) -> bool:
        if channel not in self.channels:
            return False
        minute = int((now // 60 + self.utc_offset_minutes) % 1440)
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def describe(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True)
class ControlGroup:
    """A stable ``share`` of customers gets the control policy instead of the ranked decision."""

    share: float = 0.0
    policy: str = "random_eligible"  # random_eligible | generic
    generic_action: str = ""
    salt: str = "control"

    def contains(self, customer_id: str) -> bool:
        if self.share <= 0:
            return False
        digest = hashlib.blake2b(f"{self.salt}:{customer_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < self.share


@dataclass(frozen=True)
class ContactRules:
    limits: tuple[ContactLimit, ...] = ()
    quiet_hours: QuietHours | None = None
    control: ControlGroup = field(default_factory=ControlGroup)
    _applicable: dict = field(default_factory=dict, compare=False, repr=False)  # (action id, channel) -> [limit #]

    @property
    def history_days(self) -> float:
        return max((l.days for l in self.limits), default=0.0)

    def applicable(self, action: "Action", channel: str) -> list[int]:
        """1-based indexes of the limits that apply to ``action`` decided on ``channel``."""
        key = (action.id, channel)
        found = self._applicable.get(key)
        if found is None:
            found = self._applicable[key] = [i + 1 for i, l in enumerate(self.limits) if l.applies(action, channel)]
        return found


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


def present_args(rules: ContactRules, candidates: list, fallback: "Action | None", max_actions: int,
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
            day = day or f"{datetime.fromtimestamp(now, timezone.utc):%Y%m%d}"
            keys.append(f"nba:budget:{action.id}:{day}")
            bkey = len(keys)
        cand.append([action.id, action.group, action.type, action.value, rules.applicable(action, channel), bkey,
                     action.daily_budget or 0])
    fb = 0
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


# --- rules/contact.yaml ------------------------------------------------------------------------------

CONTACT_KEYS = {"contact_policies": False, "quiet_hours": False, "control_group": False, "description": False}
LIMIT_KEYS = {"name": True, "max": False, "days": True, "per": False, "counts": False, "channels": False,
              "types": False, "reason": False, "description": False}
QUIET_KEYS = {"channels": True, "from": True, "to": True, "utc_offset_minutes": False}
CONTROL_KEYS = {"share": True, "policy": False, "generic": False}


def _clock(loader, loc, what: str) -> int | None:
    value = loader.text(loc, what)
    try:
        hours, minutes = value.split(":")
        h, m = int(hours), int(minutes)
        if 0 <= h <= 24 and 0 <= m < 60:
            return (h * 60 + m) % 1440
    except ValueError:
        pass
    if value:
        loader.err(loc.error(f'{what} "{value}" is not a time of day', 'write it as "HH:MM" in quotes, e.g. "21:00"'))
    return None


def _names(loader, loc, what: str, known: Sequence[str]) -> frozenset[str]:
    from engine.rules.errors import suggest

    out = set()
    for value, item in loader.names(loc, what):
        if value not in known:
            loader.err(item.error(f'unknown {what[:-1] if what.endswith("s") else what} "{value}"',
                                  suggest(value, known) or "one of: " + ", ".join(known)))
        out.add(value)
    return frozenset(out)


def load_contact(loader, rules_dir: Path, actions: Sequence["Action"]) -> ContactRules:
    """``contact.yaml`` (optional) through the rule loader's validators; errors go to ``loader``."""
    from engine.rules.errors import suggest
    from engine.rules.yamlsrc import load_yaml

    path = Path(rules_dir) / CONTACT_FILE
    if not path.is_file():
        return ContactRules()
    tree, _source, errors = load_yaml(path, str(path))
    loader.errors.extend(errors)
    top = loader.keys(tree, CONTACT_KEYS, CONTACT_FILE) if tree is not None else None
    if not top:
        return ContactRules()
    limits, seen = [], set()
    for item in loader.sequence(top["contact_policies"], "contact_policies") if "contact_policies" in top else []:
        fields = loader.keys(item, LIMIT_KEYS, "contact policy")
        if fields is None:
            continue
        name = loader.ident(fields.get("name"), "contact policy name")
        if name in seen:
            loader.err(fields["name"].error(f'duplicate contact policy name "{name}"'))
        seen.add(name)
        what = f'contact policy "{name}"'
        days = loader.number(fields.get("days"), f"{what} days", positive=True)
        maximum = loader.number(fields.get("max"), f"{what} max", positive=True) if "max" in fields else 1
        if maximum is not None and int(maximum) != maximum:
            loader.err(fields["max"].error(f"{what} max must be a whole number"))
            maximum = None
        per = loader.text(fields.get("per"), f"{what} per", "action")
        if per not in PERS:
            loader.err(fields["per"].error(f'{what} per "{per}" is not one of: {", ".join(PERS)}', suggest(per, PERS)))
        counts = loader.text(fields.get("counts"), f"{what} counts", "impressions")
        if counts not in KINDS:
            loader.err(fields["counts"].error(f'{what} counts "{counts}" is not one of: {", ".join(KINDS)}',
                                              suggest(counts, KINDS)))
        channels = _names(loader, fields.get("channels"), "channels", CHANNELS)
        types = _names(loader, fields.get("types"), "types", ACTION_TYPES)
        if days is not None and maximum is not None and per in PERS and counts in KINDS:
            reason = loader.text(fields.get("reason"), f"{what} reason") or (
                f"{int(maximum)} {counts} per {per} in {days:g} days")
            limits.append(ContactLimit(name, int(maximum), float(days), per, counts, channels, types, reason,
                                       item.where()))
    quiet = None
    if "quiet_hours" in top:
        q = loader.keys(top["quiet_hours"], QUIET_KEYS, "quiet_hours")
        if q is not None:
            channels = _names(loader, q.get("channels"), "channels", CHANNELS)
            start, end = _clock(loader, q.get("from"), "quiet_hours from"), _clock(loader, q.get("to"), "quiet_hours to")
            offset = loader.number(q.get("utc_offset_minutes"), "quiet_hours utc_offset_minutes") or 0
            if start is not None and end is not None:
                quiet = QuietHours(channels, start, end, int(offset))
    control = ControlGroup()
    if "control_group" in top:
        c = loader.keys(top["control_group"], CONTROL_KEYS, "control_group")
        if c is not None:
            share = loader.number(c.get("share"), "control_group share", minimum=0)
            if share is not None and share > 0.5:
                loader.err(c["share"].error("control_group share must be at most 0.5", "e.g. 0.05 for 5%"))
            policy = loader.text(c.get("policy"), "control_group policy", "random_eligible")
            if policy not in ("random_eligible", "generic"):
                loader.err(c["policy"].error(f'control_group policy "{policy}" is not random_eligible or generic'))
            generic = loader.text(c.get("generic"), "control_group generic")
            ids = [a.id for a in actions]
            if generic and generic not in ids:
                loader.err(c["generic"].error(f'unknown action "{generic}" in control_group generic',
                                              suggest(generic, ids)))
            if policy == "generic" and not generic:
                loader.err(c["share"].error('control_group policy "generic" needs "generic: <action id>"'))
            control = ControlGroup(float(share or 0), policy, generic)
    return ContactRules(tuple(limits), quiet, control)
