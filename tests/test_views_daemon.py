"""Views (contract 6b) end to end: the daemon as a subprocess keeps them equal to a SQL
computation through streaming, kill -9, TRUNCATE, a rebuild, ``cdc verify --repair`` and
``cdc slot reset``; a reader sampling atomically never sees a ticket in two status sets
or in none. The comparison is :func:`tests.helpers.view_problems` (inside
:func:`assert_converged`)."""

from __future__ import annotations

import json
import random
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis

from tests.helpers import FENCE_ID, Daemon, assert_converged, run_cdc, running, wait_for

Conn = psycopg.Connection[tuple[Any, ...]]
STATUSES = ("open", "in_progress", "pending", "resolved", "closed")
AGENT_STATUSES = ("online", "busy", "away", "offline")
AGENTS = [f"a{i}" for i in range(5)]
TICKETS = [f"t{i}" for i in range(30)]


def seed(conn: Conn) -> None:
    for agent in AGENTS:
        conn.execute(
            "INSERT INTO agents (id, username, display_name, password_hash, status)"
            " VALUES (%s, %s, %s, 'x', 'online')",
            (agent, f"user-{agent}", agent),
        )
    for i, ticket in enumerate(TICKETS[:20]):
        conn.execute(
            "INSERT INTO tickets (id, title, status, assignee_id) VALUES (%s, 't', %s, %s)",
            (ticket, STATUSES[i % 5], AGENTS[i % 5] if i % 3 else None),
        )


def churn(conn: Conn, rng: random.Random, transactions: int) -> None:
    """Inserts, status moves, reassignments, other-column updates, deletes, key changes."""
    for _ in range(transactions):
        with conn.transaction():
            for _ in range(rng.randint(1, 4)):
                ticket = rng.choice(TICKETS)
                roll = rng.random()
                if roll < 0.3:
                    conn.execute(
                        "UPDATE tickets SET status = %s, updated_at = now() - random() * interval"
                        " '10 days' WHERE id = %s",
                        (rng.choice(STATUSES), ticket),
                    )
                elif roll < 0.5:
                    conn.execute(
                        "UPDATE tickets SET assignee_id = %s WHERE id = %s",
                        (rng.choice([*AGENTS, None]), ticket),
                    )
                elif roll < 0.6:
                    conn.execute("UPDATE tickets SET title = title || 'x' WHERE id = %s", (ticket,))
                elif roll < 0.7:
                    conn.execute("DELETE FROM tickets WHERE id = %s", (ticket,))
                elif roll < 0.75:
                    other = rng.choice(TICKETS)
                    conn.execute(
                        "UPDATE tickets SET id = %s WHERE id = %s"
                        " AND NOT EXISTS (SELECT 1 FROM tickets WHERE id = %s)",
                        (other, ticket, other),
                    )
                elif roll < 0.85:
                    conn.execute(
                        "UPDATE agents SET status = %s WHERE id = %s",
                        (rng.choice(AGENT_STATUSES), rng.choice(AGENTS)),
                    )
                else:
                    conn.execute(
                        "INSERT INTO tickets (id, title, status, assignee_id)"
                        " VALUES (%s, 'n', %s, %s) ON CONFLICT (id) DO UPDATE"
                        " SET status = EXCLUDED.status, updated_at = now()",
                        (ticket, rng.choice(STATUSES), rng.choice([*AGENTS, None])),
                    )


@pytest.fixture
def cdc(
    database_url: str, redis_url: str, slot_name: str
) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cdc(database_url, redis_url, slot_name, *args)

    return run


