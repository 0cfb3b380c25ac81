"""Loading the tracked tables from a slot's exported snapshot (first start, ``slot reset``).

``CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`` returns a snapshot that sees exactly the
transactions committed before the slot's consistent point, and the slot streams exactly
the ones after it. Loading every row in that snapshot, stamped with the consistent point,
then streaming from the slot joins the two without gap or overlap.

While loading, ``cdc:state`` says ``loading=1`` and has no checkpoint: a daemon that dies
here finds the slot present and the cache unfinished, and rebuilds it online.
Afterwards :func:`sweep` deletes keys whose rows no longer exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import psycopg
from psycopg import errors as pgerrors

from cdc.cache.views import clear_views, state_fields
from cdc.errors import PostgresUnavailable
from cdc.postgres import catalog
from cdc.postgres.rows import iter_rows
from cdc.postgres.source import ReplicationSource
from cdc.transform.assemble import view_from_columns
from cdc.transform.plan import CommandBatch, Planner
from schema.keys import VERSION_FIELD, TrackedTable, match_prefix
from schema.lsn import Lsn, format_lsn, lsn_bytes
from schema.redis_url import redis_client

if TYPE_CHECKING:
    import redis  # for annotations: redis-py is imported only where a client is made
    from redis.cluster import RedisCluster

    from cdc.cache.cluster_sink import AnySink

Progress = Callable[[str, int, float], None]


@dataclass
class LoadReport:
    rows: dict[str, int] = field(default_factory=dict)
    swept: int = 0
    seconds: float = 0.0
    consistent_point: int = 0


def create_slot_and_load(
    source: ReplicationSource,
    sink: AnySink,
    planner: Planner,
    tables: tuple[TrackedTable, ...],
    *,
    conninfo: str,
    redis_url: str,
    redis_timeout: float,
    slot: str,
    plugin: str,
    source_id: str,
    batch_rows: int,
    progress: Progress | None = None,
    publication: str | None = None,
) -> LoadReport:
    """Create ``slot`` with an exported snapshot, take the fence, load every tracked row as
    of that snapshot, delete stale keys, and set the checkpoint to the consistent point.

    The slot is not streamed here; start it at ``report.consistent_point``."""
    created = source.create_slot(slot, plugin, export_snapshot=True)
    sink.claim({"slot": slot}, record=False)
    sink.reset_state({"loading": "1", "slot": slot, "source": source_id})
    client = redis_client(redis_url, socket_timeout=redis_timeout)
    try:
        # The load adds every row it writes to its views: start them empty.
        clear_views(client, tables)
    finally:
        client.close()
    report = load_snapshot(
        conninfo,
        created.snapshot,
        created.consistent_point,
        tables,
        sink,
        planner,
        batch_rows,
        progress,
        publication,
    )
    client = redis_client(redis_url, socket_timeout=redis_timeout)
    try:
        report.swept = sweep(client, tables, created.consistent_point)
    finally:
        client.close()
    sink.reset_state(
        {
            "lsn": format_lsn(created.consistent_point),
            "slot": slot,
            "source": source_id,
            **state_fields(tables),
        }
    )
    report.consistent_point = created.consistent_point
    return report


def load_snapshot(
    conninfo: str,
    snapshot: str | None,
    version: Lsn,
    tables: tuple[TrackedTable, ...],
    sink: AnySink,
    planner: Planner,
    batch_rows: int,
    progress: Progress | None = None,
    publication: str | None = None,
) -> LoadReport:
    """Write every tracked row, as of ``snapshot``, into Redis with ``_v`` = ``version``,
    and add it to its views (which must start empty: :func:`create_slot_and_load` clears
    them)."""
    report = LoadReport()
    started = time.monotonic()
    stamp = lsn_bytes(version)
    conn = catalog.connect(conninfo, "PostgreSQL (snapshot)")
    table_name = ""
    try:
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            if snapshot is not None:
                conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            for table in tables:
                table_name = table.name
                # Only what the publication streams, never an excluded column.
                columns = catalog.readable_columns(conn, table, publication)
                view = view_from_columns(table, columns)
                batch = CommandBatch()
                loaded = 0
                last_report = time.monotonic()
                for rows in iter_rows(conn, table, columns, batch_rows):
                    for row in rows:
                        planner.write_row(view, row, stamp, batch, views_empty=True)
                    loaded += len(rows)
                    sink.apply(batch, {"loading": "1"})
                    batch.clear()
                    now = time.monotonic()
                    if progress is not None and now - last_report >= 2.0:
                        progress(table.name, loaded, now - started)
                        last_report = now
                report.rows[table.name] = loaded
                if progress is not None:
                    progress(table.name, loaded, time.monotonic() - started)
    except (pgerrors.LockNotAvailable, pgerrors.QueryCanceled) as exc:
        # The slot stays and cdc:state says loading: the next session rebuilds online,
        # streaming while the backfill waits for the table (contract 7, case 20).
        reason = "lock_timeout" if isinstance(exc, pgerrors.LockNotAvailable) else "timeout"
        raise PostgresUnavailable(
            f"snapshot of {table_name} gave up waiting ({reason}); try again"
        ) from None
    except (pgerrors.UndefinedColumn, pgerrors.UndefinedTable):
        raise PostgresUnavailable(
            f"snapshot of {table_name}: the table changed while it was read; rebuilding"
        ) from None
    except psycopg.OperationalError as exc:
        raise PostgresUnavailable(
            f"snapshot of {table_name}: connection lost ({type(exc).__name__})"
        ) from None
    finally:
        conn.close()
    report.seconds = time.monotonic() - started
    return report


_SWEEP_ROWS = """
local v = ARGV[1]
local n = 0
for i = 1, #KEYS do
  if redis.call('TYPE', KEYS[i]).ok ~= 'hash' or redis.call('HGET', KEYS[i], ARGV[2]) ~= v then
    redis.call('UNLINK', KEYS[i])
    n = n + 1
  end
