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

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from hiredis import Reader, pack_command
from redis.cluster import RedisCluster

from cdc.cache.checkpoint import FORMAT_FIELD, FORMAT_VERSION, CacheState
from cdc.cache.sink import ApplyResult, InFlight, RedisSink, _refused, owner_label
from cdc.errors import ConfigError, Fenced, RedisLost, RedisUnavailable
from cdc.transform.cluster_script import (
    ROW_SCRIPT,
    SLOTS,
    TRUNCATE_SCRIPT,
    VIEW_SCRIPT,
    SlotLedger,
    fence_key,
    key_prefixes,
    key_slot,
    outbox_key,
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
        self.min_replicas = 0
        self._lsn = ""
        self._partial = ""
        self.publish_refused = False
        self._shas: dict[bytes, str] = {}
        self._results: dict[int, ApplyResult] = {}
        # Changed columns of updates, per slot, from the row scripts (for the feed).
        self._changed: dict[int, list[bytes]] = {}
        self.lost_slots = 0

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
        self._one("HSET", self.state_key, *_pairs({**values, **fields}))
        self._register(record)
        added = self._run([("HSET", fence_key(s, self._fences), "f", token) for s in range(SLOTS)])
        self.fence = token
        missing = sum(1 for r in added if r == 1)
        self.lost = []
        if self.ledger.runs:
            slots = sorted(self.ledger.runs)
            counts = self._run([("HGET", fence_key(s, self._fences), "n") for s in slots])
            found = {s: int(c or 0) for s, c in zip(slots, counts, strict=True)}
            self.lost = self.ledger.lost(found)
            self.ledger.accept(found)
        self._primaries = self._primary_names()
        self.deliver_outboxes()
        state = self.read_state()
        self._follow(state.extra)
        self.lost_slots = missing
        if missing and state.lsn is not None and not state.loading:
            return CacheState()
        return state

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
        values = {"fence": self.fence, **self._own_fields()}
        self._one("DEL", self.state_key)
        self._one("HSET", self.state_key, *_pairs({**values, **fields}))
        self._register()
        commands: list[tuple[Any, ...]] = []
        for s in range(SLOTS):
            commands.append(("HDEL", fence_key(s, self._fences), "v"))
            commands.append(("HSET", fence_key(s, self._fences), "f", self.fence))
        self._run(commands)
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
        marks = batch.marks
        mark_at = 0
        ver = b""
        last_row_slot = -1
        watching: dict[int, None] = {}
        # Change feed entries (XADD arguments), in the batch's order, and for each update
        # entry the slot whose script reports its changed columns.
        feed: list[tuple[list[bytes], int]] = []
        diff_slot = -1
        diff_columns = b""
        for index, (code, args) in enumerate(parse_ops(batch.buf, batch.args)):
            while mark_at < len(marks) and marks[mark_at][0] <= index:
                _, commit, seq = marks[mark_at]
                ver = version(parse_lsn(commit), seq) if commit else b""
                mark_at += 1
            if code == b"t":
                r, i = self._apply_rows(batch, groups)
                repaired += r
                incomplete += i
                groups = {}
                self._truncate(args, ver)
                continue
            if code in (b"h", b"r", b"s"):
                slot = key_slot(args[0])
                groups.setdefault(slot, _Group()).add(code, ver, args, args[:1], index)
                if code != b"s":
                    last_row_slot = slot
            elif code == b"d":
                for key in args:
                    slot = key_slot(key)
                    groups.setdefault(slot, _Group()).add(code, ver, [key], [key], index)
            elif code == b"p":
                key, moved_from = args[0], args[1]
                if moved_from:
                    # The old key is in another slot: it goes; the patch then finds its
                    # kept fields missing and the row is fetched again.
                    old = key_slot(moved_from)
                    groups.setdefault(old, _Group()).add(
                        b"d", ver, [moved_from], [moved_from], index
                    )
                patch = [key, b"", *args[2:]] if moved_from else args
                slot = key_slot(key)
                groups.setdefault(slot, _Group()).add(code, ver, patch, [key], index)
                last_row_slot = slot
            elif code == b"w":
                slot = key_slot(args[1])
                groups.setdefault(slot, _Group()).add(code, ver, args, args[1:2], index)
                watching[slot] = None
                ncols = int(args[2])
                if ncols:
                    diff_slot = slot
                    diff_columns = b",".join(args[3 : 3 + ncols])
            elif code == b"u":
                for slot in watching:
                    groups.setdefault(slot, _Group()).add(code, ver, [], [], index)
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
                    feed.append((entry, diff_slot if update else -1))
                diff_slot = -1
            elif code == b"a":
                if last_row_slot >= 0:
                    groups.setdefault(last_row_slot, _Group()).add(code, ver, args, [], index)
            else:
                raise RedisUnavailable(f"cluster mode cannot apply operation {code!r}")
        r, i = self._apply_rows(batch, groups)
        repaired += r
        incomplete += i
        if feed:
            self._append_feed(feed)
        if self._primary_names() != self._primaries:
            # A failover: the promoted replica may lack writes. A new session's claim
            # finds which slots (their counts) and repairs them before going on.
            raise RedisLost("the Redis Cluster's primaries changed (a failover)")
        lsn = state.get("lsn")
        self._checkpoint(state, lsn)
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
        replies = self._scripts(commands)
        repaired = 0
        incomplete: list[int] = []
        deltas: list[bytes] = []
        outboxes: list[int] = []
        for slot, reply in zip(slots, replies, strict=True):
            g = groups[slot]
            _status(reply)
            if reply[2]:
                at = g.index[int(reply[2][0])]
                raise _refused(reply[2][1].decode(errors="replace"), batch.table_of(at), self._lsn)
            if not self.ledger.note(slot, int(reply[5])):
                raise RedisLost(f"hash slot {slot} lost writes (a primary failed over)")
            if reply[6]:
                self._changed.setdefault(slot, []).extend(reply[6])
            incomplete += [g.index[int(k)] for k in reply[1]]
            repaired += int(reply[3])
            if reply[4]:
                deltas += reply[4]
                outboxes.append(slot)
        if deltas:
            self.apply_deltas(deltas)
            self._run([("DEL", outbox_key(slot, self._outboxes)) for slot in outboxes])
        return repaired, incomplete

    def _append_feed(self, feed: list[tuple[list[bytes], int]]) -> None:
        """Phase 2b: the change feed entries (contract 6c), in the batch's order per stream.

        At least once: a batch applied again after a crash (its rows skipped by their
        versions) appends its entries again, with the same ``lsn`` and ``seq``. An
        update's ``columns`` are the ones its slot's script found changed; for an update
        that script skipped (already applied), every cached column."""
        changed: dict[tuple[int, bytes], list[bytes]] = {}
        for slot, pairs in self._changed.items():
            for k in range(0, len(pairs), 2):
                changed.setdefault((slot, pairs[k]), []).append(pairs[k + 1])
        self._changed = {}
        commands: list[tuple[Any, ...]] = []
        for entry, slot in feed:
            if slot >= 0:
                found = changed.get((slot, entry[8]))
                if found:
                    entry[-1] = found.pop(0)
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
        for slot, reply in zip(groups, self._scripts(commands), strict=True):
            _status(reply)
            if not self.ledger.note(slot, int(reply[2])):
                raise RedisLost(f"hash slot {slot} lost writes (a primary failed over)")
            if reply[0] == b"failed":
                raise _refused(reply[1].decode(errors="replace"), "", self._lsn)

    def deliver_outboxes(self) -> int:
        """Apply the view deltas a crash left in outboxes, then drop them."""
        client = self._redis()
        keys = list(client.scan_iter(match=self._outboxes + "{*", count=1000))
        deltas: list[bytes] = []
        for key in keys:
            deltas += self._run([("LRANGE", key, 0, -1)])[0]
        if deltas:
            self.apply_deltas(deltas)
        if keys:
            self._run([("DEL", key) for key in keys])
        return len(keys)

    def _truncate(self, patterns: list[bytes], ver: bytes) -> None:
        """Remove every key matching ``patterns`` on every primary, per slot."""
        assert self.fence is not None
        client = self._redis()
        by_slot: dict[int, list[bytes]] = {}
        try:
            for pattern in patterns:
                for key in client.scan_iter(match=pattern, count=1000):
                    by_slot.setdefault(key_slot(key), []).append(key)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise RedisUnavailable(f"Redis Cluster scan failed: {type(exc).__name__}") from exc
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
        for slot, reply in zip(by_slot, self._scripts(commands), strict=True):
            _status(reply)
            if not self.ledger.note(slot, int(reply[2])):
                raise RedisLost(f"hash slot {slot} lost writes (a primary failed over)")

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

    def _primary_names(self) -> frozenset[str]:
        client = self._redis()
        return frozenset(node.name for node in client.get_primaries())  # type: ignore[no-untyped-call]

    def _sha(self, script: bytes) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = hashlib.sha1(script).hexdigest()  # noqa: S324 - Redis' script id
            self._shas[script] = sha
        return sha

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
            for script in (ROW_SCRIPT, VIEW_SCRIPT, TRUNCATE_SCRIPT, BATCH_SCRIPT):
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
