"""The example service end to end: HTTP in, PostgreSQL only, the daemon, reads from Redis.

After every write through the API, the next read with ``?after=<token>`` shows it, and
Redis (read directly, at that moment) already holds it: the read was served by the cache
the daemon keeps, not by a dual write.
"""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import redis

from examples.support_api.app import create_app
from tests.helpers import Daemon
from tests.test_writer_async import run


def test_support_api_reads_its_own_writes_through_the_cache(
    daemon: Daemon, database_url: str, redis_url: str
) -> None:
    cache = redis.Redis.from_url(redis_url, decode_responses=True)
    app = create_app(database_url, redis_url)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://api") as http,
        ):

            async def write(method: str, path: str, body: dict[str, Any], code: int = 200) -> Any:
                response = await http.request(method, path, json=body)
                assert response.status_code == code, response.text
                return response.json()

            async def read(ticket_id: str, token: str) -> dict[str, Any]:
                response = await http.get(f"/tickets/{ticket_id}", params={"after": token})
                assert response.status_code == 200, response.text
                ticket: dict[str, Any] = response.json()["ticket"]
                # Redis already reflects the write the token stands for.
                cached = cache.hgetall(f"ticket:{{{ticket_id}}}")
                assert cached["status"] == ticket["status"]
                assert cached["title"] == ticket["title"]
                assert cached.get("assignee_id") == ticket["assignee_id"]
                return ticket

            agent = await write(
                "POST",
                "/agents",
                {"username": "ann", "display_name": "Ann", "password": "correct horse"},
                201,
            )
            agent_id = agent["agent"]["id"]
            # Login: the username is found in the cache, the password checked in PostgreSQL.
            assert cache.get("agent:username:{ann}") in (None, agent_id)
            response = await http.post(
                "/login", json={"username": "ann", "password": "wrong password"}
            )
            assert response.status_code == 401
            logged_in = (
                await http.post("/login", json={"username": "ann", "password": "correct horse"})
            ).json()
            assert logged_in["agent"]["id"] == agent_id
            assert "password_hash" not in logged_in["agent"]
            assert (
                await http.post("/login", json={"username": "bob", "password": "x" * 8})
            ).status_code == 401

            created = await write("POST", "/tickets", {"title": "Order #1042 damaged"}, 201)
            ticket_id = created["ticket"]["id"]
            assert (await read(ticket_id, created["token"]))["title"] == "Order #1042 damaged"

            updated = await write("PATCH", f"/tickets/{ticket_id}", {"title": "Order #1042"})
            assert (await read(ticket_id, updated["token"]))["title"] == "Order #1042"

            assigned = await write(
                "POST", f"/tickets/{ticket_id}/assign", {"agent_id": agent_id, "actor": agent_id}
            )
            assert (await read(ticket_id, assigned["token"]))["assignee_id"] == agent_id
            # The daemon keeps no views yet (no ``views`` in cdc:state): PostgreSQL answers.
            mine = await http.get(
                f"/agents/{agent_id}/tickets", params={"after": assigned["token"]}
            )
            assert [t["id"] for t in mine.json()["tickets"]] == [ticket_id]

            moved = await write(
                "POST", f"/tickets/{ticket_id}/status", {"to_status": "in_progress"}
            )
            assert (await read(ticket_id, moved["token"]))["status"] == "in_progress"

            commented = await write(
                "POST",
                f"/tickets/{ticket_id}/comments",
                {"content": "We are on it", "author_id": agent_id},
                201,
            )
            seen = await read(ticket_id, commented["token"])
            assert seen["first_response_at"] is not None

            closed = await write(
                "POST", f"/tickets/{ticket_id}/close", {"note": "refunded", "actor": agent_id}
            )
            assert (await read(ticket_id, closed["token"]))["status"] == "closed"
            listed = await http.get(
                "/tickets", params={"status": "closed", "after": closed["token"]}
            )
            assert [t["id"] for t in listed.json()["tickets"]] == [ticket_id]

            # Typed errors as HTTP answers.
            assert (await http.get("/tickets/ghost")).status_code == 404
            bad = await http.post("/tickets", json={"title": ""})
            assert bad.status_code == 422
            again = await http.post(f"/tickets/{ticket_id}/status", json={"to_status": "pending"})
            assert again.status_code == 409
            missing = await http.post("/tickets/ghost/comments", json={"content": "x"})
            assert missing.status_code == 404

    run(scenario())
    with psycopg.connect(database_url) as conn:
        comments = conn.execute(
            "SELECT content FROM ticket_comments ORDER BY created_at"
        ).fetchall()
        history = conn.execute("SELECT to_status FROM ticket_status_history ORDER BY id").fetchall()
    assert [c[0] for c in comments] == ["We are on it", "refunded"]
    assert [h[0] for h in history] == ["in_progress", "closed"]
