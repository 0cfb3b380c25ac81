"""The streaming loop: read, decode, assemble, plan, apply with the checkpoint, confirm.

::

    source.read() ─▶ pgoutput.decode ─▶ Assembler.feed ─▶ Planner ─▶ CommandBatch
                                                   │                      │
                                      Backfill (windows, dirty rows)      ▼
                                                                 RedisSink.apply (+checkpoint)
                                                                          │
                                             source.send_status(flush = applied checkpoint)

Batching: messages are drained while the socket has data; the batch is applied when the
socket runs dry, when it reaches ``batch_max_changes``/``batch_max_bytes``, or when a
backfill window must be written. A batch holds whole transactions; only a transaction
larger than the batch limit is applied in chunks, with ``partial`` in ``cdc:state``
recording how far it got.

What was already applied is decided in one place, :class:`Position`: a transaction whose
commit record starts before the checkpoint is a replay and is skipped; the first ``n``
changes of a partially applied transaction are skipped too. The LSN confirmed to
PostgreSQL is always the checkpoint Redis holds, never what was merely received.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cdc import catalog, logs
from cdc.assemble import (
    DELETE,
    Assembler,
    RowChange,
    SchemaChange,
    TableTruncate,
    TxBegin,
    TxCommit,
)
from cdc.backfill import Backfill
from cdc.errors import PostgresUnavailable
from cdc.lsn import Lsn, format_lsn, lsn_bytes
from cdc.messages import Message, PrimaryKeepalive, parse_copy_data, pg_time_to_unix
from cdc.metrics import Metrics
from cdc.plan import CommandBatch, Planner
from cdc.settings import Settings
from cdc.sink import RedisSink
from cdc.source import ReplicationSource
from schema.keys import TrackedTable

Decode = Callable[[bytes], Message | list[Message]]


@dataclass
class Position:
    """What is applied: the checkpoint and, for a large transaction, how far into it."""

    checkpoint: Lsn
    partial_lsn: Lsn | None = None
    partial_count: int = 0

    def is_replay(self, final_lsn: int) -> bool:
        return final_lsn < self.checkpoint

    def skip_count(self, final_lsn: int) -> int:
        return self.partial_count if self.partial_lsn == final_lsn else 0


@dataclass
class _TxState:
    xid: int = 0
    final_lsn: int = 0
    commit_time: int = 0
    version: bytes = b""
    skip: bool = False
    skip_changes: int = 0


@dataclass
class _Boundary:
    """Where the batch ends at the last complete transaction."""

    buf_len: int = 0
    commands: int = 0
    patches: int = 0
    changes: int = 0
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    oversized: int = 0


@dataclass
class PipelineStats:
    transactions: int = 0
    changes: int = 0
    batches: int = 0
    last_apply_delay: float = 0.0
    received: int = 0
    commit_times: list[float] = field(default_factory=list)


class Pipeline:
    """Runs the stream for one session (one slot acquisition, one fence)."""

    def __init__(
        self,
        settings: Settings,
        tables: tuple[TrackedTable, ...],
        source: ReplicationSource,
        sink: RedisSink,
        catalog_conn: catalog.Conn,
        position: Position,
        metrics: Metrics,
        stop: threading.Event,
        decode: Decode,
        schema_requests: queue.Queue[str] | None = None,
        backfill: Backfill | None = None,
        rebuilding: bool = False,
        on_schema_change: Callable[[TrackedTable], None] | None = None,
    ) -> None:
        self.settings = settings
        self.tables = {t.name: t for t in tables}
        self.source = source
        self.sink = sink
        self.pg = catalog_conn
        self.position = position
        self.metrics = metrics
        self.stop = stop
        self._decode = decode
        self.schema_requests = schema_requests
        self.on_schema_change = on_schema_change
        self.log = logs.get("cdc.pipeline")
        self.assembler = Assembler(tables)
        self.planner = Planner(settings.max_row_bytes)
        self.backfill = backfill or Backfill(self.planner, settings.backfill_chunk)
        self.backfill.planner = self.planner
        self.batch = CommandBatch()
        self.boundary = _Boundary()
        self.tx = _TxState()
        self.stats = PipelineStats()
        # Highest LSN up to which every transaction has been received and processed.
        self.stream_position: int = position.checkpoint
        # Checkpoint of the batch being built (end of its last complete transaction).
        self.pending_checkpoint: int = position.checkpoint
        self.rebuilding = rebuilding
        self._rebuild_marker = ""
        self._last_status = 0.0
        self._last_received = time.monotonic()
        self._last_reply_request = 0.0
        self._last_applied_at = time.monotonic()
        self._keepalive_target: int = 0
        self._pending_commit_times: list[float] = []

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Stream until ``stop`` is set (then finish the batch and confirm) or an error."""
        source = self.source
        limit_changes = self.settings.batch_max_changes
        limit_bytes = self.settings.batch_max_bytes
        while True:
            if self.stop.is_set():
                self._shutdown()
                return
            data = source.read()
            if data is None:
                self._idle()
                continue
            self._last_received = time.monotonic()
            self._on_copy_data(data)
            if self.batch.changes >= limit_changes or len(self.batch.buf) >= limit_bytes:
                self.flush()

    def _on_copy_data(self, data: bytes) -> None:
        if data[0] == 0x77:  # 'w': XLogData; the payload starts after the 25-byte header
            decoded = self._decode(data[25:])
            if isinstance(decoded, list):
                for message in decoded:
                    self._on_message(message)
            else:
                self._on_message(decoded)
            return
        frame = parse_copy_data(data)
        if isinstance(frame, PrimaryKeepalive):
            if not self.assembler.in_transaction:
                self.stream_position = max(self.stream_position, frame.wal_end)
                self._keepalive_target = max(self._keepalive_target, frame.wal_end)
            if frame.reply_requested:
                self.send_status(reply=False)

    def _on_message(self, message: Message) -> None:
        event = self.assembler.feed(message)
        if event is not None:
            if isinstance(event, RowChange):
                self._on_change(event)
            elif isinstance(event, TxBegin):
                self._on_begin(event)
            elif isinstance(event, TxCommit):
                self._on_commit(event)
            elif isinstance(event, TableTruncate):
                self._on_truncate(event)
            elif isinstance(event, SchemaChange):
                self._on_schema_change(event)

    # -- events -----------------------------------------------------------------------------

    def _on_begin(self, event: TxBegin) -> None:
        tx = self.tx
        tx.xid = event.xid
        tx.final_lsn = event.final_lsn
        tx.commit_time = event.commit_time
        tx.version = lsn_bytes(event.final_lsn)
        tx.skip = self.position.is_replay(event.final_lsn)
        tx.skip_changes = self.position.skip_count(event.final_lsn)
        if not tx.skip:
            self.backfill.begin(event.xid)

    def _on_change(self, change: RowChange) -> None:
        tx = self.tx
        if tx.skip or change.seq <= tx.skip_changes:
            return
        self.planner.change(change, tx.version, self.batch)
        view = change.view
        pk = view.pk_index
        name = view.tracked.name
        row = change.old if change.op == DELETE else change.new
        if row is not None:
            value = row[pk]
            if isinstance(value, bytes):
                self.backfill.touched(name, value)
        if change.old is not None and change.op != DELETE:
            old_value = change.old[pk]
            if isinstance(old_value, bytes) and old_value != (row[pk] if row is not None else None):
                self.backfill.touched(name, old_value)
        if self.batch.changes >= self.settings.batch_max_changes:
            self.flush()

    def _on_truncate(self, event: TableTruncate) -> None:
        if self.tx.skip or event.seq <= self.tx.skip_changes:
            return
        self.planner.truncate(event.views, self.batch)
        for view in event.views:
            self.backfill.truncated(view.tracked.name)

    def _on_commit(self, event: TxCommit) -> None:
        self.received(event.end_lsn)
        if self.tx.skip:
            self.stream_position = max(self.stream_position, event.end_lsn)
            return
        self.backfill.commit()
        self.pending_checkpoint = event.end_lsn
        self.stream_position = max(self.stream_position, event.end_lsn)
        self._pending_commit_times.append(pg_time_to_unix(event.commit_time))
        self.stats.transactions += 1
        self.tx.skip_changes = 0
        batch = self.batch
        self.boundary = _Boundary(
            len(batch.buf),
            batch.commands,
            len(batch.patches),
            batch.changes,
            dict(batch.counts),
            len(batch.oversized),
        )
        if self.backfill.ready(self.stream_position):
            self._flush_window()

    def _on_schema_change(self, event: SchemaChange) -> None:
        self.log.info(
            "schema change",
            table=event.view.tracked.name,
            columns_before=len(event.previous),
            columns_after=len(event.view.column_names),
        )
        self.backfill.schema_changed(event.view.tracked)

    def received(self, lsn: int) -> None:
        if lsn > self.stats.received:
            self.stats.received = Lsn(lsn)

    # -- applying ----------------------------------------------------------------------------

    def flush_complete(self) -> None:
        """Apply the complete transactions of the batch; keep the one in progress."""
        if not (self.assembler.in_transaction and not self.tx.skip):
            self.flush()
            return
        rest = self._split_at_boundary()
        if not self.batch.empty or self.pending_checkpoint > self.position.checkpoint:
            self.flush(chunk=False)
        self.batch = rest
        self.boundary = _Boundary()

    def _split_at_boundary(self) -> CommandBatch:
        """Cut the batch after its last complete transaction; return the rest."""
        batch = self.batch
        cut = self.boundary
        rest = CommandBatch()
        rest.buf = batch.buf[cut.buf_len :]
        rest.commands = batch.commands - cut.commands
        rest.patches = [(i - cut.commands, t, r) for i, t, r in batch.patches[cut.patches :]]
        rest.changes = batch.changes - cut.changes
        rest.oversized = batch.oversized[cut.oversized :]
        rest.counts = {
            k: n - cut.counts.get(k, 0) for k, n in batch.counts.items() if n - cut.counts.get(k, 0)
        }
        del batch.buf[cut.buf_len :]
        del batch.patches[cut.patches :]
        del batch.oversized[cut.oversized :]
        batch.commands = cut.commands
        batch.changes = cut.changes
        batch.counts = dict(cut.counts)
        return rest

    def flush(self, chunk: bool = True) -> None:
        """Apply the batch with the checkpoint. With ``chunk`` and a transaction in
        progress, its changes so far go too, as a chunk (only at the batch limit)."""
        batch = self.batch
        in_tx = chunk and self.assembler.in_transaction and not self.tx.skip
        checkpoint = self.pending_checkpoint
        advance = checkpoint > self.position.checkpoint
        if batch.empty and not advance and not (in_tx and batch.changes):
            return
        state = {"lsn": format_lsn(checkpoint)}
        if in_tx and batch.changes:
            # A chunk of a transaction larger than the batch limit.
            state["partial"] = f"{format_lsn(self.tx.final_lsn)}:{self._applied_in_tx()}"
        else:
            state["partial"] = ""
        marker = self.backfill.progress_marker() if self.rebuilding else ""
        if marker != self._rebuild_marker or (self.rebuilding and not marker):
            state["rebuild"] = marker
        result = self.sink.apply(batch, state)
        self._rebuild_marker = marker
        if self.rebuilding and not marker and not self.backfill.busy:
            self.rebuilding = False
            self.log.info("rebuild complete", rows=self.backfill.stats.rows_written)
        now = time.time()
        self.position.checkpoint = Lsn(checkpoint)
        if state.get("partial"):
            self.position.partial_lsn = Lsn(self.tx.final_lsn)
            self.position.partial_count = self._applied_in_tx()
            self.tx.skip_changes = 0
        else:
            self.position.partial_lsn = None
            self.position.partial_count = 0
        self._record(batch, now)
        for table, row_id in result.incomplete_rows:
            tracked = self.tables.get(table)
            if tracked is not None:
                self.metrics.errors.labels(kind="incomplete_row").inc()
                self.backfill.request_rows(tracked, [row_id.decode()], "incomplete row")
        for table, size in batch.oversized:
            self.metrics.errors.labels(kind="oversized_row").inc()
            self.log.warning("row too large to cache; key dropped", table=table, bytes=size)
        if result.errors:
            self.metrics.errors.labels(kind="redis_command").inc(len(result.errors))
            self.log.error(
                "Redis refused commands in a batch",
                count=len(result.errors),
                first=result.errors[0],
            )
        batch.clear()
        self.boundary = _Boundary()
        self._last_applied_at = time.monotonic()
        if self._last_applied_at - self._last_status >= self.settings.status_interval:
            # Busy draining a backlog: keep confirming (and proving we are alive).
            self.send_status(reply=False)

    def _applied_in_tx(self) -> int:
        """Changes of the current transaction applied so far: all it has sent up to now."""
        return self.assembler.seq

    def _record(self, batch: CommandBatch, now: float) -> None:
        m = self.metrics
        for (table, op), n in batch.counts.items():
            m.changes.labels(table=table, op=op).inc(n)
        m.batches.inc()
        self.stats.batches += 1
        self.stats.changes += batch.changes
        times = self._pending_commit_times
        if times:
            m.transactions.inc(len(times))
            for commit_time in times:
                m.apply_delay.observe(max(0.0, now - commit_time))
            self.stats.last_apply_delay = max(0.0, now - times[-1])
            m.lag_seconds.set(self.stats.last_apply_delay)
            self._pending_commit_times = []
        m.last_applied_lsn.set(self.position.checkpoint)

    def _flush_window(self) -> None:
        window = self.backfill.flush(self.batch)
        self.metrics.backfill_rows.labels(table=window.view.tracked.name).inc(len(window.rows))
        self.flush()

    # -- idle work ----------------------------------------------------------------------------

    def _idle(self) -> None:
        """The socket is drained: apply, confirm, backfill, then wait for more."""
        self.flush_complete()
        now = time.monotonic()
        if self.schema_requests is not None:
            while True:
                try:
                    name = self.schema_requests.get_nowait()
                except queue.Empty:
                    break
                tracked = self.tables.get(name)
                if tracked is not None:
                    self.log.info("schema change detected in the catalog", table=name)
                    if self.on_schema_change is not None:
                        self.on_schema_change(tracked)
                    self.backfill.schema_changed(tracked)
        backfill = self.backfill
        in_tx = self.assembler.in_transaction
        if backfill.window is not None and not in_tx and backfill.ready(self.stream_position):
            self._flush_window()
        if backfill.window is None and backfill.queue and not in_tx:
            window = backfill.open(self.pg)
            if window is not None and backfill.ready(self.stream_position):
                self._flush_window()
        if (
            self._keepalive_target > self.position.checkpoint
            and not self.assembler.in_transaction
            and self.batch.empty
        ):
            # Every transaction before the keepalive's position is applied: move the
            # checkpoint there too (read-your-writes tokens wait on it).
            self.pending_checkpoint = max(self.pending_checkpoint, self._keepalive_target)
            self.flush()
        if (
            self.batch.empty
            and not self.assembler.in_transaction
            and now - self._last_applied_at > 1.0
        ):
            self.metrics.lag_seconds.set(0.0)
        waiting_for_window = backfill.window is not None
        if now - self._last_status >= self.settings.status_interval or (
            waiting_for_window and now - self._last_reply_request >= 0.05
        ):
            quiet = now - self._last_received
            self.send_status(
                reply=waiting_for_window or quiet > min(5.0, self.settings.pg_timeout / 3)
            )
        if now - self._last_received > self.settings.pg_timeout:
            raise PostgresUnavailable(
                f"no message from PostgreSQL for {self.settings.pg_timeout:.0f}s; reconnecting"
            )
        self.source.wait(0.1 if not waiting_for_window else 0.02)

    def send_status(self, reply: bool) -> None:
        confirmed = self.position.checkpoint
        received = max(int(self.stats.received), confirmed)
        self.source.send_status(received, confirmed, confirmed, reply)
        now = time.monotonic()
        self._last_status = now
        if reply:
            self._last_reply_request = now

    def _shutdown(self) -> None:
        """Finish the batch in flight (whole transactions only), confirm it."""
        if self.assembler.in_transaction and not self.tx.skip:
            # The transaction in progress will be sent again after the restart.
            self._split_at_boundary()
        self.flush(chunk=False)
        self.send_status(reply=False)
        self.log.info("stopped", checkpoint=format_lsn(self.position.checkpoint))
