"""Privacy: everything stored about one customer, exported as JSON or erased (``nba customer export`` /
``nba customer forget``, ``AdminService.ExportCustomer`` / ``ForgetCustomer``).

Where the service keeps a customer's data in Redis (every place, found by the key builders and the
stream writers of the wings below):

- the customer's own keys, all under the hash tag ``nba:{c:<id>}:*`` (found with ``SCAN MATCH``):
  ``profile`` (``store/profiles.py``: features, consent, open cases), ``triggers``, ``contacts`` (the
  contact history: counters per action, channel and day, ``decision/history.py``), ``ix:<interaction>``
  (decisions stored per interaction), ``events`` and ``event_ids`` (event history and dedupe, ``events/processor.py``),
  ``outbound:<pattern>:<event>`` and its ``:run`` claim (an outbound's state);
- decision records ``nba:decision:<decision id>`` or ``nba:decision:{<slot tag>}:<decision id>`` (hash
  with ``customer``; kept for the responses' ``accept_days``): the customer's decision ids come from the
  decision, response and outbound stream entries, the interaction hashes, a contact history still in
  its earlier layout (one sorted-set member per contact, with the decision id), and a ``SCAN`` of every
  decision record whose ``customer`` is the customer (the streams may have been trimmed);
- shared keys holding members of the customer: ``nba:timers`` (every shard of it on a Redis Cluster;
  absence timers and postponed outbound actions, a JSON member whose ``"c"`` is the customer) and
  ``nba:reservations`` (budget units reserved for unreported impressions,
  ``<decision id>|<action>|<budget key>``: removed, and the unit given back as the releaser would at
  the reservation's expiry: the impression was never reported);
- every Redis Stream (found with ``SCAN TYPE stream``: ``nba:stream:decisions``, ``responses``,
  ``events``, ``events:in``, ``events:invalid``, ``outbound``, the simulator's streams and any other),
  read in chunks with ``XRANGE``: an entry is the customer's when its ``customer_id`` (or ``customer``)
  field is the customer id; those entries are deleted with ``XDEL``. On a Redis Cluster the shards of a
  stream (``<stream>:{shard:<k>}``, ``store/slots.py``) are streams of their own, found the same way
  (SCAN runs on every primary); the export lists them under the stream's name.

Not erased, on purpose: aggregates without a customer id (``nba:budget:<action>:<day>`` counters,
``nba:explore:counts`` / ``nba:explore:posterior:<period>`` per-action counts, ``nba:meta``), and the
audit stream ``nba:stream:audit``, which keeps the customer id of each erasure request with who asked
and when: that is the legal record of the erasure. Outside Redis: the service log (which may name
customers), training sets exported to files and models trained earlier, and Redis's own persistence:
with append-only persistence on (the embedded Redis) ``forget`` starts ``BGREWRITEAOF`` so the old
file with the customer's data is replaced; RDB snapshots and backups of an external Redis keep it until
they are rotated.

Safe to run twice (the second run finds nothing and deletes nothing, but is audited too) and while
the service runs. It is not a tombstone: a decision, response or event for the customer that is in
flight (or arrives later) writes again, and the decision log writes decisions a few ms after they are
made. Stop the customer's traffic first (the systems that call us should stop sending the customer's
id), or run ``forget`` again a few seconds later: the counts of the second run say whether anything
had come back.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from engine.decision.budget_claims import BudgetClaims
from engine.decision.contact import RESERVATIONS_KEY, decision_key
from engine.decision.request import MAX_ID_LENGTH, InvalidRequest
from engine.events.processor import TIMERS_KEY
from engine.features import FeatureSchema
from engine.store.audit import AUDIT_STREAM, audit
from engine.store.profiles import ProfileStore, SchemaMismatch, is_cluster, profile_key, triggers_key
from engine.store.slots import shard_keys
from engine.store.streams import id_order

log = logging.getLogger(__name__)

DECISION_PREFIX = "nba:decision:"  # also ``nba:decision:{<slot tag>}:<id>``: the prefix matches both
SHARD_SUFFIX = re.compile(r":\{shard:\d+\}$")  # a stream shard's key on a Redis Cluster (store/slots.py)
CUSTOMER_FIELDS = (b"customer_id", b"customer")  # the field naming an entry's customer, by stream
CHUNK = 1000  # keys per SCAN step, entries per XRANGE / XDEL, members per ZSCAN step

# KEYS[1] reservations zset; ARGV reservation members. Removes them and gives each removed one's budget
# unit back, as decision/contact.py RELEASE does at expiry (atomic with the releaser: a unit is given
# back once). Returns {removed, units given back}.
_DROP_RESERVATIONS = """
local removed, returned = 0, 0
for _, m in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], m) == 1 then
    removed = removed + 1
    local counted = false  -- one member may hold several counters (an action's and its campaign's)
    for bkey in string.gmatch(string.match(m, '^[^|]*|[^|]*|(.+)$') or '', '%S+') do
      if redis.call('EXISTS', bkey) == 1 then
        redis.call('DECR', bkey)
        counted = true
      end
    end
    if counted then returned = returned + 1 end
  end
