"""Cluster mode (contract 7.8): the daemon on a 3-primary Redis Cluster.

Streaming inserts, updates, deletes and username renames of both tables, ``kill -9`` of
the daemon mid-stream, ``TRUNCATE``, and a reshard moving slots while writes stream; then
the full comparison of PostgreSQL against every primary's keys (no extra key, none
outside the allowed prefixes) and a sampler asserting each key's ``_v`` never goes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devstack.redis_ha import TlsFiles, make_tls_files
from schema.lsn import parse_lsn
from schema.redis_url import cluster_url, redis_client
from tests.cluster import RedisCluster, replica_of, reshard
from tests.helpers import (
    Daemon,
    assert_converged,
    fence,
    run_cdc,
    running,
    slot_confirmed,
    text,
    wait_for,
)
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
    and a TRUNCATE stream: the daemon follows MOVED/ASK (and retries TRYAGAIN) and
    converges."""
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url)
    sampler = Sampler(cluster.url)
    load = Workload(database_url, seed=5)
    with running(daemon):
        sampler.start()
        load.start()
        load.wait(50)
        first, second, third = cluster.ports
        # A TRUNCATE while slots (and their keys) move: its scan must not miss a key.
        load.truncate_at = load.commits + 3
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
        return run_cdc(database_url, cluster.url, slot_name, *args)

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
        # It told the daemon it wrote keys outside its counting scripts (before and
        # after the rows, before and after the views).
        state = redis_client(cluster.url).hgetall("cdc:state")
        assert int(state[b"uncounted"]) >= 2
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


def _victim(cluster: RedisCluster, client: Any) -> tuple[int, int]:
    """A primary that does not hold ``cdc:state`` (its loss is a shard's, not the
    checkpoint's), and its replica."""
    state_node = client.get_node_from_key("cdc:state")
    victim = next(p for p in cluster.primary_ports() if p != state_node.port)
    return victim, replica_of(victim)


def _lose_recent_writes(
    cluster: RedisCluster,
    client: Any,
    victim: int,
    replica: int,
    load: Workload,
    before_the_kill: Callable[[], None] = lambda: None,
) -> None:
    """Let ``victim``'s replica miss the daemon's latest writes, then kill ``victim``
    (-9) and promote the replica without them."""
    # Fill the link to the replica, then stop it: later writes stay on the primary.
    tag = next(
        t
        for t in (f"j{i}" for i in range(10000))
        if client.get_node_from_key(f"junk:{{{t}}}").port == victim
    )
    cluster.pause(replica)
    blob = b"x" * (1 << 20)
    for n in range(40):
        client.set(f"junk:{{{tag}}}:{n}", blob)
    load.wait(30)
    before_the_kill()
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
        victim, replica = _victim(cluster, client)
        load.start()
        load.wait(20)
        _lose_recent_writes(cluster, client, victim, replica, load)
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


def _repairs(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == "repairing the lost slots"]


