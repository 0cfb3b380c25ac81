"""Where batches end, proven without servers: the pipeline over a recorded stream and a fake sink.

The pipeline talks to its source and sink through narrow seams; here the source replays
pgoutput frames built in the test and the sink records every batch it is handed and
answers at once. Each batch must hold whole transactions, except a transaction larger
than the limit alone, which goes in chunks that record how far they got.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from cdc.cache.sink import ApplyResult, InFlight
from cdc.postgres import catalog
from cdc.runtime.pipeline import Pipeline
from cdc.settings import Settings, load_settings
from cdc.telemetry.metrics import Metrics
from cdc.transform.core import Position
from cdc.transform.plan import CommandBatch
from schema.keys import TRACKED_TABLES

EPOCH = 0
TICKETS_OID = 16400


def _xlog(lsn: int, payload: bytes) -> bytes:
    return b"w" + struct.pack(">QQQ", lsn, lsn, 0) + payload


def _relation() -> bytes:
    columns = [b"id", b"title"]
    body = struct.pack(">I", TICKETS_OID) + b"public\0tickets\0" + b"d" + struct.pack(">H", 2)
    for i, name in enumerate(columns):
        body += struct.pack(">B", 1 if i == 0 else 0) + name + b"\0" + struct.pack(">Ii", 25, -1)
    return b"R" + body


def _insert(row_id: bytes, title: bytes) -> bytes:
    tuple_data = struct.pack(">H", 2)
    for value in (row_id, title):
        tuple_data += b"t" + struct.pack(">I", len(value)) + value
    return b"I" + struct.pack(">I", TICKETS_OID) + b"N" + tuple_data


@dataclass
class Transaction:
    xid: int
    rows: int
    final_lsn: int = 0


def frames(transactions: list[Transaction]) -> list[bytes]:
    """pgoutput proto 1 CopyData frames for ``transactions`` (each inserts ``rows`` rows)."""
    out = [_xlog(0x1000, _relation())]
    lsn = 0x10000
    for tx in transactions:
        tx.final_lsn = lsn + 0x100 * (tx.rows + 1)
        out.append(_xlog(lsn, b"B" + struct.pack(">QqI", tx.final_lsn, EPOCH, tx.xid)))
        for n in range(tx.rows):
            out.append(_xlog(lsn + 0x100 * (n + 1), _insert(b"%d-%d" % (tx.xid, n), b"x" * 20)))
        commit = b"C" + struct.pack(">BQQq", 0, tx.final_lsn, tx.final_lsn + 0x10, EPOCH)
        out.append(_xlog(tx.final_lsn, commit))
        lsn = tx.final_lsn + 0x100
    return out


class FakeSource:
    """Replays frames, then reports an idle stream; ``stop`` is set when it runs dry."""

    def __init__(self, data: list[bytes | None], stop: threading.Event) -> None:
        self._data: Iterator[bytes | None] = iter(data)
        self._end = len(data)
        self._read = 0
        self._stop = stop
        self.confirmed: list[int] = []

    def read(self) -> bytes | None:
        """The next frame; None in the data is a moment of quiet (the loop idles)."""
        self._read += 1
        if self._read > self._end:
            self._stop.set()
            return None
        return next(self._data)

    def wait(self, timeout: float, also: int = -1) -> tuple[bool, bool]:
        return False, also >= 0

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        self.confirmed.append(flush)

    def finish(self, timeout: float = 5.0) -> bool:
        return True


@dataclass
class Sent:
    changes: int
    state: dict[str, str]
    keys: list[bytes] = field(default_factory=list)


class FakeSink:
    """Records what it is asked to apply and answers at once."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.publish_refused = False

    def send(self, batch: CommandBatch, state: dict[str, str]) -> InFlight:
        self.sent.append(Sent(batch.changes, dict(state)))
        return InFlight(batch, state.get("lsn", ""))

    def ready(self, sent: InFlight) -> bool:
        return True

    def buffered(self, sent: InFlight) -> bool:
        return True

    def receive(self, sent: InFlight) -> ApplyResult:
        return ApplyResult([])

    def fileno(self) -> int:
        return -1


