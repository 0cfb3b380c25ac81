"""The Lua of cluster mode (:mod:`cdc.cache.cluster_sink`): per-slot scripts. Pure.

Redis Cluster runs a script only over the keys of one hash slot, so a batch is split by
slot (the sink does it) and each slot's part runs as one :data:`ROW_SCRIPT`. Every slot
``s`` has its own fence and position key ``cdc:fence:{<tag of s>}`` (:func:`slot_tag`: a
hash tag that hashes to ``s``), a hash with

- ``f``: the fence token of the daemon that owns the cache (a claim writes all 16384);
- ``v``: the version of the last change applied to a key of this slot: the change's
  commit LSN and its place in the transaction, ``%016X%08X`` (fixed width, so Lua
  compares them as strings);
- ``w``: the version of the last view delta applied to a key of this slot (each delta
  carries its change's version): with ``v``, what tells a replayed ``TRUNCATE`` that the
  slot already has changes made after it (a view key is written from another slot's
  row, so ``v`` alone would not show it, and the replay would empty it for good);
- ``n``: how many of the daemon's scripts ran in this slot. Every script answers the
  count it found and adds one; the daemon remembers the highest it caused
  (:class:`~cdc.cache.cluster_sink.SlotLedger`), so a slot found below it lost writes:
  its primary failed over to a replica that had not received them. Those slots, and
  only those, are repaired (:mod:`cdc.runtime.shard_repair`).

A change is applied to a slot only if its version is newer than the slot's ``v``. Changes
reach a slot in commit order, so ``v`` only grows, and a replay (after a crash between
the slot scripts and the checkpoint) skips exactly what the slot already has: no key goes
back, and a replayed insert cannot resurrect a row deleted later (the slot's ``v`` is past
it). This is the per-key version the design needs, kept once per slot rather than per key:
it needs no tombstones (nothing outlives its row), and ``MIGRATE`` carries it with the
slot's keys during a reshard. A slot whose fence key is missing lost its data.

Views cannot be written in the row's slot. The row script computes each view change of a
row it applies (remove the id from the old value's key, add it to the new one's, with its
score) and appends it to the slot's outbox ``cdc:outbox:{<tag>}`` in the same atomic run;
the script answers with the slot's whole outbox (so a run retried after it applied still
delivers), the sink applies those deltas to the view keys' slots (:data:`VIEW_SCRIPT`) and
deletes the outboxes. A crash in between leaves them in the outbox, delivered at the next
claim. Redelivery is safe without versions: all of a row's deltas come from its one slot,
in order, and re-applying the whole sequence of a member's deltas in order leaves each
view key as the last delta said.
"""

from __future__ import annotations

import binascii
from typing import Final

from cdc.transform.script import BATCH_SCRIPT, LUA_EPOCH, LUA_VIEW_WRITE

SLOTS: Final = 16384
FENCE_PREFIX: Final = "cdc:fence:"
OUTBOX_PREFIX: Final = "cdc:outbox:"

# cdc:state fields of cluster mode: the primaries' node ids at the last claim, and the
# slots whose repair is not finished (the pipeline clears it once their rows are written).
SHARDS_FIELD: Final = "shards"
REPAIR_FIELD: Final = "repair_slots"
# Bumped (HINCRBY) in cdc:state by writers whose writes no slot count records
# (``cdc verify --repair`` on a cluster): the daemon's counts then prove nothing.
UNCOUNTED_FIELD: Final = "uncounted"
# The tag of the backfill requests of a slot repair (:meth:`Backfill.pending`).
REPAIR_TAG: Final = "slot-repair"

_tags: list[str] = []


def key_slot(key: bytes) -> int:
    """Redis Cluster's hash slot of ``key`` (CRC16 of its hash tag, or of the whole key):
    here rather than redis-py's, whose import costs 65-110 ms of every start."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


def slot_tags() -> list[str]:
    """For each slot, a short hash tag that hashes to it (computed once)."""
    if not _tags:
        tags: list[str | None] = [None] * SLOTS
        missing = SLOTS
        n = 0
        while missing:
            tag = format(n, "x")
            slot = key_slot(tag.encode())
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
            n += 1
        _tags.extend(t for t in tags if t is not None)
    return _tags


def slot_tag(slot: int) -> str:
    return slot_tags()[slot]


def fence_key(slot: int, prefix: str = FENCE_PREFIX) -> str:
    """``prefix`` is per daemon (:func:`key_prefixes`): several daemons share a cluster."""
    return prefix + "{" + slot_tag(slot) + "}"


def outbox_key(slot: int, prefix: str = OUTBOX_PREFIX) -> str:
    return prefix + "{" + slot_tag(slot) + "}"


def key_prefixes(state_key: str) -> tuple[str, str]:
    """(fence prefix, outbox prefix) of the daemon whose state is ``state_key``:
    ``cdc:fence:`` for ``cdc:state``, ``cdc:fence:<slot>:`` for ``cdc:state:<slot>``
    (each daemon fences only its own slots' keys; the tag always follows a ``{``, so one
    daemon's outbox scan, ``<prefix>{*``, never matches another's)."""
    suffix = state_key.split(":", 2)[2] + ":" if state_key.count(":") >= 2 else ""
    return FENCE_PREFIX + suffix, OUTBOX_PREFIX + suffix


def version(lsn: int, seq: int) -> bytes:
    """A change's version as the slot scripts compare it."""
    return b"%016X%08X" % (lsn, seq)


