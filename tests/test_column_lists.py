"""Password hashes never leave PostgreSQL (reliability "Security"; issue 7 item 8).

The publication's agents entry is a column list without ``password_hash`` (so it is not
even decoded into the stream), the daemon's role may SELECT every agents column but that
one, and both follow ``ALTER TABLE agents ADD/DROP/RENAME COLUMN`` by themselves.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis

from tests.helpers import ROOT, Daemon, assert_converged, fence, running, wait_for
from tests.plugins.servers import PostgresEndpoint

Conn = psycopg.Connection[tuple[Any, ...]]
HASH = "H4sh-never-published-xyz"


def _published(pg: Conn, table: str = "agents") -> list[str]:
    row = pg.execute(
        "SELECT attnames FROM pg_publication_tables WHERE pubname = 'cdc_cache' AND tablename = %s",
        (table,),
    ).fetchone()
    assert row is not None
    return list(row[0])


def _columns(pg: Conn, table: str = "agents") -> list[str]:
    return [
        r[0]
        for r in pg.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            (table,),
        ).fetchall()
    ]


@pytest.fixture
def peek_slot(pg: Conn) -> Iterator[Callable[[], bytes]]:
    """A pgoutput slot of the test's own, read with pg_logical_slot_peek_binary_changes."""
    name = f"peek_{uuid.uuid4().hex[:10]}"
    pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))

    def peek() -> bytes:
        rows = pg.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'cdc_cache')",
            (name,),
        ).fetchall()
        return b"".join(bytes(r[0]) for r in rows)

    yield peek
    pg.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def test_the_stream_never_carries_password_hash(pg: Conn, peek_slot: Callable[[], bytes]) -> None:
    assert "password_hash" not in _published(pg)
    assert _published(pg) == [c for c in _columns(pg) if c != "password_hash"]
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash)"
        " VALUES ('h1', 'hanna', 'Hanna', %s)",
        (HASH,),
    )
    pg.execute("UPDATE agents SET password_hash = %s || '2', username = 'hanne'", (HASH,))
    pg.execute("UPDATE agents SET display_name = 'H.'")
    data = peek_slot()
    assert b"hanne" in data
    assert b"H." in data
    assert HASH.encode() not in data  # ... their password hashes are not
    assert b"password_hash" not in data  # not even the column, in the Relation message

    # A column added later is published (and streamed) by itself; password_hash still not.
    pg.execute("ALTER TABLE agents ADD COLUMN shift text DEFAULT 'night'")
    assert "shift" in _published(pg)
    pg.execute("UPDATE agents SET shift = 'early-shift', password_hash = %s || '3'", (HASH,))
    data = peek_slot()
    assert b"early-shift" in data
    assert HASH.encode() not in data
    # A published column can be dropped and renamed; the list follows.
    pg.execute("ALTER TABLE agents DROP COLUMN phone")
    pg.execute("ALTER TABLE agents RENAME COLUMN avatar_url TO picture_url")
    assert _published(pg) == [c for c in _columns(pg) if c != "password_hash"]
    # DDL in a transaction with DML, and DDL on other tables, leave it alone.
    with pg.transaction():
        pg.execute("ALTER TABLE agents ADD COLUMN badge text")
        pg.execute("UPDATE agents SET badge = 'gold-badge', password_hash = %s || '4'", (HASH,))
    pg.execute("ALTER TABLE tickets ADD COLUMN region text")
    assert "badge" in _published(pg)
    data = peek_slot()
    assert b"gold-badge" in data
    assert HASH.encode() not in data


