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

LUA_EPOCH: Final = b"""
-- The score of a sorted-set view: what extract(epoch from <timestamptz>) gives for the
-- text PostgreSQL prints (TimeZone=UTC), as a string ZADD parses exactly.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local epoch_text, epoch_value = nil, nil

local function parse_epoch(text)
  if text == 'infinity' then return 'inf' end
  if text == '-infinity' then return '-inf' end
  local y, mo, d, rest = string.match(text, '^(%d+)-(%d%d)-(%d%d)(.*)$')
  if not y then return '0' end
  y = tonumber(y)
  if string.sub(rest, -3) == ' BC' then
    y = 1 - y
    rest = string.sub(rest, 1, -4)
  end
  local h, mi, s, frac, tz = string.match(rest, '^ (%d%d):(%d%d):(%d%d)(%.?%d*)(.*)$')
  local offset = 0
  if h then
    local sign, oh, om, os = string.match(tz, '^([+-])(%d%d):?(%d*):?(%d*)$')
    if sign then
      offset = tonumber(oh) * 3600 + (tonumber(om) or 0) * 60 + (tonumber(os) or 0)
      if sign == '-' then offset = -offset end
    end
  else
    h, mi, s, frac = '0', '0', '0', ''
  end
  local whole = days_from_civil(y, tonumber(mo), tonumber(d)) * 86400
    + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s) - offset
  if frac == '' or frac == '.' then return string.format('%d', whole) end
  if whole >= 0 then return string.format('%d', whole) .. frac end
  return string.format('%.17g', whole + tonumber('0' .. frac))
end

-- The rows of one transaction mostly share their now(): remember the last one.
local function epoch(text)
  if not text then return '0' end
  if text ~= epoch_text then
    epoch_text, epoch_value = text, parse_epoch(text)
  end
  return epoch_value
end
"""
"""Lua shared by the scripts that write sorted-set views."""

LUA_VIEW_WRITE: Final = b"""
-- Write a view key of ours; one holding another type is replaced.
local function view_write(cmd, key, a1, a2)
  local r
  if a2 then r = redis.pcall(cmd, key, a1, a2) else r = redis.pcall(cmd, key, a1) end
  if type(r) == 'table' and r.err and string.sub(r.err, 1, 9) == 'WRONGTYPE' then
    redis.call('DEL', key)
    if a2 then r = redis.pcall(cmd, key, a1, a2) else r = redis.pcall(cmd, key, a1) end
  end
  return r
end
"""