def slot_ranges(slots: list[int]) -> str:
    """``[0, 1, 2, 7]`` as ``"0-2,7"`` (slots sorted), for ``cdc:state``."""
    parts: list[str] = []
    start = prev = -2
    for slot in [*sorted(set(slots)), -2]:
        if slot == prev + 1:
            prev = slot
            continue
        if start >= 0:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = slot
    return ",".join(parts)


def parse_slot_ranges(text: str) -> set[int]:
    """What :func:`slot_ranges` wrote (a malformed part is ignored: at worst a slot is
    not repaired again, which ``cdc verify`` reports)."""
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            lo = int(first)
            hi = int(last) if last else lo
        except ValueError:
            continue
        out.update(range(max(lo, 0), min(hi, SLOTS - 1) + 1))
    return out


class SlotLedger:
    """How many scripts each slot has seen (its ``n``), across this process's sessions:
    a slot whose ``n`` is found lower lost writes (a failover to a lagging replica).

    Every script that writes a slot counts in its ``n``, and a primary's replicas (and
    its own RDB/AOF) hold a prefix of what it was sent, so the counts a claim read of
    every slot (``complete``) name exactly the slots that lost scripts since. They name
    every lost write only while nothing wrote those slots outside a script, so a later
    claim trusts them (:meth:`trusts`) only if, since the last claim that recorded what
    it found (:meth:`trust`): no other daemon claimed (the fence is still ``token``),
    this process made no such write (a repair, a load or rebuild: :meth:`distrust`),
    no other writer said it made one (``cdc:state``'s :data:`UNCOUNTED_FIELD` is
    ``stamp``) and no slot moved between primaries (``layout``: a reshard's ``MIGRATE``
    writes keys in any order). Then a failover or restart that lost nothing costs no
    repair; otherwise the primaries' identities decide, as for a new process.

    A claim counts as a script in every slot (``HINCRBY n``): what any writer wrote
    before it is vouched for by that count, so a replica promoted later without such a
    write lacks the claim's count too. Slots a claim found lost stay lost
    (``unrecorded``) until a claim has recorded them (``repair_slots``): a claim that
    fails in between, or a record lost with its shard, does not lower what the next one
    expects. Every script's count is
    noted, and a slot whose script's answer was never read (``unsure``) leaves the
    next claim untrusted: an unnoted run on a promoted replica would make up for a lost
    one."""

    def __init__(self) -> None:
        self.runs: dict[int, int] = {}
        self.complete = False
        self.token: str | None = None
        self.stamp = ""
        self.layout: frozenset[str] = frozenset()
        self.unrecorded: set[int] = set()
        # Slots whose scripts were sent and not yet noted (they may have counted).
        self.unsure: set[int] = set()

    def note(self, slot: int, found: int) -> bool:
        """Record a script run that found ``found``; False if the slot lost writes."""
        expected = self.runs.get(slot, 0)
        # Its own run counts on top of what was expected, found or not: a script that
        # reaches a replica promoted without earlier runs keeps the shortfall visible.
        self.runs[slot] = max(expected, found) + 1
        return found >= expected

    def lost(self, found: dict[int, int]) -> list[int]:
        """The slots whose count is below what this daemon caused, and those found so
        by a claim that did not record them."""
        below = {s for s, n in self.runs.items() if found.get(s, 0) < n}
        return sorted(below | self.unrecorded)

    def accept(self, found: dict[int, int], counted: dict[int, int]) -> None:
        """At a claim: every slot's count as ``found`` before the claim's own, and
        ``counted`` with it; the latter is what to expect from now on (the lost ones are
        repaired). Not trusted until :meth:`trust`."""
        self.unrecorded.update(self.lost(found))
        self.runs = dict(counted)
        self.unsure.clear()
        self.complete = True
        self.token = None

    def trust(self, token: str, stamp: str, layout: frozenset[str]) -> None:
        """The claim under fence ``token`` recorded what it found (``repair_slots``).
        The slots it found lost stay in :attr:`unrecorded` until :meth:`repaired`: the
        record is one write to ``cdc:state``, which a failover of its shard can lose."""
        self.token, self.stamp, self.layout = token, stamp, layout

    def repaired(self) -> None:
        """The repair of the slots found lost is done (its record cleared)."""
        self.unrecorded.clear()

    def distrust(self) -> None:
        """This process wrote slots outside the counting scripts."""
        self.token = None

    def trusts(self, fence: str, stamp: str, layout: frozenset[str]) -> bool:
        return (
            self.complete
            and self.token is not None
            and (fence, stamp, layout) == (self.token, self.stamp, self.layout)
        )