def run(
    transactions: list[Transaction],
    position: Position | None = None,
    data: list[bytes | None] | None = None,
    **limits: Any,
) -> tuple[FakeSink, FakeSource]:
    settings: Settings = load_settings(
        database_url="postgresql://u@localhost/db", status_interval=0.001, **limits
    )
    stop = threading.Event()
    recorded: list[bytes | None] = list(frames(transactions)) if data is None else data
    source = FakeSource(recorded, stop)
    sink = FakeSink()
    pipeline = Pipeline(
        settings,
        TRACKED_TABLES,
        source,
        sink,
        cast(catalog.Conn, None),
        position or Position(0),
        Metrics(),
        stop,
        None,
    )
    pipeline.run()
    return sink, source


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 10])
def test_small_transactions_are_never_cut(limit: int) -> None:
    transactions = [Transaction(xid=100 + i, rows=2) for i in range(40)]
    sink, source = run(transactions, batch_max_changes=max(limit, 2))
    assert sum(s.changes for s in sink.sent) == 80
    for sent in sink.sent:
        assert sent.state["partial"] == ""
        assert sent.changes % 2 == 0, [s.changes for s in sink.sent]
    # The last checkpoint is the last commit's end, and it was confirmed.
    last = transactions[-1].final_lsn + 0x10
    assert sink.sent[-1].state["lsn"] == f"{last >> 32:X}/{last & 0xFFFFFFFF:X}"
    assert source.confirmed[-1] == last


def test_only_a_transaction_larger_than_the_limit_goes_in_chunks() -> None:
    transactions = [
        Transaction(xid=1, rows=2),
        Transaction(xid=2, rows=2),
        Transaction(xid=3, rows=12),
        Transaction(xid=4, rows=2),
    ]
    sink, _ = run(transactions, batch_max_changes=5)
    assert sum(s.changes for s in sink.sent) == 18
    chunks = [s for s in sink.sent if s.state["partial"]]
    big = transactions[2].final_lsn
    marker = f"{big >> 32:X}/{big & 0xFFFFFFFF:X}"
    # Chunks hold nothing but the large transaction and say how far into it they got.
    assert [c.state["partial"] for c in chunks] == [f"{marker}:6", f"{marker}:12"]
    assert [c.changes for c in chunks] == [6, 6]
    # The two small transactions before it went whole, before its first chunk.
    first_chunk = sink.sent.index(chunks[0])
    assert sum(s.changes for s in sink.sent[:first_chunk]) == 4
    for sent in sink.sent[:first_chunk]:
        assert sent.changes % 2 == 0


def test_the_byte_limit_also_ends_batches_at_commits() -> None:
    transactions = [Transaction(xid=10 + i, rows=3) for i in range(30)]
    sink, _ = run(transactions, batch_max_bytes=1024)
    assert sum(s.changes for s in sink.sent) == 90
    assert len(sink.sent) > 3  # the limit did cut
    for sent in sink.sent:
        assert sent.state["partial"] == ""
        assert sent.changes % 3 == 0


def test_a_checkpoint_move_keeps_how_far_a_resumed_large_transaction_got() -> None:
    """A restart inside a chunked transaction resumes at its change count; a keepalive's
    checkpoint move before the transaction arrives again must not erase that count (the
    first chunks would be applied again, their older values visible until overwritten)."""
    big = Transaction(xid=3, rows=12)
    data: list[bytes | None] = list(frames([big]))
    keepalive = b"k" + struct.pack(">QqB", 0x10500, 0, 1)
    data[1:1] = [keepalive, None]  # a keepalive and a quiet moment before its Begin
    sink, _ = run([], Position(0x10000, big.final_lsn, 6), data, batch_max_changes=5)
    assert sum(s.changes for s in sink.sent) == 6  # the 6 it had not applied yet
    marker = f"{big.final_lsn >> 32:X}/{big.final_lsn & 0xFFFFFFFF:X}"
    before_commit = [s for s in sink.sent if s.state["lsn"] != sink.sent[-1].state["lsn"]]
    assert before_commit
    assert all(s.state["partial"].startswith(marker + ":") for s in before_commit)
