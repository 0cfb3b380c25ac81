"""Timeouts everywhere (reliability case 20; issue 7 item 7).

A daemon query waiting behind an ``ACCESS EXCLUSIVE`` lock on a tracked table times out
(``CDC_LOCK_TIMEOUT``) and is retried later while the other table keeps streaming; the
writer's waits and the cache reader's Redis socket are bounded too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis

from tests.helpers import Daemon, assert_converged, redis_state, running, wait_for
from writer import CacheReader
from writer.db import Database
from writer.errors import OutcomeUnknown

Conn = psycopg.Connection[tuple[Any, ...]]


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def locked(database_url: str, table: str) -> Iterator[Conn]:
    """A session holding ACCESS EXCLUSIVE on ``table`` until the block ends."""
    with psycopg.connect(database_url) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield conn
        finally:
            conn.rollback()


def _version(raw: bytes) -> int:
    """``_v`` (an LSN, ``X/Y``) as a number."""
    high, _, low = raw.decode().partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def test_a_query_behind_an_access_exclusive_lock_times_out_and_the_stream_goes_on(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """Case 20: the backfill after ADD COLUMN on tickets waits behind a lock; agents stream."""
    for i in range(20):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'before')", (f"t{i}",))
    for i in range(3):
        pg.execute(
            "INSERT INTO agents (id, username, display_name, password_hash)"
            " VALUES (%s, %s, 'A', 'h')",
            (f"a{i}", f"agent{i}"),
        )
    client = redis.Redis.from_url(redis_url)
    with running(make_daemon(CDC_LOCK_TIMEOUT="0.3")) as daemon:
        assert_converged(database_url, redis_url)
        with contextlib.ExitStack() as lock:
            # Paused, so that the daemon cannot re-read tickets before the lock is taken.
            with paused(daemon.pid):
                pg.execute("ALTER TABLE tickets ADD COLUMN region text NOT NULL DEFAULT 'eu'")
                lock.enter_context(locked(database_url, "tickets"))

            def tried() -> bool:
                waiting = pg.execute(
                    "SELECT count(*) FROM pg_locks WHERE relation = 'tickets'::regclass"
                    " AND NOT granted"
                ).fetchone()
                return waiting != (0,) or "backfill query timed out" in daemon.log()

            wait_for(tried, 30, "the daemon's backfill to wait for the lock")
            # While tickets stays locked, agents' changes keep arriving, each in one piece.
            previous: dict[str, int] = {}
            for round_ in range(1, 6):
                with psycopg.connect(database_url) as other, other.transaction():
                    for i in range(3):
                        other.execute(
                            "UPDATE agents SET display_name = %s, updated_at = now() WHERE id = %s",
                            (f"round-{round_}", f"a{i}"),
                        )

                def arrived(expected: str = f"round-{round_}") -> bool:
                    pipe = client.pipeline(transaction=True)
                    for i in range(3):
                        pipe.hgetall(f"agent:{{a{i}}}")
                    hashes = pipe.execute()
                    names = {h.get(b"display_name") for h in hashes}
                    # Whole transactions: all three or none of the new round.
                    assert len(names) == 1, f"a transaction seen in part: {names}"
                    for i, fields in enumerate(hashes):
                        version = _version(fields[b"_v"])
                        assert version >= previous.get(f"a{i}", 0), "_v went back"
                        previous[f"a{i}"] = version
                    return names == {expected.encode()}

                wait_for(arrived, 30, f"agents round {round_} while tickets is locked")
            held = pg.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = 'tickets'::regclass"
                " AND mode = 'AccessExclusiveLock' AND granted"
            ).fetchone()
            assert held == (1,)
            assert client.hget("ticket:{t3}", "region") is None  # not backfilled yet
            assert "backfill query timed out" in daemon.log()
        # Released: the retried backfill carries the new column to every ticket.
        wait_for(lambda: client.hget("ticket:{t3}", "region") == b"eu", 30, "the backfill")
        assert_converged(database_url, redis_url)
        assert daemon.proc is not None
        assert daemon.proc.poll() is None


def test_a_rebuild_with_a_locked_table_streams_and_loads_it_once_free(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """Redis loses its data while tickets is locked: the online rebuild's backfill of tickets
    times out and is retried; agents are rebuilt and keep streaming meanwhile.

    (A first start cannot be tried this way: creating a slot waits for every transaction
    holding an xid to end, the locking one included.)"""
    for i in range(10):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'before')", (f"t{i}",))
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('a', 'a', 'A', 'h')"
    )
    assert_converged(database_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    with locked(database_url, "tickets"):
        client.flushdb()  # Redis lost everything
        pg.execute("UPDATE agents SET display_name = 'while locked' WHERE id = 'a'")
        wait_for(
            lambda: client.hget("agent:{a}", "display_name") == b"while locked",
            60,
            "agents streaming while tickets is locked",
        )
        wait_for(lambda: "backfill query timed out" in daemon.log(), 30, "a timed-out backfill")
        assert redis_state(redis_url).get("rebuild")  # still rebuilding: tickets is not loaded
    assert_converged(database_url, redis_url)


def test_the_writer_gives_up_on_a_server_that_does_not_answer(database_url: str) -> None:
    db = Database(database_url, min_size=1, max_size=1)
    db.open()
    try:
        (row,) = db.read("SELECT pg_backend_pid() AS pid", {})
        db.wait_timeout = 0.5
        with paused(int(row["pid"])), pytest.raises(OutcomeUnknown):
            db.write("ticket", "INSERT INTO tickets (id, title) VALUES ('w', 'w')", {})
        # The abandoned connection is replaced; the next write works.
        db.wait_timeout = 30
        fence_rows, token = db.write(
            "ticket", "INSERT INTO tickets (id, title) VALUES ('w2', 'w') RETURNING id", {}
        )
        assert fence_rows == [{"id": "w2"}]
        assert token
    finally:
        db.close()


def test_the_cache_reader_gives_up_on_a_redis_that_does_not_answer() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing ever answers
    try:
        port = silent.getsockname()[1]
        reader = CacheReader.connect(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5)
        with pytest.raises(redis.TimeoutError):
            reader.applied_position()
    finally:
        silent.close()
