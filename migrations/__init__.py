"""Alembic migrations: the tables, the ``cdc_cache`` publication and replica identities."""
