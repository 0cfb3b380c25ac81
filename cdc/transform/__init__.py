"""Stage 2, pure: from messages to Redis operations.

:mod:`.assemble` turns messages into transactions of row changes against a table view,
:mod:`.plan` turns each change into the operations of a :class:`~.plan.CommandBatch`
in the format of the batch script (:mod:`.script`) that applies them, and :mod:`.core`
is the per-message fast path that decides replays and where a batch may end. May import
:mod:`cdc.protocol`, ``cdc.errors`` and ``schema``; never performs I/O. Compiled by mypyc.
"""
