"""Alembic environment: migrates the database named by ``DATABASE_URL``.

Run from the repository root: ``alembic upgrade head`` (configuration lives in
``pyproject.toml`` under ``[tool.alembic]``). ``-x url=…`` overrides the
environment; every form libpq takes is accepted (:mod:`schema.dsn`). ``CDC_PUBLICATION``
names the publication the migrations create. Like the daemon, the migrations also read
``.env`` from the working directory (variables already set win).
"""

from __future__ import annotations

import os

from alembic import context
from dotenv import load_dotenv
from sqlalchemy import pool

from schema.dsn import Dsn, DsnError, parse_dsn, sqlalchemy_engine
from schema.tables import metadata

target_metadata = metadata
load_dotenv(".env", override=False)


def database_dsn() -> Dsn:
    """``-x url=…`` or ``DATABASE_URL``, in any form libpq takes (schema.dsn)."""
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("DATABASE_URL")
    if not url or not url.strip():
        raise SystemExit("DATABASE_URL is not set: point it at the PostgreSQL database to migrate")
    try:
        return parse_dsn(url, "DATABASE_URL")
    except DsnError as exc:
        raise SystemExit(str(exc)) from None


def run_migrations_offline() -> None:
    context.configure(
        url="postgresql+psycopg://",
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = context.config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = sqlalchemy_engine(database_dsn(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
