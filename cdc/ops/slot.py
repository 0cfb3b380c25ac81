"""``cdc slot status`` and ``cdc slot reset``: the replication slot, for operators.

``reset`` is the recovery tool for a dropped or broken slot: it refuses while a daemon
holds the slot (unless ``--force``, which terminates that walsender), drops the slot,
creates it again with an exported snapshot, reloads the cache from that snapshot (every
row stamped with the new consistent point), deletes keys whose rows no longer exist, and
sets the checkpoint. Taking the fence first means a daemon that wakes up mid-reset cannot
write over it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from cdc.cache.cluster_sink import make_sink
from cdc.errors import ConfigError, SlotInUse
from cdc.postgres import catalog
from cdc.postgres.source import ReplicationSource
from cdc.runtime import failover
from cdc.runtime.snapshot import LoadReport, create_slot_and_load
from cdc.settings import Settings
from cdc.telemetry import logs
from cdc.transform.plan import Planner
from schema.keys import STATE_KEY, TRACKED_TABLES, TrackedTable
from schema.lsn import format_lsn
from schema.redis_url import cluster_url


@dataclass(frozen=True)
class SlotStatus:
    slot: str
    exists: bool
    plugin: str | None = None
    active: bool = False
    active_pid: int | None = None
    confirmed_flush_lsn: str | None = None
    lag_bytes: int | None = None
    retained_wal_bytes: int | None = None
    wal_status: str | None = None
    current_wal_lsn: str | None = None
    # PostgreSQL 17+: a failover slot; ``synced``: every reachable standby of a multi-host
    # URL has a synchronized copy (None: no standby reachable, or no failover slots).
    failover: bool | None = None
    synced: bool | None = None
    standbys: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        if not self.exists:
            return [f'slot "{self.slot}" does not exist']
        active = f"yes (pid {self.active_pid})" if self.active else "no"
        rows = [
            ("slot", self.slot),
            ("plugin", self.plugin or ""),
            ("active", active),
            ("confirmed_flush_lsn", self.confirmed_flush_lsn or "-"),
            ("lag_bytes", _number(self.lag_bytes)),
            ("retained_wal_bytes", _number(self.retained_wal_bytes)),
            ("wal_status", self.wal_status or "-"),
            ("current_wal_lsn", self.current_wal_lsn or "-"),
            ("failover", _flag(self.failover)),
            ("synced", _flag(self.synced)),
        ]
        for standby in self.standbys or []:
            rows.append(
                (
                    f"standby {standby['host']}:{standby['port']}",
                    f"synced {_flag(standby['synced'])}",
                )
            )
        return [f"{name:<20} {value}" for name, value in rows]


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def status(settings: Settings) -> SlotStatus:
    conn = catalog.connect(settings.catalog_conninfo)
    try:
        info = catalog.slot_info(conn, settings.slot)
        if info is None:
            return SlotStatus(
                settings.slot,
                exists=False,
                current_wal_lsn=format_lsn(catalog.current_wal_lsn(conn)),
            )
        flags = failover.slot_failover(conn, settings.slot)
        copies = failover.standby_copies(settings.replication_conninfo, settings.slot)
        return SlotStatus(
            failover=flags.failover if flags is not None else None,
            synced=all(c.synced for c in copies) if copies else None,
            standbys=[{"host": c.host, "port": c.port, "synced": c.synced} for c in copies]
            if copies
            else None,
            slot=info.name,
            exists=True,
            plugin=info.plugin,
            active=info.active,
            active_pid=info.active_pid,
            confirmed_flush_lsn=format_lsn(info.confirmed_flush_lsn)
            if info.confirmed_flush_lsn
            else None,
            lag_bytes=info.lag_bytes,
            retained_wal_bytes=info.retained_bytes,
            wal_status=info.wal_status,
            current_wal_lsn=format_lsn(info.current_lsn),
        )
    finally:
        conn.close()


@dataclass(frozen=True)
class ResetPlan:
    slot: str
    slot_exists: bool
    active_pid: int | None
    tables: tuple[str, ...]
    rows: dict[str, int]

    def lines(self) -> list[str]:
        lines = []
        if self.slot_exists:
            holder = (
                f" (held by pid {self.active_pid}: it will be terminated)"
                if self.active_pid
                else ""
            )
            lines.append(f'drop slot "{self.slot}"{holder}')
        lines.append(f'create slot "{self.slot}" with an exported snapshot')
        counts = ", ".join(f"{t} (~{self.rows.get(t, 0)} rows)" for t in self.tables)
        lines.append(f"reload the cache from that snapshot: {counts}")
        lines.append("delete keys whose rows no longer exist; set the checkpoint")
        return lines


def plan_reset(
    settings: Settings, force: bool, tables: tuple[TrackedTable, ...] = TRACKED_TABLES
) -> ResetPlan:
    conn = catalog.connect(settings.catalog_conninfo)
    try:
        info = catalog.slot_info(conn, settings.slot)
        if info is not None and info.active and not force:
            raise ConfigError(
                f"{SlotInUse(settings.slot, info.active_pid)}:"
                " stop the daemon first, or use --force"
            )
        rows = {}
        for table in tables:
            row = conn.execute(
                "SELECT reltuples::bigint FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s",
                (table.schema, table.name),
            ).fetchone()
            rows[table.name] = max(0, int(str(row[0]))) if row else 0
        return ResetPlan(
            slot=settings.slot,
            slot_exists=info is not None,
            active_pid=info.active_pid if info is not None and info.active else None,
            tables=tuple(t.name for t in tables),
            rows=rows,
        )
    finally:
        conn.close()


def reset(
    settings: Settings,
    plan: ResetPlan,
    tables: tuple[TrackedTable, ...] = TRACKED_TABLES,
    state_key: str = STATE_KEY,
) -> LoadReport:
    """Reload ``tables`` (the ones the slot's publication holds) under ``state_key``:
    another daemon's tables and state on the same Redis are not touched."""
    log = logs.get("cdc.ops.slot")
    conn = catalog.connect(settings.catalog_conninfo)
    source = ReplicationSource(settings.replication_conninfo)
    redis_url = cluster_url(settings.redis, settings.redis_timeout)
    sink = make_sink(
        redis_url,
        settings.redis_timeout,
        state_key=state_key,
        mirrors=tuple(t.name for t in tables),
    )
    try:
        if plan.active_pid:
            catalog.terminate(conn, plan.active_pid)
            _wait_inactive(conn, settings.slot)
        system = source.connect()
        sink.connect()
        if plan.slot_exists:
            source.drop_slot(settings.slot)
            log.info("slot dropped", slot=settings.slot)

        def progress(table: str, rows: int, seconds: float) -> None:
            log.info("loading", table=table, rows=rows, seconds=round(seconds, 1))

        epoch = failover.next_epoch(sink.read_state())
        source_id = f"{system.system_id}/{system.dbname}/{settings.slot}"
        report = create_slot_and_load(
            source,
            sink,
            Planner(settings.max_row_bytes, settings.change_feed, settings.change_feed_maxlen),
            tables,
            conninfo=settings.catalog_conninfo,
            redis_url=redis_url,
            redis_timeout=settings.redis_timeout,
            slot=settings.slot,
            plugin=settings.plugin,
            source_id=source_id,
            batch_rows=settings.backfill_chunk,
            progress=progress,
            publication=settings.publication,
        )
        # The reloaded cache is a new epoch of this server's current timeline.
        sink.claim(
            {
                "slot": settings.slot,
                "source": source_id,
                "epoch": epoch,
                **failover.identity_fields(system.system_id, system.timeline),
            }
        )
        return report
    finally:
        source.close()
        sink.close()
        conn.close()


def _wait_inactive(conn: catalog.Conn, slot: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = catalog.slot_info(conn, slot)
        if info is None or not info.active:
            return
        time.sleep(0.1)
    raise ConfigError(f'slot "{slot}" is still in use after terminating its walsender')
