"""The Lua a batch runs in: one ``EVAL`` per batch, fenced, positioned, checkpoint last.

The planner (:mod:`cdc.transform.plan`) writes operations in the format
:data:`BATCH_SCRIPT` reads; the sink (:mod:`cdc.cache.sink`) sends them with the head
the script checks. Pure: constants only.
"""

from __future__ import annotations

from typing import Final

from schema.keys import APPLIED_CHANNEL

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
-- KEYS[1]: this daemon's state hash (cdc:state, or cdc:state:<slot>: schema.keys).
local STATE = KEYS[1]
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
    local r
    for attempt = 1, 2 do
      r = redis.pcall('XADD', ARGV[f], 'MAXLEN', '~', ARGV[f + 1], '*',
        'op', ARGV[f + 2], 'id', ARGV[f + 3], 'lsn', ARGV[f + 4], 'seq', ARGV[f + 5],
        'columns', cols)
      local e = failure(r)
      -- A feed key of ours holding another type is replaced, as a view key is.
      if not (e and string.sub(e, 1, 9) == 'WRONGTYPE') then break end
      redis.call('DEL', ARGV[f])
    end
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
  if ARGV[4] ~= '' and failure(redis.pcall('PUBLISH', '@CHANNEL@', ARGV[4])) then
    published = 0
  end
end
return {'ok', incomplete, failed, repaired, published}
"""
).replace(b"@CHANNEL@", APPLIED_CHANNEL.encode())
"""The script every batch runs in (``EVAL``): fenced, positioned, checkpoint last.

``KEYS[1]`` is the daemon's state hash (:func:`schema.keys.state_key`). ``ARGV`` starts
with a head the sink writes (fence token, the ``lsn`` and ``partial``
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
