"""The Redis sink: apply a batch of commands and the checkpoint together, or not at all.

Redis state lives in one hash, ``cdc:state`` (:data:`schema.keys.STATE_KEY`):

=========  =============================================================================
field      meaning
=========  =============================================================================
lsn        checkpoint: every transaction whose commit record starts before it is applied
partial    ``<final_lsn>:<n>``: the first n changes of that (large) transaction are applied
fence      token of the one daemon allowed to write (set when it acquired the slot)
owner      host and pid of that daemon (for people)
source     system identifier / database / slot the cache was built from
loading    ``1`` while a snapshot is being loaded (the cache is not consistent yet)
rebuild    progress of an online rebuild (see :mod:`cdc.backfill`), empty when none
=========  =============================================================================

Every batch is sent in one write::

    MULTI, <commands>, HSET cdc:state lsn … partial …, PUBLISH cdc:applied <lsn>, EXEC,
    WATCH cdc:state, HMGET cdc:state …

and the next batch may follow before this one's answer is read (:meth:`RedisSink.send`,
:meth:`RedisSink.receive`), so Redis works on one batch while the daemon plans the next.

The ``WATCH`` armed at the end of one batch guards the next: if another daemon took the
fence, or Redis lost its data (``FLUSHALL`` touches watched keys; a restart drops the
connection), ``EXEC`` returns nil and nothing of the batch is applied. The sink then says
which: :class:`Fenced` or :class:`RedisLost`.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from cdc.errors import Fenced, RedisLost, RedisRejected, RedisUnavailable
from cdc.lsn import Lsn, format_lsn, parse_lsn
from cdc.plan import CommandBatch
from cdc.redis_wire import RedisAddress, RedisWire, WireError, WireReplyError
from cdc.resp import append_command, command
from schema.keys import APPLIED_CHANNEL, STATE_KEY

_STATE = STATE_KEY.encode()
_APPLIED = APPLIED_CHANNEL.encode()
_MULTI = command(b"MULTI")
_EXEC = command(b"EXEC")
_WATCH_AND_READ = command(b"WATCH", _STATE) + command(b"HMGET", _STATE, b"fence", b"lsn")
# UNWATCH first: our own writes to the watched key since the last WATCH would otherwise
# abort the next EXEC (Redis flags the connection itself, too).
_REARM = command(b"UNWATCH") + _WATCH_AND_READ


@dataclass(frozen=True)
class CacheState:
    """What ``cdc:state`` says about the cache."""

    lsn: Lsn | None = None
    partial: tuple[Lsn, int] | None = None
    fence: str | None = None
    owner: str | None = None
    source: str | None = None
    loading: bool = False
    rebuild: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.lsn is not None or self.fence is not None or self.loading

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> CacheState:
        text = {k.decode(): v.decode() for k, v in data.items()}
        partial = None
        if raw := text.get("partial"):
            lsn_text, _, count = raw.partition(":")
            partial = (parse_lsn(lsn_text), int(count))
        return cls(
            lsn=parse_lsn(text["lsn"]) if text.get("lsn") else None,
            partial=partial,
            fence=text.get("fence") or None,
            owner=text.get("owner") or None,
            source=text.get("source") or None,
            loading=text.get("loading") == "1",
            rebuild=text.get("rebuild") or None,
            extra=text,
        )


@dataclass
class InFlight:
    """A batch sent to Redis whose answer has not been read yet."""

    batch: CommandBatch
    queued: int


@dataclass
class ApplyResult:
    """What Redis said about the commands of a batch."""

    incomplete_rows: list[tuple[str, bytes]]
    errors: list[str]


def owner_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RedisSink:
    """Applies batches atomically with the checkpoint, under this daemon's fence."""

    def __init__(self, url: str, timeout: float) -> None:
        self.address = RedisAddress.from_url(url)
        self.wire = RedisWire(self.address, timeout)
        self.fence: str | None = None
        self._armed = False

    # -- connection and state ------------------------------------------------------------

    def connect(self) -> None:
        try:
            self.wire.connect()
        except WireError as exc:
            raise RedisUnavailable(str(exc)) from exc
        self._armed = False

    def close(self) -> None:
        self.wire.close()
        self._armed = False

    @property
    def connected(self) -> bool:
        return self.wire.connected

    def fileno(self) -> int:
        return self.wire.fileno()

    def read_state(self) -> CacheState:
        reply = self._call(b"HGETALL", _STATE)
        if isinstance(reply, list):
            pairs = dict(zip(reply[0::2], reply[1::2], strict=True))
            return CacheState.from_hash(pairs)
        return CacheState()

    def claim(self, fields: dict[str, str]) -> str:
        """Take the fence (after acquiring the slot) and write ``fields`` to the state."""
        token = uuid.uuid4().hex
        values = {"fence": token, "owner": owner_label(), **fields}
        args = [b"HSET", _STATE]
        for key, value in values.items():
            args += [key.encode(), value.encode()]
        self._call(*args)
        self.fence = token
        self._arm()
        return token

    def reset_state(self, fields: dict[str, str]) -> None:
        """Replace the whole state hash (snapshot load, reset): keeps our fence."""
        assert self.fence is not None
        values = {"fence": self.fence, "owner": owner_label(), **fields}
        buf = bytearray()
        append_command(buf, [b"DEL", _STATE])
        hset = [b"HSET", _STATE]
        for key, value in values.items():
            hset += [key.encode(), value.encode()]
        append_command(buf, hset)
        self._roundtrip(bytes(buf), 2)
        self._arm()

    def _arm(self) -> None:
        (_unwatch, _watch, (fence, _lsn)) = self._roundtrip(_REARM, 3)
        self._check_fence(fence)
        self._armed = True

    def _check_fence(self, fence: bytes | None) -> None:
        if fence is None:
            raise RedisLost("cdc:state is gone: Redis lost its data")
        if self.fence is None or fence.decode() != self.fence:
            raise Fenced("another daemon took over the cache (fence changed)")

    # -- applying ----------------------------------------------------------------------------

    def apply(self, batch: CommandBatch, state: dict[str, str]) -> ApplyResult:
        """Apply ``batch`` and set ``state`` fields in one transaction; wait for it."""
        return self.receive(self.send(batch, state))

    def send(self, batch: CommandBatch, state: dict[str, str]) -> InFlight:
        """Send ``batch`` and ``state`` as one transaction without waiting for Redis.

        The next batch may be sent before this one is received: Redis runs them in order,
        and the WATCH armed at the end of this one guards the next, so if this one is
        refused (fenced, state lost) the next is refused too."""
        if not self._armed:
            self._arm()
        hset = [b"HSET", _STATE]
        for key, value in state.items():
            hset += [key.encode(), value.encode()]
        tail = bytearray()
        append_command(tail, hset)
        queued = batch.commands + 1
        if lsn := state.get("lsn"):
            # Readers waiting on a token wake on this; delivered at EXEC, with the batch.
            append_command(tail, [b"PUBLISH", _APPLIED, lsn.encode()])
            queued += 1
        tail += _EXEC
        tail += _WATCH_AND_READ
        try:
            self.wire.send_parts([_MULTI, batch.buf, tail])
        except WireError as exc:
            self._armed = False
            raise RedisUnavailable(str(exc)) from exc
        # The WATCH at its end guards whatever is sent next (see receive for the outcome).
        self._armed = True
        return InFlight(batch, queued)

    def ready(self, sent: InFlight) -> bool:
        """Whether Redis' whole answer to ``sent`` has arrived (never blocks)."""
        try:
            return self.wire.transaction_ready(sent.queued, after=2)
        except WireError as exc:
            self._armed = False
            raise RedisUnavailable(str(exc)) from exc

    def receive(self, sent: InFlight) -> ApplyResult:
        """Redis' answer to a batch sent earlier: applied, or an error saying why not."""
        queued = sent.queued
        try:
            replies = self.wire.read_transaction(queued, after=2)
        except WireError as exc:
            self._armed = False
            raise RedisUnavailable(str(exc)) from exc
        batch = sent.batch
        if len(replies) > 3:
            # Some command was refused while queuing: EXEC aborted the whole batch.
            self._armed = False
            rejected = [str(r) for r in replies[1 : 1 + queued] if isinstance(r, WireReplyError)]
            raise RedisRejected(rejected[0] if rejected else str(replies[1 + queued]))
        exec_reply = replies[0]
        fence, _lsn = replies[-1]
        if isinstance(exec_reply, WireReplyError):
            self._armed = False
            raise RedisRejected(str(exec_reply))
        if exec_reply is None:
            # WATCH fired: nothing was applied. Say why.
            self._armed = False
            self._check_fence(fence)
            raise Fenced("cdc:state changed under this daemon; batch not applied")
        self._check_fence(fence)
        return self._inspect(batch, exec_reply)

    def _inspect(self, batch: CommandBatch, results: list[Any]) -> ApplyResult:
        incomplete: list[tuple[str, bytes]] = []
        for index, table, row_id in batch.patches:
            if results[index] == 1:
                incomplete.append((table, row_id))
        errors = [str(r) for r in results if isinstance(r, WireReplyError)]
        return ApplyResult(incomplete, errors)

    def checkpoint(self, lsn: int, partial: str = "") -> None:
        """Move the checkpoint alone (idle progress: keepalives past our last commit)."""
        self.apply(CommandBatch(), {"lsn": format_lsn(lsn), "partial": partial})

    # -- plumbing ----------------------------------------------------------------------------

    def _roundtrip(self, data: bytes, count: int) -> list[Any]:
        try:
            return self.wire.roundtrip(data, count)
        except WireError as exc:
            self._armed = False
            raise RedisUnavailable(str(exc)) from exc

    def _call(self, *args: bytes) -> Any:
        (reply,) = self._roundtrip(command(*args), 1)
        if isinstance(reply, WireReplyError):
            raise RedisRejected(str(reply))
        return reply
