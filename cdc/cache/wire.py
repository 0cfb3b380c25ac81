"""A minimal pipelined Redis connection for the apply path.

Applying a batch sends one ``EVAL`` whose arguments are thousands of operations in a
single gathered write, then reads its one reply, parsed by hiredis in C. redis-py would
copy the batch into its own argument list and encoder (about 2 µs per row on this path),
so the hot path uses this instead; everything else (checks, verify, the cache reader)
uses redis-py.

URLs are parsed by :mod:`schema.redis_url`, shared with the redis-py clients, so both agree
on what a ``REDIS_URL`` means: ``rediss://`` wraps the socket in TLS with the URL's client
certificate and CA; ``redis+sentinel://`` asks the Sentinels for the master on every
connect and checks its ``ROLE``. A ``READONLY`` reply (the master was demoted under us)
closes the connection like a lost one, so the session reconnects and re-resolves.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import hiredis

from cdc.protocol.resp import command, reply_end
from schema.redis_url import RedisTarget


class WireError(Exception):
    """The connection failed (retryable: reconnect)."""


class WireReplyError(Exception):
    """Redis answered a command with an error reply (``-ERR``, ``-NOAUTH``, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message.split(" ", 1)[0] if message else ""


def auth_problem(reply: WireReplyError) -> str | None:
    """What to fix when ``reply`` refused the credentials (``AUTH``, or a command sent
    without them); None for any other error. Redis' texts never hold the password."""
    text = str(reply)
    if "without any password configured" in text:
        return (
            "REDIS_URL has a password but Redis has none set for that user: remove it"
            " from REDIS_URL, or set one in Redis (requirepass / ACL)"
        )
    if reply.code in ("WRONGPASS", "NOAUTH") or "invalid password" in text:
        return f"Redis refused the credentials in REDIS_URL ({reply.code})"
    return None


# Every form of REDIS_URL (one node, TLS, Sentinel) is parsed in one place, shared with
# redis-py's clients and the writer's reader.
RedisAddress = RedisTarget


class RedisWire:
    """One TCP (or TLS) connection speaking RESP2, with explicit batching."""

    def __init__(self, address: RedisAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader(replyError=WireReplyError)
        self._pending = bytearray()
        self._context: ssl.SSLContext | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        """The socket, to wait on it alongside others (-1 when not connected)."""
        return self._sock.fileno() if self._sock is not None else -1

    def connect(self) -> None:
        """Connect (asking the Sentinels where the master is, in Sentinel mode)."""
        self.close()
        addr = self.address
        host, port = self._resolve() if addr.sentinel else (addr.host, addr.port)
        self._open(host, port, addr.username, addr.password, addr.db)
        if addr.sentinel:
            self._check_master(host, port)

    def _open(
        self, host: str, port: int, username: str | None, password: str | None, db: int
    ) -> None:
        addr = self.address
        where = f"{addr.describe()} ({host}:{port})" if addr.sentinel else addr.describe()
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if addr.tls is not None:
                context = self._tls_context()
                sock = context.wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            raise WireError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        self._sock = sock
        self._reader = hiredis.Reader(replyError=WireReplyError)
        self._pending = bytearray()
        handshake: list[bytes] = []
        if password is not None:
            if username:
                handshake.append(command(b"AUTH", username.encode(), password.encode()))
            else:
                handshake.append(command(b"AUTH", password.encode()))
        if db:
            handshake.append(command(b"SELECT", str(db).encode()))
        if handshake:
            replies = self.roundtrip(b"".join(handshake), len(handshake))
            for reply in replies:
                if isinstance(reply, WireReplyError):
                    self.close()
                    raise reply

    def _tls_context(self) -> ssl.SSLContext:
        """Built once per wire: loading the CA and client certificate costs milliseconds."""
        if self._context is None:
            assert self.address.tls is not None
            self._context = self.address.tls.context()
        return self._context

    def _resolve(self) -> tuple[str, int]:
        """The master's address as the first Sentinel that knows it says.

        Asked on every connect, so a session that lost its master (connection gone,
        ``READONLY``) finds the new one after a failover."""
        addr = self.address
        problems: list[str] = []
        for host, port in addr.hosts:
            found = self._ask_sentinel(host, port)
            if isinstance(found, tuple):
                return found
            problems.append(found)
        raise WireError(f"no Sentinel of {addr.describe()} names a master: " + "; ".join(problems))

    def _ask_sentinel(self, host: str, port: int) -> tuple[str, int] | str:
        """``SENTINEL get-master-addr-by-name`` on one Sentinel: the address, or why not."""
        addr = self.address
        assert addr.master is not None
        sentinel = RedisWire(
            RedisTarget(
                hosts=((host, port),),
                username=addr.sentinel_username,
                password=addr.sentinel_password,
                tls=addr.tls,
            ),
            self.timeout,
        )
        try:
            if addr.tls is not None:
                sentinel._context = self._tls_context()
            sentinel.connect()
            reply = sentinel.call(b"SENTINEL", b"get-master-addr-by-name", addr.master.encode())
        # Distinct names: compiled by mypyc, one name would be typed as the first class.
        except WireError as lost:
            return str(lost)
        except WireReplyError as refused:
            if auth_problem(refused):
                return f"Sentinel {host}:{port}: credentials refused ({refused.code})"
            return f"Sentinel {host}:{port}: {refused.code or refused}"
        except OSError as tls:  # the TLS files
            raise WireError(f"cannot set up TLS for {addr.describe()}: {tls}") from tls
        finally:
            sentinel.close()
        if isinstance(reply, list) and len(reply) == 2:
            return reply[0].decode(), int(reply[1])
        return f"Sentinel {host}:{port} does not know master {addr.master!r}"

    def _check_master(self, host: str, port: int) -> None:
        """Refuse a node the Sentinels still call master but that is a replica now."""
        try:
            role = self.call(b"ROLE")
        except WireReplyError as exc:
            if exc.code != "NOPERM":
                self.close()
                raise WireError(f"ROLE on {host}:{port} failed: {exc.code or exc}") from None
            return  # an ACL user without ROLE: READONLY replies still catch a replica
        if not (isinstance(role, list) and role and role[0] == b"master"):
            self.close()
            raise WireError(f"{host}:{port} is not a master yet (failover in progress)")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        sock = self._sock
        if sock is None:
            raise WireError("not connected")
        try:
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise WireError(f"write to Redis failed: {exc}") from exc

    def send_parts(self, parts: list[bytes | bytearray]) -> None:
        """Send ``parts`` back to back without joining them (one gathered write each time).

        A batch is megabytes; framing it with MULTI/EXEC by concatenation would copy it
        once more into freshly faulted-in memory."""
        sock = self._sock
        if sock is None:
            raise WireError("not connected")
        try:
            if isinstance(sock, ssl.SSLSocket):  # TLS has no sendmsg
                sock.sendall(b"".join(parts))
                return
            views = [memoryview(part) for part in parts if part]
            while views:
                sent = sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            self.close()
            raise WireError(f"write to Redis failed: {exc}") from exc

    def read(self, count: int) -> list[Any]:
        """The next ``count`` replies; error replies are returned as WireReplyError values."""
        end = 0
        for _ in range(count):
            end = self._reply_end_blocking(end)
        return self._parse(end, count)

    def replies_ready(self, count: int) -> bool:
        """Whether ``count`` whole replies have arrived (reads without blocking).

        Looks at what is buffered first: an answer read along with an earlier one
        leaves the socket with nothing more to say, so readiness must not wait on it."""
        if self.buffered(count):
            return True
        self._fill_available()
        return self.buffered(count)

    def buffered(self, count: int) -> bool:
        """Whether ``count`` whole replies are already buffered (no system call: a socket
        with a timeout polls before every ``recv``, even a non-blocking one)."""
        pending = self._pending
        at = 0
        for _ in range(count):
            try:
                at = reply_end(pending, at)
            except ValueError as exc:
                self.close()
                raise WireError(f"Redis protocol error: {exc}") from None
            if at < 0:
                return False
        return True

    # -- raw bytes ----------------------------------------------------------------------------
    # Bytes received but not parsed wait in ``_pending``; the parser is only ever given
    # complete replies (their extent found by ``reply_end``), so the replies of a batch
    # sent after the one being read stay raw for their own fast path.

    def _reply_end_blocking(self, pos: int) -> int:
        while True:
            try:
                end = reply_end(self._pending, pos)
            except ValueError as exc:
                self.close()
                raise WireError(f"Redis protocol error: {exc}") from None
            if end >= 0:
                return end
            self._fill()

    def _parse(self, end: int, count: int) -> list[Any]:
        reader = self._reader
        reader.feed(bytes(self._pending[:end]))
        del self._pending[:end]
        replies: list[Any] = []
        for _ in range(count):
            reply = reader.gets()
            if reply is False:  # unreachable: reply_end found `count` whole replies
                self.close()
                raise WireError("Redis protocol error: incomplete reply")
            if type(reply) is WireReplyError and reply.code == "READONLY":
                # The node was demoted (a failover): nothing more it says can be trusted
                # for this session; reconnecting asks the Sentinels for the new master.
                self.close()
                raise WireError("Redis answered READONLY: the master became a replica")
            replies.append(reply)
        return replies

    def _fill(self) -> None:
        """Wait for more bytes (up to the timeout)."""
        sock = self._sock
        if sock is None:
            raise WireError("not connected")
        try:
            chunk = sock.recv(1 << 20)
        except (TimeoutError, OSError) as exc:
            self.close()
            raise WireError(f"read from Redis failed: {exc}") from exc
        if not chunk:
            self.close()
            raise WireError("Redis closed the connection")
        self._pending += chunk

    def _fill_available(self) -> None:
        """Take whatever bytes have arrived, without waiting."""
        sock = self._sock
        if sock is None:
            raise WireError("not connected")
        if not isinstance(sock, ssl.SSLSocket):
            # One non-blocking read (the caller saw the socket readable): no mode
            # switches, and no exception on the common path.
            try:
                chunk = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close()
                raise WireError(f"read from Redis failed: {exc}") from exc
            if not chunk:
                self.close()
                raise WireError("Redis closed the connection")
            self._pending += chunk
            return
        sock.setblocking(False)
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    self.close()
                    raise WireError("Redis closed the connection")
                self._pending += chunk
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            self.close()
            raise WireError(f"read from Redis failed: {exc}") from exc
        finally:
            if self._sock is not None:
                sock.settimeout(self.timeout)

    def roundtrip(self, data: bytes | bytearray, count: int) -> list[Any]:
        self.send(data)
        return self.read(count)

    def call(self, *args: bytes) -> Any:
        """One command and its reply; an error reply is raised as WireReplyError."""
        (reply,) = self.roundtrip(command(*args), 1)
        if isinstance(reply, WireReplyError):
            raise reply
        return reply
