"""The source: a psycopg 3 replication connection streaming a logical slot.

``START_REPLICATION`` leaves the connection in COPY BOTH mode; from then on this module
talks libpq directly through ``conn.pgconn`` (psycopg's public, typed libpq wrapper):
``get_copy_data(1)`` never blocks, ``put_copy_data`` + ``flush`` send standby status
updates, and the socket is waited on with ``select``. Keepalives are answered here when
the server asks; everything else is returned as bytes to the caller, which decides what
is applied and what may be confirmed.

The session runs with ``TimeZone=UTC`` and PostgreSQL's default ``DateStyle``,
``IntervalStyle``, ``extra_float_digits`` and ``bytea_output``, so the text pgoutput sends
is exactly what ``col::text`` prints in such a session (contract section 6).
"""

from __future__ import annotations

import contextlib
import re
import select
import time
from dataclasses import dataclass

import psycopg
from psycopg import errors as pgerrors
from psycopg import pq

from cdc.errors import (
    ConfigError,
    PostgresUnavailable,
    SlotInUse,
    SlotInvalidated,
)
from cdc.protocol.messages import standby_status_update, unix_to_pg_time
from schema.lsn import Lsn, format_lsn, parse_lsn

SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO,MDY -c IntervalStyle=postgres"
    " -c extra_float_digits=1 -c bytea_output=hex"
)


@dataclass(frozen=True)
class SystemInfo:
    system_id: str
    timeline: int
    xlogpos: Lsn
    dbname: str


@dataclass(frozen=True)
class CreatedSlot:
    name: str
    consistent_point: Lsn
    snapshot: str | None


