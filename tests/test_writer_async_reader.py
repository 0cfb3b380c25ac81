"""Readers, sync and async: woken by ``cdc:applied``, a checkpoint read when a message is
missed, read-your-writes under concurrent writers, list reads over the views."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from devstack.servers import RedisServer, free_port
from tests.helpers import Daemon, wait_for
from tests.test_writer_async import run
from writer import AsyncCacheReader, AsyncWriter, CacheReader, Writer
from writer.reader import parse_lsn

CHANNEL = "cdc:applied"


def subscribers(client: redis.Redis) -> int:
    return int(dict(client.pubsub_numsub(CHANNEL))[CHANNEL.encode()])


def test_waiting_readers_wake_on_the_applied_message_not_on_the_checkpoint(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset("cdc:state", "lsn", "0/10")
    reader = CacheReader.connect(redis_url)
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(reader.wait("0/1000", timeout=60)))
    thread.start()

    async def waiting() -> bool:
        async with AsyncCacheReader.connect(redis_url) as areader:
            task = asyncio.create_task(areader.wait("0/1000", timeout=60))
            while subscribers(client) < 2:
                await asyncio.sleep(0.01)
            assert not task.done()
            client.publish(CHANNEL, "0/FFF")  # not far enough: both keep waiting
            await asyncio.sleep(0.05)
            assert not task.done()
            client.publish(CHANNEL, "0/2000")
            return await task

    assert run(waiting()) is True
    thread.join(30)
    assert results == [True]
    # The checkpoint never moved: what woke them was the message.
    assert client.hget("cdc:state", "lsn") == b"0/10"
    reader.close()


def test_a_missed_message_is_covered_by_reading_the_checkpoint(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset("cdc:state", "lsn", "0/10")

    async def scenario() -> tuple[bool, bool]:
        async with AsyncCacheReader.connect(redis_url) as areader:
            assert await areader.wait("0/1000", timeout=0.05) is False
            task = asyncio.create_task(areader.wait("0/1000", timeout=0.5))
            await asyncio.sleep(0.05)
            client.hset("cdc:state", "lsn", "0/1000")  # applied, but no message
            return await task, await areader.wait("0/1000", timeout=0)

    assert run(scenario()) == (True, True)
    with CacheReader.connect(redis_url) as reader:
        client.hset("cdc:state", "lsn", "0/20")
        assert reader.wait("0/30", timeout=0.05) is False
        client.hset("cdc:state", "lsn", "0/30")
        assert reader.wait("0/30", timeout=0.05) is True


def test_the_daemon_publishes_its_checkpoint_with_each_batch(
    daemon: Daemon, writer: Writer, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(CHANNEL)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    tokens = [writer.create_ticket({"title": f"p{n}"}).value for n in range(20)]
    last = writer.update_ticket(tokens[-1].id, {"title": "last"}).token
    seen: list[int] = []

    def reached() -> bool:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "message":
            position = parse_lsn(message["data"])
            # Delivered at EXEC: the checkpoint (read atomically) is already there.
            pipe = client.pipeline(transaction=True)
            pipe.hget("cdc:state", "lsn")
            (checkpoint,) = pipe.execute()
            assert parse_lsn(checkpoint) >= position
            assert not seen or position >= seen[-1]
            seen.append(position)
        return bool(seen) and seen[-1] >= parse_lsn(last)

    wait_for(reached, 30, "the daemon to announce the last write")
    pubsub.close()


def test_read_your_writes_under_concurrent_writers(
    daemon: Daemon, database_url: str, redis_url: str
) -> None:
    """Each task writes then reads through the cache only (no database to fall back to)."""

    async def worker(writer: AsyncWriter, reader: AsyncCacheReader, n: int) -> int:
        checked = 0
        for i in range(15):
            created = await writer.create_ticket({"title": f"w{n}-{i}"})
            updated = await writer.update_ticket(created.value.id, {"priority": "urgent"})
            seen = await reader.ticket(created.value.id, after=updated.token, timeout=30)
            assert seen == updated.value
            checked += 1
        return checked

    async def scenario() -> int:
        async with (
            await AsyncWriter.connect(database_url, max_size=8) as writer,
            AsyncCacheReader.connect(redis_url) as reader,
        ):
            done = await asyncio.gather(*(worker(writer, reader, n) for n in range(8)))
            return sum(done)

    assert run(scenario()) == 120

    errors: list[BaseException] = []
    with Writer.connect(database_url, max_size=4) as writer, CacheReader.connect(redis_url) as r:

        def sync_worker(n: int) -> None:
            try:
                for i in range(10):
                    created = writer.create_ticket({"title": f"s{n}-{i}"})
                    assert r.ticket(created.value.id, after=created.token, timeout=30) == (
                        created.value
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sync_worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors, errors[:3]


def test_list_reads_over_the_views_and_the_postgres_fallback(
    daemon: Daemon, writer: Writer, database_url: str, redis_url: str
) -> None:
    agent = writer.create_agent(
        {"username": "ann", "display_name": "Ann", "password": "12345678", "status": "online"}
    ).value
    other = writer.create_agent(
        {"username": "bob", "display_name": "Bob", "password": "12345678", "status": "online"}
    ).value
    first = writer.create_ticket({"title": "first"}).value
    second = writer.create_ticket({"title": "second"}).value
    third = writer.create_ticket({"title": "third"}).value
    writer.assign_ticket(first.id, {"agent_id": agent.id})
    last = writer.assign_ticket(third.id, {"agent_id": agent.id}).token
    moved = writer.change_ticket_status(second.id, {"to_status": "pending"})
    token = moved.token
    assert CacheReader.connect(redis_url).wait(max(last, token, key=parse_lsn), timeout=30)

    # The daemon keeps the views (contract 6b) and says so in cdc:state.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget("cdc:state", "views") == "1"

    def check(open_: list[Any], of: list[Any], online: list[Any], from_redis: bool) -> None:
        # Redis and PostgreSQL answer alike ("second" is pending now).
        assert [t.id for t in open_] == [third.id, first.id]
        assert sorted(a.id for a in online) == sorted([agent.id, other.id])
        assert [t.id for t in of] == [third.id, first.id]  # newest updated_at first
        assert all(t.assignee_id == agent.id for t in of)

    def sync_reads(limit: int = 10) -> tuple[list[Any], list[Any], list[Any]]:
        with CacheReader.connect(redis_url, writer.database) as reader:
            return (
                reader.tickets_with_status("open", limit=limit, after=token),
                reader.tickets_of(agent.id, after=token),
                reader.agents_with_status("online", after=token),
            )

    async def async_reads() -> tuple[list[Any], list[Any], list[Any]]:
        async with (
            await AsyncWriter.connect(database_url, max_size=1) as awriter,
            AsyncCacheReader.connect(redis_url, awriter.database) as reader,
        ):
            return (
                await reader.tickets_with_status("open", limit=10, after=token),
                await reader.tickets_of(agent.id, after=token),
                await reader.agents_with_status("online", after=token),
            )

    check(*sync_reads(), from_redis=True)
    check(*run(async_reads()), from_redis=True)
    assert [t.id for t in sync_reads(limit=1)[0]] == [third.id]
    # Until the daemon says it keeps views (``views`` in cdc:state), PostgreSQL answers.
    client.hdel("cdc:state", "views")
    check(*sync_reads(), from_redis=False)
    client.hset("cdc:state", "views", "1")

    # Not ready (a snapshot loading): PostgreSQL answers, in the same order.
    client.hset("cdc:state", "loading", "1")
    check(*sync_reads(), from_redis=False)
    check(*run(async_reads()), from_redis=False)
    assert [t.id for t in sync_reads(limit=1)[0]] == [third.id]
    client.hdel("cdc:state", "loading")
    check(*sync_reads(), from_redis=True)


def test_list_reads_without_a_cache_use_postgres(writer: Writer, redis_url: str) -> None:
    """No daemon, no cdc:state: the cache is not ready, PostgreSQL answers."""
    a = writer.create_ticket({"title": "a"}).value
    b = writer.create_ticket({"title": "b"}).value
    with CacheReader.connect(redis_url, writer.database) as reader:
        assert [t.id for t in reader.tickets_with_status("open")] == [b.id, a.id]
        assert [t.id for t in reader.tickets_with_status("open", limit=1)] == [b.id]
        assert reader.tickets_with_status("closed") == []
        assert reader.agents_with_status("online") == []
    redis.Redis.from_url(redis_url).zadd("tickets:status:{open}", {"ghost": 1})
    with CacheReader.connect(redis_url, writer.database) as reader:
        assert len(reader.tickets_with_status("open")) == 2


def test_list_read_inputs_are_checked(redis_url: str) -> None:
    import pytest

    from writer import InvalidInput

    with CacheReader.connect(redis_url) as reader:
        with pytest.raises(InvalidInput):
            reader.tickets_with_status("nonsense")
        with pytest.raises(InvalidInput):
            reader.tickets_with_status("open", limit=0)
        with pytest.raises(InvalidInput):
            reader.agents_with_status("asleep")
        with pytest.raises(InvalidInput):
            reader.wait("not-a-token")


def test_a_reader_whose_acl_forbids_the_channel_still_sees_the_checkpoint(tmp_path: Path) -> None:
    """No ``&cdc:*`` for this user: subscribing fails, waits read the checkpoint instead."""
    server = RedisServer(tmp_path / "acl")
    with server.running():
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser(
            "reader",
            enabled=True,
            passwords=["+pw-reader"],
            keys=["*"],
            commands=["+@read", "+@transaction", "+@pubsub", "+ping"],
        )
        admin.hset("cdc:state", "lsn", "0/10")
        url = f"redis://reader:pw-reader@127.0.0.1:{server.port}/0"
        with CacheReader.connect(url) as reader:
            results: list[bool] = []
            thread = threading.Thread(
                target=lambda: results.append(reader.wait("0/20", timeout=120))
            )
            thread.start()
            wait_for(lambda: (f := reader._feeds.get("cdc:state")) and f.failed(), 30, "refusal")
            admin.hset("cdc:state", "lsn", "0/20")  # applied; no message could reach it
            thread.join(60)  # well before the wait's own 120 s
            assert results == [True]

        async def async_wait() -> bool:
            async with AsyncCacheReader.connect(url) as areader:
                task = asyncio.create_task(areader.wait("0/30", timeout=120))
                while (f := areader._feeds.get("cdc:state")) is None or not f.failed():
                    await asyncio.sleep(0.01)
                admin.hset("cdc:state", "lsn", "0/30")
                return await asyncio.wait_for(task, 60)

        assert run(async_wait()) is True


def test_readers_answer_from_postgres_when_redis_is_down(writer: Writer, database_url: str) -> None:
    """No Redis at all (nothing listens on the port): every read comes from PostgreSQL
    (each after the Redis client's own connection retries)."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    created = writer.create_ticket({"title": "no cache"})
    agent = writer.create_agent(
        {"username": "eve", "display_name": "Eve", "password": "12345678"}
    ).value
    with CacheReader.connect(down, writer.database) as reader:
        assert reader.ticket(created.value.id, after=created.token, timeout=0.2) == created.value
        assert [t.id for t in reader.tickets_with_status("open")] == [created.value.id]

    async def scenario() -> None:
        async with (
            await AsyncWriter.connect(database_url, max_size=1) as awriter,
            AsyncCacheReader.connect(down, awriter.database) as areader,
        ):
            seen = await areader.ticket(created.value.id, after=created.token, timeout=0.2)
            assert seen == created.value
            assert [a.id for a in await areader.agents_with_status("offline")] == [agent.id]

    run(scenario())


def test_a_reader_whose_acl_has_no_registry_waits_on_cdc_state(tmp_path: Path) -> None:
    """A reader user with the ACL of an earlier README (``~cdc:state``, no ``~cdc:tables``):
    the registry cannot be read, so waits follow ``cdc:state`` as before."""
    server = RedisServer(tmp_path / "acl")
    with server.running():
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser(
            "reader",
            enabled=True,
            passwords=["+pw-reader"],
            keys=["ticket:*", "cdc:state"],
            channels=["cdc:*"],
            commands=["+@read", "+@transaction", "+@pubsub", "+ping"],
        )
        admin.hset("cdc:tables", "tickets", "cdc:state")
        admin.hset("cdc:state", "lsn", "0/20")
        url = f"redis://reader:pw-reader@127.0.0.1:{server.port}/0"
        with CacheReader.connect(url) as reader:
            assert reader.wait("0/20", timeout=30, table="tickets")
            assert reader.applied_position("tickets") == 0x20

        async def async_wait() -> bool:
            async with AsyncCacheReader.connect(url) as areader:
                return await areader.wait("0/20", timeout=30, table="tickets")

        assert run(async_wait()) is True


def test_async_reader_connect_opens_no_connection_and_probes_on_the_loop() -> None:
    """AsyncCacheReader.connect does no I/O (it used to ask the node with a blocking INFO,
    stalling the event loop for up to socket_timeout); the cluster probe runs at the first
    read, as a coroutine: a task of the same loop accepts (and drops) its connection while
    the read is in flight."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    events: list[str] = []

    async def drop_connections() -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            events.append("accepted")
            conn.close()

    async def main() -> None:
        reader = AsyncCacheReader.connect(f"redis://127.0.0.1:{port}/0", socket_timeout=10)
        with pytest.raises(BlockingIOError):
            listener.accept()  # connect() opened nothing
        acceptor = asyncio.create_task(drop_connections())
        try:
            with pytest.raises((redis.RedisError, OSError)):
                await reader.applied_position()
            events.append("read failed")
        finally:
            acceptor.cancel()
            await reader.close()

    try:
        asyncio.run(main())
    finally:
        listener.close()
    assert events[0] == "accepted", events
    assert events[-1] == "read failed", events
