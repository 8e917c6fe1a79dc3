"""One Redis node or a local Redis Cluster for the capacity benchmarks, and what each node did.

``backend("node", dir)``: an embedded redis-server with append-only persistence (``appendfsync
everysec``), no replica. ``backend("cluster", dir)``: ``LocalCluster`` (3 masters + 3 replicas, each
node append-only like the single node). Both yield a ``Backend``: its URL (the service user's, least
privilege: ``engine.store.redis_acl``) and a plain client per node (role ``master`` or ``replica``) as
the admin user, as the measurements need (INFO, MEMORY USAGE, OBJECT are beyond the service user's
ACL). ``snapshot`` reads, per node, INFO commandstats, cpu, stats, persistence and replication;
``delta`` subtracts two snapshots: commands (calls, usec), Redis CPU (``used_cpu_sys + used_cpu_user``),
network bytes in and out, AOF bytes, replication-stream bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

# commands of the measurement itself, the cluster bus's helpers and replication: not the service's
NOT_SERVICE = {"info", "cluster", "replconf", "ping", "memory", "scan", "config", "object", "command",
               "dbsize", "xlen", "hlen", "type", "psync", "sync", "select", "auth", "client", "readonly", "hello"}


@dataclass
class Node:
    port: int
    role: str  # master | replica
    client: redis.Redis


@dataclass
class Backend:
    name: str  # node | cluster
    url: str
    nodes: list[Node] = field(default_factory=list)

    @property
    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "master"]


@contextmanager
def backend(name: str, data_dir: str | Path, masters: int = 3) -> Iterator[Backend]:
    data_dir = Path(data_dir) / name
    if name == "node":
        from engine.store.redis_embedded import EmbeddedRedis

        with EmbeddedRedis(data_dir, persist=True) as server:
            client = redis.Redis.from_url(server.admin_url, socket_timeout=10)
            yield Backend(name, server.url, [Node(server.port, "master", client)])
            client.close()
        return
    if name != "cluster":
        raise ValueError(name)
    from engine.store.redis_acl import ADMIN_USER
    from engine.store.redis_cluster import LocalCluster

    with LocalCluster(data_dir, masters=masters, replicas=1) as cluster:
        master_ports = set(cluster.master_ports())
        nodes = [Node(p, "master" if p in master_ports else "replica",
                      redis.Redis(host="127.0.0.1", port=p, username=ADMIN_USER, password=cluster.password,
                                  socket_timeout=10))
                 for p in cluster.ports]
        yield Backend(name, cluster.url, sorted(nodes, key=lambda n: (n.role != "master", n.port)))
        for n in nodes:
            n.client.close()


def snapshot(b: Backend) -> dict[int, dict]:
    out = {}
    for n in b.nodes:
        c = n.client
        cmd = c.info("commandstats")
        cpu = c.info("cpu")
        stats = c.info("stats")
        pers = c.info("persistence")
        repl = c.info("replication")
        out[n.port] = {
            "t": time.monotonic(),
            "commands": {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in cmd.items()},
            "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            "net_in": int(stats["total_net_input_bytes"]), "net_out": int(stats["total_net_output_bytes"]),
            "aof": int(pers.get("aof_current_size", 0) or 0),
            "repl_offset": int(repl.get("master_repl_offset", 0) or 0),
        }
    return out


def delta(b: Backend, before: dict[int, dict], after: dict[int, dict]) -> dict[int, dict]:
    """Per node port: seconds, cpu_us, net_in, net_out, aof, repl bytes, commands {name: (calls, usec)}."""
    out = {}
    for n in b.nodes:
        x, y = before[n.port], after[n.port]
        commands = {}
        for name, (calls, usec) in y["commands"].items():
            c0, u0 = x["commands"].get(name, (0, 0))
            if calls - c0 and name not in NOT_SERVICE:
                commands[name] = (calls - c0, usec - u0)
        out[n.port] = {"role": n.role, "seconds": y["t"] - x["t"], "cpu_us": (y["cpu_s"] - x["cpu_s"]) * 1e6,
                       "net_in": y["net_in"] - x["net_in"], "net_out": y["net_out"] - x["net_out"],
                       "aof": y["aof"] - x["aof"], "repl": y["repl_offset"] - x["repl_offset"],
                       "commands": commands}
    return out


def background(b: Backend, seconds: float = 3.0) -> dict[int, float]:
    """Redis CPU microseconds per second of each node while the service sits idle (cron, cluster bus,
    replication pings, the service's pollers): subtracted from a phase's CPU by its duration."""
    before = snapshot(b)
    time.sleep(seconds)
    d = delta(b, before, snapshot(b))
    return {p: v["cpu_us"] / v["seconds"] for p, v in d.items()}


def per_op(b: Backend, d: dict[int, dict], ops: int, idle: dict[int, float] | None = None) -> dict:
    """A phase's delta per operation, summed over the nodes and by role; commands per op by name."""
    idle = idle or {}
    out: dict = {"ops": ops, "nodes": {}}
    totals = {"master": {}, "replica": {}}
    commands: dict[str, list[int]] = {}
    for port, v in d.items():
        cpu = max(0.0, v["cpu_us"] - idle.get(port, 0.0) * v["seconds"])
        node = {"role": v["role"], "cpu_us": cpu / ops, "net_in_B": v["net_in"] / ops, "aof_B": v["aof"] / ops,
                "repl_B": v["repl"] / ops, "commands": sum(c for c, _ in v["commands"].values()) / ops,
                "cmd_usec": sum(u for _, u in v["commands"].values()) / ops}
        out["nodes"][port] = node
        t = totals[v["role"]]
        for k in ("cpu_us", "net_in_B", "aof_B", "repl_B", "commands", "cmd_usec"):
            t[k] = t.get(k, 0.0) + node[k]
        if v["role"] == "master":
            for name, (calls, usec) in v["commands"].items():
                acc = commands.setdefault(name, [0, 0])
                acc[0] += calls
                acc[1] += usec
    out["masters"] = totals["master"]
    out["replicas"] = totals["replica"]
    out["commands"] = {name: {"per_op": calls / ops, "usec_per_call": usec / calls}
                       for name, (calls, usec) in sorted(commands.items(), key=lambda kv: -kv[1][1])}
    masters = [out["nodes"][n.port]["cpu_us"] for n in b.masters]
    out["busiest_master_cpu_us"] = max(masters)
    out["master_cpu_share"] = [m / sum(masters) if sum(masters) else 0.0 for m in masters]
    return out
