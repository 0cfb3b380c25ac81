"""Stage 1, pure: the replication protocol as values.

LSNs, the CopyData frames and pgoutput messages (:mod:`.messages`, :mod:`.pgoutput`) and
the wal2json decoder. Bytes in, typed messages out; a malformed record raises
:class:`cdc.errors.DecodeError`. Imports nothing but the standard library, ``cdc.errors``
and ``schema``; never performs I/O. Compiled by mypyc.
"""
