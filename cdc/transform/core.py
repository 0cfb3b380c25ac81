"""The per-message fast path: CopyData bytes to Redis commands, compiled by mypyc.

Almost every message of a stream is a row change, a begin or a commit.
:meth:`StreamCore.feed` decodes each straight from the CopyData buffer (no slicing),
resolves it through the assembler and acts on it without returning to interpreted code:
a begin decides whether the transaction was already applied (:class:`Position`), a row
is planned into the batch (and noted for an open backfill window), a commit moves the
batch's checkpoint and :class:`Boundary`. Everything else (truncate, schema changes,
keepalives, a full batch, and commits while a backfill window is open) comes back to
the pipeline as a value to act on.

The pipeline sets ``watch_table`` and ``window_sees`` while a backfill window is open.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final, Union

from cdc.protocol import pgoutput
from cdc.protocol.messages import (
    Message,
    PrimaryKeepalive,
    XLogData,
    parse_copy_data,
    pg_time_to_unix,
)
from cdc.transform.assemble import DELETE, Assembler, Event, RowChange, TxBegin, TxCommit
from cdc.transform.plan import Boundary, CommandBatch, Planner


class BatchFull:
    """Returned by :meth:`StreamCore.feed` when the batch reached its limit."""


BATCH_FULL: Final = BatchFull()

Outcome = Union[Event, PrimaryKeepalive, XLogData, BatchFull, None]  # noqa: UP007


class Position:
    """What is applied: the checkpoint and, for a large transaction, how far into it."""

    def __init__(
        self, checkpoint: int, partial_lsn: int | None = None, partial_count: int = 0
    ) -> None:
        self.checkpoint = checkpoint
        self.partial_lsn = partial_lsn
        self.partial_count = partial_count

    def is_replay(self, final_lsn: int) -> bool:
        return final_lsn < self.checkpoint

    def skip_count(self, final_lsn: int) -> int:
        return self.partial_count if self.partial_lsn == final_lsn else 0

    def __repr__(self) -> str:
        return f"Position({self.checkpoint}, {self.partial_lsn}, {self.partial_count})"


class RecentTransactions:
    """The last transactions applied, and which tables each changed (bounded)."""

    def __init__(self, keep: int = 1024) -> None:
        self._ring: deque[tuple[int, set[str]]] = deque(maxlen=keep)

    def add(self, xid: int, tables: set[str]) -> None:
        if tables:
            self._ring.append((xid, tables))

    def unseen(self, sees: Callable[[int], bool], table: str) -> bool:
        """Whether a transaction already applied to ``table`` is one ``sees`` rejects."""
        for xid, tables in self._ring:
            if table in tables and not sees(xid):
                return True
        return False


class StreamCore:
    def __init__(
        self,
        assembler: Assembler,
        planner: Planner,
        batch_limit: int,
        position: Position,
        recent: RecentTransactions,
    ) -> None:
        self.assembler = assembler
        self.planner = planner
        self.batch = CommandBatch()
        self.batch_limit = batch_limit
        self.position = position
        self.recent = recent
        # The transaction in progress (set at its begin).
        self.xid = 0
        self.final_lsn = 0
        self.version = b""
        self.skip = False
        self.skip_changes = 0
        self.touched_tables: set[str] = set()
        # Highest commit end received, and the highest LSN up to which every
        # transaction has been received and processed.
        self.received = position.checkpoint
        self.stream_position = position.checkpoint
        # Checkpoint of the batch being built (end of its last complete transaction),
        # where that transaction ends in it, and the commit times of its transactions.
        self.pending_checkpoint = position.checkpoint
        self.boundary = Boundary()
        self.commit_times: list[float] = []
        self.transactions = 0
        # The last keepalive's position, taken between transactions.
        self.keepalive_target = 0
        # The table of an open backfill window and whether its snapshot sees a
        # transaction; ids changed by transactions it does not see are collected in dirty.
        self.watch_table = ""
        self.window_sees: Callable[[int], bool] | None = None
        self.tx_visible = True
        self.dirty: list[bytes] = []

    def feed(self, data: bytes) -> Outcome:
        """One CopyData message from the walsender (pgoutput)."""
        if data[0] != 0x77:  # not XLogData: a keepalive
            return self._keepalive(parse_copy_data(data))
        event = self.assembler.feed(pgoutput.decode(data, False, 25))
        return self._event(event)

    def feed_message(self, message: Message) -> Outcome:
        """A message some other decoder produced (wal2json)."""
        return self._event(self.assembler.feed(message))

    def _keepalive(self, frame: XLogData | PrimaryKeepalive) -> Outcome:
        """Between transactions, everything up to a keepalive's position is processed;
        the pipeline only hears of keepalives that ask for a reply."""
        if not isinstance(frame, PrimaryKeepalive):
            return frame
        if not self.assembler.in_transaction:
            wal_end = frame.wal_end
            self.stream_position = max(self.stream_position, wal_end)
            self.keepalive_target = max(self.keepalive_target, wal_end)
        return frame if frame.reply_requested else None

    def _event(self, event: Event | None) -> Outcome:
        if event is None:
            return None
        if isinstance(event, RowChange):
            self._row(event)
            if self.batch.changes >= self.batch_limit:
                return BATCH_FULL
            return None
        if isinstance(event, TxBegin):
            self._begin(event)
            return None
        if isinstance(event, TxCommit):
            self._commit(event)
            # An open window needs each commit (dirty rows, readiness).
            return event if self.watch_table else None
        return event

    def _begin(self, event: TxBegin) -> None:
        final_lsn = event.final_lsn
        self.xid = event.xid
        self.final_lsn = final_lsn
        position = self.position
        self.skip = final_lsn < position.checkpoint
        self.skip_changes = position.skip_count(final_lsn)
        self.version = b"%X/%X" % (final_lsn >> 32, final_lsn & 0xFFFFFFFF)
        self.touched_tables = set()
        sees = self.window_sees
        self.tx_visible = True if sees is None else sees(event.xid)

    def _commit(self, event: TxCommit) -> None:
        end_lsn = event.end_lsn
        self.received = max(self.received, end_lsn)
        self.stream_position = max(self.stream_position, end_lsn)
        if self.skip:
            return
        self.recent.add(event.xid, self.touched_tables)
        self.pending_checkpoint = end_lsn
        self.commit_times.append(pg_time_to_unix(event.commit_time))
        self.transactions += 1
        self.skip_changes = 0
        self.boundary = self.batch.mark()

    def _row(self, change: RowChange) -> None:
        if self.skip or change.seq <= self.skip_changes:
            return
        self.planner.change(change, self.version, self.batch)
        view = change.view
        name = view.table_name
        self.touched_tables.add(name)
        if self.watch_table and not self.tx_visible and name == self.watch_table:
            pk = view.pk_index
            row = change.old if change.op == DELETE else change.new
            if row is not None:
                value = row[pk]
                if isinstance(value, bytes):
                    self.dirty.append(value)
            old = change.old
            if old is not None and change.op != DELETE:
                before = old[pk]
                if isinstance(before, bytes):
                    self.dirty.append(before)
