"""The declared cache (CDC_CONFIG): the packaged default reproduces contract sections 6
and 6b; bad files, and files the database contradicts, exit 2 with one line (``cdc config
check`` and ``cdc run``); a table added by configuration alone is cached with its view."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from schema.config import CacheConfigError, load_tables
from schema.keys import TRACKED_TABLES, LookupKey, View
from tests.helpers import ROOT, Daemon, running, wait_for

Conn = psycopg.Connection[tuple[Any, ...]]

DEFAULT = Path(ROOT / "schema" / "cache.toml").read_text()


def test_the_default_is_the_contract_layout() -> None:
    agents, tickets = TRACKED_TABLES
    assert (agents.name, agents.key("a1"), agents.excluded_columns) == (
        "agents",
        "agent:{a1}",
        frozenset({"password_hash"}),
    )
    assert agents.lookups == (LookupKey("agent:username", "username"),)
    assert agents.views == (View("agents:status", "status"),)
    assert tickets.key("7") == "ticket:{7}"
    assert tickets.views == (
        View("tickets:status", "status", "updated_at"),
        View("tickets:assignee", "assignee_id"),
    )
    assert tickets.views[0].key("open") == "tickets:status:{open}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[tables]]\nname = 'tickets'\nkey = 'ticket'\n", 'key "ticket" is not of the form'),
        ("[[tables]]\nname = 'tickets'\nkey = 'ticket:{id}'\ncolour = 1\n", "colour: Extra"),
        ("[[tables]\n", "is not valid TOML"),
        ("tables = []\n", "tables: List should have at least 1 item"),
        (
            "[[tables]]\nname = 'tickets'\nkey = 'ticket:{id}'\nexclude = ['id']\n",
            "the primary key id cannot be excluded",
        ),
        (
            "[[tables]]\nname = 'tickets'\nkey = 'ticket:{id}'\n"
            "views = [{ key = 'ticket:{status}' }]\n",
            "use overlapping keys",
        ),
        (
            "[[tables]]\nname = 'tickets'\nkey = 'ticket:{id}'\n"
            "views = [{ key = 'cdc:x:{status}' }]\n",
            "the prefixes cdc: and changes: are the daemon's",
        ),
        (
            "[[tables]]\nname = 'tickets'\nkey = 'ticket:{id}'\n"
            "[[tables]]\nname = 'tickets'\nkey = 'ticketz:{id}'\n",
            "table tickets is declared twice",
        ),
    ],
)
def test_bad_files_are_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cache.toml"
    path.write_text(text)
    with pytest.raises(CacheConfigError) as caught:
        load_tables(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.fixture
def cdc(
    database_url: str, redis_url: str, slot_name: str
) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        base.update(
            {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "CDC_SLOT": slot_name, **env}
        )
        return subprocess.run(
            [sys.executable, "-m", "cdc", *args],
            cwd=ROOT,
            env=base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


def test_config_check_against_the_database(
    cdc: Callable[..., subprocess.CompletedProcess[str]], pg: Conn, tmp_path: Path
) -> None:
    done = cdc("config", "check")
    assert done.returncode == 0, done.stderr
    assert "the packaged default: valid (2 tables: agents, tickets; 3 views)" in done.stdout

    def check(text: str, *args: str, **env: str) -> str:
        path = tmp_path / f"c{len(os.listdir(tmp_path))}.toml"
        path.write_text(text)
        done = cdc(*(args or ("config", "check")), CDC_CONFIG=str(path), **env)
        assert done.returncode == 2, (done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert check(DEFAULT.replace("assignee_id", "assigned_to")) == (
        'cdc: CDC_CONFIG: table "public.tickets" has no column "assigned_to"'
    )
    # A declared table the publication does not hold: another daemon's (a daemon on this
    # publication mirrors the others); one the database does not have is refused.
    path = tmp_path / "partial.toml"
    path.write_text(DEFAULT + "\n[[tables]]\nname = 'ticket_comments'\nkey = 'comment:{id}'\n")
    done = cdc("config", "check", CDC_CONFIG=str(path))
    assert done.returncode == 0, done.stderr
    assert 'publication "cdc_cache" holds agents, tickets' in done.stdout
    assert "(ticket_comments: another publication's daemon)" in done.stdout
    missing = DEFAULT + "\n[[tables]]\nname = 'ticket_coments'\nkey = 'comment:{id}'\n"
    for args in (("config", "check"), ("run",)):
        assert check(missing, *args) == (
            'cdc: CDC_CONFIG: table "public.ticket_coments" does not exist'
        )
    assert check(DEFAULT.replace("ticket:{id}", "ticket:{ticket_number}")) == (
        'cdc: CDC_CONFIG: the key of table "public.tickets" must be its primary key (id),'
        " not ticket_number"
    )
    assert check("[[tables]]\nname = 'tickets'\nkey = 'ticket'\n").startswith("cdc: CDC_CONFIG: ")
    # A publication with a column list that leaves out a view's column.
    pg.execute(
        "CREATE PUBLICATION narrow FOR TABLE agents, tickets (id, title, status, updated_at)"
    )
    assert check(DEFAULT, CDC_PUBLICATION="narrow") == (
        'cdc: CDC_CONFIG: column "assignee_id" of table "public.tickets" is not in'
        ' publication "narrow"'
    )
    # The daemon refuses the same at start.
    assert check(DEFAULT.replace("assignee_id", "assigned_to"), "run") == (
        'cdc: CDC_CONFIG: table "public.tickets" has no column "assigned_to"'
    )


def test_a_table_added_by_configuration_is_cached_with_its_view(
    make_daemon: Callable[..., Daemon], pg: Conn, redis_url: str, tmp_path: Path
) -> None:
    pg.execute("ALTER PUBLICATION cdc_cache ADD TABLE ticket_comments")
    pg.execute("INSERT INTO tickets (id, title) VALUES ('t1', 'x')")
    pg.execute("INSERT INTO ticket_comments (id, ticket_id, content) VALUES ('c1', 't1', 'hi')")
    path = tmp_path / "cache.toml"
    path.write_text(
        DEFAULT
        + "\n[[tables]]\nname = 'ticket_comments'\nkey = 'comment:{id}'\n"
        + "views = [{ key = 'tickets:comments:{ticket_id}', score = 'created_at' }]\n"
    )
    client = redis.Redis.from_url(redis_url)
    with running(make_daemon(CDC_CONFIG=str(path))):
        assert client.hget("comment:{c1}", "content") == b"hi"  # the snapshot
        assert client.zrange("tickets:comments:{t1}", 0, -1) == [b"c1"]
        pg.execute("INSERT INTO ticket_comments (id, ticket_id, content) VALUES ('c2', 't1', 'ho')")
        pg.execute("DELETE FROM ticket_comments WHERE id = 'c1'")
        wait_for(lambda: client.zrange("tickets:comments:{t1}", 0, -1) == [b"c2"], 30, "the view")
        assert client.hget("comment:{c2}", "content") == b"ho"


def test_view_key_helpers_follow_the_declaration() -> None:
    from schema.keys import agent_status_key, ticket_assignee_key, ticket_status_key

    assert ticket_status_key("open") == "tickets:status:{open}"
    assert ticket_assignee_key("a1") == "tickets:assignee:{a1}"
    assert agent_status_key("online") == "agents:status:{online}"
