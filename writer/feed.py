"""The ``cdc:applied`` subscription each reader keeps, sync (a thread) and async (a task).

The daemon publishes its checkpoint on ``cdc:applied`` inside each batch's atomic apply.
A feed tracks the highest position announced and wakes the waiters it satisfies; on
(re)subscribing it reads the checkpoint itself (messages published before, or missed
while disconnected). When subscribing fails (Redis down, an ACL without ``&cdc:*``)
``failed()`` says so and readers poll the checkpoint instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from schema import keys
from schema.keys import APPLIED_CHANNEL, parse_applied
from writer.errors import InvalidInput
from writer.reads import parse_lsn

# How long a reconnecting subscription waits between attempts, seconds.
_RETRY = 0.2


def _position_of(data: str | bytes, state: str) -> str | None:
    """The position a message announces for ``state`` (None: another daemon's)."""
    text = data.decode() if isinstance(data, bytes) else str(data)
    key, lsn = parse_applied(text)
    return lsn if key == state else None


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


class Feed:
    """One ``cdc:applied`` subscription in a daemon thread; waiters sleep on a condition.

    ``state``: the state hash whose checkpoint it follows (:func:`schema.keys.state_key`);
    messages of other daemons on the channel are ignored."""

    def __init__(self, client: redis.Redis, state: str = keys.STATE_KEY) -> None:
        self._client = client
        self.state = state
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
        self._thread.join(1)

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
                        self.advance(self._client.hget(self.state, "lsn"))
                        with self._cond:
                            self._subscribed = True
                            self.failing = False
                            self._cond.notify_all()
                    elif message["type"] == "message":
                        self.advance(_position_of(message["data"], self.state))
            except (redis.RedisError, OSError, ValueError):
                with self._cond:
                    self._subscribed = False
                    self.failing = True
                    self._cond.notify_all()
                time.sleep(_RETRY)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()


class AsyncFeed:
    """:class:`Feed` as an asyncio task. Waiters sit in a heap by target position, so a
    message wakes only those it satisfies (not every waiter at every message)."""

    def __init__(self, client: aioredis.Redis, state: str = keys.STATE_KEY) -> None:
        self._client = client
        self.state = state
        self._position = _Position()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._subscribed = asyncio.Event()
        # Set once the first attempt is decided either way (subscribed, or failing).
        self._settled = asyncio.Event()
        self.failing = False  # as in Feed
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
                client: object = self._client
                if isinstance(client, AsyncRedisCluster):
                    # Its pub/sub picks a node from the slot map: learn the map first.
                    await client.initialize()
                await pubsub.subscribe(APPLIED_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        self.advance(await self._client.hget(self.state, "lsn"))
                        self.failing = False
                        self._subscribed.set()
                        self._settled.set()
                    elif message["type"] == "message":
                        self.advance(_position_of(message["data"], self.state))
            except (redis.RedisError, OSError, ValueError, KeyError):
                self._subscribed.clear()
                self.failing = True
                self._settled.set()
                await asyncio.sleep(_RETRY)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
