"""RESP (Redis protocol) encoding of commands, appended to a ``bytearray``.

A batch of commands is built in one buffer and sent in one write; nothing here performs
I/O. Hot path, compiled by mypyc: bulk-string headers for short values come from a table.
"""

from __future__ import annotations

from typing import Final

CRLF: Final = b"\r\n"
_HEADERS: Final = [b"$%d\r\n" % n for n in range(4096)]
_ARRAYS: Final = [b"*%d\r\n" % n for n in range(512)]


def bulk_header(length: int) -> bytes:
    return _HEADERS[length] if length < 4096 else b"$%d\r\n" % length


def array_header(count: int) -> bytes:
    return _ARRAYS[count] if count < 512 else b"*%d\r\n" % count


def append_bulk(buf: bytearray, data: bytes) -> None:
    buf += bulk_header(len(data))
    buf += data
    buf += CRLF


def append_command(buf: bytearray, args: list[bytes]) -> None:
    buf += array_header(len(args))
    for arg in args:
        buf += bulk_header(len(arg))
        buf += arg
        buf += CRLF


def command(*args: bytes) -> bytes:
    buf = bytearray()
    append_command(buf, list(args))
    return bytes(buf)


def reply_end(buf: bytearray, pos: int) -> int:
    """Offset just past the RESP2 reply starting at ``pos`` in ``buf``; -1 if incomplete.

    Lets a reader hand a parser exactly one transaction's replies, leaving the bytes of
    the next (already arriving, as batches are pipelined) untouched.
    """
    size = len(buf)
    if pos >= size:
        return -1
    eol = buf.find(CRLF, pos)
    if eol < 0:
        return -1
    kind = buf[pos]
    if kind == 43 or kind == 45 or kind == 58:  # "+", "-", ":"
        return eol + 2
    if kind == 36:  # "$"
        length = int(buf[pos + 1 : eol])
        if length < 0:
            return eol + 2
        end = eol + 2 + length + 2
        return end if end <= size else -1
    if kind == 42:  # "*"
        count = int(buf[pos + 1 : eol])
        at = eol + 2
        for _ in range(count):
            at = reply_end(buf, at)
            if at < 0:
                return -1
        return at
    raise ValueError(f"not a RESP2 reply at offset {pos}: {bytes(buf[pos : pos + 16])!r}")
