"""The running daemon: the streaming loop (:mod:`.pipeline`), sessions and start-up
decisions (:mod:`.daemon`, and after a PostgreSQL failover :mod:`.failover`), snapshot
loads and online backfills (:mod:`.snapshot`, :mod:`.backfill`) and the background
observer. Wires the stages together; the only layer that imports both
:mod:`cdc.postgres` and :mod:`cdc.cache`."""
