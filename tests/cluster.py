"""A Redis Cluster on loopback for the cluster-mode tests (contract 7.8).

``redis-server --cluster-enabled yes`` per node, on ports whose cluster bus port (+10000)
fits (<= 55535), joined by ``redis-cli --cluster create``.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devstack.redis_ha import TlsFiles, tls_server_args
from tests.helpers import wait_for


def _free(port: int) -> bool:
    for p in (port, port + 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def cluster_ports(n: int) -> list[int]:
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 45000)
        ports = list(range(base, base + n))
        if all(_free(p) for p in ports):
            return ports


@dataclass
class RedisCluster:
    """``primaries`` primaries, each with ``replicas`` replicas; with ``tls``, every
    node speaks TLS only (clients, replication and the cluster bus), client certificates
    required."""

    root: Path
    primaries: int = 3
    replicas: int = 0
    tls: TlsFiles | None = None
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        if self.tls is not None:
            return f"rediss+cluster://{nodes}?{self.tls.client_query()}"
        return "redis+cluster://" + nodes

    def node(self, port: int) -> redis.Redis:
        if self.tls is not None:
            return redis.Redis(
                host="127.0.0.1",
                port=port,
                socket_timeout=5,
                ssl=True,
                ssl_ca_certs=str(self.tls.ca_cert),
                ssl_certfile=str(self.tls.client_cert),
                ssl_keyfile=str(self.tls.client_key),
            )
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def _cli_tls(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--tls",
            "--cacert",
            str(self.tls.ca_cert),
            "--cert",
            str(self.tls.client_cert),
            "--key",
            str(self.tls.client_key),
        ]

    def start_node(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        log = (d / "redis.log").open("ab")
        self.procs[port] = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                *(
                    [*tls_server_args(self.tls, port), "--tls-cluster", "yes"]
                    if self.tls is not None
                    else ["--port", str(port)]
                ),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--dir",
                str(d),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(lambda: self._pings(port), 20, f"redis node {port}")

    def start(self) -> RedisCluster:
        self.ports = cluster_ports(self.primaries * (1 + self.replicas))
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            [
                "redis-cli",
                *self._cli_tls(),
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in self.ports],
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_for(self.healthy, 60, "the cluster to be ok")
        return self

    def healthy(self) -> bool:
        for port in self.procs:
            try:
                info = self.node(port).execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            except redis.RedisError:
                return False
            raw = info if isinstance(info, (bytes, str)) else str(info)
            text = raw.decode() if isinstance(raw, bytes) else raw
            if "cluster_state:ok" not in text:
                return False
        return True

    def primary_ports(self) -> list[int]:
        found = []
        for port in self.procs:
            with contextlib.suppress(redis.RedisError):
                if self.node(port).info("replication").get("role") == "master":
                    found.append(port)
        return found

    def _pings(self, port: int) -> bool:
        try:
            return bool(self.node(port).ping())
        except redis.RedisError:
            return False

    def pause(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def synced(self) -> bool:
        """Every primary has its replicas connected and caught up."""
        for port in self.primary_ports():
            info = self.node(port).info("replication")
            if int(info.get("connected_slaves", 0)) < self.replicas:
                return False
            offset = int(info.get("master_repl_offset", 0))
            for k in range(self.replicas):
                replica = info[f"slave{k}"]
                if replica.get("state") != "online" or int(replica["offset"]) < offset:
                    return False
        return True

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def wait_settled(seconds: float) -> None:
    time.sleep(seconds)


def node_id(port: int) -> str:
    reply = redis.Redis(host="127.0.0.1", port=port).execute_command("CLUSTER", "MYID")  # type: ignore[no-untyped-call]
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def reshard(source_port: int, target_port: int, slots: int) -> None:
    """Move ``slots`` hash slots from one primary to another (keys migrate meanwhile)."""
    subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "reshard",
            f"127.0.0.1:{source_port}",
            "--cluster-from",
            node_id(source_port),
            "--cluster-to",
            node_id(target_port),
            "--cluster-slots",
            str(slots),
            "--cluster-pipeline",
            "10",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def cluster_nodes(port: int) -> list[dict[str, str]]:
    """``CLUSTER NODES`` as seen from one node: id, port, role, master id."""
    raw = redis.Redis(host="127.0.0.1", port=port).execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@")[0]
        nodes.append(
            {
                "id": parts[0],
                "port": address.rsplit(":", 1)[1],
                "role": "replica" if "slave" in parts[2] else "primary",
                "master": parts[3],
                "flags": parts[2],
            }
        )
    return nodes


def replica_of(port: int) -> int:
    """The port of a replica of the primary on ``port``."""
    me = node_id(port)
    for node in cluster_nodes(port):
        if node["role"] == "replica" and node["master"] == me:
            return int(node["port"])
    raise AssertionError(f"no replica of {port}")