def test_cluster_manual_failover_while_running_costs_no_repair(
    database_url: str, make_daemon: Callable[..., Daemon], cluster_with_replicas: RedisCluster
) -> None:
    """``CLUSTER FAILOVER`` (a rolling upgrade's step) loses nothing: the promoted
    replica has a new node id, but every slot's script count is what this daemon
    counted, so no slot is repaired (no row key deleted and fetched again) while writes
    go on, and the cache converges with no ``_v`` going back."""
    cluster = cluster_with_replicas
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_REDIS_TIMEOUT="1")
    load = Workload(database_url, seed=41)
    client = redis_client(cluster.url)
    sampler = Sampler(cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        _, replica = _victim(cluster, client)
        sampler.start()
        load.start()
        load.wait(30)
        cluster.node(replica).execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
        wait_for(lambda: replica in cluster.primary_ports(), 60, "the manual failover")
        wait_for(cluster.healthy, 60, "the cluster to be ok again")

        def followed() -> bool:
            return any("primaries changed" in str(e.get("reason", "")) for e in daemon.events())

        wait_for(followed, 60, "the daemon to see the new primary")
        load.wait(40)
        load.stop()
        assert_converged(database_url, cluster.url)
        sampler.stop()
        assert _repairs(daemon) == [], daemon.log()
        assert daemon.metric("cdc_rebuilds_total", 'reason="slots_lost"') == 0
    assert sampler.samples > 0
    assert not sampler.regressions, sampler.regressions[:5]


def test_cluster_claim_failing_after_its_counts_still_repairs_the_lost_slots(
    database_url: str,
    make_daemon: Callable[..., Daemon],
    cluster_with_replicas: RedisCluster,
    tmp_path: Path,
) -> None:
    """A lossy failover while the daemon runs; its next claim reads the counts (which
    show the loss) and then fails before it records the repair. The claim after that
    must not take the counts it left as proof that nothing was lost."""
    cluster = cluster_with_replicas
    seed(database_url)
    trip = tmp_path / "fail-claim"
    daemon = make_daemon(
        REDIS_URL=cluster.url,
        CDC_REDIS_TIMEOUT="1",
        CDC_FAILPOINTS=f"cluster_counted=fail:{trip}",
    )
    load = Workload(database_url, seed=47)
    client = redis_client(cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        victim, replica = _victim(cluster, client)
        load.start()
        load.wait(20)
        trip.touch()
        _lose_recent_writes(cluster, client, victim, replica, load)
        load.wait(40)
        load.stop()
        wait_for(lambda: not trip.exists(), 60, "the claim to fail once")
        client = redis_client(cluster.url)
        for key in list(client.scan_iter(match="junk:*")):
            client.delete(key)
        assert_converged(database_url, cluster.url)
    assert "fail point cluster_counted" in daemon.log()
    assert _repairs(daemon), "the lost slots were not repaired"


def test_cluster_primary_restarted_from_its_rdb_costs_no_repair(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster
) -> None:
    """A primary saved and restarted (same node id, new replication id) holds all it had.
    The daemon's next session (its walsender is terminated) claims again, finds every
    slot's count as it left it, and repairs nothing."""
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_REDIS_TIMEOUT="1")
    load = Workload(database_url, seed=43)
    client = redis_client(cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        state_port = client.get_node_from_key("cdc:state").port  # type: ignore[attr-defined]
        victim = next(p for p in cluster.primary_ports() if p != state_port)
        replid = cluster.node(victim).info("replication")["master_replid"]
        load.start()
        load.wait(20)
        with contextlib.suppress(redis.ConnectionError):
            cluster.node(victim).shutdown(save=True)
        cluster.procs.pop(victim).wait(10)
        cluster.start_node(victim)
        assert cluster.node(victim).info("replication")["master_replid"] != replid
        wait_for(cluster.healthy, 60, "the cluster to be ok again")
        load.wait(20)
        sessions = daemon.log().count('"streaming"')
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE database = current_database() AND active_pid IS NOT NULL"
            )
        wait_for(lambda: daemon.log().count('"streaming"') > sessions, 60, "a new session")
        load.wait(20)
        load.stop()
        assert_converged(database_url, cluster.url)
        assert _repairs(daemon) == [], daemon.log()
        assert daemon.metric("cdc_rebuilds_total", 'reason="slots_lost"') == 0


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


def _crash_before_checkpoint(
    make_daemon: Callable[..., Daemon],
    url: str,
    hold: Path,
    change: Callable[[], None],
    **env: str,
) -> None:
    """Run ``change`` under a daemon held after every slot applied it but before
    ``cdc:state`` moved, and kill it there (-9): the next daemon replays the change."""
    env = {"REDIS_URL": url, **env, "CDC_FAILPOINTS": f"cluster_checkpoint=pause:{hold}"}
    daemon = make_daemon(**env)
    with running(daemon):
        hold.touch()
        change()
        wait_for(Path(f"{hold}.hit").exists, 30, "the daemon to hold before the checkpoint")
        daemon.kill()
    hold.unlink()


def test_cluster_replayed_truncate_keeps_what_followed_it(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster, tmp_path: Path
) -> None:
    """A transaction truncates the table and inserts rows; the daemon dies after every
    slot applied it, before its checkpoint. The replay must not truncate again the view
    keys the inserts wrote (their slots saw those view deltas, not the rows: the row
    scripts skip the replayed inserts, so a second TRUNCATE would empty the views for
    good)."""
    seed(database_url)
    rows = [f"n{i}" for i in range(30)]

    def truncate_and_insert() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
            conn.execute("TRUNCATE tickets CASCADE")
            for row in rows:
                conn.execute(
                    "INSERT INTO tickets (id, title, status, assignee_id) VALUES (%s, 'n', %s,"
                    " (SELECT id FROM agents WHERE id = %s))",
                    (row, random.choice(STATUSES), random.choice(AGENTS[:8])),
                )

    _crash_before_checkpoint(make_daemon, cluster.url, tmp_path / "hold", truncate_and_insert)
    with running(make_daemon(REDIS_URL=cluster.url)):
        counts = assert_converged(database_url, cluster.url)
    # The rows inserted, and the fence row assert_converged writes.
    assert counts["tickets"] == len(rows) + 1
    client = redis_client(cluster.url)
    members = sum(int(client.zcard(f"tickets:status:{{{s}}}")) for s in STATUSES)
    assert members == counts["tickets"]


# Tickets without views: a key change's first operation is then its patch.
_NO_TICKET_VIEWS = """
[[tables]]
name = "agents"
key = "agent:{id}"
exclude = ["password_hash"]
lookups = ["agent:username:{username}"]
views = [{ key = "agents:status:{status}" }]

[[tables]]
name = "tickets"
key = "ticket:{id}"
"""


@pytest.mark.parametrize("views", [True, False], ids=["views", "no-views"])
def test_cluster_replayed_key_change_keeps_an_unchanged_large_column(
    database_url: str,
    make_daemon: Callable[..., Daemon],
    cluster: RedisCluster,
    tmp_path: Path,
    views: bool,
) -> None:
    """``UPDATE … SET id`` of rows with a TOASTed description that the update leaves alone
    (pgoutput sends it as unchanged): the new key is in another slot, so the old key's
    value must reach it. The daemon dies before the checkpoint and the batch is replayed:
    every moved row must be whole, not missing until its next change."""
    env = {"REDIS_URL": cluster.url}
    if not views:
        config = tmp_path / "cache.toml"
        config.write_text(_NO_TICKET_VIEWS)
        env["CDC_CONFIG"] = str(config)
    seed(database_url)
    big = "".join(f"{random.getrandbits(64):016x}" for _ in range(1200))  # not compressible
    with psycopg.connect(database_url, autocommit=True) as conn:
        for i in range(12):
            conn.execute(
                "INSERT INTO tickets (id, title, description) VALUES (%s, 'big', %s)",
                (f"big{i}", f"{i}:{big}"),
            )
    with running(make_daemon(**env)):
        fence(database_url, cluster.url)

    def move() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
            for i in range(12):
                conn.execute(
                    "UPDATE tickets SET id = %s, status = 'pending' WHERE id = %s",
                    (f"moved{i}", f"big{i}"),
                )

    _crash_before_checkpoint(make_daemon, cluster.url, tmp_path / "hold", move, **env)
    with running(make_daemon(**env)):
        fence(database_url, cluster.url)
        if views:
            assert_converged(database_url, cluster.url)
    client = redis_client(cluster.url)
    for i in range(12):
        fields = client.hgetall(f"ticket:{{moved{i}}}")
        assert fields.get(b"description") == f"{i}:{big}".encode(), i
        assert fields.get(b"status") == b"pending", i
        assert not client.exists(f"ticket:{{big{i}}}"), i


def test_cluster_failover_while_the_daemon_is_down_is_repaired_by_the_next(
    database_url: str,
    make_daemon: Callable[..., Daemon],
    cluster_with_replicas: RedisCluster,
    tmp_path: Path,
) -> None:
    """The daemon dies (-9) with its writes on a primary only; the primary dies and its
    replica is promoted without them. The next daemon has none of the slot counts of the
    one that wrote them: it must see from ``cdc:state`` that a primary it does not know
    serves those slots, record the repair, and start it; it dies too before any row is
    written; the one after it finds the repair recorded, does it, and converges."""
    cluster = cluster_with_replicas
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_REDIS_TIMEOUT="1")
    load = Workload(database_url, seed=13)
    client = redis_client(cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        victim, replica = _victim(cluster, client)
        load.start()
        load.wait(20)
        _lose_recent_writes(cluster, client, victim, replica, load, daemon.kill)
    load.stop()
    hold = tmp_path / "hold"
    hold.touch()
    second = make_daemon(REDIS_URL=cluster.url, CDC_FAILPOINTS=f"before_send=pause:{hold}")
    second.start()
    wait_for(Path(f"{hold}.hit").exists, 60, "the second daemon to hold at its first batch")
    second.kill()
    hold.unlink()
    assert [e for e in second.events() if e.get("event") == "repairing the lost slots"]
    # The repair it started is recorded for the next daemon.
    assert redis_client(cluster.url).hget("cdc:state", "repair_slots")
    third = make_daemon(REDIS_URL=cluster.url)
    with running(third):
        client = redis_client(cluster.url)
        for key in list(client.scan_iter(match="junk:*")):
            client.delete(key)
        assert_converged(database_url, cluster.url)
        repairs = [e for e in third.events() if e.get("event") == "repairing the lost slots"]

        def recorded() -> str:
            return text(client.hget("cdc:state", "repair_slots") or b"")

        # Its record goes once the repaired rows are written (the server is quiet now).
        wait_for(lambda: not recorded(), 60, "the repair's record to be cleared")
    assert repairs, "the repair the second daemon recorded was not resumed"
    assert 0 < repairs[0]["slots"] <= 16384 // 3 + 1


def test_cluster_feed_names_the_columns_of_each_update_after_a_partial_replay(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster, tmp_path: Path
) -> None:
    """Two updates of a row are applied and the daemon dies before its checkpoint; a
    third update commits while it is down. The replay skips the first two in the row's
    slot (applied already) and applies the third: its feed entry must name the column
    the third changed, not get the names of another update of the same row."""
    seed(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE tickets SET assignee_id = 'a1' WHERE id = 't1'")

    def two_updates() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE tickets SET title = 'first' WHERE id = 't1'")
            conn.execute("UPDATE tickets SET status = 'closed' WHERE id = 't1'")

    _crash_before_checkpoint(
        make_daemon, cluster.url, tmp_path / "hold", two_updates, CDC_CHANGE_FEED="1"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE tickets SET assignee_id = NULL WHERE id = 't1'")
    with running(make_daemon(REDIS_URL=cluster.url, CDC_CHANGE_FEED="1")):
        assert_converged(database_url, cluster.url)
    client = redis_client(cluster.url, decode_responses=True)
    raw: Any = client.xrange("changes:tickets")
    updates = [f for _, f in raw if f["op"] == "update" and f["id"] == "t1"]
    assert updates[-1]["columns"] == "assignee_id", updates
    assert {u["columns"] for u in updates} >= {"title", "status"}, updates


def test_cluster_failover_of_a_quiet_primary_is_repaired_without_traffic(
    database_url: str, make_daemon: Callable[..., Daemon], cluster_with_replicas: RedisCluster
) -> None:
    """The writes stop, then a primary that lost some of them to its replica fails over.
    Nothing more is written, so no command meets the dead node: the daemon must still
    see the new primary (it reads the slot map while idle) and repair its slots."""
    cluster = cluster_with_replicas
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_REDIS_TIMEOUT="1")
    load = Workload(database_url, seed=17)
    client = redis_client(cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        victim, replica = _victim(cluster, client)
        load.start()
        load.wait(20)

        # The other primaries keep serving while one is down (else every node answers
        # CLUSTERDOWN for a moment, and that makes redis-py read the slot map anyway).
        for port in cluster.ports:
            cluster.node(port).config_set("cluster-require-full-coverage", "no")

        def quiet() -> None:
            load.stop()
            fence(database_url, cluster.url)  # the daemon has applied everything

        _lose_recent_writes(cluster, client, victim, replica, load, quiet)

        def repaired() -> bool:
            return any(e.get("event") == "repairing the lost slots" for e in daemon.events())

        wait_for(repaired, 60, "the daemon to repair the quiet shard")
        client = redis_client(cluster.url)
        for key in list(client.scan_iter(match="junk:*")):
            client.delete(key)
        assert_converged(database_url, cluster.url)


def test_cluster_standby_takes_over_after_kill_9(
    database_url: str, make_daemon: Callable[..., Daemon], cluster: RedisCluster
) -> None:
    """Item 5 in cluster mode: the hot standby acquires the slot when the active daemon
    is killed (-9), claims every slot's fence (the old daemon's scripts would be
    refused), and the cache converges (bench/takeover.py --cluster measures how soon)."""
    seed(database_url)
    first = make_daemon(REDIS_URL=cluster.url, CDC_STANDBY="true").start().wait_ready()
    standby = make_daemon(REDIS_URL=cluster.url, CDC_STANDBY="true").start()
    wait_for(lambda: "standby: waiting for the slot" in standby.log(), 30, "the standby")
    load = Workload(database_url, seed=23).start()
    try:
        load.wait(20)
        first.kill()
        standby.wait_ready()
        load.wait(40)
    finally:
        load.stop()
    try:
        assert_converged(database_url, cluster.url)
        client = redis_client(cluster.url)
        assert text(client.hget("cdc:state", "owner") or b"").endswith(f":{standby.pid}")
        token = client.hget("cdc:state", "fence")
        samples = [client.hget(f"cdc:fence:{{{t}}}", "f") for t in ("0", "1", "a", "ff")]
        assert samples == [token] * 4
    finally:
        standby.stop()


def test_cluster_min_replicas_holds_the_confirmation_until_the_shard_replica_has_it(
    database_url: str, make_daemon: Callable[..., Daemon], cluster_with_replicas: RedisCluster
) -> None:
    """``CDC_REDIS_MIN_REPLICAS=1`` on a cluster: one shard's replica is stopped; a row is
    applied on that shard's primary but its LSN is not confirmed to PostgreSQL until
    the replica is back and has it."""
    cluster = cluster_with_replicas
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_REDIS_MIN_REPLICAS="1", CDC_REDIS_TIMEOUT="1")
    client = redis_client(cluster.url)
    with running(daemon):
        fence(database_url, cluster.url)
        primary = client.get_node_from_key("ticket:{needs-replica}").port  # type: ignore[attr-defined]
        replica = replica_of(primary)
        cluster.pause(replica)
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                row = conn.execute(
                    "INSERT INTO tickets (id, title) VALUES ('needs-replica', 'w')"
                    " RETURNING pg_current_wal_insert_lsn()::text"
                ).fetchone()
            assert row is not None
            written = parse_lsn(row[0])
            wait_for(lambda: client.hget("ticket:{needs-replica}", "title"), 30, "the apply")

            def refusals() -> int:
                return sum(
                    "CDC_REDIS_MIN_REPLICAS" in str(e.get("error", ""))
                    for e in daemon.events()
                    if e.get("event") == "connection problem"
                )

            wait_for(lambda: refusals() >= 2, 60, "WAIT to fall short twice")
            assert (slot_confirmed(database_url, daemon.slot) or 0) < written
        finally:
            cluster.resume(replica)
        wait_for(
            lambda: (slot_confirmed(database_url, daemon.slot) or 0) >= written,
            60,
            "the confirmation once the replica is back",
        )
        on_replica = cluster.node(replica)
        pipe = on_replica.pipeline(transaction=False)
        pipe.execute_command("READONLY")  # type: ignore[no-untyped-call]
        pipe.hget("ticket:{needs-replica}", "title")
        assert pipe.execute()[1] == b"w"
        assert_converged(database_url, cluster.url)


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


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("cluster-tls"))


def test_cluster_over_tls_with_client_certificates(
    database_url: str,
    make_daemon: Callable[..., Daemon],
    writer: Writer,
    tmp_path: Path,
    tls_files: TlsFiles,
) -> None:
    """``rediss+cluster://`` with the CA and a client certificate in the query: every
    node speaks TLS only (clients, replication, the cluster bus) and requires the
    certificate. The daemon streams with kill -9 in between, the cache converges, and a
    ``CacheReader`` on the same URL waits for a write's token."""
    cluster = RedisCluster(tmp_path / "tls-cluster", tls=tls_files).start()
    try:
        seed(database_url)
        daemon = make_daemon(REDIS_URL=cluster.url)
        load = Workload(database_url, seed=29)
        with running(daemon):
            load.start()
            load.wait(40)
            daemon.kill()
            daemon.start()
            daemon.wait_ready(60)
            load.wait(40)
            load.stop()
            assert_converged(database_url, cluster.url)
            reader = CacheReader.connect(cluster.url)
            try:
                written = writer.create_ticket({"title": "over tls"})
                ticket = reader.ticket(written.value.id, after=written.token, timeout=30)
                assert ticket is not None
                assert ticket.title == "over tls"
            finally:
                reader.close()
        assert "ssl_keyfile" not in daemon.log()
    finally:
        cluster.stop()


def test_cluster_failover_and_failback_while_no_daemon_runs_are_repaired(
    database_url: str, make_daemon: Callable[..., Daemon], cluster_with_replicas: RedisCluster
) -> None:
    """The daemon dies with its writes on a primary only; the primary dies, its replica
    is promoted without them, the old primary comes back as its replica (losing them
    too) and takes over again by a manual failover: the same node id as before, so only
    its replication id (new at each promotion) shows what happened. The next daemon
    repairs that shard and the cache converges."""
    cluster = cluster_with_replicas
    seed(database_url)
    daemon = make_daemon(REDIS_URL=cluster.url, CDC_REDIS_TIMEOUT="1")
    load = Workload(database_url, seed=31)
    client = redis_client(cluster.url)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        victim, replica = _victim(cluster, client)
        load.start()
        load.wait(20)
        _lose_recent_writes(cluster, client, victim, replica, load, daemon.kill)
    load.stop()
    cluster.start_node(victim)  # back as the promoted replica's replica
    wait_for(lambda: victim not in cluster.primary_ports(), 30, "the old primary to rejoin")
    wait_for(cluster.synced, 60, "the old primary to resynchronize")
    cluster.node(victim).execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
    wait_for(lambda: victim in cluster.primary_ports(), 60, "the failback")
    wait_for(cluster.healthy, 60, "the cluster to be ok again")
    third = make_daemon(REDIS_URL=cluster.url)
    with running(third):
        client = redis_client(cluster.url)
        for key in list(client.scan_iter(match="junk:*")):
            client.delete(key)
        assert_converged(database_url, cluster.url)
        repairs = [e for e in third.events() if e.get("event") == "repairing the lost slots"]
    assert repairs, "the failback hid the lost writes"
