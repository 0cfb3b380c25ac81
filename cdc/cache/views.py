"""Bringing view keys (contract 6b) back in line with the cached rows they derive from.

The batch script keeps views as it applies changes. This is for the paths that write
rows some other way or find views damaged: a snapshot load starts from no view keys
(:func:`clear_views`: a row that no longer exists leaves no id behind) and ``cdc verify
--repair`` reconciles members. Each member named is
checked against its row's cached hash, atomically per call: it belongs to the view key of
the hash's value (with the score of its ``updated_at``) and to no other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from cdc.transform.script import LUA_EPOCH, LUA_VIEW_WRITE
from schema.keys import VERSION_FIELD, VIEWS_STATE_FIELD, TrackedTable, View, match_prefix

if TYPE_CHECKING:
    import redis  # for annotations: redis-py is imported only where a client is made
    from redis.cluster import RedisCluster

_RECONCILE = (
    LUA_EPOCH
    + LUA_VIEW_WRITE
    + b"""
-- ARGV: kind view_key_prefix column score_column row_key_prefix, then (value id) pairs.
local kind, prefix, column, score, rows = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local fixed = 0
for p = 6, #ARGV, 2 do
  local value, id = ARGV[p], ARGV[p + 1]
  local key = prefix .. value .. '}'
  local cur = redis.pcall('HMGET', rows .. id .. '}', column, score)
  if type(cur) == 'table' and cur.err then cur = {false, false} end
  local r
  if cur[1] == value then
    if kind == 'z' then
      local want = epoch(cur[2])
      local have = redis.pcall('ZSCORE', key, id)
      if type(have) ~= 'string' or tonumber(have) ~= tonumber(want) then
        r = view_write('ZADD', key, want, id)
        fixed = fixed + 1
      end
    else
      r = view_write('SADD', key, id)
      if r == 1 then fixed = fixed + 1 end
    end
  else
    if kind == 'z' then r = redis.pcall('ZREM', key, id) else r = redis.pcall('SREM', key, id) end
    if r == 1 then fixed = fixed + 1 end
  end
end
return fixed
"""
)


def state_fields(tables: Iterable[TrackedTable]) -> dict[str, str]:
    """What ``cdc:state`` says once a load or rebuild covered the views: readers answer
    list reads from them only then (an empty view has no key, so without it a daemon
    that keeps no views would look like one whose views are empty)."""
    return {VIEWS_STATE_FIELD: "1"} if any(table.views for table in tables) else {}


def members(client: redis.Redis, view: View) -> Iterator[tuple[str, str, float | None]]:
    """Every (value, id, score) of the view's keys in Redis (score None for a set)."""
    prefix = view.key_prefix
    for key in client.scan_iter(match=match_prefix(prefix), count=1000):
        value = key.decode()[len(prefix) : -1]
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "zset":
            for member, score in client.zscan_iter(key, count=1000):
                yield value, member.decode(), float(score)
        elif kind == "set":
            for member in client.sscan_iter(key, count=1000):
                yield value, member.decode(), None
        else:
            yield value, "", None


def reconcile(
    client: redis.Redis, table: TrackedTable, view: View, pairs: Iterable[tuple[str, str]]
) -> int:
    """Make each (value, id) member agree with the row's cached hash; returns how many
    memberships or scores changed."""
    from redis.cluster import RedisCluster

    target: object = client
    if isinstance(target, RedisCluster):
        return _reconcile_cluster(target, table, view, pairs)
    script = client.register_script(_RECONCILE)
    head = [
        "z" if view.sorted else "s",
        view.key_prefix,
        view.column,
        view.score or view.column,
        table.key_prefix,
    ]
    fixed = 0
    chunk: list[str] = []
    for value, row_id in pairs:
        if not row_id:  # a view key holding another type: drop it
            fixed += int(client.unlink(view.key(value)))
            continue
        chunk += [value, row_id]
        if len(chunk) >= 1000:
            fixed += int(script(args=[*head, *chunk]))
            chunk = []
    if chunk:
        fixed += int(script(args=[*head, *chunk]))
    return fixed


def _reconcile_cluster(
    client: RedisCluster, table: TrackedTable, view: View, pairs: Iterable[tuple[str, str]]
) -> int:
    """:func:`reconcile` on a Redis Cluster, where a view key and its members' rows are in
    different slots so no script sees both: member by member, reading the row then writing
    the view, then reading the row's version (``_v``) again. A change the daemon applies
    after that second read is followed by its own view deltas (it writes the row first),
    which correct the member; one applied in between shows as a new version, and the
    member is done again from the row as it is now."""
    fixed = 0
    for value, row_id in pairs:
        key = view.key(value)
        if not row_id:
            fixed += int(client.unlink(key))
            continue
        row_key = table.key(row_id)
        seen = client.hget(row_key, VERSION_FIELD)
        for _ in range(_RECONCILE_TRIES):
            fixed += _reconcile_member(client, table, view, key, value, row_id)
            now = client.hget(row_key, VERSION_FIELD)
            if now == seen:
                break
            seen = now
    return fixed


# Rounds of one member while the daemon keeps changing its row (each round follows the
# row's newest value; the daemon's deltas correct the member after the last).
_RECONCILE_TRIES = 5


def _reconcile_member(
    client: RedisCluster, table: TrackedTable, view: View, key: str, value: str, row_id: str
) -> int:
    """One member of one view key made to agree with the row's cached hash."""
    score_column = view.score or view.column
    column, score = (
        v.decode() if isinstance(v, bytes) else v
        for v in client.hmget(table.key(row_id), [view.column, score_column])
    )
    if column is not None and column == value:
        if view.sorted:
            want = epoch_seconds(score)
            have = client.zscore(key, row_id)
            if have is None or float(have) != want:
                client.zadd(key, {row_id: want})
                return 1
            return 0
        return int(client.sadd(key, row_id))
    if view.sorted:
        return int(client.zrem(key, row_id))
    return int(client.srem(key, row_id))


def epoch_seconds(text: str | None) -> float:
    """What the scripts' ``epoch()`` gives for PostgreSQL's timestamptz text (UTC)."""
    if not text:
        return 0.0
    if text in ("infinity", "-infinity"):
        return float("inf") if text == "infinity" else float("-inf")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def clear_views(client: redis.Redis, tables: Iterable[TrackedTable]) -> int:
    """Remove every view key (before a snapshot load, which adds each loaded row back:
    what is left is exactly the snapshot's). Only SCAN and UNLINK: the daemon's ACL."""
    removed = 0
    for table in tables:
        for view in table.views:
            batch: list[bytes] = []
            for key in client.scan_iter(match=match_prefix(view.key_prefix), count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += int(client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(client.unlink(*batch))
    return removed
