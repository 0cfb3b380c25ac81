"""AsyncWriter against a real PostgreSQL: every operation, typed errors, cancellation, pool.

The scenario in :func:`every_operation` is shared with the caller's-transaction tests
(``test_writer_async_tx.py``): it runs each operation once through an adapter, so the same
assertions cover the own-transaction and the caller's-transaction modes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import pytest

from tests.helpers import wait_for
from writer import (
    AsyncTransaction,
    AsyncWriter,
    Conflict,
    InvalidConfiguration,
    InvalidInput,
    InvalidReference,
    InvalidTransition,
    NotFound,
    PoolConfig,
    Transaction,
    Writer,
    Written,
)
from writer.joined import PLANS
from writer.reader import parse_lsn

Conn = psycopg.Connection[tuple[Any, ...]]
Call = Callable[..., Awaitable[Any]]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def one(pg: Conn, sql: str, *params: Any) -> Any:
    row = pg.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


async def every_operation(call: Call) -> dict[str, str]:
    """Each writer operation once, through ``call(name, *args, **kwargs) -> value``."""
    agent = (
        await call(
            "create_agent",
            {"username": "ann", "display_name": "Ann", "password": "correct horse"},
        )
    ).id
    ticket = (await call("create_ticket", {"title": "t", "priority": "high"}, actor=agent)).id
    assert (await call("update_ticket", ticket, {"title": "t2"})).title == "t2"
    moved = await call("change_ticket_status", ticket, {"to_status": "in_progress"}, actor=agent)
    assert moved.status.value == "in_progress"
    assert (await call("assign_ticket", ticket, {"agent_id": agent})).assignee_id == agent
    comment = await call("add_comment", ticket, {"content": "hello", "author_id": agent})
    await call(
        "add_attachment",
        ticket,
        {"filename": "a.png", "stored_path": "/f/a.png", "size_bytes": 3, "comment_id": comment.id},
    )
    assert (await call("resolve_ticket", ticket, resolution="fixed")).resolution == "fixed"
    assert (await call("close_ticket", ticket)).closed_at is not None
    assert (await call("reopen_ticket", ticket)).reopen_count == 1
    assert (await call("update_agent", agent, {"status": "busy"})).status.value == "busy"
    await call("set_agent_password", agent, "battery staple")
    assert await call("authenticate_agent", "ann", "correct horse") is None
    logged_in = await call("authenticate_agent", "ann", "battery staple")
    assert logged_in is not None
    assert logged_in.last_login_at is not None
    assert not (await call("deactivate_agent", agent)).is_active
    assert (await call("reactivate_agent", agent)).is_active
    await call("append_audit_log", {"event_type": "export", "details": {"rows": 3}})
    await call(
        "record_email",
        {
            "email_type": "ticket_reply",
            "sender": "support@example.com",
            "recipients": ["bob@example.com"],
            "subject": "Re: t2",
            "sent_at": datetime.now(UTC),
        },
    )
    archive = await call("archive_session", {"session_name": "chat-1", "history": [{"a": 1}]})
    assert archive.message_count == 1
    return {"agent": agent, "ticket": ticket}


def assert_landed(pg: Conn, ids: dict[str, str]) -> None:
    """What :func:`every_operation` leaves in PostgreSQL once committed."""
    ticket = one(
        pg,
        "SELECT title, status, reopen_count, assignee_id FROM tickets WHERE id = %s",
        ids["ticket"],
    )
    assert ticket == ("t2", "open", 1, ids["agent"])
    history = pg.execute(
        "SELECT to_status FROM ticket_status_history WHERE ticket_id = %s ORDER BY id",
        (ids["ticket"],),
    ).fetchall()
    assert [h[0] for h in history] == ["in_progress", "resolved", "closed", "open"]
    agent = one(
        pg,
        "SELECT status, is_active, last_login_at IS NOT NULL FROM agents WHERE id = %s",
        ids["agent"],
    )
    assert agent == ("offline", True, True)
    counts = one(
        pg,
        "SELECT (SELECT count(*) FROM ticket_assignments), (SELECT count(*) FROM ticket_comments),"
        " (SELECT count(*) FROM ticket_attachments), (SELECT count(*) FROM email_records),"
        " (SELECT count(*) FROM session_archives),"
        " (SELECT count(*) FROM audit_logs WHERE event_type = 'agent.logged_in')",
    )
    assert counts == (1, 1, 1, 1, 1, 1)


def assert_nothing_written(pg: Conn) -> None:
    counts = one(
        pg,
        "SELECT (SELECT count(*) FROM tickets), (SELECT count(*) FROM agents),"
        " (SELECT count(*) FROM ticket_status_history), (SELECT count(*) FROM audit_logs),"
        " (SELECT count(*) FROM ticket_comments), (SELECT count(*) FROM session_archives)",
    )
    assert counts == (0, 0, 0, 0, 0, 0)


def test_every_async_operation_with_increasing_tokens(database_url: str, pg: Conn) -> None:
    tokens: list[str] = []

    async def scenario() -> dict[str, str]:
        async with await AsyncWriter.connect(database_url, max_size=4) as writer:

            async def call(name: str, *args: Any, **kwargs: Any) -> Any:
                written = await getattr(writer, name)(*args, **kwargs)
                if written is None:
                    return None
                assert isinstance(written, Written)
                tokens.append(written.token)
                return written.value

            return await every_operation(call)

    ids = run(scenario())
    assert_landed(pg, ids)
    positions = [parse_lsn(t) for t in tokens]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    assert parse_lsn(one(pg, "SELECT pg_current_wal_flush_lsn()::text")) >= positions[-1]


def test_async_errors_are_the_same_typed_errors(database_url: str, pg: Conn) -> None:
    async def scenario() -> None:
        async with await AsyncWriter.connect(database_url, max_size=2) as writer:
            await writer.create_ticket({"ticket_number": "EXT-1", "title": "a"})
            with pytest.raises(Conflict) as conflict:
                await writer.create_ticket({"ticket_number": "EXT-1", "title": "b"})
            assert conflict.value.constraint == "uq_tickets_ticket_number"
            with pytest.raises(NotFound):
                await writer.update_ticket("ghost", {"title": "x"})
            with pytest.raises(NotFound):
                await writer.add_comment("ghost", {"content": "x"})
            created = (await writer.create_ticket({"title": "c"})).value
            await writer.close_ticket(created.id)
            with pytest.raises(InvalidTransition):
                await writer.change_ticket_status(created.id, {"to_status": "pending"})
            with pytest.raises(InvalidReference):
                await writer.assign_ticket(created.id, {"agent_id": "ghost"})
            with pytest.raises(InvalidInput) as bad:
                await writer.create_ticket({"title": ""})
            assert "title" in bad.value.fields

    run(scenario())
    assert one(pg, "SELECT count(*) FROM tickets") == 2


def test_every_layer_has_every_operation_with_the_same_signature() -> None:
    layers = (Writer, AsyncWriter, Transaction, AsyncTransaction)
    for name in {*PLANS, "authenticate_agent"}:
        shapes = {
            tuple(
                (p.name, p.kind, p.default)
                for p in inspect.signature(getattr(layer, name)).parameters.values()
            )
            for layer in layers
        }
        assert len(shapes) == 1, (name, shapes)
        for layer in (AsyncWriter, AsyncTransaction):
            assert inspect.iscoroutinefunction(getattr(layer, name)), (layer, name)
    for name, plan in PLANS.items():
        wanted = list(inspect.signature(plan).parameters)[1:]
        assert list(inspect.signature(getattr(Writer, name)).parameters)[1:] == wanted


def test_password_hashing_is_offloaded_from_the_plan() -> None:
    """argon2 is an Offload step: the async layers run it in a worker thread."""
    from writer.agents import authenticate_agent, create_agent
    from writer.steps import Offload, Options, Write

    plan = create_agent(Options(), {"username": "u", "display_name": "U", "password": "12345678"})
    step = next(plan)
    assert isinstance(step, Offload)
    assert isinstance(plan.send("$argon2id$fake"), Write)
    login = authenticate_agent(Options(), "u", "12345678")
    next(login)  # the Read
    assert isinstance(login.send([{"id": "a", "is_active": True, "password_hash": "h"}]), Offload)


def test_a_cancelled_write_is_cancelled_on_the_server_and_its_connection_dropped(
    database_url: str, pg: Conn
) -> None:
    """CancelledError propagates; the blocked statement is cancelled, nothing is written."""
    created: dict[str, str] = {}

    async def scenario() -> None:
        async with await AsyncWriter.connect(database_url, pool_size=1, max_overflow=0) as writer:
            ticket = (await writer.create_ticket({"title": "before"})).value
            created["id"] = ticket.id
            with psycopg.connect(database_url) as locker:
                locker.execute("SELECT 1 FROM tickets WHERE id = %s FOR UPDATE", (ticket.id,))
                task = asyncio.create_task(writer.update_ticket(ticket.id, {"title": "after"}))

                def blocked() -> bool:
                    return bool(
                        one(
                            pg,
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND datname = current_database()",
                        )
                    )

                while not blocked():
                    await asyncio.sleep(0.01)
                (old_pid,) = pg.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                ).fetchone() or (None,)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # The backend gave up the statement (cancelled) and its session is gone.
                wait_for(
                    lambda: (
                        not one(pg, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", old_pid)
                    ),
                    what="the cancelled write's session to end",
                )
                locker.rollback()
            # The pool replaced the connection: the writer still works.
            again = await writer.update_ticket(ticket.id, {"title": "later"})
            assert again.value.title == "later"

    run(scenario())
    assert one(pg, "SELECT title FROM tickets WHERE id = %s", created["id"]) == "later"
    events = pg.execute("SELECT event_type FROM audit_logs ORDER BY id").fetchall()
    # The cancelled update left no audit row: only the create and the later update.
    assert [e[0] for e in events] == ["ticket.created", "ticket.updated"]


def test_pool_settings_from_environment_and_arguments(database_url: str) -> None:
    env = {
        "DB_POOL_SIZE": "3",
        "DB_MAX_OVERFLOW": "4",
        "DB_POOL_TIMEOUT": "7.5",
        "DB_POOL_RECYCLE": "600",
    }
    assert PoolConfig.resolve(environ=env) == PoolConfig(3, 4, 7.5, 600.0)
    assert PoolConfig.resolve(environ={}) == PoolConfig()
    explicit = PoolConfig.resolve(pool_size=1, pool_timeout=2, environ=env)
    assert (explicit.min_size, explicit.max_size, explicit.timeout) == (1, 5, 2)
    assert PoolConfig.resolve(max_size=4, environ={}).max_size == 4
    clamped = PoolConfig.resolve(max_size=2, environ=env)  # explicit beats DB_POOL_SIZE=3
    assert (clamped.min_size, clamped.max_size) == (2, 2)
    with pytest.raises(InvalidConfiguration):
        PoolConfig.resolve(pool_size=3, max_size=2, environ={})
    for name, value in [
        ("DB_POOL_SIZE", "ten"),
        ("DB_MAX_OVERFLOW", "-1"),
        ("DB_POOL_TIMEOUT", "0"),
        ("DB_POOL_RECYCLE", "0"),
    ]:
        with pytest.raises(InvalidConfiguration) as info:
            PoolConfig.resolve(environ={name: value})
        assert name in str(info.value)
        assert "\n" not in str(info.value)

    async def scenario() -> None:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            url = database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
            async with await AsyncWriter.connect(url) as writer:
                pool = writer.database.pool
                assert (pool.min_size, pool.max_size, pool.timeout, pool.max_lifetime) == (
                    3,
                    7,
                    7.5,
                    600.0,
                )
                assert (await writer.create_ticket({"title": "via +asyncpg"})).token

    run(scenario())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DB_POOL_SIZE", "2")
        url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
        with Writer.connect(url, max_overflow=1) as writer:
            assert (writer.database.pool.min_size, writer.database.pool.max_size) == (2, 3)
