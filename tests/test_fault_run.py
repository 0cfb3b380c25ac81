"""Reliability case 21: a seeded random mix of faults for minutes under concurrent writers.

Writers run multi-row transactions on pairs of rows (both rows of a pair always get the
same title), deletes and re-inserts, rollbacks (which write a title nobody may ever see)
and agent username renames. A scheduler injects, at random: ``kill -9`` of the daemon,
``SIGSTOP``/``SIGCONT`` of the daemon and of Redis, PostgreSQL ``-m immediate`` restarts,
Redis restarts with its data gone, and a takeover by a hot-standby daemon. A checker
samples Redis atomically throughout: no torn pair, nothing uncommitted, no ``_v`` going
backwards. At the end: the full comparison, and the slot's confirmed LSN is not past the
checkpoint Redis holds.

``CDC_FAULT_SEED`` and ``CDC_FAULT_SECONDS`` (default 120) choose the run; the seed and the
counts are printed (``pytest -s`` shows them; a failure always does).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis

from schema.lsn import parse_lsn
from tests.helpers import Daemon, assert_converged, redis_state, slot_confirmed
from tests.test_daemon_faults import Stack, own_stack, stack_daemon  # noqa: F401 - fixtures

PAIRS = 12
AGENTS = 4
UNCOMMITTED = "never-committed"

pytestmark = pytest.mark.slow


class Writers:
    """Concurrent writers; each thread its own connection, reconnecting after faults."""

    def __init__(self, database_url: str, seed: int, threads: int = 3) -> None:
        self.database_url = database_url
        self.seed = seed
        self.commits = Counter[str]()
        self.failures = 0
        self._halt = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        self._lock = threading.Lock()

    def start(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 31 + index)
        conn: psycopg.Connection[Any] | None = None
        while not self._halt.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.database_url, connect_timeout=3)
                kind = rng.choices(["pair", "reinsert", "rollback", "rename"], [6, 2, 1, 1])[0]
                self._one(conn, rng, kind)
                with self._lock:
                    self.commits[kind] += 1
            except psycopg.Error:
                with self._lock:
                    self.failures += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                self._halt.wait(0.2)
        if conn is not None:
            conn.close()

    def _one(self, conn: psycopg.Connection[Any], rng: random.Random, kind: str) -> None:
        p = rng.randrange(PAIRS)
        a, b = f"p{p}a", f"p{p}b"
        if kind == "pair":
            value = str(rng.randrange(1_000_000))
            conn.execute(
                "INSERT INTO tickets (id, title) VALUES (%s, %s), (%s, %s)"
                " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title, updated_at = now()",
                (a, value, b, value),
            )
            conn.commit()
        elif kind == "reinsert":
            conn.execute("DELETE FROM tickets WHERE id IN (%s, %s)", (a, b))
            value = str(rng.randrange(1_000_000))
            conn.execute(
                "INSERT INTO tickets (id, title) VALUES (%s, %s), (%s, %s)", (a, value, b, value)
            )
            conn.commit()
        elif kind == "rollback":
            conn.execute("UPDATE tickets SET title = %s WHERE id IN (%s, %s)", (UNCOMMITTED, a, b))
            conn.rollback()
        else:
            agent = f"ag{rng.randrange(AGENTS)}"
            conn.execute(
                "UPDATE agents SET username = %s WHERE id = %s",
                (f"{agent}-{rng.randrange(1_000_000)}", agent),
            )
            conn.commit()


class Checker(threading.Thread):
    """Samples every pair in one MULTI: torn pairs, uncommitted titles, ``_v`` regressions."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(daemon=True)
        self.redis_url = redis_url
        self.samples = 0
        self.torn: list[tuple[str, Any, Any]] = []
        self.uncommitted: list[str] = []
        self.regressions: list[tuple[str, int, int]] = []
        self._last: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        while not self._halt.is_set():
            try:
                pipe = client.pipeline(transaction=True)
                for p in range(PAIRS):
                    for side in "ab":
                        pipe.hmget(f"ticket:{{p{p}{side}}}", "title", "_v")
                replies = pipe.execute()
            except redis.RedisError:
                time.sleep(0.05)  # Redis is stopped or restarting: a fault, not a finding
                continue
            self.samples += 1
            for p in range(PAIRS):
                (ta, va), (tb, vb) = replies[2 * p], replies[2 * p + 1]
                if UNCOMMITTED.encode() in (ta, tb):
                    self.uncommitted.append(f"p{p}")
                if ta != tb:
                    self.torn.append((f"p{p}", ta, tb))
                for side, version in (("a", va), ("b", vb)):
                    key = f"p{p}{side}"
                    if version is None:
                        self._last.pop(key, None)  # deleted, or Redis lost its data
                        continue
                    seen = parse_lsn(version.decode())
                    if seen < self._last.get(key, 0):
                        self.regressions.append((key, self._last[key], seen))
                    self._last[key] = seen
            time.sleep(0.003)
        client.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Faults:
    """Injects one random fault at a time; keeps exactly one daemon in charge."""

    def __init__(self, stack: Stack, make: Callable[..., Daemon], rng: random.Random) -> None:
        self.stack = stack
        self.make = make
        self.rng = rng
        self.count = Counter[str]()
        self.daemon = make(CDC_STANDBY="true")

    def inject(self) -> None:
        kind = self.rng.choice(
            [
                "kill_daemon",
                "stall_daemon",
                "stall_redis",
                "restart_postgres",
                "lose_redis",
                "takeover",
            ]
        )
        self.count[kind] += 1
        getattr(self, kind)()

    def kill_daemon(self) -> None:
        self.daemon.kill()
        self.daemon.start()

    def stall_daemon(self) -> None:
        os.kill(self.daemon.pid, signal.SIGSTOP)
        time.sleep(self.rng.uniform(0.5, 4.0))
        os.kill(self.daemon.pid, signal.SIGCONT)

    def stall_redis(self) -> None:
        pid = self.stack.redis.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        time.sleep(self.rng.uniform(0.5, 4.0))
        os.kill(pid, signal.SIGCONT)

    def restart_postgres(self) -> None:
        self.stack.postgres.restart("immediate")

    def lose_redis(self) -> None:
        self.stack.redis.restart()  # no persistence: its data is gone

    def takeover(self) -> None:
        successor = self.make(CDC_STANDBY="true")
        successor.start()
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.daemon.kill()
        self.daemon = successor


