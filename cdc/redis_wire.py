"""A minimal pipelined Redis connection for the apply path.

Applying a batch sends one buffer holding ``MULTI``, thousands of commands, ``EXEC`` and
the next ``WATCH`` in a single write, then reads every reply with hiredis in C. redis-py's
per-reply overhead (about 2 µs) would double the cost of a row, so the hot path uses this
instead; everything else (checks, verify, the cache reader) uses redis-py.

URLs are parsed by redis-py (``redis://``, ``rediss://`` for TLS, ``user:password@`` for
ACL users, ``/db``), so both agree on what a ``REDIS_URL`` means.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.connection import parse_url

from cdc.resp import command


class WireError(Exception):
    """The connection failed (retryable: reconnect)."""


class WireReplyError(Exception):
    """Redis answered a command with an error reply (``-ERR``, ``-NOAUTH``, ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message.split(" ", 1)[0] if message else ""


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    tls_verify: bool
    tls_ca: str | None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        tls = url.startswith("rediss://")
        cert_reqs = options.get("ssl_cert_reqs", "required")
        return cls(
            host=str(options.get("host", "127.0.0.1")),
            port=int(options.get("port", 6379)),
            db=int(options.get("db", 0) or 0),
            username=options.get("username"),
            password=options.get("password"),
            tls=tls,
            tls_verify=str(cert_reqs).lower() not in ("none", "cert_none"),
            tls_ca=options.get("ssl_ca_certs"),
        )

    def describe(self) -> str:
        """Where, without credentials (safe to log)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


class RedisWire:
    """One TCP (or TLS) connection speaking RESP2, with explicit batching."""

    def __init__(self, address: RedisAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader(replyError=WireReplyError)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        self.close()
        addr = self.address
        try:
            sock = socket.create_connection((addr.host, addr.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if addr.tls:
                context = ssl.create_default_context(cafile=addr.tls_ca)
                if not addr.tls_verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(sock, server_hostname=addr.host)
        except OSError as exc:
            raise WireError(f"cannot connect to {addr.describe()}: {exc.strerror or exc}") from exc
        self._sock = sock
        self._reader = hiredis.Reader(replyError=WireReplyError)
        handshake: list[bytes] = []
        if addr.password is not None:
            if addr.username:
                handshake.append(command(b"AUTH", addr.username.encode(), addr.password.encode()))
            else:
                handshake.append(command(b"AUTH", addr.password.encode()))
        if addr.db:
            handshake.append(command(b"SELECT", str(addr.db).encode()))
        if handshake:
            replies = self.roundtrip(b"".join(handshake), len(handshake))
            for reply in replies:
                if isinstance(reply, WireReplyError):
                    self.close()
                    raise reply

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

    def read(self, count: int) -> list[Any]:
        """The next ``count`` replies; error replies are returned as WireReplyError values."""
        sock = self._sock
        if sock is None:
            raise WireError("not connected")
        replies: list[Any] = []
        reader = self._reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is not False:
                replies.append(reply)
                continue
            try:
                chunk = sock.recv(1 << 20)
            except (TimeoutError, OSError) as exc:
                self.close()
                raise WireError(f"read from Redis failed: {exc}") from exc
            if not chunk:
                self.close()
                raise WireError("Redis closed the connection")
            reader.feed(chunk)
        return replies

    def roundtrip(self, data: bytes | bytearray, count: int) -> list[Any]:
        self.send(data)
        return self.read(count)

    def call(self, *args: bytes) -> Any:
        (reply,) = self.roundtrip(command(*args), 1)
        if isinstance(reply, WireReplyError):
            raise reply
        return reply
