"""The per-message fast path: CopyData bytes to Redis commands, compiled by mypyc.

Almost every message of a stream is a row change, a begin or a commit.
:meth:`StreamCore.feed` decodes each straight from the CopyData buffer (no slicing),
resolves it through the assembler and acts on it without returning to interpreted code:
a begin decides whether the transaction was already applied (:class:`Position`), a row
is planned into the batch (and noted for an open backfill window), a commit moves the
batch's checkpoint and :class:`Boundary`. Everything else (truncate, schema changes,
keepalives, a full batch, and commits while a backfill window is open) comes back to
the pipeline as a value to act on.

The pipeline talks to the core through methods only: it asks whether something waits to
be sent (:meth:`StreamCore.has_pending`), takes it (:meth:`StreamCore.cut`,
:meth:`StreamCore.cut_complete`, each a :class:`Cut`), and opens or closes a backfill
window (:meth:`StreamCore.watch`). Where a batch may end is decided here: at a commit.
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
from cdc.transform.assemble import DELETE, Assembler, Event, RowChange, TableView, TxBegin, TxCommit
from cdc.transform.plan import Boundary, CommandBatch, Planner
from schema.lsn import lsn_bytes


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
        """The one place that decides "already applied": a transaction whose commit
        record starts before the checkpoint was applied whole."""
        return final_lsn < self.checkpoint

    def skip_count(self, final_lsn: int) -> int:
        """How many leading changes of that transaction were applied (in chunks)."""
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
        self._batch = CommandBatch()
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
        self._received = position.checkpoint
        self._stream_position = position.checkpoint
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
            self._stream_position = max(self._stream_position, wal_end)
            self.keepalive_target = max(self.keepalive_target, wal_end)
        return frame if frame.reply_requested else None

    def _event(self, event: Event | None) -> Outcome:
        if event is None:
            return None
        if isinstance(event, RowChange):
            self._row(event)
            if self._batch.changes > self.batch_limit:
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
        self.skip = position.is_replay(final_lsn)
        self.skip_changes = position.skip_count(final_lsn)
        self.version = lsn_bytes(final_lsn)
        self.touched_tables = set()
        sees = self.window_sees
        self.tx_visible = True if sees is None else sees(event.xid)

    def _commit(self, event: TxCommit) -> None:
        end_lsn = event.end_lsn
        self._received = max(self._received, end_lsn)
        self._stream_position = max(self._stream_position, end_lsn)
        if self.skip:
            return
        self.recent.add(event.xid, self.touched_tables)
        self.pending_checkpoint = end_lsn
        self.commit_times.append(pg_time_to_unix(event.commit_time))
        self.transactions += 1
        self.skip_changes = 0
        self.boundary = self._batch.mark()

    def _applies(self, seq: int) -> bool:
        """Whether the change ``seq`` of the transaction in progress is still to apply."""
        return not self.skip and seq > self.skip_changes

    def _row(self, change: RowChange) -> None:
        if not self._applies(change.seq):
            return
        self.planner.change(change, self.version, self._batch)
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

    # -- what the pipeline asks of the core ----------------------------------------------

    @property
    def batch(self) -> CommandBatch:
        """The batch being built (backfill windows are planned into it)."""
        return self._batch

    @property
    def received(self) -> int:
        """Highest commit end received."""
        return self._received

    @property
    def stream_position(self) -> int:
        """Every transaction before this LSN has been received and processed."""
        return self._stream_position

    @property
    def applying(self) -> bool:
        """A transaction is in progress whose changes are being planned (not a replay)."""
        return self.assembler.in_transaction and not self.skip

    def over_limit(self, max_changes: int, max_bytes: int) -> bool:
        """Past a limit: more changes than ``max_changes`` (a transaction of exactly the
        limit still goes whole), or ``max_bytes`` of operations."""
        batch = self._batch
        return batch.changes > max_changes or len(batch.buf) >= max_bytes

    def has_complete(self, sent_checkpoint: int) -> bool:
        """Whether complete transactions (or a checkpoint move) wait to be sent."""
        return not self.boundary.empty or self.pending_checkpoint > sent_checkpoint

    def has_pending(self, sent_checkpoint: int, chunk: bool) -> bool:
        """Whether :meth:`cut` would give anything worth sending."""
        if not self._batch.empty or self.pending_checkpoint > sent_checkpoint:
            return True
        return chunk and self.applying and self._batch.changes > 0

    def cut(self, chunk: bool) -> Cut:
        """Take the whole batch. With ``chunk`` and a transaction in progress, its changes
        so far go too, as a chunk recorded by ``partial`` (only when it alone fills a batch)."""
        partial = self._carried_partial()
        if chunk and self.applying and self._batch.changes:
            partial = (self.final_lsn, self.assembler.seq)
            self.skip_changes = 0
        cut = Cut(self._batch, self.pending_checkpoint, self.commit_times, partial)
        self._batch = CommandBatch()
        self.boundary = Boundary()
        self.commit_times = []
        return cut

    def cut_complete(self) -> Cut:
        """Take the complete transactions of the batch; the one in progress stays."""
        rest = self._batch.split(self.boundary)
        cut = Cut(self._batch, self.pending_checkpoint, self.commit_times, self._carried_partial())
        self._batch = rest
        self.boundary = Boundary()
        self.commit_times = []
        return cut

    def _carried_partial(self) -> tuple[int, int] | None:
        """The ``partial`` marker a cut without a chunk of its own must keep.

        While a large transaction is applied in part and has not committed (a restart
        resumes it by change count), moving the checkpoint, to a keepalive's position, a
        backfill window or a shutdown, must not erase how far into it Redis got: the
        next session would apply its first chunks again."""
        position = self.position
        lsn = position.partial_lsn
        if lsn is not None and self.pending_checkpoint <= lsn:
            return (lsn, position.partial_count)
        return None

    def drop_open(self) -> None:
        """Forget the planned part of the transaction in progress (it is streamed again
        after a restart)."""
        if self.applying:
            self._batch.split(self.boundary)

    def move_to_keepalive(self, sent_checkpoint: int) -> bool:
        """Between transactions with nothing planned, every transaction before the last
        keepalive's position is applied: the checkpoint may move there (tokens wait on
        it). Returns whether it moved past ``sent_checkpoint``."""
        if (
            self.keepalive_target <= sent_checkpoint
            or self.assembler.in_transaction
            or not self._batch.empty
        ):
            return False
        self.pending_checkpoint = max(self.pending_checkpoint, self.keepalive_target)
        return True

    def truncate(self, views: tuple[TableView, ...], seq: int) -> list[str]:
        """Plan a TRUNCATE; returns the tables an open window's snapshot does not see it on."""
        if not self._applies(seq):
            return []
        self.planner.truncate(views, self._batch, self.version, seq)
        unseen: list[str] = []
        for view in views:
            self.touched_tables.add(view.table_name)
            if not self.tx_visible:
                unseen.append(view.table_name)
        return unseen

    def take_dirty(self) -> list[bytes]:
        """Ids changed by transactions the open window's snapshot does not see."""
        dirty, self.dirty = self.dirty, []
        return dirty if not self.skip else []

    def watch(self, table: str, sees: Callable[[int], bool] | None) -> None:
        """Open (or, with ``table`` empty, close) a backfill window on ``table``."""
        self.watch_table = table
        self.window_sees = sees


class Cut:
    """A batch taken from the core, and what its acknowledgement makes true."""

    def __init__(
        self,
        batch: CommandBatch,
        checkpoint: int,
        commit_times: list[float],
        partial: tuple[int, int] | None,
    ) -> None:
        self.batch = batch
        self.checkpoint = checkpoint
        self.commit_times = commit_times
        self.partial = partial