ROW_SCRIPT: Final = (
    b"""#!lua
-- One slot's part of a batch. KEYS: fence, outbox, the data keys (declared for routing).
-- ARGV[1]: the fence token; then operations <code> <version> <n> <n arguments>.
local FENCE, OUTBOX = KEYS[1], KEYS[2]
local head = redis.call('HMGET', FENCE, 'f', 'v', 'n')
if not head[1] then return {'lost'} end
if head[1] ~= ARGV[1] then return {'fenced'} end
local pos = head[2] or ''
local top = pos
local runs = tonumber(head[3] or '0')
redis.call('HINCRBY', FENCE, 'n', 1)
"""
    + LUA_EPOCH
    + b"""
local incomplete, failed, deltas = {}, {}, {}
local repaired = 0

local function failure(r)
  if type(r) == 'table' and r.err then return r.err end
  return nil
end

-- The delta's op carries the version of the change it comes from (the view script
-- records the highest per slot, so a replayed TRUNCATE knows the slot is past it).
local cur = ''

local function delta(op, key, member, score)
  deltas[#deltas + 1] = op .. cur
  deltas[#deltas + 1] = key
  deltas[#deltas + 1] = member
  deltas[#deltas + 1] = score
end

local function patch(a)
  local key = ARGV[a]
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

-- An update's changed columns, for its change feed entry: id, version, names (comma
-- separated).
local changed = {}

local function note_changed(e)
  local after = column_values(e)
  local before = e.before
  local names = {}
  for c = 1, e.ncols do
    local was = before and before[c]
    local is = after and after[c]
    if was ~= is then names[#names + 1] = ARGV[e.cols + c - 1] end
  end
  changed[#changed + 1] = e.id
  changed[#changed + 1] = cur
  changed[#changed + 1] = table.concat(names, ',')
end

local function moves()
  for w = 1, #watched do
    local e = watched[w]
    if e.ncols > 0 then note_changed(e) end
    local new = view_fields(e)
    local old = e.old
    for v = 0, e.nv - 1 do
      local p = e.first + 4 * v
      local kind, prefix = ARGV[p], ARGV[p + 1]
      local was = old and old[2 * v + 1]
      local is = new and new[2 * v + 1]
      if was and was ~= is then delta(kind .. '-', prefix .. was .. '}', e.id, '') end
      if is then
        local score = ''
        if kind == 'z' then score = epoch(new[2 * v + 2]) end
        delta(kind .. '+', prefix .. is .. '}', e.id, score)
      end
    end
  end
  watched = {}
end

local function add_views(a)
  local id = ARGV[a]
  for p = a + 2, a + 1 + 4 * tonumber(ARGV[a + 1]), 4 do
    local kind = ARGV[p]
    if kind == 'z' then
      delta('z+', ARGV[p + 1] .. ARGV[p + 2] .. '}', id, epoch(ARGV[p + 3]))
    elseif kind == 's' then
      delta('s+', ARGV[p + 1] .. ARGV[p + 2] .. '}', id, '')
    end
  end
end

local i, n, index = 2, #ARGV, 0
while i <= n do
  local op, ver = ARGV[i], ARGV[i + 1]
  local a = i + 3
  local last = a + tonumber(ARGV[i + 2]) - 1
  if ver == '' or ver > pos then
    local r = 0
    cur = ver
    if op == 'h' then
      r = redis.pcall('HSET', ARGV[a], unpack(ARGV, a + 1, last))
      local e = failure(r)
      if e and string.sub(e, 1, 9) == 'WRONGTYPE' then
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
    elseif op == 'w' then
      watch(a)
    elseif op == 'u' then
      moves()
    elseif op == 'a' then
      add_views(a)
    else
      return redis.error_reply('ERR cdc slot batch: unknown operation ' .. tostring(op))
    end
    local e = failure(r)
    if e then
      failed[#failed + 1] = index
      failed[#failed + 1] = e
    end
    if ver > top then top = ver end
  end
  index = index + 1
  i = last + 1
end
if #failed == 0 then
  if top ~= pos then redis.call('HSET', FENCE, 'v', top) end
  for k = 1, #deltas, 4000 do
    redis.call('RPUSH', OUTBOX, unpack(deltas, k, math.min(k + 3999, #deltas)))
  end
end
-- The whole outbox, not only this run's deltas: a run retried after it applied (the
-- connection broke before its answer) skips its changes but must still deliver them.
local pending = {}
if redis.call('EXISTS', OUTBOX) == 1 then pending = redis.call('LRANGE', OUTBOX, 0, -1) end
return {'ok', incomplete, failed, repaired, pending, runs, changed}
"""
)
"""One slot's operations (the planner's codes, :data:`cdc.transform.script.BATCH_SCRIPT`,
each with its change's version; ``''``: a load or backfill write, always applied).
``p`` never carries a ``moved_from`` here (the sink deletes the old key in its own slot;
the patch then finds its kept fields missing and the row is fetched again); ``u``'s feed
entries are appended by the sink, this script answers an update's changed columns (``id
version names`` triplets); view changes become outbox deltas ``<kind><+|-> key member score``."""

