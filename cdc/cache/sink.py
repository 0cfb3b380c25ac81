"""The Redis sink: apply a batch of operations and the checkpoint together, or not at all.

The state it keeps with every batch is described in :mod:`cdc.cache.checkpoint`.

Every batch is one ``EVAL`` of :data:`cdc.transform.script.BATCH_SCRIPT` on one key, the
daemon's state hash (``cdc:state``, or ``cdc:state:<slot>`` for one of several daemons:
:func:`schema.keys.state_key`), whose arguments start with a head::

    <fence> <expected lsn> <expected partial> <lsn to publish> <n> <state field value>…

followed by the batch's operations. The script writes nothing unless, at the moment it
runs, the fence is this daemon's and the state's position is the one the batch follows;
it moves the checkpoint last, and only when every operation succeeded, then publishes
the new position on ``cdc:applied`` (readers waiting for a token wake on it). So:

- a successor's claim makes every later batch of a paused predecessor fail, including
  batches already sent but not yet answered (the check runs inside the atomic script,
  not in a ``WATCH`` armed earlier);
- a batch sent behind one that failed finds the position unmoved and writes nothing, so
  pipelining never skips a failed batch;
- a command Redis refuses is never covered by a checkpoint.

The next batch may be sent before this one's answer is read (:meth:`RedisSink.send`,
:meth:`RedisSink.receive`), so Redis works on one batch while the daemon plans the next.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from cdc.cache.checkpoint import FORMAT_FIELD, FORMAT_VERSION, CacheState
from cdc.cache.wire import RedisAddress, RedisWire, WireError, WireReplyError, auth_problem
from cdc.errors import (
    ApplyFailed,
    ConfigError,
    Fenced,
    RedisLost,
    RedisRejected,
    RedisUnavailable,
)
from cdc.protocol.resp import append_bulk, append_command, array_header, command
from cdc.transform.plan import CommandBatch
from cdc.transform.script import BATCH_SCRIPT
from schema.keys import REGISTRY_KEY, STATE_KEY, applied_message

_EVAL_SCRIPT = b"$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(BATCH_SCRIPT), BATCH_SCRIPT)
_HEAD_ARGS = 5
# The state field naming the tables a daemon mirrors (comma-separated).
TABLES_FIELD = "tables"
# Errors Redis may clear by itself: retried (never confirmed meanwhile).
_TRANSIENT = ("OOM", "BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "READONLY")


@dataclass
class InFlight:
    """A batch sent to Redis whose answer has not been read yet."""

    batch: CommandBatch
    lsn: str
    waits: int = 0  # 1 when a WAIT for replicas follows the batch (see _wait_command)


@dataclass
class ApplyResult:
    """What Redis said about a batch it applied."""

    incomplete_rows: list[tuple[str, bytes]]
    repaired: int = 0


def owner_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RedisSink:
    """Applies batches atomically with the checkpoint, under this daemon's fence."""

    def __init__(
        self,
        url: str,
        timeout: float,
        min_replicas: int = 0,
        *,
        state_key: str = STATE_KEY,
        mirrors: tuple[str, ...] = (),
    ) -> None:
        """``state_key``: this daemon's checkpoint hash (:func:`schema.keys.state_key`);
        ``mirrors``: the tables it mirrors, recorded in the state and the registry at
        each claim (empty: record nothing, as for tools that only read the state)."""
        self.address = RedisAddress.from_url(url)
        self.state_key = state_key
        self.mirrors = mirrors
        self._state = state_key.encode()
        self._eval_head = _EVAL_SCRIPT + b"$%d\r\n%s\r\n" % (len(self._state), self._state)
        self.wire = RedisWire(self.address, timeout)
        self.fence: str | None = None
        self.min_replicas = min_replicas
        # WAIT gives up a little before the socket's own timeout would fire.
        self._wait_ms = max(1, int(timeout * 800))
        # The position the next batch follows: what the last batch sent (or the state
        # read at the claim) left in ``cdc:state``.
        self._lsn = ""
        self._partial = ""
        # Redis refused PUBLISH on cdc:applied (an ACL without the channel).
        self.publish_refused = False

    # -- connection and state ------------------------------------------------------------

    def connect(self) -> None:
        try:
            self.wire.connect()
        except WireError as lost:
            raise RedisUnavailable(str(lost)) from lost
        except WireReplyError as refused:  # the credentials changed since the start
            problem = auth_problem(refused)
            if problem:
                raise ConfigError(problem) from None
            raise RedisUnavailable(f"Redis: {refused}") from None

    def close(self) -> None:
        self.wire.close()

    @property
    def connected(self) -> bool:
        return self.wire.connected

    def fileno(self) -> int:
        return self.wire.fileno()

    def read_state(self, key: str | None = None) -> CacheState:
        """This daemon's state (``key``: another daemon's)."""
        reply = self._call(b"HGETALL", key.encode() if key is not None else self._state)
        if isinstance(reply, list):
            pairs = dict(zip(reply[0::2], reply[1::2], strict=True))
            return CacheState.from_hash(pairs)
        return CacheState()

    def registry(self) -> dict[str, str]:
        """Which state mirrors each table (:data:`schema.keys.REGISTRY_KEY`)."""
        reply = self._call(b"HGETALL", REGISTRY_KEY.encode())
        if not isinstance(reply, list):
            return {}
        return {k.decode(): v.decode() for k, v in zip(reply[0::2], reply[1::2], strict=True)}

    def drop_state(self, key: str) -> None:
        """Delete another state hash (a former key of this daemon's slot)."""
        if key != self.state_key:
            self._call(b"DEL", key.encode())

    def claim(self, fields: dict[str, str]) -> CacheState:
        """Take the fence (after acquiring the slot) and write ``fields`` to the state.

        Returns the state as it is *after* the claim: from then on no predecessor can
        write, so this is the position to resume from."""
        token = uuid.uuid4().hex
        values = {"fence": token, **self._own_fields()}
        self._call(*self._hset_args({**values, **fields}))
        self._register()
        self.fence = token
        # Everything this session resumes from (and will confirm) must be on the replicas,
        # including batches a previous session applied but could not confirm.
        self._check_replicas(self._call(*self._wait_command()) if self.min_replicas else None)
        state = self.read_state()
        self._follow(state.extra)
        return state

    def reset_state(self, fields: dict[str, str]) -> None:
        """Replace the whole state hash (snapshot load, reset): keeps our fence."""
        assert self.fence is not None
        buf = bytearray()
        append_command(buf, [b"DEL", self._state])
        values = {"fence": self.fence, **self._own_fields()}
        append_command(buf, self._hset_args({**values, **fields}))
        self._roundtrip(bytes(buf), 2)
        self._register()
        self._follow(fields)

    def _own_fields(self) -> dict[str, str]:
        out = {"owner": owner_label(), FORMAT_FIELD: str(FORMAT_VERSION)}
        if self.mirrors:
            out[TABLES_FIELD] = ",".join(self.mirrors)
        return out

    def _register(self) -> None:
        """Name this state as the one that mirrors our tables (readers' token waits)."""
        if self.mirrors:
            args = [b"HSET", REGISTRY_KEY.encode()]
            for table in self.mirrors:
                args += [table.encode(), self._state]
            self._call(*args)

    def _hset_args(self, values: dict[str, str]) -> list[bytes]:
        args = [b"HSET", self._state]
        for key, value in values.items():
            args += [key.encode(), value.encode()]
        return args

    def _follow(self, state: dict[str, str]) -> None:
        self._lsn = state.get("lsn", "")
        self._partial = state.get("partial", "")

    # -- applying ----------------------------------------------------------------------------

    def apply(self, batch: CommandBatch, state: dict[str, str]) -> ApplyResult:
        """Apply ``batch`` and set ``state`` fields in one script run; wait for it."""
        return self.receive(self.send(batch, state))

    def send(self, batch: CommandBatch, state: dict[str, str]) -> InFlight:
        """Send ``batch`` and ``state`` as one script run without waiting for Redis.

        The next batch may be sent before this one is received: Redis runs them in
        order, and each follows the position the one before it sets, so if this one
        is refused (fenced, failed, state lost) every later one writes nothing too."""
        assert self.fence is not None
        lsn = state.get("lsn")
        head = bytearray()
        head += array_header(4 + _HEAD_ARGS + 2 * len(state) + batch.args)
        head += self._eval_head
        append_bulk(head, self.fence.encode())
        append_bulk(head, self._lsn.encode())
        append_bulk(head, self._partial.encode())
        message = applied_message(self.state_key, lsn) if lsn is not None else ""
        append_bulk(head, message.encode())
        append_bulk(head, b"%d" % len(state))
        for key, value in state.items():
            append_bulk(head, key.encode())
            append_bulk(head, value.encode())
        parts: list[bytes | bytearray] = [head, batch.buf]
        if self.min_replicas:
            parts.append(command(*self._wait_command()))
        try:
            self.wire.send_parts(parts)
        except WireError as exc:
            raise RedisUnavailable(str(exc)) from exc
        if lsn is not None:
            self._lsn = lsn
        if "partial" in state:
            self._partial = state["partial"]
        return InFlight(batch, lsn or self._lsn, 1 if self.min_replicas else 0)

    def ready(self, sent: InFlight) -> bool:
        """Whether Redis' whole answer to ``sent`` has arrived (never blocks)."""
        try:
            return self.wire.replies_ready(1 + sent.waits)
        except WireError as exc:
            raise RedisUnavailable(str(exc)) from exc

    def buffered(self, sent: InFlight) -> bool:
        """Whether the answer to ``sent`` arrived with an earlier one (no system call)."""
        try:
            return self.wire.buffered(1 + sent.waits)
        except WireError as exc:
            raise RedisUnavailable(str(exc)) from exc

    def receive(self, sent: InFlight) -> ApplyResult:
        """Redis' answer to a batch sent earlier: applied, or an error saying why not."""
        try:
            replies = self.wire.read(1 + sent.waits)
        except WireError as exc:
            raise RedisUnavailable(str(exc)) from exc
        reply = replies[0]
        batch = sent.batch
        if isinstance(reply, WireReplyError):
            # The script was refused whole (out of memory) or stopped by an error: the
            # checkpoint did not move.
            raise _refused(str(reply), batch.table_of(0), sent.lsn)
        status = reply[0]
        if status == b"lost":
            raise RedisLost(f"{self.state_key} is gone: Redis lost its data")
        if status == b"fenced":
            raise Fenced("another daemon took over the cache (fence changed)")
        if status == b"moved":
            raise RedisLost(
                f"{self.state_key} is not at the position this daemon left it (an earlier batch "
                "was not applied, or something else wrote the state)"
            )
        incomplete_ops, failed, repaired = reply[1], reply[2], reply[3]
        if not reply[4] and not self.publish_refused:
            self.publish_refused = True
        if failed:
            index, error = int(failed[0]), failed[1].decode(errors="replace")
            raise _refused(error, batch.table_of(index), sent.lsn)
        incomplete: list[tuple[str, bytes]] = []
        if incomplete_ops:
            wanted = {int(i) for i in incomplete_ops}
            for index, table, row_id in batch.patches:
                if index in wanted:
                    incomplete.append((table, row_id))
        self._check_replicas(replies[1] if sent.waits else None)
        return ApplyResult(incomplete, int(repaired))

    # -- replicas (CDC_REDIS_MIN_REPLICAS) ------------------------------------------------------
    # ``WAIT n timeout`` goes right after a batch on the same connection (Redis answers it
    # once n replicas acknowledged every write this connection made, or at the timeout);
    # its reply is read after the batch's. Too few replicas: the batch is applied on the
    # master but must not be confirmed to PostgreSQL, so receive raises (retryable) and the
    # next session's claim waits again before anything is confirmed.

    def _wait_command(self) -> tuple[bytes, ...]:
        return (b"WAIT", str(self.min_replicas).encode(), str(self._wait_ms).encode())

    def _check_replicas(self, reply: object) -> None:
        if reply is None:
            return
        if isinstance(reply, WireReplyError):
            raise RedisRejected(f"WAIT for replicas failed: {reply.code or reply}")
        acked = int(reply) if isinstance(reply, int) else 0
        if acked < self.min_replicas:
            raise RedisUnavailable(
                f"only {acked} of {self.min_replicas} Redis replicas acknowledged within"
                f" {self._wait_ms} ms (CDC_REDIS_MIN_REPLICAS); not confirming, retrying"
            )

    # -- plumbing ----------------------------------------------------------------------------

    def _roundtrip(self, data: bytes, count: int) -> list[object]:
        try:
            return self.wire.roundtrip(data, count)
        except WireError as exc:
            raise RedisUnavailable(str(exc)) from exc

    def _call(self, *args: bytes) -> object:
        (reply,) = self._roundtrip(command(*args), 1)
        if isinstance(reply, WireReplyError):
            raise RedisRejected(str(reply))
        return reply


def _refused(error: str, table: str, lsn: str) -> RedisRejected | ApplyFailed:
    """A transient refusal is retried; any other stops the daemon (exit 3)."""
    code = error.split(" ", 1)[0].upper()
    if code in _TRANSIENT or "OOM command not allowed" in error:
        return RedisRejected(f"Redis refused the batch ({code}); retrying")
    return ApplyFailed(lsn, table or "?", f"Redis refused a command ({code})")