@pytest.fixture
def daemon_role(postgres: PostgresEndpoint, database_name: str) -> Iterator[str]:
    """A role made with docker/grants/10-cdc-daemon.sql; yields its URL."""
    role = f"d_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    subprocess.run(
        [
            "psql",
            "-q",
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"role={role}",
            "-v",
            f"password='{password}'",
            "-d",
            postgres.url(database_name),
        ],
        input=(ROOT / "docker" / "grants" / "10-cdc-daemon.sql").read_bytes(),
        check=True,
        capture_output=True,
    )
    admin = postgres.url(database_name)
    yield admin.replace("postgres:postgres-local", f"{role}:{password}")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def test_the_daemons_role_cannot_read_password_hash(daemon_role: str, pg: Conn) -> None:
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('g1', 'g', 'G', %s)",
        (HASH,),
    )
    with psycopg.connect(daemon_role, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT password_hash FROM agents")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM agents")
        assert conn.execute("SELECT username FROM agents").fetchall() == [("g",)]
        assert conn.execute("SELECT count(*) FROM tickets").fetchone() == (0,)
        # The grant follows new columns (never password_hash).
        pg.execute("ALTER TABLE agents ADD COLUMN shift text DEFAULT 'day'")
        assert conn.execute("SELECT shift FROM agents").fetchall() == [("day",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT password_hash FROM agents")


def test_least_privilege_daemon_follows_agents_columns(
    daemon_role: str,
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_url: str,
    redis_url: str,
) -> None:
    """Snapshot, streaming, the backfill after ADD COLUMN (case 12) and verify, all as a
    role that cannot read password_hash: they read only the published columns."""
    for i in range(20):
        pg.execute(
            "INSERT INTO agents (id, username, display_name, password_hash)"
            " VALUES (%s, %s, 'A', %s)",
            (f"a{i}", f"user{i}", HASH),
        )
    with running(make_daemon(CDC_DATABASE_URL=daemon_role)) as daemon:
        assert_converged(database_url, redis_url)
        pg.execute("ALTER TABLE agents ADD COLUMN shift text NOT NULL DEFAULT 'day'")
        client = redis.Redis.from_url(redis_url)
        wait_for(lambda: client.hget("agent:{a3}", "shift") == b"day", 30, "the backfill")
        pg.execute("UPDATE agents SET shift = 'night' WHERE id = 'a4'")
        pg.execute("ALTER TABLE agents DROP COLUMN phone")
        pg.execute(
            "INSERT INTO agents (id, username, display_name, password_hash, shift)"
            " VALUES ('late', 'late', 'L', %s, 'late')",
            (HASH,),
        )
        assert_converged(database_url, redis_url)
        for key in client.scan_iter("agent:{*"):
            assert b"password_hash" not in client.hgetall(key)
        done = subprocess.run(
            [sys.executable, "-m", "cdc", "verify"],
            cwd=ROOT,
            env={**daemon.environment(), "DATABASE_URL": daemon_role},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "excluded columns" not in daemon.log()
        assert HASH not in daemon.log()


def test_wal2json_ignores_column_lists_and_the_daemon_says_so(
    make_daemon: Callable[..., Daemon], database_url: str, redis_url: str
) -> None:
    with running(make_daemon(CDC_PLUGIN="wal2json")) as daemon:
        fence(database_url, redis_url)
    assert "wal2json ignores publication column lists" in daemon.log()


def test_a_publication_without_the_column_list_is_warned_about(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    pg.execute("ALTER PUBLICATION cdc_cache DROP TABLE agents")
    pg.execute("ALTER PUBLICATION cdc_cache ADD TABLE agents")
    with running(make_daemon()) as daemon:
        fence(database_url, redis_url)
    assert "publishes agents.password_hash" in daemon.log()


def test_replica_identity_full_on_agents_is_refused(
    make_daemon: Callable[..., Daemon], pg: Conn
) -> None:
    pg.execute("ALTER TABLE agents REPLICA IDENTITY FULL")
    daemon = make_daemon()
    daemon.start()
    assert daemon.wait_exit(60) == 2
    last = [line for line in daemon.log().splitlines() if line.strip()][-1]
    assert last.startswith("cdc: ")
    assert "REPLICA IDENTITY FULL" in last


def test_without_column_lists_the_fallback_warns_and_reads_no_hash(
    pg: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL < 15 (simulated): no column list to rely on; the daemon says where the
    hash travels and still never reads it."""
    from cdc.ops import checks
    from cdc.postgres import catalog
    from cdc.settings import Settings
    from schema.keys import AGENTS

    monkeypatch.setattr(catalog, "has_column_lists", lambda conn: False)
    settings = Settings(database_url="dbname=x")
    role = catalog.RoleInfo("cdc", superuser=False, replication=True)
    warnings = checks.column_list_warnings(pg, settings, (AGENTS,), role)
    assert any("has no publication column lists" in w for w in warnings), warnings
    assert "password_hash" not in catalog.readable_columns(pg, AGENTS, "cdc_cache")
    assert "username" in catalog.readable_columns(pg, AGENTS, "cdc_cache")
