"""Reliability cases 4-8: restarts, lost Redis data, stalls, a second daemon, lost slots.

These cases restart or stall servers, so each gets servers of its own (a private
PostgreSQL cluster or redis-server in the test's directory) instead of the session's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis

from devstack.servers import PostgresServer, RedisServer
from tests.helpers import (
    ROOT,
    Daemon,
    Load,
    Monitor,
    assert_converged,
    fence,
    redis_state,
    running,
    wait_for,
)
from tests.plugins.servers import migrate

Conn = psycopg.Connection[tuple[Any, ...]]
ROWS = [f"f{i}" for i in range(30)]


@dataclass
class Stack:
    postgres: PostgresServer
    redis: RedisServer
    database_url: str
    redis_url: str


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A PostgreSQL cluster and a redis-server of this test's own (they get restarted)."""
    pg = PostgresServer(
        tmp_path / "pg", settings={"max_slot_wal_keep_size": "64MB", "wal_keep_size": "0"}
    )
    pg.start()
    rd = RedisServer(tmp_path / "redis")
    rd.start()
    try:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        migrate(pg.url("app"))
        yield Stack(pg, rd, pg.url("app"), rd.url)
    finally:
        rd.stop()
        pg.destroy()


@pytest.fixture
def stack_daemon(own_stack: Stack, make_daemon: Callable[..., Daemon]) -> Callable[..., Daemon]:
    def factory(**env: str) -> Daemon:
        return make_daemon(
            DATABASE_URL=own_stack.database_url, REDIS_URL=own_stack.redis_url, **env
        )

    return factory


def cdc(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_postgres_down_at_start_is_retried_until_it_answers(
    own_stack: Stack, stack_daemon: Callable[..., Daemon]
) -> None:
    """A refused PostgreSQL connection at start is a peer to wait for (not ready, no
    exit), and once the server is up the daemon loads and streams."""
    with psycopg.connect(own_stack.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO tickets (id, title) VALUES ('early', 'x')")
    own_stack.postgres.stop("fast")
    daemon = stack_daemon(CDC_RETRY_MAX="1").start()
    try:
        wait_for(lambda: "waiting for a peer" in daemon.log(), 30, "a retry")
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
        assert not daemon.ready()
        assert own_stack.postgres.password not in daemon.log()
        own_stack.postgres.start()
        daemon.wait_ready(60)
        assert_converged(own_stack.database_url, own_stack.redis_url)
    finally:
        daemon.stop()


# -- case 4: PostgreSQL restarts -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load(
    own_stack: Stack, stack_daemon: Callable[..., Daemon], mode: str
) -> None:
    load = Load(own_stack.database_url, ROWS).start()
    try:
        with running(stack_daemon()) as daemon:
            # The slot may rewind and resend: no _v goes back, nothing confirmed early.
            monitor = Monitor(
                own_stack.database_url, own_stack.redis_url, daemon.slot, ROWS
            ).start()
            load.wait_commits(50)
            own_stack.postgres.restart(mode)
            load.wait_commits(50)
            daemon.wait_ready()
            own_stack.postgres.restart(mode)
            load.wait_commits(50)
            load.stop()
            assert_converged(own_stack.database_url, own_stack.redis_url)
            monitor.check()
            assert load.failures >= 1  # the restarts did interrupt the writers
    finally:
        load.stop()


def test_walsender_terminated(daemon: Daemon, pg: Conn, database_url: str, redis_url: str) -> None:
    """Under write load, with I2 and I4 sampled throughout."""
    load = Load(database_url, ROWS).start()
    monitor = Monitor(database_url, redis_url, daemon.slot, ROWS).start()
    try:
        load.wait_commits(30)
        for _ in range(2):

            def walsender() -> int | None:
                row = pg.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    (daemon.slot,),
                ).fetchone()
                return row[0] if row else None

            wait_for(lambda: walsender() is not None, 30, "the walsender")
            pg.execute("SELECT pg_terminate_backend(%s)", (walsender(),))
            load.wait_commits(30)
            daemon.wait_ready()
        load.stop()
        assert_converged(database_url, redis_url)
        monitor.check()
    finally:
        load.stop()
        monitor.stop()


# -- case 5: Redis loses its data ---------------------------------------------------------------------


def test_redis_restart_without_persistence_rebuilds(
    own_stack: Stack, stack_daemon: Callable[..., Daemon]
) -> None:
    with psycopg.connect(own_stack.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'r' || g, 'x' FROM generate_series(1, 3000) g"
        )
        conn.execute(
            "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('ra', 'ra', 'R', 'h')"
        )
    load = Load(own_stack.database_url, ROWS).start()
    try:
        with running(stack_daemon(CDC_BACKFILL_CHUNK="500")) as daemon:
            load.wait_commits(30)
            own_stack.redis.restart()  # persistence is off: everything is gone
            load.wait_commits(30)
            wait_for(
                lambda: any(e.get("event") == "rebuild complete" for e in daemon.events()),
                60,
                "the rebuild",
            )
            load.stop()
            assert_converged(own_stack.database_url, own_stack.redis_url)
            events = [e["event"] for e in daemon.events()]
            assert "the cache must be rebuilt" in events
    finally:
        load.stop()


