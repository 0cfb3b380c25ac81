"""PostgreSQL failover: which server the cache was built from, and whether it still fits.

``cdc:state`` records the server's system identifier and timeline (``system_id``,
``timeline``) next to the checkpoint. A promotion starts a new timeline; its history file
(``TIMELINE_HISTORY``) says at which LSN each earlier timeline was left. Everything before
that *switch point* exists on the new primary; a checkpoint past it means Redis may hold
changes the new primary never had (an asynchronous standby that was behind), so the
cache is rebuilt online under a new epoch instead of resumed.

On PostgreSQL 17+ the slot is a failover slot: standbys with ``sync_replication_slots``
keep a copy, and with ``synchronized_standby_slots`` on the primary no change reaches the
daemon before the standby has it. A promotion then keeps the slot and the checkpoint stays
at or before the switch point: the daemon resumes, no rebuild. Without failover slots
(PostgreSQL 15/16) the slot is gone after a promotion; ``CDC_ON_SLOT_LOSS`` decides
(:func:`slot_loss_reason`).

The decisions here are pure (:func:`parse_history`, :func:`timeline_reason`,
:func:`slot_loss_reason`); the queries are small functions over a catalog connection.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from cdc.cache.checkpoint import CacheState
from cdc.errors import ConfigError, PostgresUnavailable
from cdc.postgres import catalog
from cdc.postgres.source import ReplicationSource
from cdc.telemetry import logs
from schema.lsn import Lsn, format_lsn, parse_lsn

FIRST_FAILOVER_VERSION = 170000


@dataclass(frozen=True)
class Switch:
    """One line of a timeline history file: ``timeline`` ended at ``lsn``."""

    timeline: int
    lsn: Lsn


def parse_history(text: str) -> list[Switch]:
    """The switches of a timeline history file (``<parent tli>\\t<switch lsn>\\t<reason>``)."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[0].isdigit():
            continue
        out.append(Switch(int(fields[0]), parse_lsn(fields[1])))
    return out


def identity_fields(system_id: str, timeline: int) -> dict[str, str]:
    """What ``cdc:state`` records about the server the cache follows."""
    return {"system_id": system_id, "timeline": str(timeline)}


def recorded_timeline(state: CacheState) -> int | None:
    raw = state.extra.get("timeline", "")
    return int(raw) if raw.isdigit() else None


def next_epoch(state: CacheState) -> str:
    """The epoch of a rebuilt cache: one more than the current one."""
    raw = state.extra.get("epoch", "")
    return str((int(raw) if raw.isdigit() else 0) + 1)


def applied_up_to(state: CacheState) -> Lsn | None:
    """The furthest commit position whose changes may be in Redis."""
    furthest = state.lsn
    if state.partial is not None and (furthest is None or state.partial[0] > furthest):
        furthest = state.partial[0]
    return furthest


def timeline_reason(state: CacheState, system_id: str, timeline: int, history: str) -> str | None:
    """Why a cache built on an earlier timeline cannot be resumed (None: it can).

    ``history`` is the current timeline's history file."""
    old = recorded_timeline(state)
    if old is None or old == timeline:
        return None
    if state.extra.get("system_id") not in (None, "", system_id):
        return None  # another server altogether: the source check says so
    applied = applied_up_to(state)
    switches = {s.timeline: s.lsn for s in parse_history(history)}
    if old not in switches:
        return (
            f"the cache follows timeline {old}, which is not an ancestor of the server's"
            f" timeline {timeline}"
        )
    switch = switches[old]
    if applied is not None and applied > switch:
        return (
            f"promotion: Redis has changes up to {format_lsn(applied)} but timeline {old}"
            f" ended at {format_lsn(switch)} on the new primary (timeline {timeline})"
        )
    return None


def slot_loss_reason(policy: str, state: CacheState, slot: str, timeline: int) -> str:
    """The slot is gone while Redis has a cache: the rebuild reason, or ConfigError (exit 2).

    ``auto`` rebuilds after a promotion (the timeline changed since the checkpoint) and
    asks for ``cdc slot reset`` otherwise (someone dropped the slot); ``rebuild`` always
    rebuilds; ``exit`` always stops."""
    old = recorded_timeline(state)
    refuse = (
        f'slot "{slot}" does not exist but Redis holds a cache built from it:'
        ' run "cdc slot reset" to recreate the slot and reload the cache'
    )
    if policy == "exit":
        raise ConfigError(refuse + " (CDC_ON_SLOT_LOSS=exit)")
    if policy == "rebuild":
        return f'slot "{slot}" is gone (CDC_ON_SLOT_LOSS=rebuild)'
    if old is not None and old != timeline:
        return f'slot "{slot}" is gone after a promotion (timeline {old} -> {timeline})'
    raise ConfigError(refuse)


