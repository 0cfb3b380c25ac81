"""Running one write operation as one PostgreSQL transaction, in one round trip.

Each operation is a single SQL statement (data-modifying CTEs carry the history and audit
rows along) run in autocommit mode, so it is its own transaction; the read-your-writes
token, the WAL flush position read after that commit, comes back in the same round trip
(:mod:`writer.pipeline`). The cache reader waits until the daemon's checkpoint reaches it.

:class:`Database` runs writes on psycopg's pool, :class:`AsyncDatabase` on its async pool;
both run the same exchange (:func:`writer.pipeline.execute_with_token`, a generator) and
share the error translation.

Driver errors become :mod:`writer.errors`; a connection lost once the write was sent
means it may have committed, so it becomes :class:`~writer.errors.OutcomeUnknown`. An
async task cancelled during a write gets its ``CancelledError`` (psycopg first asks the
server to cancel the statement); its connection is discarded, never reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from schema.dsn import DsnError, parse_dsn
from writer.config import PoolConfig
from writer.errors import (
    Conflict,
    FieldProblem,
    InvalidInput,
    InvalidReference,
    OutcomeUnknown,
    Unavailable,
    WriterError,
)
from writer.pipeline import (
    TOKEN_SQL,
    Outcome,
    SendFailed,
    configure,
    configure_async,
    execute_with_token,
    statement,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Written(Generic[T]):
    """What a write returns: the row as written and the read-your-writes token."""

    value: T
    token: str


class Contention(Unavailable):
    """Deadlock, serialization failure or lock timeout: nothing was written; retry."""


class InvalidDatabaseUrl(WriterError, DsnError):
    """The connection string is not one libpq takes (the message never quotes it)."""


def normalize_conninfo(url: str) -> str:
    """The libpq keyword DSN for any form :func:`schema.dsn.parse_dsn` takes (URL, keyword
    DSN, service, ``postgresql+psycopg://``, ``postgresql+asyncpg://``)."""
    try:
        return parse_dsn(url, "the database URL").conninfo
    except DsnError as exc:
        raise InvalidDatabaseUrl(str(exc)) from None


def _pool_kwargs(application_name: str, statement_timeout_ms: int) -> dict[str, Any]:
    return {
        "autocommit": True,
        "row_factory": dict_row,
        "application_name": application_name,
        "options": f"-c statement_timeout={int(statement_timeout_ms)}",
    }


def _result(entity: str, outcome: Outcome) -> tuple[list[dict[str, Any]], str | None]:
    if outcome.error is not None:
        raise translate(entity, outcome.error) from None
    return outcome.rows, outcome.token


def _lost(entity: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"{entity}: the connection was lost after the write was sent; "
        "the write may or may not have been committed"
    )


def _closed(entity: str) -> Unavailable:
    return Unavailable(f"{entity}: the pooled connection was closed; nothing was written")


def _token_row(row: Mapping[str, Any] | None) -> str:
    if row is None:  # pragma: no cover - the server always answers
        raise OutcomeUnknown("no WAL position came back after the write")
    return str(next(iter(row.values())))


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
        pool: PoolConfig | None = None,
    ) -> None:
        config = pool or PoolConfig(
            size=min_size, max_overflow=max_size - min_size, timeout=timeout
        )
        self.config = config
        self.timeout = config.timeout
        # Longest wait for an answer: the server's statement_timeout, plus the pool's.
        self.wait_timeout = statement_timeout_ms / 1000 + max(config.timeout, 5.0)
        self.pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            normalize_conninfo(conninfo),
            min_size=config.min_size,
            max_size=config.max_size,
            timeout=config.timeout,
            max_lifetime=config.recycle,
            open=False,
            name=application_name,
            connection_class=psycopg.Connection[DictRow],
            configure=configure,
            kwargs=_pool_kwargs(application_name, statement_timeout_ms),
        )

    def open(self, wait: bool = True) -> None:
        try:
            self.pool.open(wait=wait, timeout=self.timeout)
        except PoolTimeout as exc:
            raise Unavailable("could not connect to PostgreSQL") from exc

    def close(self) -> None:
        self.pool.close()

    def write(
        self, entity: str, sql: str, params: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], str]:
        """Run ``sql`` in its own transaction; return its rows and the token."""
        stmt = statement(sql)
        try:
            conn_cm = self.pool.connection()
            conn = conn_cm.__enter__()
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable("could not connect to PostgreSQL") from exc
        try:
            try:
                outcome = conn.wait(
                    execute_with_token(conn, stmt, params), timeout=self.wait_timeout
                )
            except SendFailed:
                conn.close()
                raise _closed(entity) from None
            except psycopg.OperationalError:
                conn.close()
                raise _lost(entity) from None
            except BaseException:
                # Interrupted mid-exchange: the connection's state is unknown; drop it.
                conn.close()
                raise
            rows, token = _result(entity, outcome)
            return rows, token or self.position()
        finally:
            conn_cm.__exit__(None, None, None)

    def position(self) -> str:
        """The WAL position now, read on any connection: past every commit that returned.

        Also the fallback when a write committed but its token query failed."""
        try:
            with self.pool.connection() as other:
                row = other.execute(TOKEN_SQL.decode()).fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise OutcomeUnknown(
                "the write was committed but no WAL position could be read for its token"
            ) from exc
        return _token_row(row)

    def read(self, sql: str, params: Mapping[str, Any]) -> list[DictRow]:
        try:
            with self.pool.connection() as conn:
                return conn.execute(sql, params).fetchall()
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable("PostgreSQL read failed: connection lost") from exc


