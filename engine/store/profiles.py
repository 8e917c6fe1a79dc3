"""Customer profiles, triggers and streams in Redis.

Key layout (schema version 1). Every key of one customer carries the hash tag ``{c:<id>}`` so that a
Redis Cluster keeps a customer on one node and one pipeline serves a decision:

- ``nba:{c:<id>}:profile``  hash
    - ``schema``: feature schema version the vector was written with
    - ``num``: the numeric features (``features.NUMERIC`` order) packed as little-endian float32
    - one field per categorical feature (``plan``, ``segment``, ``lifecycle_stage``, ``value_tier``...)
    - one field per set feature (``products``, ``consent``), members joined by ","
    - ``cases``: open service case ids joined by ","
- ``nba:{c:<id>}:triggers`` hash: trigger name -> expiry (epoch milliseconds)
- ``nba:{c:<id>}:contacts`` hash: contact history, counters per kind, action, channel and UTC day, see
  ``engine/decision/history.py``
- ``nba:decision:<decision id>`` hash: what a decision presented, for ``RecordResponse`` (30 days)
- ``nba:budget:<action>:<yyyymmdd>``: units of an action's daily budget used
- ``nba:stream:decisions`` / ``nba:stream:responses`` / ``nba:stream:events``: Redis Streams
- event history, dedupe, absence timers and the outbound stream: see ``engine/events/processor.py``
- ``nba:meta``: hash with ``schema`` and ``seeded_customers`` for the demo world
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import redis
from redis.connection import SENTINEL

from engine.config import Config
from engine.errors import NbaError
from engine.features import CATEGORICAL, INBOUND_CHANNELS, NUMERIC, SCHEMA_VERSION, SETS

META_KEY = "nba:meta"
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


def profile_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:profile"


def triggers_key(customer_id: str) -> str:
    return f"nba:{{c:{customer_id}}}:triggers"


@dataclass
class Profile:
    """What a decision knows about a customer. ``found`` is False for a cold start."""

    customer_id: str
    numeric: np.ndarray  # float32, NUMERIC order
    categorical: dict[str, str] = field(default_factory=dict)
    sets: dict[str, frozenset[str]] = field(default_factory=dict)
    open_cases: tuple[str, ...] = ()
    triggers: frozenset[str] = frozenset()
    found: bool = True

    @classmethod
    def cold(cls, customer_id: str) -> Profile:
        """An unknown customer: a prospect who may be shown offers on the inbound channel they are
        using (web, app, call center, branch, point of sale) but is never contacted by email or SMS."""
        categorical = {name: "" for name in CATEGORICAL}
        categorical.update(plan="none", lifecycle_stage="prospect", value_tier="C", device_os="none")
        return cls(
            customer_id=customer_id,
            numeric=np.zeros(len(NUMERIC), dtype=np.float32),
            categorical=categorical,
            sets={"products": frozenset(), "consent": frozenset(INBOUND_CHANNELS)},
            found=False,
        )

    def value(self, name: str) -> float:
        return float(self.numeric[NUMERIC.index(name)])


def encode_profile(profile: Profile) -> dict[str, bytes | str | int]:
    """The hash fields stored for a profile."""
    if profile.numeric.shape != (len(NUMERIC),):
        raise ValueError(f"numeric vector has shape {profile.numeric.shape}, want ({len(NUMERIC)},)")
    fields: dict[str, bytes | str | int] = {
        "schema": SCHEMA_VERSION,
        "num": np.asarray(profile.numeric, dtype=_VECTOR).tobytes(),
        "cases": ",".join(profile.open_cases),
    }
    for name in CATEGORICAL:
        fields[name] = profile.categorical.get(name, "")
    for name in SETS:
        fields[name] = ",".join(sorted(profile.sets.get(name, ())))
    return fields


class SchemaMismatch(NbaError):
    """A stored profile was written under another feature schema version."""


def decode_profile(customer_id: str, raw: dict[bytes, bytes], triggers: dict[bytes, bytes],
                   now_ms: int) -> Profile:
    if not raw:
        profile = Profile.cold(customer_id)
    else:
        version = int(raw.get(b"schema", b"0"))
        num = raw.get(b"num", b"")
        if version != SCHEMA_VERSION or len(num) != 4 * len(NUMERIC):
            raise SchemaMismatch(f"profile {customer_id} has schema {version}, want {SCHEMA_VERSION}")
        cases = raw.get(b"cases", b"").decode()
        profile = Profile(
            customer_id=customer_id,
            numeric=np.frombuffer(num, dtype=_VECTOR).copy(),
            categorical={name: raw.get(name.encode(), b"").decode() for name in CATEGORICAL},
            sets={
                name: frozenset(m for m in raw.get(name.encode(), b"").decode().split(",") if m)
                for name in SETS
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
    """ssl_* arguments for a rediss:// URL from ``config`` (REDIS_CA, REDIS_CERT, REDIS_KEY); nothing for
    redis:// (``redis_for`` refuses TLS options with a plaintext REDIS_URL)."""
    if config is None or urlsplit(url).scheme != "rediss":
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
    """A connection whose reads wait at most until the thread's ``redis_deadline``."""

    socket_timeout: float | None

    def read_response(self, *args: Any, timeout: Any = SENTINEL, **kwargs: Any) -> Any:
        at = _deadline.get()
        if at and timeout is SENTINEL:
            left = max(at - time.monotonic(), 0.0001)
            if self.socket_timeout is None or left < self.socket_timeout:
                timeout = left
        return super().read_response(*args, timeout=timeout, **kwargs)  # type: ignore[misc]


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
    if scheme in ("redis", "rediss"):
        options.setdefault("connection_class", DeadlineSSLConnection if scheme == "rediss" else DeadlineConnection)
    try:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, **tls, **options)
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        raise RedisUnavailable(f"REDIS_URL={mask_url(url)}: {exc}") from None


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


