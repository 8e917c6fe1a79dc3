"""The Redis users the service is run with: what each may do, and why.

The service (``nba serve``, its workers and stream consumers, and the ``nba`` commands) connects as
``SERVICE_USER``, whose ACL is an explicit allow list: no command of the ``@dangerous`` category (Redis
6.x counts ``CLUSTER`` and ``CLIENT`` as ``@dangerous`` as a whole; the subcommands granted,
``cluster|slots``, ``cluster|shards`` and ``client|setinfo``, are not on 7.x, which categorises per
subcommand), no Pub/Sub channel, no key outside ``nba:``. Each command is listed with the reason the
service sends it; a command the service starts to send must be added here with its reason (the test
suite runs as this user and ``tests/test_redis_auth.py`` checks the ACL log, so a missing one fails
there first). Key patterns do not filter SCAN's replies: the service may learn other keys' names, not
read them.

Persistence and configuration (``BGREWRITEAOF``, ``BGSAVE``, ``CONFIG``), flushing and failover drills
need ``ADMIN_USER``, which the service's decision path never uses. Replicas authenticate to their
master as ``REPLICA_USER`` (``masteruser``), which may only replicate.
"""

from __future__ import annotations

import functools
import hashlib
import re
import subprocess

SERVICE_USER = "nba"
ADMIN_USER = "nba-admin"
REPLICA_USER = "nba-replica"

Version = tuple[int, int]

# (rule, why). Read in order: ``resetkeys``/``resetchannels``/``-@all`` first, then one grant per line.
SERVICE_RULES: tuple[tuple[str, str], ...] = (
    ("resetkeys", "no key pattern but the one below"),
    ("~nba:*", "every key the service reads or writes starts with nba: (engine/store/profiles.py)"),
    ("resetchannels", "the service uses no Pub/Sub channel"),
    ("-@all", "nothing but the commands below"),
    # connecting
    ("+hello", "redis-py's handshake (RESP3, credentials) on every new connection"),
    ("+auth", "the handshake with protocol 2 (redis-cli, older clients)"),
    ("+ping", "health checks (grpc.health.v1, the Redis monitor, connection health checks)"),
    ("+select", "a database other than 0 in REDIS_URL (redis://host:port/N)"),
    ("+command", "the cluster client reads the command table to find each command's keys"),
    ("+cluster|slots", "the cluster client's slot map (read-only; @dangerous on 6.2 only as part of CLUSTER)"),
    ("+cluster|shards", "the same map on Redis 7+ (newer redis-py asks for it first)"),
    ("+wait", "a write acknowledged only once a replica has it (cluster: replicated writes)"),
    # scripts: the presenting decision, contact history, budgets, reservations, events, timers, profiles
    ("+eval", "scripts run once (set_trigger) and scripts loaded on first use"),
    ("+evalsha", "every script of the decision and event paths, by hash"),
    ("+script|load", "loading a script into a new or restarted node (NOSCRIPT)"),
    ("+script|exists", "a pipeline of registered scripts checks they are loaded (redis-py; history import)"),
    ("+time", "scripts read the server clock for expiries"),
    # keys
    ("+exists", "scripts: is a decision, reservation or dedupe key there"),
    ("+type", "export and erasure read a customer key by its type"),
    ("+del", "scripts replace profiles and settle reservations; erasure deletes a customer's keys"),
    ("+unlink", "erasure and bulk import remove keys without blocking Redis"),
    ("+expire", "TTLs on decision records, interactions and event history"),
    ("+pexpire", "TTLs in milliseconds (history, triggers, reservations)"),
    ("+pexpireat", "triggers expire with their latest trigger"),
    ("+pttl", "scripts keep the longer of two TTLs"),
    ("+scan", "nba customer list, what-if samples and the demo seeding count profiles"),
    # strings
    ("+get", "budgets, campaign spend, dedupe markers"),
    ("+mget", "campaign spend of several days at once"),
    ("+set", "dedupe markers and campaign plans; the archive's locks on object storage (SET NX PX, "
             "engine/store/archive_lock.py)"),
    ("+incr", "budget and campaign counters (in scripts); the archive's erasure generation"),
    ("+decr", "a reservation given back"),
    ("+append", "scripts: a minute appended to the minutes of a customer's decision records"),
    ("+getrange", "scripts: the last and the oldest of those minutes"),
    # hashes
    ("+hget", "one field of a decision record, layout or meta"),
    ("+hmget", "several fields of a decision record (scripts)"),
    ("+hgetall", "a profile, its triggers, an interaction, a decision record"),
    ("+hset", "profiles, decision records, interactions, contact history"),
    ("+hsetnx", "layouts and feature layouts are written once"),
    ("+hdel", "consent withdrawal, triggers cleared"),
    ("+hexists", "scripts: a response counted once"),
    ("+hvals", "scripts: the latest trigger expiry"),
    ("+hincrby", "exploration counts"),
    # sorted sets: absence timers, reservations, event history
    ("+zadd", "timers, reservations, event history"),
    ("+zrem", "a timer fired or a reservation settled"),
    ("+zcard", "scripts: event history length"),
    ("+zrange", "timers and reservations due"),
    ("+zrangebyscore", "timers and reservations due, event history windows"),
    ("+zremrangebyrank", "event history kept to its length"),
    ("+zremrangebyscore", "event history kept to its window"),
    ("+zscore", "scripts: is a timer set"),
    ("+zscan", "erasure: a customer's members of the shared timer and reservation sets"),
    # streams: decisions, responses, events, outbound, audit
    ("+xadd", "append to the decision, response, event, outbound and audit streams"),
    ("+xrange", "reports, training, export"),
    ("+xrevrange", "the newest entries (reports, import resume)"),
    ("+xlen", "status and reports"),
    ("+xdel", "erasure of a customer's stream entries"),
    ("+xreadgroup", "the ingest stream consumer"),
    ("+xack", "the ingest stream consumer"),
    ("+xautoclaim", "the ingest stream consumer takes over a dead consumer's entries"),
    ("+xgroup|create", "the ingest stream consumer's group, made on first start"),
    # erasure rewrites a stream without the erased customers' entries (engine/store/erasure.py)
    ("+xinfo", "erasure: the stream's top id, consumer groups and consumers, to recreate them; the archive "
              "writer's lag, and the groups' positions it trims no further than"),
    ("+xpending", "erasure: the pending entries of each group, to restore them"),
    ("+xclaim", "erasure: a pending entry restored with its idle time and delivery count"),
    ("+xgroup|createconsumer", "erasure: a group's consumers recreated"),
    ("+xgroup|destroy", "erasure: the helper group that makes an empty stream"),
    ("+xsetid", "erasure: the rewritten stream keeps its top id"),
    ("+xtrim", "erasure: what the source stream trimmed during the rewrite; the archive writer trims each shard "
              "to what it archived (XTRIM MINID, engine/store/archive.py)"),
    ("+rename", "erasure: the rewritten stream swapped in"),
    # read-only, for export of any key type
    ("+smembers", "export reads a set-typed customer key"),
    ("+lrange", "export reads a list-typed customer key"),
)