def test_flushall_is_detected_and_rebuilt(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    pg.execute(
        "INSERT INTO tickets (id, title) SELECT 'fl' || g, 'x' FROM generate_series(1, 500) g"
    )
    fence(database_url, redis_url)
    redis.Redis.from_url(redis_url).flushdb()
    pg.execute("UPDATE tickets SET title = 'after flush' WHERE id = 'fl7'")
    wait_for(
        lambda: any(e.get("event") == "rebuild complete" for e in daemon.events()),
        60,
        "the rebuild",
    )
    assert_converged(database_url, redis_url)


def test_flushall_on_a_server_nobody_writes_to_is_rebuilt(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """The rebuild's backfill windows are written once the stream passes their high
    water; with no write at all after the loss, the daemon writes that WAL itself."""
    pg.execute(
        "INSERT INTO tickets (id, title) SELECT 'idle' || g, 'x' FROM generate_series(1, 300) g"
    )
    fence(database_url, redis_url)
    redis.Redis.from_url(redis_url).flushdb()
    lost_at = time.monotonic()
    wait_for(
        lambda: any(e.get("event") == "rebuild complete" for e in daemon.events()),
        60,
        "the rebuild with no write after the loss",
    )
    print(f"rebuilt {time.monotonic() - lost_at:.2f} s after the loss")
    assert_converged(database_url, redis_url, fence_first=False)


def test_redis_behind_the_slot_is_rebuilt(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """Redis restored from an old backup: its checkpoint is behind what PostgreSQL confirmed."""
    with running(make_daemon()):
        pg.execute("INSERT INTO tickets (id, title) VALUES ('old', 'x')")
        fence(database_url, redis_url)
        client = redis.Redis.from_url(redis_url)
        backup = {k: client.dump(k) for k in client.keys("*")}
        pg.execute("INSERT INTO tickets (id, title) VALUES ('new', 'y')")
        pg.execute("UPDATE tickets SET title = 'changed' WHERE id = 'old'")
        fence(database_url, redis_url)
    client.flushdb()
    for key, value in backup.items():
        client.restore(key, 0, value)  # type: ignore[arg-type]
    with running(make_daemon()) as daemon:
        # The rebuild is online: rows come back as its backfill windows land.
        wait_for(lambda: not redis_state(redis_url).get("rebuild"), 60, "the rebuild to end")
        assert_converged(database_url, redis_url)
        assert any("behind" in str(e.get("reason", "")) for e in daemon.events())


# -- case 6: stalled peers ------------------------------------------------------------------------------


def test_redis_stalled_then_resumed(own_stack: Stack, stack_daemon: Callable[..., Daemon]) -> None:
    load = Load(own_stack.database_url, ROWS).start()
    try:
        with running(stack_daemon()) as daemon:
            load.wait_commits(30)
            own_stack.redis.signal(signal.SIGSTOP)
            wait_for(lambda: not daemon.ready(), 30, "the daemon to notice")
            wait_for(
                lambda: daemon.metric("cdc_connected", 'target="redis"') == 0, 30, "redis down"
            )
            load.wait_commits(30)
            # Nothing is confirmed while Redis is stalled: the lag grows with the writes.
            wait_for(
                lambda: (daemon.metric("cdc_replication_lag_bytes") or 0) > 0, 30, "lag to grow"
            )
            own_stack.redis.signal(signal.SIGCONT)
            daemon.wait_ready()
            assert daemon.metric("cdc_connected", 'target="redis"') == 1
            load.stop()
            assert_converged(own_stack.database_url, own_stack.redis_url)
    finally:
        own_stack.redis.signal(signal.SIGCONT)
        load.stop()


def test_postgres_stalled_then_resumed(
    own_stack: Stack, stack_daemon: Callable[..., Daemon]
) -> None:
    with running(stack_daemon(CDC_PG_TIMEOUT="2")) as daemon:
        with psycopg.connect(own_stack.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO tickets (id, title) VALUES ('s1', 'x')")
        fence(own_stack.database_url, own_stack.redis_url)
        pid = own_stack.postgres.pid
        assert pid is not None
        processes = [psutil.Process(pid), *psutil.Process(pid).children()]
        for process in processes:
            process.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not daemon.ready(), 30, "the daemon to notice the stall")
        finally:
            for process in processes:
                process.send_signal(signal.SIGCONT)
        with psycopg.connect(own_stack.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO tickets (id, title) VALUES ('s2', 'y')")
        daemon.wait_ready()
        assert_converged(own_stack.database_url, own_stack.redis_url)


# -- case 7: a second daemon ----------------------------------------------------------------------------


def test_standby_takes_over(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    first = make_daemon().start().wait_ready()
    standby = make_daemon(CDC_STANDBY="true").start()
    wait_for(lambda: "standby" in standby.log(), 30, "the standby to wait")
    pg.execute("INSERT INTO tickets (id, title) VALUES ('one', 'x')")
    fence(database_url, redis_url)
    assert not standby.ready()
    owner = redis_state(redis_url)["owner"]
    assert owner.endswith(f":{first.pid}")
    assert first.stop() == 0
    standby.wait_ready()
    pg.execute("INSERT INTO tickets (id, title) VALUES ('two', 'y')")
    assert_converged(database_url, redis_url)
    assert redis_state(redis_url)["owner"].endswith(f":{standby.pid}")


def test_standby_takes_over_after_kill_9(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """kill -9 of the active daemon: the standby, watching the slot on one catalog
    session, acquires it and serves (bench/takeover.py measures how soon)."""
    first = make_daemon(CDC_STANDBY="true").start().wait_ready()
    standby = make_daemon(CDC_STANDBY="true").start()
    wait_for(lambda: "standby: waiting for the slot" in standby.log(), 30, "the standby")
    load = Load(database_url, ROWS).start()
    try:
        load.wait_commits(10)
        first.kill()
        standby.wait_ready()
        load.wait_commits(10)
    finally:
        load.stop()
    assert_converged(database_url, redis_url)
    assert redis_state(redis_url)["owner"].endswith(f":{standby.pid}")


def test_paused_daemon_cannot_overwrite_after_a_takeover(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    zombie = make_daemon().start().wait_ready()
    pg.execute("INSERT INTO tickets (id, title) VALUES ('z', 'v1')")
    fence(database_url, redis_url)
    os.kill(zombie.pid, signal.SIGSTOP)
    try:
        # Its connection dies (as it would after wal_sender_timeout); a new daemon takes over.
        pid = pg.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (zombie.slot,)
        ).fetchone()
        assert pid is not None
        pg.execute("SELECT pg_terminate_backend(%s)", (pid[0],))
        successor = make_daemon().start().wait_ready()
        pg.execute("UPDATE tickets SET title = 'v2' WHERE id = 'z'")
        fence(database_url, redis_url)
    finally:
        os.kill(zombie.pid, signal.SIGCONT)
    # The zombie wakes with its old session: it must not write (fenced), then give up the slot fight.
    code = zombie.wait_exit(60)
    assert code == 2, zombie.log()
    pg.execute("UPDATE tickets SET title = 'v3' WHERE id = 'z'")
    assert_converged(database_url, redis_url)
    assert redis.Redis.from_url(redis_url).hget("ticket:{z}", "title") == b"v3"
    assert redis_state(redis_url)["owner"].endswith(f":{successor.pid}")


# -- case 8: the slot is lost --------------------------------------------------------------------------


def test_slot_dropped_while_down_then_reset(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str, slot_name: str
) -> None:
    with running(make_daemon()):
        pg.execute("INSERT INTO tickets (id, title) VALUES ('k1', 'x')")
        fence(database_url, redis_url)
    pg.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
    pg.execute("INSERT INTO tickets (id, title) VALUES ('k2', 'missed by the cache')")
    pg.execute("DELETE FROM tickets WHERE id = 'k1'")
    refused = make_daemon().start()
    assert refused.wait_exit(60) == 2
    assert 'run "cdc slot reset"' in refused.log().splitlines()[-1]
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "CDC_SLOT": slot_name}
    done = cdc("slot", "reset", "--yes", env=env)
    assert done.returncode == 0, done.stderr
    assert "loaded" in done.stdout
    with running(make_daemon()):
        assert_converged(database_url, redis_url)
        assert redis.Redis.from_url(redis_url).exists("ticket:{k1}") == 0


def test_invalidated_slot_is_recreated(
    own_stack: Stack, stack_daemon: Callable[..., Daemon]
) -> None:
    url = own_stack.database_url
    with running(stack_daemon()):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO tickets (id, title) VALUES ('i1', 'x')")
        fence(url, own_stack.redis_url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO tickets (id, title) VALUES ('i2', 'while down')")
        # More WAL than max_slot_wal_keep_size (64MB), then checkpoints: the slot is lost.
        for _ in range(6):
            conn.execute(
                "INSERT INTO audit_logs (event_type, details)"
                " SELECT 'filler', jsonb_build_object('pad', repeat(md5(g::text), 64)) FROM generate_series(1, 5000) g"
            )
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        status = conn.execute("SELECT wal_status FROM pg_replication_slots").fetchone()
        assert status == ("lost",)
    with running(stack_daemon()) as daemon:
        assert_converged(url, own_stack.redis_url)
        assert any("invalidated" in str(e.get("event", "")) for e in daemon.events())
        assert daemon.metric("cdc_rebuilds_total", 'reason="slot_invalidated"') == 1