class ProfileStore:
    """Reads and writes profiles; one pipelined round trip per decision."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

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

    def fetch(self, customer_id: str, now: float | None = None) -> Profile:
        """Profile and active triggers in one round trip; a cold profile when the customer is unknown.
        Contact history is read by the presenting script, which alone judges contact limits."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(profile_key(customer_id))
        pipe.hgetall(triggers_key(customer_id))
        raw, triggers = pipe.execute()
        return decode_profile(customer_id, raw, triggers, int((time.time() if now is None else now) * 1000))

    def fetch_with(self, customer_id: str, key: str, now: float | None = None) -> tuple[Profile, dict[str, str]]:
        """``fetch`` and the hash ``key`` (e.g. the customer's interaction) in the same round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(profile_key(customer_id))
        pipe.hgetall(triggers_key(customer_id))
        pipe.hgetall(key)
        raw, triggers, extra = pipe.execute()
        return (decode_profile(customer_id, raw, triggers, int((time.time() if now is None else now) * 1000)),
                {k.decode(): v.decode() for k, v in extra.items()})

    def save(self, profiles: list[Profile]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for p in profiles:
            key = profile_key(p.customer_id)
            pipe.delete(key)
            pipe.hset(key, mapping=encode_profile(p))  # type: ignore[arg-type]  # redis-py: key type is invariant
        pipe.execute()

    def set_trigger(self, customer_id: str, name: str, ttl_seconds: float) -> None:
        expiry = int((time.time() + ttl_seconds) * 1000)
        self.client.eval(_SET_TRIGGER, 1, triggers_key(customer_id), name, expiry)

    def append(self, stream: str, fields: dict[str, str]) -> str:
        # redis-py types fields as a dict of every encodable key: invariant, so no dict[str, str]
        entry = self.client.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def ping(self) -> tuple[bool, str]:
        try:
            self.client.ping()
            info = self.client.info("server")
            return True, f"redis {info.get('redis_version', '?')} on port {info.get('tcp_port', '?')}"
        except redis.exceptions.RedisError as exc:
            return False, f"{type(exc).__name__}: {exc}"
