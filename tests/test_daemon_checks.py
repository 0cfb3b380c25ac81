"""Bad configuration: exit code 2 and one clear line (contract section 5, reliability
"Bad input"); refused connections are retried; least-privilege roles are enough."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devstack.servers import PostgresServer, RedisServer, free_port
from tests.helpers import ROOT, Daemon, assert_converged, running, wait_for
from tests.plugins.servers import PostgresEndpoint, migrate
from writer import Writer

Conn = psycopg.Connection[tuple[Any, ...]]
SECRET = "postgres-local"  # the test server's superuser password


def refused(daemon: Daemon, timeout: float = 60.0) -> str:
    """Run until exit; assert exit code 2 and return the one line it printed last."""
    daemon.start()
    code = daemon.wait_exit(timeout)
    output = daemon.log()
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "no output"
    last = lines[-1]
    assert last.startswith("cdc: "), output
    assert SECRET not in output
    assert "Traceback" not in output
    return last


@pytest.fixture
def make_role(postgres: PostgresEndpoint, database_name: str) -> Iterator[Callable[..., str]]:
    """Create throwaway roles with psql (the way an operator would); drop them after.

    ``make_role(sql=…)`` or ``make_role(file=…)``, both using ``:role`` and ``:password``;
    returns a URL logging in as the role."""
    made: list[str] = []

    def factory(sql: str | None = None, file: Path | None = None) -> str:
        role = f"r_{uuid.uuid4().hex[:10]}"
        password = uuid.uuid4().hex
        # psql interpolates :role and :password in scripts and stdin, not in -c.
        script = sql if sql is not None else Path(file or "").read_text()
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
            input=script.encode(),
            check=True,
            capture_output=True,
        )
        made.append(role)
        return postgres.url(database_name).replace("postgres:" + SECRET, f"{role}:{password}")

    yield factory
    with psycopg.connect(postgres.url(database_name), autocommit=True) as conn:
        for role in made:
            conn.execute(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
            )
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def test_missing_database_url_and_bad_urls(make_daemon: Callable[..., Daemon]) -> None:
    assert refused(make_daemon(DATABASE_URL="")) == "cdc: DATABASE_URL is not set"
    line = refused(make_daemon(DATABASE_URL="mysql://root:hunter2@db/x"))
    assert "DATABASE_URL must be a postgresql:// URL" in line
    assert "hunter2" not in line
    assert "REDIS_URL" in refused(make_daemon(REDIS_URL="http://127.0.0.1:1/0"))
    assert "CDC_SLOT" in refused(make_daemon(CDC_SLOT="Bad-Slot!"))


def test_wrong_password_is_not_retried(
    make_daemon: Callable[..., Daemon], database_url: str
) -> None:
    wrong = database_url.replace(SECRET, "not-the-password")
    line = refused(make_daemon(DATABASE_URL=wrong), timeout=30)
    assert "password authentication failed" in line
    assert "not-the-password" not in line


def test_missing_publication(make_daemon: Callable[..., Daemon], pg: Conn) -> None:
    pg.execute("DROP PUBLICATION cdc_cache")
    assert (
        refused(make_daemon()) == 'cdc: publication "cdc_cache" does not exist: run the migrations'
    )


def test_publication_without_the_tracked_tables(
    make_daemon: Callable[..., Daemon], pg: Conn
) -> None:
    """A publication holding some of the tables is a daemon mirroring those only
    (tests/test_multi_daemon.py); one holding none of them is refused."""
    pg.execute("ALTER PUBLICATION cdc_cache DROP TABLE agents, tickets")
    line = refused(make_daemon())
    assert line == (
        'cdc: publication "cdc_cache" holds none of the tracked tables'
        " (public.agents, public.tickets): run the migrations, or set CDC_PUBLICATION"
    )


def test_table_without_the_replica_identity_it_needs(
    make_daemon: Callable[..., Daemon], pg: Conn
) -> None:
    pg.execute("ALTER TABLE agents REPLICA IDENTITY DEFAULT")  # the old username would be lost
    line = refused(make_daemon())
    assert 'table "public.agents" has replica identity (id)' in line
    assert "run the migrations" in line
    # FULL on agents is refused too: it would publish password_hash in every old row.
    pg.execute("ALTER TABLE agents REPLICA IDENTITY FULL")
    assert "REPLICA IDENTITY FULL" in refused(make_daemon())
    pg.execute("ALTER TABLE agents REPLICA IDENTITY USING INDEX uq_agents_id_username")
    pg.execute("ALTER TABLE tickets REPLICA IDENTITY NOTHING")
    assert 'table "public.tickets" has replica identity NOTHING' in refused(make_daemon())


def test_slot_of_another_plugin(
    make_daemon: Callable[..., Daemon], pg: Conn, slot_name: str
) -> None:
    pg.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot_name,))
    line = refused(make_daemon())
    assert f'slot "{slot_name}" uses plugin "test_decoding", not "pgoutput"' in line


def test_slot_in_use_by_another_daemon(make_daemon: Callable[..., Daemon], slot_name: str) -> None:
    with running(make_daemon()) as first:
        line = refused(make_daemon())
        assert f'slot "{slot_name}" is in use by pid' in line
        assert first.ready()


def test_role_without_replication(
    make_daemon: Callable[..., Daemon], make_role: Callable[..., str]
) -> None:
    url = make_role(
        sql='CREATE ROLE :"role" LOGIN PASSWORD :password; GRANT SELECT ON tickets, agents TO :"role"'
    )
    role = url.split("//", 1)[1].split(":", 1)[0]
    line = refused(make_daemon(DATABASE_URL=url))
    assert line == f'cdc: role "{role}" lacks REPLICATION (ALTER ROLE "{role}" REPLICATION)'


def test_wal_level_replica(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "replica-pg", settings={"wal_level": "replica"})
    server.start()
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        migrate(server.url("app"))
        line = refused(make_daemon(DATABASE_URL=server.url("app")))
        assert line == "cdc: wal_level is 'replica'; set wal_level=logical and restart PostgreSQL"
    finally:
        server.destroy()


def test_redis_with_an_evicting_policy(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "lru", extra_args=("--maxmemory-policy", "allkeys-lru"))
    with server.running():
        line = refused(make_daemon(REDIS_URL=server.url))
        assert "maxmemory-policy is allkeys-lru: set it to noeviction" in line


def test_a_password_for_a_redis_without_one_is_a_config_error(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Redis answers AUTH with ERR when it has no password: that is REDIS_URL to fix
    (exit 2, one line), not a peer to wait for."""
    server = RedisServer(tmp_path / "open")
    with server.running():
        line = refused(make_daemon(REDIS_URL=f"redis://:s3cret-x@127.0.0.1:{server.port}/0"))
        assert "REDIS_URL has a password but Redis has none" in line
        assert "s3cret-x" not in line


