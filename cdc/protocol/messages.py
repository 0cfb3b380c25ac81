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

from typing import Any, ClassVar, Final, Union

from cdc.errors import RecordError


class UnchangedToast:
    """Marker for a TOASTed column an UPDATE left unchanged (pgoutput's ``'u'``)."""

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast()

Value = Union[bytes, None, UnchangedToast]  # noqa: UP007 - mypyc-friendly alias
TupleData = tuple[Value, ...]


class DecodeError(RecordError):
    """Bytes that are not a well-formed message of the protocol."""


class Record:
    """Base of the protocol values: immutable attributes (``Final``), compared and shown by
    the fields named in ``_fields``.

    Plain native classes rather than frozen dataclasses: compiled by mypyc, constructing
    one costs 0.1 µs instead of 1.2 µs (a frozen dataclass keeps Python's generated
    ``__init__``), and the stream builds several per row.
    """

    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


# -- streaming replication framing ----------------------------------------------------------


class XLogData(Record):
    _fields = ("wal_start", "wal_end", "send_time", "payload")

    def __init__(self, wal_start: int, wal_end: int, send_time: int, payload: bytes) -> None:
        self.wal_start: Final = wal_start
        self.wal_end: Final = wal_end
        self.send_time: Final = send_time
        self.payload: Final = payload


class PrimaryKeepalive(Record):
    _fields = ("wal_end", "send_time", "reply_requested")

    def __init__(self, wal_end: int, send_time: int, reply_requested: bool) -> None:
        self.wal_end: Final = wal_end
        self.send_time: Final = send_time
        self.reply_requested: Final = reply_requested


# -- logical replication messages ---------------------------------------------------------------


class Begin(Record):
    _fields = ("final_lsn", "commit_time", "xid")

    def __init__(self, final_lsn: int, commit_time: int, xid: int) -> None:
        self.final_lsn: Final = final_lsn
        self.commit_time: Final = commit_time
        self.xid: Final = xid


class Commit(Record):
    _fields = ("flags", "commit_lsn", "end_lsn", "commit_time")

    def __init__(self, flags: int, commit_lsn: int, end_lsn: int, commit_time: int) -> None:
        self.flags: Final = flags
        self.commit_lsn: Final = commit_lsn
        self.end_lsn: Final = end_lsn
        self.commit_time: Final = commit_time


class Origin(Record):
    _fields = ("commit_lsn", "name")

    def __init__(self, commit_lsn: int, name: str) -> None:
        self.commit_lsn: Final = commit_lsn
        self.name: Final = name


class RelationColumn(Record):
    _fields = ("flags", "name", "type_oid", "type_modifier")

    def __init__(self, flags: int, name: str, type_oid: int, type_modifier: int) -> None:
        self.flags: Final = flags
        self.name: Final = name
        self.type_oid: Final = type_oid
        self.type_modifier: Final = type_modifier

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


class Relation(Record):
    """``synthetic``: made up by the decoder (wal2json has no relation messages)."""

    _fields = (
        "relation_id",
        "namespace",
        "name",
        "replica_identity",
        "columns",
        "xid",
        "synthetic",
    )

    def __init__(
        self,
        relation_id: int,
        namespace: str,
        name: str,
        replica_identity: str,
        columns: tuple[RelationColumn, ...],
        xid: int | None = None,
        synthetic: bool = False,
    ) -> None:
        self.relation_id: Final = relation_id
        self.namespace: Final = namespace
        self.name: Final = name
        self.replica_identity: Final = replica_identity
        self.columns: Final = columns
        self.xid: Final = xid
        self.synthetic: Final = synthetic

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


class TypeInfo(Record):
    _fields = ("type_id", "namespace", "name", "xid")

    def __init__(self, type_id: int, namespace: str, name: str, xid: int | None = None) -> None:
        self.type_id: Final = type_id
        self.namespace: Final = namespace
        self.name: Final = name
        self.xid: Final = xid


class Insert(Record):
    _fields = ("relation_id", "new", "xid")

    def __init__(self, relation_id: int, new: TupleData, xid: int | None = None) -> None:
        self.relation_id: Final = relation_id
        self.new: Final = new
        self.xid: Final = xid


class Update(Record):
    """``old``: the old row's replica-identity columns ('K') or all of it ('O'), if sent."""

    _fields = ("relation_id", "new", "old", "old_is_key", "xid")

    def __init__(
        self,
        relation_id: int,
        new: TupleData,
        old: TupleData | None = None,
        old_is_key: bool = False,
        xid: int | None = None,
    ) -> None:
        self.relation_id: Final = relation_id
        self.new: Final = new
        self.old: Final = old
        self.old_is_key: Final = old_is_key
        self.xid: Final = xid


class Delete(Record):
    _fields = ("relation_id", "old", "old_is_key", "xid")

    def __init__(
        self,
        relation_id: int,
        old: TupleData,
        old_is_key: bool = True,
        xid: int | None = None,
    ) -> None:
        self.relation_id: Final = relation_id
        self.old: Final = old
        self.old_is_key: Final = old_is_key
        self.xid: Final = xid


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


class Truncate(Record):
    _fields = ("relation_ids", "options", "xid")

    def __init__(
        self, relation_ids: tuple[int, ...], options: int = 0, xid: int | None = None
    ) -> None:
        self.relation_ids: Final = relation_ids
        self.options: Final = options
        self.xid: Final = xid


class LogicalMessage(Record):
    _fields = ("transactional", "lsn", "prefix", "content", "xid")

    def __init__(
        self,
        transactional: bool,
        lsn: int,
        prefix: str,
        content: bytes,
        xid: int | None = None,
    ) -> None:
        self.transactional: Final = transactional
        self.lsn: Final = lsn
        self.prefix: Final = prefix
        self.content: Final = content
        self.xid: Final = xid


class StreamStart(Record):
    _fields = ("xid", "first_segment")

    def __init__(self, xid: int, first_segment: bool) -> None:
        self.xid: Final = xid
        self.first_segment: Final = first_segment


class StreamStop(Record):
    _fields = ()

    def __init__(self) -> None:
        pass


class StreamCommit(Record):
    _fields = ("xid", "flags", "commit_lsn", "end_lsn", "commit_time")

    def __init__(
        self, xid: int, flags: int, commit_lsn: int, end_lsn: int, commit_time: int
    ) -> None:
        self.xid: Final = xid
        self.flags: Final = flags
        self.commit_lsn: Final = commit_lsn
        self.end_lsn: Final = end_lsn
        self.commit_time: Final = commit_time


class StreamAbort(Record):
    _fields = ("xid", "subxid")

    def __init__(self, xid: int, subxid: int) -> None:
        self.xid: Final = xid
        self.subxid: Final = subxid


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
