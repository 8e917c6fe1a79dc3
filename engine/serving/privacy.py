"""Privacy: a data-subject export of one customer, and erasure of customers (``nba customer export`` /
``nba customer forget``, ``AdminService.ExportCustomer`` / ``ForgetCustomer``, run as jobs by
``engine.serving.privacy_jobs``).

Where the service keeps a customer's data in Redis, and how each place is found without scanning the
database (the work scales with the customer, not the database):

- the customer's own keys, under the hash tag ``nba:{c:<id>}:*``, by name: ``profile``
  (``store/profiles.py``: attributes, consent, open cases), ``triggers``, ``contacts`` (contact history,
  ``decision/history.py``), ``events``, ``event_ids`` and ``effects`` (``events/processor.py``), ``index``,
  ``record_minutes``;
  the interaction hashes ``ix:<interaction>`` and the outbound state keys ``outbound:<pattern>:<event>``
  (and their ``:run`` claims) through the customer's index (``store/erasure.customer_index_key``:
  member ``k:<key>``). Outbound keys written before they were indexed are found by one ``SCAN MATCH
  nba:{c:*}:outbound:*`` per erasure batch (key names only), until the indexing version has run
  longer than such a key lives (``outbound_index_complete``; ``App.start`` records when it began);
- decision records (``decision/records.py``: a field of ``nba:decisions:{<slot tag>}:<minute>`` whose
  value starts with the customer; or, in the earlier layout, ``nba:decision:{<slot tag>}:<decision id>``)
  through the minutes of the customer's records (``store/erasure.customer_minutes_key``: their buckets,
  written by the script that writes the record), the index (``d:<decision id>``: records written before
  the minutes, or whose bucket is elsewhere), the interaction hashes,
  a contact history in its earlier layout, and the decision ids of the customer's stream entries
  (records older than the index); a record is erased only when its ``customer`` is the customer;
- ``nba:timers`` (the customer's shard: absence timers and postponed outbound actions, JSON members
  whose ``"c"`` is the customer) and ``nba:reservations`` (budget units reserved for unreported
  impressions, ``<decision id>|<action>|<budget keys>``: removed, and the unit given back);
- stream entries whose ``customer_id`` (or ``customer``) is the customer: in the customer's shard
  (``store/slots.customer_shard_key``) of ``CUSTOMER_STREAMS`` and in the single keys of
  ``SHARED_STREAMS``. Erasure rewrites those streams without the entries (``store/erasure.py``:
  ``XDEL`` would leave the bytes in memory, in ``DUMP`` and in the next AOF/RDB), one pass per stream
  for every customer of the batch; then the AOF and RDB are rewritten (``rewrite_persistence``);
- the archive's copies of the decision, response and event streams (``engine/store/archive.py``, its
  root given as ``archive``): the customer's rows are removed from every Parquet file of the customer's
  shard that holds them, after the streams' rewrite (``store/archive_erasure.py``); the export adds the
  archived entries that are no longer in the streams (by entry id).

Not erased, on purpose: aggregates without a customer id (``nba:budget:*`` counters, exploration
counts, ``nba:meta``) and the audit trail, which names the customer by pseudonym only
(``store/pseudonym.py``): who asked, when, and what was erased. Outside Redis and left to the operator:
models trained earlier, training files exported earlier (written 0600), backups and replicas' files
of an external Redis the admin user does not reach.

Not a tombstone: a decision or event for the customer arriving after the erasure writes again. Stop
the customer's traffic first, or run ``forget`` again; the counts of the second run say what came back.

The export (``export_customer``) answers a data-subject access request in plain fields, no internal
key names or encoded blobs. Its JSON document:

- ``customer_id``; ``exported_at`` (ISO 8601, UTC; every ``*_at`` below is too);
- ``attributes``: the profile by the attribute names declared in ``domain.yaml`` (numbers, dates as
  ``YYYY-MM-DD``, unknown values as null, categories, sets of values); ``consents``: the channels the
  customer consented to; ``open_cases``;
- ``triggers``: ``[{name, expires_at}]``, situations raised by events (e.g. a complaint opened);
- ``contact_history``: ``[{date, kind (shown | accepted | rejected), action, channel, count, first_at,
  last_at}]``, what was presented when, on which channel, and the customer's answers, per day;
- ``decisions``: ``[{decision_id, decided_at, channel, touchpoint, interaction_id, actions, control_group,
  ruleset_version, model_version, responses: [{action, outcome, at}]}]``;
- ``events``: ``[{event_id, type, at, source, attributes, refused (why an event was not accepted, or
  "")}]`` (the log); ``event_history``: ``[{event_id, id_tag, type, at, attributes}]``, the recent events
  the patterns read (``events/processor.py``): a member of the compact layout stores an 11-character
  digest of the id (``id_tag``), shown with the id when the log still has the event, else ``event_id``
  is ""; a member of the earlier layout has its ``event_id`` and no tag;
  ``outbound``: ``[{action, channel, decision_id, event_id, at, content}]`` (messages sent);
- ``scheduled``: ``[{kind (absence timer | postponed message), due_at}]``;
  ``budget_reservations``: ``[{decision_id, action, expires_at}]``;
- ``interactions``: ``[{interaction_id, touchpoint, max_actions, decision_id, actions}]`` (a repeated ask
  within an interaction gets the same answer);
- ``privacy_requests``: the audit trail's records of this customer: ``[{action, at, who}]``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis

from engine.decision import history, records
from engine.decision.budget_claims import BudgetClaims
from engine.decision.codes import Codes
from engine.decision.contact import RESERVATIONS_KEY
from engine.decision.interactions import without_context
from engine.decision.request import MAX_ID_LENGTH, InvalidRequest
from engine.events.processor import (
    OUTBOUND_INDEXED_SINCE,
    OUTBOUND_STREAM,
    TIMERS_KEY,
    effects_key,
    event_ids_key,
    events_key,
)
from engine.events.stream import INGEST_STREAM, INVALID_STREAM
from engine.features import FeatureSchema
from engine.rules.patterns import Event, id_tag
from engine.store.archive_erasure import customer_entries, erase_customers
from engine.store.archive_fs import Root
from engine.store.audit import AUDIT_STREAM, audit
from engine.store.erasure import ErasureFailed, customer_index_key, customer_minutes_key, indexed_keys, rewrite_stream
from engine.store.profiles import (
    DECISIONS_STREAM,
    EVENTS_STREAM,
    META_KEY,
    RESPONSES_STREAM,
    ProfileStore,
    SchemaMismatch,
    is_cluster,
    profile_key,
    triggers_key,
)
from engine.store.pseudonym import pseudonym
from engine.store.slots import customer_shard_key, shard_keys

log = logging.getLogger(__name__)

CUSTOMER_STREAMS = (DECISIONS_STREAM, RESPONSES_STREAM, EVENTS_STREAM, OUTBOUND_STREAM)  # sharded by customer
SHARED_STREAMS = (INGEST_STREAM, INVALID_STREAM)  # one key for every customer (written by other systems)
CHUNK = 1000  # members per ZSCAN step, keys per DEL, entries per stream read

# KEYS[1] stream; ARGV[1] start ('-' or '(<id>'), ARGV[2] count, ARGV[3] customer. The customer's entries
# of the next ``count`` entries, read and filtered inside Redis: {last id read or '', entries}.
_FIND = r"""
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local out, last = {}, ''
for _, e in ipairs(entries) do
  last = e[1]
  local f = e[2]
  for j = 1, #f, 2 do
    if (f[j] == 'customer_id' or f[j] == 'customer') and f[j + 1] == ARGV[3] then out[#out + 1] = e; break end
  end
end
return {last, #entries, out}
"""

# KEYS[1] reservations zset; ARGV reservation members. Removes them and gives each removed one's budget
# unit back, as decision/contact.py RELEASE does at expiry. Returns {removed, units given back}.
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


def check_customer_id(customer_id: str) -> str:
    """A customer id as Decide accepts it; ``InvalidRequest`` names the field otherwise."""
    if not customer_id or not customer_id.strip():
        raise InvalidRequest("customer_id", "must not be empty")
    if len(customer_id) > MAX_ID_LENGTH or any(c in customer_id for c in "{}\n\r\t "):
        raise InvalidRequest("customer_id", f"at most {MAX_ID_LENGTH} characters, no spaces or braces")
    return customer_id


def _s(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _attribute(value: float, is_date: bool) -> Any:
    """A stored number as the customer gave it: float32 noise dropped (7 significant digits), a date as
    ``YYYY-MM-DD``, unknown (NaN) as None."""
    if math.isnan(value):
        return None
    if is_date:
        return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=value)).date().isoformat()
    return float(f"{value:.7g}")


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def fixed_keys(customer_id: str) -> list[str]:
    """The customer's keys whose names are computed from the id alone."""
    return [profile_key(customer_id), triggers_key(customer_id), history.contacts_key(customer_id),
            events_key(customer_id), event_ids_key(customer_id), effects_key(customer_id),
            customer_index_key(customer_id), customer_minutes_key(customer_id)]


def customer_streams(client: Any, customer_id: str) -> list[str]:
    """The stream keys that may hold the customer's entries (computed, not scanned)."""
    return [customer_shard_key(base, customer_id, client) for base in CUSTOMER_STREAMS] + list(SHARED_STREAMS)


def _tag_of(key: str) -> str | None:
    """The customer id of a ``nba:{c:<id>}:...`` key."""
    if not key.startswith("nba:{c:"):
        return None
    end = key.find("}:", 7)
    return key[7:end] if end > 0 else None


@dataclass
class _Found:
    """Where one customer's data is (apart from stream entries, found by the stream pass)."""

    keys: list[str] = field(default_factory=list)
    decision_ids: set[str] = field(default_factory=set)
    timers: list[tuple[str, str, float]] = field(default_factory=list)  # (shard key, member, due ms)


LEGACY_OUTBOUND_KEEP_MS = 30 * 86_400_000  # how long the versions before the index kept an outbound's state


def outbound_index_complete(client: Any, now_ms: int) -> bool:
    """Whether every outbound state key is in its customer's index: the indexing version has run longer
    than such a key lived (``LEGACY_OUTBOUND_KEEP_MS``), so no key written before it can be left."""
    since = client.hget(META_KEY, OUTBOUND_INDEXED_SINCE)
    return since is not None and now_ms - int(since) > LEGACY_OUTBOUND_KEEP_MS + 86_400_000  # a day for an upgrade


def _outbound_keys(client: Any, customers: set[str]) -> dict[str, list[str]]:
    """The outbound state keys of ``customers`` written before they were indexed: one ``SCAN MATCH`` (key
    names only) for all of them, and only until ``outbound_index_complete``."""
    out: dict[str, list[str]] = {}
    if outbound_index_complete(client, int(time.time() * 1000)):
        return out
    for key in client.scan_iter(match="nba:{c:*}:outbound:*", count=CHUNK):
        name = _s(key)
        owner = _tag_of(name)
        if owner in customers:
            out.setdefault(owner, []).append(name)
    return out


def _locate(client: Any, customer_id: str, outbound: list[str], with_timers: bool = True) -> _Found:
    found = _Found()
    index = [_s(m) for m in cast("list[bytes]", client.zrange(customer_index_key(customer_id), 0, -1))]
    found.decision_ids = {m[2:] for m in index if m.startswith("d:")} | records.customer_record_ids(client, customer_id)
    indexed = indexed_keys(customer_id, index)
    runs = [f"{k}:run" for k in indexed if ":outbound:" in k]  # an outbound's run claim, while it runs
    candidates = fixed_keys(customer_id) + indexed + runs + outbound
    pipe = client.pipeline(transaction=False)
    for key in candidates:
        pipe.type(key)
    kinds = dict(zip(candidates, (_s(t) for t in pipe.execute())))
    found.keys = sorted({k for k, t in kinds.items() if t != "none"})
    for key in found.keys:
        if key == history.contacts_key(customer_id) and kinds[key] == "zset":  # the earlier layout
            for member in cast("list[bytes]", client.zrange(key, 0, -1)):
                parts = _s(member).split("|")
                if len(parts) > 5 and parts[5]:
                    found.decision_ids.add(parts[5])
        elif ":ix:" in key and kinds[key] == "hash":
            for body in cast("dict[bytes, bytes]", client.hgetall(key)).values():
                try:
                    found.decision_ids.add(str(json.loads(body)["h"]["id"]))
                except (ValueError, KeyError, TypeError):
                    pass
    if with_timers:
        found.timers = _timers(client, {customer_id}).get(customer_id, [])
    return found


def _timers(client: Any, customers: set[str]) -> dict[str, list[tuple[str, str, float]]]:
    """The customers' timers: one ZSCAN of each of their shards of ``nba:timers`` for all of them."""
    out: dict[str, list[tuple[str, str, float]]] = {}
    for key in sorted({customer_shard_key(TIMERS_KEY, c, client) for c in customers}):
        for member, due in client.zscan_iter(key, count=CHUNK):
            try:
                owner = json.loads(member).get("c")
            except (ValueError, AttributeError):
                continue
            if owner in customers:
                out.setdefault(owner, []).append((key, _s(member), float(due)))
    return out


def _records(client: Any, customer_id: str, decision_ids: Iterable[str]) -> dict[str, tuple[str, dict[str, str]]]:
    """The decision records among ``decision_ids`` that exist and belong to the customer, in either layout
    (``decision/records.read``: decision id -> (where, fields))."""
    found = records.read(client, Codes(client), decision_ids, CHUNK)
    return {d: r for d, r in found.items() if r[1].get("customer") == customer_id}


def _reservations(client: Any, decision_ids: dict[str, str]) -> dict[str, list[tuple[str, str, float]]]:
    """Budget reservations of the decisions (decision id -> customer), by customer; one ZSCAN per shard
    for the whole batch (the set holds only the last ``reservation_minutes`` of reservations)."""
    out: dict[str, list[tuple[str, str, float]]] = {}
    for key in shard_keys(RESERVATIONS_KEY, client):
        for member, expiry in client.zscan_iter(key, count=CHUNK):
            owner = decision_ids.get(_s(member).split("|", 1)[0])
            if owner is not None:
                out.setdefault(owner, []).append((key, _s(member), float(expiry)))
    return out


def _drop_reservations(client: Any, reservations: list[tuple[str, str, float]]) -> tuple[int, int]:
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


# --- erasure ------------------------------------------------------------------------------------

@dataclass
class Erased:
    """What the erasure of one customer removed, and every failure met (empty: all done)."""

    customer_id: str
    keys_deleted: int = 0
    stream_entries_deleted: int = 0
    members_removed: int = 0
    budget_units_returned: int = 0
    archive_rows_deleted: int = 0  # rows of the archive's Parquet files
    places: dict[str, int] = field(default_factory=dict)  # counts by kind of place (log, tests)
    failures: list[str] = field(default_factory=list)


def forget_customers(client: Any, customer_ids: Iterable[str], who: str | dict[str, str] = "cli",
                     heartbeat: Callable[[], None] | None = None, archive: Root | None = None) -> dict[str, Erased]:
    """Erase every customer of ``customer_ids`` from Redis memory and from the archive at ``archive``
    (see the module's docstring): one pass per stream and one over the archive for all of them. Each
    customer's erasure is audited under its pseudonym (``who``: the requester, or each customer's
    requester). Failures are collected, never raised (but ``check_customer_id``'s). The persistence files are the caller's
    next step (``store.erasure.rewrite_persistence``): they still hold the data until rewritten."""
    ids = sorted({check_customer_id(c) for c in customer_ids})
    out = {c: Erased(c) for c in ids}
    beat = heartbeat or (lambda: None)

    def shared_lookup(find: Callable[[Any, set[str]], dict], what: str) -> dict:
        """One lookup for the whole batch; a Redis failure is every customer's failure."""
        try:
            return find(client, set(ids))
        except redis.exceptions.RedisError as exc:
            for e in out.values():
                e.failures.append(f"{what}: {exc}")
            return {}

    outbound = shared_lookup(_outbound_keys, "outbound keys not found")
    timers = shared_lookup(_timers, "timers not read")
    found: dict[str, _Found] = {}
    for c in ids:
        try:
            found[c] = _locate(client, c, outbound.get(c, []), with_timers=False)
        except redis.exceptions.RedisError as exc:
            out[c].failures.append(f"locating the customer's keys: {exc}")
            found[c] = _Found()
        found[c].timers = timers.get(c, [])
        # timers first: a timer firing would write the customer's keys again
        removed = 0
        for key, member, _ in found[c].timers:
            try:
                removed += int(client.zrem(key, member))
            except redis.exceptions.RedisError as exc:
                out[c].failures.append(f"timer in {key}: {exc}")
        out[c].places["timers"] = removed
        out[c].members_removed += removed
    beat()
    by_stream: dict[str, list[str]] = {}
    for c in ids:
        for key in customer_streams(client, c):
            by_stream.setdefault(key, []).append(c)
    for key, customers in sorted(by_stream.items()):
        try:
            done = rewrite_stream(client, key, customers, on_chunk=beat)
        except ErasureFailed as exc:
            for c in customers:
                out[c].failures.append(str(exc))
            continue
        for c in customers:
            n = done.by_customer.get(c, 0)
            out[c].places[key] = n
            out[c].stream_entries_deleted += n
        for d in done.decision_ids:  # records the streams name (older than the index, too)
            for c in customers:
                found[c].decision_ids.add(d)
        beat()
    # after the streams: a writer reading them now gets no entry of the customers (archive_erasure.py)
    archived = erase_customers(client, archive, ids, heartbeat=beat)
    for c in ids:
        out[c].archive_rows_deleted = archived.rows.get(c, 0)
        out[c].places["archive"] = archived.rows.get(c, 0)
        out[c].failures += archived.failures
    owners = {d: c for c in ids for d in found[c].decision_ids}
    try:
        reservations = _reservations(client, owners)
    except redis.exceptions.RedisError as exc:
        reservations = {}
        for e in out.values():
            e.failures.append(f"budget reservations not read: {exc}")
    for c in ids:
        e = out[c]
        try:
            gone, returned = _drop_reservations(client, reservations.get(c, []))
            e.places["reservations"] = gone
            e.members_removed += gone
            e.budget_units_returned = returned
            keys = found[c].keys
            deleted = 0
            for i in range(0, len(keys), CHUNK):
                deleted += int(client.unlink(*keys[i:i + CHUNK]))  # one slot: the customer's
            e.places["customer_keys"] = deleted
            e.keys_deleted += deleted
            owned = _records(client, c, found[c].decision_ids)
            deleted = records.delete(client, {d: where for d, (where, _) in owned.items()})
            e.places["decision_records"] = deleted
            e.keys_deleted += deleted
        except redis.exceptions.RedisError as exc:
            e.failures.append(f"keys not deleted: {exc}")
        asked = who if isinstance(who, str) else who.get(c, "?")
        audit(client, asked, "forget_customer", customer=pseudonym(c), keys_deleted=e.keys_deleted,
              stream_entries_deleted=e.stream_entries_deleted, members_removed=e.members_removed,
              budget_units_returned=e.budget_units_returned, archive_rows_deleted=e.archive_rows_deleted,
              failures=len(e.failures))
        log.info("customer %s forgotten by %s: %d keys, %d stream entries, %d archived rows, %d members%s",
                 pseudonym(c), asked, e.keys_deleted, e.stream_entries_deleted, e.archive_rows_deleted, e.members_removed,
                 f", {len(e.failures)} failures" if e.failures else "")
    return out


# --- export -------------------------------------------------------------------------------------

def _entries(client: Any, key: str, customer_id: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The customer's entries of stream ``key``, filtered inside Redis ``CHUNK`` entries at a time."""
    start = "-"
    while True:
        last, n, found = cast("list[Any]", client.eval(_FIND, 1, key, start, CHUNK, customer_id))
        for entry_id, flat in found:
            yield _s(entry_id), {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
        if int(n) < CHUNK or not _s(last):
            return
        start = "(" + _s(last)


def _ms_iso(ms: float | None) -> str:
    return _iso(ms / 1000) if ms is not None else ""


def _attributes(client: Any, customer_id: str, now_ms: int, schema: FeatureSchema | None) -> dict[str, Any]:
    raw = cast("dict[bytes, bytes]", client.hgetall(profile_key(customer_id)))
    if not raw:
        return {"attributes": {}, "consents": [], "open_cases": []}
    if schema is not None:
        try:
            p = ProfileStore(client).decode(customer_id, raw, {}, now_ms, schema)
        except SchemaMismatch:
            pass
        else:
            attributes: dict[str, Any] = {name: _attribute(v, name in schema.dates)
                                          for name, v in zip(schema.numeric, p.numeric.tolist())}
            attributes.update({name: p.categorical.get(name, "") for name in schema.categorical})
            attributes.update({name: sorted(m) for name, m in p.sets.items() if name != "consent"})
            return {"attributes": attributes, "consents": sorted(p.sets.get("consent", ())),
                    "open_cases": list(p.open_cases)}
    # stored under another schema: the stored fields that are plain text
    plain = {_s(k): _s(v) for k, v in raw.items() if not k.startswith(b"_") and k not in (b"schema", b"features")}
    consent = plain.pop("consent", "")
    return {"attributes": plain, "consents": [c for c in consent.split(",") if c], "open_cases": []}


_KINDS = {"i": "shown", "a": "accepted", "r": "rejected"}


def _contact_history(client: Any, customer_id: str) -> list[dict[str, Any]]:
    key = history.contacts_key(customer_id)
    if _s(client.type(key)) != "hash":
        return []
    out = []
    for f, v in cast("dict[bytes, bytes]", client.hgetall(key)).items():
        c = history.parse(_s(f), _s(v))
        if c is not None:
            out.append({"date": datetime.fromtimestamp(c.day * 86_400, UTC).date().isoformat(),
                        "kind": _KINDS.get(c.kind, c.kind), "action": c.action, "channel": c.channel,
                        "count": c.count, "first_at": _ms_iso(c.first), "last_at": _ms_iso(c.last)})
    return sorted(out, key=lambda x: (x["first_at"], x["action"], x["kind"]))


def _decisions(client: Any, customer_id: str, streams: dict[str, list[tuple[str, dict[str, str]]]],
               decision_ids: set[str]) -> list[dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    for _, f in streams.get(DECISIONS_STREAM, []):
        d = f.get("decision_id", "")
        by_id[d] = {"decision_id": d, "decided_at": _iso(_float(f.get("ts"))), "channel": f.get("channel", ""),
                    "touchpoint": f.get("touchpoint", ""), "interaction_id": f.get("interaction_id", ""),
                    "actions": [a for a in f.get("actions", "").split(",") if a],
                    "control_group": f.get("control") == "1", "ruleset_version": f.get("ruleset_version", ""),
                    "model_version": f.get("model_version", ""), "responses": []}
    for d, (_, r) in sorted(_records(client, customer_id, decision_ids - set(by_id)).items()):
        by_id[d] = {"decision_id": d, "decided_at": _iso(_float(r.get("ts"))), "channel": r.get("channel", ""),
                    "touchpoint": "", "interaction_id": "", "actions": [a for a in r.get("actions", "").split(",") if a],
                    "control_group": r.get("control") == "1", "ruleset_version": r.get("ruleset", ""),
                    "model_version": r.get("model", ""), "responses": []}
    for _, f in streams.get(RESPONSES_STREAM, []):
        d = f.get("decision_id", "")
        target = by_id.setdefault(d, {"decision_id": d, "decided_at": _iso(_float(f.get("decided_at"))),
                                      "channel": f.get("channel", ""), "touchpoint": "", "interaction_id": "",
                                      "actions": [], "control_group": f.get("control") == "1",
                                      "ruleset_version": "", "model_version": "", "responses": []})
        target["responses"].append({"action": f.get("action_id", ""), "outcome": f.get("outcome", ""),
                                    "at": _iso(_float(f.get("ts")))})
    return sorted(by_id.values(), key=lambda d: (d["decided_at"], d["decision_id"]))


def _event(f: dict[str, str], refused: str = "") -> dict[str, Any]:
    return {"event_id": f.get("event_id", ""), "type": f.get("type", ""), "at": _iso(_float(f.get("ts"))),
            "source": f.get("source", ""), "attributes": {k[5:]: v for k, v in f.items() if k.startswith("attr.")},
            "refused": refused}


def _event_history(client: Any, customer_id: str, logged: Iterable[str]) -> list[dict[str, Any]]:
    """The customer's event history (``nba:{c:<id>}:events``) in plain fields, either layout."""
    key = events_key(customer_id)
    if _s(client.type(key)) != "zset":
        return []
    ids = {id_tag(i): i for i in logged}
    out = []
    for member, score in cast("list[tuple[bytes, float]]", client.zrange(key, 0, -1, withscores=True)):
        try:
            e = Event.decode(member, score)
        except (ValueError, KeyError, TypeError):
            continue
        compact = not _s(member).startswith("{")
        out.append({"event_id": ids.get(e.id, "") if compact else e.id, "id_tag": e.id if compact else "",
                    "type": e.type, "at": _ms_iso(e.ts_ms), "attributes": e.attrs})
    return out


def export_customer(client: Any, customer_id: str, who: str | None = "cli", now: float | None = None,
                    schema: FeatureSchema | None = None, archive: Root | None = None) -> dict[str, Any]:
    """Everything stored about ``customer_id`` in plain fields (see the module's docstring), in Redis and
    in the archive at ``archive``. The export is audited under the customer's pseudonym (``who``; None:
    not audited)."""
    check_customer_id(customer_id)
    now = time.time() if now is None else now
    found = _locate(client, customer_id, [])
    streams: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for base in CUSTOMER_STREAMS:
        live = list(_entries(client, customer_shard_key(base, customer_id, client), customer_id))
        seen = {entry_id for entry_id, _ in live}
        streams[base] = [e for e in customer_entries(client, archive, base, customer_id) if e[0] not in seen] + live
    for key in SHARED_STREAMS:
        streams[key] = list(_entries(client, key, customer_id))
    ids = found.decision_ids | {f["decision_id"] for s in streams.values() for _, f in s if f.get("decision_id")}
    triggers = cast("dict[bytes, bytes]", client.hgetall(triggers_key(customer_id)))
    interactions = []
    for key in found.keys:
        if ":ix:" not in key:
            continue
        for placement, body in cast("dict[bytes, bytes]", client.hgetall(key)).items():
            try:
                stored = json.loads(body)
                actions = [a.get("id", "") if isinstance(a, dict) else str(a) for a in stored.get("a", [])]
                decision = str(stored.get("h", {}).get("id", ""))
            except (ValueError, AttributeError):
                actions, decision = [], ""
            # d:<touchpoint>|<max actions>[#<context digest>]
            touchpoint, _, shown = without_context(_s(placement))[2:].rpartition("|")
            interactions.append({"interaction_id": key.split(":ix:", 1)[1], "touchpoint": touchpoint,
                                 "max_actions": int(shown) if shown.isdigit() else 0, "decision_id": decision,
                                 "actions": actions})
    requests = [{"action": _s(f.get(b"action", b"")), "at": _iso(_float(_s(f.get(b"ts", b"")))),
                 "who": _s(f.get(b"who", b""))}
                for _, f in _audit_of(client, pseudonym(customer_id))]
    out: dict[str, Any] = {
        "customer_id": customer_id,
        "exported_at": _iso(now),
        **_attributes(client, customer_id, int(now * 1000), schema),
        "triggers": sorted(({"name": _s(k), "expires_at": _ms_iso(float(v))} for k, v in triggers.items()),
                           key=lambda t: t["name"]),
        "contact_history": _contact_history(client, customer_id),
        "decisions": _decisions(client, customer_id, streams, ids),
        "events": [_event(f) for _, f in streams[EVENTS_STREAM]]
                  + [_event(f, f.get("error", "refused")) for _, f in streams[INVALID_STREAM]],
        "event_history": _event_history(client, customer_id, (f.get("event_id", "") for _, f in streams[EVENTS_STREAM])),
        "outbound": [{"action": f.get("action_id", ""), "channel": f.get("channel", ""),
                      "decision_id": f.get("decision_id", ""), "event_id": f.get("event_id", ""),
                      "at": _iso(_float(f.get("ts"))), "content": _json(f.get("treatment", ""))}
                     for _, f in streams[OUTBOUND_STREAM]],
        "scheduled": [{"kind": "postponed message" if _json(m).get("k") == "outbound" else "absence timer",
                       "due_at": _ms_iso(due)} for _, m, due in found.timers],
        "budget_reservations": [{"decision_id": m.split("|")[0], "action": m.split("|")[1] if "|" in m else "",
                                 "expires_at": _ms_iso(e)}
                                for members in _reservations(client, dict.fromkeys(ids, customer_id)).values()
                                for _, m, e in members],
        "interactions": interactions,
        "privacy_requests": requests,
    }
    if who is not None:
        audit(client, who, "export_customer", customer=pseudonym(customer_id),
              decisions=len(out["decisions"]), events=len(out["events"]))
    return out


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _audit_of(client: Any, pseudo: str) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    start = "-"
    while True:
        chunk = cast("list[tuple[bytes, dict[bytes, bytes]]]",
                     client.xrange(AUDIT_STREAM, min=start, max="+", count=CHUNK))
        for entry_id, f in chunk:
            if f.get(b"customer") == pseudo.encode():
                yield _s(entry_id), f
        if len(chunk) < CHUNK:
            return
        start = "(" + _s(chunk[-1][0])


__all__ = ["CUSTOMER_STREAMS", "SHARED_STREAMS", "Erased", "check_customer_id", "customer_streams",
           "export_customer", "fixed_keys", "forget_customers"]
