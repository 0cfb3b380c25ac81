"""Redis beyond one plain node, for tests: TLS certificates, Sentinels, the daemon's ACL user.

* :func:`make_tls_files` creates a throw-away CA, a server certificate for loopback and a
  client certificate it signed (with the ``openssl`` command line), and
  :func:`tls_server_args` turns them into ``redis-server`` arguments that accept TLS
  only (``--port 0``) and require a client certificate (``--tls-auth-clients yes``).
* :class:`SentinelServer` is a ``redis-server --sentinel`` on loopback watching one
  master; start two or three for a real quorum.
* :data:`DAEMON_ACL_RULES` is the least-privilege ACL of the daemon: its key prefixes
  (contract section 6b), its channels and the commands it sends, nothing else. The README
  prints :func:`acl_setuser` of it, and a test checks that the two agree;
  :data:`CLUSTER_ACL_RULES` is what cluster mode needs besides (:func:`acl_cluster_additions`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from devstack.servers import RedisServer, ServerError, _wait_port, free_port

__all__ = [
    "CLUSTER_ACL_RULES",
    "DAEMON_ACL_RULES",
    "SentinelGroup",
    "SentinelServer",
    "TlsFiles",
    "acl_cluster_additions",
    "acl_setuser",
    "make_tls_files",
    "tls_server_args",
]

# Keys: the prefixes of contract section 6b; channels: the daemon's own. Commands: what
# cdc/ sends (the sink and planner, snapshot sweeps, rebuilds, verify, the startup checks
# and the Sentinel role check) and nothing else: no INFO, CONFIG, FLUSH*, KEYS, DEBUG, ACL.
DAEMON_ACL_RULES: tuple[str, ...] = (
    "resetkeys",
    "~ticket:*",
    "~agent:*",
    "~tickets:*",
    "~agents:*",
    "~changes:*",
    "~cdc:*",
    "resetchannels",
    "&cdc:*",
    "-@all",
    "+ping",
    "+select",
    "+role",
    "+multi",
    "+exec",
    "+watch",
    "+unwatch",
    "+wait",
    "+eval",
    "+evalsha",
    "+script|load",
    "+scan",
    "+type",
    "+exists",
    "+get",
    "+mget",
    "+set",
    "+del",
    "+unlink",
    "+rename",
    "+hget",
    "+hmget",
    "+hgetall",
    "+hexists",
    "+hset",
    "+hdel",
    "+sadd",
    "+srem",
    "+zadd",
    "+zrem",
    # cdc verify reads the views (contract 6b) member by member.
    "+sscan",
    "+zscan",
    "+zscore",
    "+xadd",
    "+publish",
)


# What cluster mode sends besides (README "TLS and ACL"): the per-slot scripts count their
# runs (HINCRBY) and keep view deltas in outboxes (RPUSH, LRANGE at a claim), and redis-py's
# RedisCluster reads the topology with CLUSTER SLOTS and the commands' key positions with
# COMMAND.
CLUSTER_ACL_RULES: tuple[str, ...] = (
    "+hincrby",
    "+rpush",
    "+lrange",
    "+ltrim",
    "+cluster|slots",
    "+cluster|myid",
    "+cluster|getkeysinslot",
    "+command",
)


def acl_setuser(user: str, password: str) -> str:
    """The ``ACL SETUSER`` line for the daemon's user (as printed in the README)."""
    return " ".join(["ACL SETUSER", user, "on", f">{password}", *DAEMON_ACL_RULES])


def acl_cluster_additions(user: str) -> str:
    """The ``ACL SETUSER`` line that adds what cluster mode needs (README, run on every
    node after :func:`acl_setuser`'s)."""
    return " ".join(["ACL SETUSER", user, *CLUSTER_ACL_RULES])


@dataclass(frozen=True)
class TlsFiles:
    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_query(self) -> str:
        """The ``rediss://`` query naming the client certificate and the CA."""
        return (
            f"ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"
            f"&ssl_ca_certs={self.ca_cert}&ssl_cert_reqs=required"
        )


