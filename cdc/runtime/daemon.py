"""``cdc run``: the daemon's lifecycle around the streaming pipeline.

Each *session* connects to PostgreSQL (replication and catalog connections) and Redis,
decides how to (re)start from what the slot and ``cdc:state`` say, acquires the slot with
``START_REPLICATION``, takes the fence in Redis, and streams until stopped or until an
error. Retryable errors end the session and start a new one after a backoff; a new
session always re-reads both sides, so nothing is assumed across a failure.

How a session starts:

====================================  ===========================================================
slot / cache state                    action
====================================  ===========================================================
no slot, no cache                     first start: create the slot with an exported snapshot,
                                      load it, sweep stale keys, stream from the consistent point
no slot, a cache from a slot          ``CDC_ON_SLOT_LOSS`` (:mod:`.failover`): after a promotion
                                      (timeline changed) an online rebuild on a new slot; dropped
                                      by hand: refuse (exit 2), ``cdc slot reset``
slot invalidated (wal_status lost)    drop and recreate it, load a new snapshot (automatic)
slot, cache consistent with it        resume from the checkpoint (replays are skipped)
slot, cache missing or behind slot    online rebuild: clear the tracked keys, stream, and
(Redis lost data)                     backfill every table while streaming (:mod:`.backfill`)
slot, cache past the new timeline's   online rebuild (a promotion: Redis has changes the new
switch point                          primary never had)
====================================  ===========================================================
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import psycopg

from cdc.cache.checkpoint import CacheState, check_format
from cdc.cache.sink import RedisSink
from cdc.cache.views import state_fields
from cdc.errors import (
    CdcError,
    ConfigError,
    Fenced,
    PoisonRecord,
    RedisLost,
    RedisRejected,
    RedisUnavailable,
    Retryable,
    SlotInUse,
    SlotInvalidated,
)
from cdc.ops import checks
from cdc.postgres import catalog
from cdc.postgres.source import ReplicationSource, SystemInfo
from cdc.protocol.wal2json import START_OPTIONS as WAL2JSON_OPTIONS
from cdc.protocol.wal2json import Wal2JsonDecoder
from cdc.runtime import failover
from cdc.runtime.backfill import Backfill
from cdc.runtime.observer import Observer
from cdc.runtime.pipeline import Decode, Pipeline
from cdc.runtime.snapshot import create_slot_and_load, scan_keys
from cdc.settings import Settings
from cdc.telemetry import logs
from cdc.telemetry.health import HealthServer, Readiness
from cdc.telemetry.metrics import Metrics
from cdc.transform.cluster_script import SlotLedger
from cdc.transform.core import Position
from cdc.transform.plan import Planner
from schema import keys
from schema.keys import TABLES_FIELD, TRACKED_TABLES, TrackedTable
from schema.lsn import Lsn, format_lsn
from schema.redis_url import as_cluster_url, redis_client

if TYPE_CHECKING:
    from cdc.cache.cluster_sink import AnySink, ClusterSink


class Backoff:
    """Exponential backoff with jitter, reset after a healthy session."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current
        self.current = min(self.maximum, self.current * 2)
        return delay * (0.75 + random.random() / 2)  # noqa: S311 - jitter, not crypto

    def reset(self) -> None:
        self.current = self.initial


def stream_options(
    settings: Settings, tables: tuple[TrackedTable, ...], server_version: int = 0
) -> dict[str, str]:
    if settings.plugin == "wal2json":
        return {**WAL2JSON_OPTIONS, "add-tables": ",".join(t.qualified_name for t in tables)}
    if server_version >= 140000:
        # Large transactions arrive while they run (cdc/runtime/streams.py), not after the server
        # decoded (and spilled) them whole. Never two_phase (section 7.8, failover slots).
        # Logical messages carry cdc verify --repair's requests (cdc.ops.verify).
        return {
            "proto_version": "2",
            "streaming": "on",
            "messages": "true",
            "publication_names": settings.publication,
        }
    return {"proto_version": "1", "publication_names": settings.publication}


