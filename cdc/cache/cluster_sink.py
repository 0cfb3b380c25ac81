"""The Redis Cluster sink: a batch applied slot by slot, versioned, checkpoint last.

Redis Cluster cannot run one script (or ``MULTI``) over keys of several hash slots, so the
single-node guarantee (a batch and its checkpoint in one atomic script) cannot hold. What
holds instead (contract 7.8), and how:

Phase 1, rows
    The batch's operations (the planner's, :mod:`cdc.transform.plan`) are split by the
    hash slot of the key each one writes; each slot's share runs as one
    :data:`~cdc.transform.cluster_script.ROW_SCRIPT`, with every key it touches declared,
    so redis-py routes it to the slot's primary and follows ``MOVED``/``ASK`` while slots
    move. All slots' scripts go out in one pipeline per primary, the primaries working in
    parallel. Each script checks the slot's fence (``cdc:fence:{<tag>}``, written for all
    16384 slots by the claim) and applies a change only if its version (commit LSN, place
    in the transaction) is newer than the slot's: replays never move a key back and never
    resurrect a deleted row (see :mod:`cdc.transform.cluster_script`).
Phase 2, views
    The row scripts return the view deltas of the rows they changed (also left in their
    slot's outbox); they are applied to the view keys' slots
    (:data:`~cdc.transform.cluster_script.VIEW_SCRIPT`), then the outboxes are deleted. A
    claim delivers outboxes a crash left behind.
Change feed
    With ``CDC_CHANGE_FEED``, the batch's entries are appended (``XADD``) after phase 2,
    in the batch's order: at least once, with ``lsn`` and ``seq`` (contract 6c).
Phase 3, checkpoint
    Only when every slot of the batch succeeded, ``cdc:state`` moves (the single-node
    batch script with no operations: fence and position checked, ``PUBLISH cdc:applied``).
    The pipeline confirms the LSN to PostgreSQL only after that, so an LSN is confirmed
    only once every primary applied everything before it.

``TRUNCATE`` is a barrier: what precedes it is applied first, then every primary is
scanned for the table's keys, removed per slot (versioned too).

A batch is applied whole in :meth:`ClusterSink.send` (the answer is then ready at once);
any failure raises, the session restarts from the checkpoint, and the versions make the
replay idempotent.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from hiredis import Reader, pack_command
from redis.cluster import RedisCluster

from cdc import failpoints
from cdc.cache.checkpoint import FORMAT_FIELD, FORMAT_VERSION, CacheState
from cdc.cache.sink import ApplyResult, InFlight, RedisSink, _refused, owner_label
from cdc.errors import ConfigError, Fenced, RedisLost, RedisUnavailable
from cdc.transform.cluster_script import (
    MOVE_READ_SCRIPT,
    OUTBOX_TRIM_SCRIPT,
    REPAIR_FIELD,
    ROW_SCRIPT,
    SCRIPTS,
    SHARDS_FIELD,
    SLOTS,
    TRUNCATE_SCRIPT,
    UNCOUNTED_FIELD,
    VIEW_SCRIPT,
    SlotLedger,
    fence_key,
    key_prefixes,
    key_slot,
    outbox_key,
    parse_slot_ranges,
    slot_ranges,
    version,
)
from cdc.transform.plan import CommandBatch
from cdc.transform.script import BATCH_SCRIPT
from schema.keys import REGISTRY_KEY, STATE_KEY, TABLES_FIELD, applied_message
from schema.lsn import parse_lsn
from schema.redis_url import RedisTarget, cluster_client, tls_problem

# Errors a retry clears (slot moving, failover in progress, script cache empty...).
_RETRY = (
    "TRYAGAIN",
    "ASK",
    "MOVED",
    "CLUSTERDOWN",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "READONLY",
    "NOSCRIPT",
    "OOM",
)
_ATTEMPTS = 80
# Scans of a TRUNCATE (see ClusterSink._truncate); the session restarts after that many.
_TRUNCATE_PASSES = 8
# Seconds between reads of the slot map while streaming (ClusterSink._refresh_topology).
_TOPOLOGY_EVERY = 1.0
# redis-py's own types for them (their text has lost the code: "The cluster is down").
_TRANSIENT_TYPES = (
    redis.exceptions.ClusterError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.AskError,
    redis.exceptions.MovedError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.OutOfMemoryError,
)


class _Group:
    """One slot's share of a batch: its script's arguments and keys."""

    __slots__ = ("args", "index", "keys")

    def __init__(self) -> None:
        self.args: list[bytes] = []
        self.keys: dict[bytes, None] = {}
        # Batch operation index of each slot operation (for incomplete/failed reports).
        self.index: list[int] = []

    def add(
        self, code: bytes, ver: bytes, args: Sequence[bytes], keys: Iterable[bytes], at: int
    ) -> None:
        self.args += (code, ver, b"%d" % len(args), *args)
        for key in keys:
            self.keys[key] = None
        self.index.append(at)


def parse_ops(buf: bytes | bytearray, count: int) -> list[tuple[bytes, list[bytes]]]:
    """The planner's operations back from their wire form (``<code> <n> <n args>``):
    ``count`` bulk strings (``CommandBatch.args``), parsed by hiredis as one array."""
    ops: list[tuple[bytes, list[bytes]]] = []
    if not count:
        return ops
    reader = Reader()
    reader.feed(b"*%d\r\n" % count)
    reader.feed(bytes(buf))
    flat: list[bytes] = reader.gets()
    i = 0
    end = len(flat)
    while i < end:
        n = int(flat[i + 1])
        ops.append((flat[i], flat[i + 2 : i + 2 + n]))
        i += 2 + n
    return ops


def cluster_problem(exc: BaseException) -> str | None:
    """What to fix when redis-py's cluster client failed for a configuration reason
    (exit 2, never retried): refused credentials, a command the user may not run, TLS.

    ``RedisCluster`` wraps what a node answered in ``RedisClusterException`` ("cannot be
    connected", "cluster mode is not enabled"), so the causes are searched. Redis' texts
    never hold the password; the URL is not repeated."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "without any password configured" in text:
            return (
                "REDIS_URL has a password but the Redis Cluster has none set for that user:"
                " remove it from REDIS_URL, or set one on every node (requirepass / ACL)"
            )
        if isinstance(current, redis.AuthenticationError) or text.startswith(
            ("WRONGPASS", "NOAUTH", "invalid username-password", "Authentication required")
        ):
            return "the Redis Cluster refused the credentials in REDIS_URL"
        if isinstance(current, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
            if text.count("'") < 2:  # a key or channel: no command named
                return (
                    "the Redis user lacks a permission on the Redis Cluster (NOPERM): grant"
                    ' it the daemon\'s keys and commands on every node (README "TLS and ACL")'
                )
            command = text.split("'")[1]
            return (
                f"the Redis user may not run {command.replace('|', ' ').upper()} on the Redis"
                f' Cluster: grant it +{command.lower()} on every node (README "TLS and ACL")'
            )
        current = current.__cause__ or current.__context__
    return tls_problem(exc)


class ClusterSink:
    """:class:`RedisSink`'s interface over a Redis Cluster (see the module's docstring).

    Not a subclass: ``RedisSink`` is compiled by mypyc, and an interpreted class cannot
    derive from a compiled one."""

    def __init__(
        self,
        url: str,
        timeout: float,
        min_replicas: int = 0,
        ledger: SlotLedger | None = None,
        state_key: str = STATE_KEY,
        mirrors: tuple[str, ...] = (),
    ) -> None:
        self.url = url
        # This daemon's state hash and tables, as for RedisSink (several daemons).
        self.state_key = state_key
        self.mirrors = mirrors
        self._fences, self._outboxes = key_prefixes(state_key)
        self.ledger = ledger if ledger is not None else SlotLedger()
        # Slots found to have lost writes at the claim (the daemon repairs them).
        self.lost: list[int] = []
        self._primaries: frozenset[str] = frozenset()
        self.timeout = timeout
        self.client: RedisCluster | None = None
        self.fence: str | None = None
        self.min_replicas = min_replicas
        # WAIT gives up a little before the socket's own timeout would fire (as RedisSink).
        self._wait_ms = max(1, int(timeout * 800))
        self._lsn = ""
        self._partial = ""
        self.publish_refused = False
        self._shas: dict[bytes, str] = {}
        self._results: dict[int, ApplyResult] = {}
        # Changed columns of updates, per slot, from the row scripts (for the feed).
        self._changed: dict[int, list[bytes]] = {}
        self.lost_slots = 0
        self._topology_at = 0.0

    # -- connection and state ----------------------------------------------------------------

    def connect(self) -> None:
        try:
            self.client = cluster_client(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
            self.client.ping()
            self.load_scripts()
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            if problem := cluster_problem(exc):
                raise ConfigError(problem) from None  # never retried (as RedisSink's)
            raise RedisUnavailable(f"cannot reach the Redis Cluster: {type(exc).__name__}") from exc

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def connected(self) -> bool:
        return self.client is not None

    def fileno(self) -> int:
        return -1

    def _redis(self) -> RedisCluster:
        if self.client is None:
            self.connect()
        assert self.client is not None
        return self.client

    def read_state(self, key: str | None = None) -> CacheState:
        """This daemon's state (``key``: another daemon's)."""
        reply = self._one("HGETALL", key if key is not None else self.state_key)
        if isinstance(reply, dict) and reply:
            return CacheState.from_hash(reply)
        if isinstance(reply, list) and reply:
            return CacheState.from_hash(dict(zip(reply[0::2], reply[1::2], strict=True)))
        return CacheState()

    def claim(self, fields: dict[str, str], *, record: bool = True) -> CacheState:
        """Take the fence of ``cdc:state`` and of every slot, deliver outboxes a crash
        left, and return the state. A slot whose fence key was gone lost its data: the
        state returned is then empty, so the daemon rebuilds."""
        token = uuid.uuid4().hex
        values = {"fence": token, **self._own_fields(record)}
        # The primaries before and after the counts: if they differ (a failover during
        # the claim), the counts prove nothing and the later ones are checked.
        before = self._shard_ids()
        fence, stamp = (
            _text(v or "") for v in self._one("HMGET", self.state_key, "fence", UNCOUNTED_FIELD)
        )
        trusted = self.ledger.trusts(fence, stamp, _layout(before)) and not self.ledger.unsure
        # From the first write on, a claim that does not finish leaves nothing trusted
        # (its counts may have reached some slots; a failover may bring back the fence).
        self.ledger.distrust()
        self._one("HSET", self.state_key, *_pairs({**values, **fields}))
        self._register(record)
        commands: list[tuple[Any, ...]] = []
        for s in range(SLOTS):
            commands.append(("HSET", fence_key(s, self._fences), "f", token))
            commands.append(("HINCRBY", fence_key(s, self._fences), "n", 1))
        replies = self._run(commands)
        self.fence = token
        missing = sum(1 for r in replies[0::2] if r == 1)
        counted = {s: int(c) for s, c in enumerate(replies[1::2])}
        found = {s: c - 1 for s, c in counted.items()}
        self.lost = self.ledger.lost(found)
        self.ledger.accept(found, counted)
        if failpoints.ACTIVE:
            failpoints.hit("cluster_counted")
        current = self._shard_ids()
        trusted = trusted and current == before
        self._primaries = self._primary_names()
        self.deliver_outboxes()
        if self.min_replicas:
            # What this session resumes from (and will confirm) must be on the replicas,
            # including batches a previous session applied but could not confirm.
            self._wait_replicas()
        state = self.read_state()
        self._follow(state.extra)
        self.lost_slots = missing
        if missing and state.lsn is not None and not state.loading:
            return CacheState()
        self._suspect(state, trusted, current)
        # Only now that what it found is recorded: a claim that failed before would
        # otherwise leave counts that hide its lost slots from the next one.
        self.ledger.trust(token, stamp, _layout(current))
        return state

    def _suspect(
        self,
        state: CacheState,
        counted: bool = False,
        current: dict[str, list[int]] | None = None,
    ) -> None:
        """Add to :attr:`lost` every slot whose primary is not one the state names (a
        replica was promoted, maybe without the latest writes, and the daemon whose slot
        counts would tell may have died since; ``counted``: this process's counts of
        every slot tell, see :class:`SlotLedger`) and the slots of a repair not finished;
        record them (``repair_slots``) and the primaries (``shards``) in the state
        before the repair starts, so a daemon dying during it leaves it to the next."""
        fields = self._suspect_fields(state, counted, current)
        self._one("HSET", self.state_key, *_pairs(fields))

    def _suspect_fields(
        self,
        state: CacheState,
        counted: bool = False,
        current: dict[str, list[int]] | None = None,
    ) -> dict[str, str]:
        """:meth:`_suspect`'s record, :attr:`lost` updated, not written (``current``:
        the primaries, when already read)."""
        if current is None:
            current = self._shard_ids()
        suspect = set(self.lost) | parse_slot_ranges(state.extra.get(REPAIR_FIELD, ""))
        recorded = state.extra.get(SHARDS_FIELD)
        if recorded and not counted:
            known = set(recorded.split(","))
            for identity, slots in current.items():
                if not _known(identity, known):
                    suspect.update(slots)
        self.lost = sorted(suspect)
        fields = {SHARDS_FIELD: ",".join(sorted(current))}
        if self.lost:
            fields[REPAIR_FIELD] = slot_ranges(self.lost)
        return fields

    def _shard_ids(self) -> dict[str, list[int]]:
        """Each primary's identity and the slots it serves: its node id (``CLUSTER
        MYID``: a promoted replica, unlike a restarted or resharded primary, has a new
        one) and, where the user may run ``INFO``, its replication id (new at every
        promotion, so a failback to the old primary is seen too)."""
        client = self._redis()
        by_name: dict[str, list[int]] = {}
        for slot, nodes in client.nodes_manager.slots_cache.items():
            by_name.setdefault(nodes[0].name, []).append(slot)
        out: dict[str, list[int]] = {}
        for node in client.get_primaries():  # type: ignore[no-untyped-call]
            connection = node.redis_connection
            try:
                identity = _text(connection.execute_command("CLUSTER", "MYID"))
            except (redis.RedisError, OSError) as exc:
                raise RedisUnavailable(
                    f"cannot ask {node.name} for its node id: {type(exc).__name__}"
                ) from exc
            try:
                replid = connection.info("replication").get("master_replid")
            except redis.ResponseError:  # NOPERM: INFO is not needed otherwise
                replid = None
            except (redis.RedisError, OSError) as exc:
                raise RedisUnavailable(
                    f"cannot ask {node.name} for its replication id: {type(exc).__name__}"
                ) from exc
            if replid:
                identity += "/" + _text(replid)
            out[identity] = by_name.get(node.name, [])
        return out

    def registry(self) -> dict[str, str]:
        """Which state mirrors each table (:data:`schema.keys.REGISTRY_KEY`)."""
        reply = self._one("HGETALL", REGISTRY_KEY)
        if isinstance(reply, dict):
            pairs = list(reply.items())
        elif isinstance(reply, list):
            pairs = list(zip(reply[0::2], reply[1::2], strict=True))
        else:
            return {}
        return {_text(k): _text(v) for k, v in pairs}

    def drop_state(self, key: str) -> None:
        """Delete another state hash (a former key of this daemon's slot)."""
        if key != self.state_key:
            self._one("DEL", key)

    def mark(self, fields: dict[str, str], *, record: bool = False) -> None:
        """Set ``fields`` in the state (ours: after the claim); ``record``: and record
        the mirrored tables (as :meth:`claim`)."""
        assert self.fence is not None
        self._one("HSET", self.state_key, *_pairs({**self._own_fields(record), **fields}))
        self._register(record)

    def _own_fields(self, record: bool = True) -> dict[str, str]:
        out = {"owner": owner_label(), FORMAT_FIELD: str(FORMAT_VERSION)}
        if record and self.mirrors:
            out[TABLES_FIELD] = ",".join(self.mirrors)
        return out

    def _register(self, record: bool = True) -> None:
        """Name this state as the one that mirrors our tables (readers' token waits),
        and drop the entries naming it for a table it no longer mirrors."""
        stale = [
            table
            for table, key in self.registry().items()
            if key == self.state_key and table not in self.mirrors
        ]
        if stale:
            self._one("HDEL", REGISTRY_KEY, *stale)
        if record and self.mirrors:
            args: list[str] = []
            for table in self.mirrors:
                args += [table, self.state_key]
            self._one("HSET", REGISTRY_KEY, *args)

    def reset_state(self, fields: dict[str, str]) -> None:
        """Replace the state hash, and start every slot's position afresh (a load or
        rebuild rewrites the keys); pending outboxes are dropped with the views."""
        assert self.fence is not None
        self.ledger.distrust()  # a load or rebuild writes and deletes keys unscripted
        # The end of a load (no "loading", no "rebuild" to come): what the load wrote
        # must still be there, so the primaries and fences are compared with the state
        # its start recorded; at the start of a load or rebuild every key is rewritten
        # after this, and the primaries are recorded afresh.
        settled = "loading" not in fields and "rebuild" not in fields
        if not settled:
            self.ledger.repaired()  # every key is rewritten: no slot is left to repair
        before = self.read_state() if settled else CacheState()
        commands: list[tuple[Any, ...]] = []
        for s in range(SLOTS):
            commands.append(("HDEL", fence_key(s, self._fences), "v", "w"))
            commands.append(("HSET", fence_key(s, self._fences), "f", self.fence))
        replies = self._run(commands)
        # A fence key created now was gone: its slot lost what the load wrote there.
        self.lost = [s for s in range(SLOTS) if settled and replies[2 * s + 1] == 1]
        # The new state and what it must repair in one write: a crash can leave the old
        # state (a load still to do) or none (a rebuild), never one that forgot a loss.
        record = self._suspect_fields(before)
        values = {"fence": self.fence, **self._own_fields()}
        self._one("DEL", self.state_key)
        self._one("HSET", self.state_key, *_pairs({**values, **fields, **record}))
        self._register()
        outboxes = list(self._redis().scan_iter(match=self._outboxes + "{*", count=1000))
        self._run([("DEL", key) for key in outboxes])
        self._follow(fields)

    def _follow(self, state: dict[str, str]) -> None:
        self._lsn = state.get("lsn", "")
        self._partial = state.get("partial", "")

    # -- applying ----------------------------------------------------------------------------

    def apply(self, batch: CommandBatch, state: dict[str, str]) -> ApplyResult:
        """Apply ``batch`` and set ``state`` (done when this returns)."""
        return self.receive(self.send(batch, state))

    def send(self, batch: CommandBatch, state: dict[str, str]) -> InFlight:
        """Apply ``batch`` slot by slot, then ``state``: done when this returns."""
        assert self.fence is not None
        incomplete: list[int] = []
        repaired = 0
        groups: dict[int, _Group] = {}
        # While a primary key change is applied (see _moves): the old key's slot's share,
        # run after the rest of the change, and the index the change ends at.
        after: dict[int, _Group] = {}
        old_slot = -1
        split_end = -1
        marks = batch.marks
        mark_at = 0
        ver = b""
        last_row_slot = -1
        watching: dict[int, None] = {}
        # Change feed entries (XADD arguments), in the batch's order, and for each update
        # entry the slot whose script reports its changed columns.
        feed: list[tuple[list[bytes], int, bytes]] = []
        diff_slot = -1
        diff_columns = b""
        ops = parse_ops(batch.buf, batch.args)
        moves = _moves(ops, marks)
        gone: dict[int, bytes] = {}  # a move written whole: the old key to delete

        def group(slot: int) -> _Group:
            target = after if slot == old_slot else groups
            found = target.get(slot)
            if found is None:
                found = target[slot] = _Group()
            return found

        def flush(parts: dict[int, _Group]) -> None:
            nonlocal repaired, incomplete
            r, i = self._apply_rows(batch, parts)
            repaired += r
            incomplete += i

        for index in range(len(ops)):
            if index == split_end:
                flush(groups)
                flush(after)
                groups, after, old_slot, split_end = {}, {}, -1, -1
            if index in moves:
                # A primary key change whose row kept an unchanged large column: what
                # came before is applied, the old key's kept values are read, the new
                # key is written whole, and only then the old key goes (so a crash
                # anywhere leaves the row's values in one of the two keys).
                flush(groups)
                groups = {}
                at, split_end = moves[index]
                old_key = ops[at][1][1]
                old_slot = key_slot(old_key)
                ops[at] = self._complete_move(ops[at][1])
                if ops[at][0] == b"r":
                    gone[at] = old_key
            # Read after the move's rewrite: the patch itself when its change starts with it.
            code, args = ops[index]
            while mark_at < len(marks) and marks[mark_at][0] <= index:
                _, commit, seq = marks[mark_at]
                ver = version(parse_lsn(commit), seq) if commit else b""
                mark_at += 1
            if code == b"t":
                flush(groups)
                groups = {}
                self._truncate(args, ver)
                continue
            if code in (b"h", b"r", b"s"):
                if index in gone:
                    old = gone[index]
                    group(key_slot(old)).add(b"d", ver, [old], [old], index)
                slot = key_slot(args[0])
                group(slot).add(code, ver, args, args[:1], index)
                if code != b"s":
                    last_row_slot = slot
            elif code == b"d":
                for key in args:
                    group(key_slot(key)).add(code, ver, [key], [key], index)
            elif code == b"p":
                key, moved_from = args[0], args[1]
                if moved_from:
                    # The old key's kept values could not be read (it is gone): it goes,
                    # the patch finds its kept fields missing and the row is fetched again.
                    group(key_slot(moved_from)).add(b"d", ver, [moved_from], [moved_from], index)
                patch = [key, b"", *args[2:]] if moved_from else args
                slot = key_slot(key)
                group(slot).add(code, ver, patch, [key], index)
                last_row_slot = slot
            elif code == b"w":
                slot = key_slot(args[1])
                group(slot).add(code, ver, args, args[1:2], index)
                watching[slot] = None
                ncols = int(args[2])
                if ncols:
                    diff_slot = slot
                    diff_columns = b",".join(args[3 : 3 + ncols])
            elif code == b"u":
                for slot in watching:
                    group(slot).add(code, ver, [], [], index)
                watching = {}
                for f in range(0, len(args), 7):
                    stream, maxlen, op, row_id, commit_lsn, place, cols = args[f : f + 7]
                    update = op == b"update"
                    entry = [stream, b"MAXLEN", b"~", maxlen, b"*", b"op", op, b"id", row_id]
                    entry += [
                        b"lsn",
                        commit_lsn,
                        b"seq",
                        place,
                        b"columns",
                        diff_columns if update else cols,
                    ]
                    feed.append((entry, diff_slot if update else -1, ver))
                diff_slot = -1
            elif code == b"a":
                if last_row_slot >= 0:
                    group(last_row_slot).add(code, ver, args, [], index)
            else:
                raise RedisUnavailable(f"cluster mode cannot apply operation {code!r}")
        flush(groups)
        flush(after)
        if feed:
            self._append_feed(feed)
        self._refresh_topology()
        if self._primary_names() != self._primaries:
            # A failover: the promoted replica may lack writes. A new session's claim
            # finds which slots (their counts) and repairs them before going on.
            raise RedisLost("the Redis Cluster's primaries changed (a failover)")
        if failpoints.ACTIVE:
            failpoints.hit("cluster_checkpoint")
        lsn = state.get("lsn")
        self._checkpoint(state, lsn)
        if self.min_replicas:
            self._wait_replicas()
        if lsn is not None:
            self._lsn = lsn
        if "partial" in state:
            self._partial = state["partial"]
        handle = InFlight(batch, lsn or self._lsn)
        wanted = set(incomplete)
        handle_result = ApplyResult(
            [(t, row_id) for at, t, row_id in batch.patches if at in wanted], repaired
        )
        self._results[id(handle)] = handle_result
        return handle

    def ready(self, sent: InFlight) -> bool:
        return True

    def buffered(self, sent: InFlight) -> bool:
        return True

    def receive(self, sent: InFlight) -> ApplyResult:
        return self._results.pop(id(sent), ApplyResult([]))

    # -- phases -------------------------------------------------------------------------------

    def _apply_rows(self, batch: CommandBatch, groups: dict[int, _Group]) -> tuple[int, list[int]]:
        """Phase 1 and 2 for ``groups``: (keys repaired, batch indexes found incomplete)."""
        if not groups:
            return 0, []
        assert self.fence is not None
        slots = list(groups)
        commands: list[tuple[Any, ...]] = []
        for slot in slots:
            g = groups[slot]
            keys = [
                fence_key(slot, self._fences).encode(),
                outbox_key(slot, self._outboxes).encode(),
                *g.keys,
            ]
            commands.append((ROW_SCRIPT, len(keys), *keys, self.fence, *g.args))
        replies = self._counted(slots, commands, 5)
        repaired = 0
        incomplete: list[int] = []
        deltas: list[bytes] = []
        outboxes: dict[int, int] = {}
        for slot, reply in zip(slots, replies, strict=True):
            g = groups[slot]
            _status(reply)
            if reply[2]:
                at = g.index[int(reply[2][0])]
                raise _refused(reply[2][1].decode(errors="replace"), batch.table_of(at), self._lsn)
            if reply[6]:
                self._changed.setdefault(slot, []).extend(reply[6])
            incomplete += [g.index[int(k)] for k in reply[1]]
            repaired += int(reply[3])
            if reply[4]:
                deltas += reply[4]
                outboxes[slot] = len(reply[4])
        if deltas:
            self.apply_deltas(deltas)
            self._trim_outboxes(outboxes)
        return repaired, incomplete

    def _complete_move(self, args: list[bytes]) -> tuple[bytes, list[bytes]]:
        """A primary key change's patch (``p``, old key in ``args[1]``) as a whole write
        (``r``) of the new key, with the unchanged columns' values read from the old key;
        the patch itself when the old key does not hold them all (then it is fetched)."""
        nset = int(args[2])
        set_pairs = args[3 : 3 + 2 * nset]
        j = 3 + 2 * nset
        j += 1 + int(args[j])
        kept = args[j + 1 : j + 1 + int(args[j])]
        if not kept:
            return b"p", args
        assert self.fence is not None
        old = args[1]
        slot = key_slot(old)
        # The old slot's run count, read with the values: a slot that went back in time (a
        # failover) must not hand its stale values to a key in a slot no repair covers.
        (reply,) = self._scripts(
            [(MOVE_READ_SCRIPT, 2, fence_key(slot, self._fences), old, self.fence, *kept)]
        )
        _status(reply)
        if int(reply[1]) < self.ledger.runs.get(slot, 0):
            raise RedisLost(f"hash slot {slot} lost writes (a primary failed over)")
        if self._primary_names() != self._primaries:
            raise RedisLost("the Redis Cluster's primaries changed (a failover)")
        values = reply[2]
        if not isinstance(values, list) or any(v is None for v in values):
            return b"p", args  # gone, incomplete or not a hash: the patch path fetches it
        whole = [args[0], *set_pairs]
        for name, value in zip(kept, values, strict=True):
            whole += [name, value]
        return b"r", whole

    def _append_feed(self, feed: list[tuple[list[bytes], int, bytes]]) -> None:
        """Phase 2b: the change feed entries (contract 6c), in the batch's order per stream.

        At least once: a batch applied again after a crash (its rows skipped by their
        versions) appends its entries again, with the same ``lsn`` and ``seq``. An
        update's ``columns`` are the ones its slot's script found changed (matched by
        the change's version); for an update that script skipped (already applied),
        every cached column."""
        changed: dict[tuple[int, bytes, bytes], bytes] = {}
        for slot, found in self._changed.items():
            for k in range(0, len(found), 3):
                changed[(slot, found[k], found[k + 1])] = found[k + 2]
        self._changed = {}
        commands: list[tuple[Any, ...]] = []
        for entry, slot, ver in feed:
            if slot >= 0:
                names = changed.get((slot, entry[8], ver))
                if names is not None:
                    entry[-1] = names
            commands.append(("XADD", *entry))
        self._run(commands)

    def apply_deltas(self, deltas: list[bytes]) -> None:
        """Phase 2: view deltas (op key member score ...) applied in order per key."""
        assert self.fence is not None
        groups: dict[int, tuple[dict[bytes, None], list[bytes]]] = {}
        for k in range(0, len(deltas), 4):
            key = deltas[k + 1]
            keys, args = groups.setdefault(key_slot(key), ({}, []))
            keys[key] = None
            args += deltas[k : k + 4]
        commands: list[tuple[Any, ...]] = []
        for slot, (keys, args) in groups.items():
            commands.append(
                (
                    VIEW_SCRIPT,
                    1 + len(keys),
                    fence_key(slot, self._fences),
                    *keys,
                    self.fence,
                    *args,
                )
            )
        for reply in self._counted(list(groups), commands, 2):
            _status(reply)
            if reply[0] == b"failed":
                raise _refused(reply[1].decode(errors="replace"), "", self._lsn)

    def deliver_outboxes(self) -> int:
        """Apply the view deltas a crash left in outboxes, then drop them."""
        client = self._redis()
        keys = list(client.scan_iter(match=self._outboxes + "{*", count=1000))
        deltas: list[bytes] = []
        delivered: dict[int, int] = {}
        for key in keys:
            found = self._run([("LRANGE", key, 0, -1)])[0]
            deltas += found
            delivered[key_slot(key)] = len(found)
        if deltas:
            self.apply_deltas(deltas)
        self._trim_outboxes(delivered)
        return len(keys)

    def _trim_outboxes(self, delivered: dict[int, int]) -> None:
        """Drop from each slot's outbox the entries delivered, only while this daemon
        holds the slot's fence: a daemon taken over must not drop its successor's."""
        assert self.fence is not None
        commands: list[tuple[Any, ...]] = [
            (
                OUTBOX_TRIM_SCRIPT,
                2,
                fence_key(slot, self._fences),
                outbox_key(slot, self._outboxes),
                self.fence,
                count,
            )
            for slot, count in delivered.items()
        ]
        for reply in self._scripts(commands):
            _status(reply)

    def _truncate(self, patterns: list[bytes], ver: bytes) -> None:
        """Remove every key matching ``patterns`` on every primary, per slot.

        The primaries are scanned one after another, so a key a reshard moves from a
        primary not scanned yet to one scanned already is missed: the scan is repeated
        until it finds nothing left (no key can be new: what follows the TRUNCATE is
        applied after it), leaving out the slots whose script found the TRUNCATE
        applied already (a replay: their keys are later changes)."""
        assert self.fence is not None
        client = self._redis()
        past: set[int] = set()
        for _ in range(_TRUNCATE_PASSES):
            by_slot: dict[int, list[bytes]] = {}
            try:
                for pattern in patterns:
                    for key in client.scan_iter(match=pattern, count=1000):
                        slot = key_slot(key)
                        if slot not in past:
                            by_slot.setdefault(slot, []).append(key)
            except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
                raise RedisUnavailable(f"Redis Cluster scan failed: {type(exc).__name__}") from exc
            if not by_slot:
                return
            commands: list[tuple[Any, ...]] = []
            for slot, keys in by_slot.items():
                commands.append(
                    (
                        TRUNCATE_SCRIPT,
                        1 + len(keys),
                        fence_key(slot, self._fences),
                        *keys,
                        self.fence,
                        ver,
                    )
                )
            replies = self._counted(list(by_slot), commands, 2)
            for slot, reply in zip(by_slot, replies, strict=True):
                _status(reply)
                if int(reply[1]) < 0:
                    past.add(slot)
        raise RedisUnavailable("TRUNCATE: keys kept appearing while the cluster resharded")

    def _checkpoint(self, state: dict[str, str], lsn: str | None) -> None:
        """Phase 3: the state hash, fenced and positioned (BATCH_SCRIPT without operations)."""
        assert self.fence is not None
        message = applied_message(self.state_key, lsn) if lsn is not None else ""
        args: list[Any] = [self.fence, self._lsn, self._partial, message, len(state)]
        for key, value in state.items():
            args += [key, value]
        (reply,) = self._scripts([(BATCH_SCRIPT, 1, self.state_key, *args)])
        status = reply[0]
        if status == b"lost":
            raise RedisLost("cdc:state is gone: Redis lost its data")
        if status == b"fenced":
            raise Fenced("another daemon took over the cache (fence changed)")
        if status == b"moved":
            raise RedisLost(
                "cdc:state is not at the position this daemon left it (an earlier batch "
                "was not applied, or something else wrote the state)"
            )
        if not reply[4]:
            self.publish_refused = True

    # -- plumbing -------------------------------------------------------------------------------

    def _wait_replicas(self) -> None:
        """``CDC_REDIS_MIN_REPLICAS`` in cluster mode: on every primary, one write
        (``HSET`` of the fence key of a slot it serves) and ``WAIT n`` on the same
        connection. A primary's replication stream is one sequence, so ``WAIT`` after the
        connection's last write returns once the replicas have everything the primary
        had before it, whichever connection wrote it: the batch and all before it. Too
        few replicas: the batch stays applied but is not confirmed (the session restarts
        and the next claim waits again), as on one node."""
        client = self._redis()
        owner: dict[str, int] = {}
        for slot, nodes in client.nodes_manager.slots_cache.items():
            owner.setdefault(nodes[0].name, slot)
        wait = (b"WAIT", str(self.min_replicas).encode(), str(self._wait_ms).encode())
        sent: list[tuple[Any, Any, str]] = []
        try:
            for node in client.get_primaries():  # type: ignore[no-untyped-call]
                if node.name not in owner:
                    continue
                pool = node.redis_connection.connection_pool
                conn = pool.get_connection()
                sent.append((pool, conn, node.name))
                mark = ("HSET", fence_key(owner[node.name], self._fences), "ack", "1")
                conn.send_packed_command([_pack([mark, wait])], False)
            short: list[str] = []
            for _, conn, name in sent:
                conn.read_response()
                acked = conn.read_response()
                if int(acked) < self.min_replicas:
                    short.append(f"{name}: {int(acked)}")
        except (redis.RedisError, OSError, ValueError) as exc:
            for _, conn, _ in sent:
                conn.disconnect()
            raise RedisUnavailable(
                f"WAIT for replicas failed (CDC_REDIS_MIN_REPLICAS): {type(exc).__name__}"
            ) from exc
        finally:
            for pool, conn, _ in sent:
                pool.release(conn)
        if short:
            raise RedisUnavailable(
                f"only some Redis replicas acknowledged within {self._wait_ms} ms"
                f" (CDC_REDIS_MIN_REPLICAS={self.min_replicas}; {', '.join(short)});"
                " not confirming, retrying"
            )

    def _refresh_topology(self) -> None:
        """Read the slot map again at most every :data:`_TOPOLOGY_EVERY` seconds: redis-py
        reads it only when a command meets ``MOVED`` or a dead node, so a failover of a
        primary no batch writes to would go unseen (and its lost writes unrepaired)."""
        now = time.monotonic()
        if now < self._topology_at:
            return
        self._topology_at = now + _TOPOLOGY_EVERY
        with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException):
            self._redis().nodes_manager.initialize(disconnect_startup_nodes_pools=False)
            if self.ledger.token is not None:
                # Slots that moved between primaries (even out and back by the next
                # claim): MIGRATE wrote their keys unscripted.
                by_name: dict[str, list[int]] = {}
                for slot, nodes in self._redis().nodes_manager.slots_cache.items():
                    by_name.setdefault(nodes[0].name, []).append(slot)
                if frozenset(slot_ranges(sorted(v)) for v in by_name.values()) != (
                    self.ledger.layout
                ):
                    self.ledger.distrust()

    def _primary_names(self) -> frozenset[str]:
        client = self._redis()
        return frozenset(node.name for node in client.get_primaries())  # type: ignore[no-untyped-call]

    def _sha(self, script: bytes) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = hashlib.sha1(script).hexdigest()  # noqa: S324 - Redis' script id
            self._shas[script] = sha
        return sha

    def _counted(self, slots: list[int], commands: list[tuple[Any, ...]], at: int) -> list[Any]:
        """Run scripts that count in their slot's ``n`` (``slots[k]`` is the slot of
        ``commands[k]``; a reply's ``at`` is the count it found) and note every count in
        the ledger before anything raises: a script that ran but went unnoted would hide
        a lost one from the next claim. Until noted, a slot is ``unsure``: if the call
        fails, the next claim does not trust the counts."""
        self.ledger.unsure.update(slots)
        replies = self._scripts(commands)
        lost = -1
        for slot, reply in zip(slots, replies, strict=True):
            counted = isinstance(reply, list) and len(reply) > at
            if counted and not self.ledger.note(slot, int(reply[at])) and lost < 0:
                lost = slot
            self.ledger.unsure.discard(slot)  # noted, or it did nothing (lost, fenced)
        if lost >= 0:
            raise RedisLost(f"hash slot {lost} lost writes (a primary failed over)")
        return replies

    def _scripts(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run scripts (``(script, numkeys, keys..., args...)``) by ``EVALSHA``, loading
        them where a node does not have them."""
        shaped = [("EVALSHA", self._sha(c[0]), *c[1:]) for c in commands]
        return self._run(shaped, scripts=[c[0] for c in commands])

    def _run(
        self,
        commands: list[tuple[Any, ...]],
        scripts: list[bytes] | None = None,
        reload: bool = True,
    ) -> list[Any]:
        """Each command to its slot's primary: one pipeline per primary, written to all of
        them before any answer is read, so they work in parallel. A command that fails for
        a retryable reason (slot moved, node down, script not loaded) is retried alone
        through redis-py's cluster client, which follows MOVED/ASK and refreshes the map."""
        if not commands:
            return []
        client = self._redis()
        results: list[Any] = [_PENDING] * len(commands)
        by_node: dict[str, tuple[Any, list[int]]] = {}
        try:
            manager = client.nodes_manager
            for k, command in enumerate(commands):
                node = manager.get_node_from_slot(_slot_of(command))
                by_node.setdefault(node.name, (node, []))[1].append(k)
        except (redis.RedisError, redis.exceptions.RedisClusterException, KeyError) as exc:
            by_node = {}
            results = [exc] * len(commands)
        sent: list[tuple[Any, Any, list[int]]] = []
        for node, ks in by_node.values():
            pool = node.redis_connection.connection_pool
            conn = None
            try:
                conn = pool.get_connection()
                conn.send_packed_command([_pack([commands[k] for k in ks])], False)
                sent.append((pool, conn, ks))
            except (redis.RedisError, OSError) as exc:
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
                for k in ks:
                    results[k] = exc
        for pool, conn, ks in sent:
            try:
                for k in ks:
                    try:
                        results[k] = conn.read_response()
                    except redis.ResponseError as exc:
                        results[k] = exc
            except (redis.RedisError, OSError) as exc:
                conn.disconnect()
                for k in ks:
                    if results[k] is _PENDING:
                        results[k] = exc
            finally:
                pool.release(conn)
        if scripts and reload:
            missing = [k for k, r in enumerate(results) if _no_script(r)]
            if missing:
                self.load_scripts()
                again = self._run(
                    [commands[k] for k in missing], [scripts[k] for k in missing], False
                )
                for k, result in zip(missing, again, strict=True):
                    results[k] = result
        for k, result in enumerate(results):
            if isinstance(result, Exception):
                results[k] = self._retry(commands[k], scripts[k] if scripts else None, result)
        return results

    def load_scripts(self) -> None:
        """Load the scripts on every primary (``EVALSHA`` then finds them)."""
        client = self._redis()
        for node in client.get_primaries():  # type: ignore[no-untyped-call]
            for script in SCRIPTS:
                with contextlib.suppress(redis.RedisError, OSError):
                    node.redis_connection.script_load(script)

    def _retry(self, command: tuple[Any, ...], script: bytes | None, error: Exception) -> Any:
        client = self._redis()
        for attempt in range(_ATTEMPTS):
            text = str(error)
            if isinstance(error, redis.exceptions.NoScriptError) or text.startswith("NOSCRIPT"):
                if script is not None:
                    command = ("EVAL", script, *command[2:])
            elif (
                isinstance(error, redis.ResponseError)
                and not isinstance(error, _TRANSIENT_TYPES)
                and not text.startswith(_RETRY)
            ):
                raise _refused(text, "", self._lsn)
            if attempt:
                time.sleep(min(0.5, 0.02 * attempt))
            try:
                return client.execute_command(*command)  # type: ignore[no-untyped-call]
            except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
                error = exc
        raise RedisUnavailable(f"Redis Cluster kept failing: {type(error).__name__}: {error}")

    def _one(self, *command: Any) -> Any:
        return self._run([command])[0]


_PENDING: Any = object()


def _pack(commands: list[tuple[Any, ...]]) -> bytes:
    """The commands in wire form (hiredis' packer: redis-py's was the hot spot)."""
    return b"".join([pack_command(command) for command in commands])


def _slot_of(command: tuple[Any, ...]) -> int:
    """The slot of a command's (first) key: all of a command's keys share it."""
    key = command[3] if command[0] in ("EVALSHA", "EVAL") else command[1]
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


def _no_script(result: Any) -> bool:
    return isinstance(result, redis.exceptions.NoScriptError) or (
        isinstance(result, redis.ResponseError) and str(result).startswith("NOSCRIPT")
    )


def _moves(
    ops: list[tuple[bytes, list[bytes]]], marks: list[tuple[int, bytes, int]]
) -> dict[int, tuple[int, int]]:
    """The primary key changes with kept (unchanged) columns: for each, the index its
    change starts at -> (the patch's index, the index the change ends before)."""
    starts = sorted(m[0] for m in marks)
    out: dict[int, tuple[int, int]] = {}
    for at, (code, args) in enumerate(ops):
        if code == b"p" and args[1]:
            k = bisect.bisect_right(starts, at)
            first = starts[k - 1] if k else 0
            end = starts[k] if k < len(starts) else len(ops)
            out[first] = (at, end)
    return out


def _layout(shards: dict[str, list[int]]) -> frozenset[str]:
    """Which slots are served together (by one primary, whichever it is)."""
    return frozenset(slot_ranges(sorted(slots)) for slots in shards.values())


def _known(identity: str, known: set[str]) -> bool:
    """Whether a primary (``<node id>/<replication id>``, or the node id alone where
    ``INFO`` is refused) is one recorded: by both ids, or by the node id where either
    side has it alone (a state recorded before replication ids, or ``INFO`` refused)."""
    if identity in known:
        return True
    node_id, _, replid = identity.partition("/")
    return node_id in known or (not replid and any(k.partition("/")[0] == node_id for k in known))


def _pairs(values: dict[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += [key, value]
    return out


def _status(reply: Any) -> None:
    status = reply[0]
    if status == b"lost":
        raise RedisLost("a slot's fence key is gone: that shard lost its data")
    if status == b"fenced":
        raise Fenced("another daemon took over the cache (a slot's fence changed)")


# Either sink: the daemon, the snapshot load and ``cdc slot reset`` take both.
AnySink = RedisSink | ClusterSink


def make_sink(
    url: str,
    timeout: float,
    min_replicas: int = 0,
    ledger: SlotLedger | None = None,
    *,
    state_key: str = STATE_KEY,
    mirrors: tuple[str, ...] = (),
) -> AnySink:
    """The sink for ``url``: :class:`ClusterSink` for a ``redis+cluster://`` URL."""
    if RedisTarget.parse(url).cluster:
        return ClusterSink(url, timeout, min_replicas, ledger, state_key, mirrors)
    return RedisSink(url, timeout, min_replicas, state_key=state_key, mirrors=mirrors)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