def _openssl(directory: Path, *args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise ServerError("openssl not found: install the openssl package")
    done = subprocess.run(
        [binary, *args], cwd=directory, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ServerError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def make_tls_files(directory: Path) -> TlsFiles:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        directory,
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    _openssl(
        directory,
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=cdc test CA",
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth, clientAuth\n"
    )
    (directory / "client.ext").write_text("extendedKeyUsage = clientAuth\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=cdc-daemon")):
        _openssl(
            directory,
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", subject,
        )  # fmt: skip
        _openssl(
            directory,
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        )  # fmt: skip
    for key in (files.server_key, files.client_key):
        os.chmod(key, 0o600)
    return files


def tls_server_args(files: TlsFiles, port: int, auth_clients: bool = True) -> tuple[str, ...]:
    """``redis-server`` arguments: TLS on ``port`` only, client certificates required."""
    return (
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(files.server_cert),
        "--tls-key-file", str(files.server_key),
        "--tls-ca-cert-file", str(files.ca_cert),
        "--tls-auth-clients", "yes" if auth_clients else "no",
        "--tls-replication", "yes",
    )  # fmt: skip


@dataclass
class SentinelServer:
    """``redis-server --sentinel`` on loopback, watching the master ``master_name``."""

    directory: Path
    master_port: int
    master_name: str = "cdcmaster"
    quorum: int = 1
    port: int = field(default_factory=free_port)
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    password: str | None = None
    master_password: str | None = None
    tls: TlsFiles | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerError("redis-server not found: install the redis-server package")
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "sentinel.conf"
        if not conf.exists():  # Sentinel rewrites its file with what it learned
            name = self.master_name
            tls = self.tls
            listen = (
                [f"port {self.port}"]
                if tls is None
                else [
                    "port 0",
                    f"tls-port {self.port}",
                    f"tls-cert-file {tls.server_cert}",
                    f"tls-key-file {tls.server_key}",
                    f"tls-ca-cert-file {tls.ca_cert}",
                    "tls-auth-clients yes",
                    "tls-replication yes",
                ]
            )
            lines = [
                *listen,
                "bind 127.0.0.1",
                "protected-mode no",
                f"dir {self.directory}",
                f"logfile {self.directory / 'sentinel.log'}",
                f"sentinel monitor {name} 127.0.0.1 {self.master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            if self.password is not None:
                # Clients and the other Sentinels alike must authenticate.
                lines += [f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
            if self.master_password is not None:
                lines.append(f"sentinel auth-pass {name} {self.master_password}")
            conf.write_text("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, timeout, self._proc)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    @contextlib.contextmanager
    def running(self) -> Iterator[SentinelServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


@dataclass
class SentinelGroup:
    """A primary, its replicas and ``sentinels`` Sentinels (quorum: a majority), on loopback.

    ``sentinels=0`` gives a plain primary with replicas (for ``WAIT`` cases)."""

    directory: Path
    replicas: int = 1
    sentinels: int = 3
    master_name: str = "cdcmaster"
    tls: TlsFiles | None = None
    password: str | None = None  # the master's (requirepass/masterauth)
    sentinel_password: str | None = None
    nodes: dict[int, RedisServer] = field(default_factory=dict)
    watchers: list[SentinelServer] = field(default_factory=list)
    first_master: int = 0

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        primary_port = free_port()
        primary = RedisServer(
            self.directory / "primary", port=primary_port, extra_args=self._args(primary_port)
        )
        primary.start()
        self.first_master = primary.port
        self.nodes[primary.port] = primary
        for i in range(self.replicas):
            port = free_port()
            replica = RedisServer(
                self.directory / f"replica-{i}",
                port=port,
                extra_args=(*self._args(port), "--replicaof", "127.0.0.1", str(primary.port)),
            )
            replica.start()
            self.nodes[port] = replica
        quorum = self.sentinels // 2 + 1
        for i in range(self.sentinels):
            watcher = SentinelServer(
                self.directory / f"sentinel-{i}",
                primary.port,
                self.master_name,
                quorum=quorum,
                password=self.sentinel_password,
                master_password=self.password,
                tls=self.tls,
            )
            watcher.start()
            self.watchers.append(watcher)
        self._wait_settled(timeout)
        return self

    def _args(self, port: int) -> tuple[str, ...]:
        args: tuple[str, ...] = (
            "--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1",
        )  # fmt: skip
        if self.password is not None:
            args += ("--requirepass", self.password, "--masterauth", self.password)
        if self.tls is not None:
            args += tls_server_args(self.tls, port)
        return args

    def node(self, port: int, **kwargs: Any) -> redis.Redis:
        """A client of one node (TLS and password as the group runs them)."""
        return redis.Redis(port=port, password=self.password, **self._tls_kwargs(), **kwargs)

    def watcher(self, port: int, **kwargs: Any) -> redis.Redis:
        """A client of one Sentinel."""
        return redis.Redis(
            port=port, password=self.sentinel_password, **self._tls_kwargs(), **kwargs
        )

    def _tls_kwargs(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {
            "ssl": True,
            "ssl_certfile": str(self.tls.client_cert),
            "ssl_keyfile": str(self.tls.client_key),
            "ssl_ca_certs": str(self.tls.ca_cert),
        }

    def _wait_settled(self, timeout: float) -> None:
        """Every replica in sync, every Sentinel knows them and the other Sentinels."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._settled():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise ServerError("the Sentinel group did not settle")
            time.sleep(0.1)

    def _settled(self) -> bool:
        master = self.node(self.master_port())
        try:
            info = master.info("replication")
        finally:
            master.close()
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if len([s for s in online if s.get("state") == "online"]) < self.replicas:
            return False
        for watcher in self.watchers:
            client = self.watcher(watcher.port)
            try:
                state: Any = client.sentinel_master(self.master_name)
                known: Any = client.sentinel_slaves(self.master_name)
            finally:
                client.close()
            if state["num-other-sentinels"] < self.sentinels - 1:
                return False
            if len([r for r in known if not r["is_sdown"]]) < self.replicas:
                return False
        return True

    def url(self, db: int = 0) -> str:
        """The daemon's ``REDIS_URL`` for this group."""
        hosts = ",".join(w.address for w in self.watchers)
        scheme = "redis+sentinel" if self.tls is None else "rediss+sentinel"
        auth = f":{self.password}@" if self.password is not None else ""
        query = []
        if self.sentinel_password is not None:
            query.append(f"sentinel_password={self.sentinel_password}")
        if self.tls is not None:
            query.append(self.tls.client_query())
        tail = "?" + "&".join(query) if query else ""
        return f"{scheme}://{auth}{hosts}/{self.master_name}/{db}{tail}"

    def master_port(self) -> int:
        """Where the Sentinels say the master is (the first primary without Sentinels)."""
        for watcher in self.watchers:
            client = self.watcher(watcher.port, socket_timeout=2)
            try:
                found: Any = client.sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if found:
                return int(found[1])
        if self.watchers:
            raise ServerError("no Sentinel names a master")
        return self.first_master

    def master_url(self, db: int = 0) -> str:
        """A direct URL of the current master (for checks in tests)."""
        auth = f":{self.password}@" if self.password is not None else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.master_port()}/{db}"
        return f"rediss://{auth}127.0.0.1:{self.master_port()}/{db}?{self.tls.client_query()}"

    def replica_ports(self) -> list[int]:
        master = self.master_port()
        return [p for p in self.nodes if p != master]

    def wait_failover(self, old_master: int, timeout: float = 60.0) -> int:
        """Wait until every Sentinel names another master and it says ROLE master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ports = set()
                for watcher in self.watchers:
                    client = self.watcher(watcher.port, socket_timeout=2)
                    try:
                        named: Any = client.sentinel_get_master_addr_by_name(self.master_name)
                    finally:
                        client.close()
                    ports.add(int(named[1]) if named else 0)
                if len(ports) == 1 and (port := ports.pop()) not in (0, old_master):
                    node = self.node(port, socket_timeout=2)
                    try:
                        role: Any = node.execute_command("ROLE")  # type: ignore[no-untyped-call]
                        if role[0] in (b"master", "master"):
                            return port
                    finally:
                        node.close()
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise ServerError("no failover happened")

    def stop(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        for node in self.nodes.values():
            node.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[SentinelGroup]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