end
return {removed, returned}
"""


def _drop_reservations(client: redis.Redis, reservations: list[tuple[str, str, float]]) -> tuple[int, int]:
    """Removes the reservations and gives their budget units back: (removed, given back). On a cluster
    the counters are on other slots than the reservations, so a unit goes back after its ZREM won."""
    gone = returned = 0
    if is_cluster(client):
        budgets = BudgetClaims(client)
        for key, member, _ in reservations:
            if client.zrem(key, member):
                gone += 1
                returned += 1 if budgets.give_back_reserved(member) else 0
        return gone, returned
    members = [m for _, m, _ in reservations]
    for i in range(0, len(members), CHUNK):
        r = cast("list[int]", client.eval(_DROP_RESERVATIONS, 1, RESERVATIONS_KEY, *members[i:i + CHUNK]))
        gone, returned = gone + int(r[0]), returned + int(r[1])
    return gone, returned


@dataclass
class Erased:
    """What ``forget_customer`` removed. ``places``: counts by kind of place (for the log and tests)."""

    customer_id: str
    keys_deleted: int = 0
    stream_entries_deleted: int = 0
    members_removed: int = 0
    budget_units_returned: int = 0
    aof_rewrite: str = ""  # started | off | failed: ... (the append-only file still held the data)
    places: dict[str, int] = field(default_factory=dict)


@dataclass
class _Found:
    """Where one customer's data is, as found by ``_locate``."""

    keys: list[str] = field(default_factory=list)  # the customer's own keys (hash tag)
    decisions: list[str] = field(default_factory=list)  # decision record keys whose customer is this one
    timers: list[tuple[str, str]] = field(default_factory=list)  # (timers shard key, member)
    reservations: list[tuple[str, str, float]] = field(default_factory=list)  # (shard key, member, expiry ms)
    entries: dict[str, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)  # stream -> entries


def check_customer_id(customer_id: str) -> str:
    """A customer id as Decide accepts it; ``InvalidRequest`` names the field otherwise."""
    if not customer_id or not customer_id.strip():
        raise InvalidRequest("customer_id", "must not be empty")
    if len(customer_id) > MAX_ID_LENGTH or any(c in customer_id for c in "{}\n\r\t "):
        raise InvalidRequest("customer_id", f"at most {MAX_ID_LENGTH} characters, no spaces or braces")
    return customer_id


def customer_pattern(customer_id: str) -> str:
    """``SCAN MATCH`` pattern of every key with the customer's hash tag (glob characters escaped)."""
    return "nba:{c:" + re.sub(r"([*?\[\]\\])", r"\\\1", customer_id) + "}:*"


def _s(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _scan(client: redis.Redis, **kw: Any) -> Iterator[str]:
    # on a Redis Cluster redis-py 8 sends SCAN to every primary and follows each one's cursor
    for key in client.scan_iter(count=CHUNK, **kw):
        yield _s(key)


def streams(client: redis.Redis) -> list[str]:
    """Every stream in the database."""
    return sorted(set(_scan(client, _type="stream")))


def _decision_id(key: str) -> str:
    """The decision id of a decision record's key (either form, see ``DECISION_PREFIX``)."""
    rest = key[len(DECISION_PREFIX):]
    return rest.split("}:", 1)[1] if rest.startswith("{") and "}:" in rest else rest


def _entries_of(client: redis.Redis, stream: str, customer: bytes) -> Iterator[tuple[str, dict[str, str]]]:
    """The customer's entries of ``stream``, read in chunks of ``CHUNK``."""
    start = "-"
    while True:
        chunk = cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(stream, min=start, max="+", count=CHUNK))
        for entry_id, fields in chunk:
            if any(fields.get(f) == customer for f in CUSTOMER_FIELDS):
                yield _s(entry_id), {_s(k): _s(v) for k, v in fields.items()}
        if len(chunk) < CHUNK:
            return
        start = "(" + _s(chunk[-1][0])


