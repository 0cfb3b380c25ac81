"""Decoder for pgoutput, PostgreSQL's built-in logical replication output plugin.

Pure: ``decode(payload) -> Message``. It never touches a socket or a clock, holds no
state (a streaming block's extra xid field is signalled by the caller), and is tested from
captured payloads. Protocol versions 1 and 2 (streaming) are understood; message formats
are those of "Logical Replication Message Formats" in the PostgreSQL documentation.

This module is on the hot path (every row of every transaction): it is written as plain
typed Python that mypyc compiles to C (see ``setup.py``), so prefer explicit byte indexing
over clever helpers here.
"""

from __future__ import annotations

from cdc.protocol.messages import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    DecodeError,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Relation,
    RelationColumn,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    TypeInfo,
    Update,
    Value,
)


def _u32(buf: bytes, pos: int) -> int:
    return (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]


def _u64(buf: bytes, pos: int) -> int:
    return (_u32(buf, pos) << 32) | _u32(buf, pos + 4)


def _i64(buf: bytes, pos: int) -> int:
    value = _u64(buf, pos)
    return value - (1 << 64) if value >= (1 << 63) else value


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise DecodeError("unterminated string")
    return buf[pos:end].decode("utf-8"), end + 1


def decode_tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """TupleData at ``pos``: the column values and the position after them."""
    if pos + 2 > len(buf):
        raise DecodeError("truncated tuple header")
    count = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    end = len(buf)
    # Filled by index rather than appended: no list regrowth (NULLs stay as they are).
    values: list[Value] = [None] * count
    for i in range(count):
        if pos >= end:
            raise DecodeError("truncated tuple")
        kind = buf[pos]
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
            if pos + 5 > end:
                raise DecodeError("truncated column length")
            length = (
                (buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]
            )
            pos += 5
            if pos + length > end:
                raise DecodeError("truncated column value")
            values[i] = buf[pos : pos + length]
            pos += length
        elif kind == 0x6E:  # 'n' null
            pos += 1
        elif kind == 0x75:  # 'u' unchanged TOAST
            values[i] = UNCHANGED_TOAST
            pos += 1
        else:
            raise DecodeError(f"unknown tuple column kind {kind:#04x}")
    return tuple(values), pos


def decode(payload: bytes, in_stream: bool = False, at: int = 0) -> Message:
    """One pgoutput message, starting at ``at`` in ``payload`` (so a CopyData buffer need
    not be sliced). ``in_stream``: inside StreamStart/StreamStop (protocol 2), where data
    messages carry the transaction's xid first."""
    if len(payload) <= at:
        raise DecodeError("empty pgoutput message")
    kind = payload[at]
    try:
        if kind == 0x49:  # 'I'
            return _insert(payload, in_stream, at)
        if kind == 0x55:  # 'U'
            return _update(payload, in_stream, at)
        if kind == 0x44:  # 'D'
            return _delete(payload, in_stream, at)
        if kind == 0x42:  # 'B'
            return Begin(_u64(payload, at + 1), _i64(payload, at + 9), _u32(payload, at + 17))
        if kind == 0x43:  # 'C'
            return Commit(
                payload[at + 1],
                _u64(payload, at + 2),
                _u64(payload, at + 10),
                _i64(payload, at + 18),
            )
        if kind == 0x52:  # 'R'
            return _relation(payload, in_stream, at)
        if kind == 0x54:  # 'T'
            return _truncate(payload, in_stream, at)
        if kind == 0x4F:  # 'O'
            name, _ = _cstring(payload, at + 9)
            return Origin(_u64(payload, at + 1), name)
        if kind == 0x59:  # 'Y'
            return _type(payload, in_stream, at)
        if kind == 0x4D:  # 'M'
            return _message(payload, in_stream, at)
        if kind == 0x53:  # 'S'
            return StreamStart(_u32(payload, at + 1), payload[at + 5] == 1)
        if kind == 0x45:  # 'E'
            return StreamStop()
        if kind == 0x63:  # 'c'
            return StreamCommit(
                _u32(payload, at + 1),
                payload[at + 5],
                _u64(payload, at + 6),
                _u64(payload, at + 14),
                _i64(payload, at + 22),
            )
        if kind == 0x41:  # 'A'
            return StreamAbort(_u32(payload, at + 1), _u32(payload, at + 5))
    except IndexError:
        raise DecodeError(f"truncated pgoutput message {chr(kind)!r}") from None
    raise DecodeError(f"unsupported pgoutput message type {kind:#04x}")


