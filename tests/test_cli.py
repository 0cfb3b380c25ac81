"""The operator commands: ``cdc slot status``, ``cdc slot reset``, ``cdc verify``; and
the wal2json path end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devstack.servers import postgres_bin_dir
from tests.helpers import ROOT, Daemon, assert_converged, fence, redis_state, running

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def cdc(
    database_url: str, redis_url: str, slot_name: str
) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        base.update(
            {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "CDC_SLOT": slot_name, **env}
        )
        return subprocess.run(
            [sys.executable, "-m", "cdc", *args],
            cwd=ROOT,
            env=base,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    return run


def test_help_shows_no_secrets(cdc: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    for args in (["--help"], ["run", "--help"], ["slot", "reset", "--help"], ["verify", "--help"]):
        done = cdc(*args)
        assert done.returncode == 0
        assert "postgres-local" not in done.stdout
        assert "postgresql://" not in done.stdout


def test_configuration_is_read_from_a_dot_env_file(
    daemon: Daemon, database_url: str, redis_url: str, slot_name: str, tmp_path: Path
) -> None:
    """Contract 4: the environment may come from ``.env`` in the working directory."""
    (tmp_path / ".env").write_text(
        f"DATABASE_URL={database_url}\nREDIS_URL={redis_url}\nCDC_SLOT={slot_name}\n"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CDC_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    done = subprocess.run(
        [sys.executable, "-m", "cdc", "slot", "status", "--json"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["slot"] == slot_name
    assert "postgres-local" not in done.stdout + done.stderr


def test_slot_status(
    cdc: Callable[..., subprocess.CompletedProcess[str]], daemon: Daemon, slot_name: str
) -> None:
    done = cdc("slot", "status")
    assert done.returncode == 0, done.stderr
    assert slot_name in done.stdout
    assert "yes (pid " in done.stdout
    report = json.loads(cdc("slot", "status", "--json").stdout)
    assert report["slot"] == slot_name
    assert report["plugin"] == "pgoutput"
    assert report["active"] is True
    assert isinstance(report["active_pid"], int)
    assert report["confirmed_flush_lsn"].count("/") == 1
    assert report["lag_bytes"] >= 0
    assert report["retained_wal_bytes"] >= 0
    assert report["wal_status"] in ("reserved", "extended")


def test_slot_status_of_a_missing_slot(
    cdc: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    done = cdc("slot", "status", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["exists"] is False


def test_reset_refuses_while_the_slot_is_held(
    cdc: Callable[..., subprocess.CompletedProcess[str]], daemon: Daemon, slot_name: str
) -> None:
    done = cdc("slot", "reset", "--yes")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f'cdc: slot "{slot_name}" is in use by pid {_active_pid(cdc)}: stop the daemon first, or use --force'
    )


def _active_pid(cdc: Callable[..., subprocess.CompletedProcess[str]]) -> int:
    return int(json.loads(cdc("slot", "status", "--json").stdout)["active_pid"])


def test_reset_dry_run_and_confirmation(
    cdc: Callable[..., subprocess.CompletedProcess[str]],
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_url: str,
    redis_url: str,
) -> None:
    with running(make_daemon()):
        pg.execute("INSERT INTO tickets (id, title) VALUES ('r1', 'x')")
        fence(database_url, redis_url)
    before = redis_state(redis_url)
    dry = cdc("slot", "reset", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would drop slot" in dry.stdout
    assert "would reload the cache" in dry.stdout
    unconfirmed = cdc("slot", "reset", stdin="")
    assert unconfirmed.returncode == 1
    assert "pass --yes" in unconfirmed.stderr
    declined = cdc("slot", "reset", stdin="n\n")
    assert declined.returncode == 1
    assert declined.stderr.strip().endswith("cdc: aborted"), declined.stderr
    assert redis_state(redis_url) == before  # nothing happened
    pg.execute("DELETE FROM tickets WHERE id = 'r1'")
    pg.execute("INSERT INTO tickets (id, title) VALUES ('r2', 'y')")
    redis.Redis.from_url(redis_url).hset("ticket:{junk}", "title", "stale")
    done = cdc("slot", "reset", stdin="y\n")  # answered on a pipe
    assert done.returncode == 0, done.stderr
    assert "removed 2 stale keys" in done.stdout  # r1 and junk
    assert redis_state(redis_url)["fence"] != before["fence"]
    with running(make_daemon()):
        assert_converged(database_url, redis_url)


def test_reset_force_terminates_the_holder(
    cdc: Callable[..., subprocess.CompletedProcess[str]],
    daemon: Daemon,
    database_url: str,
    redis_url: str,
) -> None:
    done = cdc("slot", "reset", "--yes", "--force")
    assert done.returncode == 0, done.stderr
    # The daemon lost its walsender and the fence; it reconnects to the new slot and resumes.
    daemon.wait_ready()
    assert_converged(database_url, redis_url)


def test_verify_and_repair(
    cdc: Callable[..., subprocess.CompletedProcess[str]],
    daemon: Daemon,
    pg: Conn,
    database_url: str,
    redis_url: str,
) -> None:
    for i in range(20):
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'x')", (f"v{i}",))
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('va', 'vann', 'V', 'h')"
    )
    fence(database_url, redis_url)
    clean = cdc("verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 missing, 0 extra, 0 different" in clean.stdout
    client = redis.Redis.from_url(redis_url)
    client.delete("ticket:{v1}")
    client.hset("ticket:{v2}", "title", "tampered")
    client.hset("ticket:{ghost}", mapping={"id": "ghost", "title": "no row"})
    client.set("agent:username:{vann}", "someone-else")
    report = json.loads(cdc("verify", "--json").stdout)
    assert report["equal"] is False
    assert report["missing"] == ["ticket:{v1}"]
    assert report["extra"] == ["ticket:{ghost}"]
    different = {d["key"]: d.get("fields") for d in report["different"]}
    assert different == {"ticket:{v2}": ["title"], "agent:username:{vann}": None}
    text = cdc("verify")
    assert text.returncode == 1
    assert "missing   ticket:{v1}" in text.stdout
    repaired = cdc("verify", "--repair")
    assert repaired.returncode == 1  # differences were found (and rewritten)
    assert "repaired 4" in repaired.stdout
    assert cdc("verify").returncode == 0
    assert_converged(database_url, redis_url)


def _wal2json_installed() -> bool:
    return (postgres_bin_dir().parent / "lib" / "wal2json.so").exists()


@pytest.mark.wal2json
@pytest.mark.skipif(not _wal2json_installed(), reason="wal2json is not installed")
def test_wal2json_end_to_end(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    pg.execute(
        "INSERT INTO agents (id, username, display_name, password_hash) VALUES ('w1', 'wally', 'W', 'h')"
    )
    with running(make_daemon(CDC_PLUGIN="wal2json")) as daemon:
        big = pg.execute(
            "SELECT string_agg(md5(g::text), '') FROM generate_series(1, 200) g"
        ).fetchone()[0]  # type: ignore[index]
        pg.execute(
            "INSERT INTO tickets (id, title, description, customer) VALUES ('w', 'x', %s, '{\"n\": 1.50}')",
            (big,),
        )
        pg.execute(
            "UPDATE tickets SET title = 'y' WHERE id = 'w'"
        )  # description unchanged: omitted by wal2json
        pg.execute("UPDATE agents SET username = 'walter', is_active = false WHERE id = 'w1'")
        pg.execute("UPDATE tickets SET id = 'w-moved' WHERE id = 'w'")
        pg.execute("INSERT INTO tickets (id, title) VALUES ('gone', 'x')")
        pg.execute("DELETE FROM tickets WHERE id = 'gone'")
        assert_converged(database_url, redis_url)
        pg.execute("TRUNCATE tickets CASCADE")
        pg.execute("ALTER TABLE tickets ADD COLUMN region text DEFAULT 'eu'")
        pg.execute("INSERT INTO tickets (id, title) VALUES ('after', 'z')")
        assert_converged(database_url, redis_url)
        assert redis.Redis.from_url(redis_url).hget("agent:{w1}", "is_active") == b"false"
        assert "wal2json" in daemon.http("/metrics")[1]
