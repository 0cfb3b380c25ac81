"""Failover times: how soon the daemon serves again after Redis or PostgreSQL fails over.

Three setups, each run on fresh servers (those of the tests) while a writer commits one
small row update every ~10 ms and the daemon streams (``tests.helpers.Daemon``, with the
tests' settings: printed at the start, ``CDC_RETRY_MAX`` bounds the daemon's reconnect
backoff):

1. Redis Sentinel (``devstack.redis_ha.SentinelGroup``: a master, one replica, three
   Sentinels). ``kill -9`` of the master, and at once a marker row is committed. From the
   kill: when the replica answers ``ROLE`` master (the Sentinels promoted it: their
   ``down-after-milliseconds`` dominates), when a Sentinel names it as the master, and
   when the marker is on it (read from the new master); from the promotion and from the
   naming (the daemon finds the master through the Sentinels) to that: the daemon's part.
2. PostgreSQL 18, a primary and a physical standby with slot synchronization (the
   daemon's slot is a failover slot, the primary has ``synchronized_standby_slots``:
   ``tests.plugins.servers.PostgresPair``); the daemon's ``DATABASE_URL`` names both with
   ``target_session_attrs=read-write``. The primary is stopped (``immediate``) once the
   standby's copy of the slot is synchronized, the standby promoted (``pg_ctl promote
   -w``; the promotion is when its ``pg_is_in_recovery()`` turns false), and a marker
   committed on it through the same URL. From the promotion: when the marker committed
   and when it is in Redis; and whether the daemon rebuilt (it logs "the cache must be
   rebuilt", ``cdc_rebuilds_total``).
3. Redis Cluster, 3 primaries + 3 replicas (``tests.cluster.RedisCluster``). ``kill -9``
   of a primary that does not hold ``cdc:state``, and at once a marker whose key is in
   that primary's slots is committed. From the kill: when its replica is a primary
   (``cluster-node-timeout`` dominates; should the election stall, the replica is
   promoted with ``CLUSTER FAILOVER TAKEOVER`` and the run says so), when the marker is
   on it, and when the daemon logged "repairing the lost slots" (it repairs the slots of
   a new primary: a promoted replica may lack the latest writes; the event is logged
   once the repair is done).

Benchmarks measure and print; nothing here asserts beyond sanity. Slow (fresh servers
per run), so not part of ``make bench`` (bench/all.py). Run::

    PYTHONPATH=. .venv/bin/python -m bench.failover [runs] [sentinel] [pg] [cluster]

(5 runs of every setup by default).

What dominates (figures are the medians below). Sentinel: ``down-after-milliseconds``
(1000, SentinelGroup's default) then the Sentinels' vote promote the replica ~1.4 s after
the kill, and a Sentinel names it ~0.8 s later still (it switches once the promoted
replica reports role master in its INFO, polled about every second during a failover).
The daemon finds the master through the Sentinels: its own part, from "named" to the
marker on the new master, is 0.14 s (up to ~0.9 s: its reconnect backoff, 0.2 s doubling
up to ``CDC_RETRY_MAX``, 1 s here as in the tests, 30 s by default). PostgreSQL: the
standby is out of recovery ~0.14 s after the immediate stop (``pg_ctl promote -w``
returns ~0.08 s after that: it polls); the marker committed on it is in Redis ~0.09 s
after the promotion, with no rebuild (timeline 2, epoch 1: the daemon resumed from the
standby's synchronized copy of the failover slot). Cluster: ``cluster-node-timeout``
(2000 ms, failure detection) plus the replica's election delay (0.5 s + up to 0.5 s
random, then the votes) promote it ~4.3 s after the kill, and with
``cluster-require-full-coverage yes`` no shard takes writes meanwhile; the marker is on
it ~0.5 s after the promotion. The batch holding the marker usually reaches the new
primary through redis-py's own retry before the daemon sees the primaries changed (it
then starts a new session whose claim repairs the new primary's slots: logged ~0.4-0.9 s
after the marker); in one run of five the repair came first and the marker right after.

Measured on 2026-12-02, 2 shared cores (5 runs each)::

    daemon: CDC_RETRY_MAX=1, CDC_REDIS_TIMEOUT=2, CDC_PG_TIMEOUT=10, CDC_STATUS_INTERVAL=0.2
    writer: one row update every ~10 ms

    Redis Sentinel: a master, a replica, 3 Sentinels (quorum 2),
    down-after-milliseconds 1000, failover-timeout 3000. Seconds from the kill -9 of the master
    until: the replica says ROLE master (promoted), a Sentinel names it (named),
    the marker is on it (visible); and from promoted, from named to visible:
    sentinel     promoted      named    visible  prom->vis named->vis
    run 1           1.355      2.171      2.308      0.953      0.136
    run 2           1.392      2.205      2.344      0.952      0.139
    run 3           1.390      2.170      2.764      1.374      0.594
    run 4           1.325      2.124      2.261      0.936      0.138
    run 5           1.406      2.248      3.195      1.788      0.947
    median          1.390      2.171      2.344      0.953      0.139

    PostgreSQL 18: a primary and a physical standby, sync_replication_slots=on,
    synchronized_standby_slots=standby1; DATABASE_URL: both hosts, target_session_attrs=read-write,
    connect_timeout=3. Seconds from the immediate stop of the primary until the standby
    is promoted (pg_is_in_recovery false); from then until pg_ctl promote -w returned, the
    marker committed on the new primary, the marker visible in Redis (rebuilds:
    the daemon's rebuild events / cdc_rebuilds_total):
    pg           promoted     pg_ctl  committed    visible
    run 1           0.134      0.082      0.012      0.083  rebuilds 0/0, timeline 2, epoch 1
    run 2           0.125      0.092      0.017      0.093  rebuilds 0/0, timeline 2, epoch 1
    run 3           0.136      0.081      0.012      0.098  rebuilds 0/0, timeline 2, epoch 1
    run 4           0.136      0.080      0.013      0.080  rebuilds 0/0, timeline 2, epoch 1
    run 5           0.163      0.075      0.015      0.087  rebuilds 0/0, timeline 2, epoch 1
    median          0.136      0.081      0.013      0.087

    Redis Cluster: 3 primaries + 3 replicas, cluster-node-timeout 2000 ms,
    cluster-require-full-coverage yes. Seconds from the kill -9 of a primary (not cdc:state's)
    until: its replica says ROLE master (promoted), the marker is on it (visible),
    the daemon logged 'repairing the lost slots' (repaired); and from promoted to visible:
    cluster      promoted    visible   repaired  prom->vis
    run 1           4.250      5.661      5.659      1.411
    run 2           3.749      4.263      5.151      0.513
    run 3           4.257      4.720      5.356      0.463
    run 4           4.539      5.135      5.931      0.596
    run 5           4.738      5.178      5.621      0.440
    median          4.257      5.135      5.621      0.513
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench.common import Stack, stack
from devstack.redis_ha import SentinelGroup
from devstack.servers import PostgresServer, postgres_bin_dir
from schema.redis_url import redis_client
from tests.cluster import RedisCluster, replica_of
from tests.helpers import Daemon, fence, redis_state, running, wait_for
from tests.plugins.servers import PostgresPair, migrate
from tests.test_pg_failover import rebuild_events

Conn = psycopg.Connection[tuple[Any, ...]]
POLL = 0.005  # seconds between two looks at the servers
DEADLINE = 120.0  # seconds a run may take from the kill before it is given up


class Ticker:
    """One small row update committed every ``interval`` seconds until stopped (it
    reconnects: through a multi-host URL, to whichever server takes writes)."""

    def __init__(self, url: str, interval: float = 0.01) -> None:
        self.url = url
        self.interval = interval
        self.commits = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def wait(self, more: int, timeout: float = 60.0) -> None:
        target = self.commits + more
        wait_for(lambda: self.commits >= target, timeout, f"{more} more commits")

    def _run(self) -> None:
        conn: Conn | None = None
        n = 0
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                n += 1
                conn.execute(
                    "INSERT INTO tickets (id, title) VALUES (%s, %s) ON CONFLICT (id)"
                    " DO UPDATE SET title = EXCLUDED.title, updated_at = now()",
                    (f"tick{n % 20}", str(n)),
                )
                self.commits += 1
            except psycopg.Error:
                self.failures += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                self._stop.wait(0.1)
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[Ticker]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(30)


def insert(conn: Conn, row: str) -> None:
    conn.execute("INSERT INTO tickets (id, title) VALUES (%s, 'marker')", (row,))


def commit_marker(url: str, row: str, timeout: float = 60.0) -> float:
    """Insert ``row`` through ``url``, retrying until a server takes it; when it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
                insert(conn, row)
            return time.monotonic()
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def key(row: str) -> str:
    return "ticket:{" + row + "}"


