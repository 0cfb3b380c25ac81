"""Reliability case 9: a 1,000,000-row transaction, with the server spilling it to disk."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psutil
import psycopg
import pytest
import redis

from tests.helpers import Daemon, assert_converged, fence, wait_for

Conn = psycopg.Connection[tuple[Any, ...]]
ROWS = 1_000_000
# A bound, not a benchmark: the daemon must not hold the transaction in memory
# (1M rows of this table are ~250 MB as Python objects). bench/ measures the real peak.
RSS_BOUND = 250 * 1024 * 1024


@pytest.mark.slow
def test_million_row_transaction(
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_name: str,
    database_url: str,
    redis_url: str,
) -> None:
    # Spill to disk early: the walsender decodes with 64 kB of memory.
    pg.execute(f"ALTER DATABASE \"{database_name}\" SET logical_decoding_work_mem = '64kB'")
    daemon = make_daemon().start().wait_ready()
    process = psutil.Process(daemon.pid)
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        writer = psycopg.connect(database_url)
        writer.execute(
            "INSERT INTO tickets (id, title, status) SELECT 'm' || g, 'row ' || g, 'open'"
            " FROM generate_series(1, %s) g",
            (ROWS,),
        )
        # I3: nothing of an uncommitted transaction is visible.
        pg.execute("INSERT INTO tickets (id, title) VALUES ('beside', 'committed first')")
        fence(database_url, redis_url)
        client = redis.Redis.from_url(redis_url)
        assert client.exists("ticket:{m1}", f"ticket:{{m{ROWS}}}") == 0
        writer.commit()
        writer.close()
        wait_for(
            lambda: client.exists(f"ticket:{{m{ROWS}}}"), 900, "the last row of the transaction"
        )
        counts = assert_converged(database_url, redis_url)
    finally:
        stop.set()
        sampler.join(5)
    assert counts["tickets"] == ROWS + 2
    assert peak[0] < RSS_BOUND, f"daemon peak RSS {peak[0] / 2**20:.0f} MB"
    assert daemon.stop() == 0
