"""Browsers follow changes live: Server-Sent Events from the change feed (contract 6c).

A small ASGI app (Starlette + sse-starlette). ``GET /changes`` streams one event per
entry of ``changes:tickets`` and ``changes:agents`` (``?tables=tickets`` narrows it),
read with ``XREAD BLOCK``. Each event's id is a cursor over every stream it reads
(``tickets=1764655786000-0,agents=0-0``), so a browser's ``EventSource`` that reconnects
sends it back as ``Last-Event-ID`` and resumes exactly after the last event it got.

If the feed was trimmed past a client's cursor (``MAXLEN ~ CDC_CHANGE_FEED_MAXLEN``),
entries are lost to it: it gets one ``reset`` event (reload what it shows from the
cache), then the stream goes on. Run it with::

    REDIS_URL=redis://localhost:6379/0 uvicorn examples.sse.app:app --port 8000

and in a browser: ``new EventSource("/changes").addEventListener("change", e => ...)``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

TABLES = ("tickets", "agents")
BLOCK_MS = 15_000


def parse_cursor(text: str | None, tables: tuple[str, ...]) -> dict[str, str] | None:
    """The positions a ``Last-Event-ID`` names, or None (start with new entries)."""
    if not text:
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        table, _, position = part.partition("=")
        if table in tables and _valid_id(position):
            out[table] = position
    return {table: out.get(table, "0-0") for table in tables}


def format_cursor(positions: dict[str, str]) -> str:
    return ",".join(f"{table}={position}" for table, position in positions.items())


def _valid_id(text: str) -> bool:
    ms, _, seq = text.partition("-")
    return ms.isdigit() and seq.isdigit()


def _id_tuple(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def _latest(client: aioredis.Redis, table: str) -> str:
    last: Any = await client.xrevrange(f"changes:{table}", count=1)
    return last[0][0].decode() if last else "0-0"


async def _trimmed_past(client: aioredis.Redis, table: str, position: str) -> bool:
    """Whether entries after ``position`` may have been trimmed away: the entry it names
    is gone and the stream now starts after it (a reset too many is harmless)."""
    if position == "0-0":
        return False
    key = f"changes:{table}"
    if await client.xrange(key, min=position, max=position):
        return False
    first: Any = await client.xrange(key, count=1)
    return bool(first) and _id_tuple(first[0][0].decode()) > _id_tuple(position)


async def start(
    client: aioredis.Redis, tables: tuple[str, ...], cursor: dict[str, str] | None
) -> tuple[dict[str, str], bool]:
    """Where to read from, fixed when the request is answered, and whether the client
    lost entries to trimming (then it resumes from now, after a ``reset`` event)."""
    if cursor is not None:
        for table in tables:
            if await _trimmed_past(client, table, cursor[table]):
                return {t: await _latest(client, t) for t in tables}, True
        return cursor, False
    # Not "$": that would lose entries added between two XREADs.
    return {table: await _latest(client, table) for table in tables}, False


async def events(
    client: aioredis.Redis, cursor: dict[str, str], reset: bool
) -> AsyncIterator[ServerSentEvent]:
    if reset:
        yield ServerSentEvent(data="{}", event="reset", id=format_cursor(cursor))
    while True:
        streams = {f"changes:{table}": position for table, position in cursor.items()}
        reply: Any = await client.xread(streams, count=100, block=BLOCK_MS)  # type: ignore[arg-type]
        for stream, entries in reply or []:
            table = stream.decode().removeprefix("changes:")
            for entry_id, fields in entries:
                cursor[table] = entry_id.decode()
                change = {k.decode(): v.decode() for k, v in fields.items()}
                yield ServerSentEvent(
                    data=json.dumps({"table": table, **change}),
                    event="change",
                    id=format_cursor(cursor),
                )


def create_app(redis_url: str | None = None, ping: int = 15) -> Starlette:
    url = redis_url or os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    # XREAD BLOCK waits up to BLOCK_MS: the socket must wait longer.
    client = aioredis.Redis.from_url(url, socket_timeout=BLOCK_MS / 1000 + 10)

    async def changes(request: Request) -> Response:
        asked = tuple(t for t in request.query_params.get("tables", "").split(",") if t)
        tables = tuple(t for t in asked if t in TABLES) or TABLES
        cursor = parse_cursor(
            request.headers.get("last-event-id") or request.query_params.get("last_event_id"),
            tables,
        )
        position, reset = await start(client, tables, cursor)
        return EventSourceResponse(events(client, position, reset), ping=ping)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/changes", changes)], lifespan=lifespan)


app = create_app()
