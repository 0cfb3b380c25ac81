"""``cdc verify --repair`` while a daemon streams: the rows go to the daemon, which
re-reads them through its backfill, instead of being written by the verifier.

The verifier cannot tell a key that is absent because Redis lost it from one that is
absent because a DELETE committed just after the verifier read the row: writing the row
back would resurrect it. These tests hold the verifier at the point where it has read
a row and would write its key (fail point ``repair_write``) and delete the row there.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

from cdc.protocol.messages import LogicalMessage
from cdc.transform.assemble import (
    REPAIR_PREFIX,
    Assembler,
    RepairRequest,
    repair_content,
    repair_request,
)
from schema.keys import TRACKED_TABLES
from tests.helpers import Daemon, assert_converged, fence

Conn = psycopg.Connection[tuple[Any, ...]]


def test_a_repair_message_becomes_a_request_and_others_are_dropped() -> None:
    assembler = Assembler(TRACKED_TABLES)
    content = repair_content("tickets", ["a", "b{c}"]).encode()
    event = assembler.feed(LogicalMessage(False, 0, REPAIR_PREFIX, content))
    assert isinstance(event, RepairRequest)
    assert (event.table, event.ids) == ("tickets", ("a", "b{c}"))
    # Anyone may emit logical messages: another prefix, or ours malformed, is dropped.
    assert assembler.feed(LogicalMessage(False, 0, "app:audit", content)) is None
    for bad in (b"", b"not json", b"[1, 2]", b'{"table": 1, "ids": []}', b'{"table": "t"}'):
        assert repair_request(bad) is None


def _verify(daemon: Daemon, hold: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in daemon.environment().items() if k != "CDC_FAILPOINTS"}
    env["CDC_FAILPOINTS"] = f"repair_write=pause:{hold}"
    return subprocess.Popen(
        [sys.executable, "-m", "cdc", "verify", "--repair"],
        cwd=daemon.cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_row_deleted_while_verify_repairs_it_stays_deleted(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    ids = [f"gone-{i}" for i in range(5)]
    for row_id in ids:
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'soon deleted')", (row_id,))
    pg.execute("INSERT INTO tickets (id, title) VALUES ('kept', 'kept')")
    fence(database_url, redis_url)
    # Drift: Redis lost these keys; the rows exist, so verify finds them missing.
    client.delete(*[f"ticket:{{{row_id}}}" for row_id in ids], "ticket:{kept}")
    hold = tmp_path / "hold"
    hold.touch()
    verify = _verify(daemon, hold)
    deleted = False
    deadline = time.monotonic() + 120
    while verify.poll() is None and time.monotonic() < deadline:
        if Path(f"{hold}.hit").exists() and not deleted:
            # The verifier has read a row and holds before writing its key: the rows
            # are deleted now, and the daemon applies the DELETEs (the keys stay absent).
            pg.execute("DELETE FROM tickets WHERE id LIKE 'gone-%'")
            fence(database_url, redis_url)
            deleted = True
            hold.unlink()
        time.sleep(0.01)
    if not deleted:
        # The verifier never wrote a row key itself (a daemon streams): delete the rows
        # while the daemon may still be re-reading them.
        pg.execute("DELETE FROM tickets WHERE id LIKE 'gone-%'")
        hold.unlink()
    out, err = verify.communicate(timeout=120)
    assert verify.returncode in (0, 1), out + err
    fence(database_url, redis_url)
    pipe = client.pipeline(transaction=True)
    for row_id in ids:
        pipe.exists(f"ticket:{{{row_id}}}")
    assert pipe.execute() == [0] * len(ids), "a deleted row came back"
    assert client.hget("ticket:{kept}", "title") == b"kept"
    assert "repaired 6" in out, out
    assert_converged(database_url, redis_url)


def test_verify_rewrites_keys_itself_when_no_daemon_runs(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    pg.execute("INSERT INTO tickets (id, title) VALUES ('alone', 'x')")
    fence(database_url, redis_url)
    assert daemon.stop() == 0
    client = redis.Redis.from_url(redis_url)
    client.hset("ticket:{alone}", "title", "tampered")
    hold = tmp_path / "hold"  # absent: the fail point does not hold
    verify = _verify(daemon, hold)
    out, err = verify.communicate(timeout=120)
    assert verify.returncode == 1, out + err
    assert "repaired 1" in out
    assert client.hget("ticket:{alone}", "title") == b"x"