# -- catalog queries (primary) ---------------------------------------------------------------


@dataclass(frozen=True)
class SlotFailover:
    failover: bool
    two_phase: bool
    synced: bool


def slot_failover(conn: catalog.Conn, slot: str) -> SlotFailover | None:
    """The slot's ``failover``/``two_phase``/``synced`` flags (None: no slot, or < 17)."""
    if conn.info.server_version < FIRST_FAILOVER_VERSION:
        return None
    row = conn.execute(
        "SELECT failover, two_phase, synced FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotFailover(bool(row[0]), bool(row[1]), bool(row[2]))


def standby_warnings(conn: catalog.Conn) -> list[str]:
    """What to tell the operator about the primary's failover set-up (empty: nothing).

    Warns when the server has a standby (a physical slot or a physical walsender) but no
    ``synchronized_standby_slots``: the daemon may then get ahead of the standby and a
    promotion costs a rebuild."""
    version = conn.info.server_version
    # Physical walsenders are those without a database (logical ones have one).
    standbys = conn.execute(
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'physical')"
        " + (SELECT count(*) FROM pg_stat_activity"
        "    WHERE backend_type = 'walsender' AND datid IS NULL)"
    ).fetchone()
    has_standby = bool(standbys and int(str(standbys[0])))
    if not has_standby:
        return []
    if version < FIRST_FAILOVER_VERSION:
        return [
            f"PostgreSQL {version // 10000} has no failover slots: after a promotion the slot"
            " is gone and the cache is rebuilt (CDC_ON_SLOT_LOSS); 17+ avoids that"
        ]
    value = catalog.setting(conn, "synchronized_standby_slots").strip()
    if not value:
        return [
            "synchronized_standby_slots is not set on the primary: the daemon may get ahead"
            " of a standby, and its promotion then forces a rebuild of the cache; set it to"
            " the standbys' physical slots"
        ]
    return []


def require_primary(conn: catalog.Conn) -> None:
    """A server in recovery (a standby, or an old primary that came back as one) cannot
    serve the daemon: wait for a primary (retried) rather than fail on its first query."""
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row is not None and row[0]:
        raise PostgresUnavailable(
            "connected to a standby (in recovery): waiting for a primary;"
            " list the servers with target_session_attrs=read-write in the URL"
        )


def prepare_slot(conn: catalog.Conn, source: ReplicationSource, slot: str, warn: bool) -> None:
    """Before streaming: make an existing slot a failover slot (17+), and with ``warn``
    log what is missing from the primary's failover set-up."""
    log = logs.get("cdc.failover")
    if warn:
        for line in standby_warnings(conn):
            log.warning(line)
    flags = slot_failover(conn, slot)
    if flags is None or flags.failover:
        return
    if flags.two_phase:
        log.warning(
            "the slot has two-phase decoding enabled, so it cannot be a failover slot:"
            ' a promotion will force a rebuild; recreate it with "cdc slot reset"',
            slot=slot,
        )
        return
    source.enable_failover(slot)
    log.info("failover enabled on the slot (ALTER_REPLICATION_SLOT)", slot=slot)


@dataclass(frozen=True)
class StandbyCopy:
    host: str
    port: str
    synced: bool | None  # None: the standby has no copy of the slot


def standby_copies(conninfo: str, slot: str, timeout: float = 3.0) -> list[StandbyCopy]:
    """For each reachable standby among the hosts of a multi-host ``conninfo``: whether
    its copy of ``slot`` is synchronized. Unreachable hosts and primaries are left out."""
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    hosts = str(params.get("host") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    if len(hosts) < 2:
        return []
    if len(ports) == 1:
        ports = ports * len(hosts)
    out = []
    for host, port in zip(hosts, ports, strict=False):
        single = {**params, "host": host, "port": port, "target_session_attrs": "standby"}
        single.pop("hostaddr", None)
        try:
            with psycopg.connect(
                psycopg.conninfo.make_conninfo(**single),  # type: ignore[arg-type]
                autocommit=True,
                connect_timeout=max(1, int(timeout)),
            ) as conn:
                row = conn.execute(
                    "SELECT synced AND NOT temporary FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
        except psycopg.Error:
            continue
        out.append(StandbyCopy(host, port, bool(row[0]) if row is not None else None))
    return out
