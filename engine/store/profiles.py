"""Customer profiles, triggers and streams in Redis.

Key layout (profile packing version 1). Every key of one customer carries the hash tag ``{c:<id>}`` so that a
Redis Cluster keeps a customer on one node and one pipeline serves a decision:

- ``nba:{c:<id>}:profile``  hash
    - ``schema``: the packing version (1)
    - ``layout``: the hash of the numeric attributes' order the vector was packed in (``nba:layouts``
      holds the names of every layout written, so a profile is read by name after the domain changed)
    - ``num``: the number and date attributes of domain.yaml, packed as little-endian float32
    - one field per categorical attribute, one per set attribute (``products``, ``consent``), members
      joined by ","
    - ``cases``: open service case ids joined by ","
- ``nba:{c:<id>}:triggers`` hash: trigger name -> expiry (epoch milliseconds)
- ``nba:{c:<id>}:contacts`` hash: contact history, counters per kind, action, channel and UTC day, see
  ``engine/decision/history.py``
- ``nba:decisions:{<slot tag>}:<minute>`` hash: one field per decision, what it presented, for
  ``RecordResponse`` (``responses.accept_days``), in a compact encoding (``engine/decision/records.py``);
  ``nba:codes`` its append-only dictionary; ``nba:decision:{<slot tag>}:<id>`` the earlier layout, moved
  by the first response to it
- ``nba:budget:<action>:<yyyymmdd>``: units of an action's daily budget used
- ``nba:stream:decisions`` / ``nba:stream:responses`` / ``nba:stream:events``: Redis Streams
- event history, dedupe, absence timers and the outbound stream: see ``engine/events/processor.py``
- ``nba:layouts``: hash layout -> the numeric attribute names of that layout, joined by ","
- ``nba:feature_layouts``: hash feature-schema fingerprint -> the names and levels of the model input that
  decisions logged under it carry (training reads older records by name)
- ``nba:meta``: hash with ``schema`` and ``seeded_customers`` for the demo world, and ``decisions_since``
  (``engine/decision/responses.py``)
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import SENTINEL
from redis.exceptions import RedisClusterException

from engine import metrics
from engine.config import Config
from engine.errors import NbaError
from engine.features import CONSENT, SCHEMA_VERSION, FeatureSchema
from engine.store.breaker import PROBE_WAIT_SECONDS, Breaker, BreakerOpen, breaker_for

META_KEY = "nba:meta"
LAYOUTS_KEY = "nba:layouts"
FEATURE_LAYOUTS_KEY = "nba:feature_layouts"  # fingerprint -> the logged model input's names (JSON)
DECISIONS_STREAM = "nba:stream:decisions"
RESPONSES_STREAM = "nba:stream:responses"
EVENTS_STREAM = "nba:stream:events"
STREAM_MAXLEN = 1_000_000

# XRANGE / XREADGROUP replies as the service's clients get them (RESP2, responses not decoded); redis-py
# types them for every protocol and decoding.
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]  # (entry id, fields)
StreamReadReply = list[tuple[bytes, StreamEntries]]  # (stream name, its entries)

_VECTOR = np.dtype("<f4")

# Sets one trigger and keeps the hash alive until its latest trigger expires (Redis 6.2 has no
# PEXPIRE GT, hence the script).
_SET_TRIGGER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local latest = tonumber(ARGV[2])
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  if tonumber(v) > latest then latest = tonumber(v) end
end
redis.call('PEXPIREAT', KEYS[1], latest)
"""
# Replaces one profile hash at once: a decision or a consent withdrawal never sees it half written.
_SAVE_PROFILE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
"""
_SAVE_SHA = hashlib.sha1(_SAVE_PROFILE.encode()).hexdigest()


def profile_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:profile"


def triggers_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:triggers"


@dataclass
class Profile:
    """What a decision knows about a customer. ``found`` is False for a cold start."""

    customer_id: str
    numeric: np.ndarray  # float32, the schema's numeric order
    categorical: dict[str, str] = field(default_factory=dict)
    sets: dict[str, frozenset[str]] = field(default_factory=dict)
    open_cases: tuple[str, ...] = ()
    triggers: frozenset[str] = frozenset()
    found: bool = True

    @classmethod
    def cold(cls, customer_id: str, schema: FeatureSchema) -> Profile:
        """An unknown customer: every attribute at its declared default; offers may be shown on the
        inbound channel they are using, but nobody contacts them on an outbound one."""
        return cls(
            customer_id=customer_id,
            numeric=np.array(schema.default_vector(), dtype=np.float32),
            categorical={name: str(schema.defaults.get(name, "")) for name in schema.categorical},
            sets={**{name: frozenset() for name in schema.sets}, CONSENT: frozenset(schema.inbound_channels)},
            found=False,
        )

    def value(self, name: str, schema: FeatureSchema) -> float:
        return float(self.numeric[schema.numeric.index(name)])


def encode_profile(profile: Profile, schema: FeatureSchema) -> dict[str, bytes | str | int]:
    """The hash fields stored for a profile."""
    if profile.numeric.shape != (len(schema.numeric),):
        raise ValueError(f"numeric vector has shape {profile.numeric.shape}, want ({len(schema.numeric)},)")
    fields: dict[str, bytes | str | int] = {
        "schema": SCHEMA_VERSION,
        "layout": schema.layout(),
        "num": np.asarray(profile.numeric, dtype=_VECTOR).tobytes(),
        "cases": ",".join(profile.open_cases),
    }
    for name in schema.categorical:
        fields[name] = profile.categorical.get(name, "")
    for name in schema.sets:
        fields[name] = ",".join(sorted(profile.sets.get(name, ())))
    return fields


def customer_ids(client: redis.Redis | RedisCluster) -> Iterator[str]:
    """The id of every stored profile (a SCAN of their keys; every node of a cluster)."""
    for key in client.scan_iter(match="nba:{c:*}:profile", count=2000):
        text = key.decode() if isinstance(key, bytes) else str(key)
        yield text[len("nba:{c:"): -len("}:profile")]


class SchemaMismatch(NbaError):
    """A stored profile cannot be read under the current schema (another packing version, or a layout
    that ``nba:layouts`` does not know)."""


def _numbers(customer_id: str, raw: dict[bytes, bytes], schema: FeatureSchema,
             layouts: dict[str, tuple[str, ...]]) -> np.ndarray:
    """The stored vector in ``schema``'s order: attributes read by name from the layout the profile was
    written in; those it lacks are at their defaults."""
    version = int(raw.get(b"schema", b"0"))
    num = raw.get(b"num", b"")
    if version != SCHEMA_VERSION:
        raise SchemaMismatch(f"profile {customer_id} has packing version {version}, want {SCHEMA_VERSION}")
    layout = raw.get(b"layout", b"").decode()
    if layout == schema.layout() or (not layout and len(num) == 4 * len(schema.numeric)):
        # no layout: written before layouts were recorded, in the order domain.yaml still declares
        if len(num) != 4 * len(schema.numeric):
            raise SchemaMismatch(f"profile {customer_id}: {len(num)} bytes of numbers, want {4 * len(schema.numeric)}")
        return np.frombuffer(num, dtype=_VECTOR).copy()
    names = layouts.get(layout)
    if names is None or len(num) != 4 * len(names):
        raise SchemaMismatch(f"profile {customer_id} has layout {layout or '(none)'}, which nba:layouts does not hold")
    stored = np.frombuffer(num, dtype=_VECTOR)
    out = np.array(schema.default_vector(), dtype=np.float32)
    index = {name: i for i, name in enumerate(schema.numeric)}
    for i, name in enumerate(names):
        if name in index:
            out[index[name]] = stored[i]
    return out


def decode_profile(customer_id: str, raw: dict[bytes, bytes], triggers: dict[bytes, bytes],
                   now_ms: int, schema: FeatureSchema, layouts: dict[str, tuple[str, ...]] | None = None) -> Profile:
    """A stored profile under ``schema`` (``layouts``: the names of older layouts, ``nba:layouts``)."""
    if not raw:
        profile = Profile.cold(customer_id, schema)
    else:
        cases = raw.get(b"cases", b"").decode()
        categorical = {}
        for name in schema.categorical:
            value = raw.get(name.encode())
            categorical[name] = str(schema.defaults.get(name, "")) if value is None else value.decode()
        profile = Profile(
            customer_id=customer_id,
            numeric=_numbers(customer_id, raw, schema, layouts or {}),
            categorical=categorical,
            sets={
                name: frozenset(m for m in raw.get(name.encode(), b"").decode().split(",") if m)
                for name in schema.sets
            },
            open_cases=tuple(c for c in cases.split(",") if c),
        )
    profile.triggers = frozenset(
        name.decode() for name, expiry in triggers.items() if int(expiry) > now_ms
    )
    return profile


class RedisUnavailable(NbaError):
    """Redis cannot be used as configured: refused credentials, unreachable, TLS mismatch, missing files.
    The message is one line and names the URL with its password masked."""


def mask_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` query) shown as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"{userinfo}@{hostport}"
    query = parts.query
    if query:
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)],
                          safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _tls_options(url: str, config: Config | None) -> dict[str, Any]:
    """ssl_* arguments for a rediss:// or rediss+cluster:// URL from ``config`` (REDIS_CA, REDIS_CERT,
    REDIS_KEY); nothing for plaintext (``redis_for`` refuses TLS options with a plaintext REDIS_URL)."""
    if config is None or urlsplit(url).scheme not in TLS_SCHEMES:
        return {}
    options: dict[str, Any] = {}
    for option, env, value in (("ssl_ca_certs", "REDIS_CA", config.redis_ca),
                               ("ssl_certfile", "REDIS_CERT", config.redis_cert),
                               ("ssl_keyfile", "REDIS_KEY", config.redis_key)):
        if value:
            if not os.path.isfile(value):
                raise RedisUnavailable(f"{env}={value}: no such file (REDIS_URL={mask_url(url)})")
            options[option] = value
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise RedisUnavailable(f"REDIS_KEY without REDIS_CERT (REDIS_URL={mask_url(url)})")
    return options


_deadline: ContextVar[float] = ContextVar("nba_redis_deadline", default=0.0)


@contextmanager
def redis_deadline(at: float) -> Iterator[None]:
    """Redis replies awaited on this thread until ``at`` (``time.monotonic()``; 0: none) at the latest:
    a later one is a ``redis.exceptions.TimeoutError`` (the caller's deadline, not the fixed socket timeout)."""
    token = _deadline.set(at)
    try:
        yield
    finally:
        _deadline.reset(token)


class _DeadlineReads:
    """A connection whose reads wait at most until the thread's ``redis_deadline``, behind its server's
    circuit breaker (``engine.store.breaker``): a command, or the connection it needs first, is admitted
    once, at whichever comes first."""

    socket_timeout: float | None
    host: str
    port: int
    _breaker: Breaker | None = None
    _admitted = False
    _probing = False
    _handshake = False  # a paused Redis may still answer a new connection's HELLO: no sign of recovery

    @property
    def breaker(self) -> Breaker:
        if self._breaker is None:
            self._breaker = breaker_for(f"{self.host}:{self.port}")
        return self._breaker

    def _admit(self) -> None:
        if not self._admitted:
            self._probing = self.breaker.before_send()
            self._admitted = True

    def on_connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        self._admit()
        self._handshake = True
        try:
            super().on_connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._admitted = False
            raise
        finally:
            self._handshake = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if check_health and not self._handshake:  # not for a command's health-check PING or HELLO
            self._admit()
        try:
            super().send_packed_command(command, check_health)  # type: ignore[misc]
        except BreakerOpen:
            raise
        except redis.exceptions.ConnectionError:
            self._admitted = False
            self.breaker.failed(None)
            raise

    def read_response(self, *args: Any, timeout: Any = SENTINEL, **kwargs: Any) -> Any:
        at = _deadline.get()
        started = time.monotonic()
        if timeout is SENTINEL:
            wait = self.socket_timeout
            if at:
                wait = max(at - started, 0.0001) if wait is None else min(wait, max(at - started, 0.0001))
            if self._probing:
                wait = PROBE_WAIT_SECONDS if wait is None else min(wait, PROBE_WAIT_SECONDS)
            if wait != self.socket_timeout:
                timeout = wait
        if not self._handshake:
            self._admitted = False
        try:
            reply = super().read_response(*args, timeout=timeout, **kwargs)  # type: ignore[misc]
        except redis.exceptions.TimeoutError:
            self.breaker.failed(time.monotonic() - started)
            raise
        except redis.exceptions.ConnectionError:
            self.breaker.failed(None)
            raise
        except redis.exceptions.ResponseError:  # an error reply is a reply
            self._replied()
            raise
        self._replied()
        return reply

    def _replied(self) -> None:
        if not self._handshake:
            self._probing = False
            self.breaker.replied()


class DeadlineConnection(_DeadlineReads, redis.Connection):
    pass


class DeadlineSSLConnection(_DeadlineReads, redis.SSLConnection):
    pass


def redis_client(url: str, config: Config | None = None, *, timeout: float = 1.0, **options: Any) -> redis.Redis:
    """The one place a Redis client is built, for the service, its background threads, the stream
    consumers and every CLI command: ``url`` carries the credentials (``redis://user:password@host:port/0``
    for an ACL user, ``redis://:password@...`` for requirepass) and ``rediss://`` means TLS, verified
    against ``config.redis_ca`` (else the system's CA bundle), with ``config.redis_cert``/``redis_key``
    as the client certificate. Connects lazily: ``check_redis`` turns a refusal into one clear error."""
    tls = _tls_options(url, config)
    scheme = urlsplit(url).scheme
    if scheme in CLUSTER_SCHEMES:
        return _cluster_client(url, tls, timeout, options)
    if scheme in ("redis", "rediss"):
        options.setdefault("connection_class", DeadlineSSLConnection if scheme == "rediss" else DeadlineConnection)
    try:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, **tls, **options)
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        raise RedisUnavailable(f"REDIS_URL={mask_url(url)}: {exc}") from None


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TLS_SCHEMES = ("rediss", "rediss+cluster")


