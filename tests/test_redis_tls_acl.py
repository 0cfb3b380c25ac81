"""Redis over TLS with a client certificate, and the daemon as a least-privilege ACL user.

A fixture makes a test CA that signs the server's and the client's certificates, and
starts ``redis-server`` with TLS only (``--port 0``) and ``--tls-auth-clients yes``: every
connection of the daemon (its own wire, its redis-py clients) and the writer's
``CacheReader`` must present the certificate. The ACL case runs the daemon end to end as
the user of README "TLS and ACL" (only the daemon's key prefixes and commands, no INFO).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devstack.redis_ha import (
    DAEMON_ACL_RULES,
    TlsFiles,
    acl_setuser,
    make_tls_files,
    tls_server_args,
)
from devstack.servers import RedisServer, free_port
from tests.helpers import ROOT, Daemon, assert_converged, fence, running, wait_for
from tests.plugins.servers import RedisEndpoint
from writer import CacheReader, Writer

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    server = RedisServer(
        tmp_path_factory.mktemp("redis-tls"), port=port, extra_args=tls_server_args(tls_files, port)
    )
    with server.running():
        yield port


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in Daemon("", "", "", Path("/dev/null")).environment().items()}
    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_daemon_streams_over_tls_with_a_client_certificate(
    make_daemon: Callable[..., Daemon],
    database_url: str,
    writer: Writer,
    tls_files: TlsFiles,
    tls_redis: int,
    slot_name: str,
) -> None:
    url = f"rediss://127.0.0.1:{tls_redis}/1?{tls_files.client_query()}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    writer.create_ticket({"id": "tls-before", "title": "loaded by the snapshot"})
    with running(make_daemon(REDIS_URL=url)) as daemon:
        written = writer.create_ticket({"id": "tls-1", "title": "streamed over TLS"})
        # The writer's reader takes the same URL (client certificate included).
        reader = CacheReader.connect(url)
        ticket = reader.ticket("tls-1", after=written.token, timeout=30)
        assert ticket is not None
        assert ticket.title == "streamed over TLS"
        # Redis loses its data: the rebuild's redis-py clients speak TLS too.
        client.flushdb()
        wait_for(lambda: client.hget("ticket:{tls-before}", "title"), 60, "the rebuild")
        assert_converged(database_url, url)
        # verify's client, too.
        done = _cli(
            {"DATABASE_URL": database_url, "REDIS_URL": url, "CDC_SLOT": slot_name}, "verify"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert daemon.ready()
    client.flushdb()


@pytest.mark.parametrize("query", ["ca_only", "no_ca"])
def test_tls_refused_without_the_client_certificate(
    make_daemon: Callable[..., Daemon], tls_files: TlsFiles, tls_redis: int, query: str
) -> None:
    """No client certificate (or no CA for the server's): exit 2 and one line, no retry loop."""
    params = f"ssl_ca_certs={tls_files.ca_cert}" if query == "ca_only" else ""
    url = f"rediss://:tls-secret@127.0.0.1:{tls_redis}/2?{params}"
    daemon = make_daemon(REDIS_URL=url).start()
    code = daemon.wait_exit(60)
    output = daemon.log()
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1, output
    assert lines[0].startswith("cdc: "), output
    expected = "client certificate" if query == "ca_only" else "server's TLS certificate"
    assert expected in lines[0], output
    assert "tls-secret" not in output


# -- ACL ---------------------------------------------------------------------------------


@pytest.fixture
def acl_url(redis_endpoint: RedisEndpoint, redis_url: str) -> Iterator[str]:
    """A user with exactly the README's ACL, on this test's own database number."""
    user = f"cdc_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command(*acl_setuser(user, password).split())  # type: ignore[no-untyped-call]
    db = redis_url.rsplit("/", 1)[1]
    host_port = redis_url.split("://", 1)[1].split("/", 1)[0]
    yield f"redis://{user}:{password}@{host_port}/{db}"
    admin.acl_deluser(user)
    admin.close()


def test_readme_prints_the_acl_the_tests_use() -> None:
    readme = (ROOT / "README.md").read_text()
    assert acl_setuser("cdc", "<password>") in readme
    assert "~cdc:*" in DAEMON_ACL_RULES
    assert "&cdc:*" in DAEMON_ACL_RULES


def test_daemon_runs_as_a_least_privilege_acl_user(
    make_daemon: Callable[..., Daemon],
    database_url: str,
    redis_url: str,
    acl_url: str,
    pg: Conn,
    slot_name: str,
) -> None:
    """Snapshot, streaming, TRUNCATE, a Redis data loss (rebuild) and verify, all as the
    minimal user; INFO is not allowed, so the eviction check warns and is skipped."""
    admin = redis.Redis.from_url(redis_url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(acl_url).info("memory")
    pg.execute("INSERT INTO agents (id, username, display_name, email, password_hash)"
               " VALUES ('acl-a', 'acl-a', 'A', 'a@example.com', 'x')")  # fmt: skip
    pg.execute("INSERT INTO tickets (id, title, assignee_id) VALUES ('acl-0', 'before', 'acl-a')")
    with running(make_daemon(REDIS_URL=acl_url)) as daemon:
        assert any(
            e.get("level") == "warning" and "INFO" in e.get("event", "") for e in daemon.events()
        ), daemon.log()
        for i in range(1, 20):
            pg.execute(
                "INSERT INTO tickets (id, title, assignee_id) VALUES (%s, 'x', 'acl-a')",
                (f"acl-{i}",),
            )
        pg.execute("UPDATE agents SET username = 'acl-b' WHERE id = 'acl-a'")
        pg.execute("DELETE FROM tickets WHERE id = 'acl-3'")
        assert_converged(database_url, redis_url)
        pg.execute("TRUNCATE tickets CASCADE")
        pg.execute("INSERT INTO tickets (id, title) VALUES ('acl-after', 'after truncate')")
        assert_converged(database_url, redis_url)
        admin.flushdb()  # Redis lost its data: rebuilt online (SCAN/UNLINK as the user)
        wait_for(lambda: admin.hget("ticket:{acl-after}", "title"), 60, "the rebuild")
        assert_converged(database_url, redis_url)
        fence(database_url, acl_url)
        done = _cli(
            {"DATABASE_URL": database_url, "REDIS_URL": acl_url, "CDC_SLOT": slot_name}, "verify"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert daemon.ready()
        assert "NOPERM" not in daemon.log(), daemon.log()
        assert acl_url.split(":")[2].split("@", maxsplit=1)[0] not in daemon.log()
    admin.close()
