"""Streamed in-progress transactions (pgoutput protocol 2, PostgreSQL 14+): cdc/streams.py.

The walsender decodes with 64 kB of memory (``logical_decoding_work_mem``), so every
transaction of more than a few hundred rows is streamed while it runs. The server must
not spill (``spill_bytes`` stays 0, ``stream_bytes`` grows), the daemon applies each
streamed transaction whole at its commit, drops aborted subtransactions and aborted
transactions, and cleans its own spill files.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from schema.lsn import parse_lsn
from tests.helpers import Daemon, assert_converged, fence, redis_state, wait_for

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def streaming_db(pg: Conn, database_name: str) -> Conn:
    if pg.info.server_version < 140000:
        pytest.skip("streaming needs PostgreSQL 14+")
    pg.execute(f"ALTER DATABASE \"{database_name}\" SET logical_decoding_work_mem = '64kB'")
    return pg


def slot_stats(pg: Conn, slot: str) -> tuple[int, int]:
    row = pg.execute(
        "SELECT spill_bytes, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def spill_files(state: Path) -> list[Path]:
    return sorted(state.glob("*.spill")) if state.exists() else []


def test_large_transaction_is_streamed_and_applied_whole(
    make_daemon: Callable[..., Daemon],
    streaming_db: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
    tmp_path: Path,
) -> None:
    rows = 200_000
    state = tmp_path / "state"
    daemon = make_daemon(
        CDC_STATE_DIR=str(state),
        CDC_STREAM_MEMORY=str(4 << 20),  # part in memory, the rest in the spill file
        CDC_BATCH_MAX_CHANGES=str(rows + 10),
        CDC_BATCH_MAX_BYTES=str(512 << 20),
    )
    daemon.start().wait_ready()
    client = redis.Redis.from_url(redis_url)
    sampled = [f"ticket:{{s{i}}}" for i in range(1, rows + 1, rows // 50)] + [f"ticket:{{s{rows}}}"]
    partial: list[int] = []
    seen_whole = threading.Event()
    stop = threading.Event()

    def reader() -> None:
        # I3: a reader (MULTI) sees none of the transaction or all of it.
        r = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            pipe = r.pipeline(transaction=True)
            for key in sampled:
                pipe.exists(key)
            present = sum(pipe.execute())
            if present == len(sampled):
                seen_whole.set()
                return
            if present:
                partial.append(present)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "INSERT INTO tickets (id, title, status) SELECT 's' || g, 'row ' || g, 'open'"
                " FROM generate_series(1, %s) g",
                (rows,),
            )
            # Streamed while it runs: the daemon holds it, nothing is visible yet.
            wait_for(lambda: slot_stats(streaming_db, slot_name)[1] > 0, 60, "stream_bytes")
            wait_for(lambda: spill_files(state), 60, "the daemon's spill file")
            fence(database_url, redis_url)
            assert client.exists(f"ticket:{{s{rows}}}", "ticket:{s1}") == 0
        wait_for(seen_whole.is_set, 300, "the streamed transaction in Redis")
    finally:
        stop.set()
        thread.join(10)
    assert not partial, f"a reader saw part of the transaction: {partial[:5]}"
    counts = assert_converged(database_url, redis_url)
    assert counts["tickets"] == rows + 1
    spill, stream = slot_stats(streaming_db, slot_name)
    assert spill == 0
    assert stream > 0
    assert spill_files(state) == []
    assert daemon.stop() == 0


@pytest.mark.parametrize("memory", ["0", str(64 << 20)])
def test_subtransaction_aborts_inside_a_streamed_transaction(
    make_daemon: Callable[..., Daemon],
    streaming_db: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
    tmp_path: Path,
    memory: str,
) -> None:
    state = tmp_path / "state"
    daemon = make_daemon(CDC_STATE_DIR=str(state), CDC_STREAM_MEMORY=memory)
    daemon.start().wait_ready()
    insert = "INSERT INTO tickets (id, title) SELECT %s || g, %s FROM generate_series(1, 5000) g"

    agents = (
        "INSERT INTO agents (id, username, display_name, password_hash)"
        " SELECT %s || g, %s || g, 'A', 'h' FROM generate_series(1, 2000) g"
    )

    def streamed() -> None:
        # Wait until the walsender streamed what was written so far (so an abort that
        # follows must be applied by the daemon, not by the server).
        before = slot_stats(streaming_db, slot_name)[1]
        wait_for(lambda: slot_stats(streaming_db, slot_name)[1] > before, 60, "a stream block")

    with psycopg.connect(database_url) as conn:
        # The table's first change (and its Relation message) is in a rolled-back savepoint.
        conn.execute("SAVEPOINT a")
        conn.execute(insert, ("gone-a", "x"))
        # ... and the first change of a second table comes after the savepoint's first.
        conn.execute(agents, ("gone-a", "gone-a"))
        streamed()
        conn.execute("ROLLBACK TO SAVEPOINT a")
        conn.execute(insert, ("kept-top", "x"))
        conn.execute(agents, ("kept-top", "kept-top"))
        conn.execute("SAVEPOINT b")
        conn.execute(insert, ("kept-b", "x"))
        conn.execute("RELEASE SAVEPOINT b")
        conn.execute("SAVEPOINT c")
        conn.execute(insert, ("gone-c", "x"))
        conn.execute("SAVEPOINT d")
        conn.execute(insert, ("gone-d", "x"))
        conn.execute("UPDATE tickets SET title = 'changed in d' WHERE id LIKE 'kept-top%'")
        streamed()
        conn.execute("ROLLBACK TO SAVEPOINT c")
        conn.execute("UPDATE tickets SET title = 'changed at top' WHERE id LIKE 'kept-b%'")
        conn.execute("SAVEPOINT e")
        conn.execute(insert, ("kept-e", "x"))
    counts = assert_converged(database_url, redis_url)
    assert counts["tickets"] == 15_001
    assert counts["agents"] == 2000
    client = redis.Redis.from_url(redis_url)
    assert client.exists("ticket:{gone-a1}", "ticket:{gone-c1}", "ticket:{gone-d1}") == 0
    assert client.hget("ticket:{kept-top1}", "title") == b"x"
    assert client.hget("ticket:{kept-b5000}", "title") == b"changed at top"
    assert slot_stats(streaming_db, slot_name)[0] == 0
    assert slot_stats(streaming_db, slot_name)[1] > 0
    assert spill_files(state) == []
    assert daemon.stop() == 0


def test_aborted_streamed_transaction_leaves_nothing(
    make_daemon: Callable[..., Daemon],
    streaming_db: Conn,
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    daemon = make_daemon(CDC_STATE_DIR=str(state), CDC_STREAM_MEMORY="0")
    daemon.start().wait_ready()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'r' || g, 'x' FROM generate_series(1, 30000) g"
        )
        wait_for(lambda: spill_files(state), 60, "the daemon's spill file")
        conn.rollback()
    wait_for(lambda: not spill_files(state), 60, "the spill file to be removed")
    counts = assert_converged(database_url, redis_url)
    assert counts["tickets"] == 1
    assert redis.Redis.from_url(redis_url).exists("ticket:{r1}") == 0
    assert daemon.stop() == 0


def test_interleaved_streamed_transactions_commit_in_order(
    make_daemon: Callable[..., Daemon],
    streaming_db: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    daemon = make_daemon(CDC_STATE_DIR=str(state), CDC_STREAM_MEMORY=str(256 << 10))
    daemon.start().wait_ready()
    streaming_db.execute("INSERT INTO tickets (id, title) VALUES ('shared', 'initial')")
    first = psycopg.connect(database_url)
    second = psycopg.connect(database_url)
    try:
        for round_ in range(3):
            for name, conn in (("one", first), ("two", second)):
                conn.execute(
                    "INSERT INTO tickets (id, title) SELECT %s || g, 'x'"
                    " FROM generate_series(%s::int, %s::int) g",
                    (name + "-", round_ * 4000 + 1, (round_ + 1) * 4000),
                )
            # Ordinary transactions commit between the stream blocks.
            streaming_db.execute(
                "INSERT INTO tickets (id, title) VALUES (%s, 'small')", (f"small{round_}",)
            )
        fence(database_url, redis_url)
        client = redis.Redis.from_url(redis_url)
        assert client.exists("ticket:{small0}", "ticket:{small2}") == 2
        assert client.exists("ticket:{one-1}", "ticket:{two-1}") == 0
        # The second commits first; the first then overwrites the shared row.
        second.execute("UPDATE tickets SET title = 'second' WHERE id = 'shared'")
        second.commit()
        first.execute("UPDATE tickets SET title = 'first' WHERE id = 'shared'")
        first.commit()
    finally:
        first.close()
        second.close()
    counts = assert_converged(database_url, redis_url)
    assert counts["tickets"] == 1 + 3 + 2 * 12_000 + 1
    assert redis.Redis.from_url(redis_url).hget("ticket:{shared}", "title") == b"first"
    assert slot_stats(streaming_db, slot_name)[1] > 0
    assert spill_files(state) == []
    assert daemon.stop() == 0


def test_kill_9_during_a_streamed_transaction(
    make_daemon: Callable[..., Daemon],
    streaming_db: Conn,
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    env = {"CDC_STATE_DIR": str(state), "CDC_STREAM_MEMORY": "0"}
    daemon = make_daemon(**env).start().wait_ready()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'k' || g, 'x' FROM generate_series(1, 30000) g"
        )
        left = wait_for(lambda: spill_files(state), 60, "the daemon's spill file")
        daemon.kill()
        assert spill_files(state) == left  # a crash leaves it behind
        final = make_daemon(**env).start().wait_ready()
        # The new session cleans it; the server streams the transaction again.
        wait_for(lambda: not (set(spill_files(state)) & set(left)), 60, "the stale spill file")
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'l' || g, 'x' FROM generate_series(1, 20000) g"
        )
    counts = assert_converged(database_url, redis_url)
    assert counts["tickets"] == 50_001
    assert spill_files(state) == []
    assert final.stop() == 0


def test_kill_9_while_a_streamed_transaction_is_applied_in_chunks(
    make_daemon: Callable[..., Daemon],
    streaming_db: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
    tmp_path: Path,
) -> None:
    # Larger than the batch limit: applied in chunks after its Stream Commit, with
    # ``partial`` recording how far; after a kill the server streams it again and the
    # daemon resumes at the same change (rows already at v3 never go back).
    state = tmp_path / "state"
    env = {"CDC_STATE_DIR": str(state), "CDC_BATCH_MAX_CHANGES": "500"}
    daemon = make_daemon(**env).start().wait_ready()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'big' || g, 'v1' FROM generate_series(1, 20000) g"
        )
        conn.execute("UPDATE tickets SET title = 'v2' WHERE id LIKE 'big%'")
        conn.execute("UPDATE tickets SET title = 'v3' WHERE id LIKE 'big%'")
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 't' || g, 't' FROM generate_series(1, 100000) g"
        )
    client = redis.Redis.from_url(redis_url)

    def late_in_the_transaction() -> bool:
        return bool(
            client.hget("ticket:{big1}", "title") == b"v3" and redis_state(redis_url).get("partial")
        )

    wait_for(late_in_the_transaction, 120, "the transaction half applied", max_delay=0.005)
    daemon.kill()
    killed = redis_state(redis_url)
    assert killed["partial"]
    assert parse_lsn(killed["lsn"]) < parse_lsn(killed["partial"].split(":")[0])
    sampled = [f"ticket:{{big{i}}}" for i in range(1, 20001, 97)]
    done: set[str] = set()
    went_back: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        r = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            pipe = r.pipeline(transaction=False)
            for key in sampled:
                pipe.hget(key, "title")
            for key, title in zip(sampled, pipe.execute(), strict=True):
                if title == b"v3":
                    done.add(key)
                elif key in done and title is not None:
                    went_back.append(f"{key}: {title!r}")

    for key in sampled:
        if client.hget(key, "title") == b"v3":
            done.add(key)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        final = make_daemon(**env).start().wait_ready()
        counts = assert_converged(database_url, redis_url)
    finally:
        stop.set()
        watcher.join(10)
    assert not went_back, went_back[:5]
    assert counts["tickets"] == 120_001
    assert redis_state(redis_url)["partial"] == ""
    assert slot_stats(streaming_db, slot_name)[1] > 0
    assert spill_files(state) == []
    assert final.stop() == 0


def test_sigterm_while_a_streamed_transaction_is_applied_stops_at_a_chunk(
    make_daemon: Callable[..., Daemon],
    streaming_db: Conn,
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    env = {"CDC_STATE_DIR": str(state), "CDC_BATCH_MAX_CHANGES": "200"}
    daemon = make_daemon(**env).start().wait_ready()
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'q' || g, 'x' FROM generate_series(1, 150000) g"
        )
    wait_for(
        lambda: redis_state(redis_url).get("partial"), 120, "the first chunks", max_delay=0.005
    )
    # SIGTERM: the daemon stops after the chunk in flight, not after the whole transaction.
    assert daemon.stop() == 0
    stopped = redis_state(redis_url)
    assert stopped["partial"]
    # I4: the checkpoint stays before the commit of the transaction applied in part.
    assert parse_lsn(stopped["lsn"]) < parse_lsn(stopped["partial"].split(":")[0])
    assert spill_files(state) == []
    final = make_daemon(**env).start().wait_ready()
    # The server decodes the transaction again from the slot's restart_lsn (spilling
    # until it passes the confirmed position): give it time on a busy machine.
    wait_for(lambda: redis_state(redis_url)["partial"] == "", 300, "the rest of the transaction")
    counts = assert_converged(database_url, redis_url)
    assert counts["tickets"] == 150_001
    assert redis_state(redis_url)["partial"] == ""
    assert final.stop() == 0
