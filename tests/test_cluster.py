"""Cluster mode (contract 7.8): the daemon on a 3-primary Redis Cluster.

Streaming inserts, updates, deletes and username renames of both tables, ``kill -9`` of
the daemon mid-stream, ``TRUNCATE``, and a reshard moving slots while writes stream; then
the full comparison of PostgreSQL against every primary's keys (no extra key, none
outside the allowed prefixes) and a sampler asserting each key's ``_v`` never goes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from schema.lsn import parse_lsn
from schema.redis_url import cluster_url, redis_client
from tests.cluster import RedisCluster, replica_of, reshard
from tests.helpers import ROOT, Daemon, assert_converged, running, text, wait_for
from writer import Writer
from writer.reader import AsyncCacheReader, CacheReader

TICKETS = [f"t{i}" for i in range(60)]
AGENTS = [f"a{i}" for i in range(12)]
STATUSES = ["open", "pending", "closed"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path / "cluster").start()
    try:
        yield c
    finally:
        c.stop()


def seed(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for a in AGENTS[:8]:
            conn.execute(
                "INSERT INTO agents (id, username, display_name, password_hash)"
                " VALUES (%s, %s, %s, 'x')",
                (a, f"user-{a}", a.upper()),
            )
        for t in TICKETS[:40]:
            conn.execute(
                "INSERT INTO tickets (id, title, status, assignee_id) VALUES (%s, %s, %s, %s)",
                (t, "seed", "open", random.choice(AGENTS[:8])),
            )


@dataclass
class Workload:
    """Random changes of both tables, in small transactions, until stopped."""

    database_url: str
    seed: int = 11
    commits: int = 0
    truncate_at: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    renames: int = 0

    def start(self) -> Workload:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def wait(self, more: int) -> None:
        target = self.commits + more
        wait_for(lambda: self.commits >= target, 120, f"{more} more commits")

    def _run(self) -> None:
        rng = random.Random(self.seed)
        with psycopg.connect(self.database_url) as conn:
            while not self._stop.is_set():
                try:
                    for _ in range(rng.randint(1, 4)):
                        self._change(conn, rng)
                    if self.truncate_at is not None and self.commits == self.truncate_at:
                        conn.execute("TRUNCATE tickets CASCADE")
                    conn.commit()
                    self.commits += 1
                except psycopg.errors.IntegrityError:
                    conn.rollback()

    def _change(self, conn: psycopg.Connection[Any], rng: random.Random) -> None:
        r = rng.random()
        if r < 0.45:
            conn.execute(
                "INSERT INTO tickets (id, title, status, assignee_id)"
                " VALUES (%s, %s, %s, (SELECT id FROM agents WHERE id = %s))"
                " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title,"
                " status = EXCLUDED.status, assignee_id = EXCLUDED.assignee_id,"
                " updated_at = now()",
                (
                    rng.choice(TICKETS),
                    f"v{rng.randint(0, 10**6)}",
                    rng.choice(STATUSES),
                    rng.choice([*AGENTS, None]),
                ),
            )
        elif r < 0.55:
            conn.execute("DELETE FROM tickets WHERE id = %s", (rng.choice(TICKETS),))
        elif r < 0.62:
            # A primary key change: the row moves to a key in another slot.
            old, new = rng.choice(TICKETS), rng.choice(TICKETS)
            conn.execute(
                "UPDATE tickets SET id = %s WHERE id = %s"
                " AND NOT EXISTS (SELECT 1 FROM tickets WHERE id = %s)",
                (new, old, new),
            )
        elif r < 0.8:
            agent = rng.choice(AGENTS)
            name = f"user-{agent}-{rng.randint(0, 10**6)}"
            conn.execute(
                "INSERT INTO agents (id, username, display_name, password_hash, status)"
                " VALUES (%s, %s, %s, 'x', %s) ON CONFLICT (id) DO UPDATE"
                " SET username = EXCLUDED.username, status = EXCLUDED.status",
                (agent, name, agent, rng.choice(["online", "offline", "away"])),
            )
            self.renames += 1
        elif r < 0.85:
            conn.execute(
                "DELETE FROM agents WHERE id = %s"
                " AND NOT EXISTS (SELECT 1 FROM tickets WHERE assignee_id = %s)",
                (agent := rng.choice(AGENTS), agent),
            )
        else:
            conn.execute(
                "UPDATE tickets SET status = %s, updated_at = now() WHERE id = %s",
                (rng.choice(STATUSES), rng.choice(TICKETS)),
            )


@dataclass
class Sampler:
    """I2 per key: each ``ticket:{id}``'s ``_v`` never goes back (sampled atomically per
    key, across every primary, while the test runs)."""

    url: str
    regressions: list[str] = field(default_factory=list)
    samples: int = 0
    _seen: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        client = redis_client(self.url, socket_timeout=2)
        while not self._stop.is_set():
            try:
                pipe = client.pipeline(transaction=False)
                for row in TICKETS:
                    pipe.hget(f"ticket:{{{row}}}", "_v")
                for row, version in zip(TICKETS, pipe.execute(), strict=True):
                    if version is None:
                        continue
                    value = parse_lsn(text(version))
                    if value < self._seen.get(row, 0):
                        self.regressions.append(f"{row}: {self._seen[row]:X} -> {value:X}")
                    self._seen[row] = max(value, self._seen.get(row, 0))
                self.samples += 1
            except (redis.RedisError, redis.exceptions.RedisClusterException):
                self._stop.wait(0.1)
            self._stop.wait(0.01)


def test_cluster_stream_kill_truncate(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster
) -> None:
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url)
    sampler = Sampler(cluster.url)
    load = Workload(database_url)
    with running(daemon):
        counts = assert_converged(database_url, cluster.url)
        assert counts["tickets"] >= 40
        sampler.start()
        load.start()
        load.wait(150)
        daemon.kill()
        load.wait(100)
        daemon.start()
        daemon.wait_ready(60)
        load.truncate_at = load.commits + 40
        load.wait(200)
        load.stop()
        assert load.commits > load.truncate_at
        counts = assert_converged(database_url, cluster.url)
        sampler.stop()
    assert not sampler.regressions, sampler.regressions[:10]
    assert sampler.samples > 0
    assert load.renames > 0
    assert counts["agents"] > 0


def test_cluster_reshard_while_streaming(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster
) -> None:
    """Slots (with their keys, fences and outboxes) move between primaries while writes
    stream: the daemon follows MOVED/ASK (and retries TRYAGAIN) and converges."""
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url)
    sampler = Sampler(cluster.url)
    load = Workload(database_url, seed=5)
    with running(daemon):
        sampler.start()
        load.start()
        load.wait(50)
        first, second, third = cluster.ports
        reshard(first, second, 3000)
        load.wait(20)
        reshard(third, first, 2000)
        load.wait(50)
        load.stop()
        assert_converged(database_url, cluster.url)
        sampler.stop()
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
    assert not sampler.regressions, sampler.regressions[:10]


def test_cluster_readers_wait_for_tokens(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster, writer: Writer
) -> None:
    """CacheReader and AsyncCacheReader on a cluster URL: a write's token is waited for
    (``cdc:applied`` is published cluster-wide), rows, lookups and views answer from Redis
    (no database to fall back to)."""
    seed(database_url)
    with running(make_daemon(REDIS_URL=cluster.url)):
        reader = CacheReader.connect(cluster.url)
        try:
            for n in range(5):
                written = writer.create_ticket({"title": f"cluster {n}"})
                ticket = reader.ticket(written.value.id, after=written.token, timeout=30)
                assert ticket is not None
                assert ticket.title == f"cluster {n}"
                listed = reader.tickets_with_status("open", after=written.token, timeout=30)
                assert written.value.id in {t.id for t in listed}
            agent = reader.agent_by_username("user-a1", timeout=30)
            assert agent is not None
            assert agent.id == "a1"
        finally:
            reader.close()
        # A plain redis:// URL of any node means the cluster too.
        node_url = f"redis://127.0.0.1:{cluster.ports[1]}/0"
        assert cluster_url(node_url).startswith("redis+cluster://127.0.0.1:")
        reader = CacheReader.connect(node_url)
        try:
            written = writer.create_ticket({"title": "via a node URL"})
            ticket = reader.ticket(written.value.id, after=written.token, timeout=30)
            assert ticket is not None
            assert ticket.title == "via a node URL"
        finally:
            reader.close()

        async def read_async() -> None:
            areader = AsyncCacheReader.connect(cluster.url)
            try:
                written = writer.create_ticket({"title": "async"})
                assert await areader.wait(written.token, timeout=30)
                ticket = await areader.ticket(written.value.id, after=written.token)
                assert ticket is not None
                assert ticket.title == "async"
                members = await areader.agents_with_status("offline")
                assert "a1" in {a.id for a in members}
            finally:
                await areader.close()

        asyncio.run(read_async())


def test_cluster_verify_repair_and_reset(
    database_url: str,
    make_daemon: Callable[..., Daemon],
    cluster: RedisCluster,
    slot_name: str,
) -> None:
    """``cdc verify`` (and ``--repair``) and ``cdc slot reset`` on a cluster URL: scans
    go over every primary, repairs and the reload write per slot."""

    def cdc(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update({"DATABASE_URL": database_url, "REDIS_URL": cluster.url, "CDC_SLOT": slot_name})
        return subprocess.run(
            [sys.executable, "-m", "cdc", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        clean = cdc("verify")
        assert clean.returncode == 0, clean.stdout + clean.stderr
        client = redis_client(cluster.url)
        client.delete("ticket:{t1}")
        client.hset("ticket:{t2}", "title", "tampered")
        client.hset("ticket:{ghost}", mapping={"id": "ghost", "title": "no row"})
        client.set("agent:username:{user-a1}", "someone-else")
        client.zrem("tickets:status:{open}", "t3")
        client.close()
        found = cdc("verify", "--json")
        report = json.loads(found.stdout)
        assert set(report["missing"]) == {"ticket:{t1}", "tickets:status:{open}"}
        assert report["extra"] == ["ticket:{ghost}"]
        repaired = cdc("verify", "--repair")
        assert repaired.returncode == 1, repaired.stdout + repaired.stderr
        again = cdc("verify")
        assert again.returncode == 0, again.stdout + again.stderr
        assert_converged(database_url, cluster.url)
    # A reset reloads the cache from a new slot; the daemon then resumes from it.
    done = cdc("slot", "reset", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE tickets SET title = 'after reset' WHERE id = 't5'")
    with running(make_daemon(REDIS_URL=cluster.url)):
        assert_converged(database_url, cluster.url)


@pytest.fixture
def cluster_with_replicas(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path / "cluster6", primaries=3, replicas=1).start()
    try:
        wait_for(c.synced, 60, "replicas in sync")
        yield c
    finally:
        c.stop()


def test_cluster_failover_repairs_only_the_lost_slots(
    database_url: str, make_daemon: Callable[..., Daemon], cluster_with_replicas: RedisCluster
) -> None:
    """3 primaries + 3 replicas. One primary's replica is stopped while a burst fills the
    replication link, so what the daemon writes next reaches the primary only; the
    primary is killed (-9), the replica resumes and is promoted without those writes.
    The daemon follows the new topology, finds the slots that lost writes (their script
    counters went back), repairs those slots' keys only, and converges."""
    cluster = cluster_with_replicas
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title, status)"
            " SELECT 'bulk' || i, 'bulk', 'open' FROM generate_series(1, 600) i"
        )
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_REDIS_TIMEOUT="1")
    load = Workload(database_url, seed=3)
    client = redis_client(cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        state_node = client.get_node_from_key("cdc:state")  # type: ignore[attr-defined]
        victim = next(p for p in cluster.primary_ports() if p != state_node.port)
        replica = replica_of(victim)
        load.start()
        load.wait(20)
        # Fill the link to the replica, then stop it: later writes stay on the primary.
        tag = next(
            t
            for t in (f"j{i}" for i in range(10000))
            if client.get_node_from_key(f"junk:{{{t}}}").port == victim  # type: ignore[attr-defined]
        )
        cluster.pause(replica)
        blob = b"x" * (1 << 20)
        for n in range(40):
            client.set(f"junk:{{{tag}}}:{n}", blob)
        load.wait(30)
        cluster.kill(victim)
        cluster.resume(replica)
        try:
            wait_for(lambda: replica in cluster.primary_ports(), 15, "the replica's election")
        except AssertionError:
            # The election may stall after the replica's pause: take over as an operator
            # would (the promoted replica has the same lost writes either way).
            cluster.node(replica).execute_command("CLUSTER", "FAILOVER", "TAKEOVER")  # type: ignore[no-untyped-call]
            wait_for(lambda: replica in cluster.primary_ports(), 60, "the replica to be promoted")
        wait_for(cluster.healthy, 60, "the cluster to be ok again")
        load.wait(60)
        load.stop()
        client = redis_client(cluster.url)
        for key in list(client.scan_iter(match="junk:*")):
            client.delete(key)
        counts = assert_converged(database_url, cluster.url)
        repairs = [e for e in daemon.events() if e.get("event") == "repairing the lost slots"]
    assert repairs, "the daemon did not notice the lost writes"
    # Only the lost shard's rows (about a third, plus agents whose lookup is there).
    total = counts["tickets"] + counts["agents"]
    assert 0 < repairs[0]["slots"] <= 16384 // 3 + 1
    assert 0 < repairs[0]["rows"] < total * 0.6


def test_cluster_drain_rate_next_to_single_node(
    database_url: str,
    make_daemon: Callable[..., Daemon],
    cluster: RedisCluster,
    redis_url: str,
    slot_name: str,
) -> None:
    """The same backlog drained into one Redis node and into the 3-primary cluster, in
    one run (rows/s printed for the report; no threshold: the machine is shared)."""
    seed(database_url)
    single = make_daemon()
    clustered = make_daemon(REDIS_URL=cluster.url, CDC_SLOT=slot_name + "_c")
    for daemon in (single, clustered):
        with running(daemon):
            pass
    rows = 20000
    with psycopg.connect(database_url, autocommit=True) as conn:
        for start in range(0, rows, 1000):
            conn.execute(
                "INSERT INTO tickets (id, title, status)"
                " SELECT 'drain' || i, 'backlog', 'open' FROM generate_series(%s::int, %s::int) i",
                (start, start + 999),
            )
    rates: dict[str, float] = {}
    for name, daemon, url in (
        ("single node", single, redis_url),
        ("3-primary cluster", clustered, cluster.url),
    ):
        with running(daemon):
            # Ready: the claim and start are done, the stream begins (the drain).
            started = time.monotonic()
            client = redis_client(url)
            last = f"ticket:{{drain{rows - 1}}}"
            wait_for(
                lambda c=client, k=last: c.exists(k),  # type: ignore[misc]
                300,
                f"the backlog drained into the {name}",
            )
            rates[name] = rows / (time.monotonic() - started)
            client.close()
            assert_converged(database_url, url)
    print(f"drain rates (rows/s, from the daemon's readiness): {rates}")


def test_cluster_rebuild_after_data_loss(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster
) -> None:
    """One primary loses everything (FLUSHALL, as a restart without persistence would):
    its slots' fence keys are gone, the daemon notices and rebuilds online."""
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url)
    load = Workload(database_url, seed=9)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        load.start()
        load.wait(30)
        cluster.node(cluster.primary_ports()[1]).flushall()
        load.wait(60)
        load.stop()

        def rebuilt() -> bool:
            return any(e.get("event") == "rebuild complete" for e in daemon.events())

        wait_for(rebuilt, 120, "the rebuild to complete")
        assert_converged(database_url, cluster.url)


