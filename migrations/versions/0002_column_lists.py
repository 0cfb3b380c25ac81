"""password_hash never leaves PostgreSQL: a publication column list for agents, kept in
step with ALTER TABLE by event triggers (:mod:`migrations.column_lists`).

- PostgreSQL 15+: the publication's ``agents`` entry lists every column but the excluded
  ones (``password_hash``), so they are never decoded into the replication stream. Roles
  holding column-level SELECT on agents (the daemon's, ``docker/grants/``) follow too.
- Older servers have no column lists: the migration warns, and ``password_hash`` keeps
  travelling in the stream (the daemon never writes it to Redis and warns at start).
- Without superuser the event triggers cannot be created: the migration warns; after
  ``ALTER TABLE agents ADD COLUMN`` run ``SELECT cdc_sync_column_lists()``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 05:40:00
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations.column_lists import DROP_SQL, TRIGGERS_SQL, functions_sql, protected_tables
from migrations.publication import publication_name

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def _raw(sql: str) -> None:
    """Run SQL as written (no bind-parameter parsing: it holds ``%I`` and ``::``)."""
    dbapi = op.get_bind().connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def _server_has_column_lists() -> bool:
    version = op.get_bind().execute(sa.text("SHOW server_version_num")).scalar_one()
    return int(str(version)) >= 150000


def _is_superuser() -> bool:
    row = op.get_bind().execute(
        sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    )
    return bool(row.scalar_one())


def upgrade() -> None:
    publication = publication_name()
    columns = ", ".join(f"{s}.{t}.{c}" for s, t, cols in protected_tables() for c in cols)
    if not _server_has_column_lists():
        _warn(
            f"PostgreSQL < 15 has no publication column lists: {columns} will travel in the"
            " replication stream (never to Redis); upgrade PostgreSQL to keep it in the server"
        )
        return
    _raw(functions_sql())
    op.execute(
        sa.text("SELECT public.cdc_sync_column_lists(ARRAY[:publication])").bindparams(
            publication=publication
        )
    )
    if _is_superuser():
        _raw(TRIGGERS_SQL)
    else:
        _warn(
            "event triggers need a superuser: the column list of the publication will not"
            " follow ALTER TABLE by itself; after adding a column run"
            " SELECT cdc_sync_column_lists() (or run this migration as a superuser)"
        )


def downgrade() -> None:
    if not _server_has_column_lists():
        return
    _raw(DROP_SQL)
    publication = publication_name()
    for schema, table, _columns in protected_tables():
        qualified = f'"{schema}"."{table}"'
        op.execute(f'ALTER PUBLICATION "{publication}" DROP TABLE {qualified}')
        op.execute(f'ALTER PUBLICATION "{publication}" ADD TABLE {qualified}')
