"""The cache readers: Redis first, PostgreSQL on a miss, optionally after a write's token.

``reader.ticket(id, after=token)`` first waits (up to ``timeout``) until the daemon's
checkpoint reaches ``token``, i.e. until Redis holds that write or a later one, then reads
the hash. A miss, a wait that timed out, or a Redis that does not answer reads PostgreSQL
instead, so a caller always sees its own writes. The readers never write to Redis: only
the daemon does.

Waiting does not poll. The daemon publishes its checkpoint (``X/Y``) on the channel
``cdc:applied`` inside each batch's atomic apply, so the message is delivered when the
batch is visible. Each reader keeps one subscription (:class:`~writer.feed.Feed`, a
thread, for :class:`CacheReader`; a task for :class:`AsyncCacheReader`) that tracks the
highest position announced and wakes the waiters. Messages can be missed (a reconnect, a
reader subscribing late), so the checkpoint itself (``HGET cdc:state lsn``) is read once
the subscription is up and again when a wait times out; if subscribing is refused, waits
poll the checkpoint. A Redis ACL user for a reader needs ``&cdc:*`` (or ``&cdc:applied``)
besides read access to the keys.

Several daemons may share one Redis, each mirroring some tables under its own state
(:func:`schema.keys.state_key`): a wait for a read of a table follows the checkpoint of
the daemon that mirrors it, found in the registry ``cdc:tables`` (and remembered until
a wait times out), with one subscription per such state.

List reads over the views (contract 6b) -- :meth:`CacheReader.tickets_with_status`,
``tickets_of``, ``agents_with_status`` -- read the view and the cache's state in one
``MULTI``; while the cache is not ready for them (``cdc:state`` missing, a snapshot
loading, a rebuild running, or no ``views`` field: the daemon does not keep views) they
read PostgreSQL. Members are then read row by row and kept only if
the row still matches (it may have moved in between).

Every read is written once, as a plan (:mod:`writer.reads`); the subscription lives in
:mod:`writer.feed`; the sync and the async reader here only run them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from schema import keys
from schema.keys import TABLES_FIELD
from schema.models import Agent, Ticket
from schema.redis_url import (
    RedisTarget,
    as_cluster_url,
    async_is_cluster_node,
    async_redis_client,
    cluster_url,
    redis_client,
)
from writer.db import AsyncDatabase, Database
from writer.errors import Unavailable
from writer.feed import AsyncFeed, Feed
from writer.reads import (
    Locate,
    ReadPlan,
    Redis,
    Wait,
    agent_by_username_plan,
    agent_plan,
    agents_with_status_plan,
    parse_lsn,
    tables_hold,
    text_of,
    ticket_plan,
    tickets_of_plan,
    tickets_with_status_plan,
)

__all__ = ["AsyncCacheReader", "CacheReader", "parse_lsn"]

T = TypeVar("T")


# -- the readers ---------------------------------------------------------------------------


class CacheReader:
    """Reads tickets and agents from the cache the daemon maintains (sync)."""

    def __init__(self, client: redis.Redis, database: Database | None = None) -> None:
        self._redis = client
        self._db = database
        # One subscription per daemon state waited on (several daemons may share Redis).
        self._feeds: dict[str, Feed] = {}
        self._feed_lock = threading.Lock()
        # table -> the state of the daemon that mirrors it, as the registry says.
        self._states: dict[str, str] = {}
        self._owns_pool = False
        # On a Redis Cluster no MULTI spans slots: a view and the state are read apart
        # (the members are checked against their rows anyway, contract 7.8).
        self._cluster = isinstance(client, RedisCluster)

    @classmethod
    def connect(
        cls,
        redis_url: str,
        database: Database | None = None,
        *,
        max_connections: int = 256,
        socket_timeout: float = 5.0,
    ) -> CacheReader:
        """A reader for any ``REDIS_URL`` form the daemon takes (``rediss://`` with client
        certificates, ``redis+sentinel://``): one parser for both, in :mod:`schema`.
        ``socket_timeout`` bounds connecting and every reply: a Redis that does not answer
        times out (and the read falls back to PostgreSQL) instead of hanging the caller."""
        # A redis:// URL of a Redis Cluster node means the cluster (as for the daemon).
        client = redis_client(
            cluster_url(redis_url, socket_timeout),
            decode_responses=True,
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
        )
        reader = cls(client, database)
        reader._owns_pool = True
        return reader

    def close(self) -> None:
        for feed in list(self._feeds.values()):
            feed.close()
        self._redis.close()
        if self._owns_pool and not self._cluster:
            self._redis.connection_pool.disconnect()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- read-your-writes --------------------------------------------------------------

    def applied_position(self, table: str | None = None) -> int | None:
        """The checkpoint of the daemon (that mirrors ``table``): every transaction
        before it is in Redis (None: no checkpoint, or no daemon mirrors ``table``)."""
        state = self._locate(table)
        value = self._redis.hget(state, "lsn") if state is not None else None
        return parse_lsn(str(value)) if value else None

    def _locate(self, table: str | None) -> str | None:
        """The state hash of the daemon that mirrors ``table`` (registry, remembered);
        None: the registry exists and names no daemon for it (PostgreSQL answers)."""
        if table is None:
            return keys.STATE_KEY
        state = self._states.get(table)
        if state is None:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.hget(keys.REGISTRY_KEY, table)
                pipe.exists(keys.REGISTRY_KEY)
                found, registry = pipe.execute()
            except redis.ResponseError:
                # An ACL without ~cdc:tables (README): the single-daemon state, for good.
                self._states[table] = keys.STATE_KEY
                return keys.STATE_KEY
            if not found:
                # No registry at all: a single daemon that predates it (cdc:state). A
                # registry without the table: no daemon mirrors it (not cdc:state, which
                # may be another daemon's), so PostgreSQL answers.
                return None if registry else keys.STATE_KEY
            state = text_of(found)
            self._states[table] = state
        return state

    def _mirrors(self, state: str, table: str, feed: Feed) -> bool:
        """Whether ``state`` still mirrors ``table`` (its ``tables`` field, read with its
        checkpoint): a daemon may have stopped mirroring it since the registry said so."""
        lsn, tables = self._redis.hmget(state, "lsn", TABLES_FIELD)
        feed.advance(lsn)
        return tables_hold(tables, table)

    def wait(self, token: str, timeout: float = 1.0, table: str | None = None) -> bool:
        """Wait until Redis reflects the write that returned ``token`` (or a later one);
        ``table``: the table read, whose daemon's checkpoint counts (False when no
        daemon mirrors it: PostgreSQL answers)."""
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        while (state := self._locate(table)) is not None and state not in tried:
            tried.add(state)
            left = max(0.0, deadline - time.monotonic())
            if not self._wait(token, left, state):
                break
            if table is None or self._mirrors(state, table, self._feed_started(state)):
                return True
            self._states.pop(table, None)  # stale: ask the registry again
        if table is not None:
            self._states.pop(table, None)  # the tables may have moved to another daemon
        return False

    def _wait(self, token: str, timeout: float, state: str) -> bool:
        target = parse_lsn(token)
        feed = self._feed_started(state)
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
        feed.advance(self._redis.hget(feed.state, "lsn"))
        return feed.position >= target

    def _poll(self, feed: Feed, target: int, deadline: float) -> bool:
        """No subscription possible: read the checkpoint, backing off from 1 to 50 ms."""
        delay = 0.001
        while True:
            feed.advance(self._redis.hget(feed.state, "lsn"))
            if feed.position >= target:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)

    def _feed_started(self, state: str) -> Feed:
        feed = self._feeds.get(state)
        if feed is None:
            with self._feed_lock:
                feed = self._feeds.get(state)
                if feed is None:
                    feed = self._feeds[state] = Feed(self._redis, state)
        return feed

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
                try:
                    answer = self.wait(step.token, step.timeout, step.table)
                except (redis.RedisError, OSError):
                    answer = False  # Redis down: PostgreSQL answers
            elif isinstance(step, Locate):
                try:
                    answer = self._locate(step.table)
                except (redis.RedisError, OSError):
                    answer = keys.STATE_KEY  # the next step fails the same way
            elif isinstance(step, Redis):
                pipe = self._redis.pipeline(transaction=step.atomic and not self._cluster)
                for command in step.commands:
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                try:
                    answer = pipe.execute()
                except (redis.RedisError, OSError, RedisClusterException):
                    answer = None
            else:
                if self._db is None:
                    raise Unavailable("cache miss and no database to fall back to")
                answer = [dict(row) for row in self._db.read(step.sql, step.params)]


class AsyncCacheReader:
    """:class:`CacheReader` on ``redis.asyncio`` (hiredis) and the async pool."""

    def __init__(self, client: aioredis.Redis, database: AsyncDatabase | None = None) -> None:
        self._redis = client
        self._db = database
        self._feeds: dict[str, AsyncFeed] = {}
        self._states: dict[str, str] = {}
        self._owns_pool = False
        self._cluster = isinstance(client, AsyncRedisCluster)
        # A redis:// URL that may name a Redis Cluster node, with the client options: the
        # node is asked at the first read (async), so connect() does no I/O and never
        # blocks the event loop.
        self._probe: tuple[str, dict[str, Any]] | None = None
        self._probing = asyncio.Lock()

    @classmethod
    def connect(
        cls,
        redis_url: str,
        database: AsyncDatabase | None = None,
        *,
        max_connections: int = 256,
        socket_timeout: float = 5.0,
    ) -> AsyncCacheReader:
        """:meth:`CacheReader.connect` for asyncio: the same URL forms (one parser), the
        same bounded socket waits. Opens no connection: whether a ``redis://`` node is
        one of a Redis Cluster is asked over ``redis.asyncio`` at the first read."""
        options: dict[str, Any] = {
            "decode_responses": True,
            "max_connections": max_connections,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
        }
        target = RedisTarget.parse(redis_url)
        reader = cls(async_redis_client(redis_url, **options), database)
        reader._owns_pool = True
        if not (target.cluster or target.sentinel):
            reader._probe = (redis_url, options)
        return reader

    async def _resolve(self) -> None:
        """A ``redis://`` URL of a Redis Cluster node means the cluster (as for the
        daemon): asked once, before the first command. A node that cannot be asked now is
        asked again at the next read (this one goes to the node and falls back as usual)."""
        async with self._probing:  # uncontended after the first read: no wait
            if self._probe is None:
                return
            url, options = self._probe
            try:
                clustered = await async_is_cluster_node(self._redis)
            except (redis.RedisError, OSError):
                return
            self._probe = None
            if clustered:
                for feed in list(self._feeds.values()):
                    await feed.close()  # subscribed through the node (an earlier read)
                self._feeds.clear()
                single = self._redis
                self._redis = async_redis_client(as_cluster_url(url), **options)
                self._cluster = True
                await single.aclose(close_connection_pool=True)

    async def close(self) -> None:
        for feed in list(self._feeds.values()):
            await feed.close()
        if self._cluster:
            await self._redis.aclose()
        else:
            await self._redis.aclose(close_connection_pool=self._owns_pool)

    async def __aenter__(self) -> AsyncCacheReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def applied_position(self, table: str | None = None) -> int | None:
        await self._resolve()
        state = await self._locate(table)
        value = await self._redis.hget(state, "lsn") if state is not None else None
        return parse_lsn(str(value)) if value else None

    async def _locate(self, table: str | None) -> str | None:
        """:meth:`CacheReader._locate`."""
        if table is None:
            return keys.STATE_KEY
        state = self._states.get(table)
        if state is None:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.hget(keys.REGISTRY_KEY, table)
                pipe.exists(keys.REGISTRY_KEY)
                found, registry = await pipe.execute()
            except redis.ResponseError:
                self._states[table] = keys.STATE_KEY
                return keys.STATE_KEY
            if not found:
                return None if registry else keys.STATE_KEY
            state = text_of(found)
            self._states[table] = state
        return state

    async def wait(self, token: str, timeout: float = 1.0, table: str | None = None) -> bool:
        """:meth:`CacheReader.wait`."""
        await self._resolve()
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        while (state := await self._locate(table)) is not None and state not in tried:
            tried.add(state)
            left = max(0.0, deadline - time.monotonic())
            if not await self._wait(token, left, state):
                break
            if table is None:
                return True
            lsn, tables = await self._redis.hmget(state, "lsn", TABLES_FIELD)
            self._feeds[state].advance(lsn)
            if tables_hold(tables, table):
                return True
            self._states.pop(table, None)
        if table is not None:
            self._states.pop(table, None)
        return False

    async def _wait(self, token: str, timeout: float, state: str) -> bool:
        target = parse_lsn(token)
        feed = self._feeds.get(state)
        if feed is None:
            feed = self._feeds[state] = AsyncFeed(self._redis, state)
        if feed.position >= target:
            return True
        deadline = time.monotonic() + timeout
        if feed.failed():
            return await self._poll(feed, target, deadline)
        if await feed.wait_subscribed(deadline) and await feed.wait(target, deadline):
            return True
        if feed.failed():
            return await self._poll(feed, target, deadline)
        feed.advance(await self._redis.hget(feed.state, "lsn"))
        return feed.position >= target

    async def _poll(self, feed: AsyncFeed, target: int, deadline: float) -> bool:
        """No subscription possible: read the checkpoint, backing off from 1 to 50 ms."""
        delay = 0.001
        while True:
            feed.advance(await self._redis.hget(feed.state, "lsn"))
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
        await self._resolve()
        answer: Any = None
        while True:
            try:
                step = plan.send(answer)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(step, Wait):
                try:
                    answer = await self.wait(step.token, step.timeout, step.table)
                except (redis.RedisError, OSError):
                    answer = False  # Redis down: PostgreSQL answers
            elif isinstance(step, Locate):
                try:
                    answer = await self._locate(step.table)
                except (redis.RedisError, OSError):
                    answer = keys.STATE_KEY
            elif isinstance(step, Redis):
                pipe = self._redis.pipeline(transaction=step.atomic and not self._cluster)
                for command in step.commands:
                    pipe.execute_command(*command)
                try:
                    answer = await pipe.execute()
                except (redis.RedisError, OSError, RedisClusterException):
                    answer = None
            else:
                if self._db is None:
                    raise Unavailable("cache miss and no database to fall back to")
                answer = [dict(row) for row in await self._db.read(step.sql, step.params)]
