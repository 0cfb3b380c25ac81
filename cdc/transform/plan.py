"""Planning: each change of a tracked table becomes the Redis commands that mirror it.

Pure: operations are appended in wire form (RESP bulk strings) to a
:class:`CommandBatch`, which the sink later sends as the arguments of one
:data:`BATCH_SCRIPT` run, with the checkpoint. The layout is the contract's (section 6),
driven by the table's :class:`~cdc.transform.assemble.TableView`:

- update with every value present: ``DEL key`` + ``HSET key <non-NULL columns> _v
  <lsn>`` (a full replace: NULL columns and dropped columns lose their field); an insert
  is the ``HSET`` alone, since no key exists for a row that did not (deletes, truncates
  and rebuilds remove keys);
- update with unchanged TOASTed values: a patch keeps those fields, sets the others,
  removes NULLed ones; if a kept field is missing (the key was never loaded or was
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

from cdc.errors import RecordError
from cdc.protocol.messages import UnchangedToast, Value
from cdc.protocol.resp import CRLF, append_bulk, bulk_header
from cdc.transform.assemble import DELETE, INSERT, OP_NAMES, RowChange, TableView
from schema.keys import VERSION_FIELD, match_prefix

_VERSION_RESP: Final = b"$%d\r\n%s\r\n" % (len(VERSION_FIELD), VERSION_FIELD.encode())

BATCH_SCRIPT: Final = b"""#!lua
-- One batch, applied atomically with the checkpoint (see cdc.cache.sink for ARGV's head).
local STATE = 'cdc:state'
local head = redis.call('HMGET', STATE, 'fence', 'lsn', 'partial')
if head[1] ~= ARGV[1] then
  if not head[1] then return {'lost'} end
  return {'fenced'}
end
if (head[2] or '') ~= ARGV[2] or (head[3] or '') ~= ARGV[3] then
  return {'moved', head[2] or '', head[3] or ''}
end
local nstate = tonumber(ARGV[5])
local i = 6 + 2 * nstate
local n = #ARGV
local index = 0
local incomplete = {}
local failed = {}
local repaired = 0

local function failure(r)
  if type(r) == 'table' and r.err then return r.err end
  return nil
end

local function patch(a)
  local key = ARGV[a]
  local from = ARGV[a + 1]
  if from ~= '' then
    if redis.call('EXISTS', from) == 1 then
      redis.call('RENAME', from, key)
    else
      redis.call('DEL', key)
    end
  end
  if redis.call('TYPE', key).ok ~= 'hash' then
    redis.call('DEL', key)
    return 1
  end
  local nset = tonumber(ARGV[a + 2])
  local set_from = a + 3
  local j = set_from + 2 * nset
  local ndel = tonumber(ARGV[j])
  local del_from = j + 1
  j = del_from + ndel
  local nkeep = tonumber(ARGV[j])
  for k = j + 1, j + nkeep do
    if redis.call('HEXISTS', key, ARGV[k]) == 0 then
      redis.call('DEL', key)
      return 1
    end
  end
  if nset > 0 then redis.call('HSET', key, unpack(ARGV, set_from, set_from + 2 * nset - 1)) end
  if ndel > 0 then redis.call('HDEL', key, unpack(ARGV, del_from, del_from + ndel - 1)) end
  return 0
end

local function truncate(a, last)
  for p = a, last do
    local cursor = '0'
    repeat
      local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[p], 'COUNT', 1000)
      cursor = reply[1]
      local found = reply[2]
      for k = 1, #found, 500 do
        local r = redis.pcall('UNLINK', unpack(found, k, math.min(k + 499, #found)))
        if failure(r) then return r end
      end
    until cursor == '0'
  end
  return 0
end

while i <= n do
  local op = ARGV[i]
  local a = i + 2
  local last = a + tonumber(ARGV[i + 1]) - 1
  local r
  if op == 'h' then
    r = redis.pcall('HSET', ARGV[a], unpack(ARGV, a + 1, last))
    local e = failure(r)
    if e and string.sub(e, 1, 9) == 'WRONGTYPE' then
      -- Our key, holding something else: replace it.
      redis.call('DEL', ARGV[a])
      repaired = repaired + 1
      r = redis.pcall('HSET', ARGV[a], unpack(ARGV, a + 1, last))
    end
  elseif op == 'r' then
    redis.call('DEL', ARGV[a])
    r = redis.pcall('HSET', ARGV[a], unpack(ARGV, a + 1, last))
  elseif op == 'd' then
    r = redis.pcall('DEL', unpack(ARGV, a, last))
  elseif op == 's' then
    r = redis.pcall('SET', ARGV[a], ARGV[a + 1])
  elseif op == 'p' then
    r = patch(a)
    if r == 1 then incomplete[#incomplete + 1] = index end
  elseif op == 't' then
    r = truncate(a, last)
  else
    return redis.error_reply('ERR cdc batch: unknown operation ' .. tostring(op))
  end
  local e = failure(r)
  if e then
    failed[#failed + 1] = index
    failed[#failed + 1] = e
  end
  index = index + 1
  i = last + 1
end
local published = 1
if #failed == 0 then
  if nstate > 0 then redis.call('HSET', STATE, unpack(ARGV, 6, 5 + 2 * nstate)) end
  -- Readers wake on it; without the right to publish they poll the checkpoint instead.
  if ARGV[4] ~= '' and failure(redis.pcall('PUBLISH', 'cdc:applied', ARGV[4])) then
    published = 0
  end
end
return {'ok', incomplete, failed, repaired, published}
"""
"""The script every batch runs in (``EVAL``): fenced, positioned, checkpoint last.

``ARGV`` starts with a head the sink writes (fence token, the ``lsn`` and ``partial``
the batch expects to follow, the position to publish, the state fields to set) and
goes on with the planner's operations, each ``<code> <n> <n arguments>``:

====  ===========================================================================
code  operation
====  ===========================================================================
h     ``HSET key field value …`` (a key of ours holding another type is replaced)
r     ``DEL key`` then ``HSET key field value …`` (a full replace)
d     ``DEL key …``
s     ``SET key value`` (a lookup)
p     patch a hash keeping unchanged TOASTed fields: ``key moved_from nset f v …
      ndel f … nkeep f …``; an incomplete key is deleted and reported
t     ``UNLINK`` every key matching each glob pattern
====  ===========================================================================

Nothing is written when the fence is not this daemon's (``fenced``, or ``lost`` when
``cdc:state`` is gone) or when the state's position is not the one the batch follows
(``moved``: an earlier batch was not applied). A command that fails leaves the
checkpoint where it was, so the failure can never be confirmed; the reply lists it.
The script is atomic for readers; a shebang script is refused whole, before it
writes, while Redis is out of memory.
"""

_OP_HSET: Final = b"$1\r\nh\r\n"
_OP_REPLACE: Final = b"$1\r\nr\r\n"
_OP_DEL: Final = b"$1\r\nd\r\n"
_OP_SET: Final = b"$1\r\ns\r\n"
_OP_PATCH: Final = b"$1\r\np\r\n"
_OP_TRUNCATE: Final = b"$1\r\nt\r\n"


class PlanError(RecordError):
    """A change that cannot be mirrored (e.g. a row without its primary key)."""


class Boundary:
    """How much of a batch its complete transactions fill (:meth:`CommandBatch.mark`)."""

    def __init__(
        self,
        buf_len: int = 0,
        commands: int = 0,
        args: int = 0,
        patches: int = 0,
        changes: int = 0,
        counts: dict[tuple[str, str], int] | None = None,
        oversized: int = 0,
    ) -> None:
        self.buf_len = buf_len
        self.commands = commands
        self.args = args
        self.patches = patches
        self.changes = changes
        self.counts: dict[tuple[str, str], int] = counts if counts is not None else {}
        self.oversized = oversized

    @property
    def empty(self) -> bool:
        return self.commands == 0 and self.changes == 0


class CommandBatch:
    """Operations for :data:`BATCH_SCRIPT` in wire form, and what applying them reports."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.commands = 0
        self.args = 0
        # (index of the operation in this batch, table name, row id) for each patch: the
        # script reports the index of a key it found incomplete and dropped; refetch it.
        self.patches: list[tuple[int, str, bytes]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.oversized: list[tuple[str, int]] = []
        self.changes = 0
        # (index of the first operation, table name) of each change, for error reports.
        self.tables: list[tuple[int, str]] = []

    def clear(self) -> None:
        self.buf = bytearray()
        self.commands = 0
        self.args = 0
        self.patches = []
        self.counts = {}
        self.oversized = []
        self.changes = 0
        self.tables = []

    @property
    def empty(self) -> bool:
        return self.commands == 0

    def count(self, table: str, op: str, n: int = 1) -> None:
        key = (table, op)
        self.counts[key] = self.counts.get(key, 0) + n

    def table_of(self, index: int) -> str:
        """The table whose change produced operation ``index``."""
        name = ""
        for first, table in self.tables:
            if first > index:
                break
            name = table
        return name

    def mark(self) -> Boundary:
        """Where the batch ends now (taken at each transaction's commit)."""
        return Boundary(
            len(self.buf),
            self.commands,
            self.args,
            len(self.patches),
            self.changes,
            dict(self.counts),
            len(self.oversized),
        )

    def split(self, cut: Boundary) -> CommandBatch:
        """Keep what precedes ``cut``; return the rest as a new batch."""
        rest = CommandBatch()
        rest.buf = self.buf[cut.buf_len :]
        rest.commands = self.commands - cut.commands
        rest.args = self.args - cut.args
        rest.patches = [(i - cut.commands, t, r) for i, t, r in self.patches[cut.patches :]]
        rest.changes = self.changes - cut.changes
        rest.oversized = self.oversized[cut.oversized :]
        rest.counts = {
            k: n - cut.counts.get(k, 0) for k, n in self.counts.items() if n - cut.counts.get(k, 0)
        }
        kept: list[tuple[int, str]] = []
        for first, table in self.tables:
            if first < cut.commands:
                kept.append((first, table))
            else:
                rest.tables.append((first - cut.commands, table))
        if kept and rest.commands and (not rest.tables or rest.tables[0][0] > 0):
            rest.tables.insert(0, (0, kept[-1][1]))
        self.tables = kept
        del self.buf[cut.buf_len :]
        del self.patches[cut.patches :]
        del self.oversized[cut.oversized :]
        self.commands = cut.commands
        self.args = cut.args
        self.changes = cut.changes
        self.counts = dict(cut.counts)
        return rest

    def op(self, code: bytes, nargs: int) -> bytearray:
        """Start an operation of ``nargs`` arguments; the caller appends them to the buffer."""
        buf = self.buf
        buf += code
        n = b"%d" % nargs
        buf += bulk_header(len(n))
        buf += n
        buf += CRLF
        self.args += 2 + nargs
        self.commands += 1
        return buf


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
        name = view.tracked.name
        out.changes += 1
        out.count(name, OP_NAMES[change.op])
        tables = out.tables
        if not tables or tables[-1][1] != name:
            tables.append((out.commands, name))
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
        buf = out.op(_OP_REPLACE if replace else _OP_HSET, 3 + 2 * fields)
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
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            value = values[position] if position >= 0 else None
            if isinstance(value, bytes):
                _append_set(out, view.lookup_key(index, value), row_id)

    def delete_row(
        self, view: TableView, row_id: bytes, lookups: tuple[bytes | None, ...], out: CommandBatch
    ) -> None:
        _append_del(out, view.key(row_id))
        for index in range(len(lookups)):
            value = lookups[index]
            if value is not None:
                _append_del(out, view.lookup_key(index, value))

    def truncate(self, views: tuple[TableView, ...], out: CommandBatch) -> None:
        patterns: list[bytes] = []
        for view in views:
            out.count(view.tracked.name, "truncate")
            patterns.append(match_prefix(view.key_prefix.decode()).encode())
            for prefix in view.lookup_prefixes:
                patterns.append(match_prefix(prefix.decode()).encode())
        if views:
            out.tables.append((out.commands, views[0].tracked.name))
        buf = out.op(_OP_TRUNCATE, len(patterns))
        for pattern in patterns:
            append_bulk(buf, pattern)
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
        args = [key, moved_from if moved_from is not None else b""]
        args.append(b"%d" % (len(set_args) // 2))
        args += set_args
        args.append(b"%d" % len(del_args))
        args += del_args
        args.append(b"%d" % len(keep_args))
        args += keep_args
        out.patches.append((out.commands, view.tracked.name, row_id))
        buf = out.op(_OP_PATCH, len(args))
        for arg in args:
            append_bulk(buf, arg)
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            value = new[position] if position >= 0 else None
            if isinstance(value, bytes):
                _append_set(out, view.lookup_key(index, value), row_id)


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
    buf = out.op(_OP_DEL, 1)
    buf += bulk_header(len(key))
    buf += key
    buf += CRLF


def _append_set(out: CommandBatch, key: bytes, value: bytes) -> None:
    buf = out.op(_OP_SET, 2)
    append_bulk(buf, key)
    append_bulk(buf, value)
