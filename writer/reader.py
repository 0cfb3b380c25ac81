"""The cache readers: Redis first, PostgreSQL on a miss, optionally after a write's token.

``reader.ticket(id, after=token)`` first waits (up to ``timeout``) until the daemon's
checkpoint reaches ``token``, i.e. until Redis holds that write or a later one, then reads
the hash. A miss, or a wait that timed out, reads PostgreSQL instead, so a caller always
sees its own writes. The readers never write to Redis: only the daemon does.

Waiting does not poll. The daemon publishes its checkpoint (``X/Y``) on the channel
``cdc:applied`` inside each batch's atomic apply, so the message is delivered when the
batch is visible. Each reader keeps one subscription (:class:`_Feed`, a thread
for :class:`CacheReader`, a task for :class:`AsyncCacheReader`) that tracks the highest
position announced and wakes the waiters. Messages can be missed (a reconnect, a reader
subscribing late), so the checkpoint itself (``HGET cdc:state lsn``) is read once the
subscription is up and again when the wait times out. A Redis ACL user for a reader needs
``&cdc:*`` (or ``&cdc:applied``) besides read access to the keys.

List reads over the views (contract 6b) -- :meth:`CacheReader.tickets_with_status`,
``tickets_of``, ``agents_with_status`` -- read the view and the cache's state in one
``MULTI``; while the cache is not ready for them (``cdc:state`` missing, a snapshot
loading, a rebuild running, or no ``views`` field: the daemon does not keep views) they
read PostgreSQL. Members are then read row by row and kept only if
the row still matches (it may have moved in between).

Every read is written once, as a plan of :class:`Wait`, :class:`Redis` and :class:`Query`
steps (as the writer's operations are, :mod:`writer.steps`); the sync and the async reader
only run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel
from sqlalchemy import Table

from schema import keys
from schema.enums import AgentStatus, TicketStatus
from schema.keys import AGENTS, APPLIED_CHANNEL, TICKETS, TrackedTable
from schema.models import Agent, Ticket
from schema.pgtext import row_from_text
from schema.redis_url import async_redis_client, redis_client
from schema.tables import Agent as AgentTable
from schema.tables import Ticket as TicketTable
from writer.base import identifier
from writer.db import AsyncDatabase, Database
from writer.errors import FieldProblem, InvalidInput, Unavailable
from writer.statements import returning

M = TypeVar("M", bound=BaseModel)
E = TypeVar("E", bound=Enum)
T = TypeVar("T")

_TICKETS: Table = TicketTable.__table__  # type: ignore[assignment]
_AGENTS: Table = AgentTable.__table__  # type: ignore[assignment]

# How long a reconnecting subscription waits between attempts, seconds.
_RETRY = 0.2


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` to an integer WAL position."""
    high, sep, low = text.partition("/")
    try:
        if not sep:
            raise ValueError(text)
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise InvalidInput(
            "token", [FieldProblem(("token",), "not a WAL position (X/Y)", "lsn")]
        ) from None


# -- view keys (contract 6b) ---------------------------------------------------------------


def ticket_status_key(status: str) -> str:
    return f"tickets:status:{{{status}}}"


def ticket_assignee_key(agent_id: str) -> str:
    return f"tickets:assignee:{{{agent_id}}}"


def agent_status_key(status: str) -> str:
    return f"agents:status:{{{status}}}"


# -- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait until Redis reflects ``token``; answers whether it does (False: timed out)."""

    token: str
    timeout: float


@dataclass(frozen=True, slots=True)
class Redis:
    """Run ``commands`` in one pipeline (``atomic``: inside ``MULTI``); answers the replies."""

    commands: tuple[tuple[str, ...], ...]
    atomic: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """Read PostgreSQL (the fallback); answers rows as dicts."""

    sql: str
    params: dict[str, Any]


ReadStep = Wait | Redis | Query
ReadPlan = Generator[ReadStep, Any, T]

_STATE_FIELDS = ("lsn", "loading", "rebuild", "views")


def _ready(state: Sequence[str | None]) -> bool:
    """Whether the views can answer: a checkpoint, no snapshot loading, no rebuild, and the
    daemon says it keeps the views (``views`` set in ``cdc:state``: an empty view has no
    key, so a daemon that keeps none would otherwise look like one with empty views)."""
    lsn, loading, rebuild, views = state
    return bool(lsn) and loading != "1" and not rebuild and bool(views)