def test_cluster_change_feed(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster
) -> None:
    """Contract 6c on a cluster: ``changes:<table>`` gets an entry per change, in commit
    order (lsn, seq), an update naming the columns it changed; the last entry of each
    row agrees with PostgreSQL."""
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_CHANGE_FEED="1")
    load = Workload(database_url, seed=21)
    with running(daemon):
        load.start()
        load.wait(120)
        load.stop()
        assert_converged(database_url, cluster.url)
    client = redis_client(cluster.url, decode_responses=True)
    with psycopg.connect(database_url) as conn:
        for table in ("tickets", "agents"):
            raw: Any = client.xrange(f"changes:{table}")
            entries: list[dict[str, str]] = [fields for _, fields in raw]
            assert entries, table
            order = [(parse_lsn(e["lsn"]), int(e["seq"])) for e in entries]
            assert order == sorted(order), f"{table}: entries out of commit order"
            # A primary key change is a delete and an insert with the same lsn and seq.
            assert len({(e["lsn"], e["seq"], e["op"]) for e in entries}) == len(entries)
            known = {
                str(r[0])
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                    (table,),
                ).fetchall()
            }
            last: dict[str, str] = {}
            for e in entries:
                if e["op"] == "truncate":
                    last = {k: "truncate" for k in last}
                else:
                    last[e["id"]] = e["op"]
                if e["op"] == "update":
                    assert set(filter(None, e["columns"].split(","))) <= known, e
            present = {str(r[0]) for r in conn.execute(f"SELECT id FROM {table}").fetchall()}
            for row_id, op in last.items():
                if row_id in present:
                    assert op in ("insert", "update"), (table, row_id, op)
                else:
                    assert op in ("delete", "truncate"), (table, row_id, op)
            updates = [e for e in entries if e["op"] == "update"]
            assert any(e["columns"] for e in updates)


def test_async_reader_asks_a_node_url_without_blocking_calls(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AsyncCacheReader on a plain redis:// URL of any node: it finds the cluster over
    redis.asyncio (no sync redis-py call blocks its event loop) and reads from the slot
    owners (a node that does not own ``cdc:state``'s slot would answer MOVED)."""
    admin = redis_client(cluster.url)
    admin.hset("cdc:state", "lsn", "0/1234")
    admin.close()

    def blocking(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a sync redis-py call from the async reader")

    monkeypatch.setattr(redis.Redis, "execute_command", blocking)
    monkeypatch.setattr(redis.Redis, "info", blocking)

    async def read(port: int) -> int | None:
        areader = AsyncCacheReader.connect(f"redis://127.0.0.1:{port}/0")
        try:
            return await areader.applied_position()
        finally:
            await areader.close()

    for port in cluster.ports:
        assert asyncio.run(read(port)) == parse_lsn("0/1234"), port