def _locate(client: redis.Redis, customer_id: str, skip_streams: frozenset[str] = frozenset()) -> _Found:
    found = _Found()
    customer = customer_id.encode()
    found.keys = sorted(set(_scan(client, match=customer_pattern(customer_id))))
    candidates: set[str] = set()  # decision ids met in the customer's data
    for stream in streams(client):
        if stream in skip_streams:
            continue
        entries = list(_entries_of(client, stream, customer))
        if entries:
            found.entries[stream] = entries
            candidates.update(f["decision_id"] for _, f in entries if f.get("decision_id"))
    for key in found.keys:
        kind = _s(cast(bytes, client.type(key)))
        if key.endswith("}:contacts") and kind == "zset":  # not yet folded into counters
            for member in cast("list[bytes]", client.zrange(key, 0, -1)):
                parts = _s(member).split("|")
                if len(parts) > 5 and parts[5]:
                    candidates.add(parts[5])
        elif ":ix:" in key and kind == "hash":
            for body in cast("dict[bytes, bytes]", client.hgetall(key)).values():
                try:
                    candidates.add(str(json.loads(body)["h"]["id"]))
                except (ValueError, KeyError, TypeError):
                    pass
    records = {decision_key(d) for d in candidates} | set(_scan(client, match=DECISION_PREFIX + "*"))
    ordered = sorted(records)
    for i in range(0, len(ordered), CHUNK):
        batch = ordered[i:i + CHUNK]
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.hget(key, "customer")
        found.decisions += [key for key, owner in zip(batch, pipe.execute()) if owner == customer]
    for timers in shard_keys(TIMERS_KEY, client):  # the customer's shard, and any other to be sure
        for member, _due in client.zscan_iter(timers, count=CHUNK):
            try:
                owner = json.loads(member).get("c")
            except (ValueError, AttributeError):
                continue
            if owner == customer_id:
                found.timers.append((timers, _s(member)))
    ids = {_decision_id(key) for key in found.decisions} | candidates
    for reservations in shard_keys(RESERVATIONS_KEY, client):
        for member, expiry in client.zscan_iter(reservations, count=CHUNK):
            if _s(member).split("|", 1)[0] in ids:
                found.reservations.append((reservations, _s(member), expiry))
    return found


# --- export -------------------------------------------------------------------------------------

def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + value.hex()


def _maybe_json(text: str) -> Any:
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _value(client: redis.Redis, key: str, customer_id: str, now_ms: int, schema: FeatureSchema | None) -> Any:
    """A key's value as JSON-serialisable data (the profile decoded to attribute names under ``schema``;
    as stored without one, or when it cannot be read under it)."""
    kind = _s(cast(bytes, client.type(key)))
    if kind == "hash":
        raw = cast("dict[bytes, bytes]", client.hgetall(key))
        if key == profile_key(customer_id) and schema is not None:
            try:
                p = ProfileStore(client).decode(customer_id, raw, {}, now_ms, schema)
            except SchemaMismatch:
                pass
            else:
                return {"schema": _text(raw.get(b"schema", b"")),
                        "numeric": {name: float(v) for name, v in zip(schema.numeric, p.numeric.tolist())},
                        "categorical": {name: p.categorical.get(name, "") for name in schema.categorical},
                        "sets": {name: sorted(members) for name, members in p.sets.items()},
                        "open_cases": list(p.open_cases)}
        if key == triggers_key(customer_id):
            return {_text(k): {"expires_ms": int(v)} for k, v in raw.items()}
        return {_text(k): _maybe_json(_text(v)) for k, v in raw.items()}
    if kind == "zset":
        return [{"member": _maybe_json(_text(m)), "score": s}
                for m, s in cast("list[tuple[bytes, float]]", client.zrange(key, 0, -1, withscores=True))]
    if kind == "string":
        value = cast("bytes | None", client.get(key))
        return None if value is None else _maybe_json(_text(value))
    if kind == "set":
        return sorted(_text(m) for m in cast("set[bytes]", client.smembers(key)))
    if kind == "list":
        return [_maybe_json(_text(m)) for m in cast("list[bytes]", client.lrange(key, 0, -1))]
    if kind == "stream":
        return [{"id": _s(i), **{_text(k): _text(v) for k, v in f.items()}}
                for i, f in cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(key))]
    return None  # deleted meanwhile


def export_customer(client: redis.Redis, customer_id: str, who: str | None = "cli", now: float | None = None,
                    schema: FeatureSchema | None = None) -> dict:
    """Everything stored about ``customer_id``, as JSON-serialisable data: the customer's keys (with
    their time to live), decision records, timers, budget reservations and stream entries (the audit
    stream's included: earlier exports and erasures). The export itself is audited (``who``; None:
    not audited)."""
    check_customer_id(customer_id)
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    found = _locate(client, customer_id)
    keys = {key: _value(client, key, customer_id, now_ms, schema) for key in found.keys}
    ttls = {key: (ttl if (ttl := int(client.pttl(key))) >= 0 else None) for key in found.keys}
    decisions = {_decision_id(key): {_text(k): _text(v) for k, v in
                                              cast("dict[bytes, bytes]", client.hgetall(key)).items()}
                 for key in found.decisions}
    out: dict[str, Any] = {
        "customer_id": customer_id,
        "exported_at": now,
        "keys": {k: v for k, v in keys.items() if v is not None},
        "key_ttl_ms": {k: ttls[k] for k in keys if keys[k] is not None},
        "decision_records": {d: fields for d, fields in decisions.items() if fields},
        "timers": [{"member": json.loads(m), "key": k} for k, m in found.timers],
        "budget_reservations": [{"member": m, "expires_ms": e, "key": k} for k, m, e in found.reservations],
        "streams": _by_base(found.entries),
    }
    if who is not None:
        audit(client, who, "export_customer", customer_id=customer_id, keys=len(out["keys"]),
              stream_entries=sum(len(e) for e in found.entries.values()))
    return out