def has(node: redis.Redis, row: str) -> bool:
    """The row's key is on this node (a cluster replica answers MOVED: not yet)."""
    try:
        return bool(node.exists(key(row)))
    except redis.RedisError:
        return False


def is_master(node: redis.Redis) -> bool:
    try:
        role: Any = node.execute_command("ROLE")  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return False
    return role[0] in (b"master", "master")


def names(watcher: redis.Redis, master: str, port: int) -> bool:
    """This Sentinel names ``port`` as the master (it switched over)."""
    try:
        found: Any = watcher.sentinel_get_master_addr_by_name(master)
    except redis.RedisError:
        return False
    return bool(found) and int(found[1]) == port


def drop_slot(url: str, slot: str) -> None:
    """Drop the run's replication slot once its daemon is gone (the next run has its own)."""

    def inactive() -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            found = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if found is None:
                return True
            if found[0]:
                return False
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        return True

    wait_for(inactive, 30, f"slot {slot} to be released")


def daemon_settings() -> str:
    """What the tests' :class:`Daemon` sets that bears on a failover."""
    env = Daemon("", "", "", Path(os.devnull)).environment()
    names = ("CDC_RETRY_MAX", "CDC_REDIS_TIMEOUT", "CDC_PG_TIMEOUT", "CDC_STATUS_INTERVAL")
    return ", ".join(f"{n}={env[n]}" for n in names)


