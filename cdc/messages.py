"""Typed values for everything the replication stream carries.

Two layers, both decoded by pure functions and shared by every output plugin:

- the streaming-replication framing inside CopyData: :class:`XLogData` (WAL payload) and
  :class:`PrimaryKeepalive`; and the :func:`standby_status_update` we send back;
- the logical messages inside XLogData (pgoutput's, or wal2json's translated to the same
  shapes): :class:`Begin`, :class:`Commit`, :class:`Relation`, :class:`Insert`, ...

Column values stay as the bytes PostgreSQL sent (its text output, UTF-8): they go to
Redis unchanged. ``None`` is SQL NULL and :data:`UNCHANGED_TOAST` a TOASTed value the
UPDATE did not touch (pgoutput sends no data for it; the cached field must be kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Union


class UnchangedToast:
    """Marker for a TOASTed column an UPDATE left unchanged (pgoutput's ``'u'``)."""

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast()

Value = Union[bytes, None, UnchangedToast]  # noqa: UP007 - mypyc-friendly alias
TupleData = tuple[Value, ...]


class DecodeError(ValueError):
    """Bytes that are not a well-formed message of the protocol."""


# -- streaming replication framing ----------------------------------------------------------


@dataclass(frozen=True)
class XLogData:
    wal_start: int
    wal_end: int
    send_time: int
    payload: bytes


@dataclass(frozen=True)
class PrimaryKeepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


# -- logical replication messages ---------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: int
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True)
class RelationColumn:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]
    xid: int | None = None
    # True when the decoder made this up (wal2json has no relation messages).
    synthetic: bool = False

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True)
class TypeInfo:
    type_id: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(frozen=True)
class Insert:
    relation_id: int
    new: TupleData
    xid: int | None = None


@dataclass(frozen=True)
class Update:
    relation_id: int
    new: TupleData
    # The old row: its replica-identity columns ('K') or all columns ('O'), when sent.
    old: TupleData | None = None
    old_is_key: bool = False
    xid: int | None = None


@dataclass(frozen=True)
class Delete:
    relation_id: int
    old: TupleData
    old_is_key: bool = True
    xid: int | None = None


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


@dataclass(frozen=True)
class Truncate:
    relation_ids: tuple[int, ...]
    options: int = 0
    xid: int | None = None


@dataclass(frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(frozen=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True)
class StreamStop:
    pass


@dataclass(frozen=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True)
class StreamAbort:
    xid: int
    subxid: int


Message = Union[  # noqa: UP007
    Begin,
    Commit,
    Origin,
    Relation,
    TypeInfo,
    Insert,
    Update,
    Delete,
    Truncate,
    LogicalMessage,
    StreamStart,
    StreamStop,
    StreamCommit,
    StreamAbort,
]

# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 00:00:00 UTC).
POSTGRES_EPOCH_OFFSET_US: Final = 946_684_800_000_000


def pg_time_to_unix(pg_us: int) -> float:
    """A PostgreSQL timestamp (µs since 2000-01-01 UTC) as Unix seconds."""
    return (pg_us + POSTGRES_EPOCH_OFFSET_US) / 1_000_000


def unix_to_pg_time(unix_seconds: float) -> int:
    return int(unix_seconds * 1_000_000) - POSTGRES_EPOCH_OFFSET_US


def parse_copy_data(buf: bytes) -> XLogData | PrimaryKeepalive:
    """The framing of one CopyData message from the walsender."""
    if not buf:
        raise DecodeError("empty CopyData message")
    kind = buf[0]
    if kind == 0x77:  # 'w'
        if len(buf) < 25:
            raise DecodeError("XLogData shorter than its header")
        return XLogData(
            int.from_bytes(buf[1:9], "big"),
            int.from_bytes(buf[9:17], "big"),
            int.from_bytes(buf[17:25], "big", signed=True),
            buf[25:],
        )
    if kind == 0x6B:  # 'k'
        if len(buf) < 18:
            raise DecodeError("keepalive shorter than 18 bytes")
        return PrimaryKeepalive(
            int.from_bytes(buf[1:9], "big"),
            int.from_bytes(buf[9:17], "big", signed=True),
            buf[17] != 0,
        )
    raise DecodeError(f"unknown CopyData message type {kind:#04x}")


def standby_status_update(write: int, flush: int, apply: int, now_pg_us: int, reply: bool) -> bytes:
    """The ``'r'`` message confirming WAL positions to the walsender."""
    return (
        b"r"
        + write.to_bytes(8, "big")
        + flush.to_bytes(8, "big")
        + apply.to_bytes(8, "big")
        + now_pg_us.to_bytes(8, "big", signed=True)
        + (b"\x01" if reply else b"\x00")
    )
