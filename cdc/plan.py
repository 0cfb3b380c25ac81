"""Planning: each change of a tracked table becomes the Redis commands that mirror it.

Pure: commands are appended in wire form (RESP) to a :class:`CommandBatch`, which the
sink later sends inside one ``MULTI``/``EXEC`` with the checkpoint. The layout is the
contract's (section 6), driven by the table's :class:`~cdc.assemble.TableView`:

- update with every value present: ``DEL key`` + ``HSET key <non-NULL columns> _v
  <lsn>`` (a full replace: NULL columns and dropped columns lose their field); an insert
  is the ``HSET`` alone, since no key exists for a row that did not (deletes, truncates
  and rebuilds remove keys);
- update with unchanged TOASTed values: a small script keeps those fields, sets the
  others, removes NULLed ones; if a kept field is missing (the key was never loaded or was
  dropped) it deletes the key and the row is fetched again (``CommandBatch.patches``);
- primary key changed: the old key goes (or is renamed, for a patch);
- delete: ``DEL key``; truncate: every key of the table, by prefix scan;
- lookup keys (``agent:username:{u}`` -> id) follow their column; old values come from
  the replica identity (see the agents migration);
- a row larger than ``max_row_bytes`` is not cached: its key is deleted (readers fall
  back to PostgreSQL) and the event is counted.

Hot path, compiled by mypyc.
"""

from __future__ import annotations

from typing import Final

from cdc.assemble import DELETE, INSERT, OP_NAMES, RowChange, TableView
from cdc.messages import UnchangedToast, Value
from cdc.resp import CRLF, append_bulk, append_command, array_header, bulk_header, glob_escape
from schema.keys import VERSION_FIELD

_VERSION_RESP: Final = b"$%d\r\n%s\r\n" % (len(VERSION_FIELD), VERSION_FIELD.encode())
_DEL: Final = b"*2\r\n$3\r\nDEL\r\n"
_HSET: Final = b"$4\r\nHSET\r\n"

PATCH_SCRIPT: Final = b"""
local key = KEYS[1]
if #KEYS > 1 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('RENAME', KEYS[2], key)
  else
    redis.call('DEL', key)
  end
end
if redis.call('TYPE', key).ok ~= 'hash' then
  redis.call('DEL', key)
  return 1
end
local nset = tonumber(ARGV[1])
local set_from = 2
local i = 2 + 2 * nset
local ndel = tonumber(ARGV[i])
local del_from = i + 1
i = i + 1 + ndel
local nkeep = tonumber(ARGV[i])
for j = i + 1, i + nkeep do
  if redis.call('HEXISTS', key, ARGV[j]) == 0 then
    redis.call('DEL', key)
    return 1
  end
end
if nset > 0 then redis.call('HSET', key, unpack(ARGV, set_from, set_from + 2 * nset - 1)) end
if ndel > 0 then redis.call('HDEL', key, unpack(ARGV, del_from, del_from + ndel - 1)) end
return 0
"""

TRUNCATE_SCRIPT: Final = b"""
local n = 0
for _, pattern in ipairs(ARGV) do
  local cursor = '0'
  repeat
    local reply = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = reply[1]
    local found = reply[2]
    for k = 1, #found, 500 do
      redis.call('UNLINK', unpack(found, k, math.min(k + 499, #found)))
    end
    n = n + #found
  until cursor == '0'
end
return n
"""


class PlanError(ValueError):
    """A change that cannot be mirrored (e.g. a row without its primary key)."""


