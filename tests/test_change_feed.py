"""The change feed (contract 6c) end to end: one stream entry per applied change, even
when the daemon is killed -9 after a batch reached Redis but before the slot was told
(the restarted daemon streams those transactions again; the batch script's position
check refuses them, so no entry is added twice)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis

from tests.helpers import Daemon, assert_converged, running, wait_for

Conn = psycopg.Connection[tuple[Any, ...]]


def entries(client: redis.Redis, table: str) -> list[dict[str, str]]:
    raw: Any = client.xrange(f"changes:{table}")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


def test_one_entry_per_change_across_kill_9_between_apply_and_confirm(
    make_daemon: Callable[..., Daemon], pg: Conn, redis_url: str, tmp_path: Path
) -> None:
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash)"
        " VALUES ('a1', 'ann', 'Ann', 'secret')"
    )
    pg.execute("INSERT INTO tickets (id, title) VALUES ('old', 'loaded by the snapshot')")
    client = redis.Redis.from_url(redis_url)
    hold = tmp_path / "hold"
    expected: list[tuple[str, str]] = []
    daemon = make_daemon(CDC_CHANGE_FEED="true", CDC_FAILPOINTS=f"after_send=pause:{hold}")
    with running(daemon):
        assert entries(client, "tickets") == []  # a snapshot load is not a change
        hold.touch()
        with pg.transaction():
            pg.execute("INSERT INTO tickets (id, title) VALUES ('t1', 'one')")
            pg.execute("UPDATE tickets SET status = 'pending' WHERE id = 't1'")
            pg.execute("UPDATE tickets SET id = 't2' WHERE id = 't1'")
            pg.execute("UPDATE agents SET status = 'online' WHERE id = 'a1'")
        expected += [("insert", "t1"), ("update", "t1"), ("delete", "t1"), ("insert", "t2")]
        pg.execute("DELETE FROM tickets WHERE id = 'old'")
        expected += [("delete", "old")]
        wait_for((tmp_path / "hold.hit").exists, 30, "the daemon to pause after a send")
        # The batch is in Redis (its checkpoint moved), the slot has not been told.
        wait_for(lambda: len(entries(client, "tickets")) >= 1, 30, "the batch in Redis")
        daemon.kill()
    hold.unlink()
    with running(make_daemon(CDC_CHANGE_FEED="true")):
        pg.execute("UPDATE tickets SET title = 'two' WHERE id = 't2'")
        pg.execute("TRUNCATE tickets CASCADE")
        pg.execute("INSERT INTO tickets (id, title) VALUES ('last', 'marker')")
        expected += [("update", "t2"), ("truncate", ""), ("insert", "last")]
        wait_for(
            lambda: any(e["id"] == "last" for e in entries(client, "tickets")), 30, "the marker"
        )
    tickets = entries(client, "tickets")
    assert [(e["op"], e["id"]) for e in tickets] == expected
    assert [e["columns"] for e in tickets[1:3]] == ["status", ""]
    assert tickets[-3]["columns"] == "title"
    first = tickets[0]
    assert set(first["columns"].split(",")) >= {"id", "title", "status", "created_at"}
    # One transaction: one lsn, seq from 0 in order.
    assert [e["lsn"] for e in tickets[:4]] == [first["lsn"]] * 4
    assert [e["seq"] for e in tickets[:4]] == ["0", "1", "2", "2"]
    assert len({(e["lsn"], e["seq"], e["op"]) for e in tickets}) == len(tickets)
    agents = entries(client, "agents")
    assert [(e["op"], e["id"], e["columns"], e["seq"]) for e in agents] == [
        ("update", "a1", "status", "3")
    ]
    assert agents[0]["lsn"] == first["lsn"]


def test_a_feed_key_holding_another_type_is_replaced_and_the_batch_applies_whole(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """Case 18 for the feed: ``changes:tickets`` holding a string made XADD fail inside
    the batch script after the batch's rows were written, so the rows were visible while
    the checkpoint stayed and the batch was retried (and failed) for ever."""
    client = redis.Redis.from_url(redis_url)
    with running(make_daemon(CDC_CHANGE_FEED="true")):
        client.set("changes:tickets", "something else wrote here")
        with pg.transaction():
            pg.execute("INSERT INTO tickets (id, title) VALUES ('f1', 'one'), ('f2', 'two')")
        wait_for(lambda: client.type("changes:tickets") == b"stream", 30, "the feed replaced")
        assert [e["id"] for e in entries(client, "tickets")] == ["f1", "f2"]
        assert_converged(database_url, redis_url)