def _cluster_client(url: str, tls: dict[str, Any], timeout: float, options: dict[str, Any]) -> redis.Redis:
    """``redis+cluster://[user:password@]host:port[,host:port...]``: a Redis Cluster client that finds every
    node from these; ``rediss+cluster://`` for TLS."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for hostport in filter(None, hosts.split(",")):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise RedisUnavailable(f"REDIS_URL={mask_url(url)}: {hostport!r} is not host:port")
        nodes.append(ClusterNode(host, int(port)))
    if not nodes:
        raise RedisUnavailable(f"REDIS_URL={mask_url(url)}: no host:port")
    ssl = parts.scheme == "rediss+cluster"
    options.setdefault("connection_class", DeadlineSSLConnection if ssl else DeadlineConnection)
    first = f"{'rediss' if ssl else 'redis'}://{userinfo + '@' if userinfo else ''}{nodes[0].host}:{nodes[0].port}"
    try:  # unlike a single node's client, this one asks a node for the slot map at once; built from a URL,
        # it hands connection_class to its node pools
        client = RedisCluster(url=first, startup_nodes=nodes, socket_timeout=timeout, socket_connect_timeout=timeout,
                              **tls, **options)
    except (redis.exceptions.RedisError, RedisClusterException) as exc:
        raise RedisUnavailable(f"cannot use the Redis Cluster at REDIS_URL={mask_url(url)}: "
                               f"{' '.join(str(exc).split())}") from None
    return cast(redis.Redis, client)  # the same command API; callers that need more check ``is_cluster``


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


REPLICA_WAIT_MS = 50


def replicated(client: redis.Redis, key: str, *command: Any, operation: str) -> Any:
    """``command`` on a cluster's master of ``key``, then ``WAIT 1`` on the same connection: the reply once
    a replica has the write too (or after ``REPLICA_WAIT_MS``, counted in ``nba_redis_unreplicated_total``),
    so a failover right after does not lose it. On one node, just the command."""
    if not is_cluster(client):
        return client.execute_command(*command)
    node = cast(RedisCluster, client).get_node_from_key(key)
    with node.redis_connection.pipeline(transaction=False) as pipe:
        pipe.execute_command(*command)
        pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
        reply, acked = pipe.execute()
    if not acked:
        metrics.UNREPLICATED.labels(operation).inc()
    return reply


def _reason(exc: redis.exceptions.RedisError, url: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    tls = urlsplit(url).scheme == "rediss"
    if isinstance(exc, redis.exceptions.AuthenticationError) or text.startswith(("NOAUTH", "WRONGPASS")):
        return f"authentication failed, wrong or missing user/password ({text})"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return f"the user may not run commands the service needs ({text})"
    if "ssl" in text.lower() or "TLS" in text or "certificate" in text:
        return (f"TLS failed ({text}): check the rediss:// port (the server's tls-port), REDIS_CA, and "
                "REDIS_CERT/REDIS_KEY when the server requires client certificates")
    if isinstance(exc, redis.exceptions.TimeoutError) or "Connection reset" in text or "closed by server" in text:
        hint = ("TLS failed, no handshake: is that port plaintext (use redis://)?" if tls
                else "a TLS port reached with redis:// (use rediss://)?")
        return f"no answer ({text}): {hint}"
    return text


def check_redis(client: redis.Redis, url: str, name: str = "REDIS_URL") -> None:
    """One PING; raises ``RedisUnavailable`` naming ``name`` and the masked URL when Redis refuses us
    (wrong password, unknown ACL user), cannot be reached, or the TLS handshake fails."""
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        raise RedisUnavailable(f"cannot use Redis at {name}={mask_url(url)}: {_reason(exc, url)}") from None


def pack(*args: str | bytes | int) -> bytes:
    """One command in RESP (what redis-py sends), for commands packed once and sent as they are."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class HotPath:
    """The decision path's commands on a connection of the calling thread's own, sent pre-packed.

    Through the client, every command pays for the pool (lock, fork check, health check), argument
    checks and packing, and response callbacks: about 15-20 us of CPU per round trip, a tenth of a
    decision. Here a thread keeps one connection of the client's class and settings (credentials,
    TLS, the caller's deadline on reads) and retries as the client does (``conn.retry``, dropping the
    connection on a connection error or timeout). Replies come as the parser gives them (RESP2: a hash
    is a flat list)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.cluster = is_cluster(client)  # then commands go through the client, which routes them by slot
        self._local = threading.local()
        self._all: weakref.WeakSet[Any] = weakref.WeakSet()  # live threads' connections, to close them

    def _connection(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            pool = self.client.connection_pool
            conn = local.conn = pool.connection_class(**pool.connection_kwargs)
            local.pid = os.getpid()
            self._all.add(conn)
        return conn

    def execute(self, packed: bytes, replies: int) -> list[Any]:
        """Send ``packed`` (``replies`` commands) in one write and read their replies; the first error
        reply is raised after all replies are read (the connection stays in step)."""
        conn = self._connection()

        def attempt() -> list[Any]:
            conn.send_packed_command([packed])
            out: list[Any] = []
            error = None
            for _ in range(replies):
                try:
                    out.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    error = error or exc
                    out.append(exc)
            if error is not None:
                raise error
            return out

        return conn.retry.call_with_retry(attempt, lambda _error: conn.disconnect())

    def script(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        """``script(keys=keys, args=args)``: EVALSHA, loading the script when Redis does not know it."""
        if self.cluster:
            return script(keys=list(keys), args=list(args))
        try:
            return self.execute(pack("EVALSHA", script.sha, len(keys), *keys, *args), 1)[0]
        except redis.exceptions.NoScriptError:
            script.sha = self.client.script_load(script.script)
            return self.execute(pack("EVALSHA", script.sha, len(keys), *keys, *args), 1)[0]

    def close(self) -> None:
        for conn in list(self._all):
            conn.disconnect()


def _pairs(flat: list[bytes] | dict[bytes, bytes]) -> dict[bytes, bytes]:
    if isinstance(flat, dict):  # RESP3
        return flat
    it = iter(flat)
    return dict(zip(it, it))


class ProfileStore:
    """Reads and writes profiles; one pipelined round trip per decision."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.hot = HotPath(client)
        self.layouts: dict[str, tuple[str, ...]] = {}  # nba:layouts as last read (or written) here

    @classmethod
    def from_url(cls, url: str, config: Config | None = None) -> ProfileStore:
        """A store on ``url`` (TLS files from ``config`` for rediss://); connects on first use."""
        return cls(redis_client(url, config, health_check_interval=30))

    @classmethod
    def open(cls, url: str, config: Config | None = None, name: str = "REDIS_URL") -> ProfileStore:
        """``from_url`` and a PING: a wrong password or an unreachable Redis is a ``RedisUnavailable`` here,
        at startup, naming ``name`` (REDIS_URL, or the embedded server) with the password masked."""
        store = cls.from_url(url, config)
        try:
            check_redis(store.client, url, name)
        except RedisUnavailable:
            store.client.close()
            raise
        return store

    def _hashes(self, keys: list[str]) -> list[dict[bytes, bytes]]:
        """HGETALL of ``keys`` (one customer's, so one slot) in one round trip."""
        if self.hot.cluster:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute()
        return [_pairs(r) for r in self.hot.execute(b"".join(pack("HGETALL", k) for k in keys), len(keys))]

    def decode(self, customer_id: str, raw: dict[bytes, bytes], triggers: dict[bytes, bytes], now_ms: int,
               schema: FeatureSchema) -> Profile:
        """``decode_profile`` with the layouts of ``nba:layouts`` (read again once when a profile's is new here)."""
        try:
            return decode_profile(customer_id, raw, triggers, now_ms, schema, self.layouts)
        except SchemaMismatch:
            layout = raw.get(b"layout", b"").decode()
            if not layout or layout in self.layouts:
                raise
            self.read_layouts()
            return decode_profile(customer_id, raw, triggers, now_ms, schema, self.layouts)

    def read_layouts(self) -> dict[str, tuple[str, ...]]:
        """Every layout profiles were written in (``nba:layouts``), remembered for decoding."""
        raw = cast("dict[bytes, bytes]", self.client.hgetall(LAYOUTS_KEY))
        self.layouts.update({k.decode(): tuple(n for n in v.decode().split(",") if n) for k, v in raw.items()})
        return self.layouts

    def register_layout(self, schema: FeatureSchema) -> None:
        """Record ``schema``'s numeric order in ``nba:layouts`` before profiles are written in it."""
        layout = schema.layout()
        if layout not in self.layouts:
            self.client.hsetnx(LAYOUTS_KEY, layout, ",".join(schema.numeric))
            self.layouts[layout] = schema.numeric

    def fetch(self, customer_id: str, schema: FeatureSchema, now: float | None = None) -> Profile:
        """Profile and active triggers in one round trip; a cold profile when the customer is unknown.
        Contact history is read by the presenting script, which alone judges contact limits."""
        raw, triggers = self._hashes([profile_key(customer_id), triggers_key(customer_id)])
        return self.decode(customer_id, raw, triggers, int((time.time() if now is None else now) * 1000), schema)

    def fetch_with(self, customer_id: str, key: str, schema: FeatureSchema,
                   now: float | None = None) -> tuple[Profile, dict[str, str]]:
        """``fetch`` and the hash ``key`` (e.g. the customer's interaction) in the same round trip."""
        raw, triggers, extra = self._hashes([profile_key(customer_id), triggers_key(customer_id), key])
        return (self.decode(customer_id, raw, triggers, int((time.time() if now is None else now) * 1000), schema),
                {k.decode(): v.decode() for k, v in extra.items()})

    def save(self, profiles: list[Profile], schema: FeatureSchema) -> None:
        """Write ``profiles`` whole; each replaces its customer's hash in one step."""
        self.register_layout(schema)
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for p in profiles:
                args: list[bytes | str | int] = []
                for name, value in encode_profile(p, schema).items():
                    args += (name, value)
                pipe.evalsha(_SAVE_SHA, 1, profile_key(p.customer_id), *args)
            try:
                pipe.execute()
                return
            except redis.exceptions.NoScriptError:  # a new or restarted Redis (every node of a cluster)
                if attempt:
                    raise
                self.client.script_load(_SAVE_PROFILE)  # writing a profile twice is writing it once

    def set_trigger(self, customer_id: str, name: str, ttl_seconds: float, now: float | None = None) -> None:
        """Raise trigger ``name`` for ``ttl_seconds`` from ``now`` (default: the real clock)."""
        expiry = int(((time.time() if now is None else now) + ttl_seconds) * 1000)
        self.client.eval(_SET_TRIGGER, 1, triggers_key(customer_id), name, expiry)

    def append(self, stream: str, fields: dict[str, str]) -> str:
        # redis-py types fields as a dict of every encodable key: invariant, so no dict[str, str]
        entry = self.client.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def ping(self) -> tuple[bool, str]:
        try:
            self.client.ping()
            # HELLO without arguments: the server's version, the protocol unchanged (the service user may
            # not run INFO, engine/store/redis_acl.py)
            if is_cluster(self.client):
                hello = self.client.execute_command("HELLO", target_nodes=RedisCluster.DEFAULT_NODE)
                where = "a cluster"
            else:
                hello = self.client.execute_command("HELLO")
                where = f"port {self.client.connection_pool.connection_kwargs.get('port', '?')}"
            fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in _pairs(hello).items()}
            version = fields.get("version", b"?")
            return True, f"redis {version.decode() if isinstance(version, bytes) else version} on {where}"
        except redis.exceptions.RedisError as exc:
            return False, f"{type(exc).__name__}: {exc}"