def test_random_faults_under_concurrent_writers(
    own_stack: Stack,  # noqa: F811 - the fixture
    stack_daemon: Callable[..., Daemon],  # noqa: F811 - the fixture
) -> None:
    seed = int(os.environ.get("CDC_FAULT_SEED", str(random.randrange(1 << 30))))
    seconds = float(os.environ.get("CDC_FAULT_SECONDS", "120"))
    rng = random.Random(seed)
    with psycopg.connect(own_stack.database_url, autocommit=True) as conn:
        for i in range(AGENTS):
            conn.execute(
                "INSERT INTO agents (id, username, display_name, email, password_hash)"
                " VALUES (%s, %s, 'A', %s, 'x')",
                (f"ag{i}", f"ag{i}", f"ag{i}@example.com"),
            )
    faults = Faults(own_stack, stack_daemon, rng)
    faults.daemon.start()
    faults.daemon.wait_ready(120)
    writers = Writers(own_stack.database_url, seed).start()
    checker = Checker(own_stack.redis_url)
    checker.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            time.sleep(rng.uniform(1.0, 5.0))
            faults.inject()
        faults.daemon.wait_ready(120)
        writers.stop()
        assert_converged(own_stack.database_url, own_stack.redis_url)
    finally:
        writers.stop()
        checker.stop()
        summary = (
            f"fault run: seed={seed} seconds={seconds:.0f} faults={dict(faults.count)}"
            f" commits={dict(writers.commits)} writer_failures={writers.failures}"
            f" samples={checker.samples} torn={len(checker.torn)}"
            f" uncommitted={len(checker.uncommitted)} regressions={len(checker.regressions)}"
        )
        print(summary)
    slot = faults.daemon.slot
    confirmed = slot_confirmed(own_stack.database_url, slot)
    applied = parse_lsn(redis_state(own_stack.redis_url)["lsn"])
    assert confirmed is not None
    assert confirmed <= applied, summary
    assert checker.samples > 100, summary
    assert checker.torn == [], summary
    assert checker.uncommitted == [], summary
    assert checker.regressions == [], summary
    faults.daemon.stop()
