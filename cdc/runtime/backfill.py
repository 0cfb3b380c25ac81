"""Online backfill: re-read tracked rows from PostgreSQL while the stream keeps flowing.

Used when rows in Redis must be refreshed without stopping: after Redis lost its data,
after a schema change (``ADD COLUMN … DEFAULT`` changes rows that no WAL record mentions),
and for single rows whose cached hash turned out incomplete.

It works in chunks, each a *window* in the spirit of Netflix's DBLog watermarks, but
decided by transaction visibility instead of watermark writes (the daemon's role only
has SELECT):

1. In one REPEATABLE READ transaction, take ``pg_current_snapshot()``, read the chunk
   ``R`` (rows as text), then read ``pg_current_wal_insert_lsn()`` = the *high water*
   ``H``. Every transaction visible in the snapshot committed before ``H``.
2. Keep streaming. For each transaction the stream delivers, decide from its xid whether
   the snapshot saw it. If it did not, the rows it touched are newer than ``R``: drop
   them from ``R`` (they are *dirty*) and let the stream apply them as usual. A commit
   can reach the stream before snapshots see it, so a transaction already applied to the
   table but invisible to the snapshot means the chunk is not opened yet: it is tried
   again a moment later (the last transactions applied are remembered per table).
3. Once the stream has passed ``H``, every transaction the snapshot saw has been
   streamed, so what is left of ``R`` is the latest state of those rows: write it, in
   stream order, in the next batch.

Rows of one key are changed in commit order under row locks, so the transactions that
touched a key and that the snapshot saw always precede those it did not: after the
window, each key holds either ``R`` or a newer streamed value, never an older one.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field

import psycopg
from psycopg import errors as pgerrors

from cdc.errors import PostgresUnavailable
from cdc.postgres import catalog
from cdc.postgres.rows import Row, rows_after, rows_by_id
from cdc.telemetry import logs
from cdc.transform.assemble import TableView, view_from_columns
from cdc.transform.core import RecentTransactions
from cdc.transform.plan import CommandBatch, Planner
from schema.keys import TrackedTable
from schema.lsn import Lsn, lsn_bytes, parse_lsn

RETRY_INITIAL = 0.5
RETRY_MAX = 5.0
_HALF = 1 << 31
_WRAP = 1 << 32


@dataclass(frozen=True)
class XidSnapshot:
    """``pg_current_snapshot()``: which transactions a snapshot sees (64-bit xids)."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> XidSnapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def widen(self, xid32: int) -> int:
        """A 32-bit xid from the stream as the 64-bit xid nearest to this snapshot."""
        candidate = (self.xmax & ~(_WRAP - 1)) | xid32
        if candidate - self.xmax > _HALF:
            candidate -= _WRAP
        elif self.xmax - candidate > _HALF:
            candidate += _WRAP
        return candidate

    def sees(self, xid32: int) -> bool:
        """Whether a *committed* transaction is visible in this snapshot."""
        xid = self.widen(xid32)
        if xid < self.xmin:
            return True
        if xid >= self.xmax:
            return False
        return xid not in self.xip


@dataclass
class Request:
    table: TrackedTable
    ids: set[str] | None  # None: the whole table
    reason: str
    after: str | None = None  # whole-table progress (last primary key done)
    # What the requester waits on (see Backfill.pending): a repair recorded in cdc:state.
    tags: set[str] = field(default_factory=set)


@dataclass
class Window:
    request: Request
    view: TableView
    rows: dict[bytes, Row]
    snapshot: XidSnapshot
    high_water: Lsn
    # ids requested but absent from the snapshot: deleted unless the stream touches them
    missing: set[bytes]
    last_key: str | None
    exhausted: bool
    dirty: int = 0


@dataclass
class BackfillStats:
    rows_written: int = 0
    rows_dirty: int = 0
    windows: int = 0
    retries: int = 0
    timeouts: int = 0
    tables_done: list[str] = field(default_factory=list)


