"""I/O with PostgreSQL: the replication connection (:mod:`.source`), catalog queries
(:mod:`.catalog`) and reading tracked rows as text (:mod:`.rows`). May import the pure
stages, ``cdc.settings``/``cdc.errors`` and ``schema``; never Redis."""
