"""examples/sse: a real HTTP client reads the Server-Sent Events the example app makes of
the change feed the daemon writes, and resumes from ``Last-Event-ID`` without a gap or a
repeat; a cursor the feed was trimmed past gets a ``reset`` event."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import redis
import uvicorn

from devstack.servers import free_port
from examples.sse.app import create_app
from tests.helpers import Daemon, running, wait_for

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def server(redis_url: str) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(redis_url, ping=1),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
    )
    app_server = uvicorn.Server(config)
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    wait_for(lambda: app_server.started, 30, "the SSE app to start")
    yield f"http://127.0.0.1:{port}"
    app_server.should_exit = True
    thread.join(30)


def read_events(
    base: str, count: int, last_event_id: str | None = None, then: Callable[[], None] | None = None
) -> list[dict[str, Any]]:
    """Connect, run ``then`` once connected, and read ``count`` events (SSE wire format)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out: list[dict[str, Any]] = []
    url = f"{base}/changes?tables=tickets"
    with httpx.Client(timeout=30) as client, client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        if then is not None:
            then()
        event: dict[str, Any] = {}
        for line in response.iter_lines():
            if not line:
                if "data" in event:
                    out.append(event)
                    if len(out) == count:
                        return out
                event = {}
                continue
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")
    return out


def test_a_browser_follows_the_feed_and_resumes_from_last_event_id(
    make_daemon: Callable[..., Daemon], pg: Conn, redis_url: str, server: str
) -> None:
    with running(make_daemon(CDC_CHANGE_FEED="true")):

        def write() -> None:
            pg.execute("INSERT INTO tickets (id, title) VALUES ('s1', 'one')")
            pg.execute("UPDATE tickets SET status = 'pending' WHERE id = 's1'")

        first = read_events(server, 2, then=write)
        assert [e["event"] for e in first] == ["change", "change"]
        changes = [json.loads(e["data"]) for e in first]
        assert [(c["table"], c["op"], c["id"]) for c in changes] == [
            ("tickets", "insert", "s1"),
            ("tickets", "update", "s1"),
        ]
        assert changes[1]["columns"] == "status"
        # Disconnected after the first event: the rest and what came since, once each.
        pg.execute("DELETE FROM tickets WHERE id = 's1'")
        wait_for(
            lambda: redis.Redis.from_url(redis_url).xlen("changes:tickets") == 3, 30, "the delete"
        )
        resumed = read_events(server, 2, last_event_id=first[0]["id"])
        assert [(json.loads(e["data"])["op"]) for e in resumed] == ["update", "delete"]
        assert resumed[0]["id"] == first[1]["id"]


def test_a_cursor_the_feed_was_trimmed_past_gets_a_reset(redis_url: str, server: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd("changes:tickets", {"op": "insert", "id": "a"}, id="1-1")
    client.xadd("changes:tickets", {"op": "insert", "id": "b"}, id="2-1")
    client.xtrim("changes:tickets", maxlen=1, approximate=False)

    def more() -> None:
        client.xadd("changes:tickets", {"op": "insert", "id": "c"}, id="3-1")

    got = read_events(server, 2, last_event_id="tickets=1-1", then=more)
    assert got[0]["event"] == "reset"
    assert got[0]["id"] == "tickets=2-1"
    assert json.loads(got[1]["data"])["id"] == "c"
