"""The guarantees at their edges (reliability cases 15-19), sampled while the daemon works.

Each test drives the daemon as a subprocess and samples Redis atomically (``MULTI``
reads) during the work, not only at the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from schema.lsn import parse_lsn
from tests.helpers import (
    Daemon,
    Load,
    assert_converged,
    fence,
    redis_state,
    running,
    slot_confirmed,
    wait_for,
)

Conn = psycopg.Connection[tuple[Any, ...]]
PAIRS = 20


class PairSampler(threading.Thread):
    """Reads both rows of each pair in one MULTI; a pair whose titles differ is torn."""

    def __init__(self, redis_url: str, pairs: int) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.pairs = pairs
        self.samples = 0
        self.torn: list[tuple[int, bytes | None, bytes | None]] = []
        self.values: set[bytes] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pipe = self.client.pipeline(transaction=True)
            for p in range(self.pairs):
                pipe.hget(f"ticket:{{p{p}a}}", "title")
                pipe.hget(f"ticket:{{p{p}b}}", "title")
            replies = pipe.execute()
            self.samples += 1
            for p in range(self.pairs):
                a, b = replies[2 * p], replies[2 * p + 1]
                if a is not None:
                    self.values.add(a)
                if a != b:
                    self.torn.append((p, a, b))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.client.close()


def _pairs(conn: Conn) -> None:
    for p in range(PAIRS):
        conn.execute(
            "INSERT INTO tickets (id, title) VALUES (%s, '0'), (%s, '0')", (f"p{p}a", f"p{p}b")
        )


@pytest.mark.parametrize(
    "limits",
    [{"CDC_BATCH_MAX_CHANGES": "7"}, {"CDC_BATCH_MAX_BYTES": "1024"}],
    ids=["changes", "bytes"],
)
def test_a_backlog_drained_in_small_batches_never_shows_a_torn_transaction(
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_url: str,
    redis_url: str,
    limits: dict[str, str],
) -> None:
    """Case 16: batches end at transaction boundaries; only a transaction larger than
    the limit alone may be seen in chunks (the 12-row ones here are not sampled)."""
    _pairs(pg)
    with running(make_daemon()):
        fence(database_url, redis_url)
    # A backlog of two-row transactions (and some larger than the limit between them).
    with psycopg.connect(database_url) as conn:
        for n in range(1, 1501):
            p = n % PAIRS
            conn.execute(
                "UPDATE tickets SET title = %s WHERE id IN (%s, %s)",
                (str(n), f"p{p}a", f"p{p}b"),
            )
            if n % 100 == 0:
                conn.execute(
                    "INSERT INTO tickets (id, title) SELECT 'big' || %s || '-' || g, 'x'"
                    " FROM generate_series(1, 12) g",
                    (n,),
                )
            conn.commit()
    sampler = PairSampler(redis_url, PAIRS)
    sampler.start()
    try:
        with running(make_daemon(**limits)):
            fence(database_url, redis_url, timeout=120)
            assert_converged(database_url, redis_url)
    finally:
        sampler.stop()
    assert sampler.torn == [], f"torn pairs seen: {sampler.torn[:5]} of {len(sampler.torn)}"
    # The sampler watched the drain (it saw intermediate values, not only the end).
    assert len(sampler.values) > PAIRS + 1, (sampler.samples, len(sampler.values))


HOT = ["hot0", "hot1", "hot2"]


def test_many_writers_on_the_same_few_rows_never_move_a_key_back(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """Case 15: 12 writers increment the same 3 rows (row locks order them); a MULTI
    sampler reads each key's counter and ``_v``: neither ever goes back (I2), and the
    cache ends equal to PostgreSQL (I1) with every increment counted."""
    for row in HOT:
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, '0')", (row,))
    fence(database_url, redis_url)
    stop = threading.Event()
    done = [0]
    lock = threading.Lock()

    def writer(seed: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            n = seed
            while not stop.is_set():
                n += 1
                conn.execute(
                    "UPDATE tickets SET title = (title::int + 1)::text WHERE id = %s",
                    (HOT[n % len(HOT)],),
                )
                with lock:
                    done[0] += 1

    client = redis.Redis.from_url(redis_url)
    seen: dict[str, tuple[int, int]] = {}
    backwards: list[str] = []
    samples = 0
    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(12)]
    for thread in threads:
        thread.start()
    try:
        while done[0] < 1500:
            pipe = client.pipeline(transaction=True)
            for row in HOT:
                pipe.hmget(f"ticket:{{{row}}}", "title", "_v")
            for row, (title, version) in zip(HOT, pipe.execute(), strict=True):
                now = (int(title), parse_lsn(version.decode()))
                before = seen.get(row, (0, 0))
                if now[0] < before[0] or now[1] < before[1]:
                    backwards.append(f"{row}: {before} -> {now}")
                seen[row] = max(before, now)
            samples += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    fence(database_url, redis_url)
    assert_converged(database_url, redis_url)
    assert backwards == [], backwards[:5]
    assert samples > 10
    total = sum(int(client.hget(f"ticket:{{{row}}}", "title") or 0) for row in HOT)
    assert total == done[0]


def test_a_byte_limit_below_one_change_drains_change_by_change(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """CDC_BATCH_MAX_BYTES=1: every transaction is larger than the limit, so each goes
    in chunks of one change; the backlog still drains and converges."""
    with running(make_daemon()):
        fence(database_url, redis_url)
    with psycopg.connect(database_url) as conn:
        for n in range(40):
            conn.execute(
                "INSERT INTO tickets (id, title) SELECT 'b' || %s || '-' || g, 'x'"
                " FROM generate_series(1, 3) g",
                (n,),
            )
            conn.execute("UPDATE tickets SET title = 'y' WHERE id = %s", (f"b{n}-1",))
            conn.commit()
    with running(make_daemon(CDC_BATCH_MAX_BYTES="1")):
        fence(database_url, redis_url, timeout=120)
        assert_converged(database_url, redis_url)


def test_a_key_of_ours_holding_another_type_is_replaced(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """Case 18: WRONGTYPE at a row key is repaired, not confirmed past."""
    client = redis.Redis.from_url(redis_url)
    client.set("ticket:{w1}", "something else wrote here")
    client.rpush("ticket:{w2}", "a list")
    pg.execute("INSERT INTO tickets (id, title) VALUES ('w1', 'one'), ('w2', 'two')")
    assert_converged(database_url, redis_url)
    assert client.hget("ticket:{w1}", "title") == b"one"
    assert client.hget("ticket:{w2}", "title") == b"two"
    assert (daemon.metric("cdc_errors_total", 'kind="wrong_type_key"') or 0) >= 2


def test_out_of_memory_is_retried_and_never_confirmed(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str, slot_name: str
) -> None:
    """Case 18: Redis at maxmemory refuses the batch; the LSN is not confirmed until
    Redis has it, then the daemon carries on by itself."""
    client = redis.Redis.from_url(redis_url)
    fence(database_url, redis_url)
    old = str(client.config_get("maxmemory")["maxmemory"])
    client.config_set("maxmemory", "1")
    try:
        pg.execute("INSERT INTO tickets (id, title) VALUES ('oom1', 'after the limit')")
        row = pg.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        written = parse_lsn(row[0])
        wait_for(
            lambda: (daemon.metric("cdc_errors_total", 'kind="redis"') or 0) >= 1,
            30,
            "the daemon to meet the out-of-memory refusal",
        )
        time.sleep(1.0)  # the daemon keeps retrying meanwhile
        confirmed = slot_confirmed(database_url, slot_name)
        assert confirmed is not None
        assert confirmed < written
        assert client.exists("ticket:{oom1}") == 0
        assert parse_lsn(redis_state(redis_url)["lsn"]) < written
    finally:
        client.config_set("maxmemory", old)
    assert_converged(database_url, redis_url)
    assert client.hget("ticket:{oom1}", "title") == b"after the limit"


def test_a_command_redis_refuses_for_good_stops_the_daemon_with_exit_3(
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
) -> None:
    """Case 18: a refusal that does not pass by itself (the user's right to UNLINK is
    revoked while the daemon runs, then a TRUNCATE comes; a user without it from the
    start is refused at start) stops the daemon with one line naming the LSN and the
    table; nothing is confirmed past it, and a daemon with the right to UNLINK carries
    on from there."""
    admin = redis.Redis.from_url(redis_url)
    user = f"nounlink{slot_name}"
    admin.acl_setuser(
        user,
        enabled=True,
        passwords=["+pw-for-test"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    try:
        host, rest = redis_url.split("//", 1)[1].split("/", 1)
        limited = f"redis://{user}:pw-for-test@{host}/{rest}"
        pg.execute("INSERT INTO tickets (id, title) VALUES ('t1', 'one'), ('t2', 'two')")
        first = make_daemon(REDIS_URL=limited)
        with running(first):
            fence(database_url, redis_url)
            admin.acl_setuser(user, enabled=True, commands=["-unlink"])
            pg.execute("TRUNCATE tickets CASCADE")
            row = pg.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            truncated = parse_lsn(row[0])
            assert first.wait_exit(60) == 3
        lines = [line for line in first.log().splitlines() if "cannot apply the record" in line]
        assert lines
        assert "table tickets" in lines[-1]
        assert "LSN" in lines[-1]
        assert "pw-for-test" not in first.log()
        confirmed = slot_confirmed(database_url, slot_name)
        assert confirmed is not None
        assert confirmed < truncated
        assert admin.exists("ticket:{t1}") == 1  # the truncate is not applied...
        with running(make_daemon()):  # ...until a daemon that may UNLINK applies it
            assert_converged(database_url, redis_url)
        assert admin.exists("ticket:{t1}") == 0
    finally:
        admin.acl_deluser(user)


def test_an_undecodable_record_stops_the_daemon_with_exit_3(
    make_daemon: Callable[..., Daemon],
    daemon: Daemon,
    pg: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
) -> None:
    """A poison record: exit 3, one line with the LSN and table, no row contents, and
    the slot is not confirmed past it (a fixed daemon starts again at that record)."""
    fence(database_url, redis_url)
    daemon.stop()
    pg.execute("INSERT INTO tickets (id, title) VALUES ('poison', 'row-content-xyzzy')")
    broken = make_daemon(CDC_FAILPOINTS="record=corrupt")
    broken.start()
    assert broken.wait_exit(60) == 3
    log = broken.log()
    line = next(line for line in log.splitlines() if "cannot apply the record" in line)
    assert "table tickets" in line
    assert "LSN" in line
    assert "row-content-xyzzy" not in log
    assert "Traceback" not in log
    with running(make_daemon()):
        assert_converged(database_url, redis_url)


class VersionSampler(threading.Thread):
    """Reads ``_v`` of every row in one MULTI and records any that went backwards."""

    def __init__(self, redis_url: str, rows: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.rows = rows
        self.samples = 0
        self.last: dict[str, int] = {}
        self.regressions: list[tuple[str, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pipe = self.client.pipeline(transaction=True)
            for row in self.rows:
                pipe.hget(f"ticket:{{{row}}}", "_v")
            for row, raw in zip(self.rows, pipe.execute(), strict=True):
                if raw is None:
                    continue  # deleted (the load deletes rows too)
                version = parse_lsn(raw.decode())
                if version < self.last.get(row, 0):
                    self.regressions.append((row, self.last[row], version))
                self.last[row] = version
            self.samples += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.client.close()


def test_a_paused_predecessor_lands_nothing_after_a_successor_took_over(
    make_daemon: Callable[..., Daemon],
    pg: Conn,
    database_url: str,
    redis_url: str,
    slot_name: str,
    tmp_path: Path,
) -> None:
    """Case 17: the daemon is held between sending two batches (fail point: the next one
    is planned, not yet sent), a successor takes the slot and the fence and writes; when
    the first one resumes, the batch it sends lands nowhere, and no ``_v`` goes
    backwards, even for a moment."""
    rows = [f"v{i}" for i in range(12)]
    hold = tmp_path / "hold"
    first = make_daemon(CDC_FAILPOINTS=f"before_send=pause:{hold}", CDC_SLOT_BUSY_TIMEOUT="60")
    load = Load(database_url, rows).start()
    sampler = VersionSampler(redis_url, rows)
    try:
        with running(first):
            load.wait_commits(50)
            sampler.start()
            hold.touch()
            wait_for(lambda: Path(f"{hold}.hit").exists(), 30, "the first daemon to be held")
            load.wait_commits(50)
            # Its walsender goes (as when a stalled daemon times out); a successor comes.
            pg.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot_name,),
            )
            with running(make_daemon()):
                load.wait_commits(100)
                # Nothing is written after this: a stale batch that landed would leave
                # older values than PostgreSQL's for good, not only for a moment.
                load.stop()
                fence(database_url, redis_url)
                assert_converged(database_url, redis_url)
                mark = len(first.log())
                hold.unlink()  # the first one wakes up and sends what it had
                # Its batch is refused by the fence: its session ends without writing.
                wait_for(
                    lambda: "fenced" in first.log()[mark:],
                    30,
                    "the first daemon to be fenced",
                )
                assert first.metric("cdc_errors_total", 'kind="fenced"') == 1
                assert_converged(database_url, redis_url)
    finally:
        load.stop()
        sampler.stop()
        hold.unlink(missing_ok=True)
    assert sampler.samples > 10
    assert sampler.regressions == []


class Counter(threading.Thread):
    """Increments the title of each row, one row per transaction, never deleting."""

    def __init__(self, database_url: str, rows: list[str]) -> None:
        super().__init__(daemon=True)
        self.database_url = database_url
        self.rows = rows
        self.commits = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self._halt.is_set():
                row = self.rows[self.commits % len(self.rows)]
                conn.execute(
                    "UPDATE tickets SET title = (title::int + 1)::text WHERE id = %s", (row,)
                )
                self.commits += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def test_verify_repair_never_overwrites_a_newer_change(
    daemon: Daemon, pg: Conn, database_url: str, redis_url: str
) -> None:
    """Case 19: ``cdc verify --repair`` while the daemon streams changes to the same
    rows: a repaired key never goes back to an older row (titles count up) or version."""
    rows = [f"r{i}" for i in range(6)]
    for row in rows:
        pg.execute("INSERT INTO tickets (id, title) VALUES (%s, '0')", (row,))
    fence(database_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    counter = Counter(database_url, rows)
    versions = VersionSampler(redis_url, rows)
    counter.start()
    versions.start()
    titles: dict[str, int] = {}
    backwards: list[tuple[str, int, int]] = []
    try:
        for _ in range(8):
            for row in rows[:3]:  # damage some keys so that verify has something to repair
                client.hset(f"ticket:{{{row}}}", "_damaged", "1")
            result = daemon_cli(daemon, "verify", "--repair")
            assert result.returncode in (0, 1), result.stderr
            pipe = client.pipeline(transaction=True)
            for row in rows:
                pipe.hget(f"ticket:{{{row}}}", "title")
            for row, raw in zip(rows, pipe.execute(), strict=True):
                if raw is not None:
                    value = int(raw)
                    if value < titles.get(row, 0):
                        backwards.append((row, titles[row], value))
                    titles[row] = value
        counter.stop()
        assert counter.commits > 0
        assert_converged(database_url, redis_url)
    finally:
        counter.stop()
        versions.stop()
    assert backwards == []
    assert versions.regressions == []


def daemon_cli(daemon: Daemon, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        cwd=daemon.cwd,
        env=daemon.environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_checkpoint_format_is_migrated_or_refused(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """An older ``cdc:state`` (no ``format``) is migrated at the claim; a newer one is
    refused with exit 2 and one line rather than misread."""
    client = redis.Redis.from_url(redis_url)
    with running(make_daemon()):
        fence(database_url, redis_url)
    assert client.hget("cdc:state", "format") == b"2"
    client.hdel("cdc:state", "format")  # as version 1 left it
    pg.execute("INSERT INTO tickets (id, title) VALUES ('f1', 'after the upgrade')")
    with running(make_daemon()):
        assert_converged(database_url, redis_url)
    assert client.hget("cdc:state", "format") == b"2"
    client.hset("cdc:state", "format", "99")
    newer = make_daemon()
    newer.start()
    assert newer.wait_exit(60) == 2
    assert "format '99'" in newer.log()
