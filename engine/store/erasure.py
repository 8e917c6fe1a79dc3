"""Erasure that holds on disk: streams rewritten without the erased customers' entries, and the
persistence files rewritten after the data is gone.

Why rewrite streams: ``XDEL`` only flags an entry deleted inside its listpack node, so its bytes stay
in memory, in ``DUMP`` of the stream, and in the RDB preamble of the next AOF rewrite. Redis cannot
insert below a stream's top id either, so the only way to drop the bytes is a new stream: the shard's
other entries are copied to ``<key>:erasing`` (same hash slot) with their ids, in chunks of ``CHUNK``
entries by one script each (the stream keeps taking writes between chunks); one final script copies
the tail that arrived meanwhile, trims what the source lost meanwhile (``MINID``), sets the top id
(``XSETID``), recreates every consumer group at its last-delivered id with its consumers, restores
each pending entry that survives (``XCLAIM ... IDLE ... RETRYCOUNT ... FORCE JUSTID``), and ``RENAME``s
the copy over the source, atomically. One pass over a shard drops the entries of every customer given
(``rewrite_stream(..., customers)``), so a batch of erasures costs one pass per shard.

Why not per-customer encryption with key destruction: every stream entry, decision record and
history counter would need encrypting on the hot path (the decision path's budget is a few hundred
microseconds), and every consumer (training, reports, exploration counts) would need the keys; a
rewrite costs the erasure job, not the decisions.

Persistence (``rewrite_persistence``): after the deletions, on every node the admin client reaches
(replicas included on a cluster): any AOF rewrite or RDB save already running (it snapshotted before
the deletions) is waited out, then ``BGREWRITEAOF`` (where ``appendonly`` is on) and ``BGSAVE`` are
started and waited for, and a refusal, a failed child or a timeout is returned as a failure. These are
``@dangerous`` commands the service's own Redis user lacks: they run with ``REDIS_ADMIN_URL``'s user.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from engine.store.slots import key_slot


def customer_index_key(customer_id: str) -> str:
    """The customer's index of records stored outside the customer's keys or under names no computation
    gives: a sorted set on the customer's slot, member -> expiry (epoch ms): ``c:<key less nba:{c:<id>}:>``
    (one of the customer's own keys: an interaction hash, an outbound state; ``own_member``), ``k:<key>``
    (the same, as written before), ``d:<decision id>`` (a decision record whose bucket is not on the customer's
    slot, and every record written before ``customer_minutes_key``). Written by the script that writes the record
    (``decision/contact.PRESENT``; ``index_record`` where records are written off the hot path), trimmed
    by expiry there; read by erasure and export instead of a scan."""
    return f"nba:{{c:{customer_id}}}:index"


def _own_prefix(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:"


def own_member(customer_id: str, key: str) -> str:
    """The index member of one of the customer's keys: ``c:`` and the key without the customer's prefix,
    short enough (under 64 bytes) for the index to stay a compact listpack; ``k:<key>`` for any other."""
    prefix = _own_prefix(customer_id)
    return "c:" + key[len(prefix):] if key.startswith(prefix) else "k:" + key


def indexed_keys(customer_id: str, members: Iterable[str]) -> list[str]:
    """The keys the index members name (``c:`` and ``k:`` members)."""
    prefix = _own_prefix(customer_id)
    return [prefix + m[2:] if m.startswith("c:") else m[2:] for m in members if m.startswith(("c:", "k:"))]


# Lua that adds ``member`` living ``ttl`` ms to the index ``ikey`` (names bound by the including script):
# expiry by the server's clock, as PEXPIRE; entries past it dropped; the index lives as long as its
# longest-lived entry (a shorter record must not cut a longer one's entry short).
INDEX_LUA = """
local it = redis.call('TIME')
local inow = tonumber(it[1]) * 1000 + math.floor(tonumber(it[2]) / 1000)
redis.call('ZADD', ikey, inow + tonumber(ttl), member)
redis.call('ZREMRANGEBYSCORE', ikey, '-inf', inow)
local top = redis.call('ZRANGE', ikey, -1, -1, 'WITHSCORES')
if top[2] then redis.call('PEXPIREAT', ikey, top[2]) end
"""
_INDEX = "local ikey, member, ttl = KEYS[1], ARGV[1], ARGV[2]\n" + INDEX_LUA


def index_record(pipe: Any, customer_id: str, member: str, ttl_ms: int) -> None:
    """Queue on ``pipe`` an index entry (``d:<decision id>``, or ``own_member``) for a record written outside
    ``PRESENT``, living ``ttl_ms``."""
    # a Redis script call by execute_command: redis-py's cluster pipeline has no method for it, but routes
    # the command by its key
    pipe.execute_command("EVAL", _INDEX, 1, customer_index_key(customer_id), member, ttl_ms)


def customer_minutes_key(customer_id: str) -> str:
    """The minutes in which the customer's decision records were written (``engine.decision.records``):
    a string of 4-byte big-endian minutes since the epoch, appended in order (a minute once in a row), on
    the customer's slot like the buckets of those minutes, which erasure and export read for the
    customer's records. About 4 B per decision (1 KB at 30-day records and 8.64 decisions a day) where a
    sorted-set member per record cost about 150 B. The script that appends drops the oldest minutes whose
    bucket is gone (``MINUTES_LUA``); the key lives as long as its longest-lived bucket."""
    return f"nba:{{c:{customer_id}}}:record_minutes"


# Lua: index_minute(key, bucket prefix, minute, cutoff minute, ttl ms) appends ``minute`` to the minutes
# ``key`` (``customer_minutes_key``) and drops the oldest ones before ``cutoff`` whose bucket
# (``<prefix><minute>``, on the same slot) no longer exists: a minute leaves only with every record in it,
# whatever the callers' clocks (the buckets expire by the server's).
MINUTES_LUA = """
local function index_minute(mkey, prefix, minute, cutoff, ttl)
  local packed = struct.pack('>I4', minute)
  if redis.call('GETRANGE', mkey, -4, -1) ~= packed then redis.call('APPEND', mkey, packed) end
  local drop = 0
  while true do
    local head = redis.call('GETRANGE', mkey, drop, drop + 3)
    if #head < 4 then break end
    local m = struct.unpack('>I4', head)
    if m >= cutoff or redis.call('EXISTS', prefix .. string.format('%d', m)) == 1 then break end
    drop = drop + 4
  end
  if drop > 0 then redis.call('SET', mkey, redis.call('GETRANGE', mkey, drop, -1), 'KEEPTTL') end
  if redis.call('PTTL', mkey) < ttl then redis.call('PEXPIRE', mkey, ttl) end
end
"""
_MINUTE = MINUTES_LUA + "index_minute(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))\n"


def index_minute(pipe: Any, customer_id: str, prefix: str, minute: int, cutoff: int, ttl_ms: int) -> None:
    """Queue on ``pipe`` the minute of a decision record written outside ``PRESENT`` (``MINUTES_LUA``)."""
    pipe.execute_command("EVAL", _MINUTE, 1, customer_minutes_key(customer_id), prefix, minute, cutoff, ttl_ms)


CHUNK = 1000  # entries per copy script: ~1 ms of Redis time, so decisions keep flowing between chunks
CUSTOMER_FIELDS = ("customer_id", "customer")  # the field naming a stream entry's customer, by stream

_COPY_LUA = r"""
local drop = {}
for i = 3, #ARGV do drop[ARGV[i]] = true end
local function mine(f)
  for j = 1, #f, 2 do
    if (f[j] == 'customer_id' or f[j] == 'customer') and drop[f[j + 1]] then return true end
  end
  return false
end
local gone = {}  -- per dropped entry: its customer, its decision id ('' for none)
local function field(f, name)
  for j = 1, #f, 2 do if f[j] == name then return f[j + 1] end end
  return nil
end
local function copy(start, count)
  local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', count)
  local kept, dropped, last = 0, 0, ''
  for _, e in ipairs(entries) do
    last = e[1]
    if mine(e[2]) then
      dropped = dropped + 1
      gone[#gone + 1] = field(e[2], 'customer_id') or field(e[2], 'customer')
      gone[#gone + 1] = field(e[2], 'decision_id') or ''
    else redis.call('XADD', KEYS[2], e[1], unpack(e[2])); kept = kept + 1 end
  end
  return last, kept, dropped, #entries
end
"""

# KEYS[1] source stream, KEYS[2] copy; ARGV[1] start ('-' or '(<id>'), ARGV[2] count, ARGV[3..] customers.
# Returns {last id read or '', kept, dropped, {customer, decision id, ...} of the dropped entries}.
COPY_CHUNK = _COPY_LUA + r"""
local last, kept, dropped = copy(ARGV[1], tonumber(ARGV[2]))
return {last, kept, dropped, gone}
"""

# KEYS[1] source stream, KEYS[2] copy; ARGV as COPY_CHUNK. Copies the rest, recreates the groups, swaps.
# Returns {kept, dropped, groups, pending restored, pending dropped, gone (as COPY_CHUNK)} or {'gone'} when
# the source vanished.
SWAP = "redis.replicate_commands()\n" + _COPY_LUA + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]); return {'gone'} end
local kept, dropped, start = 0, 0, ARGV[1]
while true do
  local last, k, d, n = copy(start, 1000)
  kept = kept + k; dropped = dropped + d
  if n < 1000 then break end
  start = '(' .. last
end
local function map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end
local info = map(redis.call('XINFO', 'STREAM', KEYS[1]))
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], '__nba_erasing', '0', 'MKSTREAM')
  redis.call('XGROUP', 'DESTROY', KEYS[2], '__nba_erasing')
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first == 1 then redis.call('XTRIM', KEYS[2], 'MINID', first[1][1]) else
  -- the source holds nothing now: whatever the copy holds was trimmed or deleted meanwhile
  local all = redis.call('XRANGE', KEYS[2], '-', '+')
  for _, e in ipairs(all) do redis.call('XDEL', KEYS[2], e[1]) end
end
redis.call('XSETID', KEYS[2], info['last-generated-id'])
local groups, restored, lost = 0, 0, 0
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local gi = map(g)
  local name = gi['name']
  groups = groups + 1
  redis.call('XGROUP', 'CREATE', KEYS[2], name, gi['last-delivered-id'])
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], name)) do
    redis.call('XGROUP', 'CREATECONSUMER', KEYS[2], name, map(c)['name'])
  end
  local from = '-'
  while true do
    local pending = redis.call('XPENDING', KEYS[1], name, from, '+', 1000)
    for _, p in ipairs(pending) do
      local got = redis.call('XCLAIM', KEYS[2], name, p[2], 0, p[1], 'IDLE', p[3], 'RETRYCOUNT', p[4],
                             'FORCE', 'JUSTID')
      if #got == 1 then restored = restored + 1 else lost = lost + 1 end
    end
    if #pending < 1000 then break end
    from = '(' .. pending[#pending][1]
  end
end
redis.call('RENAME', KEYS[2], KEYS[1])
return {kept, dropped, groups, restored, lost, gone}
"""


# KEYS[1] stream; ARGV as COPY_CHUNK. Read only: {last id read or '', entries read, 1 when one of them is
# the customers'}. A stream without their entries is not rewritten (a copy is replicated and logged).
HAS_ANY = r"""
local drop = {}
for i = 3, #ARGV do drop[ARGV[i]] = true end
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local last = ''
for _, e in ipairs(entries) do
  last = e[1]
  local f = e[2]
  for j = 1, #f, 2 do
    if (f[j] == 'customer_id' or f[j] == 'customer') and drop[f[j + 1]] then return {last, #entries, 1} end
  end
end
return {last, #entries, 0}
"""


class ErasureFailed(redis.exceptions.RedisError):
    """A stream could not be rewritten (named in the message); the caller reports it."""


@dataclass
class Rewritten:
    """One stream's rewrite: entries kept and dropped, consumer groups recreated, pending entries
    restored and dropped (the dropped ones were the erased customers')."""

    key: str
    kept: int = 0
    dropped: int = 0
    groups: int = 0
    pending_restored: int = 0
    pending_dropped: int = 0
    by_customer: dict[str, int] = field(default_factory=dict)  # entries dropped per customer
    decision_ids: set[str] = field(default_factory=set)  # named by the dropped entries

    def _gone(self, flat: list[Any]) -> None:
        for i in range(0, len(flat) - 1, 2):
            customer = _s(flat[i])
            self.by_customer[customer] = self.by_customer.get(customer, 0) + 1
            if decision := _s(flat[i + 1]):
                self.decision_ids.add(decision)


def copy_key(key: str) -> str:
    """The rewrite's working copy of ``key``, on the same hash slot (same hash tag, or the key as tag)."""
    start = key.find("{")
    tagged = start >= 0 and key.find("}", start + 1) > start + 1
    copy = f"{key}:erasing" if tagged else f"nba:{{{key}}}:erasing"  # nba: for the ACL key pattern
    assert key_slot(copy) == key_slot(key)
    return copy


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _has_any(client: Any, key: str, ids: list[str], on_chunk: Callable[[], None] | None) -> bool:
    start = "-"
    while True:
        last, n, found = cast("list[Any]", client.eval(HAS_ANY, 1, key, start, CHUNK, *ids))
        if int(found):
            return True
        if int(n) < CHUNK or not _s(last):
            return False
        start = "(" + _s(last)
        if on_chunk is not None:
            on_chunk()


def rewrite_stream(client: Any, key: str, customers: Iterable[str],
                   on_chunk: Callable[[], None] | None = None) -> Rewritten:
    """Rewrite stream ``key`` without the entries of ``customers`` (see the module's docstring).
    ``on_chunk`` is called between chunks (a job's heartbeat). A stream holding none of their entries is
    left as it is (found by a read-only pass: a copy would be replicated and appended to the AOF)."""
    ids = sorted(set(customers))
    out = Rewritten(key)
    if not ids or not client.exists(key):
        return out
    work = copy_key(key)
    try:
        if not _has_any(client, key, ids, on_chunk):
            return out
        client.delete(work)  # a rewrite that died half-way
        start = "-"
        while True:
            last, kept, dropped, gone = cast("list[Any]", client.eval(COPY_CHUNK, 2, key, work, start, CHUNK, *ids))
            out.kept, out.dropped = out.kept + int(kept), out.dropped + int(dropped)
            out._gone(gone)
            if _s(last):
                start = "(" + _s(last)
            if int(kept) + int(dropped) < CHUNK:
                break
            if on_chunk is not None:
                on_chunk()
        reply = cast("list[Any]", client.eval(SWAP, 2, key, work, start, *ids))
    except redis.exceptions.RedisError as exc:
        try:
            client.delete(work)
        except redis.exceptions.RedisError:
            pass
        raise ErasureFailed(f"stream {key} not rewritten: {exc}") from exc
    if _s(reply[0]) == "gone":
        return Rewritten(key)
    kept, dropped, groups, restored, lost = (int(x) for x in reply[:5])
    out._gone(reply[5])
    out.kept, out.dropped = out.kept + kept, out.dropped + dropped
    out.groups, out.pending_restored, out.pending_dropped = groups, restored, lost
    return out


# --- persistence ----------------------------------------------------------------------------------

@dataclass
class Persisted:
    """What became of the persistence files: ``summary`` for the caller, one line per failure."""

    summary: str
    failures: list[str] = field(default_factory=list)


OPERATOR_STEP = "persistence rewrite pending: operator step"


def _nodes(admin: Any) -> list[tuple[str, redis.Redis]]:
    if hasattr(admin, "get_nodes"):  # a cluster: every node, replicas included (they keep files too)
        return [(f"{n.host}:{n.port}", n.redis_connection) for n in admin.get_nodes()]
    kw = admin.connection_pool.connection_kwargs
    return [(f"{kw.get('host', '?')}:{kw.get('port', '?')}", admin)]


def _info(node: redis.Redis) -> dict[str, Any]:
    return node.info("persistence")


def _wait(node: redis.Redis, done: Callable[[dict[str, Any]], bool], until: float) -> dict[str, Any]:
    while True:
        info = _info(node)
        if done(info):
            return info
        if time.monotonic() > until:
            raise TimeoutError("timed out waiting for the background save to end")
        time.sleep(0.05)


def _idle(info: dict[str, Any]) -> bool:
    return not (int(info.get("aof_rewrite_in_progress", 0)) or int(info.get("aof_rewrite_scheduled", 0))
                or int(info.get("rdb_bgsave_in_progress", 0)))


def _start(node: redis.Redis, command: str, until: float) -> None:
    """Start ``BGREWRITEAOF`` or ``BGSAVE`` once no child runs (one that runs snapshotted too early)."""
    while True:
        _wait(node, _idle, until)
        try:
            node.execute_command(command)
            return
        except redis.exceptions.ResponseError as exc:
            if "in progress" not in str(exc) or time.monotonic() > until:
                raise


def persist_node(node: redis.Redis, timeout: float = 300.0) -> list[str]:
    """Rewrite one node's AOF (when on) and save its RDB, each waited for; what was done."""
    until = time.monotonic() + timeout
    done = []
    appendonly = cast("dict[str, str]", node.config_get("appendonly")).get("appendonly") == "yes"
    if appendonly:
        _start(node, "BGREWRITEAOF", until)
        info = _wait(node, _idle, until)
        if info.get("aof_last_bgrewrite_status") != "ok":
            raise RuntimeError(f"AOF rewrite failed (aof_last_bgrewrite_status {info.get('aof_last_bgrewrite_status')})")
        done.append("aof rewritten")
    _start(node, "BGSAVE", until)
    info = _wait(node, _idle, until)
    if info.get("rdb_last_bgsave_status") != "ok":
        raise RuntimeError(f"RDB save failed (rdb_last_bgsave_status {info.get('rdb_last_bgsave_status')})")
    done.append("rdb saved")
    return done


def _replicas_caught_up(node: redis.Redis, until: float) -> bool:
    """Whether every replica of ``node`` (a primary) has the replication offset it has now."""
    info = node.info("replication")
    if info.get("role") != "master":
        return True
    target = int(info.get("master_repl_offset", 0))
    while True:
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if all(int(r.get("offset", 0)) >= target for r in replicas):
            return True
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
        info = node.info("replication")


def rewrite_persistence(admin: Any | None, timeout: float = 300.0) -> Persisted:
    """Rewrite the AOF and save the RDB of every node ``admin`` reaches (see the module's docstring).
    Without an admin client the step is left to the operator (``OPERATOR_STEP``) and reported as such."""
    if admin is None:
        return Persisted(OPERATOR_STEP, [OPERATOR_STEP + " (no REDIS_ADMIN_URL): run BGREWRITEAOF and BGSAVE "
                                                         "on every node, replicas included"])
    failures, done = [], 0
    nodes = []
    try:
        nodes = _nodes(admin)
    except redis.exceptions.RedisError as exc:
        return Persisted("persistence not rewritten", [f"persistence: cannot list the nodes: {exc}"])
    for name, node in nodes:  # replicas first get every deletion: a rewrite there must come after them
        try:
            if not _replicas_caught_up(node, time.monotonic() + 5.0):
                failures.append(f"persistence on {name}: a replica did not confirm the deletions within 5 s")
        except redis.exceptions.RedisError as exc:
            failures.append(f"persistence on {name}: replication not confirmed: {exc}")
    for name, node in nodes:
        try:
            persist_node(node, timeout)
            done += 1
        except (redis.exceptions.RedisError, RuntimeError, TimeoutError) as exc:
            failures.append(f"persistence on {name}: {exc}")
    summary = f"aof rewritten (where on) and rdb saved on {done} of {len(nodes)} nodes"
    return Persisted(summary, failures)


__all__ = ["CHUNK", "MINUTES_LUA", "OPERATOR_STEP", "ErasureFailed", "Persisted", "Rewritten", "copy_key",
           "customer_index_key", "customer_minutes_key", "index_minute", "index_record", "persist_node",
           "rewrite_persistence", "rewrite_stream"]
