"""Running one write operation as one PostgreSQL transaction, in one round trip.

Each operation is a single SQL statement (data-modifying CTEs carry the history and audit
rows along) run in autocommit mode, so it is its own transaction, followed by::

    SELECT pg_current_wal_flush_lsn()

That is the read-your-writes token: a WAL position read after our commit returned, so it
is at or past the end of our commit record. The cache reader waits until the daemon's
checkpoint reaches it. (A pipelined ``BEGIN; …; COMMIT; SELECT`` would save a round trip,
but measured slower here: psycopg's pipeline mode costs more than the round trip.)

Driver errors become :mod:`writer.errors`; a connection lost once the pipeline was sent
means COMMIT may have run, so it becomes :class:`~writer.errors.OutcomeUnknown`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from writer.errors import (
    Conflict,
    FieldProblem,
    InvalidInput,
    InvalidReference,
    OutcomeUnknown,
    Unavailable,
    WriterError,
)

T = TypeVar("T")

# After a synchronous commit returns, its commit record is flushed, so the flush position
# is at or past its end; and the walsender can always read up to the flush position. (The
# insert position can sit past WAL nobody flushes for a while, so a reader could wait on
# it for nothing.) With synchronous_commit=off only the insert position is past our commit.
_TOKEN_SQL = (
    "SELECT (CASE WHEN current_setting('synchronous_commit') = 'off'"
    " THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END)::text AS token"
)


@dataclass(frozen=True, slots=True)
class Written(Generic[T]):
    """What a write returns: the row as written and the read-your-writes token."""

    value: T
    token: str


class Contention(Unavailable):
    """Deadlock, serialization failure or lock timeout: nothing was written; retry."""


def normalize_conninfo(url: str) -> str:
    """Accept ``postgresql+psycopg://`` (SQLAlchemy's form) as well as ``postgresql://``."""
    for prefix in ("postgresql+psycopg://", "postgres+psycopg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class Database:
    """A connection pool that runs writes as single-round-trip transactions."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
        statement_timeout_ms: int = 30_000,
        application_name: str = "writer",
    ) -> None:
        self.timeout = timeout
        self.pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            normalize_conninfo(conninfo),
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            name=application_name,
            connection_class=psycopg.Connection[DictRow],
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "application_name": application_name,
                "options": f"-c statement_timeout={int(statement_timeout_ms)}",
            },
        )

    def open(self, wait: bool = True) -> None:
        try:
            self.pool.open(wait=wait, timeout=self.timeout)
        except PoolTimeout as exc:
            raise Unavailable("could not connect to PostgreSQL") from exc

    def close(self) -> None:
        self.pool.close()

    def write(self, entity: str, sql: str, params: Mapping[str, Any]) -> tuple[list[DictRow], str]:
        """Run ``sql`` in its own transaction; return its rows and the token."""
        try:
            conn_cm = self.pool.connection()
            conn = conn_cm.__enter__()
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable("could not connect to PostgreSQL") from exc
        try:
            try:
                # Autocommit: the statement is its own transaction and has committed
                # when its result arrives.
                rows = conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                raise _translate(entity, conn, exc) from None
            try:
                token_row = conn.execute(_TOKEN_SQL).fetchone()
            except psycopg.Error:
                # The write is committed; any session's insert position is past it now.
                token_row = self._token_elsewhere()
            if token_row is None:  # pragma: no cover - the server always answers
                raise OutcomeUnknown("no WAL position came back after COMMIT")
            token = str(token_row["token"])
            return rows, token
        finally:
            if (
                not conn.broken
                and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
            ):
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    conn.close()
            conn_cm.__exit__(None, None, None)

    def _token_elsewhere(self) -> DictRow | None:
        try:
            with self.pool.connection() as other:
                return other.execute(_TOKEN_SQL).fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise OutcomeUnknown(
                "the write was committed but no WAL position could be read for its token"
            ) from exc

    def read(self, sql: str, params: Mapping[str, Any]) -> list[DictRow]:
        try:
            with self.pool.connection() as conn:
                return conn.execute(sql, params).fetchall()
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable("PostgreSQL read failed: connection lost") from exc


def _translate(entity: str, conn: psycopg.Connection[DictRow], exc: psycopg.Error) -> WriterError:
    constraint = exc.diag.constraint_name if exc.diag else None
    if isinstance(exc, pgerrors.UniqueViolation):
        return Conflict(entity, constraint)
    if isinstance(exc, pgerrors.ForeignKeyViolation):
        return InvalidReference(entity, constraint)
    if isinstance(exc, pgerrors.IntegrityConstraintViolation | pgerrors.DataError):
        column = exc.diag.column_name if exc.diag else None
        where: tuple[str | int, ...] = (column,) if column else ()
        kind = type(exc).__name__
        return InvalidInput(
            entity, [FieldProblem(where, f"refused by PostgreSQL ({kind}, {constraint})", kind)]
        )
    if isinstance(
        exc,
        pgerrors.SerializationFailure | pgerrors.DeadlockDetected | pgerrors.LockNotAvailable,
    ):
        return Contention(f"{entity}: {type(exc).__name__}; nothing was written, retry")
    if conn.broken or isinstance(exc, pgerrors.AdminShutdown | pgerrors.CrashShutdown):
        return OutcomeUnknown(
            f"{entity}: the connection was lost after COMMIT was sent; "
            "the write may or may not have been committed"
        )
    if isinstance(exc, pgerrors.QueryCanceled):
        return Unavailable(f"{entity}: statement timed out; nothing was written")
    return Unavailable(f"{entity}: PostgreSQL refused the write ({type(exc).__name__})")
