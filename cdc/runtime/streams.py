"""Streamed in-progress transactions (pgoutput protocol 2, ``streaming 'on'``, PostgreSQL 14+).

With streaming, the walsender sends a large transaction while it is still running, in
blocks framed by Stream Start / Stream Stop, instead of spilling it to the server's disk
and sending it after its commit. Several transactions may stream at once, interleaved
with each other and with ordinary transactions that commit between the blocks. A Stream
Commit or Stream Abort (outside any block) ends one.

Nothing of a streamed transaction is applied before its commit. :class:`StreamBuffers`
keeps the raw CopyData messages of each open streamed transaction: in memory up to a
limit shared by all of them, then in the daemon's own spill file (one per transaction, in
the state directory; removed at commit or abort, and at the start of every session, since
the server streams an unfinished transaction again from its beginning). At Stream Commit,
:meth:`StreamBuffers.feed` returns the transaction as ordinary messages: a Begin whose
``final_lsn`` is the commit LSN, the buffered changes in stream order, a Commit. The
pipeline feeds them to the stream core like any other transaction, so it is applied with
the same guarantees (whole up to the batch limit, in resumable chunks beyond it) and a
replay after a crash is recognised by its commit LSN as today.

A Stream Abort whose subxid differs from the xid rolls back one subtransaction: like
PostgreSQL's own subscriber, the buffer is cut back to where that subtransaction's first
change was (everything after it belongs to it or its own subtransactions). Relation and
Type messages cut away with it are sent again by the server when needed (PostgreSQL's
own subscriber cuts its stream file the same way).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import BinaryIO, Final

from cdc.protocol import pgoutput
from cdc.protocol.messages import (
    Begin,
    Commit,
    DecodeError,
    Message,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
)

# pgoutput message kinds that exist only with streaming.
STREAM_START: Final = 0x53  # 'S'
STREAM_STOP: Final = 0x45  # 'E'
STREAM_COMMIT: Final = 0x63  # 'c'
STREAM_ABORT: Final = 0x41  # 'A'
STREAM_KINDS: Final = frozenset((STREAM_START, STREAM_STOP, STREAM_COMMIT, STREAM_ABORT))
_RELATION: Final = 0x52  # 'R'
_TYPE: Final = 0x59  # 'Y'
# The XLogData header before the pgoutput message.
_HEADER: Final = 25
# What one buffered message costs in memory besides its bytes (object header, list slot).
_OVERHEAD: Final = 56
# Spill file writes and reads go in chunks of this size.
_CHUNK: Final = 1 << 20
SPILL_SUFFIX: Final = ".spill"


def state_directory(setting: str) -> Path:
    """``CDC_STATE_DIR``, or a directory under the system's temporary directory."""
    return Path(setting) if setting else Path(tempfile.gettempdir()) / "pg-redis-cdc"


class StreamError(DecodeError):
    """Stream messages in an order the protocol does not allow."""


class _Transaction:
    """One open streamed transaction: its messages so far, in memory then in a file.

    The file holds length-prefixed messages; writes gather in ``pending`` and go to the
    file a megabyte at a time, and the replay reads it back in chunks of that size."""

    def __init__(self, xid: int) -> None:
        self.xid = xid
        self.memory: list[bytes] = []
        self.memory_bytes = 0
        self.file: BinaryIO | None = None
        self.path: Path | None = None
        self.spilled = 0  # messages in the file (and pending)
        self.written = 0  # bytes in the file
        self.pending = bytearray()
        # First position of each subtransaction: (messages in memory, file offset, spilled).
        self.subxacts: dict[int, tuple[int, int, int]] = {}

    @property
    def count(self) -> int:
        return len(self.memory) + self.spilled

    def mark(self, subxid: int) -> None:
        if subxid not in self.subxacts:
            offset = self.written + len(self.pending)
            self.subxacts[subxid] = (len(self.memory), offset, self.spilled)

    def spill(self, data: bytes) -> None:
        pending = self.pending
        size = len(data)
        pending.extend(size.to_bytes(4, "big"))
        pending.extend(data)
        self.spilled += 1
        if len(pending) >= _CHUNK:
            self._write()

    def _write(self) -> None:
        assert self.file is not None
        view = memoryview(self.pending)
        while view:
            done = self.file.write(view)
            view = view[done:]
        view.release()
        self.written += len(self.pending)
        self.pending.clear()

    def truncate(self, offset: int, spilled: int) -> None:
        """Drop what the file holds from ``offset`` on (``spilled`` messages remain)."""
        if offset >= self.written:
            del self.pending[offset - self.written :]
        else:
            assert self.file is not None
            self.pending.clear()
            self.file.truncate(offset)
            self.file.seek(offset)
            self.written = offset
        self.spilled = spilled

    def messages(self) -> Iterator[bytes]:
        yield from self.memory
        if self.file is None:
            return
        file = self.file
        if self.pending:
            self._write()
        file.seek(0)
        buf = b""
        pos = 0
        for _ in range(self.spilled):
            if pos + 4 > len(buf):
                buf = buf[pos:] + file.read(_CHUNK)
                pos = 0
            length = (buf[pos] << 24) | (buf[pos + 1] << 16) | (buf[pos + 2] << 8) | buf[pos + 3]
            end = pos + 4 + length
            if end > len(buf):
                buf = buf[pos:] + file.read(max(_CHUNK, end - pos))
                pos = 0
                end = 4 + length
                if end > len(buf):
                    raise StreamError("spill file shorter than written")
            yield buf[pos + 4 : end]
            pos = end

    def close(self) -> None:
        """Close and remove the spill file (it may be gone already: a newer session cleans)."""
        file, self.file = self.file, None
        self.pending = bytearray()
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None