class CommandBatch:
    """Commands in wire form plus what applying them needs to know afterwards."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.commands = 0
        # (index of the command in this batch, table name, row id) for each patch: a
        # result of 1 means the key was incomplete and was dropped; refetch that row.
        self.patches: list[tuple[int, str, bytes]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.oversized: list[tuple[str, int]] = []
        self.changes = 0

    def clear(self) -> None:
        self.buf = bytearray()
        self.commands = 0
        self.patches = []
        self.counts = {}
        self.oversized = []
        self.changes = 0

    @property
    def empty(self) -> bool:
        return self.commands == 0

    def count(self, table: str, op: str, n: int = 1) -> None:
        key = (table, op)
        self.counts[key] = self.counts.get(key, 0) + n


def _row_size(values: tuple[Value, ...]) -> int:
    size = 0
    for value in values:
        if isinstance(value, bytes):
            size += len(value)
    return size


class Planner:
    """Turns row changes into commands; ``max_row_bytes`` caps a cached row's size."""

    def __init__(self, max_row_bytes: int) -> None:
        self.max_row_bytes = max_row_bytes

    # -- rows from the stream ----------------------------------------------------------

    def change(self, change: RowChange, version: bytes, out: CommandBatch) -> None:
        view = change.view
        out.changes += 1
        out.count(view.tracked.name, OP_NAMES[change.op])
        if change.op == INSERT:
            new = change.new
            assert new is not None
            # A new row has no key yet (deletes, truncates and rebuilds remove keys), so
            # no DEL first: it costs Redis a command per row on the busiest path.
            self.write_row(view, new, version, out, replace=False)
            return
        old = change.old
        if change.op == DELETE:
            assert old is not None
            self._delete(view, old, out)
            return
        new = change.new
        assert new is not None
        new_id = _pk(view, new)
        moved_from: bytes | None = None
        if old is not None:
            old_id = old[view.pk_index]
            if isinstance(old_id, bytes) and old_id != new_id:
                moved_from = view.key(old_id)
            self._drop_changed_lookups(view, old, new, out)
        if _has_unchanged(new):
            self._patch(view, new_id, new, moved_from, version, out)
        else:
            if moved_from is not None:
                _append_del(out, moved_from)
            self.write_row(view, new, version, out)

    # -- whole rows (stream, snapshot, backfill) ------------------------------------------

    def write_row(
        self,
        view: TableView,
        values: tuple[Value, ...],
        version: bytes,
        out: CommandBatch,
        replace: bool = True,
    ) -> None:
        """Replace the row's hash with ``values`` (all present) and set its lookups.

        ``replace=False`` skips the leading ``DEL`` for rows known to have no key yet.
        """
        row_id = _pk(view, values)
        key = view.key(row_id)
        included = view.included
        fields = 0
        size = 0
        for i in range(len(values)):
            value = values[i]
            if isinstance(value, bytes) and included[i]:
                fields += 1
                size += len(value)
        if size > self.max_row_bytes:
            out.oversized.append((view.tracked.name, size))
            _append_del(out, key)
            for index in range(len(view.lookup_indexes)):
                position = view.lookup_indexes[index]
                value = values[position] if position >= 0 else None
                if isinstance(value, bytes):
                    _append_del(out, view.lookup_key(index, value))
            return
        if replace:
            _append_del(out, key)
        buf = out.buf
        buf += array_header(4 + 2 * fields)
        buf += _HSET
        append_bulk(buf, key)
        field_resp = view.field_resp
        for i in range(len(values)):
            value = values[i]
            if isinstance(value, bytes) and included[i]:
                buf += field_resp[i]
                buf += bulk_header(len(value))
                buf += value
                buf += CRLF
        buf += _VERSION_RESP
        append_bulk(buf, version)
        out.commands += 1
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            value = values[position] if position >= 0 else None
            if isinstance(value, bytes):
                append_command(buf, [b"SET", view.lookup_key(index, value), row_id])
                out.commands += 1

    def delete_row(
        self, view: TableView, row_id: bytes, lookups: tuple[bytes | None, ...], out: CommandBatch
    ) -> None:
        _append_del(out, view.key(row_id))
        for index in range(len(lookups)):
            value = lookups[index]
            if value is not None:
                _append_del(out, view.lookup_key(index, value))

    def truncate(self, views: tuple[TableView, ...], out: CommandBatch) -> None:
        args = [b"EVAL", TRUNCATE_SCRIPT, b"0"]
        for view in views:
            out.count(view.tracked.name, "truncate")
            args.append(glob_escape(view.key_prefix) + b"*")
            for prefix in view.lookup_prefixes:
                args.append(glob_escape(prefix) + b"*")
        append_command(out.buf, args)
        out.commands += 1
        out.changes += 1

    # -- internals --------------------------------------------------------------------------

    def _delete(self, view: TableView, old: tuple[Value, ...], out: CommandBatch) -> None:
        row_id = _pk(view, old)
        _append_del(out, view.key(row_id))
        for index in range(len(view.lookup_indexes)):
            value = old[view.lookup_indexes[index]] if view.lookup_indexes[index] >= 0 else None
            if isinstance(value, bytes):
                _append_del(out, view.lookup_key(index, value))

    def _drop_changed_lookups(
        self, view: TableView, old: tuple[Value, ...], new: tuple[Value, ...], out: CommandBatch
    ) -> None:
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            if position < 0:
                continue
            before = old[position]
            if isinstance(before, bytes) and before != new[position]:
                _append_del(out, view.lookup_key(index, before))

    def _patch(
        self,
        view: TableView,
        row_id: bytes,
        new: tuple[Value, ...],
        moved_from: bytes | None,
        version: bytes,
        out: CommandBatch,
    ) -> None:
        key = view.key(row_id)
        set_args: list[bytes] = []
        del_args: list[bytes] = []
        keep_args: list[bytes] = []
        size = 0
        for i in range(len(new)):
            if not view.included[i]:
                continue
            value = new[i]
            name = view.field_names[i]
            if isinstance(value, bytes):
                set_args.append(name)
                set_args.append(value)
                size += len(value)
            elif isinstance(value, UnchangedToast):
                keep_args.append(name)
            else:
                del_args.append(name)
        if size > self.max_row_bytes:
            out.oversized.append((view.tracked.name, size))
            _append_del(out, key)
            if moved_from is not None:
                _append_del(out, moved_from)
            return
        set_args.append(VERSION_FIELD.encode())
        set_args.append(version)
        args = [b"EVAL", PATCH_SCRIPT]
        if moved_from is not None:
            args += [b"2", key, moved_from]
        else:
            args += [b"1", key]
        args.append(b"%d" % (len(set_args) // 2))
        args += set_args
        args.append(b"%d" % len(del_args))
        args += del_args
        args.append(b"%d" % len(keep_args))
        args += keep_args
        out.patches.append((out.commands, view.tracked.name, row_id))
        append_command(out.buf, args)
        out.commands += 1
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            value = new[position] if position >= 0 else None
            if isinstance(value, bytes):
                append_command(out.buf, [b"SET", view.lookup_key(index, value), row_id])
                out.commands += 1


def _pk(view: TableView, values: tuple[Value, ...]) -> bytes:
    if view.pk_index < 0:
        raise PlanError(f"table {view.tracked.name} has no column {view.tracked.primary_key!r}")
    value = values[view.pk_index]
    if not isinstance(value, bytes):
        raise PlanError(f"a row of {view.tracked.name} arrived without its primary key")
    return value


def _has_unchanged(values: tuple[Value, ...]) -> bool:
    for value in values:
        if isinstance(value, UnchangedToast):
            return True
    return False


def _append_del(out: CommandBatch, key: bytes) -> None:
    out.buf += _DEL
    out.buf += bulk_header(len(key))
    out.buf += key
    out.buf += CRLF
    out.commands += 1