def since(start: float, end: float) -> float | None:
    """Seconds from ``start`` to ``end`` (None: one of them never happened)."""
    return end - start if start and end else None


class Table:
    """Each run a row of seconds as it ends, then the medians."""

    def __init__(self, name: str, headers: list[str]) -> None:
        self.name = name
        self.headers = headers
        self.rows: list[list[float | None]] = []
        print(f"{name:<10}" + "".join(f"{h:>11}" for h in headers), flush=True)

    def add(self, values: list[float | None], note: str = "") -> None:
        self.rows.append(values)
        cells = "".join(f"{v:>11.3f}" if v is not None else f"{'n/a':>11}" for v in values)
        print(f"{'run ' + str(len(self.rows)):<10}{cells}{'  ' + note if note else ''}", flush=True)

    def medians(self) -> None:
        cells = ""
        for column in zip(*self.rows, strict=True):
            found = [v for v in column if v is not None]
            cells += f"{statistics.median(found):>11.3f}" if found else f"{'n/a':>11}"
        print(f"{'median':<10}{cells}", flush=True)


# -- 1. Redis Sentinel ------------------------------------------------------------------------


def sentinel(s: Stack, runs: int) -> None:
    table: Table | None = None
    for n in range(runs):
        slot = f"bench_failover_sentinel_{n}"
        with SentinelGroup(s.directory / f"sentinel-{n}").running() as group:
            if n == 0:
                watcher = group.watcher(group.watchers[0].port)
                master: Any = watcher.sentinel_master(group.master_name)
                watcher.close()
                print(
                    f"\nRedis Sentinel: a master, a replica, {len(group.watchers)} Sentinels"
                    f" (quorum {master['quorum']}),\ndown-after-milliseconds"
                    f" {master['down-after-milliseconds']}, failover-timeout"
                    f" {master['failover-timeout']}. Seconds from the kill -9 of the master\n"
                    "until: the replica says ROLE master (promoted), a Sentinel names it"
                    " (named),\nthe marker is on it (visible); and from promoted, from named"
                    " to visible:",
                    flush=True,
                )
                table = Table(
                    "sentinel", ["promoted", "named", "visible", "prom->vis", "named->vis"]
                )
            daemon = Daemon(s.database_url, group.url(), slot, s.directory / f"{slot}.log")
            with (
                running(daemon),
                Ticker(s.database_url).running() as ticker,
                psycopg.connect(s.database_url, autocommit=True) as conn,
            ):
                fence(s.database_url, group.master_url())
                ticker.wait(50)
                old = group.master_port()
                (replica_port,) = group.replica_ports()
                replica = group.node(replica_port, socket_timeout=1)
                watchers = [group.watcher(w.port, socket_timeout=1) for w in group.watchers]
                marker = f"sentinel-marker-{n}"
                killed = time.monotonic()
                group.nodes[old].kill()
                insert(conn, marker)
                promoted = announced = seen = 0.0
                while not seen and time.monotonic() < killed + DEADLINE:
                    now = time.monotonic()
                    if not promoted and is_master(replica):
                        promoted = now
                    if not announced and any(
                        names(w, group.master_name, replica_port) for w in watchers
                    ):
                        announced = now
                    if promoted and has(replica, marker):
                        seen = now
                    time.sleep(POLL)
                for client in (replica, *watchers):
                    client.close()
                ticker.wait(20)  # the writes go on
            assert table is not None
            table.add(
                [
                    since(killed, promoted),
                    since(killed, announced),
                    since(killed, seen),
                    since(promoted, seen),
                    since(announced, seen),
                ]
            )
        drop_slot(s.database_url, slot)
    assert table is not None
    table.medians()