class StreamStats:
    """Counters for tests, metrics and the benchmark."""

    def __init__(self) -> None:
        self.committed = 0
        self.aborted = 0
        self.subxact_aborts = 0
        self.spill_files = 0
        self.spilled_bytes = 0


class StreamBuffers:
    """The open streamed transactions of one replication session.

    ``memory_limit``: bytes of messages held in memory across all open transactions;
    past it, the transaction that grows writes to its spill file in ``state_dir``.
    """

    def __init__(self, state_dir: Path, slot: str, memory_limit: int) -> None:
        self.state_dir = state_dir
        self.slot = slot
        self.memory_limit = memory_limit
        self.memory_bytes = 0
        self.open: dict[int, _Transaction] = {}
        self.current: _Transaction | None = None  # inside Stream Start .. Stream Stop
        self.stats = StreamStats()

    @property
    def in_block(self) -> bool:
        return self.current is not None

    def clean(self) -> int:
        """Remove this slot's spill files left by an earlier session or process.

        Only the session that holds the slot streams from it, so the files are stale:
        the server streams those transactions again from their beginning."""
        removed = 0
        for path in self.state_dir.glob(f"{self.slot}.*{SPILL_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    def close(self) -> None:
        for tx in self.open.values():
            tx.close()
        self.open.clear()
        self.current = None
        self.memory_bytes = 0

    def spill_paths(self) -> list[Path]:
        return [tx.path for tx in self.open.values() if tx.path is not None]

    # -- the stream ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> Generator[Message, None, None] | None:
        """An XLogData message that is a stream message or inside a stream block.

        Returns the committed transaction's messages at Stream Commit, else None."""
        kind = data[_HEADER]
        current = self.current
        if current is not None and kind not in STREAM_KINDS:
            self._append(current, data)
            return None
        try:
            message = pgoutput.decode(data, False, _HEADER)
        except DecodeError as exc:
            raise StreamError(str(exc)) from None
        if isinstance(message, StreamStart):
            if current is not None:
                raise StreamError("Stream Start inside a stream block")
            tx = self.open.get(message.xid)
            if tx is None:
                tx = self.open[message.xid] = _Transaction(message.xid)
            self.current = tx
            return None
        if isinstance(message, StreamStop):
            if current is None:
                raise StreamError("Stream Stop outside a stream block")
            self.current = None
            return None
        if current is not None:
            raise StreamError("Stream Commit or Abort inside a stream block")
        if isinstance(message, StreamAbort):
            self._abort(message.xid, message.subxid)
            return None
        if isinstance(message, StreamCommit):
            self.stats.committed += 1
            return self._replay(self.open.pop(message.xid, None), message)
        raise StreamError(f"unexpected {type(message).__name__} outside a stream block")

    def _append(self, tx: _Transaction, data: bytes) -> None:
        kind = data[_HEADER]
        if kind not in (_RELATION, _TYPE) and len(data) >= _HEADER + 5:
            tx.mark(_u32(data, _HEADER + 1))
        size = len(data) + _OVERHEAD
        if tx.file is None and self.memory_bytes + size <= self.memory_limit:
            tx.memory.append(data)
            tx.memory_bytes += size
            self.memory_bytes += size
            return
        if tx.file is None:
            self._open_spill(tx)
        tx.spill(data)
        self.stats.spilled_bytes += len(data) + 4

    def _open_spill(self, tx: _Transaction) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f"{self.slot}.{tx.xid}.", suffix=SPILL_SUFFIX, dir=self.state_dir
        )
        tx.path = Path(name)
        tx.file = os.fdopen(fd, "w+b", buffering=0)
        self.stats.spill_files += 1

    def _abort(self, xid: int, subxid: int) -> None:
        tx = self.open.get(xid)
        if tx is None:
            return  # nothing of it was streamed
        if subxid == xid:
            self._forget(self.open.pop(xid))
            self.stats.aborted += 1
            return
        self.stats.subxact_aborts += 1
        cut = tx.subxacts.get(subxid)
        if cut is None:
            return  # none of its changes were streamed
        in_memory, offset, spilled = cut
        # Everything from the cut on goes: memory[in_memory:], then the file from offset.
        if in_memory < len(tx.memory):
            freed = sum(len(d) + _OVERHEAD for d in tx.memory[in_memory:])
            del tx.memory[in_memory:]
            tx.memory_bytes -= freed
            self.memory_bytes -= freed
        if tx.file is not None:
            tx.truncate(offset, spilled)
        index = in_memory + spilled
        tx.subxacts = {s: p for s, p in tx.subxacts.items() if p[0] + p[2] < index}

    def _forget(self, tx: _Transaction) -> None:
        self.memory_bytes -= tx.memory_bytes
        tx.memory = []
        tx.memory_bytes = 0
        tx.close()

    def _replay(
        self, tx: _Transaction | None, commit: StreamCommit
    ) -> Generator[Message, None, None]:
        yield Begin(commit.commit_lsn, commit.commit_time, commit.xid)
        if tx is not None:
            try:
                for data in tx.messages():
                    yield pgoutput.decode(data, True, _HEADER)
            finally:
                self._forget(tx)
        yield Commit(commit.flags, commit.commit_lsn, commit.end_lsn, commit.commit_time)


def _u32(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos : pos + 4], "big")
