"""Fixtures shared by the whole suite (servers come from ``tests.plugins.servers``)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers import Daemon, running
from writer import Writer


@pytest.fixture
def writer(database_url: str) -> Iterator[Writer]:
    with Writer.connect(database_url, max_size=4) as w:
        yield w


@pytest.fixture
def pg(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain autocommit connection to this test's database, for assertions."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_daemon(
    database_url: str, redis_url: str, slot_name: str, tmp_path: Path
) -> Iterator[Callable[..., Daemon]]:
    """Build daemons for this test's database, Redis db and slot; all are stopped after.

    Their logs are printed at teardown (pytest shows them only when the test fails)."""
    made: list[Daemon] = []

    def factory(**env: str) -> Daemon:
        daemon = Daemon(
            database_url,
            env.pop("REDIS_URL", redis_url),
            env.pop("CDC_SLOT", slot_name),
            tmp_path / f"daemon-{len(made)}.log",
            env=env,
        )
        made.append(daemon)
        return daemon

    yield factory
    for daemon in made:
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                daemon.stop(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        print(f"--- {daemon.log_path.name} (last 80 lines) ---")
        print("\n".join(daemon.log().splitlines()[-80:]))


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Iterator[Daemon]:
    """One running daemon (first start: it creates the slot and loads the snapshot)."""
    with running(make_daemon()) as d:
        yield d
