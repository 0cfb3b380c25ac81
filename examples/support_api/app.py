"""A support-desk API on the writer: what replaces the seeds' dual-writing ``TicketStore``.

The seeds' service wrote PostgreSQL, then Redis ("retry once, then log"), so the cache
drifted. Here the store writes PostgreSQL only (:class:`writer.AsyncWriter`); the ``cdc``
daemon derives Redis from the WAL, and every write answers a ``token``. A client that
passes it back (``GET /tickets/{id}?after=<token>``) reads from the cache once it
reflects that write, so it always sees its own writes, and PostgreSQL only when the cache
is behind or missing the row.

Routes::

    POST  /agents                      create an agent (password hashed, never cached)
    POST  /login                       agent login: username looked up in the cache
                                       (agent:username:{…}), password checked in PostgreSQL
    POST  /tickets                     create                      -> {"ticket", "token"}
    PATCH /tickets/{id}                update fields               -> {"ticket", "token"}
    POST  /tickets/{id}/status         change status
    POST  /tickets/{id}/assign         assign (agent_id null: unassign)
    POST  /tickets/{id}/close          close, with an optional closing note: the comment and
                                       the close are ONE transaction of the service's own
                                       SQLAlchemy session (the caller's-transaction mode)
    POST  /tickets/{id}/comments       comment
    GET   /tickets/{id}?after=<token>  read (cache first)
    GET   /tickets?status=open&after=  the status view, newest first
    GET   /agents/{id}/tickets?after=  an agent's tickets

Run it (with the daemon running against the same servers)::

    DATABASE_URL=postgresql+psycopg://… REDIS_URL=redis://… \\
        uvicorn --factory examples.support_api.app:app_from_env
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from writer import (
    AsyncCacheReader,
    AsyncWriter,
    Conflict,
    InvalidInput,
    InvalidReference,
    InvalidTransition,
    NotFound,
    OutcomeUnknown,
    Unavailable,
    Written,
)

Json = dict[str, Any]


def _sqlalchemy_url(url: str) -> str:
    """The service's own engine runs on psycopg, so the writer can join its transactions."""
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Login(BaseModel):
    username: str
    password: str


class TicketStore:
    """The seeds' ``TicketStore``, minus the Redis write: PostgreSQL only, tokens out."""

    def __init__(self, writer: AsyncWriter, reader: AsyncCacheReader, engine: AsyncEngine):
        self.writer = writer
        self.reader = reader
        self.engine = engine

    async def close_with_note(
        self, ticket_id: str, note: str | None, actor: str | None
    ) -> tuple[Any, str]:
        """Closing note and close in one transaction of the service's own session."""
        async with AsyncSession(self.engine) as session:
            async with self.writer.transaction(session) as tx:
                if note:
                    await tx.add_comment(ticket_id, {"content": note, "author_id": actor})
                ticket = await tx.close_ticket(ticket_id, actor=actor)
            return ticket, tx.token


def _out(written: Written[Any], name: str) -> Json:
    return {name: written.value.model_dump(mode="json"), "token": written.token}