def _by_base(entries: dict[str, list[tuple[str, dict[str, str]]]]) -> dict[str, list[dict[str, Any]]]:
    """Stream entries by stream name: the shards of a stream on a Redis Cluster under their base name, in
    entry id order, each entry with its ``shard`` key."""
    out: dict[str, list[tuple[tuple[int, int], dict[str, Any]]]] = {}
    for key, found in entries.items():
        shard = SHARD_SUFFIX.search(key)
        base = key[:shard.start()] if shard else key
        for entry_id, fields in found:
            out.setdefault(base, []).append((id_order(entry_id), {"id": entry_id, "fields": fields,
                                                                  **({"shard": key} if shard else {})}))
    return {base: [e for _, e in sorted(items, key=lambda x: x[0])] for base, items in sorted(out.items())}


# --- erasure ------------------------------------------------------------------------------------

def forget_customer(client: redis.Redis, customer_id: str, who: str = "cli", rewrite_aof: bool = True) -> Erased:
    """Erase ``customer_id`` everywhere (see the module's docstring), then append an audit record to
    ``nba:stream:audit`` (who, action, customer_id, counts, ts) and log it. Safe to run twice."""
    check_customer_id(customer_id)
    found = _locate(client, customer_id, skip_streams=frozenset({AUDIT_STREAM}))
    out = Erased(customer_id)
    # shared members first (a timer would write the customer's keys again), then keys, then streams
    removed = 0
    for key, member in found.timers:
        removed += int(client.zrem(key, member))
    out.places["timers"] = removed
    gone, returned = _drop_reservations(client, found.reservations)
    out.places["reservations"] = gone
    out.members_removed = removed + gone
    out.budget_units_returned = returned
    for kind, keys in (("customer_keys", found.keys), ("decision_records", found.decisions)):
        deleted = 0
        for i in range(0, len(keys), CHUNK):
            deleted += int(client.delete(*keys[i:i + CHUNK]))
        out.places[kind] = deleted
        out.keys_deleted += deleted
    for stream, entries in found.entries.items():
        ids = [i for i, _ in entries]
        deleted = 0
        for i in range(0, len(ids), CHUNK):
            deleted += int(client.xdel(stream, *ids[i:i + CHUNK]))
        out.places[stream] = deleted
        out.stream_entries_deleted += deleted
    if rewrite_aof:
        out.aof_rewrite = _rewrite_aof(client)
    audit(client, who, "forget_customer", customer_id=customer_id, keys_deleted=out.keys_deleted,
          stream_entries_deleted=out.stream_entries_deleted, members_removed=out.members_removed,
          budget_units_returned=out.budget_units_returned)
    log.info("customer %s forgotten by %s: %d keys, %d stream entries, %d members (%s)",
             customer_id, who, out.keys_deleted, out.stream_entries_deleted, out.members_removed,
             ", ".join(f"{k} {v}" for k, v in out.places.items() if v) or "nothing found")
    return out


def _rewrite_aof(client: redis.Redis) -> str:
    """Start rewriting the append-only file (which still holds the erased data) when it is on: on every
    node of a cluster, replicas included (they hold the data too)."""
    if is_cluster(client):
        results = {_rewrite_node(node.redis_connection) for node in cast(Any, client).get_nodes()}
        return results.pop() if len(results) == 1 else ", ".join(sorted(results))
    return _rewrite_node(client)


def _rewrite_node(client: redis.Redis) -> str:
    try:
        config = cast("dict[str, str]", client.config_get("appendonly"))
        if config.get("appendonly") != "yes":
            return "off"
        client.bgrewriteaof()
        return "started"
    except redis.exceptions.ResponseError as exc:  # e.g. CONFIG not allowed to this ACL user
        if "already in progress" in str(exc):
            return "started"
        log.warning("append-only file not rewritten after an erasure: %s", exc)
        return f"failed: {exc}"


__all__ = ["Erased", "check_customer_id", "export_customer", "forget_customer"]
