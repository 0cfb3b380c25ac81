"""Migrations: upgrade/downgrade round trip, publication, replica identity, model parity."""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import CheckConstraint, create_engine

from schema.tables import metadata
from tests.plugins.servers import _environ, migrate

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "agents",
    "tickets",
    "ticket_comments",
    "ticket_attachments",
    "ticket_status_history",
    "ticket_assignments",
    "audit_logs",
    "session_archives",
    "email_records",
}


def _sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg://" + url.split("://", 1)[1]


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def _downgrade(url: str) -> None:
    config = Config(toml_file=str(ROOT / "pyproject.toml"))
    with _environ(DATABASE_URL=url):
        command.downgrade(config, "base")


def test_upgrade_creates_everything_and_downgrade_removes_it(empty_database_url: str) -> None:
    migrate(empty_database_url)
    assert _tables(empty_database_url) == TABLES | {"alembic_version"}
    with psycopg.connect(empty_database_url) as conn:
        published = conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = 'cdc_cache'"
        ).fetchall()
        identity: dict[str, str] = dict(
            conn.execute(
                "SELECT relname, relreplident FROM pg_class WHERE relname IN ('tickets', 'agents')"
            ).fetchall()
        )
        identity_index = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index "
            "WHERE indrelid = 'agents'::regclass AND indisreplident"
        ).fetchone()
    assert {r[0] for r in published} == {"tickets", "agents"}
    assert identity == {"tickets": "d", "agents": "i"}
    assert identity_index == ("uq_agents_id_username",)

    _downgrade(empty_database_url)
    assert _tables(empty_database_url) == {"alembic_version"}
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_class WHERE relname = 'ticket_number_seq'"
        ).fetchone() == (0,)

    # And up again: the round trip leaves nothing behind that breaks a second upgrade.
    migrate(empty_database_url)
    assert _tables(empty_database_url) == TABLES | {"alembic_version"}


def test_publication_name_follows_cdc_publication(empty_database_url: str) -> None:
    with _environ(CDC_PUBLICATION="custom_pub"):
        migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        names = conn.execute("SELECT pubname FROM pg_publication").fetchall()
    assert names == [("custom_pub",)]


def test_models_and_migrations_agree(database_url: str) -> None:
    engine = create_engine(_sqlalchemy_url(database_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_check_constraints_match_the_models(database_url: str) -> None:
    # Alembic's autogenerate does not compare CHECK constraints; compare their names here.
    expected = set()
    for table in metadata.tables.values():
        for constraint in table.constraints:
            if isinstance(constraint, CheckConstraint):
                expected.add((table.name, str(constraint.name)))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint "
            "WHERE contype = 'c' AND connamespace = 'public'::regnamespace"
        ).fetchall()
    assert {(t, n) for t, n in rows} == expected
    assert len(expected) >= 15


def test_timestamps_are_timestamptz(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public'"
            " AND (column_name LIKE '%%_at' OR data_type LIKE 'timestamp%%')"
        ).fetchall()
    assert rows
    assert {r[2] for r in rows} == {"timestamp with time zone"}
