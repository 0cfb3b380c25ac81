"""Reliability cases 3, 10, 11, 12, 13, 14 and oversized rows, end to end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import redis

from schema.lsn import parse_lsn
from tests.helpers import (
    Daemon,
    assert_converged,
    fence,
    run_cdc,
    running,
    slot_confirmed,
    wait_for,
)

Conn = psycopg.Connection[tuple[Any, ...]]


def keys(redis_url: str, *names: str) -> int:
    return int(redis.Redis.from_url(redis_url).exists(*names))


# -- case 3: a long transaction open across a restart -------------------------------------


def test_long_transaction_across_a_restart(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    first = make_daemon().start().wait_ready()
    long_tx = psycopg.connect(database_url)
    long_tx.execute("INSERT INTO tickets (id, title) VALUES ('long-1', 'opened early')")
    long_tx.execute("UPDATE tickets SET title = 'x' WHERE id = 'long-1'")
    for i in range(20):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'meanwhile')", (f"m{i}",))
    fence(database_url, redis_url)
    assert keys(redis_url, "ticket:{long-1}") == 0  # I3: uncommitted is invisible
    first.kill()
    second = make_daemon().start().wait_ready()
    pg.execute("INSERT INTO tickets (id, title) VALUES ('after-restart', 'x')")
    long_tx.execute(
        "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('lx', 'lx', 'L', 'h')"
    )
    long_tx.commit()
    long_tx.close()
    counts = assert_converged(database_url, redis_url)
    assert counts["tickets"] == 23  # long-1, 20 m*, after-restart, fence
    assert keys(redis_url, "ticket:{long-1}", "agent:{lx}") == 2
    second.stop()


def test_long_transaction_rolled_back_after_a_restart(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    first = make_daemon().start().wait_ready()
    long_tx = psycopg.connect(database_url)
    long_tx.execute("INSERT INTO tickets (id, title) VALUES ('doomed', 'never')")
    pg.execute("INSERT INTO tickets (id, title) VALUES ('kept', 'yes')")
    fence(database_url, redis_url)
    assert first.stop() == 0
    with running(make_daemon()):
        long_tx.rollback()
        long_tx.close()
        assert_converged(database_url, redis_url)
        assert keys(redis_url, "ticket:{doomed}") == 0


# -- case 10: savepoints, rollback, two-phase commit ---------------------------------------


def test_savepoints_rollback_and_two_phase_commit(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO tickets (id, title) VALUES ('sp-a', 'kept')")
        conn.execute("SAVEPOINT s1")
        conn.execute("INSERT INTO tickets (id, title) VALUES ('sp-b', 'rolled back to s1')")
        conn.execute("UPDATE tickets SET title = 'changed then undone' WHERE id = 'sp-a'")
        conn.execute("ROLLBACK TO SAVEPOINT s1")
        conn.execute("SAVEPOINT s2")
        conn.execute("INSERT INTO tickets (id, title) VALUES ('sp-c', 'kept too')")
        conn.execute("RELEASE SAVEPOINT s2")
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO tickets (id, title) VALUES ('rb', 'rolled back')")
        conn.rollback()
    fence(database_url, redis_url)
    assert keys(redis_url, "ticket:{sp-a}", "ticket:{sp-c}") == 2
    assert keys(redis_url, "ticket:{sp-b}", "ticket:{rb}") == 0
    assert redis.Redis.from_url(redis_url).hget("ticket:{sp-a}", "title") == b"kept"

    prepared = psycopg.connect(database_url, autocommit=True)
    prepared.execute("BEGIN")
    prepared.execute("INSERT INTO tickets (id, title) VALUES ('2pc-commit', 'prepared')")
    prepared.execute("PREPARE TRANSACTION 'cdc-test-commit'")
    prepared.execute("BEGIN")
    prepared.execute("INSERT INTO tickets (id, title) VALUES ('2pc-rollback', 'prepared')")
    prepared.execute("UPDATE tickets SET title = 'not this' WHERE id = 'sp-a'")
    prepared.execute("PREPARE TRANSACTION 'cdc-test-rollback'")
    fence(database_url, redis_url)
    assert keys(redis_url, "ticket:{2pc-commit}", "ticket:{2pc-rollback}") == 0  # I3
    prepared.execute("COMMIT PREPARED 'cdc-test-commit'")
    prepared.execute("ROLLBACK PREPARED 'cdc-test-rollback'")
    prepared.close()
    assert_converged(database_url, redis_url)
    assert keys(redis_url, "ticket:{2pc-commit}") == 1
    assert keys(redis_url, "ticket:{2pc-rollback}") == 0


# -- case 11: unchanged TOAST ----------------------------------------------------------------


BIG = "SELECT string_agg(md5(g::text || %s), '') FROM generate_series(1, 200) g"  # 6.4 kB, incompressible


def test_update_leaving_a_toasted_column_unchanged(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    big = pg.execute(BIG, ("seed",)).fetchone()[0]  # type: ignore[index]
    pg.execute("INSERT INTO tickets (id, title, description) VALUES ('toast', 'v1', %s)", (big,))
    pg.execute("UPDATE tickets SET title = 'v2' WHERE id = 'toast'")  # description not sent: 'u'
    pg.execute("UPDATE tickets SET description = NULL, title = 'v3' WHERE id = 'toast'")
    pg.execute("UPDATE tickets SET description = %s WHERE id = 'toast'", (big,))
    pg.execute("UPDATE tickets SET priority = 'high' WHERE id = 'toast'")
    assert_converged(database_url, redis_url)
    cached = redis.Redis.from_url(redis_url).hgetall("ticket:{toast}")
    assert cached[b"description"] == big.encode()
    assert (cached[b"title"], cached[b"priority"]) == (b"v3", b"high")


def test_unchanged_toast_on_a_key_redis_lost_is_fetched_again(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    big = pg.execute(BIG, ("other",)).fetchone()[0]  # type: ignore[index]
    pg.execute("INSERT INTO tickets (id, title, description) VALUES ('lost', 'v1', %s)", (big,))
    fence(database_url, redis_url)
    redis.Redis.from_url(redis_url).delete("ticket:{lost}")  # somebody deleted the key
    pg.execute(
        "UPDATE tickets SET title = 'v2' WHERE id = 'lost'"
    )  # 'u': cannot patch a missing hash
    wait_for(lambda: redis.Redis.from_url(redis_url).hget("ticket:{lost}", "title") == b"v2")
    assert_converged(database_url, redis_url)
    assert (daemon.metric("cdc_errors_total", 'kind="incomplete_row"') or 0) >= 1


# -- case 12: schema changes while streaming ------------------------------------------------------


def test_add_and_drop_columns_while_streaming(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    for i in range(30):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'before')", (f"s{i}",))
    pg.execute("ALTER TABLE tickets ADD COLUMN region text NOT NULL DEFAULT 'eu'")
    pg.execute("INSERT INTO tickets (id, title, region) VALUES ('s-new', 'after', 'us')")
    pg.execute("UPDATE tickets SET title = 'touched' WHERE id = 's1'")
    assert_converged(database_url, redis_url)
    assert redis.Redis.from_url(redis_url).hget("ticket:{s2}", "region") == b"eu"  # untouched row
    pg.execute("ALTER TABLE tickets DROP COLUMN category")
    pg.execute("ALTER TABLE tickets RENAME COLUMN channel TO source_channel")
    pg.execute("UPDATE tickets SET source_channel = 'email' WHERE id = 's3'")
    assert_converged(database_url, redis_url)
    # A volatile default rewrites the table: no WAL for the rows, the backfill carries them.
    pg.execute("ALTER TABLE tickets ADD COLUMN token text DEFAULT md5(random()::text)")
    # Online, so not necessarily before a fence written right after the DDL: wait for it.
    client = redis.Redis.from_url(redis_url)
    wait_for(
        lambda: all(client.hexists(f"ticket:{{s{i}}}", "token") for i in range(30)),
        30,
        "the backfill of the rewritten table",
    )
    assert_converged(database_url, redis_url)


def test_add_column_to_a_quiet_table(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """No DML follows the DDL on agents: only the catalog watch can notice it."""
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('q1', 'q', 'Q', 'h')"
    )
    fence(database_url, redis_url)
    pg.execute("ALTER TABLE agents ADD COLUMN shift text DEFAULT 'day'")

    def has_shift() -> bool:
        return redis.Redis.from_url(redis_url).hget("agent:{q1}", "shift") == b"day"

    wait_for(has_shift, 30, "the new column in the cached agent")
    assert_converged(database_url, redis_url)


# -- case 13: truncate ---------------------------------------------------------------------------


def test_truncate(daemon: Daemon, pg: Conn, database_url: str, redis_url: str) -> None:
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('ta', 'ta', 'A', 'h')"
    )
    for i in range(50):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'x')", (f"tr{i}",))
    fence(database_url, redis_url)
    pg.execute("TRUNCATE tickets CASCADE")
    assert_converged(database_url, redis_url)
    assert keys(redis_url, "ticket:{tr1}") == 0
    assert keys(redis_url, "agent:{ta}", "agent:username:{ta}") == 2
    with psycopg.connect(database_url) as conn:  # TRUNCATE then INSERT in one transaction
        conn.execute("TRUNCATE tickets, agents CASCADE")
        conn.execute(
            "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('tb', 'tb', 'B', 'h')"
        )
        conn.execute(
            "INSERT INTO tickets (id, title, assignee_id) VALUES ('after-truncate', 'y', 'tb')"
        )
    counts = assert_converged(database_url, redis_url)
    assert counts == {"agents": 1, "tickets": 2}
    assert keys(redis_url, "agent:{ta}", "agent:username:{ta}") == 0


# -- case 14: a quiet publication does not hold WAL back ------------------------------------------


def test_untracked_writes_move_the_slot(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    fence(database_url, redis_url)
    start = slot_confirmed(database_url, daemon.slot)
    assert start is not None
    for _ in range(50):
        pg.execute(
            "INSERT INTO audit_logs (event_type, details)"
            " SELECT 'noise', jsonb_build_object('n', g) FROM generate_series(1, 200) g"
        )
    target = parse_lsn(pg.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])  # type: ignore[index]
    wait_for(
        lambda: (slot_confirmed(database_url, daemon.slot) or 0) >= target, 30, "the slot to move"
    )
    assert_converged(database_url, redis_url)


# -- rows too large to cache -----------------------------------------------------------------------


def test_oversized_row_is_dropped_and_counted(
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
) -> None:
    with running(make_daemon(CDC_MAX_ROW_BYTES="2000")) as daemon:
        pg.execute(
            "INSERT INTO tickets (id, title, description, status)"
            " VALUES ('huge', 'h', repeat('x', 5000), 'open')"
        )
        pg.execute("INSERT INTO tickets (id, title) VALUES ('small', 's')")
        fence(database_url, redis_url)
        assert keys(redis_url, "ticket:{huge}") == 0
        assert keys(redis_url, "ticket:{small}") == 1
        wait_for(lambda: daemon.metric("cdc_errors_total", 'kind="oversized_row"') == 1)
        # verify knows the same limit: a row left out for its size is no difference,
        # and --repair does not write it.
        for args in (("verify",), ("verify", "--repair")):
            done = run_cdc(database_url, redis_url, slot_name, *args, CDC_MAX_ROW_BYTES="2000")
            assert done.returncode == 0, done.stdout + done.stderr
        assert keys(redis_url, "ticket:{huge}") == 0
        pg.execute("UPDATE tickets SET description = 'short now' WHERE id = 'huge'")
        fence(database_url, redis_url)
        assert keys(redis_url, "ticket:{huge}") == 1
        assert "xxxxxxxx" not in daemon.log()  # no row contents in logs
        pg.execute("UPDATE tickets SET description = repeat('y', 5000) WHERE id = 'huge'")
        fence(database_url, redis_url)
    # With no daemon, a key left for a row now too large is extra, and --repair deletes
    # it rather than writing the row.
    redis.Redis.from_url(redis_url).hset("ticket:{huge}", "title", "stale")
    done = run_cdc(database_url, redis_url, slot_name, "verify", CDC_MAX_ROW_BYTES="2000")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "extra     ticket:{huge}" in done.stdout, done.stdout
    done = run_cdc(
        database_url, redis_url, slot_name, "verify", "--repair", CDC_MAX_ROW_BYTES="2000"
    )
    assert "repaired 1" in done.stdout, done.stdout + done.stderr
    assert keys(redis_url, "ticket:{huge}") == 0
    done = run_cdc(database_url, redis_url, slot_name, "verify", CDC_MAX_ROW_BYTES="2000")
    assert done.returncode == 0, done.stdout + done.stderr
