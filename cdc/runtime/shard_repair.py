"""Repairing the hash slots a Redis Cluster failover lost, and only those.

A primary that dies before its replica received its latest writes is replaced by that
replica: its slots go back in time while every other shard keeps what it had. The slot
counters (:class:`~cdc.cache.cluster_sink.SlotLedger`) tell the claim which slots lost
writes; before streaming resumes this module brings exactly those slots' keys back:

- row keys: every row whose key is in a lost slot (from PostgreSQL), every row key
  found there (it may belong to a row deleted since), and every agent whose username
  lookup is in a lost slot, are fetched again by the online backfill (by id, ordered
  against the stream as any backfill window, so no key ever goes back); the row keys
  found there are deleted first (readers fall back to PostgreSQL until they are back),
  so no streamed patch keeps a stale column of them;
- lookup keys found in a lost slot are deleted (the backfill writes the right ones);
- view keys in a lost slot are rebuilt from PostgreSQL (members and scores); the stream
  and the backfill then keep them as usual (views converge, contract 6b and 7.8);
- the rows fetched again leave every view key of other slots: a row whose hash went
  back in time may have been changed since on top of it, and the view deltas of such a
  change start from the stale value, so the row may sit in a view it left. The stream
  (from the row's current value) or the backfill puts it back where it belongs.

Keys of other slots are not touched: a lost slot costs the rows it holds, not a rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdc.postgres import catalog
from cdc.runtime.backfill import Backfill
from cdc.transform.cluster_script import REPAIR_TAG, key_slot
from schema.keys import TrackedTable, View, match_prefix

if TYPE_CHECKING:
    from redis.cluster import RedisCluster


@dataclass
class RepairReport:
    slots: int = 0
    rows: int = 0
    lookups_dropped: int = 0
    views_rebuilt: int = 0
    view_members_dropped: int = 0


def repair_slots(
    client: RedisCluster,
    pg: catalog.Conn,
    tables: tuple[TrackedTable, ...],
    backfill: Backfill,
    lost: list[int],
) -> RepairReport:
    lost_set = set(lost)
    report = RepairReport(slots=len(lost))
    ids: dict[str, set[str]] = {t.name: set() for t in tables}
    for slot in lost:
        while True:
            keys = client.cluster_get_keys_in_slot(slot, 10000)
            doomed: list[bytes | str] = []
            for raw in keys:
                key = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                for table in tables:
                    row_id = table.key_id(key)
                    if row_id is not None:
                        # Gone until the backfill writes it: a change streamed meanwhile
                        # must not patch the stale hash (an unchanged large column would
                        # keep its old value), it finds the key missing and fetches it.
                        ids[table.name].add(row_id)
                        doomed.append(raw)
                    elif key.startswith(table.owned_prefixes):
                        doomed.append(raw)  # a lookup or view key
            if doomed:
                client.unlink(*doomed)
                report.lookups_dropped += len(doomed)
            if len(keys) < 10000 or not doomed:
                break
    for table in tables:
        columns = [table.primary_key, *(lookup.column for lookup in table.lookups)]
        select = ", ".join(f'"{c}"::text' for c in columns)
        rows = pg.execute(f'SELECT {select} FROM "{table.schema}"."{table.name}"').fetchall()
        for row in rows:
            row_id = str(row[0])
            if key_slot(table.key(row_id).encode()) in lost_set:
                ids[table.name].add(row_id)
                continue
            for lookup, value in zip(table.lookups, row[1:], strict=True):
                if value is not None and key_slot(lookup.key(str(value)).encode()) in lost_set:
                    ids[table.name].add(row_id)
        for view in table.views:
            report.views_rebuilt += _rebuild_views(client, pg, table, view.column, lost_set)
            report.view_members_dropped += _drop_members(client, view, ids[table.name], lost_set)
        if ids[table.name]:
            backfill.request_rows(
                table, sorted(ids[table.name]), "slots lost in a failover", REPAIR_TAG
            )
            report.rows += len(ids[table.name])
    return report


def _rebuild_views(
    client: RedisCluster, pg: catalog.Conn, table: TrackedTable, column: str, lost: set[int]
) -> int:
    """Rebuild from PostgreSQL the keys of one view that live in lost slots."""
    view = next(v for v in table.views if v.column == column)
    values = pg.execute(
        f'SELECT DISTINCT "{column}"::text FROM "{table.schema}"."{table.name}"'
        f' WHERE "{column}" IS NOT NULL'
    ).fetchall()
    rebuilt = 0
    score = f'extract(epoch from "{view.score}")::float8' if view.score else "NULL"
    for (value,) in values:
        key = view.key(str(value))
        if key_slot(key.encode()) not in lost:
            continue
        members = pg.execute(
            f'SELECT "{table.primary_key}"::text, {score} FROM "{table.schema}"."{table.name}"'
            f' WHERE "{column}"::text = %s',
            (value,),
        ).fetchall()
        client.unlink(key)
        for start in range(0, len(members), 1000):
            chunk = members[start : start + 1000]
            if view.sorted:
                client.zadd(key, {str(m): float(str(s or 0)) for m, s in chunk})
            else:
                client.sadd(key, *[str(m) for m, _ in chunk])
        rebuilt += 1
    return rebuilt


def _drop_members(client: RedisCluster, view: View, ids: set[str], lost: set[int]) -> int:
    """Remove ``ids`` from every key of ``view`` outside the lost slots (rebuilt): each key
    is read once (``SSCAN``/``ZSCAN``) and only the members to drop are removed."""
    if not ids:
        return 0
    dropped = 0
    for key in client.scan_iter(match=match_prefix(view.key_prefix), count=1000):
        if key_slot(key if isinstance(key, bytes) else str(key).encode()) in lost:
            continue
        if view.sorted:
            found = [m for m, _ in client.zscan_iter(key, count=1000) if _text(m) in ids]
        else:
            found = [m for m in client.sscan_iter(key, count=1000) if _text(m) in ids]
        for start in range(0, len(found), 1000):
            chunk = found[start : start + 1000]
            if view.sorted:
                dropped += int(client.zrem(key, *chunk))
            else:
                dropped += int(client.srem(key, *chunk))
    return dropped


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