def create_app(database_url: str, redis_url: str) -> FastAPI:
    """The API on its own writer pool, cache reader and SQLAlchemy engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        writer = await AsyncWriter.connect(database_url)
        reader = AsyncCacheReader.connect(redis_url, writer.database)
        engine = create_async_engine(_sqlalchemy_url(database_url))
        app.state.store = TicketStore(writer, reader, engine)
        try:
            yield
        finally:
            await reader.close()
            await writer.close()
            await engine.dispose()

    app = FastAPI(title="support desk", lifespan=lifespan)

    def store(request: Request) -> TicketStore:
        found: TicketStore = request.app.state.store
        return found

    # -- errors: the writer's typed errors as HTTP answers -------------------------------

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidInput)
    async def invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        problems = [{"loc": list(p.loc), "msg": p.message} for p in exc.problems]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(InvalidReference)
    async def bad_reference(request: Request, exc: InvalidReference) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(InvalidTransition)
    async def transition(request: Request, exc: InvalidTransition) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return JSONResponse({"detail": "database unavailable, retry"}, status_code=503)

    @app.exception_handler(OutcomeUnknown)
    async def unknown(request: Request, exc: OutcomeUnknown) -> JSONResponse:
        return JSONResponse({"detail": "outcome unknown: read it back"}, status_code=503)

    # -- agents --------------------------------------------------------------------------

    @app.post("/agents", status_code=201)
    async def create_agent(request: Request, body: Json = Body(...)) -> Json:  # noqa: B008
        return _out(await store(request).writer.create_agent(body), "agent")

    @app.post("/login")
    async def login(request: Request, body: Login) -> Json:
        s = store(request)
        # Who this is comes from the cache (agent:username:{…}), falling back to PostgreSQL;
        # the password hash never leaves PostgreSQL, so the check runs there.
        known = await s.reader.agent_by_username(body.username)
        if known is None or not known.is_active:
            raise HTTPException(401, "unknown user or wrong password")
        written = await s.writer.authenticate_agent(body.username, body.password)
        if written is None:
            raise HTTPException(401, "unknown user or wrong password")
        return _out(written, "agent")

    @app.get("/agents/{agent_id}/tickets")
    async def agent_tickets(request: Request, agent_id: str, after: str | None = None) -> Json:
        tickets = await store(request).reader.tickets_of(agent_id, after=after)
        return {"tickets": [t.model_dump(mode="json") for t in tickets]}

    # -- tickets -------------------------------------------------------------------------

    @app.post("/tickets", status_code=201)
    async def create_ticket(request: Request, body: Json = Body(...)) -> Json:  # noqa: B008
        actor = body.pop("actor", None)
        return _out(await store(request).writer.create_ticket(body, actor=actor), "ticket")

    @app.patch("/tickets/{ticket_id}")
    async def update_ticket(
        request: Request,
        ticket_id: str,
        body: Json = Body(...),  # noqa: B008
    ) -> Json:
        actor = body.pop("actor", None)
        written = await store(request).writer.update_ticket(ticket_id, body, actor=actor)
        return _out(written, "ticket")

    @app.post("/tickets/{ticket_id}/status")
    async def change_status(
        request: Request,
        ticket_id: str,
        body: Json = Body(...),  # noqa: B008
    ) -> Json:
        actor = body.pop("actor", None)
        written = await store(request).writer.change_ticket_status(ticket_id, body, actor=actor)
        return _out(written, "ticket")

    @app.post("/tickets/{ticket_id}/assign")
    async def assign(request: Request, ticket_id: str, body: Json = Body(...)) -> Json:  # noqa: B008
        actor = body.pop("actor", None)
        written = await store(request).writer.assign_ticket(ticket_id, body, actor=actor)
        return _out(written, "ticket")

    @app.post("/tickets/{ticket_id}/close")
    async def close(request: Request, ticket_id: str, body: Json = Body(...)) -> Json:  # noqa: B008
        ticket, token = await store(request).close_with_note(
            ticket_id, body.get("note"), body.get("actor")
        )
        return {"ticket": ticket.model_dump(mode="json"), "token": token}

    @app.post("/tickets/{ticket_id}/comments", status_code=201)
    async def comment(request: Request, ticket_id: str, body: Json = Body(...)) -> Json:  # noqa: B008
        actor = body.pop("actor", None)
        written = await store(request).writer.add_comment(ticket_id, body, actor=actor)
        return _out(written, "comment")

    @app.get("/tickets/{ticket_id}")
    async def read_ticket(request: Request, ticket_id: str, after: str | None = None) -> Json:
        ticket = await store(request).reader.ticket(ticket_id, after=after)
        if ticket is None:
            raise HTTPException(404, f"ticket {ticket_id!r} does not exist")
        return {"ticket": ticket.model_dump(mode="json")}

    @app.get("/tickets")
    async def list_tickets(
        request: Request, status: str = "open", limit: int = 50, after: str | None = None
    ) -> Json:
        tickets = await store(request).reader.tickets_with_status(status, limit=limit, after=after)
        return {"tickets": [t.model_dump(mode="json") for t in tickets]}

    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory``: ``DATABASE_URL`` and ``REDIS_URL`` from the environment."""
    return create_app(
        os.environ["DATABASE_URL"], os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