BATCH_SCRIPT: Final = (
    b"""#!lua
-- One batch, applied atomically with the checkpoint (see cdc.cache.sink for ARGV's head).
local STATE = 'cdc:state'
"""
    + LUA_EPOCH
    + LUA_VIEW_WRITE
    + b"""
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

-- Views and the change feed: 'w' notes a row key's view values (and, for the feed,
-- columns) before the change's operations, 'u' after them moves the row's id between
-- view keys from what the hash held to what it holds, and appends the feed entries.
local watched = {}

local function view_fields(e)
  if e.nv == 0 then return false end
  local fields = {}
  for v = 0, e.nv - 1 do
    local p = e.first + 4 * v
    fields[2 * v + 1] = ARGV[p + 2]
    fields[2 * v + 2] = ARGV[p + 3]
  end
  local r = redis.pcall('HMGET', e.key, unpack(fields))
  if type(r) == 'table' and r.err then return false end
  return r
end

local function column_values(e)
  if e.ncols == 0 then return false end
  local r = redis.pcall('HMGET', e.key, unpack(ARGV, e.cols, e.cols + e.ncols - 1))
  if type(r) == 'table' and r.err then return false end
  return r
end

local function watch(a)
  local ncols = tonumber(ARGV[a + 2])
  local e = {id = ARGV[a], key = ARGV[a + 1], ncols = ncols, cols = a + 3}
  e.nv = tonumber(ARGV[a + 3 + ncols])
  e.first = a + 4 + ncols
  e.old = view_fields(e)
  e.before = column_values(e)
  watched[#watched + 1] = e
end

local function move(e)
  local new = view_fields(e)
  local old = e.old
  for v = 0, e.nv - 1 do
    local p = e.first + 4 * v
    local kind = ARGV[p]
    local prefix = ARGV[p + 1]
    local was = old and old[2 * v + 1]
    local is = new and new[2 * v + 1]
    local r
    if was and was ~= is then
      if kind == 'z' then r = redis.pcall('ZREM', prefix .. was .. '}', e.id)
      else r = redis.pcall('SREM', prefix .. was .. '}', e.id) end
      if failure(r) then return r end
    end
    if is then
      if kind == 'z' then
        r = view_write('ZADD', prefix .. is .. '}', epoch(new[2 * v + 2]), e.id)
      else
        r = view_write('SADD', prefix .. is .. '}', e.id)
      end
      if failure(r) then return r end
    end
  end
  return 0
end

local function changed(e)
  local after = column_values(e)
  local before = e.before
  local names = {}
  for c = 1, e.ncols do
    local was = before and before[c]
    local is = after and after[c]
    if was ~= is then names[#names + 1] = ARGV[e.cols + c - 1] end
  end
  return table.concat(names, ',')
end

local function update_views(a, last)
  local columns = {}
  for w = 1, #watched do
    local e = watched[w]
    local r = move(e)
    if failure(r) then
      watched = {}
      return r
    end
    if e.ncols > 0 then columns[e.id] = changed(e) end
  end
  watched = {}
  -- Feed entries: stream maxlen op id lsn seq columns (an update's columns: what changed).
  for f = a, last, 7 do
    local cols = ARGV[f + 6]
    if ARGV[f + 2] == 'update' then cols = columns[ARGV[f + 3]] or cols end
    local r = redis.pcall('XADD', ARGV[f], 'MAXLEN', '~', ARGV[f + 1], '*',
      'op', ARGV[f + 2], 'id', ARGV[f + 3], 'lsn', ARGV[f + 4], 'seq', ARGV[f + 5],
      'columns', cols)
    if failure(r) then return r end
  end
  return 0
end

-- A new row's views, from its values: id nviews (kind prefix value score) ...
local function add_views(a)
  local id = ARGV[a]
  for p = a + 2, a + 1 + 4 * tonumber(ARGV[a + 1]), 4 do
    local kind = ARGV[p]
    local r = 0
    if kind == 'z' then
      r = view_write('ZADD', ARGV[p + 1] .. ARGV[p + 2] .. '}', epoch(ARGV[p + 3]), id)
    elseif kind == 's' then
      r = view_write('SADD', ARGV[p + 1] .. ARGV[p + 2] .. '}', id)
    end
    if failure(r) then return r end
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
  elseif op == 'w' then
    watch(a)
    r = 0
  elseif op == 'u' then
    r = update_views(a, last)
  elseif op == 'a' then
    r = add_views(a)
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
)
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
w     note a row's view values before its change: ``id key ncols column … nviews
      (kind key_prefix column score_column) …`` (kind ``z`` sorted set, ``s`` set)
u     after the change: move each noted id between view keys as the hash now says,
      then ``XADD`` feed entries ``stream maxlen op id lsn seq columns`` …
a     a new row's views from its values: ``id nviews (kind key_prefix value score) …``
      (kind ``-``: the column is NULL)
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
_OP_WATCH: Final = b"$1\r\nw\r\n"
_OP_VIEWS: Final = b"$1\r\nu\r\n"
_OP_ADD: Final = b"$1\r\na\r\n"


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


class _TableSpec:
    """What the ``w`` and ``u`` operations need of a table, precomputed in wire form."""

    def __init__(self, view: TableView, feed: bool) -> None:
        tracked = view.tracked
        self.view = view
        self.nviews = len(tracked.views)
        spec = bytearray()
        append_bulk(spec, b"%d" % self.nviews)
        for v in tracked.views:
            append_bulk(spec, b"z" if v.score is not None else b"s")
            append_bulk(spec, v.key_prefix.encode())
            append_bulk(spec, v.column.encode())
            append_bulk(spec, (v.score if v.score is not None else v.column).encode())
        self.views = bytes(spec)
        self.views_nargs = 1 + 4 * self.nviews
        # For the ``a`` operation: per view its kind, key prefix, and the positions of
        # its column and score column in a row (-1: not in the relation).
        names = view.column_names
        self.view_kinds: list[bytes] = []
        self.view_prefixes: list[bytes] = []
        self.view_columns: list[int] = []
        self.view_scores: list[int] = []
        for v in tracked.views:
            self.view_kinds.append(b"z" if v.score is not None else b"s")
            self.view_prefixes.append(v.key_prefix.encode())
            self.view_columns.append(names.index(v.column) if v.column in names else -1)
            score = v.score if v.score is not None else v.column
            self.view_scores.append(names.index(score) if score in names else -1)
        # The cached columns, for an update's changed columns in the feed.
        columns = bytearray()
        ncols = 0
        for i in range(len(view.included)):
            if view.included[i]:
                columns += view.field_resp[i]
                ncols += 1
        self.columns = bytes(columns)
        self.ncols = ncols
        self.feed = feed
        self.feed_key = tracked.feed_key.encode()


class Planner:
    """Turns row changes into commands; ``max_row_bytes`` caps a cached row's size.

    With ``change_feed`` each change also appends an entry to its table's stream, capped
    at about ``feed_maxlen`` entries (contract section 6c)."""

    def __init__(
        self, max_row_bytes: int, change_feed: bool = False, feed_maxlen: int = 100_000
    ) -> None:
        self.max_row_bytes = max_row_bytes
        self.change_feed = change_feed
        self.feed_maxlen = b"%d" % feed_maxlen
        self._specs: dict[int, _TableSpec] = {}

    def _spec(self, view: TableView) -> _TableSpec:
        spec = self._specs.get(id(view))
        if spec is None or spec.view is not view:
            if len(self._specs) > 256:
                self._specs.clear()
            spec = _TableSpec(view, self.change_feed)
            self._specs[id(view)] = spec
        return spec

    # -- rows from the stream ----------------------------------------------------------

    def change(self, change: RowChange, version: bytes, out: CommandBatch) -> None:
        view = change.view
        name = view.tracked.name
        out.changes += 1
        out.count(name, OP_NAMES[change.op])
        tables = out.tables
        if not tables or tables[-1][1] != name:
            tables.append((out.commands, name))
        spec = self._spec(view)
        feed = spec.feed
        seq = b"%d" % (change.seq - 1)
        if change.op == INSERT:
            new = change.new
            assert new is not None
            new_id = _pk(view, new)
            # A new row has no key yet (deletes, truncates and rebuilds remove keys), so
            # no DEL first: it costs Redis a command per row on the busiest path. Nor
            # view membership: its views are added from the values, nothing read.
            if self._write(view, new, version, out, replace=False) and spec.nviews:
                _append_add(out, spec, new_id, new)
            if feed:
                self._finish(out, spec, [b"insert", new_id, _columns(view, new)], version, seq)
            return
        old = change.old
        if change.op == DELETE:
            assert old is not None
            old_id = _pk(view, old)
            if spec.nviews:
                _append_watch(out, spec, old_id, view.key(old_id), False)
            self._delete(view, old, out)
            self._finish(out, spec, [b"delete", old_id, b""] if feed else [], version, seq)
            return
        new = change.new
        assert new is not None
        new_id = _pk(view, new)
        moved_from: bytes | None = None
        moved_id = b""
        if old is not None:
            before = old[view.pk_index]
            if isinstance(before, bytes) and before != new_id:
                moved_from = view.key(before)
                moved_id = before
        key = view.key(new_id)
        if moved_from is not None:
            if spec.nviews:
                _append_watch(out, spec, moved_id, moved_from, False)
                _append_watch(out, spec, new_id, key, False)
            entries = [b"delete", moved_id, b"", b"insert", new_id, _columns(view, new)]
        else:
            if spec.nviews or feed:
                _append_watch(out, spec, new_id, key, feed)
            entries = [b"update", new_id, b""]
        if old is not None:
            self._drop_changed_lookups(view, old, new, out)
        if _has_unchanged(new):
            self._patch(view, new_id, new, moved_from, version, out)
        else:
            if moved_from is not None:
                _append_del(out, moved_from)
            self._write(view, new, version, out)
        self._finish(out, spec, entries if feed else [], version, seq)

    def _finish(
        self,
        out: CommandBatch,
        spec: _TableSpec,
        entries: list[bytes],
        version: bytes,
        seq: bytes,
    ) -> None:
        """The ``u`` operation closing a change: views moved, feed entries appended."""
        if not spec.nviews and not entries:
            return
        count = len(entries) // 3
        buf = out.op(_OP_VIEWS, 7 * count)
        for k in range(count):
            append_bulk(buf, spec.feed_key)
            append_bulk(buf, self.feed_maxlen)
            append_bulk(buf, entries[3 * k])
            append_bulk(buf, entries[3 * k + 1])
            append_bulk(buf, version)
            append_bulk(buf, seq)
            append_bulk(buf, entries[3 * k + 2])

    # -- whole rows (stream, snapshot, backfill) ------------------------------------------

    def write_row(
        self,
        view: TableView,
        values: tuple[Value, ...],
        version: bytes,
        out: CommandBatch,
        replace: bool = True,
        views_empty: bool = False,
    ) -> None:
        """Replace the row's hash with ``values`` (all present), set its lookups and
        views (no feed entry: this is a load, not a change).

        ``replace=False`` skips the leading ``DEL`` for rows known to have no key yet;
        ``views_empty`` (a snapshot load, which clears view keys first) adds the row to
        its views without reading what the hash held.
        """
        spec = self._spec(view)
        if views_empty:
            if self._write(view, values, version, out, replace) and spec.nviews:
                _append_add(out, spec, _pk(view, values), values)
            return
        if spec.nviews:
            row_id = _pk(view, values)
            _append_watch(out, spec, row_id, view.key(row_id), False)
        self._write(view, values, version, out, replace)
        if spec.nviews:
            out.op(_OP_VIEWS, 0)

    def _write(
        self,
        view: TableView,
        values: tuple[Value, ...],
        version: bytes,
        out: CommandBatch,
        replace: bool = True,
    ) -> bool:
        """Write the row's hash and lookups; False when the row is too large to cache."""
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
            return False
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
        return True

    def delete_row(
        self, view: TableView, row_id: bytes, lookups: tuple[bytes | None, ...], out: CommandBatch
    ) -> None:
        spec = self._spec(view)
        key = view.key(row_id)
        if spec.nviews:
            _append_watch(out, spec, row_id, key, False)
        _append_del(out, key)
        for index in range(len(lookups)):
            value = lookups[index]
            if value is not None:
                _append_del(out, view.lookup_key(index, value))
        if spec.nviews:
            out.op(_OP_VIEWS, 0)

    def truncate(
        self, views: tuple[TableView, ...], out: CommandBatch, version: bytes = b"", seq: int = 1
    ) -> None:
        """Remove every key of the tables (rows, lookups, views); one feed entry each."""
        patterns: list[bytes] = []
        for view in views:
            out.count(view.tracked.name, "truncate")
            patterns.append(match_prefix(view.key_prefix.decode()).encode())
            for prefix in view.lookup_prefixes:
                patterns.append(match_prefix(prefix.decode()).encode())
            for v in view.tracked.views:
                patterns.append(match_prefix(v.key_prefix).encode())
        if views:
            out.tables.append((out.commands, views[0].tracked.name))
        buf = out.op(_OP_TRUNCATE, len(patterns))
        for pattern in patterns:
            append_bulk(buf, pattern)
        if self.change_feed and views:
            buf = out.op(_OP_VIEWS, 7 * len(views))
            for view in views:
                append_bulk(buf, view.tracked.feed_key.encode())
                append_bulk(buf, self.feed_maxlen)
                append_bulk(buf, b"truncate")
                append_bulk(buf, b"")
                append_bulk(buf, version)
                append_bulk(buf, b"%d" % (seq - 1))
                append_bulk(buf, b"")
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


def _columns(view: TableView, values: tuple[Value, ...]) -> bytes:
    """The cached columns a row has a value for (NULL ones have no field)."""
    names: list[bytes] = []
    for i in range(len(values)):
        value = values[i]
        if view.included[i] and (isinstance(value, (bytes, UnchangedToast))):
            names.append(view.field_names[i])
    return b",".join(names)


def _append_watch(
    out: CommandBatch, spec: _TableSpec, row_id: bytes, key: bytes, diff: bool
) -> None:
    """The ``w`` operation: note the row's view values (and, with ``diff``, its cached
    columns) before the operations of its change."""
    ncols = spec.ncols if diff else 0
    buf = out.op(_OP_WATCH, 3 + ncols + spec.views_nargs)
    append_bulk(buf, row_id)
    append_bulk(buf, key)
    append_bulk(buf, b"%d" % ncols)
    if diff:
        buf += spec.columns
    buf += spec.views


def _append_add(
    out: CommandBatch, spec: _TableSpec, row_id: bytes, values: tuple[Value, ...]
) -> None:
    """The ``a`` operation: add a new row's id to its views, from its values."""
    buf = out.op(_OP_ADD, 2 + 4 * spec.nviews)
    append_bulk(buf, row_id)
    append_bulk(buf, b"%d" % spec.nviews)
    for v in range(spec.nviews):
        position = spec.view_columns[v]
        value = values[position] if position >= 0 else None
        score_at = spec.view_scores[v]
        score = values[score_at] if score_at >= 0 else None
        present = isinstance(value, bytes)
        append_bulk(buf, spec.view_kinds[v] if present else b"-")
        append_bulk(buf, spec.view_prefixes[v])
        append_bulk(buf, value if isinstance(value, bytes) else b"")
        append_bulk(buf, score if isinstance(score, bytes) else b"")


def _append_del(out: CommandBatch, key: bytes) -> None:
    buf = out.op(_OP_DEL, 1)
    buf += bulk_header(len(key))
    buf += key
    buf += CRLF


def _append_set(out: CommandBatch, key: bytes, value: bytes) -> None:
    buf = out.op(_OP_SET, 2)
    append_bulk(buf, key)
    append_bulk(buf, value)
