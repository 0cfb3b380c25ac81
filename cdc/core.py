"""The per-message fast path: CopyData bytes to Redis commands, compiled by mypyc.

Almost every message of a stream is a row change. :meth:`StreamCore.feed` decodes it
straight from the CopyData buffer (no slicing), resolves it through the assembler, skips
it if it was already applied, plans it into the batch and records what a backfill window
needs, all without returning to interpreted code. Everything else (begin, commit,
truncate, schema changes, keepalives, a full batch) comes back to the pipeline as a
value to act on.

The transaction state it consults (``version``, ``skip``, ``skip_changes``) and the
backfill watch (``watch_table``, ``tx_visible``) are set by the pipeline at each begin.
"""

from __future__ import annotations

from typing import Final, Union

from cdc import pgoutput
from cdc.assemble import DELETE, Assembler, Event, RowChange
from cdc.messages import Message, PrimaryKeepalive, XLogData, parse_copy_data
from cdc.plan import CommandBatch, Planner


class BatchFull:
    """Returned by :meth:`StreamCore.feed` when the batch reached its limit."""


BATCH_FULL: Final = BatchFull()

Outcome = Union[Event, PrimaryKeepalive, XLogData, BatchFull, None]  # noqa: UP007


class StreamCore:
    def __init__(self, assembler: Assembler, planner: Planner, batch_limit: int) -> None:
        self.assembler = assembler
        self.planner = planner
        self.batch = CommandBatch()
        self.batch_limit = batch_limit
        # The transaction in progress (set by the pipeline at its begin).
        self.version = b""
        self.skip = False
        self.skip_changes = 0
        self.touched_tables: set[str] = set()
        # The table of an open backfill window, and whether the snapshot of that window
        # sees the transaction in progress; ids it changed unseen are collected in dirty.
        self.watch_table = ""
        self.tx_visible = True
        self.dirty: list[bytes] = []

    def feed(self, data: bytes) -> Outcome:
        """One CopyData message from the walsender (pgoutput)."""
        if data[0] != 0x77:  # not XLogData: a keepalive
            return parse_copy_data(data)
        event = self.assembler.feed(pgoutput.decode(data, False, 25))
        return self._event(event)

    def feed_message(self, message: Message) -> Outcome:
        """A message some other decoder produced (wal2json)."""
        return self._event(self.assembler.feed(message))

    def _event(self, event: Event | None) -> Outcome:
        if event is None:
            return None
        if isinstance(event, RowChange):
            self._row(event)
            if self.batch.changes >= self.batch_limit:
                return BATCH_FULL
            return None
        return event

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