def _from_hash(table: Table, model: type[M], fields: dict[str, str]) -> M:
    return model.model_validate(row_from_text(table, fields))


def _select(table: Table, where: str, order: str = "", limit: bool = False) -> str:
    sql = f"SELECT {returning(table.name)} FROM {table.name} WHERE {where}"
    if order:
        sql += f" ORDER BY {order}"
    if limit:
        sql += " LIMIT %(limit)s"
    return sql


def _row_plan(
    tracked: TrackedTable, table: Table, model: type[M], row_id: str, after: str | None, t: float
) -> ReadPlan[M | None]:
    fresh = after is None or (yield Wait(after, t))
    if fresh:
        (fields,) = yield Redis((("HGETALL", tracked.key(row_id)),))
        if fields:
            return _from_hash(table, model, fields)
    rows = yield Query(_select(table, "id = %(key)s"), {"key": row_id})
    return model.model_validate(rows[0]) if rows else None


def ticket_plan(ticket_id: str, after: str | None, timeout: float) -> ReadPlan[Ticket | None]:
    ticket_id = identifier(ticket_id, "ticket_id")
    return (yield from _row_plan(TICKETS, _TICKETS, Ticket, ticket_id, after, timeout))


def agent_plan(agent_id: str, after: str | None, timeout: float) -> ReadPlan[Agent | None]:
    agent_id = identifier(agent_id, "agent_id")
    return (yield from _row_plan(AGENTS, _AGENTS, Agent, agent_id, after, timeout))


def agent_by_username_plan(
    username: str, after: str | None, timeout: float
) -> ReadPlan[Agent | None]:
    username = identifier(username, "username")  # what a username may be, or more
    fresh = after is None or (yield Wait(after, timeout))
    if fresh:
        (agent_id,) = yield Redis((("GET", keys.agent_username_key(username)),))
        if agent_id is not None:
            (fields,) = yield Redis((("HGETALL", AGENTS.key(str(agent_id))),))
            if fields:
                agent = _from_hash(_AGENTS, Agent, fields)
                if agent.username == username:
                    return agent
    rows = yield Query(_select(_AGENTS, "username = %(key)s"), {"key": username})
    return Agent.model_validate(rows[0]) if rows else None


def _status(kind: type[E], value: object) -> E:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise InvalidInput(
            "status", [FieldProblem(("status",), f"must be one of {choices}", "enum")]
        ) from None


def _newest_first(items: list[Ticket]) -> list[Ticket]:
    return sorted(items, key=lambda t: (t.updated_at or datetime.min, t.id), reverse=True)


def _view_plan(
    view: tuple[str, ...],
    tracked: TrackedTable,
    table: Table,
    model: type[M],
    keep: Callable[[M], bool],
    fallback: Query,
    after: str | None,
    timeout: float,
) -> ReadPlan[list[M] | None]:
    """The view's rows from Redis, or None when PostgreSQL must answer (the caller's)."""
    fresh = after is None or (yield Wait(after, timeout))
    if fresh:
        state, members = yield Redis((("HMGET", keys.STATE_KEY, *_STATE_FIELDS), view), True)
        if _ready(state):
            hashes = yield Redis(tuple(("HGETALL", tracked.key(str(m))) for m in members))
            found = [_from_hash(table, model, fields) for fields in hashes if fields]
            return [item for item in found if keep(item)]
    rows = yield fallback
    return [model.model_validate(row) for row in rows]


def tickets_with_status_plan(
    status: str, limit: int, after: str | None, timeout: float
) -> ReadPlan[list[Ticket]]:
    status = _status(TicketStatus, status).value
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidInput("limit", [FieldProblem(("limit",), "must be an int >= 1", "limit")])
    view = ("ZREVRANGE", ticket_status_key(status), "0", str(limit - 1))
    fallback = Query(
        _select(_TICKETS, "status = %(status)s", "updated_at DESC, id DESC", limit=True),
        {"status": status, "limit": limit},
    )
    items = yield from _view_plan(
        view, TICKETS, _TICKETS, Ticket, lambda t: t.status == status, fallback, after, timeout
    )
    return _newest_first(items or [])[:limit]


