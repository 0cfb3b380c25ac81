"""Writer operations inside a transaction the caller owns, and a token only after its commit.

A service that writes its own rows beside a ticket wants both in one transaction::

    with writer.transaction(session) as tx:          # psycopg or SQLAlchemy, sync or async
        ticket = tx.create_ticket({"title": "Refund"}) # the row, as this transaction sees it
        session.add(Refund(ticket_id=ticket.id))
    reader.ticket(ticket.id, after=tx.token)           # set only once the block committed

The operations are the same plans as :class:`writer.Writer`'s (:mod:`writer.steps`), run on
the caller's connection instead of the pool, and return the value alone: a token stands for
a commit, and the caller's commit has not happened yet. The token belongs to the
transaction:

- ``commit=True`` (default): the block's end commits (an exception rolls back and
  re-raises); ``tx.token`` is then set. Before that, or after a rollback, it raises
  :class:`~writer.errors.TokenPending`.
- ``commit=False``: you commit; then ``tx.token_after_commit()`` (or
  ``writer.token_after_commit(tx)``) returns it.

It cannot be taken too early: on entry the transaction's id is read
(``pg_current_xact_id()``), and the token is only handed out once PostgreSQL reports that
id ``committed`` (``pg_xact_status``); it is then the WAL position read after that commit
(the flush position, or the insert position under ``synchronous_commit=off``).

An error in an operation (a ``Conflict``, say) has aborted the caller's transaction, as any
failed statement does in PostgreSQL: roll back. Connections: a psycopg ``Connection`` /
``AsyncConnection`` (not in autocommit outside a transaction block), or a SQLAlchemy
``Session`` / ``Connection`` / ``AsyncSession`` / ``AsyncConnection`` on the psycopg
dialect. SQLAlchemy on asyncpg is refused with one line
(:class:`~writer.errors.InvalidConfiguration`): its connection speaks another protocol
library, and the writer's statements and error translation are psycopg's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg import pq
from psycopg.rows import dict_row
from pydantic import SecretStr

from schema.models import Agent
from writer import agents, records, tickets
from writer.db import translate
from writer.errors import InvalidConfiguration, TokenPending, Unavailable
from writer.steps import Offload, Options, Plan, Read, Step, Write, drive, drive_async, method_of

if TYPE_CHECKING:
    from writer.aclient import AsyncWriter
    from writer.client import Writer

P = ParamSpec("P")
T = TypeVar("T")

_XID_SQL = "SELECT pg_current_xact_id()::text AS xid, current_setting('synchronous_commit') AS sync"
_STATUS_SQL = (
    "SELECT pg_xact_status(%(xid)s::xid8) AS status,"
    " pg_current_wal_flush_lsn()::text AS flush, pg_current_wal_insert_lsn()::text AS insert"
)
_ASYNCPG = (
    "an asyncpg-backed SQLAlchemy session cannot be joined: use postgresql+psycopg:// "
    "for the engine whose transactions the writer shares"
)


def _driver_of(dbapi: Any, want: type[Any]) -> Any:
    driver = getattr(dbapi, "driver_connection", dbapi)
    if isinstance(driver, want):
        return driver
    if type(driver).__module__.split(".")[0] == "asyncpg":
        raise InvalidConfiguration(_ASYNCPG)
    raise InvalidConfiguration(f"cannot join a transaction on {type(driver).__name__}")


def _check_in_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise InvalidConfiguration(
            "the connection is in autocommit mode outside a transaction block: "
            "open one (conn.transaction()) or let the writer use its own transactions"
        )


def _refused(owner: Any) -> InvalidConfiguration:
    return InvalidConfiguration(f"cannot join a transaction on {type(owner).__name__}")


def _status_token(row: Mapping[str, Any], sync: str) -> str:
    status = row["status"]
    if status == "in progress":
        raise TokenPending("the transaction has not committed yet: commit it, then ask")
    if status == "aborted":
        raise TokenPending("the transaction rolled back: it has no token")
    # committed (or so old PostgreSQL no longer knows: long finished either way)
    return str(row["insert"] if sync == "off" else row["flush"])


def _execute_error(entity: str, exc: psycopg.Error) -> Exception:
    if isinstance(exc, psycopg.OperationalError):
        return Unavailable(f"{entity}: the connection was lost; the transaction did not commit")
    return translate(entity, exc)


class _Joined:
    """What the sync and async transactions share: the id, the token, the refusal."""

    _xid: str | None = None
    _sync: str = "on"
    _token: str | None = None

    @property
    def token(self) -> str:
        """The transaction's token, once the ``transaction()`` block committed it."""
        if self._token is None:
            raise TokenPending(
                "no token before the transaction commits (with commit=False: commit, then "
                "call token_after_commit())"
            )
        return self._token