end
return n
"""

_SWEEP_LOOKUPS = """
local n = 0
for i = 1, #KEYS do
  local id = false
  if redis.call('TYPE', KEYS[i]).ok == 'string' then id = redis.call('GET', KEYS[i]) end
  local value = string.sub(KEYS[i], #ARGV[1] + 1, -2)
  local row = id and (ARGV[2] .. id .. '}')
  if (not id) or redis.call('TYPE', row).ok ~= 'hash'
      or redis.call('HGET', row, ARGV[3]) ~= value then
    redis.call('UNLINK', KEYS[i])
    n = n + 1
  end
end
return n
"""


def sweep(client: redis.Redis, tables: tuple[TrackedTable, ...], version: Lsn) -> int:
    """Delete tracked keys not written by the load stamped ``version``."""
    stamp = lsn_bytes(version)
    removed = 0
    rows_script = client.register_script(_SWEEP_ROWS)
    lookups_script = client.register_script(_SWEEP_LOOKUPS)
    if is_cluster(client):
        return _sweep_cluster(cast("RedisCluster", client), tables, stamp)
    for table in tables:
        for keys in scan_keys(client, table.key_prefix):
            removed += int(rows_script(keys=keys, args=[stamp, VERSION_FIELD]))
        for lookup in table.lookups:
            prefix = lookup.key_prefix
            for keys in scan_keys(client, prefix):
                args = [prefix, table.key_prefix, lookup.column]
                removed += int(lookups_script(keys=keys, args=args))
    return removed


def _sweep_cluster(client: RedisCluster, tables: tuple[TrackedTable, ...], stamp: bytes) -> int:
    """:func:`sweep` on a Redis Cluster, where a lookup and its row are in different slots
    so no script sees both: key by key (the load holds the fence, nothing else writes)."""
    removed = 0
    redis_client_ = cast("redis.Redis", client)
    for table in tables:
        for keys in scan_keys(redis_client_, table.key_prefix):
            for key in keys:
                if client.type(key) != b"hash" or client.hget(key, VERSION_FIELD) != stamp:
                    removed += int(client.unlink(key))
        for lookup in table.lookups:
            prefix = lookup.key_prefix.encode()
            for keys in scan_keys(redis_client_, lookup.key_prefix):
                for key in keys:
                    found = client.get(key) if client.type(key) == b"string" else None
                    row_id = found if isinstance(found, bytes) else None
                    value = key[len(prefix) : -1]
                    row = table.key_prefix.encode() + row_id + b"}" if row_id else None
                    if row is None or client.hget(row, lookup.column) != value:
                        removed += int(client.unlink(key))
    return removed


def is_cluster(client: object) -> bool:
    """Whether ``client`` (from :func:`redis_client`) talks to a Redis Cluster."""
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def scan_keys(client: redis.Redis, prefix: str) -> Iterator[list[bytes]]:
    """Keys starting with ``prefix``, in batches (deleting while scanning is safe)."""
    pattern = match_prefix(prefix)
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            yield batch
            batch = []
    if batch:
        yield batch
