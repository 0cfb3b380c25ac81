"""A background thread that watches PostgreSQL: slot lag, retained WAL, schema changes.

It uses a connection of its own, so a slow catalog query never stalls the stream. Schema
changes (a tracked table's columns differ from the last look) are handed to the pipeline
through a queue: DDL that no later DML mentions (``ADD COLUMN … DEFAULT`` on a quiet table)
still reaches the cache within a poll interval.
"""

from __future__ import annotations

import queue
import threading
import time

from cdc.errors import CdcError
from cdc.postgres import catalog
from cdc.settings import Settings
from cdc.telemetry import logs
from cdc.telemetry.metrics import Metrics
from schema.keys import TrackedTable


class Observer:
    def __init__(
        self, settings: Settings, tables: tuple[TrackedTable, ...], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.tables = tables
        self.metrics = metrics
        self.schema_changes: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._fingerprint: dict[str, tuple[tuple[str, int, int], ...]] | None = None
        self.log = logs.get("cdc.runtime.observer")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        conn: catalog.Conn | None = None
        next_lag = 0.0
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = catalog.connect(self.settings.catalog_conninfo, "PostgreSQL (observer)")
                now = time.monotonic()
                self._poll_schema(conn)
                if now >= next_lag:
                    self._poll_slot(conn)
                    next_lag = now + self.settings.observe_interval
            except (CdcError, OSError, Exception) as exc:  # noqa: BLE001 - the observer must survive
                self.log.debug("observer query failed", error=type(exc).__name__)
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.settings.schema_poll_interval)
        if conn is not None:
            conn.close()

    def _poll_schema(self, conn: catalog.Conn) -> None:
        current = catalog.schema_fingerprint(conn, self.tables)
        previous, self._fingerprint = self._fingerprint, current
        if previous is None:
            return
        for name, columns in current.items():
            if previous.get(name) != columns:
                self.schema_changes.put(name)

    def _poll_slot(self, conn: catalog.Conn) -> None:
        info = catalog.slot_info(conn, self.settings.slot)
        if info is None:
            return
        if info.lag_bytes is not None:
            self.metrics.lag_bytes.set(info.lag_bytes)
        if info.retained_bytes is not None:
            self.metrics.retained_wal.set(info.retained_bytes)