class Daemon:
    def __init__(
        self, settings: Settings, tables: tuple[TrackedTable, ...] = TRACKED_TABLES
    ) -> None:
        self.settings = settings
        # The declared tables; after the startup checks, the ones the publication holds
        # (several daemons may split them: README "Several daemons, one Redis").
        self.tables = tables
        self.declared = tables
        self.state_key = keys.state_key(settings.slot)
        self.metrics = Metrics(tuple(t.name for t in tables))
        self.readiness = Readiness()
        self.stop = threading.Event()
        self.log = logs.get("cdc")
        self.planner = Planner(
            settings.max_row_bytes, settings.change_feed, settings.change_feed_maxlen
        )
        self.backfill = Backfill(self.planner, settings.backfill_chunk, settings.publication)
        self.observer: Observer | None = None
        self._busy_since: float | None = None
        self._standby_logged = False
        self._recreate_slot = False
        self._failover_checked = False
        # REDIS_URL, or the redis+cluster:// form of it when it names a cluster node.
        self.redis_url = settings.redis
        # Cluster mode: what each hash slot has seen from this daemon, across sessions.
        self.ledger = SlotLedger()  # pure (cdc.transform.cluster_script)
        # This session repaired slots (their record in cdc:state waits for the rows).
        self._repairing = False
        self.metrics.info.info(
            {"slot": settings.slot, "publication": settings.publication, "plugin": settings.plugin}
        )

    # -- entry point ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.log.info("stopping", signal=signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Run until stopped: 0 after a clean stop; ConfigError propagates (exit 2)."""
        host, port = self.settings.metrics_host_port
        health = HealthServer(host, port, self.metrics, self.readiness)
        health.start()
        try:
            self._wait_for_checks()
            if self.stop.is_set():
                return 0
            self.log.info("starting", **self.settings.describe())
            self.observer = Observer(self.settings, self.tables, self.metrics)
            self.observer.start()
            return self._sessions()
        finally:
            if self.observer is not None:
                self.observer.stop()
            health.stop()

    def _wait_for_checks(self) -> None:
        backoff = Backoff(0.5, self.settings.retry_max)
        while not self.stop.is_set():
            try:
                self._mirror(checks.check_postgres(self.settings, self.declared))
                if checks.check_redis(self.settings, self.tables, self.state_key):
                    self.redis_url = as_cluster_url(self.settings.redis)
                self._log_mirror()
                return
            except Retryable as exc:
                delay = backoff.next()
                self.log.warning("waiting for a peer", reason=str(exc), retry_in=round(delay, 2))
                self.stop.wait(delay)

    def _mirror(self, mirrored: tuple[TrackedTable, ...]) -> None:
        """Mirror the declared tables the publication holds, under the state key that
        goes with them (:func:`schema.keys.state_key`)."""
        self.tables = mirrored
        self.state_key = keys.state_key(self.settings.slot, len(mirrored) == len(self.declared))

    def _log_mirror(self) -> None:
        """Say which tables this daemon mirrors (once every check passed: a refusal at
        start stays one line)."""
        others = [t.name for t in self.declared if t not in self.tables]
        self.log.info(
            "mirroring",
            tables=",".join(t.name for t in self.tables),
            state=self.state_key,
            publication=self.settings.publication,
            **({"not_mirrored": ",".join(others)} if others else {}),
        )

    def _sessions(self) -> int:
        backoff = Backoff(0.2, self.settings.retry_max)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self._session()
                return 0
            except SlotInUse as exc:
                self._slot_busy(exc)
                continue
            except Fenced as exc:
                self.metrics.errors.labels(kind="fenced").inc()
                self.log.warning(
                    "fenced: another daemon took over; this one stops writing", reason=str(exc)
                )
            except RedisLost as exc:
                self.metrics.errors.labels(kind="redis_lost").inc()
                self.log.warning("Redis lost the cache; rebuilding", reason=str(exc))
                backoff.reset()
                continue
            except SlotInvalidated as exc:
                self.log.warning(
                    "the slot was invalidated; recreating it and reloading", reason=str(exc)
                )
                self._recreate_slot = True
                continue
            except Retryable as exc:
                kind = "redis" if "Redis" in type(exc).__name__ else "postgres"
                self.metrics.errors.labels(kind=kind).inc()
                self.log.warning("connection problem", error=str(exc))
            finally:
                self.readiness.set(False, "reconnecting")
                self.metrics.connected.labels(target="postgres").set(0)
                self.metrics.connected.labels(target="redis").set(0)
            if time.monotonic() - started > 30:
                backoff.reset()
            delay = backoff.next()
            self.stop.wait(delay)
        return 0

    def _slot_busy(self, exc: SlotInUse) -> None:
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        if self.settings.standby:
            if not self._standby_logged:
                self.log.info("standby: waiting for the slot", reason=str(exc))
                self._standby_logged = True
            self.readiness.set(False, f"standby: {exc}")
            self._wait_slot_free()
            return
        if now - self._busy_since >= self.settings.slot_busy_timeout:
            raise ConfigError(str(exc))
        self.stop.wait(0.5)

    def _wait_slot_free(self, poll: float = 0.1, longest: float = 30.0) -> None:
        """A hot standby waits for the slot on one catalog session, asking every ``poll``
        seconds whether it is still held (a cheap query), rather than opening a whole
        session (PostgreSQL, replication, Redis) each time: the active daemon's death is
        seen within ``poll`` (a kill -9 closes its walsender's socket at once). After
        ``longest``, or on any error, a session tries again (and re-reads everything)."""
        deadline = time.monotonic() + longest
        try:
            conn = catalog.connect(self.settings.catalog_conninfo, "PostgreSQL")
        except CdcError:
            self.stop.wait(1.0)
            return
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                info = catalog.slot_info(conn, self.settings.slot)
                if info is None or not info.active:
                    return
                self.stop.wait(poll)
        except psycopg.Error:
            return
        finally:
            conn.close()

    # -- one session ---------------------------------------------------------------------------

    def _session(self) -> None:
        settings = self.settings
        source = ReplicationSource(settings.replication_conninfo, settings.pg_timeout)
        from cdc.cache.cluster_sink import make_sink  # redis-py: only for a cluster

        sink = make_sink(
            self.redis_url,
            settings.redis_timeout,
            settings.redis_min_replicas,
            self.ledger,
            state_key=self.state_key,
            mirrors=tuple(t.name for t in self.tables),
        )
        pg: catalog.Conn | None = None
        try:
            pg = catalog.connect(settings.catalog_conninfo, "PostgreSQL")
            system = source.connect()
            self.metrics.connected.labels(target="postgres").set(1)
            sink.connect()
            self.metrics.connected.labels(target="redis").set(1)
            position, rebuilding = self._prepare(pg, source, sink, system)
            self._retire_former(sink)
            self._busy_since = None
            self._standby_logged = False
            decode, on_schema_change = self._decoder(pg)
            pipeline = Pipeline(
                settings,
                self.tables,
                source,
                sink,
                pg,
                position,
                self.metrics,
                self.stop,
                decode,
                schema_requests=self.observer.schema_changes if self.observer else None,
                backfill=self.backfill,
                rebuilding=rebuilding,
                on_schema_change=on_schema_change,
            )
            pipeline.repair_pending = self._repairing
            pipeline.repair_done = self.ledger.repaired
            self.readiness.set(True, "streaming")
            self.log.info(
                "streaming",
                slot=settings.slot,
                checkpoint=format_lsn(position.checkpoint),
                rebuilding=rebuilding,
            )
            pipeline.run()
        finally:
            self.backfill.window = None
            source.close()
            sink.close()
            if pg is not None:
                pg.close()

    def _decoder(
        self, pg: catalog.Conn
    ) -> tuple[Decode | None, Callable[[TrackedTable], None] | None]:
        """The plugin's decoder (None: pgoutput, which the stream core decodes itself),
        and what to tell it when a table's columns change."""
        if self.settings.plugin == "pgoutput":
            return None, None
        decoder = Wal2JsonDecoder()

        def refresh(table: TrackedTable) -> None:
            decoder.set_columns(table.schema, table.name, catalog.table_columns(pg, table))

        for table in self.tables:
            refresh(table)
        return decoder.decode, refresh

    def _prepare(
        self, pg: catalog.Conn, source: ReplicationSource, sink: AnySink, system: SystemInfo
    ) -> tuple[Position, bool]:
        """Acquire the slot and decide where to start; returns (position, rebuilding)."""
        settings = self.settings
        name = settings.slot
        source_id = f"{system.system_id}/{system.dbname}/{name}"
        identity = failover.identity_fields(system.system_id, system.timeline)
        failover.require_primary(pg)
        state = sink.read_state()
        check_format(state)
        self._check_shared_state(state, pg)
        self._check_overlap(sink, pg)
        slot = catalog.slot_info(pg, name)
        if slot is not None and slot.active:
            raise SlotInUse(name, slot.active_pid)
        if slot is not None and (slot.invalidated or self._recreate_slot):
            self.log.warning("dropping the invalidated slot", slot=name, wal_status=slot.wal_status)
            self.metrics.rebuilds.labels(reason="slot_invalidated").inc()
            source.drop_slot(name)
            slot = None
            state = CacheState()
        self._recreate_slot = False
        failover.prepare_slot(pg, source, name, warn=not self._failover_checked)
        self._failover_checked = True
        if slot is None:
            if state.lsn is not None and not state.loading:
                # After a promotion without failover slots, or dropped by hand.
                lost = failover.slot_loss_reason(
                    settings.on_slot_loss, state, name, system.timeline
                )
                created = source.create_slot(name, settings.plugin, export_snapshot=False)
                source.start(
                    name, Lsn(0), stream_options(settings, self.tables, source.server_version)
                )
                sink.claim({"slot": name}, record=False)  # source, tables: once rebuilt
                confirmed = Lsn(created.consistent_point)
                return self._rebuild(sink, state, confirmed, lost, "slot_lost", source_id, identity)
            position = self._first_start(source, sink, source_id, identity)
            self._repairing = False
            if not isinstance(sink, RedisSink) and sink.lost:
                # A shard failed over (or lost its data) while the snapshot loaded.
                self._repair_lost_slots(pg, sink)
                self._repairing = True
            return position, False
        confirmed = slot.confirmed_flush_lsn or Lsn(0)
        # TIMELINE_HISTORY cannot follow START_REPLICATION on this connection: read it now.
        history = source.timeline_history(system.timeline)
        reason, kind = self._rebuild_reason(state, confirmed, source_id, system, history)
        start = Lsn(0) if reason else max(state.lsn or Lsn(0), confirmed)
        source.start(name, start, stream_options(settings, self.tables, source.server_version))
        # The state read after the claim is the one to resume from: no predecessor can
        # write once the fence is ours. The claim records neither the source nor the
        # tables: until the cache holds them (or a rebuild that loads them is recorded)
        # a restart must still find the reason to rebuild.
        claimed = sink.claim({"slot": name}, record=False)
        if not reason:
            reason, kind = self._rebuild_reason(claimed, confirmed, source_id, system, history)
            state = claimed
        if reason:
            return self._rebuild(sink, state, confirmed, reason, kind, source_id, identity)
        # The cache holds every table this daemon mirrors, built from this source (and, on
        # a first session on this server or timeline, record it beside the checkpoint).
        sink.mark({"source": source_id, **identity}, record=True)
        assert state.lsn is not None
        rebuilding = False
        if state.rebuild:
            rebuilding = True
            self.backfill.queue.clear()
            by_name = {t.name: t for t in self.tables}
            for item in json.loads(state.rebuild):
                if item["table"] in by_name:
                    self.backfill.request_table(
                        by_name[item["table"]], "rebuild (resumed)", after=item.get("after")
                    )
        self._repairing = False
        if not isinstance(sink, RedisSink) and sink.lost:
            self._repair_lost_slots(pg, sink)
            self._repairing = True
        partial_lsn, partial_count = state.partial if state.partial else (None, 0)
        return Position(state.lsn, partial_lsn, partial_count), rebuilding

    def _check_shared_state(self, state: CacheState, pg: catalog.Conn) -> None:
        """Refuse (exit 2) a state kept by another slot's daemon: two daemons that both
        mirror every table (or one on the default slot) share ``cdc:state``, so the
        registry cannot tell them apart. A recorded slot that no longer exists is no
        daemon's any more (its successor on a new slot takes the state over)."""
        other = state.extra.get("slot")
        if not other or other == self.settings.slot or catalog.slot_info(pg, other) is None:
            return
        raise ConfigError(
            f"{self.state_key} is the state of the daemon of slot {other}, not of slot"
            f" {self.settings.slot}: daemons sharing a Redis need publications that do not"
            f" overlap (or drop slot {other} if no daemon uses it any more)"
        )

    def _repair_lost_slots(self, pg: catalog.Conn, sink: ClusterSink) -> None:
        """A failover lost writes in some hash slots: repair exactly those."""
        import redis

        from cdc.runtime.shard_repair import repair_slots

        assert sink.client is not None
        self.ledger.distrust()  # the repair deletes and rebuilds keys unscripted
        self.log.warning("hash slots lost writes in a Redis Cluster failover", slots=len(sink.lost))
        self.metrics.rebuilds.labels(reason="slots_lost").inc()
        try:
            report = repair_slots(sink.client, pg, self.tables, self.backfill, sink.lost)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise RedisUnavailable(f"repairing lost slots failed: {type(exc).__name__}") from None
        self.log.warning(
            "repairing the lost slots",
            slots=report.slots,
            rows=report.rows,
            lookup_or_view_keys_dropped=report.lookups_dropped,
            view_keys_rebuilt=report.views_rebuilt,
            view_members_dropped=report.view_members_dropped,
        )
        sink.lost = []

    def _check_overlap(self, sink: AnySink, pg: catalog.Conn) -> None:
        """Refuse (exit 2) to mirror a table another daemon's state says it mirrors: two
        daemons must never write the same keys (their publications must not overlap).
        A state whose slot no longer exists is no daemon's any more: not a conflict."""
        mine = {t.name for t in self.tables}
        for table, other in sink.registry().items():
            if table not in mine or other == self.state_key:
                continue
            state = sink.read_state(other)
            held = set(state.extra.get(TABLES_FIELD, "").split(","))
            slot = state.extra.get("slot", "")
            if slot == self.settings.slot:
                continue  # this slot's own state under its former key (_retire_former)
            if state.fence is None or table not in held:
                continue
            if slot and catalog.slot_info(pg, slot) is None:
                self.log.warning(
                    "a former daemon's state names a table this one mirrors; its slot is"
                    " gone, so it is ignored",
                    state=other,
                    table=table,
                    slot=slot,
                )
                continue
            raise ConfigError(
                f"table {table} is mirrored by the daemon of {other} (slot {slot or '?'}):"
                f" publications of daemons sharing a Redis must not overlap; remove {table}"
                " from one of them"
            )

    def _retire_former(self, sink: AnySink) -> None:
        """Once the slot is ours: drop a state this slot kept under its other key (its
        publication changed, so did its key, :func:`schema.keys.state_key`). No daemon
        can write under it any more (a paused one finds it gone and stops), and no
        other daemon is refused the tables it names. Only that key is read: a user of
        one daemon need not read the others' states."""
        slot = self.settings.slot
        for other in {keys.state_key(slot, True), keys.state_key(slot, False)} - {self.state_key}:
            try:
                former = sink.read_state(other)
            except RedisRejected as exc:
                if not str(exc).startswith("NOPERM"):
                    raise
                continue  # not a key this daemon's user wrote: not this slot's state
            if former.extra.get("slot") == slot:
                self.log.info("dropping this slot's former state", state=other)
                sink.drop_state(other)

    def _new_tables_reason(self, state: CacheState) -> str | None:
        """The cache does not hold a table this daemon now mirrors (its publication grew)."""
        recorded = state.extra.get(TABLES_FIELD)
        if not recorded:
            return None  # written before states recorded their tables
        new = [t.name for t in self.tables if t.name not in recorded.split(",")]
        if new:
            return f"the daemon now mirrors {', '.join(new)}, which the cache does not hold"
        return None

    def _rebuild_reason(
        self, state: CacheState, confirmed: Lsn, source_id: str, system: SystemInfo, history: str
    ) -> tuple[str | None, str]:
        """Why the cache must be rebuilt (None: resume), and the reason's metric label."""
        reason = rebuild_reason(state, confirmed, source_id)
        if reason is not None:
            return reason, "cache_lost"
        if reason := self._new_tables_reason(state):
            return reason, "tables_added"
        return (
            failover.timeline_reason(state, system.system_id, system.timeline, history),
            "promotion",
        )

    def _rebuild(
        self,
        sink: AnySink,
        state: CacheState,
        confirmed: Lsn,
        reason: str,
        kind: str,
        source_id: str,
        identity: dict[str, str],
    ) -> tuple[Position, bool]:
        """Online rebuild under a new epoch (the slot is acquired and the fence ours):
        clear the tracked keys and backfill every table while streaming."""
        name = self.settings.slot
        self.log.warning("the cache must be rebuilt", reason=reason)
        self.metrics.rebuilds.labels(reason=kind).inc()
        # Before any key goes: a restart after a kill mid-clear must rebuild again (the
        # state says a load was interrupted), not resume from a cache missing keys.
        sink.mark({"loading": "1", "source": source_id}, record=True)
        self._clear_tracked_keys()
        self.backfill.queue.clear()
        for table in self.tables:
            self.backfill.request_table(table, "rebuild")
        sink.reset_state(
            {
                "lsn": format_lsn(confirmed),
                "slot": name,
                "source": source_id,
                "rebuild": self.backfill.progress_marker(),
                "epoch": failover.next_epoch(state),
                **identity,
                **state_fields(self.tables),
            }
        )
        return Position(confirmed), True

    def _first_start(
        self, source: ReplicationSource, sink: AnySink, source_id: str, identity: dict[str, str]
    ) -> Position:
        settings = self.settings
        self.log.info("first start: creating the slot and loading a snapshot", slot=settings.slot)

        def progress(table: str, rows: int, seconds: float) -> None:
            self.log.info("snapshot progress", table=table, rows=rows, seconds=round(seconds, 1))

        report = create_slot_and_load(
            source,
            sink,
            self.planner,
            self.tables,
            conninfo=settings.catalog_conninfo,
            redis_url=self.redis_url,
            redis_timeout=settings.redis_timeout,
            slot=settings.slot,
            plugin=settings.plugin,
            source_id=source_id,
            batch_rows=settings.backfill_chunk,
            progress=progress,
            publication=settings.publication,
        )
        self.log.info(
            "snapshot loaded",
            rows=sum(report.rows.values()),
            stale_keys_removed=report.swept,
            seconds=round(report.seconds, 2),
            consistent_point=format_lsn(report.consistent_point),
        )
        source.start(
            settings.slot,
            report.consistent_point,
            stream_options(settings, self.tables, source.server_version),
        )
        sink.claim({"slot": settings.slot, "source": source_id, "epoch": "1", **identity})
        return Position(Lsn(report.consistent_point))

    def _clear_tracked_keys(self) -> None:
        import redis  # only here: redis-py costs 65-110 ms of every start

        # In cluster mode redis-py raises RedisClusterException (not a RedisError) when
        # the cluster cannot be reached or a slot has no node, at construction too.
        failures = (redis.RedisError, redis.exceptions.RedisClusterException)
        try:
            client = redis_client(self.redis_url, socket_timeout=self.settings.redis_timeout)
        except failures as exc:
            raise RedisLost(f"cannot clear the stale cache: {type(exc).__name__}: {exc}") from None
        try:
            for table in self.tables:
                for prefix in table.owned_prefixes:
                    for keys in scan_keys(client, prefix):
                        client.unlink(*keys)
        except failures as exc:
            raise RedisLost(f"cannot clear the stale cache: {type(exc).__name__}: {exc}") from None
        finally:
            client.close()


def rebuild_reason(state: CacheState, confirmed: Lsn, source_id: str) -> str | None:
    """Why the cache cannot be resumed from (None: it can)."""
    if not state.exists:
        return "Redis has no cache state (data lost or never loaded)"
    if state.loading:
        return "the snapshot load was interrupted"
    if state.lsn is None:
        return "Redis has no checkpoint"
    if state.source is not None and state.source != source_id:
        return f"the cache was built from another source ({state.source})"
    if state.lsn < confirmed:
        return (
            f"Redis checkpoint {format_lsn(state.lsn)} is behind the slot's confirmed position "
            f"{format_lsn(confirmed)} (Redis lost writes)"
        )
    return None


def run(settings: Settings) -> int:
    daemon = Daemon(settings, settings.tables())
    daemon.install_signal_handlers()
    try:
        return daemon.run()
    except (ConfigError, PoisonRecord):
        raise  # the command line prints the one line and exits 2 / 3
    except CdcError as exc:
        daemon.log.error("stopped on an error", error=str(exc))
        return 1