# -- the operations, attached to both ------------------------------------------------------


def _sync_op(
    plan: Callable[Concatenate[Options, P], Plan[T]],
) -> Callable[Concatenate[Transaction, P], T]:
    def method(self: Transaction, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return drive(plan(self._opts, *args, **kwargs), self._run)

    return method_of(method, plan)


def _async_op(
    plan: Callable[Concatenate[Options, P], Plan[T]],
) -> Callable[Concatenate[AsyncTransaction, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncTransaction, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await drive_async(plan(self._opts, *args, **kwargs), self._run)

    return method_of(method, plan)


# Every plan but authenticate_agent (its None-or-agent result is written out by each layer).
PLANS: dict[str, Callable[..., Plan[Any]]] = {
    "create_ticket": tickets.create_ticket,
    "update_ticket": tickets.update_ticket,
    "change_ticket_status": tickets.change_ticket_status,
    "resolve_ticket": tickets.resolve_ticket,
    "close_ticket": tickets.close_ticket,
    "reopen_ticket": tickets.reopen_ticket,
    "assign_ticket": tickets.assign_ticket,
    "add_comment": tickets.add_comment,
    "add_attachment": tickets.add_attachment,
    "create_agent": agents.create_agent,
    "update_agent": agents.update_agent,
    "set_agent_password": agents.set_agent_password,
    "deactivate_agent": agents.deactivate_agent,
    "reactivate_agent": agents.reactivate_agent,
    "append_audit_log": records.append_audit_log,
    "record_email": records.record_email,
    "archive_session": records.archive_session,
}


# -- sync ---------------------------------------------------------------------------------


class Transaction(_Joined):
    """Operations on the caller's sync connection; returned by :meth:`Writer.transaction`."""

    def __init__(self, writer: Writer, owner: Any) -> None:
        self._writer = writer
        self._opts: Options = writer._opts
        self._owner = owner
        self._conn: psycopg.Connection[Any] = self._connection(owner)

    @staticmethod
    def _connection(owner: Any) -> psycopg.Connection[Any]:
        if isinstance(owner, psycopg.Connection):
            conn = owner
        else:
            from sqlalchemy.engine import Connection as SAConnection
            from sqlalchemy.orm import Session

            if isinstance(owner, Session):
                owner = owner.connection()
            if not isinstance(owner, SAConnection):
                raise _refused(owner)
            if not owner.in_transaction():
                owner.begin()
            conn = _driver_of(owner.connection.dbapi_connection, psycopg.Connection)
        _check_in_transaction(conn)
        return conn

    def _begin(self) -> None:
        row = self._fetch("transaction", _XID_SQL, {})[0]
        self._xid, self._sync = row["xid"], row["sync"]

    def _fetch(self, entity: str, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            with self._conn.cursor(row_factory=dict_row) as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise _execute_error(entity, exc) from None

    def _run(self, step: Step) -> Any:
        if isinstance(step, Write):
            return self._fetch(step.entity, step.sql, step.params)
        if isinstance(step, Read):
            return self._fetch("read", step.sql, step.params)
        assert isinstance(step, Offload)
        return step.fn(*step.args)

    def token_after_commit(self) -> str:
        """The WAL position past this transaction's commit; ``TokenPending`` before it."""
        if self._token is None:
            assert self._xid is not None
            rows = self._writer.database.read(_STATUS_SQL, {"xid": self._xid})
            self._token = _status_token(rows[0], self._sync)
        return self._token

    def _commit(self) -> None:
        self._owner.commit()

    def _rollback(self) -> None:
        self._owner.rollback()

    create_ticket = _sync_op(tickets.create_ticket)
    update_ticket = _sync_op(tickets.update_ticket)
    change_ticket_status = _sync_op(tickets.change_ticket_status)
    resolve_ticket = _sync_op(tickets.resolve_ticket)
    close_ticket = _sync_op(tickets.close_ticket)
    reopen_ticket = _sync_op(tickets.reopen_ticket)
    assign_ticket = _sync_op(tickets.assign_ticket)
    add_comment = _sync_op(tickets.add_comment)
    add_attachment = _sync_op(tickets.add_attachment)
    create_agent = _sync_op(agents.create_agent)
    update_agent = _sync_op(agents.update_agent)
    set_agent_password = _sync_op(agents.set_agent_password)
    deactivate_agent = _sync_op(agents.deactivate_agent)
    reactivate_agent = _sync_op(agents.reactivate_agent)
    append_audit_log = _sync_op(records.append_audit_log)
    record_email = _sync_op(records.record_email)
    archive_session = _sync_op(records.archive_session)

    def authenticate_agent(self, username: str, password: str | SecretStr) -> Agent | None:
        return drive(agents.authenticate_agent(self._opts, username, password), self._run)


@contextmanager
def run_joined(tx: Transaction, *, commit: bool) -> Iterator[Transaction]:
    tx._begin()
    try:
        yield tx
    except BaseException:
        if commit:
            tx._rollback()
        raise
    if commit:
        tx._commit()
        tx.token_after_commit()


# -- async --------------------------------------------------------------------------------


class AsyncTransaction(_Joined):
    """Operations on the caller's async connection (:meth:`AsyncWriter.transaction`)."""

    def __init__(self, writer: AsyncWriter, owner: Any) -> None:
        self._writer = writer
        self._opts: Options = writer._opts
        self._owner = owner
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        owner = self._owner
        if isinstance(owner, psycopg.AsyncConnection):
            conn = owner
        else:
            from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

            if isinstance(owner, AsyncSession):
                owner = await owner.connection()
            if not isinstance(owner, AsyncConnection):
                raise _refused(owner)
            if not owner.in_transaction():
                await owner.begin()
            raw = await owner.get_raw_connection()
            conn = _driver_of(raw.dbapi_connection, psycopg.AsyncConnection)
        _check_in_transaction(conn)
        return conn

    async def _begin(self) -> None:
        self._conn = await self._connection()
        row = (await self._fetch("transaction", _XID_SQL, {}))[0]
        self._xid, self._sync = row["xid"], row["sync"]

    async def _fetch(
        self, entity: str, sql: str, params: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        assert self._conn is not None
        try:
            async with self._conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(sql, params)
                return await cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise _execute_error(entity, exc) from None

    async def _run(self, step: Step) -> Any:
        if isinstance(step, Write):
            return await self._fetch(step.entity, step.sql, step.params)
        if isinstance(step, Read):
            return await self._fetch("read", step.sql, step.params)
        assert isinstance(step, Offload)
        return await asyncio.to_thread(step.fn, *step.args)

    async def token_after_commit(self) -> str:
        """The WAL position past this transaction's commit; ``TokenPending`` before it."""
        if self._token is None:
            assert self._xid is not None
            rows = await self._writer.database.read(_STATUS_SQL, {"xid": self._xid})
            self._token = _status_token(rows[0], self._sync)
        return self._token

    create_ticket = _async_op(tickets.create_ticket)
    update_ticket = _async_op(tickets.update_ticket)
    change_ticket_status = _async_op(tickets.change_ticket_status)
    resolve_ticket = _async_op(tickets.resolve_ticket)
    close_ticket = _async_op(tickets.close_ticket)
    reopen_ticket = _async_op(tickets.reopen_ticket)
    assign_ticket = _async_op(tickets.assign_ticket)
    add_comment = _async_op(tickets.add_comment)
    add_attachment = _async_op(tickets.add_attachment)
    create_agent = _async_op(agents.create_agent)
    update_agent = _async_op(agents.update_agent)
    set_agent_password = _async_op(agents.set_agent_password)
    deactivate_agent = _async_op(agents.deactivate_agent)
    reactivate_agent = _async_op(agents.reactivate_agent)
    append_audit_log = _async_op(records.append_audit_log)
    record_email = _async_op(records.record_email)
    archive_session = _async_op(records.archive_session)

    async def authenticate_agent(self, username: str, password: str | SecretStr) -> Agent | None:
        return await drive_async(
            agents.authenticate_agent(self._opts, username, password), self._run
        )


@asynccontextmanager
async def run_joined_async(
    tx: AsyncTransaction, *, commit: bool
) -> AsyncIterator[AsyncTransaction]:
    await tx._begin()
    try:
        yield tx
    except BaseException:
        if commit:
            await tx._owner.rollback()
        raise
    if commit:
        await tx._owner.commit()
        await tx.token_after_commit()