def connect_error(exc: psycopg.OperationalError, what: str) -> Exception:
    """Classify a failed connection: misconfiguration (exit 2) or retry."""
    message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    state = exc.sqlstate or ""
    lowered = str(exc).lower()
    if state in ("28P01",) or "password authentication failed" in lowered:
        return ConfigError(
            f"{what}: password authentication failed; check the user and password in the URL"
        )
    if state == "28000" or "no pg_hba.conf entry" in lowered:
        return ConfigError(f"{what}: access refused by pg_hba.conf ({_first_line(exc)})")
    if state == "3D000" or ("database" in lowered and "does not exist" in lowered):
        return ConfigError(f"{what}: {_first_line(exc)}")
    if state == "42501" or "must be superuser or replication role" in lowered:
        return ConfigError(f"{what}: the role lacks REPLICATION (ALTER ROLE … REPLICATION)")
    if "password" in lowered and "supplied" in lowered:
        return ConfigError(f"{what}: the server asks for a password and the URL has none")
    return PostgresUnavailable(f"{what}: {message}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ReplicationSource:
    """One replication connection; not thread-safe."""

    def __init__(self, conninfo: str, connect_timeout: float = 10.0) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self.streaming = False

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> SystemInfo:
        self.close()
        try:
            conn = psycopg.connect(
                self._conninfo,
                replication="database",
                autocommit=True,
                options=SESSION_OPTIONS,
                application_name="cdc",
                connect_timeout=max(1, int(self._connect_timeout)),
            )
        except psycopg.OperationalError as exc:
            raise connect_error(exc, "PostgreSQL replication connection") from None
        self._conn = conn
        try:
            row = conn.execute("IDENTIFY_SYSTEM").fetchone()
        except psycopg.Error as exc2:
            self.close()
            raise PostgresUnavailable(f"IDENTIFY_SYSTEM failed: {_first_line(exc2)}") from None
        assert row is not None
        system_id, timeline, xlogpos, dbname = row
        if dbname is None:
            self.close()
            raise ConfigError(
                "the replication connection has no database: use replication=database"
            )
        return SystemInfo(str(system_id), int(str(timeline)), parse_lsn(str(xlogpos)), str(dbname))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._pgconn = None
        self.streaming = False
        if conn is not None:
            # Closing a broken connection must not raise.
            with contextlib.suppress(Exception):
                conn.close()

    @property
    def backend_pid(self) -> int | None:
        return self._conn.info.backend_pid if self._conn is not None else None

    # -- slot commands (before streaming) ---------------------------------------------------

    @property
    def server_version(self) -> int:
        """``server_version_num`` of the server we are connected to (e.g. 180001)."""
        return self._require().info.server_version

    def create_slot(
        self, name: str, plugin: str, export_snapshot: bool, failover: bool | None = None
    ) -> CreatedSlot:
        """Create the logical slot; with ``export_snapshot`` the snapshot stays usable
        until the next command on this connection.

        ``failover`` (default: on PostgreSQL 17+) makes it a failover slot, which standbys
        with ``sync_replication_slots`` keep a copy of. Two-phase decoding is never
        enabled on it: PostgreSQL 17 refuses failover for two-phase slots, and the daemon
        decodes prepared transactions at COMMIT PREPARED anyway."""
        conn = self._require()
        snapshot = "export" if export_snapshot else "nothing"
        if failover is None:
            failover = self.server_version >= 170000
        options = f"SNAPSHOT '{snapshot}'" + (", FAILOVER true" if failover else "")
        try:
            row = conn.execute(
                f'CREATE_REPLICATION_SLOT "{name}" LOGICAL {plugin} ({options})'
            ).fetchone()
        except pgerrors.DuplicateObject:
            raise SlotInUse(name, None) from None
        except psycopg.OperationalError as exc:
            raise PostgresUnavailable(
                f"creating slot {name!r} failed: {_first_line(exc)}"
            ) from None
        except psycopg.Error as exc2:
            raise ConfigError(f'cannot create slot "{name}": {_first_line(exc2)}') from None
        assert row is not None
        return CreatedSlot(str(row[0]), parse_lsn(str(row[1])), str(row[2]) if row[2] else None)

    def enable_failover(self, name: str) -> None:
        """``ALTER_REPLICATION_SLOT … (FAILOVER true)`` (17+; the slot must be inactive)."""
        conn = self._require()
        try:
            conn.execute(f'ALTER_REPLICATION_SLOT "{name}" (FAILOVER true)')
        except pgerrors.ObjectInUse as exc:
            match = re.search(r"PID (\d+)", str(exc))
            raise SlotInUse(name, int(match.group(1)) if match else None) from None
        except psycopg.OperationalError as exc2:
            raise PostgresUnavailable(
                f"enabling failover on slot {name!r} failed: {_first_line(exc2)}"
            ) from None
        except psycopg.Error as exc3:
            raise ConfigError(
                f'cannot enable failover on slot "{name}": {_first_line(exc3)}'
            ) from None

    def timeline_history(self, timeline: int) -> str:
        """The history file of ``timeline`` (``TIMELINE_HISTORY``; timeline 1 has none)."""
        if timeline <= 1:
            return ""
        conn = self._require()
        try:
            row = conn.execute(f"TIMELINE_HISTORY {int(timeline)}").fetchone()
        except psycopg.OperationalError as exc:
            raise PostgresUnavailable(f"TIMELINE_HISTORY failed: {_first_line(exc)}") from None
        except psycopg.Error as exc2:
            raise PostgresUnavailable(f"TIMELINE_HISTORY refused: {_first_line(exc2)}") from None
        assert row is not None
        content = row[1]
        if isinstance(content, bytes | bytearray | memoryview):
            return bytes(content).decode("utf-8", "replace")
        return str(content)

    def drop_slot(self, name: str) -> None:
        conn = self._require()
        try:
            conn.execute(f'DROP_REPLICATION_SLOT "{name}" WAIT')
        except pgerrors.UndefinedObject:
            return
        except psycopg.Error as exc:
            raise PostgresUnavailable(
                f"dropping slot {name!r} failed: {_first_line(exc)}"
            ) from None

    # -- streaming ----------------------------------------------------------------------------

    def start(self, slot: str, start: int, options: dict[str, str]) -> None:
        conn = self._require()
        # Option names are identifiers: quote them (wal2json's have hyphens).
        opts = ", ".join(f"\"{key}\" '{value}'" for key, value in options.items())
        sql = f'START_REPLICATION SLOT "{slot}" LOGICAL {format_lsn(start)}'
        if opts:
            sql += f" ({opts})"
        try:
            conn.execute(sql)
        except pgerrors.ObjectInUse as exc:
            match = re.search(r"PID (\d+)", str(exc))
            raise SlotInUse(slot, int(match.group(1)) if match else None) from None
        except pgerrors.UndefinedObject as exc2:
            raise ConfigError(_first_line(exc2)) from None
        except pgerrors.ObjectNotInPrerequisiteState as exc3:
            if "no longer" in str(exc3) or "invalidated" in str(exc3):
                raise SlotInvalidated(_first_line(exc3)) from None
            raise ConfigError(_first_line(exc3)) from None
        except psycopg.OperationalError as exc4:
            raise PostgresUnavailable(f"START_REPLICATION failed: {_first_line(exc4)}") from None
        except psycopg.Error as exc5:
            raise ConfigError(f"START_REPLICATION refused: {_first_line(exc5)}") from None
        pgconn = conn.pgconn
        if pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            raise PostgresUnavailable("START_REPLICATION did not enter COPY BOTH mode")
        pgconn.nonblocking = 1
        self._pgconn = pgconn
        self.streaming = True

    def read(self) -> bytes | None:
        """The next CopyData message if one is buffered, else None (never blocks)."""
        pgconn = self._pgconn
        if pgconn is None:
            raise PostgresUnavailable("not streaming")
        try:
            nbytes, data = pgconn.get_copy_data(1)
        except psycopg.OperationalError as exc:
            self.close()
            raise PostgresUnavailable(f"replication stream broke: {_first_line(exc)}") from None
        if nbytes > 0:
            return bytes(data)
        if nbytes == 0:
            return None
        self._raise_end_of_stream(pgconn)
        raise AssertionError("unreachable")

    def wait(self, timeout: float, also: int = -1) -> tuple[bool, bool]:
        """Wait until the replication socket (or ``also``, another socket) is readable,
        or ``timeout``; pull what arrived into libpq's buffer.

        Returns (the replication socket had data, ``also`` is readable)."""
        pgconn = self._pgconn
        if pgconn is None:
            raise PostgresUnavailable("not streaming")
        try:
            sock = pgconn.socket
            watched = [sock] if also < 0 else [sock, also]
            readable, _, _ = select.select(watched, [], [], max(0.0, timeout))
        except (OSError, ValueError, psycopg.OperationalError) as exc:
            self.close()
            raise PostgresUnavailable(f"replication socket failed: {exc}") from None
        other = also >= 0 and also in readable
        if sock not in readable:
            return False, other
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc2:
            self.close()
            raise PostgresUnavailable(f"replication stream broke: {_first_line(exc2)}") from None
        return True, other

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        pgconn = self._pgconn
        if pgconn is None:
            raise PostgresUnavailable("not streaming")
        message = standby_status_update(write, flush, apply, unix_to_pg_time(time.time()), reply)
        try:
            pgconn.put_copy_data(message)
            deadline = time.monotonic() + 10.0
            while pgconn.flush() == 1:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable("cannot send the status update: socket stuck")
                select.select([], [pgconn.socket], [], 1.0)
        except psycopg.OperationalError as exc:
            self.close()
            raise PostgresUnavailable(
                f"sending the status update failed: {_first_line(exc)}"
            ) from None

    def finish(self, timeout: float = 5.0) -> bool:
        """End the stream the way the protocol says: CopyDone, then wait for the server's.

        The walsender handles messages in order, so once its CopyDone arrives it has
        applied every status update sent before: the slot's confirmed position is
        exactly the last one sent (closing the socket straight away could leave it
        unread). Data still in flight is dropped (it was not confirmed). Returns whether
        the server ended the stream in time; never raises (the caller is stopping)."""
        pgconn = self._pgconn
        if pgconn is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            pgconn.put_copy_end()
            while pgconn.flush() == 1:
                if time.monotonic() > deadline:
                    return False
                select.select([], [pgconn.socket], [], 0.1)
            while True:
                nbytes, _data = pgconn.get_copy_data(1)
                if nbytes < 0:
                    break
                if nbytes == 0:
                    if time.monotonic() > deadline:
                        return False
                    select.select([pgconn.socket], [], [], 0.1)
                    pgconn.consume_input()
            while True:
                while pgconn.is_busy():
                    if time.monotonic() > deadline:
                        return False
                    select.select([pgconn.socket], [], [], 0.1)
                    pgconn.consume_input()
                if pgconn.get_result() is None:
                    break
        except (OSError, psycopg.OperationalError):
            return False
        self.streaming = False
        return True

    def _raise_end_of_stream(self, pgconn: pq.abc.PGconn) -> None:
        result = pgconn.get_result()
        message = "the server ended the replication stream"
        state = ""
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            raw = result.error_message.decode("utf-8", "replace").strip()
            message = raw.splitlines()[0] if raw else message
            state = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        self.close()
        if state == "42704" and "publication" in message:
            raise ConfigError(f"{message.removeprefix('ERROR:  ')}: run the migrations")
        if state == "55000" and ("no longer" in message or "invalidated" in message):
            raise SlotInvalidated(message)
        raise PostgresUnavailable(message)

    def _require(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None:
            raise PostgresUnavailable("not connected")
        return self._conn