def tickets_of_plan(agent_id: str, after: str | None, timeout: float) -> ReadPlan[list[Ticket]]:
    agent_id = identifier(agent_id, "agent_id")
    fallback = Query(
        _select(_TICKETS, "assignee_id = %(agent)s", "updated_at DESC, id DESC"),
        {"agent": agent_id},
    )
    items = yield from _view_plan(
        ("SMEMBERS", ticket_assignee_key(agent_id)),
        TICKETS,
        _TICKETS,
        Ticket,
        lambda t: t.assignee_id == agent_id,
        fallback,
        after,
        timeout,
    )
    return _newest_first(items or [])


def agents_with_status_plan(
    status: str, after: str | None, timeout: float
) -> ReadPlan[list[Agent]]:
    status = _status(AgentStatus, status).value
    fallback = Query(_select(_AGENTS, "status = %(status)s", "username"), {"status": status})
    items = yield from _view_plan(
        ("SMEMBERS", agent_status_key(status)),
        AGENTS,
        _AGENTS,
        Agent,
        lambda a: a.status == status,
        fallback,
        after,
        timeout,
    )
    return sorted(items or [], key=lambda a: a.username)


# -- the applied-position feed -------------------------------------------------------------


class _Position:
    """The highest checkpoint seen (messages or reads); only ever moves forward."""

    def __init__(self) -> None:
        self.value = 0

    def advance(self, text: str | bytes | None) -> bool:
        if not text:
            return False
        raw = text.decode() if isinstance(text, bytes) else text
        try:
            position = parse_lsn(raw)
        except InvalidInput:
            return False
        if position > self.value:
            self.value = position
            return True
        return False


