"""Reliability case 2: ``kill -9`` of the daemon at several points; I1, I2, I4 hold."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis

from schema.lsn import parse_lsn
from tests.helpers import (
    Daemon,
    Load,
    Monitor,
    assert_converged,
    redis_state,
    slot_confirmed,
    text,
    wait_for,
)

Conn = psycopg.Connection[tuple[Any, ...]]
ROWS = [f"k{i}" for i in range(40)]


def test_kill_9_at_random_points_under_load(
    make_daemon: Callable[..., Daemon], database_url: str, redis_url: str, slot_name: str
) -> None:
    load = Load(database_url, ROWS).start()
    monitor = Monitor(database_url, redis_url, slot_name, ROWS).start()
    applied_not_confirmed = 0
    try:
        rng = random.Random(11)
        for _ in range(4):
            daemon = make_daemon().start().wait_ready()
            target = load.commits + 30
            wait_for(lambda target=target: load.commits >= target, 30, "writes to flow")  # type: ignore[misc]
            time.sleep(rng.uniform(0.05, 0.6))  # vary the kill point, not a timing assertion
            state = redis_state(redis_url)
            confirmed = slot_confirmed(database_url, slot_name) or 0
            if state.get("lsn") and parse_lsn(state["lsn"]) > confirmed:
                applied_not_confirmed += 1
            daemon.kill()
        final = make_daemon().start().wait_ready()
    finally:
        load.stop()
        monitor.stop()
    assert_converged(database_url, redis_url)
    final.stop()
    assert monitor.samples > 20
    assert not monitor.regressions, monitor.regressions[:10]
    assert not monitor.ack_violations, monitor.ack_violations[:10]
    # The kill points did include "applied to Redis, not yet confirmed to PostgreSQL".
    assert applied_not_confirmed >= 1


def test_kill_9_in_the_middle_of_a_large_transaction(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str, slot_name: str
) -> None:
    env = {"CDC_BATCH_MAX_CHANGES": "500"}
    daemon = make_daemon(**env).start().wait_ready()
    pg.execute("INSERT INTO tickets (id, title) VALUES ('k0', 'before')")
    # 160,000 changes in one transaction; each "big" row is also updated twice, so a
    # replay from the start would move keys back in time (the monitor would see it). The
    # 100,000-row tail keeps the transaction unfinished for a while after the "big" rows
    # reach their final value, so the kill below lands inside it however fast the daemon.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'big' || g, 'v1' FROM generate_series(1, 20000) g"
        )
        conn.execute("UPDATE tickets SET title = 'v2' WHERE id LIKE 'big%'")
        conn.execute("UPDATE tickets SET title = 'v3' WHERE id LIKE 'big%'")
        conn.execute(
            "INSERT INTO tickets (id, title) SELECT 'tail' || g, 't' FROM generate_series(1, 100000) g"
        )
    client = redis.Redis.from_url(redis_url)

    def late_in_the_transaction() -> bool:
        # Some rows already at their final value, the transaction not finished.
        return bool(
            client.hget("ticket:{big1}", "title") == b"v3" and redis_state(redis_url).get("partial")
        )

    wait_for(
        late_in_the_transaction, 120, "the large transaction to be mostly applied", max_delay=0.005
    )
    daemon.kill()
    partial = redis_state(redis_url)["partial"]
    assert partial
    sampled = [f"big{i}" for i in range(1, 20001, 97)]
    assert client.hget("ticket:{big1}", "title") == b"v3"
    versions_before = _versions(redis_url, sampled)
    went_back: list[str] = []
    stop = threading.Event()

    def watch_titles() -> None:
        # Rows already at v3 must never show v1 or v2 again (a replay from the start would).
        client = redis.Redis.from_url(redis_url)
        done: set[str] = set()
        while not stop.is_set():
            pipe = client.pipeline(transaction=False)
            for row in sampled:
                pipe.hget(f"ticket:{{{row}}}", "title")
            for row, title in zip(sampled, pipe.execute(), strict=True):
                if title == b"v3":
                    done.add(row)
                elif row in done:
                    went_back.append(f"{row}: v3 -> {title!r}")
            time.sleep(0.002)

    watcher = threading.Thread(target=watch_titles, daemon=True)
    watcher.start()
    try:
        final = make_daemon(**env).start().wait_ready()
        assert_converged(database_url, redis_url)
    finally:
        stop.set()
        watcher.join(10)
    assert not went_back, went_back[:5]
    versions_after = _versions(redis_url, list(versions_before))
    for key, before in versions_before.items():
        assert versions_after[key] >= before, key
    assert redis_state(redis_url)["partial"] == ""
    resumed = [e for e in final.events() if e.get("event") == "streaming"]
    assert resumed
    final.stop()


def _versions(redis_url: str, ids: list[str]) -> dict[str, int]:
    client = redis.Redis.from_url(redis_url)
    out: dict[str, int] = {}
    for row in ids:
        version = client.hget(f"ticket:{{{row}}}", "_v")
        if version is not None:
            out[row] = parse_lsn(text(version))
    return out


def test_sigterm_finishes_the_batch_and_confirms(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str, slot_name: str
) -> None:
    daemon = make_daemon().start().wait_ready()
    for i in range(50):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 't')", (f"st{i}",))
    assert daemon.stop() == 0
    state = redis_state(redis_url)
    confirmed = slot_confirmed(database_url, slot_name)
    assert confirmed is not None
    assert confirmed == parse_lsn(state["lsn"])  # confirmed exactly what Redis holds
    # It ended the stream with CopyDone (so the server had read that confirmation).
    assert "the server did not end the stream in time; closing it" not in [
        e.get("event") for e in daemon.events()
    ]
    restarted = make_daemon().start().wait_ready()
    assert_converged(database_url, redis_url)
    restarted.stop()
