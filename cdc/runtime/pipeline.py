"""The streaming loop: read, decode, assemble, plan, apply with the checkpoint, confirm.

::

    source.read() ─▶ StreamCore.feed (compiled: decode ─▶ assemble ─▶ plan) ─▶ CommandBatch
                                                                                  │
                         Backfill (windows, dirty rows)                           ▼
                                                           RedisSink.send / receive (+checkpoint)
                                                                                  │
                                       source.send_status(flush = acknowledged checkpoint)

Batching: messages are drained while the socket has data; the batch is sent when the
socket runs dry, when it reaches ``batch_max_changes``/``batch_max_bytes``, or when a
backfill window must be written. A batch is sent before the answer to the previous one
is read, so Redis executes one while the daemon plans the next (at most two in flight).
A batch holds whole transactions; only a transaction larger than the batch limit goes in
chunks, with ``partial`` in ``cdc:state`` recording how far it got.

What was already applied is decided in one place, :class:`Position`: a transaction whose
commit record starts before the checkpoint is a replay and is skipped; the first ``n``
changes of a partially applied transaction are skipped too. The LSN confirmed to
PostgreSQL is always a checkpoint Redis has acknowledged, never what was merely received
or sent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psycopg

from cdc import failpoints
from cdc.cache.checkpoint import format_partial
from cdc.cache.sink import ApplyResult, InFlight
from cdc.errors import PoisonRecord, PostgresUnavailable, RecordError
from cdc.postgres import catalog
from cdc.protocol.messages import Message, PrimaryKeepalive
from cdc.runtime.backfill import Backfill
from cdc.runtime.streams import StreamBuffers, state_directory
from cdc.settings import Settings
from cdc.telemetry import logs
from cdc.telemetry.metrics import Metrics
from cdc.transform.assemble import (
    Assembler,
    RepairRequest,
    SchemaChange,
    TableTruncate,
    TxCommit,
)
from cdc.transform.cluster_script import REPAIR_FIELD, REPAIR_TAG
from cdc.transform.core import BatchFull, Cut, Position, StreamCore
from cdc.transform.plan import CommandBatch, Planner
from schema.keys import TrackedTable
from schema.lsn import Lsn, format_lsn

# Quiet seconds after which an open backfill window writes WAL itself (see _tick), and
# the prefix of that logical message.
TICK_AFTER = 0.2
TICK_PREFIX = "cdc:tick"
# Quiet seconds after which an empty batch checks that the cache is still there (_probe).
PROBE_AFTER = 0.5

# A decoder other than pgoutput (wal2json); pgoutput is decoded inside the core.
Decode = Callable[[bytes], Message | list[Message]]


class Source(Protocol):
    """What the loop needs of the replication stream (:class:`ReplicationSource`)."""

    def read(self) -> bytes | None: ...

    def wait(self, timeout: float, also: int = -1) -> tuple[bool, bool]: ...

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None: ...

    def finish(self, timeout: float = 5.0) -> bool: ...


class Sink(Protocol):
    """What the loop needs of Redis (:class:`RedisSink`)."""

    publish_refused: bool

    def send(self, batch: CommandBatch, state: dict[str, str]) -> InFlight: ...

    def ready(self, sent: InFlight) -> bool: ...

    def buffered(self, sent: InFlight) -> bool: ...

    def receive(self, sent: InFlight) -> ApplyResult: ...

    def fileno(self) -> int: ...


@dataclass
class _Sent:
    """A batch in flight and what its acknowledgement makes true."""

    handle: InFlight
    cut: Cut
    rebuild_marker: str | None


class Pipeline:
    """Runs the stream for one session (one slot acquisition, one fence)."""

    def __init__(
        self,
        settings: Settings,
        tables: tuple[TrackedTable, ...],
        source: Source,
        sink: Sink,
        catalog_conn: catalog.Conn,
        position: Position,
        metrics: Metrics,
        stop: threading.Event,
        decode: Decode | None,
        schema_requests: queue.Queue[str] | None = None,
        backfill: Backfill | None = None,
        rebuilding: bool = False,
        on_schema_change: Callable[[TrackedTable], None] | None = None,
    ) -> None:
        self.settings = settings
        self.tables = {t.name: t for t in tables}
        self._qualified = {t.qualified_name: t for t in tables}
        self.source = source
        self.sink = sink
        self.pg = catalog_conn
        self.position = position
        self.metrics = metrics
        self.stop = stop
        # None: pgoutput, decoded by the core itself on the fast path.
        self._decode = decode
        self._fast = decode is None
        self.schema_requests = schema_requests
        self.on_schema_change = on_schema_change
        self.log = logs.get("cdc.runtime.pipeline")
        self.assembler = Assembler(tables)
        # One planner: the backfill's, which the stream core plans with too.
        self.backfill = backfill or Backfill(
            Planner(settings.max_row_bytes, settings.change_feed, settings.change_feed_maxlen),
            settings.backfill_chunk,
        )
        self.planner = self.backfill.planner
        self.core = StreamCore(
            self.assembler,
            self.planner,
            settings.batch_max_changes,
            position,
            self.backfill.recent,
        )
        self._watch_window()
        # Streamed in-progress transactions, applied at their Stream Commit.
        self.streams = StreamBuffers(
            state_directory(settings.state_dir), settings.slot, settings.stream_memory
        )
        self.streams.clean()
        # Highest checkpoint sent to Redis (acknowledged or in flight).
        self.sent_checkpoint: int = position.checkpoint
        self._inflight: _Sent | None = None
        self.rebuilding = rebuilding
        # Cluster mode: a slot repair recorded in cdc:state waits for its rows (daemon),
        # and what to tell when its record is cleared (the daemon's slot ledger).
        self.repair_pending = False
        self.repair_done: Callable[[], None] | None = None
        self._repair_quiet = 0
        self._rebuild_marker = ""
        self._publish_warned = False
        self._last_status = 0.0
        self._last_received = time.monotonic()
        self._last_reply_request = 0.0
        self._last_applied_at = time.monotonic()
        self._last_tick = 0.0
        self._ticks_refused = False
        self._last_probe = time.monotonic()

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Stream until ``stop`` is set (then finish the batch and confirm) or an error."""
        source = self.source
        core = self.core
        max_changes = self.settings.batch_max_changes
        max_bytes = self.settings.batch_max_bytes
        fast = self._fast
        in_block = False  # inside a Stream Start .. Stream Stop block
        while True:
            if self.stop.is_set():
                self._shutdown()
                return
            data = source.read()
            if data is None:
                self._idle()
                continue
            self._last_received = time.monotonic()
            if failpoints.ACTIVE:
                data = failpoints.record(data)
            try:
                if fast:
                    if data[0] == 0x77 and (in_block or _stream_kind(data[25])):
                        in_block = self._on_stream(data)
                    else:
                        outcome = core.feed(data)
                        if outcome is not None:
                            self._on_outcome(outcome)
                else:
                    self._slow_path(data)
            except (RecordError, ValueError, IndexError, KeyError, TypeError) as exc:
                raise self._poison(data, exc) from None
            if core.over_limit(max_changes, max_bytes):
                self._at_limit()

    def _on_stream(self, data: bytes) -> bool:
        """A message of a streamed transaction; at its commit, apply it as any other.
        Returns whether a stream block is open."""
        replay = self.streams.feed(data)
        if replay is None:
            return self.streams.in_block
        core = self.core
        max_changes = self.settings.batch_max_changes
        max_bytes = self.settings.batch_max_bytes
        stop = self.stop
        for message in replay:
            outcome = core.feed_message(message)
            if outcome is None and not core.over_limit(max_changes, max_bytes):
                continue
            if outcome is not None:
                self._on_outcome(outcome)
            if core.over_limit(max_changes, max_bytes):
                self._at_limit()  # a chunk of the transaction is sent
            if stop.is_set():
                # Stopping inside a large transaction: what was applied of it is in
                # ``partial``; the server streams it again after the restart.
                replay.close()
                break
        return False

    def _slow_path(self, data: bytes) -> None:
        """Other output plugins (wal2json): decode in Python, then the same core."""
        if data[0] != 0x77:
            self._on_outcome(self.core.feed(data))
            return
        assert self._decode is not None
        decoded = self._decode(data[25:])
        for message in decoded if isinstance(decoded, list) else [decoded]:
            outcome = self.core.feed_message(message)
            if outcome is not None:
                self._on_outcome(outcome)

    def _on_outcome(self, outcome: object) -> None:
        if isinstance(outcome, TxCommit):
            self._on_commit(outcome)
        elif isinstance(outcome, BatchFull):
            self._at_limit()
        elif isinstance(outcome, PrimaryKeepalive):
            self._on_keepalive(outcome)
        elif isinstance(outcome, TableTruncate):
            self._on_truncate(outcome)
        elif isinstance(outcome, SchemaChange):
            self._on_schema_change(outcome)
        elif isinstance(outcome, RepairRequest):
            self._on_repair(outcome)

    def _poison(self, data: bytes, exc: Exception) -> PoisonRecord:
        """The record in ``data`` cannot be handled: say where, never what it holds."""
        lsn = format_lsn(int.from_bytes(data[1:9], "big")) if len(data) >= 9 else "?"
        table = "?"
        views = self.assembler.views
        # Row messages name their relation right after the type byte (or after the
        # transaction id, inside a stream).
        for at in (26, 30):
            if len(data) >= at + 4 and chr(data[25]) in "IUDT":
                view = views.get(int.from_bytes(data[at : at + 4], "big"))
                if view is not None:
                    table = view.table_name
                    break
        reason = str(exc) if isinstance(exc, RecordError) else type(exc).__name__
        self.log.error("cannot apply a record", lsn=lsn, table=table, error=type(exc).__name__)
        return PoisonRecord(lsn, table, reason)

    # -- events -----------------------------------------------------------------------------

    def _on_keepalive(self, frame: PrimaryKeepalive) -> None:
        """A keepalive asking for a reply (the core took its position)."""
        if frame.reply_requested:
            self.send_status(reply=False)

    def _on_truncate(self, event: TableTruncate) -> None:
        for table in self.core.truncate(event.views, event.seq):
            self.backfill.truncated(table)

    def _on_commit(self, event: TxCommit) -> None:
        """A commit while a backfill window is open (the core handled the rest)."""
        dirty = self.core.take_dirty()
        if dirty:
            self.backfill.dirty(dirty)
        if self.backfill.ready(self.core.stream_position):
            self._flush_window()

    def _watch_window(self) -> None:
        """Tell the core which backfill window is open (after it opens or closes)."""
        window = self.backfill.window
        self.core.watch(self.backfill.watch_table, window.snapshot.sees if window else None)

    def _on_schema_change(self, event: SchemaChange) -> None:
        self.log.info(
            "schema change",
            table=event.view.table_name,
            columns_before=len(event.previous),
            columns_after=len(event.view.column_names),
        )
        self.backfill.schema_changed(event.view.tracked)
        self._watch_window()

    def _probe(self, now: float) -> None:
        """A quiet stream sends no batch, and a batch is where the script finds the cache
        lost (``FLUSHALL``) or taken over: send an empty one, which writes nothing and
        checks both, so a loss on an idle server is rebuilt within a second or so
        rather than at the next write or keepalive."""
        self._last_probe = now
        state: dict[str, str] = {}
        # A slot repair whose last rows went out with no batch to carry its record.
        self._end_repair(state, settled=True)  # only with nothing in flight
        self.sink.receive(self.sink.send(CommandBatch(), state))

    def _end_repair(self, state: dict[str, str], settled: bool = False) -> None:
        """Clear a slot repair's record (cluster mode) once none of its backfill requests
        is left and the batch that wrote the last of them is acknowledged (``settled``:
        nothing in flight; else the third batch in a row that finds none left): a row of
        that batch found incomplete (its key deleted by the repair) is requested under
        the repair's tag at the acknowledgement, and holds the record."""
        if not self.repair_pending or self.backfill.pending(REPAIR_TAG):
            self._repair_quiet = 0
            return
        self._repair_quiet += 1
        if settled or self._repair_quiet >= 3:
            state[REPAIR_FIELD] = ""
            self.repair_pending = False
            if self.repair_done is not None:
                self.repair_done()

    def _tick(self, now: float) -> None:
        """An open backfill window is written once the stream passed its high water, and a
        server nobody writes to sends no WAL: after a quiet moment, write a logical message
        (dropped by every decoder) so the stream moves past it."""
        if self._ticks_refused or now - max(self._last_received, self._last_tick) < TICK_AFTER:
            return
        self._last_tick = now
        try:
            catalog.emit_message(self.pg, TICK_PREFIX, "")
        except psycopg.OperationalError as lost:
            raise PostgresUnavailable(f"writing a WAL tick: {type(lost).__name__}") from None
        except psycopg.Error as refused:
            self._ticks_refused = True
            self.log.warning(
                "cannot write a WAL tick: an online rebuild on a server nobody writes to"
                " finishes at its next write",
                error=type(refused).__name__,
            )

    def _on_repair(self, event: RepairRequest) -> None:
        """``cdc verify --repair`` asks for rows to be re-read: through the backfill, whose
        windows never write a row older than what the stream applied (its module
        docstring), rather than by the verifier, which cannot know that."""
        tracked = self._qualified.get(event.table)
        if tracked is None or not event.ids:
            return  # another daemon's table (several daemons on one Redis)
        self.log.info(
            "re-reading rows for cdc verify --repair", table=event.table, rows=len(event.ids)
        )
        self.backfill.request_rows(tracked, list(event.ids), "verify --repair")

    # -- applying ----------------------------------------------------------------------------

    def flush_complete(self) -> None:
        """Send the complete transactions of the batch; keep the one in progress."""
        core = self.core
        if not core.applying:
            self.flush()
            return
        if core.has_complete(self.sent_checkpoint):
            cut = core.cut_complete()
            if not cut.batch.empty or cut.checkpoint > self.sent_checkpoint:
                self._send(cut)

    def _at_limit(self) -> None:
        """The batch reached a limit (changes or bytes).

        A batch ends at a transaction boundary: the complete transactions go, the one in
        progress stays for the next batch. Only a transaction that alone fills a batch
        is sent in chunks (``partial`` records how far it got)."""
        core = self.core
        if core.applying and core.has_complete(self.sent_checkpoint):
            self.flush_complete()
            if not core.over_limit(self.settings.batch_max_changes, self.settings.batch_max_bytes):
                return
        self.flush()

    def flush(self, chunk: bool = True) -> None:
        """Send the batch with its checkpoint (then the previous one is acknowledged).

        With ``chunk`` and a transaction in progress, its changes so far go too, as a chunk
        (only at the batch limit)."""
        if self.core.has_pending(self.sent_checkpoint, chunk):
            self._send(self.core.cut(chunk))

    def _send(self, cut: Cut) -> None:
        state = {
            "lsn": format_lsn(cut.checkpoint),
            "partial": format_partial(*cut.partial) if cut.partial else "",
        }
        self._end_repair(state)
        marker: str | None = None
        if self.rebuilding:
            marker = self.backfill.progress_marker()
            if marker != self._rebuild_marker or not marker:
                state["rebuild"] = marker
        # Send first, then take the previous batch's answer: Redis always has the next
        # batch queued while the daemon waits, so neither side idles on the other.
        previous = self._inflight
        if failpoints.ACTIVE:
            failpoints.hit("before_send")
        handle = self.sink.send(cut.batch, state)
        if failpoints.ACTIVE:
            failpoints.hit("after_send")
        self._inflight = _Sent(handle, cut, marker)
        if previous is not None:
            self._acknowledge(previous)
        self.sent_checkpoint = cut.checkpoint

    def drain(self) -> None:
        """Wait for the batch in flight, if any."""
        if self._inflight is not None:
            sent, self._inflight = self._inflight, None
            self._acknowledge(sent)

    def _acknowledge(self, sent: _Sent) -> None:
        """Take Redis' answer to ``sent`` (batches are answered in the order sent)."""
        result = self.sink.receive(sent.handle)
        now = time.time()
        position = self.position
        cut = sent.cut
        position.checkpoint = Lsn(cut.checkpoint)
        if cut.partial is not None:
            position.partial_lsn = Lsn(cut.partial[0])
            position.partial_count = cut.partial[1]
        else:
            position.partial_lsn = None
            position.partial_count = 0
        if sent.rebuild_marker is not None:
            self._rebuild_marker = sent.rebuild_marker
            if not sent.rebuild_marker and not self.backfill.busy and self.rebuilding:
                self.rebuilding = False
                self.log.info("rebuild complete", rows=self.backfill.stats.rows_written)
        batch = cut.batch
        self._record(batch, cut.commit_times, now)
        for table, row_id in result.incomplete_rows:
            tracked = self.tables.get(table)
            if tracked is not None:
                self.metrics.errors.labels(kind="incomplete_row").inc()
                # During a slot repair, its record waits for these rows too.
                tag = REPAIR_TAG if self.repair_pending else ""
                self.backfill.request_rows(tracked, [row_id.decode()], "incomplete row", tag)
        for table, size in batch.oversized:
            self.metrics.errors.labels(kind="oversized_row").inc()
            self.log.warning("row too large to cache; key dropped", table=table, bytes=size)
        if self.sink.publish_refused and not self._publish_warned:
            self._publish_warned = True
            self.log.warning(
                "Redis refuses PUBLISH on cdc:applied: readers waiting for a token poll the"
                " checkpoint instead (grant the channel pattern &cdc:* to the daemon's user)"
            )
        if result.repaired:
            self.metrics.errors.labels(kind="wrong_type_key").inc(result.repaired)
            self.log.warning("replaced keys of ours that held another type", count=result.repaired)
        self._last_applied_at = time.monotonic()
        if self._last_applied_at - self._last_status >= self.settings.status_interval:
            # Busy draining a backlog: keep confirming (and proving we are alive).
            self.send_status(reply=False)

    def _record(self, batch: CommandBatch, commit_times: list[float], now: float) -> None:
        m = self.metrics
        for (table, op), n in batch.counts.items():
            m.changes.labels(table=table, op=op).inc(n)
        m.batches.inc()
        if commit_times:
            m.transactions.inc(len(commit_times))
            m.apply_delay.observe_many([max(0.0, now - t) for t in commit_times])
            m.lag_seconds.set(max(0.0, now - commit_times[-1]))
        m.last_applied_lsn.set(self.position.checkpoint)

    def _flush_window(self) -> None:
        window = self.backfill.flush(self.core.batch)
        self._watch_window()
        self.metrics.backfill_rows.labels(table=window.view.table_name).inc(len(window.rows))
        self.flush()

    # -- idle work ----------------------------------------------------------------------------

    def _idle(self) -> None:
        """The socket is drained: send what is complete, confirm, backfill, wait for more.

        A batch in flight is not waited for here: its answer is taken when it arrives
        (the wait below watches Redis' socket too), so Redis keeps working while the next
        batch is planned. Until that answer, what completes meanwhile waits to go as one
        batch: a quiet stream still sends each commit at once, a busy one sends fewer,
        larger batches instead of one round trip per commit."""
        if self._inflight is None:
            self.flush_complete()
        now = time.monotonic()
        if self.schema_requests is not None and not self.schema_requests.empty():
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
                    self._watch_window()
        backfill = self.backfill
        in_tx = self.assembler.in_transaction
        if backfill.window is not None and not in_tx and backfill.ready(self.core.stream_position):
            self._flush_window()
            self.drain()
        if backfill.window is None and backfill.queue and not in_tx:
            window = backfill.open(self.pg)
            self._watch_window()
            if window is not None and backfill.ready(self.core.stream_position):
                self._flush_window()
                self.drain()
        if backfill.window is not None and not in_tx:
            self._tick(now)
        if (
            self._inflight is None
            and not in_tx
            and now - max(self._last_applied_at, self._last_probe) >= PROBE_AFTER
        ):
            self._probe(now)
        if self._inflight is None and self.core.move_to_keepalive(self.sent_checkpoint):
            self.flush()
        if self.core.batch.empty and not in_tx and now - self._last_applied_at > 1.0:
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
        timeout = 0.1 if not waiting_for_window else 0.02
        if self._inflight is None:
            self.source.wait(timeout)
            return
        if self.sink.buffered(self._inflight.handle):
            # Its answer may have arrived with the previous one's: the socket will not
            # become readable for it again.
            self.drain()
            return
        _, answered = self.source.wait(timeout, also=self.sink.fileno())
        # Readable is not answered: only part of the answer may have arrived.
        if answered and self.sink.ready(self._inflight.handle):
            self.drain()

    def send_status(self, reply: bool) -> None:
        confirmed = self.position.checkpoint
        received = max(self.core.received, confirmed)
        self.source.send_status(received, confirmed, confirmed, reply)
        now = time.monotonic()
        self._last_status = now
        if reply:
            self._last_reply_request = now

    def _shutdown(self) -> None:
        """Finish the batch in flight (whole transactions only), confirm it."""
        self.core.drop_open()  # the transaction in progress is streamed again after a restart
        self.flush(chunk=False)
        self.drain()
        self.streams.close()
        self.send_status(reply=False)
        if not self.source.finish():
            self.log.warning("the server did not end the stream in time; closing it")
        self.log.info("stopped", checkpoint=format_lsn(self.position.checkpoint))


def _stream_kind(kind: int) -> bool:
    """pgoutput's messages that frame streamed transactions: Stream Start, Stop, Commit,
    Abort (cdc/runtime/streams.py)."""
    return kind == 0x53 or kind == 0x45 or kind == 0x63 or kind == 0x41  # noqa: PLR1714
