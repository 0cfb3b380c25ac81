"""Writer operations inside the caller's transaction: psycopg and SQLAlchemy, sync and async.

Every mode runs every operation (the scenario of ``test_writer_async``) beside a row of
the service's own, and both commit or roll back together. The token exists only after the
commit, and never earlier.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from tests.test_writer_async import (
    Conn,
    assert_landed,
    assert_nothing_written,
    every_operation,
    one,
    run,
)
from writer import (
    AsyncTransaction,
    AsyncWriter,
    Conflict,
    InvalidConfiguration,
    TokenPending,
    Transaction,
    Writer,
)
from writer.reader import parse_lsn

REFUND = "INSERT INTO refunds (id, ticket_id) VALUES ('r1', %(ticket)s)"


class Boom(Exception):
    pass


@pytest.fixture
def service_table(pg: Conn) -> None:
    pg.execute("CREATE TABLE refunds (id text PRIMARY KEY, ticket_id text NOT NULL)")


def sa_url(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


# -- how each kind of caller's connection is opened and writes its own row -----------------

Opener = Callable[[str], contextlib.AbstractAsyncContextManager[tuple[Any, Any]]]


@contextlib.asynccontextmanager
async def psycopg_async(url: str) -> AsyncIterator[tuple[Any, Any]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:

        async def own_row(ticket: str) -> None:
            await conn.execute(REFUND, {"ticket": ticket})

        yield conn, own_row


@contextlib.asynccontextmanager
async def sqlalchemy_async_session(url: str) -> AsyncIterator[tuple[Any, Any]]:
    engine = create_async_engine(sa_url(url, "psycopg"))
    try:
        async with AsyncSession(engine) as session:

            async def own_row(ticket: str) -> None:
                await session.execute(
                    text("INSERT INTO refunds (id, ticket_id) VALUES ('r1', :t)"), {"t": ticket}
                )

            yield session, own_row
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def sqlalchemy_async_connection(url: str) -> AsyncIterator[tuple[Any, Any]]:
    engine = create_async_engine(sa_url(url, "psycopg"))
    try:
        async with engine.connect() as conn:

            async def own_row(ticket: str) -> None:
                await conn.execute(
                    text("INSERT INTO refunds (id, ticket_id) VALUES ('r1', :t)"), {"t": ticket}
                )

            yield conn, own_row
    finally:
        await engine.dispose()


ASYNC_MODES: dict[str, Opener] = {
    "psycopg": psycopg_async,
    "sqlalchemy-session": sqlalchemy_async_session,
    "sqlalchemy-connection": sqlalchemy_async_connection,
}


@pytest.mark.parametrize("mode", list(ASYNC_MODES))
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
@pytest.mark.usefixtures("service_table")
def test_async_caller_transaction_commits_or_rolls_back_everything(
    database_url: str, pg: Conn, mode: str, outcome: str
) -> None:
    state: dict[str, Any] = {}

    async def scenario() -> None:
        async with (
            await AsyncWriter.connect(database_url, max_size=2) as writer,
            ASYNC_MODES[mode](database_url) as (owner, own_row),
        ):
            transaction = writer.transaction(owner)
            with contextlib.suppress(Boom):
                async with transaction as tx:
                    state["tx"] = tx

                    async def call(name: str, *args: Any, **kwargs: Any) -> Any:
                        return await getattr(tx, name)(*args, **kwargs)

                    state["ids"] = await every_operation(call)
                    await own_row(state["ids"]["ticket"])
                    # Nothing is visible outside, and there is no token yet.
                    assert one(pg, "SELECT count(*) FROM tickets") == 0
                    with pytest.raises(TokenPending):
                        _ = tx.token
                    if outcome == "rollback":
                        raise Boom
            done: AsyncTransaction = state["tx"]
            if outcome == "commit":
                state["token"] = done.token
                assert await writer.token_after_commit(done) == done.token
            else:
                with pytest.raises(TokenPending):
                    _ = done.token
                with pytest.raises(TokenPending):
                    await done.token_after_commit()

    run(scenario())
    if outcome == "commit":
        assert_landed(pg, state["ids"])
        assert one(pg, "SELECT ticket_id FROM refunds") == state["ids"]["ticket"]
        assert parse_lsn(state["token"]) <= parse_lsn(
            one(pg, "SELECT pg_current_wal_flush_lsn()::text")
        )
        # The token is past the commit: the ticket's own transaction ended before it.
        assert parse_lsn(state["token"]) > 0
    else:
        assert_nothing_written(pg)
        assert one(pg, "SELECT count(*) FROM refunds") == 0


@pytest.mark.parametrize("kind", ["psycopg", "sqlalchemy-session", "sqlalchemy-connection"])
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
@pytest.mark.usefixtures("service_table")
def test_sync_caller_transaction_commits_or_rolls_back_everything(
    database_url: str, writer: Writer, pg: Conn, kind: str, outcome: str
) -> None:
    engine = create_engine(sa_url(database_url, "psycopg"))
    with contextlib.ExitStack() as stack:
        owner: Any
        if kind == "psycopg":
            owner = stack.enter_context(psycopg.connect(database_url))
        else:
            owner = stack.enter_context(
                Session(engine) if kind == "sqlalchemy-session" else engine.connect()
            )

        def own(ticket: str) -> None:
            if kind == "psycopg":
                owner.execute(REFUND, {"ticket": ticket})
            else:
                owner.execute(
                    text("INSERT INTO refunds (id, ticket_id) VALUES ('r1', :t)"), {"t": ticket}
                )

        ids: dict[str, str] = {}
        seen: list[Transaction] = []
        with contextlib.suppress(Boom), writer.transaction(owner) as tx:
            seen.append(tx)
            ticket = tx.create_ticket({"title": "t"})
            tx.change_ticket_status(ticket.id, {"to_status": "pending"})
            ids["ticket"] = ticket.id
            own(ticket.id)
            with pytest.raises(TokenPending):
                writer.token_after_commit(tx)
            if outcome == "rollback":
                raise Boom
    engine.dispose()
    (tx,) = seen
    if outcome == "commit":
        assert parse_lsn(tx.token) > 0
        row = one(pg, "SELECT status FROM tickets WHERE id = %s", ids["ticket"])
        assert row == "pending"
        assert one(pg, "SELECT count(*) FROM refunds") == 1
        assert one(pg, "SELECT count(*) FROM ticket_status_history") == 1
    else:
        with pytest.raises(TokenPending):
            _ = tx.token
        assert_nothing_written(pg)
        assert one(pg, "SELECT count(*) FROM refunds") == 0


def test_commit_false_leaves_the_commit_to_the_caller(
    database_url: str, writer: Writer, pg: Conn
) -> None:
    with psycopg.connect(database_url) as conn:
        with writer.transaction(conn, commit=False) as tx:
            tx.create_ticket({"title": "mine to commit"})
        # The block ended without committing: still no token, nothing visible.
        with pytest.raises(TokenPending):
            tx.token_after_commit()
        assert one(pg, "SELECT count(*) FROM tickets") == 0
        conn.commit()
        token = tx.token_after_commit()
        assert writer.token_after_commit(tx) == token
        assert one(pg, "SELECT count(*) FROM tickets") == 1

        with writer.transaction(conn, commit=False) as rolled:
            rolled.create_ticket({"title": "rolled back"})
        conn.rollback()
        with pytest.raises(TokenPending):
            rolled.token_after_commit()
    assert one(pg, "SELECT count(*) FROM tickets") == 1


def test_an_error_inside_the_caller_transaction_is_typed_and_rolls_it_back(
    database_url: str, writer: Writer, pg: Conn
) -> None:
    writer.create_ticket({"ticket_number": "EXT-1", "title": "exists"})

    def both() -> None:
        with writer.transaction(conn) as tx:
            tx.create_ticket({"title": "would be fine"})
            tx.create_ticket({"ticket_number": "EXT-1", "title": "duplicate"})

    with psycopg.connect(database_url) as conn, pytest.raises(Conflict):
        both()
    assert one(pg, "SELECT count(*) FROM tickets") == 1


def test_connections_the_writer_cannot_join_are_refused_in_one_line(
    database_url: str, writer: Writer
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with pytest.raises(InvalidConfiguration) as info, writer.transaction(conn):
            pass
        assert "autocommit" in str(info.value)
        # Inside an explicit transaction block an autocommit connection is fine.
        with conn.transaction(), writer.transaction(conn, commit=False) as tx:
            tx.create_ticket({"title": "in a block"})
        assert tx.token_after_commit()

    async def asyncpg_session() -> None:
        engine = create_async_engine(sa_url(database_url, "asyncpg"))
        try:
            async with (
                await AsyncWriter.connect(database_url, max_size=1) as awriter,
                AsyncSession(engine) as session,
            ):
                with pytest.raises(InvalidConfiguration) as refused:
                    async with awriter.transaction(session):
                        pass
                message = str(refused.value)
                assert "asyncpg" in message
                assert "postgresql+psycopg://" in message
                assert "\n" not in message
        finally:
            await engine.dispose()

    run(asyncpg_session())
    with pytest.raises(InvalidConfiguration), writer.transaction(object()):
        pass