class Backfill:
    """Queue of backfill requests and the one open window."""

    def __init__(self, planner: Planner, chunk: int, publication: str | None = None) -> None:
        self.planner = planner
        self.chunk = chunk
        # Rows are read with the publication's columns (never an excluded one).
        self.publication = publication
        self.queue: deque[Request] = deque()
        self.window: Window | None = None
        self.recent = RecentTransactions()
        self.stats = BackfillStats()
        # After a query timed out (a lock held on the table, a slow server): not before this
        # (monotonic seconds), so the stream is held up at most one lock_timeout per try.
        self.retry_at = 0.0
        self._retry_delay = RETRY_INITIAL
        self.log = logs.get("cdc.runtime.backfill")

    # -- requests ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self.window is not None or bool(self.queue)

    def request_table(self, table: TrackedTable, reason: str, after: str | None = None) -> None:
        for queued in self.queue:
            if queued.table.name == table.name and queued.ids is None:
                return
        self.queue.append(Request(table, None, reason, after))

    def request_rows(self, table: TrackedTable, ids: list[str], reason: str, tag: str = "") -> None:
        """Fetch ``ids`` again; ``tag``: :meth:`pending` tells when they are written."""
        tags = {tag} if tag else set()
        open_request = self.window.request if self.window is not None else None
        for queued in self.queue:
            # Not into the open window's request: its ids were read already, and the
            # window's end pops it with whatever was added.
            if queued is open_request:
                continue
            if queued.table.name == table.name and queued.ids is not None:
                queued.ids.update(ids)
                queued.tags |= tags
                return
        self.queue.append(Request(table, set(ids), reason, tags=tags))

    def pending(self, tag: str) -> bool:
        """Whether rows requested with ``tag`` are still to be written (a window that
        read them stays queued until its rows go into a batch)."""
        return any(tag in request.tags for request in self.queue)

    def progress_marker(self) -> str:
        """What an interrupted rebuild needs to resume (stored in ``cdc:state``)."""
        pending = []
        if self.window is not None and self.window.request.ids is None:
            pending.append(
                {"table": self.window.request.table.name, "after": self.window.request.after}
            )
        for req in self.queue:
            if req.ids is None:
                pending.append({"table": req.table.name, "after": req.after})
        return json.dumps(pending) if pending else ""

    # -- the stream's side ---------------------------------------------------------------------

    @property
    def watch_table(self) -> str:
        """The table whose rows the open window holds ("" when none is open)."""
        return self.window.view.tracked.name if self.window is not None else ""

    def dirty(self, row_ids: list[bytes]) -> None:
        """Rows changed by a transaction the window's snapshot did not see: the stream's
        value is newer than the window's, so the window must not write them."""
        window = self.window
        if window is None:
            return
        for row_id in row_ids:
            if window.rows.pop(row_id, None) is not None:
                window.dirty += 1
            window.missing.discard(row_id)

    def truncated(self, table: str) -> None:
        """An unseen TRUNCATE of the window's table: every row of the window is stale."""
        window = self.window
        if window is not None and window.view.tracked.name == table:
            window.dirty += len(window.rows)
            window.rows.clear()
            window.missing.clear()

    def schema_changed(self, table: TrackedTable) -> None:
        """The table's columns changed: restart its window and re-read it whole."""
        window = self.window
        if window is not None and window.view.tracked.name == table.name:
            self.window = None
            ids = window.request.ids
            if ids is not None:
                # The window's ids left the request when it opened: they are read again.
                ids.update(k.decode() for k in window.rows)
                ids.update(k.decode() for k in window.missing)
        # Rows already re-read with the old columns must be read again: start over.
        self.queue = deque(
            req for req in self.queue if not (req.table.name == table.name and req.ids is None)
        )
        self.queue.append(Request(table, None, "schema change"))

    # -- windows -----------------------------------------------------------------------------------

    def open(self, conn: catalog.Conn) -> Window | None:
        """Read the next chunk; None when there is nothing to do (or not now).

        A chunk query that times out (``lock_timeout`` behind an ``ACCESS EXCLUSIVE``
        lock, ``statement_timeout``) is not an error: the window stays closed, the stream
        goes on, and the chunk is tried again after a growing delay."""
        if self.window is not None:
            return self.window
        if not self.queue:
            return None
        now = time.monotonic()
        if now < self.retry_at:
            return None
        try:
            window = self._open(conn, self.queue[0])
        except (pgerrors.LockNotAvailable, pgerrors.QueryCanceled) as exc:
            self.stats.retries += 1
            self.stats.timeouts += 1
            delay = self._retry_delay
            locked = isinstance(exc, pgerrors.LockNotAvailable)
            self._retry_delay = min(RETRY_MAX, delay * 2)
            self.retry_at = time.monotonic() + delay
            self.log.warning(
                "backfill query timed out; the stream goes on, retrying later",
                table=self.queue[0].table.name,
                reason="lock_timeout" if locked else "statement_timeout",
                retry_in=round(delay, 2),
            )
            return None
        except (psycopg.DataError, UnicodeError) as bad:
            # Ids PostgreSQL cannot take (a request written into the WAL by anyone): never
            # stop the stream for them. Several ids: the chunk is tried again in halves,
            # and a half refused again is halved again, so only the refused ids are
            # dropped (a repair waits on the others) and one bad id among a chunk of n
            # costs about 2·log2(n) queries, not n.
            failed = self.queue[0]
            if failed.ids is not None and len(failed.ids) > 1:
                chunk = sorted(failed.ids)[: self.chunk]
                failed.ids.difference_update(chunk)
                if not failed.ids:
                    self.queue.popleft()
                middle = (len(chunk) + 1) // 2
                for half in (chunk[middle:], chunk[:middle]):
                    if half:
                        self.queue.appendleft(
                            Request(failed.table, set(half), failed.reason, tags=set(failed.tags))
                        )
                return None
            dropped = self.queue.popleft()
            self.log.warning(
                "dropped a backfill request PostgreSQL refused",
                table=dropped.table.name,
                reason=dropped.reason,
                error=type(bad).__name__,
            )
            return None
        except (pgerrors.UndefinedColumn, pgerrors.UndefinedTable):
            # DDL between reading the columns and the rows (DROP/RENAME COLUMN): the
            # schema change reaches the pipeline too; read again at the next idle moment.
            self.stats.retries += 1
            return None
        except psycopg.OperationalError as exc:
            raise PostgresUnavailable(
                f"backfill of {self.queue[0].table.name}: connection lost ({type(exc).__name__})"
            ) from None
        if window is not None:
            self._retry_delay = RETRY_INITIAL
        return window

    def _open(self, conn: catalog.Conn, request: Request) -> Window | None:
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        try:
            with conn.transaction():
                snapshot_row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
                assert snapshot_row is not None
                snapshot = XidSnapshot.parse(str(snapshot_row[0]))
                if self.recent.unseen(snapshot.sees, request.table.name):
                    # A transaction already applied here is not visible to this snapshot
                    # yet (its commit reached the stream first): try again a moment later.
                    self.stats.retries += 1
                    return None
                columns = catalog.readable_columns(conn, request.table, self.publication)
                view = view_from_columns(request.table, columns)
                if request.ids is None:
                    rows = rows_after(conn, request.table, columns, request.after, self.chunk)
                    wanted: list[str] = []
                else:
                    wanted = sorted(request.ids)[: self.chunk]
                    rows = rows_by_id(conn, request.table, columns, wanted) if wanted else []
                hw_row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                assert hw_row is not None
                high_water = parse_lsn(str(hw_row[0]))
        finally:
            conn.autocommit = True
        by_id: dict[bytes, Row] = {}
        for row in rows:
            key = row[view.pk_index]
            assert key is not None
            by_id[key] = row
        if request.ids is None:
            last_key = rows[-1][view.pk_index].decode() if rows else request.after  # type: ignore[union-attr]
            exhausted = len(rows) < self.chunk
            missing: set[bytes] = set()
        else:
            for wanted_id in wanted:
                request.ids.discard(wanted_id)
            last_key = None
            exhausted = not request.ids
            missing = {w.encode() for w in wanted} - set(by_id)
        window = Window(request, view, by_id, snapshot, high_water, missing, last_key, exhausted)
        self.window = window
        self.stats.windows += 1
        return window

    def ready(self, stream_position: int) -> bool:
        window = self.window
        return window is not None and stream_position >= window.high_water

    def flush(self, batch: CommandBatch) -> Window:
        """Write what is left of the window into ``batch``; move to the next chunk."""
        window = self.window
        assert window is not None
        stamp = lsn_bytes(window.high_water)
        for row in window.rows.values():
            self.planner.write_row(window.view, row, stamp, batch)
        no_lookups: tuple[bytes | None, ...] = tuple(None for _ in window.view.lookup_indexes)
        for row_id in window.missing:
            self.planner.delete_row(window.view, row_id, no_lookups, batch)
        self.stats.rows_written += len(window.rows)
        self.stats.rows_dirty += window.dirty
        request = window.request
        self.window = None
        if request.ids is None:
            request.after = window.last_key
        if window.exhausted:
            self.queue.popleft()
            if request.ids is None:
                self.stats.tables_done.append(request.table.name)
        return window
