"""cdc/failover.py's pure decisions, and CDC_ON_SLOT_LOSS end to end on one server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis

from cdc.cache.checkpoint import CacheState
from cdc.errors import ConfigError
from cdc.runtime.failover import parse_history, slot_loss_reason, timeline_reason
from schema.lsn import parse_lsn
from tests.helpers import ROOT, Daemon, assert_converged, fence, redis_state, running, wait_for

Conn = psycopg.Connection[tuple[Any, ...]]

HISTORY_3 = (
    "1\t0/30002A0\tno recovery target specified\n\n2\t0/5000100\tno recovery target specified\n"
)


def state(**fields: str) -> CacheState:
    return CacheState.from_hash({k.encode(): v.encode() for k, v in fields.items()})


def test_parse_history() -> None:
    switches = parse_history(HISTORY_3)
    assert [(s.timeline, s.lsn) for s in switches] == [
        (1, parse_lsn("0/30002A0")),
        (2, parse_lsn("0/5000100")),
    ]
    assert parse_history("") == []


def test_timeline_reason() -> None:
    sid = "7714574231886570653"
    # Same timeline, or nothing recorded: resume.
    assert timeline_reason(state(lsn="0/9000000", timeline="3"), sid, 3, HISTORY_3) is None
    assert timeline_reason(state(lsn="0/9000000"), sid, 3, HISTORY_3) is None
    # At or before the switch point: everything Redis has is on the new timeline.
    at_switch = state(lsn="0/5000100", timeline="2", system_id=sid)
    assert timeline_reason(at_switch, sid, 3, HISTORY_3) is None
    before = state(lsn="0/2000000", timeline="1", system_id=sid)
    assert timeline_reason(before, sid, 3, HISTORY_3) is None
    # Past it: Redis has changes the new primary never had.
    past = state(lsn="0/5000101", timeline="2", system_id=sid)
    reason = timeline_reason(past, sid, 3, HISTORY_3)
    assert reason is not None
    assert "promotion" in reason
    assert "0/5000100" in reason
    # A chunked transaction past the switch point counts too, even with the checkpoint before.
    partial = state(lsn="0/5000000", partial="0/5000200:10", timeline="2", system_id=sid)
    assert timeline_reason(partial, sid, 3, HISTORY_3) is not None
    # A timeline that is not an ancestor (another branch).
    branch = timeline_reason(state(lsn="0/1", timeline="4", system_id=sid), sid, 3, HISTORY_3)
    assert branch is not None
    assert "not an ancestor" in branch


def test_slot_loss_policy() -> None:
    promoted = state(lsn="0/5000000", timeline="1")
    dropped = state(lsn="0/5000000", timeline="2")
    unknown = state(lsn="0/5000000")
    assert "after a promotion" in slot_loss_reason("auto", promoted, "s", 2)
    for cache in (dropped, unknown):
        with pytest.raises(ConfigError, match="cdc slot reset"):
            slot_loss_reason("auto", cache, "s", 2)
    for cache in (promoted, dropped, unknown):
        assert "CDC_ON_SLOT_LOSS=rebuild" in slot_loss_reason("rebuild", cache, "s", 2)
        with pytest.raises(ConfigError, match="CDC_ON_SLOT_LOSS=exit"):
            slot_loss_reason("exit", cache, "s", 2)


# -- end to end: a slot dropped by hand on the same timeline ---------------------------------------


def test_the_session_server_is_the_major_asked_for(pg: Conn) -> None:
    """``CDC_TEST_PG_MAJOR`` really selects the server the suite runs against."""
    row = pg.execute("SELECT current_setting('server_version_num')::int").fetchone()
    assert row is not None
    if major := os.environ.get("CDC_TEST_PG_MAJOR"):
        assert row[0] // 10000 == int(major)
    assert row[0] >= 150000


def test_state_records_the_server_and_its_timeline(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    fence(database_url, redis_url)
    system_id = pg.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    tli = pg.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert system_id is not None
    assert tli is not None
    recorded = redis_state(redis_url)
    assert recorded["system_id"] == system_id[0]
    assert recorded["timeline"] == str(int(tli[0][:8], 16))
    assert recorded["epoch"] == "1"


def test_no_failover_warning_without_a_standby(daemon: Daemon) -> None:
    """A server with no standby (no physical slot or walsender): nothing to warn about,
    though the daemon's own walsender is connected."""
    warnings = [e["event"] for e in daemon.events() if e.get("level") == "warning"]
    assert not [w for w in warnings if "failover" in w or "standby" in w], warnings


def test_slot_loss_rebuild_policy_rebuilds_online(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str, slot_name: str
) -> None:
    with running(make_daemon()):
        pg.execute("INSERT INTO tickets (id, title) VALUES ('d1', 'x'), ('d2', 'y')")
        fence(database_url, redis_url)
    pg.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
    pg.execute("DELETE FROM tickets WHERE id = 'd1'")  # missed by the cache: no slot
    pg.execute("UPDATE tickets SET title = 'changed' WHERE id = 'd2'")
    # The default (auto) on the same timeline still asks for cdc slot reset ...
    refused = make_daemon().start()
    assert refused.wait_exit(60) == 2
    assert 'run "cdc slot reset"' in refused.log().splitlines()[-1]
    # ... and so does exit; rebuild recreates the slot and rebuilds online.
    refused = make_daemon(CDC_ON_SLOT_LOSS="exit").start()
    assert refused.wait_exit(60) == 2
    assert "CDC_ON_SLOT_LOSS=exit" in refused.log().splitlines()[-1]
    with running(make_daemon(CDC_ON_SLOT_LOSS="rebuild")) as daemon:

        def rebuilt() -> bool:
            fence(database_url, redis_url)
            return not redis_state(redis_url).get("rebuild")

        wait_for(rebuilt, 60, "the rebuild")
        assert_converged(database_url, redis_url)
        client = redis.Redis.from_url(redis_url)
        assert client.exists("ticket:{d1}") == 0
        assert client.hget("ticket:{d2}", "title") == b"changed"
        client.close()
        assert daemon.metric("cdc_rebuilds_total", 'reason="slot_lost"') == 1
        assert redis_state(redis_url)["epoch"] == "2"


def test_bad_slot_loss_policy_is_a_config_error(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(CDC_ON_SLOT_LOSS="sometimes").start()
    try:
        assert daemon.wait_exit(60) == 2
    except subprocess.TimeoutExpired:
        daemon.kill()
        raise
    assert "CDC_ON_SLOT_LOSS" in daemon.log().splitlines()[-1]


def test_slot_reset_starts_a_new_epoch_on_the_current_timeline(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str, slot_name: str
) -> None:
    with running(make_daemon()):
        fence(database_url, redis_url)
    assert redis_state(redis_url)["epoch"] == "1"
    pg.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env |= {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "CDC_SLOT": slot_name}
    done = subprocess.run(
        [sys.executable, "-m", "cdc", "slot", "reset", "--yes"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    state = redis_state(redis_url)
    assert state["epoch"] == "2"
    assert state["timeline"]
    assert state["system_id"]
    with running(make_daemon()):
        assert_converged(database_url, redis_url)
