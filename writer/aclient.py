"""The :class:`AsyncWriter`: :class:`writer.Writer` for asyncio services.

Every operation of :class:`~writer.Writer`, under the same name, with the same inputs,
outputs (:class:`~writer.db.Written`) and typed errors; it runs the very same plans
(:mod:`writer.steps`) on psycopg's async pool, and password hashing in a worker thread so
the event loop keeps serving::

    writer = await AsyncWriter.connect(os.environ["DATABASE_URL"])
    async with writer:
        created = await writer.create_ticket({"title": "Printer on fire"})

Cancellation: a task cancelled during a write gets its ``CancelledError``; psycopg first
asks the server to cancel the statement, and the connection is then discarded. Each
operation is one statement, so nothing is ever half-written: if the cancel came before
the commit, nothing was written; if the commit had already happened the write stands,
and since the caller cannot know which, treat the outcome as unknown (read the row back).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from pydantic import SecretStr

from schema.models import Agent
from writer import agents, records, tickets
from writer.config import PoolConfig
from writer.db import AsyncDatabase, Written
from writer.errors import OutcomeUnknown
from writer.steps import Offload, Options, Plan, Read, Step, Write, drive_async, method_of

if TYPE_CHECKING:
    from writer.joined import AsyncTransaction

P = ParamSpec("P")
T = TypeVar("T")


class _OwnTransaction:
    """Runs a plan's steps on the async pool; keeps the write's token."""

    __slots__ = ("db", "token")

    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.token: str | None = None

    async def __call__(self, step: Step) -> Any:
        if isinstance(step, Write):
            rows, self.token = await self.db.write(step.entity, step.sql, step.params)
            return rows
        if isinstance(step, Read):
            return [dict(row) for row in await self.db.read(step.sql, step.params)]
        assert isinstance(step, Offload)
        return await asyncio.to_thread(step.fn, *step.args)


def _operation(
    plan: Callable[Concatenate[Options, P], Plan[T]],
) -> Callable[Concatenate[AsyncWriter, P], Coroutine[Any, Any, Written[T]]]:
    async def method(self: AsyncWriter, /, *args: P.args, **kwargs: P.kwargs) -> Written[T]:
        run = _OwnTransaction(self._db)
        value = await drive_async(plan(self._opts, *args, **kwargs), run)
        if run.token is None:  # pragma: no cover - every operation writes
            raise OutcomeUnknown(f"{plan.__name__}: no write was made")
        return Written(value, run.token)

    return method_of(method, plan)


class AsyncWriter:
    """Typed write operations over an async connection pool (see :class:`writer.Writer`)."""

    def __init__(self, database: AsyncDatabase, *, audit: bool = True) -> None:
        self._db = database
        self._opts = Options(audit=audit)

    @classmethod
    async def connect(
        cls,
        database_url: str,
        *,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        pool_timeout: float | None = None,
        pool_recycle: float | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
        audit: bool = True,
    ) -> AsyncWriter:
        """A writer on a new async pool; unset sizes come from ``DB_POOL_*``."""
        config = PoolConfig.resolve(
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            pool_recycle=pool_recycle,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
        )
        database = AsyncDatabase(database_url, pool=config)
        await database.open()
        return cls(database, audit=audit)

    @property
    def database(self) -> AsyncDatabase:
        return self._db

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> AsyncWriter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the caller's transaction ------------------------------------------------------

    @asynccontextmanager
    async def transaction(
        self, conn: Any, *, commit: bool = True
    ) -> AsyncIterator[AsyncTransaction]:
        """Run operations inside the transaction of ``conn`` (see :mod:`writer.joined`).

        ``conn``: a psycopg ``AsyncConnection``, or a SQLAlchemy ``AsyncSession`` /
        ``AsyncConnection`` on psycopg (``postgresql+psycopg://``); an asyncpg-backed one
        is refused with :class:`~writer.errors.InvalidConfiguration`."""
        from writer.joined import AsyncTransaction, run_joined_async

        async with run_joined_async(AsyncTransaction(self, conn), commit=commit) as tx:
            yield tx

    async def token_after_commit(self, tx: AsyncTransaction) -> str:
        """The token of a caller's transaction, once it committed (else ``TokenPending``)."""
        return await tx.token_after_commit()

    # -- operations ----------------------------------------------------------------------

    create_ticket = _operation(tickets.create_ticket)
    update_ticket = _operation(tickets.update_ticket)
    change_ticket_status = _operation(tickets.change_ticket_status)
    resolve_ticket = _operation(tickets.resolve_ticket)
    close_ticket = _operation(tickets.close_ticket)
    reopen_ticket = _operation(tickets.reopen_ticket)
    assign_ticket = _operation(tickets.assign_ticket)
    add_comment = _operation(tickets.add_comment)
    add_attachment = _operation(tickets.add_attachment)
    create_agent = _operation(agents.create_agent)
    update_agent = _operation(agents.update_agent)
    set_agent_password = _operation(agents.set_agent_password)
    deactivate_agent = _operation(agents.deactivate_agent)
    reactivate_agent = _operation(agents.reactivate_agent)
    append_audit_log = _operation(records.append_audit_log)
    record_email = _operation(records.record_email)
    archive_session = _operation(records.archive_session)

    async def authenticate_agent(
        self, username: str, password: str | SecretStr
    ) -> Written[Agent] | None:
        """The agent if ``password`` is right and the account is active, else None."""
        run = _OwnTransaction(self._db)
        agent = await drive_async(agents.authenticate_agent(self._opts, username, password), run)
        if agent is None or run.token is None:
            return None
        return Written(agent, run.token)
