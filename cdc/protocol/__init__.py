"""Stage 1, pure: the wire protocols as values.

The replication stream's CopyData frames and pgoutput messages (:mod:`.messages`,
:mod:`.pgoutput`), the wal2json decoder, and RESP, Redis' protocol (:mod:`.resp`, the
encoding the planner writes operations in). LSNs are :mod:`schema.lsn`. Bytes in,
typed messages out; a malformed record raises :class:`cdc.errors.DecodeError`. Imports
nothing but the standard library, ``cdc.errors`` and ``schema``; never performs I/O.
Compiled by mypyc.
"""
