"""The daemon as plain Python: the same source without the mypyc-compiled extensions.

``setup.py`` compiles the hot path when mypyc is available; where it is not (or with
``CDC_PURE_PYTHON=1``) the ``.py`` files run as they are. Everything else in the suite
runs whatever was installed, so this test copies ``cdc/`` and ``schema/`` without any
``.so`` and drives a daemon started from that copy through snapshot, every kind of change
and convergence."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import psycopg

from tests.helpers import ROOT, Daemon, assert_converged, running
from writer import Writer


def pure_copy(into: Path) -> Path:
    for package in ("cdc", "schema"):
        shutil.copytree(
            ROOT / package, into / package, ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
    assert not list(into.rglob("*.so"))
    return into


def mapped_extensions(pid: int) -> set[str]:
    """Shared objects of this project mapped into a process (compiled modules)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {
        line.split()[-1]
        for line in maps.splitlines()
        if line.endswith(".so") and ("__mypyc" in line or "/cdc/" in line)
    }


def test_pure_python_daemon_converges(
    writer: Writer,
    make_daemon: Callable[..., Daemon],
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    writer.create_agent(
        {"id": "a1", "username": "alice", "display_name": "Alice", "password": "12345678"}
    )
    for i in range(10):
        writer.create_ticket({"id": f"t{i}", "title": f"ticket {i}", "assignee_id": "a1"})
    daemon = make_daemon()
    daemon.cwd = pure_copy(tmp_path / "pure")
    with running(daemon):
        assert mapped_extensions(daemon.pid) == set()
        writer.update_ticket("t1", {"title": "renamed", "category": "billing"})
        writer.change_ticket_status("t2", {"to_status": "resolved"})
        writer.update_agent("a1", {"username": "alice2"})
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM tickets WHERE id = 't3'")
            conn.execute("UPDATE tickets SET id = 't4-moved' WHERE id = 't4'")
            conn.execute(
                "INSERT INTO tickets (id, title) SELECT 'bulk' || g, 'b' FROM generate_series(1, 500) g"
            )
        counts = assert_converged(database_url, redis_url)
        assert counts == {"agents": 1, "tickets": 10 - 1 + 500 + 1}  # + the fence row
        assert mapped_extensions(daemon.pid) == set()
