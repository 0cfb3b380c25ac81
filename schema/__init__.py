"""What ``writer``, ``cdc`` and ``migrations`` share: the tables, the models, the Redis layout.

- :mod:`schema.tables`: SQLAlchemy 2 typed models of the nine tables (source of the DDL).
- :mod:`schema.models`: pydantic models services pass in and get back.
- :mod:`schema.keys`: the Redis key layout and which tables are streamed.
- :mod:`schema.enums`: the enumerations (CHECK constraints and field types).
- :mod:`schema.pgtext`: PostgreSQL text values (as cached) back to Python values.

``schema.keys`` imports nothing heavy, so the daemon can use it without SQLAlchemy.
"""