# -- 2. PostgreSQL 18 promotion with failover slots -------------------------------------------


@contextlib.contextmanager
def postgres_pair(s: Stack, n: int) -> Iterator[PostgresPair]:
    """As the tests' ``postgres_pair(18)`` fixture: a primary, a migrated ``app``
    database, a standby synchronizing failover slots (``synchronized_standby_slots``)."""
    base = s.directory / f"pair-{n}"
    primary = PostgresServer(base / "pg18-primary", bin_dir=postgres_bin_dir(18))
    standby: PostgresServer | None = None
    primary.start()
    try:
        with psycopg.connect(primary.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        migrate(primary.url("app"))
        standby = primary.standby(base / "pg18-standby", synchronized=True)
        yield PostgresPair(primary, standby)
    finally:
        if standby is not None:
            standby.destroy()
        primary.destroy()
        shutil.rmtree(base, ignore_errors=True)


def promote(server: PostgresServer, returned: list[float]) -> None:
    """``pg_ctl promote -w``; when it returned."""
    server.promote()
    returned.append(time.monotonic())


def pg(s: Stack, runs: int) -> None:
    flush = redis.Redis.from_url(s.redis_url)
    slot = "bench_failover_pg"
    print(
        "\nPostgreSQL 18: a primary and a physical standby, sync_replication_slots=on,"
        "\nsynchronized_standby_slots=standby1; DATABASE_URL: both hosts,"
        " target_session_attrs=read-write,\nconnect_timeout=3. Seconds from the immediate"
        " stop of the primary until the standby\nis promoted (pg_is_in_recovery false);"
        " from then until pg_ctl promote -w returned, the\nmarker committed on the new"
        " primary, the marker visible in Redis (rebuilds:\nthe daemon's rebuild events /"
        " cdc_rebuilds_total):",
        flush=True,
    )
    table = Table("pg", ["promoted", "pg_ctl", "committed", "visible"])
    for n in range(runs):
        flush.flushall()  # a new pair: a new cache
        with postgres_pair(s, n) as pair:
            url = pair.url()
            daemon = Daemon(url, s.redis_url, slot, s.directory / f"{slot}-{n}.log")
            with running(daemon), Ticker(url).running() as ticker:
                fence(url, s.redis_url)
                ticker.wait(50)
                pair.wait_synced(slot)
                ticker.wait(20)
                standby = psycopg.connect(pair.standby.url("app"), autocommit=True)
                stopped = time.monotonic()
                pair.primary.stop("immediate")
                # pg_ctl promote -w polls too: the standby itself says when it is promoted.
                returned: list[float] = []
                promoter = threading.Thread(target=promote, args=(pair.standby, returned))
                promoter.start()
                promoted = 0.0
                while not promoted and time.monotonic() < stopped + DEADLINE:
                    row = standby.execute("SELECT pg_is_in_recovery()").fetchone()
                    if row is not None and not row[0]:
                        promoted = time.monotonic()
                    time.sleep(POLL)
                standby.close()
                marker = f"pg-marker-{n}"
                committed = commit_marker(url, marker)
                promoter.join(60)
                seen = 0.0
                while not seen and time.monotonic() < promoted + DEADLINE:
                    if has(flush, marker):
                        seen = time.monotonic()
                    time.sleep(POLL)
                ticker.wait(20)
                rebuilt = len(rebuild_events(daemon))
                counted = sum(
                    daemon.metric("cdc_rebuilds_total", f'reason="{reason}"') or 0
                    for reason in ("promotion", "slot_lost", "cache_lost")
                )
                state = redis_state(s.redis_url)
            table.add(
                [
                    since(stopped, promoted),
                    since(promoted, returned[0] if returned else 0.0),
                    since(promoted, committed),
                    since(promoted, seen),
                ],
                f"rebuilds {rebuilt}/{counted:g}, timeline {state.get('timeline')},"
                f" epoch {state.get('epoch')}",
            )
    flush.close()
    table.medians()


# -- 3. Redis Cluster -------------------------------------------------------------------------


def repaired_at(daemon: Daemon, after: float, timeout: float = 60.0) -> float:
    """The wall-clock time the daemon logged "repairing the lost slots" (0: it did not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in daemon.events():
            if event.get("event") == "repairing the lost slots":
                at = datetime.fromisoformat(event["timestamp"]).timestamp()
                if at >= after:
                    return at
        time.sleep(0.1)
    return 0.0


def cluster(s: Stack, runs: int) -> None:
    table: Table | None = None
    for n in range(runs):
        slot = f"bench_failover_cluster_{n}"
        nodes = RedisCluster(s.directory / f"cluster-{n}", primaries=3, replicas=1).start()
        try:
            wait_for(nodes.synced, 60, "replicas in sync")
            if n == 0:
                found: Any = nodes.node(nodes.ports[0]).config_get("cluster-node-timeout")
                print(
                    "\nRedis Cluster: 3 primaries + 3 replicas, cluster-node-timeout"
                    f" {found['cluster-node-timeout']} ms,\ncluster-require-full-coverage yes."
                    " Seconds from the kill -9 of a primary (not cdc:state's)\nuntil: its"
                    " replica says ROLE master (promoted), the marker is on it (visible),"
                    "\nthe daemon logged 'repairing the lost slots' (repaired); and from"
                    " promoted to visible:",
                    flush=True,
                )
                table = Table("cluster", ["promoted", "visible", "repaired", "prom->vis"])
            client: Any = redis_client(nodes.url)
            daemon = Daemon(s.database_url, nodes.url, slot, s.directory / f"{slot}.log")
            with (
                running(daemon),
                Ticker(s.database_url).running() as ticker,
                psycopg.connect(s.database_url, autocommit=True) as conn,
            ):
                fence(s.database_url, nodes.url)
                ticker.wait(50)
                state_port = client.get_node_from_key("cdc:state").port
                victim = next(p for p in nodes.primary_ports() if p != state_port)
                replica_port = replica_of(victim)
                marker = next(
                    m
                    for m in (f"cluster-marker-{n}-{i}" for i in range(100_000))
                    if client.get_node_from_key(key(m)).port == victim
                )
                client.close()
                replica = redis.Redis(host="127.0.0.1", port=replica_port, socket_timeout=1)
                killed_wall, killed = time.time(), time.monotonic()
                nodes.kill(victim)
                insert(conn, marker)
                promoted = seen = 0.0
                took_over = False
                while not seen and time.monotonic() < killed + DEADLINE:
                    now = time.monotonic()
                    if not promoted and is_master(replica):
                        promoted = now
                    if promoted and has(replica, marker):
                        seen = now
                    if not promoted and not took_over and now > killed + 15:
                        # As tests/test_cluster.py: an operator's takeover if it stalls.
                        replica.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")  # type: ignore[no-untyped-call]
                        took_over = True
                    time.sleep(POLL)
                repaired = repaired_at(daemon, killed_wall)
                replica.close()
                ticker.wait(20)
            assert table is not None
            table.add(
                [
                    since(killed, promoted),
                    since(killed, seen),
                    since(killed_wall, repaired),
                    since(promoted, seen),
                ],
                "promoted by CLUSTER FAILOVER TAKEOVER" if took_over else "",
            )
        finally:
            nodes.stop()
        drop_slot(s.database_url, slot)
    assert table is not None
    table.medians()


SETUPS: dict[str, Callable[[Stack, int], None]] = {
    "sentinel": sentinel,
    "pg": pg,
    "cluster": cluster,
}


def main() -> None:
    args = sys.argv[1:]
    runs = int(next((a for a in args if a.isdigit()), "5"))
    names = [a for a in args if not a.isdigit()] or list(SETUPS)
    print(f"daemon: {daemon_settings()}\nwriter: one row update every ~10 ms", flush=True)
    with stack() as s:
        for name in names:
            SETUPS[name](s, runs)


if __name__ == "__main__":
    main()