VIEW_SCRIPT: Final = (
    b"""#!lua
-- View deltas for one slot. KEYS: fence, the view keys. ARGV[1]: the fence token, then
-- (op key member score) quadruples; op is <kind><+|-> followed by its change's version.
local head = redis.call('HMGET', KEYS[1], 'f', 'n', 'w')
if not head[1] then return {'lost'} end
if head[1] ~= ARGV[1] then return {'fenced'} end
redis.call('HINCRBY', KEYS[1], 'n', 1)
local runs = tonumber(head[2] or '0')
local seen = head[3] or ''
local top = seen
"""
    + LUA_VIEW_WRITE
    + b"""
-- The slot's delta version first: a run that fails part-way has applied some deltas.
for p = 2, #ARGV, 4 do
  local ver = string.sub(ARGV[p], 3)
  if ver > top then top = ver end
end
if top ~= seen then redis.call('HSET', KEYS[1], 'w', top) end
for p = 2, #ARGV, 4 do
  local op, key, member = string.sub(ARGV[p], 1, 2), ARGV[p + 1], ARGV[p + 2]
  local r
  if op == 'z+' then r = view_write('ZADD', key, ARGV[p + 3], member)
  elseif op == 's+' then r = view_write('SADD', key, member)
  elseif op == 'z-' then r = redis.pcall('ZREM', key, member)
  elseif op == 's-' then r = redis.pcall('SREM', key, member)
  end
  if type(r) == 'table' and r.err and string.sub(r.err, 1, 9) ~= 'WRONGTYPE' then
    return {'failed', r.err, runs}
  end
end
return {'ok', '', runs}
"""
)

TRUNCATE_SCRIPT: Final = b"""#!lua
-- TRUNCATE in one slot. KEYS: fence, the keys to remove. ARGV: fence token, version.
local head = redis.call('HMGET', KEYS[1], 'f', 'v', 'n', 'w')
if not head[1] then return {'lost'} end
if head[1] ~= ARGV[1] then return {'fenced'} end
local runs = tonumber(head[3] or '0')
redis.call('HINCRBY', KEYS[1], 'n', 1)
-- Past it (a row change or a view delta made after this TRUNCATE reached the slot): it
-- was applied here already, and what came after must stay (answered as -1). At it (the
-- slot's last change is this TRUNCATE): a key found now was missed by its scan.
if ARGV[2] ~= '' and ((head[2] or '') > ARGV[2] or (head[4] or '') > ARGV[2]) then
  return {'ok', -1, runs}
end
local n = 0
for k = 2, #KEYS, 500 do
  n = n + redis.call('UNLINK', unpack(KEYS, k, math.min(k + 499, #KEYS)))
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'v', ARGV[2]) end
return {'ok', n, runs}
"""

OUTBOX_TRIM_SCRIPT: Final = b"""#!lua
-- Drop the first ARGV[2] entries of a slot's outbox (delivered). KEYS: fence, outbox.
local f = redis.call('HGET', KEYS[1], 'f')
if not f then return {'lost'} end
if f ~= ARGV[1] then return {'fenced'} end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
return {'ok'}
"""

MOVE_READ_SCRIPT: Final = b"""#!lua
-- The kept fields of a key whose row moved, with its slot's run count.
-- KEYS: fence, the old key. ARGV: fence token, the field names.
local head = redis.call('HMGET', KEYS[1], 'f', 'n')
if not head[1] then return {'lost'} end
if head[1] ~= ARGV[1] then return {'fenced'} end
local r = redis.pcall('HMGET', KEYS[2], unpack(ARGV, 2))
if type(r) == 'table' and r.err then r = false end
return {'ok', tonumber(head[2] or '0'), r}
"""

SCRIPTS: Final = (
    ROW_SCRIPT,
    VIEW_SCRIPT,
    TRUNCATE_SCRIPT,
    OUTBOX_TRIM_SCRIPT,
    MOVE_READ_SCRIPT,
    BATCH_SCRIPT,
)
"""What the sink loads on every primary."""
