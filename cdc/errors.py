"""The daemon's errors: one tree, split into what is retried and what stops it.

::

    CdcError
    ├── ConfigError          fatal: exit code 2 and one line saying what to fix
    ├── Retryable            reconnect with backoff, then carry on
    │   ├── PostgresUnavailable
    │   ├── RedisUnavailable
    │   ├── RedisRejected    Redis refused a command (e.g. OOM); nothing was applied
    │   └── SlotInUse        another process streams from the slot
    ├── RedisLost            Redis lost the cache (state key gone, or behind the slot): rebuild
    ├── SlotInvalidated      the slot lost required WAL (max_slot_wal_keep_size): recreate it
    ├── Fenced               another daemon took over; this one must not write again
    ├── ProtocolError        the stream broke the protocol (a bug; never retried blindly)
    ├── RecordError          one record cannot be decoded, assembled or planned
    │   ├── DecodeError      (cdc.protocol.messages: bytes that are not a well-formed message)
    │   ├── AssemblyError    (cdc.transform.assemble: messages in an order the protocol forbids)
    │   └── PlanError        (cdc.transform.plan: a change that cannot be mirrored)
    └── PoisonRecord         fatal, exit code 3: names the record's LSN and table
        └── ApplyFailed      Redis refused a command of the batch for good

A :class:`RecordError` met while streaming becomes a :class:`PoisonRecord`: the daemon stops
with one line naming where (LSN, table) and what kind of failure, never the row's contents,
and confirms nothing past it, so after a fix it starts again at that record.

Messages never include secrets or row contents.
"""

from __future__ import annotations


class CdcError(Exception):
    """Base of every error the daemon raises."""


class ConfigError(CdcError):
    """Misconfiguration: the daemon cannot run until a person fixes something."""

    exit_code = 2


class Retryable(CdcError):
    """A peer is unreachable or busy; retry after a backoff."""


class PostgresUnavailable(Retryable):
    pass


class RedisUnavailable(Retryable):
    pass


class RedisRejected(Retryable):
    pass


class SlotInUse(Retryable):
    def __init__(self, slot: str, pid: int | None) -> None:
        self.slot = slot
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f'slot "{slot}" is in use by {who}')


class RedisLost(CdcError):
    """The cache in Redis is gone or older than the slot: it must be rebuilt."""


class SlotInvalidated(CdcError):
    """The slot can no longer stream (its WAL was removed)."""


class Fenced(CdcError):
    """Another daemon holds the fence: stop writing."""


class ProtocolError(CdcError):
    """The replication stream broke the protocol."""


class RecordError(CdcError):
    """One record of the stream cannot be handled (its message never holds row values)."""


class PoisonRecord(CdcError):
    """A record the daemon cannot decode or apply: stop (exit code 3), confirm nothing past it."""

    exit_code = 3

    def __init__(self, lsn: str, table: str, reason: str) -> None:
        self.lsn = lsn
        self.table = table
        self.reason = reason
        super().__init__(f"cannot apply the record at LSN {lsn} (table {table}): {reason}")


class ApplyFailed(PoisonRecord):
    """Redis refused a command of a batch, not for a reason that passes by itself."""
