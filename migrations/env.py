"""Alembic environment: migrates the database named by ``DATABASE_URL``.

Run from the repository root: ``alembic upgrade head`` (configuration lives in
``pyproject.toml`` under ``[tool.alembic]``). ``-x url=postgresql://…`` overrides the
environment. ``CDC_PUBLICATION`` names the publication the migrations create.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from schema.tables import metadata

target_metadata = metadata


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("DATABASE_URL is not set: point it at the PostgreSQL database to migrate")
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise SystemExit("DATABASE_URL must start with postgresql://")


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
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
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