class _Feed:
    """One ``cdc:applied`` subscription in a daemon thread; waiters sleep on a condition."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._cond = threading.Condition()
        self._position = _Position()
        self._subscribed = False
        # The last subscription attempt failed (Redis down, or an ACL without &cdc:*):
        # waiters poll the checkpoint instead of sleeping on messages that cannot come.
        self.failing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cdc-applied", daemon=True)
        self._thread.start()

    def failed(self) -> bool:
        """Whether subscribing failed last time (then waiters poll the checkpoint)."""
        return self.failing

    @property
    def position(self) -> int:
        return self._position.value

    def advance(self, text: str | bytes | None) -> None:
        with self._cond:
            if self._position.advance(text):
                self._cond.notify_all()

    def wait_subscribed(self, deadline: float) -> bool:
        with self._cond:
            while not self._subscribed and not self._closed and not self.failing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._subscribed

    def wait(self, target: int, deadline: float) -> bool:
        with self._cond:
            while self._position.value < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(2)

    def _run(self) -> None:
        while not self._closed:
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(APPLIED_CHANNEL)
                while not self._closed:
                    # The timeout only bounds how long close() waits for this thread.
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Whatever was published before is in the checkpoint itself.
                        self.advance(self._client.hget(keys.STATE_KEY, "lsn"))
                        with self._cond:
                            self._subscribed = True
                            self.failing = False
                            self._cond.notify_all()
                    elif message["type"] == "message":
                        self.advance(message["data"])
            except (redis.RedisError, OSError, ValueError):
                with self._cond:
                    self._subscribed = False
                    self.failing = True
                    self._cond.notify_all()
                time.sleep(_RETRY)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()


class _AsyncFeed:
    """:class:`_Feed` as an asyncio task. Waiters sit in a heap by target position, so a
    message wakes only those it satisfies (not every waiter at every message)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._position = _Position()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._subscribed = asyncio.Event()
        # Set once the first attempt is decided either way (subscribed, or failing).
        self._settled = asyncio.Event()
        self.failing = False  # as in _Feed
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="cdc-applied")

    def failed(self) -> bool:
        """Whether subscribing failed last time (then waiters poll the checkpoint)."""
        return self.failing

    @property
    def position(self) -> int:
        return self._position.value

    def advance(self, text: str | bytes | None) -> None:
        if not self._position.advance(text):
            return
        position, waiters = self._position.value, self._waiters
        while waiters and waiters[0][0] <= position:
            _, _, future = heapq.heappop(waiters)
            if not future.done():
                future.set_result(None)

    async def wait_subscribed(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left > 0 and not self._subscribed.is_set() and not self.failing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._settled.wait()
        return self._subscribed.is_set()

    async def wait(self, target: int, deadline: float) -> bool:
        if self._position.value >= target:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        future: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._waiters, (target, next(self._order), future))
        try:
            # asyncio.timeout, not wait_for: no extra task per wait (Python 3.11).
            async with asyncio.timeout(left):
                await future
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(APPLIED_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        self.advance(await self._client.hget(keys.STATE_KEY, "lsn"))
                        self.failing = False
                        self._subscribed.set()
                        self._settled.set()
                    elif message["type"] == "message":
                        self.advance(message["data"])
            except (redis.RedisError, OSError, ValueError):
                self._subscribed.clear()
                self.failing = True
                self._settled.set()
                await asyncio.sleep(_RETRY)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


# -- the readers ---------------------------------------------------------------------------


class CacheReader:
    """Reads tickets and agents from the cache the daemon maintains (sync)."""

    def __init__(self, client: redis.Redis, database: Database | None = None) -> None:
        self._redis = client
        self._db = database
        self._feed: _Feed | None = None
        self._feed_lock = threading.Lock()
        self._owns_pool = False

    @classmethod
    def connect(
        cls,
        redis_url: str,
        database: Database | None = None,
        *,
        max_connections: int = 256,
    ) -> CacheReader:
        """A reader for any ``REDIS_URL`` form the daemon takes (``rediss://`` with client
        certificates, ``redis+sentinel://``): one parser for both, in :mod:`schema`."""
        client = redis_client(redis_url, decode_responses=True, max_connections=max_connections)
        reader = cls(client, database)
        reader._owns_pool = True
        return reader

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
        self._redis.close()
        if self._owns_pool:
            self._redis.connection_pool.disconnect()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- read-your-writes --------------------------------------------------------------

    def applied_position(self) -> int | None:
        """The daemon's checkpoint: every transaction before it is in Redis."""
        value = self._redis.hget(keys.STATE_KEY, "lsn")
        return parse_lsn(str(value)) if value else None

    def wait(self, token: str, timeout: float = 1.0) -> bool:
        """Wait until Redis reflects the write that returned ``token`` (or a later one)."""
        target = parse_lsn(token)
        feed = self._feed_started()
        if feed.position >= target:
            return True
        deadline = time.monotonic() + timeout
        if feed.failed():
            return self._poll(feed, target, deadline)
        # Once subscribed (the feed read the checkpoint then), every later position comes
        # as a message: no read per wait, however many wait at once.
        if feed.wait_subscribed(deadline) and feed.wait(target, deadline):
            return True
        if feed.failed():
            return self._poll(feed, target, deadline)
        # Timed out, or no subscription: the checkpoint decides (a message may be lost).
        feed.advance(self._redis.hget(keys.STATE_KEY, "lsn"))
        return feed.position >= target

    def _poll(self, feed: _Feed, target: int, deadline: float) -> bool:
        """No subscription possible: read the checkpoint, backing off from 1 to 50 ms."""
        delay = 0.001
        while True:
            feed.advance(self._redis.hget(keys.STATE_KEY, "lsn"))
            if feed.position >= target:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)

    def _feed_started(self) -> _Feed:
        if self._feed is None:
            with self._feed_lock:
                if self._feed is None:
                    self._feed = _Feed(self._redis)
        return self._feed

    # -- lookups -----------------------------------------------------------------------

    def ticket(
        self, ticket_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Ticket | None:
        return self._run(ticket_plan(ticket_id, after, timeout))

    def agent(
        self, agent_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Agent | None:
        return self._run(agent_plan(agent_id, after, timeout))

    def agent_by_username(
        self, username: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Agent | None:
        return self._run(agent_by_username_plan(username, after, timeout))

    def tickets_with_status(
        self, status: str, *, limit: int = 100, after: str | None = None, timeout: float = 1.0
    ) -> list[Ticket]:
        """Tickets with that status, newest ``updated_at`` first."""
        return self._run(tickets_with_status_plan(status, limit, after, timeout))

    def tickets_of(
        self, agent_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> list[Ticket]:
        """Tickets assigned to that agent, newest ``updated_at`` first."""
        return self._run(tickets_of_plan(agent_id, after, timeout))

    def agents_with_status(
        self, status: str, *, after: str | None = None, timeout: float = 1.0
    ) -> list[Agent]:
        """Agents with that status, by username."""
        return self._run(agents_with_status_plan(status, after, timeout))

    def _run(self, plan: ReadPlan[T]) -> T:
        answer: Any = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(step, Wait):
                answer = self.wait(step.token, step.timeout)
            elif isinstance(step, Redis):
                pipe = self._redis.pipeline(transaction=step.atomic)
                for command in step.commands:
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                answer = pipe.execute()
            else:
                if self._db is None:
                    raise Unavailable("cache miss and no database to fall back to")
                answer = [dict(row) for row in self._db.read(step.sql, step.params)]


class AsyncCacheReader:
    """:class:`CacheReader` on ``redis.asyncio`` (hiredis) and the async pool."""

    def __init__(self, client: aioredis.Redis, database: AsyncDatabase | None = None) -> None:
        self._redis = client
        self._db = database
        self._feed: _AsyncFeed | None = None
        self._owns_pool = False

    @classmethod
    def connect(
        cls,
        redis_url: str,
        database: AsyncDatabase | None = None,
        *,
        max_connections: int = 256,
    ) -> AsyncCacheReader:
        """:meth:`CacheReader.connect` for asyncio: the same URL forms (one parser)."""
        client = async_redis_client(
            redis_url, decode_responses=True, max_connections=max_connections
        )
        reader = cls(client, database)
        reader._owns_pool = True
        return reader

    async def close(self) -> None:
        if self._feed is not None:
            await self._feed.close()
        await self._redis.aclose(close_connection_pool=self._owns_pool)

    async def __aenter__(self) -> AsyncCacheReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def applied_position(self) -> int | None:
        value = await self._redis.hget(keys.STATE_KEY, "lsn")
        return parse_lsn(str(value)) if value else None

    async def wait(self, token: str, timeout: float = 1.0) -> bool:
        """Wait until Redis reflects the write that returned ``token`` (or a later one)."""
        target = parse_lsn(token)
        if self._feed is None:
            self._feed = _AsyncFeed(self._redis)
        feed = self._feed
        if feed.position >= target:
            return True
        deadline = time.monotonic() + timeout
        if feed.failed():
            return await self._poll(feed, target, deadline)
        if await feed.wait_subscribed(deadline) and await feed.wait(target, deadline):
            return True
        if feed.failed():
            return await self._poll(feed, target, deadline)
        feed.advance(await self._redis.hget(keys.STATE_KEY, "lsn"))
        return feed.position >= target

    async def _poll(self, feed: _AsyncFeed, target: int, deadline: float) -> bool:
        """No subscription possible: read the checkpoint, backing off from 1 to 50 ms."""
        delay = 0.001
        while True:
            feed.advance(await self._redis.hget(keys.STATE_KEY, "lsn"))
            if feed.position >= target:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)

    async def ticket(
        self, ticket_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Ticket | None:
        return await self._run(ticket_plan(ticket_id, after, timeout))

    async def agent(
        self, agent_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Agent | None:
        return await self._run(agent_plan(agent_id, after, timeout))

    async def agent_by_username(
        self, username: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Agent | None:
        return await self._run(agent_by_username_plan(username, after, timeout))

    async def tickets_with_status(
        self, status: str, *, limit: int = 100, after: str | None = None, timeout: float = 1.0
    ) -> list[Ticket]:
        """Tickets with that status, newest ``updated_at`` first."""
        return await self._run(tickets_with_status_plan(status, limit, after, timeout))

    async def tickets_of(
        self, agent_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> list[Ticket]:
        """Tickets assigned to that agent, newest ``updated_at`` first."""
        return await self._run(tickets_of_plan(agent_id, after, timeout))

    async def agents_with_status(
        self, status: str, *, after: str | None = None, timeout: float = 1.0
    ) -> list[Agent]:
        """Agents with that status, by username."""
        return await self._run(agents_with_status_plan(status, after, timeout))

    async def _run(self, plan: ReadPlan[T]) -> T:
        answer: Any = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(step, Wait):
                answer = await self.wait(step.token, step.timeout)
            elif isinstance(step, Redis):
                pipe = self._redis.pipeline(transaction=step.atomic)
                for command in step.commands:
                    pipe.execute_command(*command)
                answer = await pipe.execute()
            else:
                if self._db is None:
                    raise Unavailable("cache miss and no database to fall back to")
                answer = [dict(row) for row in await self._db.read(step.sql, step.params)]