def test_views_equal_sql_through_streaming_kill_truncate_rebuild_repair_and_reset(
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_url: str,
    redis_url: str,
    cdc: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    rng = random.Random(11)
    seed(pg)
    client = redis.Redis.from_url(redis_url)
    with running(make_daemon()) as daemon:
        assert_converged(database_url, redis_url)  # the snapshot load
        churn(pg, rng, 60)
        assert_converged(database_url, redis_url)
        # kill -9 while changes stream, then a restart.
        worker = threading.Thread(
            target=churn,
            args=(psycopg.connect(database_url, autocommit=True), random.Random(5), 80),
        )
        worker.start()
        daemon.kill()
        worker.join()
    with running(make_daemon()) as daemon:
        churn(pg, rng, 20)
        assert_converged(database_url, redis_url)
        pg.execute("TRUNCATE tickets CASCADE")
        assert_converged(database_url, redis_url)
        # Only the fence row (written after the TRUNCATE) is left in a view.
        assert list(client.scan_iter(match="tickets:*")) == [b"tickets:status:{open}"]
        assert client.zrange("tickets:status:{open}", 0, -1) == [FENCE_ID.encode()]
        seed_more = [("t1", "open"), ("t2", "pending")]
        for ticket, status in seed_more:
            pg.execute(
                "INSERT INTO tickets (id, title, status) VALUES (%s, 'r', %s)", (ticket, status)
            )
        churn(pg, rng, 20)
        assert_converged(database_url, redis_url)
        # A rebuild: Redis loses everything while the daemon runs.
        client.flushdb()
        churn(pg, rng, 20)
        wait_for(
            lambda: any(e.get("event") == "rebuild complete" for e in daemon.events()),
            60,
            "the rebuild",
        )
        assert_converged(database_url, redis_url)
        # Damaged views: cdc verify finds it, --repair puts it right.
        client.sadd("agents:status:{away}", "a0", "ghost")
        client.zadd("tickets:status:{closed}", {"t1": 5.0})
        some: Any = client.zrange("tickets:status:{open}", 0, 0)
        if some:
            client.zrem("tickets:status:{open}", some[0])
        found = cdc("verify", "--json")
        assert found.returncode == 1, found.stderr
        report = json.loads(found.stdout)
        assert any(k.startswith("agents:status:{away}") for k in report["extra"]), report
        repaired = cdc("verify", "--repair")
        assert repaired.returncode in (0, 1), repaired.stderr
        assert_converged(database_url, redis_url)
        assert cdc("verify").returncode == 0
    # slot reset reloads everything; stale view members go.
    client.sadd("tickets:assignee:{a1}", "ghost")
    client.zadd("tickets:status:{open}", {"gone": 1.0})
    done = cdc("slot", "reset", "--yes")
    assert done.returncode == 0, done.stderr
    with running(make_daemon()):
        assert_converged(database_url, redis_url)


def test_a_reader_never_sees_a_ticket_in_two_status_sets_or_none(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    watched = [f"m{i}" for i in range(6)]
    for ticket in watched:
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'm')", (ticket,))
    assert_converged(database_url, redis_url)
    stop = threading.Event()
    moves = 0

    def mover() -> None:
        nonlocal moves
        rng = random.Random(3)
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    for ticket in rng.sample(watched, 3):
                        conn.execute(
                            "UPDATE tickets SET status = %s, title = title || '.' WHERE id = %s",
                            (rng.choice(STATUSES), ticket),
                        )
                moves += 1

    thread = threading.Thread(target=mover, daemon=True)
    thread.start()
    client = redis.Redis.from_url(redis_url)
    bad: list[str] = []
    samples = 0
    try:
        while moves < 300 and not bad:
            pipe = client.pipeline(transaction=True)
            for status in STATUSES:
                for ticket in watched:
                    pipe.zscore(f"tickets:status:{{{status}}}", ticket)
            for ticket in watched:
                pipe.hget(f"ticket:{{{ticket}}}", "status")
            replies = pipe.execute()
            samples += 1
            n = len(watched)
            for t, ticket in enumerate(watched):
                member_of = [s for i, s in enumerate(STATUSES) if replies[i * n + t] is not None]
                row = replies[len(STATUSES) * n + t]
                if len(member_of) != 1 or row is None or member_of[0] != row.decode():
                    bad.append(f"{ticket}: in {member_of}, row says {row!r}")
    finally:
        stop.set()
        thread.join(30)
    assert not bad, bad[:5]
    assert samples > 10
    assert_converged(database_url, redis_url)


def test_views_of_a_transaction_applied_in_chunks_across_a_kill(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    for i in range(200):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'c')", (f"c{i}",))
    with running(make_daemon(CDC_BATCH_MAX_CHANGES="40")) as daemon:
        assert_converged(database_url, redis_url)
        client = redis.Redis.from_url(redis_url)
        with pg.transaction():
            for i in range(200):
                pg.execute(
                    "UPDATE tickets SET status = %s, assignee_id = NULL WHERE id = %s",
                    (STATUSES[i % 5], f"c{i}"),
                )
        # kill -9 once some of it reached Redis (in chunks, or whole).
        wait_for(lambda: client.exists("tickets:status:{closed}"), 30, "part of it applied")
        daemon.kill()
    with running(make_daemon(CDC_BATCH_MAX_CHANGES="40")):
        assert_converged(database_url, redis_url)
