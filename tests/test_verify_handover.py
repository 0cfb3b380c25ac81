"""``cdc verify --repair`` while a daemon streams: the rows go to the daemon, which
re-reads them through its backfill, instead of being written by the verifier.

The verifier cannot tell a key that is absent because Redis lost it from one that is
absent because a DELETE committed just after the verifier read the row: writing the row
back would resurrect it. These tests hold the verifier at the point where it has read
a row and would write its key (fail point ``repair_write``) and delete the row there.
"""

from __future__ import annotations

import re
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
    assert repair_request(b"[" * 100_000) is None  # nesting beyond the parser's depth
    assert repair_request(repair_content("t", ["x" * 100] * 20_000).encode()) is None  # > 1 MB
    # Ids PostgreSQL cannot hold as text are left out, the others kept.
    kept = repair_request(b'{"table": "t", "ids": ["a\\u0000b", "\\ud800", 7, "ok"]}')
    assert kept is not None
    assert kept.ids == ("ok",)


def test_hostile_repair_messages_never_stop_the_daemon(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """Any role may write logical messages: ours malformed, with ids PostgreSQL refuses,
    huge, or naming tables nobody mirrors, are dropped and streaming goes on."""
    for content in (
        '{"table": "public.tickets", "ids": ["a\\u0000b", "ok-id"]}',
        '{"table": "public.tickets", "ids": ["\\ud800"]}',
        "[" * 100_000,
        repair_content("public.tickets", ["y" * 1000] * 2000),
        repair_content("elsewhere.tickets", ["x"]),
        "{not json",
    ):
        pg.execute("SELECT pg_logical_emit_message(false, %s, %s)", (REPAIR_PREFIX, content))
    fence(database_url, redis_url)
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, daemon.log()
    assert_converged(database_url, redis_url)


def _verify(daemon: Daemon, hold: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in daemon.environment().items() if k != "CDC_FAILPOINTS"}
    env["CDC_FAILPOINTS"] = f"repair_write=pause:{hold};repair_hand_over=pause:{hold}"
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
    # The six rows, and the deleted rows' members of tickets:status:{open} (their keys
    # were gone when the daemon applied the DELETEs, so it could not see their views).
    found = re.search(r"repaired (\d+)", out)
    assert found is not None, out
    assert int(found.group(1)) >= 6, out
    assert_converged(database_url, redis_url)


def test_a_username_renamed_while_verify_repairs_its_lookup_is_not_written_back(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The lookup ``agent:username:{alice}`` is missing; verify reads that alice is agent
    la, and la is renamed bob before the repair lands: {alice} must stay absent (a login
    as alice must not find la)."""
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash)"
        " VALUES ('la', 'alice', 'A', 'h')"
    )
    fence(database_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    client.delete("agent:username:{alice}")
    hold = tmp_path / "hold"
    hold.touch()
    verify = _verify(daemon, hold)
    deadline = time.monotonic() + 120
    renamed = False
    while verify.poll() is None and time.monotonic() < deadline:
        if Path(f"{hold}.hit").exists() and not renamed:
            pg.execute("UPDATE agents SET username = 'bob' WHERE id = 'la'")
            fence(database_url, redis_url)
            renamed = True
            hold.unlink()
        time.sleep(0.01)
    out, err = verify.communicate(timeout=120)
    assert renamed, out + err
    assert verify.returncode in (0, 1), out + err
    fence(database_url, redis_url)
    pipe = client.pipeline(transaction=True)
    pipe.get("agent:username:{alice}")
    pipe.get("agent:username:{bob}")
    assert pipe.execute() == [None, b"la"]
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
