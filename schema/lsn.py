"""WAL positions (LSNs): a typed integer and its PostgreSQL text form ``'16/B374D848'``.

An :data:`Lsn` is a plain ``int`` at run time (the hot path compares millions of them) and
a distinct type for mypy, so a byte count or a timestamp cannot be passed where a WAL
position is expected. In ``schema`` because the writer (read-your-writes tokens), the
daemon and the tests all read and write LSNs: one helper for all of them.
"""

from __future__ import annotations

from typing import NewType

Lsn = NewType("Lsn", int)

_MAX = (1 << 64) - 1


class LsnError(ValueError):
    """Text that is not a WAL position."""


def parse_lsn(text: str | bytes) -> Lsn:
    """``'16/B374D848'`` (either case) to an :data:`Lsn`."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    high, sep, low = raw.strip().partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise LsnError(f"not an LSN: {raw!r}")
    try:
        return Lsn((int(high, 16) << 32) | int(low, 16))
    except ValueError:
        raise LsnError(f"not an LSN: {raw!r}") from None


def format_lsn(lsn: int) -> str:
    """An integer WAL position in PostgreSQL's text form."""
    if not 0 <= lsn <= _MAX:
        raise LsnError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_bytes(lsn: int) -> bytes:
    return format_lsn(lsn).encode("ascii")