def _xid_prefix(payload: bytes, in_stream: bool, at: int) -> tuple[int | None, int]:
    if in_stream:
        return _u32(payload, at + 1), at + 5
    return None, at + 1


def _insert(payload: bytes, in_stream: bool, at: int) -> Insert:
    xid, pos = _xid_prefix(payload, in_stream, at)
    relid = _u32(payload, pos)
    if payload[pos + 4] != 0x4E:  # 'N'
        raise DecodeError("Insert without a new tuple")
    new, _ = decode_tuple(payload, pos + 5)
    return Insert(relid, new, xid)


def _update(payload: bytes, in_stream: bool, at: int) -> Update:
    xid, pos = _xid_prefix(payload, in_stream, at)
    relid = _u32(payload, pos)
    pos += 4
    old: TupleData | None = None
    old_is_key = False
    marker = payload[pos]
    if marker == 0x4B or marker == 0x4F:  # 'K' key, 'O' old row
        old_is_key = marker == 0x4B
        old, pos = decode_tuple(payload, pos + 1)
        marker = payload[pos]
    if marker != 0x4E:
        raise DecodeError("Update without a new tuple")
    new, _ = decode_tuple(payload, pos + 1)
    return Update(relid, new, old, old_is_key, xid)


def _delete(payload: bytes, in_stream: bool, at: int) -> Delete:
    xid, pos = _xid_prefix(payload, in_stream, at)
    relid = _u32(payload, pos)
    marker = payload[pos + 4]
    if marker != 0x4B and marker != 0x4F:
        raise DecodeError("Delete without an old key or row")
    old, _ = decode_tuple(payload, pos + 5)
    return Delete(relid, old, marker == 0x4B, xid)


def _relation(payload: bytes, in_stream: bool, at: int) -> Relation:
    xid, pos = _xid_prefix(payload, in_stream, at)
    relid = _u32(payload, pos)
    namespace, pos = _cstring(payload, pos + 4)
    name, pos = _cstring(payload, pos)
    identity = chr(payload[pos])
    count = (payload[pos + 1] << 8) | payload[pos + 2]
    pos += 3
    columns: list[RelationColumn] = []
    for _ in range(count):
        flags = payload[pos]
        column, pos = _cstring(payload, pos + 1)
        columns.append(
            RelationColumn(flags, column, _u32(payload, pos), _signed32(_u32(payload, pos + 4)))
        )
        pos += 8
    # pgoutput sends an empty namespace for pg_catalog.
    return Relation(relid, namespace or "pg_catalog", name, identity, tuple(columns), xid)


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= (1 << 31) else value


def _type(payload: bytes, in_stream: bool, at: int) -> TypeInfo:
    xid, pos = _xid_prefix(payload, in_stream, at)
    type_id = _u32(payload, pos)
    namespace, pos = _cstring(payload, pos + 4)
    name, _ = _cstring(payload, pos)
    return TypeInfo(type_id, namespace or "pg_catalog", name, xid)


def _truncate(payload: bytes, in_stream: bool, at: int) -> Truncate:
    xid, pos = _xid_prefix(payload, in_stream, at)
    count = _u32(payload, pos)
    options = payload[pos + 4]
    pos += 5
    relids = tuple(_u32(payload, pos + 4 * i) for i in range(count))
    if pos + 4 * count > len(payload):
        raise DecodeError("truncated Truncate message")
    return Truncate(relids, options, xid)


def _message(payload: bytes, in_stream: bool, at: int) -> LogicalMessage:
    xid, pos = _xid_prefix(payload, in_stream, at)
    transactional = bool(payload[pos] & 1)
    lsn = _u64(payload, pos + 1)
    prefix, pos = _cstring(payload, pos + 9)
    length = _u32(payload, pos)
    content = payload[pos + 4 : pos + 4 + length]
    if len(content) != length:
        raise DecodeError("truncated logical message content")
    return LogicalMessage(transactional, lsn, prefix, content, xid)