def _version_rules(version: Version) -> list[str]:
    """Grants that only exist (or only parse) on some server versions."""
    # redis-py names itself with CLIENT SETINFO on every connection and ignores a refusal; granted so
    # that a refusal does not fill the ACL log. On 6.x CLIENT is one command (the unknown subcommand is
    # then refused by the server itself); 7.0 and 7.1 reject the rule, having no such subcommand.
    rules = ["+client|setinfo"] if version < (7, 0) or version >= (7, 2) else []
    # and asks for maintenance notifications (CLIENT MAINT_NOTIFICATIONS, for managed Redis offerings),
    # ignoring a refusal too; 7.x refuses the unknown subcommand before the ACL is consulted
    if version < (7, 0):
        rules.append("+client|maint_notifications")
    return rules


def service_acl(version: Version = (6, 2)) -> str:
    """The service user's rules (without ``on`` and the password) for a server of ``version``."""
    return " ".join([rule for rule, _ in SERVICE_RULES] + _version_rules(version))


ADMIN_ACL = "resetkeys ~* resetchannels &* +@all"
REPLICA_ACL = "resetkeys resetchannels -@all +psync +replconf +ping"


def password_hash(password: str) -> str:
    """The ACL form of ``password`` (``#<sha256>``): the plain text never reaches the server's config."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def user_directives(service_password: str, admin_password: str, version: Version,
                    replica_password: str | None = None) -> str:
    """``redis.conf`` lines: the default user off, the service and admin users (and the replication user)."""
    lines = ["user default off resetpass resetkeys resetchannels -@all",
             f"user {SERVICE_USER} reset on {password_hash(service_password)} {service_acl(version)}",
             f"user {ADMIN_USER} reset on {password_hash(admin_password)} {ADMIN_ACL}"]
    if replica_password is not None:
        lines.append(f"user {REPLICA_USER} reset on {password_hash(replica_password)} {REPLICA_ACL}")
    return "".join(line + "\n" for line in lines)


def hardening_directives(version: Version) -> str:
    """``redis.conf`` lines that take DEBUG and MODULE away from every user, whatever its ACL: renamed to
    nothing (6.x has no other way; on 7.x ``enable-module-command no`` still leaves MODULE LIST), and on
    7.x the options too, with CONFIG SET of paths refused (the usual way to write files through Redis)."""
    lines = 'rename-command DEBUG ""\nrename-command MODULE ""\n'
    if version >= (7, 0):
        lines += "enable-debug-command no\nenable-module-command no\nenable-protected-configs no\n"
    return lines


@functools.cache
def server_version(binary: str) -> Version:
    """(major, minor) of a redis-server binary, from ``--version``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"{binary} --version: no version in {out.strip()!r}")
    return int(found.group(1)), int(found.group(2))