def test_an_acl_user_lacking_a_key_the_daemon_writes_is_refused_at_start(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A command the batch script is refused half-way leaves the batch's earlier writes
    visible: a user without the change feed's keys is told at start (exit 2), before
    anything is written."""
    server = RedisServer(tmp_path / "acl-feed")
    with server.running():
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser(
            "cdc",
            enabled=True,
            passwords=["+s3cret-acl"],
            keys=["ticket:*", "agent:*", "tickets:*", "agents:*", "cdc:*"],  # no changes:*
            channels=["cdc:*"],
            commands=["+@all"],
        )
        url = f"redis://cdc:s3cret-acl@127.0.0.1:{server.port}/0"
        line = refused(make_daemon(REDIS_URL=url, CDC_CHANGE_FEED="true"))
        assert "may not run XADD on changes:" in line
        assert admin.dbsize() == 0


def test_refused_redis_is_retried_until_it_appears(
    make_daemon: Callable[..., Daemon], database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    daemon = make_daemon(REDIS_URL=f"redis://127.0.0.1:{port}/0").start()
    wait_for(lambda: "waiting for a peer" in daemon.log(), 30, "a retry")
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    assert not daemon.ready()
    with RedisServer(tmp_path / "late", port=port).running() as late:
        daemon.wait_ready()
        assert_converged(database_url, late.url)
        assert daemon.stop() == 0


def test_redis_acl_user(
    make_daemon: Callable[..., Daemon], database_url: str, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "acl")
    with server.running():
        admin = redis.Redis.from_url(server.url)
        # Only the daemon's key prefixes, only the command groups it uses.
        admin.acl_setuser(
            "cdc",
            enabled=True,
            passwords=["+s3cret-acl"],
            keys=["ticket:*", "agent:*", "tickets:*", "agents:*", "changes:*", "cdc:*"],
            # The daemon announces its checkpoint on cdc:applied (readers wake on it).
            channels=["cdc:*"],
            commands=[
                "+@read",
                "+@write",
                "+@transaction",
                "+@scripting",
                "+@keyspace",
                "+info",
                "+ping",
                "+scan",
                "+publish",
            ],
        )
        admin.acl_setuser("default", enabled=False)
        url = f"redis://cdc:s3cret-acl@127.0.0.1:{server.port}/0"
        with running(make_daemon(REDIS_URL=url)) as daemon:
            assert_converged(database_url, url)
            assert "s3cret-acl" not in daemon.log()
        line = refused(make_daemon(REDIS_URL=f"redis://cdc:wrong@127.0.0.1:{server.port}/0"))
        assert "Redis refused" in line


def test_least_privilege_roles_are_enough(
    make_daemon: Callable[..., Daemon], make_role: Callable[..., str], redis_url: str
) -> None:
    grants = ROOT / "docker" / "grants"
    roles = {
        "daemon": make_role(file=grants / "10-cdc-daemon.sql"),
        "service": make_role(file=grants / "20-cdc-service.sql"),
    }
    with Writer.connect(roles["service"]) as service:
        service.create_agent(
            {"id": "lp", "username": "lp", "display_name": "L", "password": "12345678"}
        )
        service.create_ticket({"id": "lp-1", "title": "by the service role", "assignee_id": "lp"})
        with running(
            make_daemon(DATABASE_URL=roles["service"], CDC_DATABASE_URL=roles["daemon"])
        ) as daemon:
            written = service.change_ticket_status("lp-1", {"to_status": "closed"})
            assert daemon.ready()
            # The daemon's role could not even write the fence row: compare as the service.
            assert_converged(roles["service"], redis_url)
            assert written.value.closed_at is not None
    with (
        psycopg.connect(roles["daemon"]) as daemon_conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        daemon_conn.execute("DELETE FROM tickets")
    with (
        psycopg.connect(roles["service"]) as service_conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        service_conn.execute("ALTER TABLE tickets ADD COLUMN nope text")