class AsyncDatabase:
    """:class:`Database` on psycopg's async pool (``psycopg_pool.AsyncConnectionPool``)."""

    def __init__(
        self,
        conninfo: str,
        *,
        pool: PoolConfig | None = None,
        statement_timeout_ms: int = 30_000,
        application_name: str = "writer",
    ) -> None:
        config = pool or PoolConfig()
        self.config = config
        self.timeout = config.timeout
        # Longest wait for an answer: the server's statement_timeout, plus the pool's.
        self.wait_timeout = statement_timeout_ms / 1000 + max(config.timeout, 5.0)
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = AsyncConnectionPool(
            normalize_conninfo(conninfo),
            min_size=config.min_size,
            max_size=config.max_size,
            timeout=config.timeout,
            max_lifetime=config.recycle,
            open=False,
            name=application_name,
            connection_class=psycopg.AsyncConnection[DictRow],
            configure=configure_async,
            kwargs=_pool_kwargs(application_name, statement_timeout_ms),
        )

    async def open(self, wait: bool = True) -> None:
        try:
            await self.pool.open(wait=wait, timeout=self.timeout)
        except PoolTimeout as exc:
            raise Unavailable("could not connect to PostgreSQL") from exc

    async def close(self) -> None:
        await self.pool.close()

    async def write(
        self, entity: str, sql: str, params: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], str]:
        """Run ``sql`` in its own transaction; return its rows and the token."""
        stmt = statement(sql)
        try:
            conn = await self.pool.getconn()
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable("could not connect to PostgreSQL") from exc
        try:
            try:
                outcome = await conn.wait(
                    execute_with_token(conn, stmt, params), timeout=self.wait_timeout
                )
            except SendFailed:
                await conn.close()
                raise _closed(entity) from None
            except psycopg.OperationalError:
                await conn.close()
                raise _lost(entity) from None
            except BaseException:
                # Cancelled (or interrupted) mid-exchange: psycopg asked the server to cancel
                # the statement; whatever state the connection is in, it is not reused.
                await conn.close()
                raise
            rows, token = _result(entity, outcome)
            return rows, token or await self.position()
        finally:
            await self.pool.putconn(conn)

    async def position(self) -> str:
        """The WAL position now (see :meth:`Database.position`)."""
        try:
            async with self.pool.connection() as other:
                cur = await other.execute(TOKEN_SQL.decode())
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise OutcomeUnknown(
                "the write was committed but no WAL position could be read for its token"
            ) from exc
        return _token_row(row)

    async def read(self, sql: str, params: Mapping[str, Any]) -> list[DictRow]:
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql, params)
                return await cur.fetchall()
        except PoolTimeout as exc:
            raise Unavailable("no PostgreSQL connection available") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable("PostgreSQL read failed: connection lost") from exc


def translate(entity: str, exc: psycopg.Error) -> WriterError:
    """A driver error of a write as the writer's typed error (names, never values)."""
    constraint = exc.diag.constraint_name if exc.diag else None
    if isinstance(exc, pgerrors.UniqueViolation):
        return Conflict(entity, constraint)
    if isinstance(exc, pgerrors.ForeignKeyViolation):
        return InvalidReference(entity, constraint)
    if isinstance(exc, pgerrors.IntegrityConstraintViolation | pgerrors.DataError):
        column = exc.diag.column_name if exc.diag else None
        where: tuple[str | int, ...] = (column,) if column else ()
        kind = type(exc).__name__
        problem = FieldProblem(where, f"refused by PostgreSQL ({kind}, {constraint})", kind)
        return InvalidInput(entity, [problem])
    if isinstance(
        exc,
        pgerrors.SerializationFailure | pgerrors.DeadlockDetected | pgerrors.LockNotAvailable,
    ):
        return Contention(f"{entity}: {type(exc).__name__}; nothing was written, retry")
    if isinstance(exc, pgerrors.AdminShutdown | pgerrors.CrashShutdown):
        return OutcomeUnknown(
            f"{entity}: the server ended the session while committing; "
            "the write may or may not have been committed"
        )
    if isinstance(exc, pgerrors.QueryCanceled):
        return Unavailable(f"{entity}: statement timed out; nothing was written")
    return Unavailable(f"{entity}: PostgreSQL refused the write ({type(exc).__name__})")
