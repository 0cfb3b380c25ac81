"""The daemon end to end: snapshot, then every kind of change (reliability case 1),
whole transactions (guarantee 3), read-your-writes (guarantee 7), the Redis layout."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import redis

from tests.helpers import Daemon, assert_converged, fence, redis_state, running, wait_for
from writer import CacheReader, Writer

Conn = psycopg.Connection[tuple[Any, ...]]


def seed(writer: Writer, tickets: int = 5) -> None:
    writer.create_agent(
        {"id": "a1", "username": "alice", "display_name": "Alice", "password": "12345678"}
    )
    writer.create_agent(
        {"id": "a2", "username": "bob", "display_name": "Bob", "password": "12345678"}
    )
    for i in range(tickets):
        writer.create_ticket(
            {
                "id": f"t{i}",
                "title": f"ticket {i}",
                "customer": {"n": i},
                "tags": ["x"],
                "assignee_id": "a1",
            }
        )


def test_first_start_loads_the_snapshot(
    writer: Writer, make_daemon: Callable[..., Daemon], database_url: str, redis_url: str
) -> None:
    seed(writer, tickets=20)
    client = redis.Redis.from_url(redis_url)
    client.set("ticket:{stale}", "left over from an older cache")
    with running(make_daemon()) as daemon:
        counts = assert_converged(database_url, redis_url)
        assert counts == {"agents": 2, "tickets": 21}  # 20 + the fence row
        state = redis_state(redis_url)
        assert state["slot"] == daemon.slot
        assert state["lsn"]
        assert client.exists("ticket:{stale}") == 0
        events = [e["event"] for e in daemon.events()]
        assert "snapshot loaded" in events


def test_every_kind_of_change(
    daemon: Daemon, writer: Writer, pg: Conn, database_url: str, redis_url: str
) -> None:
    seed(writer)
    writer.update_ticket("t1", {"title": "renamed", "category": "billing"})
    writer.update_ticket("t1", {"category": None})  # NULL: the field disappears
    writer.change_ticket_status("t2", {"to_status": "resolved"})
    writer.assign_ticket("t3", {"agent_id": "a2"})
    writer.update_agent("a1", {"username": "alice2", "status": "busy"})  # the lookup key moves
    writer.deactivate_agent("a2")
    pg.execute("DELETE FROM tickets WHERE id = 't4'")
    # A multi-row, multi-table transaction.
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE tickets SET priority = 'high' WHERE id IN ('t0', 't1')")
        conn.execute(
            "INSERT INTO agents (id, username, display_name, password_hash)"
            " VALUES ('a3', 'carol', 'C', 'x')"
        )
        conn.execute("INSERT INTO tickets (id, title, assignee_id) VALUES ('t9', 'nine', 'a3')")
    # A primary key changed by UPDATE, on both tables.
    pg.execute("UPDATE tickets SET id = 't1-moved' WHERE id = 't1'")
    pg.execute("UPDATE tickets SET assignee_id = NULL WHERE assignee_id = 'a3'")
    pg.execute("UPDATE agents SET id = 'a3-moved', username = 'carol2' WHERE id = 'a3'")
    pg.execute("DELETE FROM agents WHERE id = 'a3-moved'")
    counts = assert_converged(database_url, redis_url)
    assert counts["agents"] == 2
    client = redis.Redis.from_url(redis_url)
    assert (
        client.exists(
            "ticket:{t1}", "ticket:{t4}", "agent:username:{alice}", "agent:username:{carol2}"
        )
        == 0
    )
    assert client.get("agent:username:{alice2}") == b"a1"
    assert client.hget("ticket:{t1-moved}", "priority") == b"high"
    assert client.hget("agent:{a1}", "password_hash") is None


def test_values_are_postgres_text_in_utc(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    pg.execute("SET TimeZone = 'Asia/Tokyo'")
    pg.execute(
        "INSERT INTO tickets (id, title, customer, tags, sla_due_at, reopen_count)"
        " VALUES ('v', 'values', '{\"b\": 1.50, \"a\": [true, null]}', '[]',"
        " '2026-01-02 03:04:05.678+09', 3)"
    )
    fence(database_url, redis_url)
    fields = redis.Redis.from_url(redis_url).hgetall("ticket:{v}")
    assert fields[b"sla_due_at"] == b"2026-01-01 18:04:05.678+00"
    assert fields[b"customer"] == b'{"a": [true, null], "b": 1.50}'
    assert fields[b"reopen_count"] == b"3"
    assert b"description" not in fields  # NULL: no field
    assert b"/" in fields[b"_v"]
    assert_converged(database_url, redis_url)


def test_readers_never_see_part_of_a_transaction(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """Guarantee 3: ten rows updated together are always seen together."""
    ids = [f"w{i}" for i in range(10)]
    with psycopg.connect(database_url) as conn:
        for i in ids:
            conn.execute("INSERT INTO tickets (id, title) VALUES (%s, '0')", (i,))
    fence(database_url, redis_url)
    stop = threading.Event()
    torn: list[set[bytes]] = []

    def read() -> None:
        client = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            pipe = client.pipeline(transaction=True)
            for i in ids:
                pipe.hget(f"ticket:{{{i}}}", "title")
            seen = set(pipe.execute())
            if len(seen) != 1:
                torn.append(seen)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with psycopg.connect(database_url) as conn:
            for n in range(1, 200):
                conn.execute("UPDATE tickets SET title = %s WHERE id = ANY(%s)", (str(n), ids))
                conn.commit()
        fence(database_url, redis_url)
    finally:
        stop.set()
        reader.join()
    assert not torn, torn[:5]
    assert redis.Redis.from_url(redis_url).hget("ticket:{w0}", "title") == b"199"


def test_read_your_writes(daemon: Daemon, writer: Writer, redis_url: str) -> None:
    reader = CacheReader.connect(redis_url, writer.database)
    for n in range(30):
        written = writer.create_ticket({"title": f"rw {n}"})
        assert reader.wait(written.token, timeout=10)
        cached = redis.Redis.from_url(redis_url).hgetall(f"ticket:{{{written.value.id}}}")
        assert cached[b"title"] == f"rw {n}".encode()
        updated = writer.update_ticket(written.value.id, {"priority": "urgent"})
        seen = reader.ticket(written.value.id, after=updated.token, timeout=10)
        assert seen is not None
        assert seen.priority.value == "urgent"
        assert seen == updated.value


def test_reader_falls_back_to_postgres_on_a_miss(writer: Writer, redis_url: str) -> None:
    # No daemon: nothing is in Redis, the reader still answers (and waits give up).
    created = writer.create_ticket({"title": "only in postgres"})
    reader = CacheReader.connect(redis_url, writer.database)
    assert reader.wait(created.token, timeout=0.05) is False
    assert reader.ticket(created.value.id) == created.value
    assert reader.ticket("nope") is None
    agent = writer.create_agent(
        {"username": "dora", "display_name": "D", "password": "12345678"}
    ).value
    assert reader.agent_by_username("dora") == agent
    assert reader.agent(agent.id) == agent


def test_metrics_and_health(
    daemon: Daemon, writer: Writer, database_url: str, redis_url: str
) -> None:
    seed(writer)
    fence(database_url, redis_url)
    assert daemon.http("/healthz")[0] == 200
    assert daemon.http("/readyz")[0] == 200
    wait_for(lambda: (daemon.metric("cdc_changes_total", 'op="insert",table="tickets"') or 0) >= 6)
    assert (daemon.metric("cdc_transactions_total") or 0) >= 7
    assert daemon.metric("cdc_connected", 'target="postgres"') == 1
    assert daemon.metric("cdc_connected", 'target="redis"') == 1
    assert (daemon.metric("cdc_last_applied_lsn") or 0) > 0
    wait_for(lambda: daemon.metric("cdc_slot_retained_wal_bytes") is not None)
    # One delay observed per applied transaction (the histogram is not just declared).
    assert (daemon.metric("cdc_apply_delay_seconds_count") or 0) >= 7
    assert (daemon.metric("cdc_replication_lag_bytes") or 0) >= 0
    # Contract: the lag is 0 when idle and caught up.
    wait_for(lambda: daemon.metric("cdc_replication_lag_seconds") == 0, 30, "lag 0 when idle")
    body = daemon.http("/metrics")[1]
    assert "postgres-local" not in body  # no secrets in metrics
