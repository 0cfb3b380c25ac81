"""End-to-end helpers: the daemon as a subprocess, fences, and the PG-vs-Redis comparison.

:func:`assert_converged` is the one full comparison every end-to-end case ends with. It is
written here independently of ``cdc verify`` (plain SQL and redis-py), so a bug shared by
the daemon and its verifier cannot hide.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from devstack.servers import free_port
from schema.keys import STATE_KEY, TRACKED_TABLES, match_prefix
from schema.lsn import parse_lsn
from schema.redis_url import redis_client

ROOT = Path(__file__).resolve().parents[1]
FENCE_ID = "__fence__"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "condition",
    max_delay: float = 0.2,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (no fixed sleeps in tests).

    The delay between polls grows to ``max_delay`` (keep it small to catch a short-lived
    state). Connection errors are retried; anything else (an assertion) fails at once."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, redis.RedisError, psycopg.OperationalError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from last_error
        time.sleep(delay)
        delay = min(delay * 1.5, max_delay)


@dataclass
class Daemon:
    """``python -m cdc run`` in a subprocess with its own slot, Redis db and metrics port."""

    database_url: str
    redis_url: str
    slot: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = field(default_factory=free_port)
    # Where ``python -m cdc`` starts: its packages are imported from here first.
    cwd: Path = ROOT
    proc: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CDC_") and k not in ("DATABASE_URL", "REDIS_URL")
        }
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "CDC_SLOT": self.slot,
                "CDC_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
                "CDC_LOG_FORMAT": "json",
                "CDC_LOG_LEVEL": "info",
                "CDC_STATUS_INTERVAL": "0.2",
                "CDC_PG_TIMEOUT": "10",
                "CDC_REDIS_TIMEOUT": "2",
                "CDC_RETRY_MAX": "1",
                "CDC_SCHEMA_POLL_INTERVAL": "0.2",
                "CDC_OBSERVE_INTERVAL": "0.5",
                "CDC_SLOT_BUSY_TIMEOUT": "3",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        return env

    def start(self, *args: str) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdc", "run", *args],
            cwd=self.cwd,
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def ready(self) -> bool:
        with contextlib.suppress(OSError):
            return self.http("/readyz")[0] == 200
        return False

    def wait_ready(self, timeout: float = 60.0) -> Daemon:
        def check() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            return self.ready()

        wait_for(check, timeout, "the daemon to be ready")
        return self

    def metric(self, name: str, labels: str = "") -> float | None:
        _, body = self.http("/metrics")
        needle = f"{name}{{{labels}}}" if labels else name
        for line in body.splitlines():
            if line.startswith(needle + " "):
                return float(line.split()[-1])
        return None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


_fence_counter = itertools.count(1)


def fence(database_url: str, redis_url: str, timeout: float = 30.0) -> None:
    """Write a row and wait until it is in Redis: everything committed before it is too."""
    marker = f"fence-{os.getpid()}-{next(_fence_counter)}-{time.monotonic_ns()}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tickets (id, title) VALUES (%s, %s)"
            " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title",
            (FENCE_ID, marker),
        )
    client = redis_client(redis_url)
    try:
        wait_for(
            lambda: client.hget("ticket:{" + FENCE_ID + "}", "title") == marker.encode(),
            timeout,
            "the fence row to reach Redis",
        )
    finally:
        client.close()


def _columns(conn: psycopg.Connection[Any], schema: str, table: str) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            (f"{schema}.{table}",),
        ).fetchall()
    ]


def pg_rows(
    conn: psycopg.Connection[Any], schema: str, table: str
) -> Iterator[list[dict[str, str]]]:
    """Every row of a table as {column: text} for its non-NULL columns, in chunks.

    Must run inside a transaction (the cursor is server-side)."""
    columns = _columns(conn, schema, table)
    select = ", ".join(f'"{c}"::text' for c in columns)
    with conn.cursor(name=f"compare_{table}") as cur:
        cur.execute(f'SELECT {select} FROM "{schema}"."{table}"')
        while rows := cur.fetchmany(5000):
            yield [
                {c: v for c, v in zip(columns, row, strict=True) if v is not None} for row in rows
            ]


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def scan(client: redis.Redis, prefix: str) -> Iterator[list[bytes]]:
    pattern = match_prefix(prefix)
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=2000):
        batch.append(key)
        if len(batch) >= 2000:
            yield batch
            batch = []
    if batch:
        yield batch


def assert_converged(database_url: str, redis_url: str, fence_first: bool = True) -> dict[str, int]:
    """I1: every tracked row equals its key (contract section 6) and no extra key exists."""
    if fence_first:
        fence(database_url, redis_url)
    # A redis+cluster:// URL: a RedisCluster, whose scans go over every primary.
    client = redis_client(redis_url)
    cluster = redis_url.startswith(("redis+cluster", "rediss+cluster"))
    counts: dict[str, int] = {}
    problems: list[str] = []
    try:
        with psycopg.connect(database_url, options="-c TimeZone=UTC") as conn:
            for table in TRACKED_TABLES:
                ids: set[str] = set()
                lookups: dict[str, dict[str, str]] = {lookup.prefix: {} for lookup in table.lookups}
                for rows in pg_rows(conn, table.schema, table.name):
                    pipe = client.pipeline(transaction=False)
                    for values in rows:
                        pipe.type(table.key(values["id"]))
                        pipe.hgetall(table.key(values["id"]))
                    replies = iter(pipe.execute())
                    for values in rows:
                        row_id = values["id"]
                        ids.add(row_id)
                        for lookup in table.lookups:
                            lookups[lookup.prefix][lookup.key(values[lookup.column])] = row_id
                        kind, fields = next(replies), next(replies)
                        key = table.key(row_id)
                        if not fields:
                            problems.append(f"missing {key}")
                            continue
                        if kind != b"hash":
                            problems.append(f"{key} is not a hash")
                            continue
                        actual = {text(k): text(v) for k, v in fields.items()}
                        if "_v" not in actual:
                            problems.append(f"{key} has no _v")
                        actual = {k: v for k, v in actual.items() if not k.startswith("_")}
                        expected = {
                            k: v for k, v in values.items() if k not in table.excluded_columns
                        }
                        if actual != expected:
                            diff = sorted(
                                k
                                for k in expected.keys() | actual.keys()
                                if expected.get(k) != actual.get(k)
                            )
                            problems.append(f"different {key}: {diff}")
                counts[table.name] = len(ids)
                for found in scan(client, table.key_prefix):
                    for raw in found:
                        extra_id = table.key_id(raw.decode())
                        if extra_id is not None and extra_id not in ids:
                            problems.append(f"extra {raw.decode()}")
                for lookup in table.lookups:
                    wanted = lookups[lookup.prefix]
                    for found in scan(client, lookup.key_prefix):
                        got: list[Any] = (
                            client.mget_nonatomic(found)  # type: ignore[attr-defined]
                            if cluster
                            else client.mget(found)
                        )
                        for raw, value in zip(found, got, strict=True):
                            name = raw.decode()
                            owner = wanted.pop(name, None)
                            if owner is None:
                                problems.append(f"extra lookup {name}")
                            elif value is None or text(value) != owner:
                                problems.append(f"lookup {name} should be {owner}")
                    problems += [f"missing lookup {k}" for k in wanted]
            problems += view_problems(conn, client)
        owned: tuple[str, ...] = ("ticket:{", "agent:{", "agent:username:{", "cdc:", "changes:")
        owned += tuple(view.key_prefix for table in TRACKED_TABLES for view in table.views)
        other = [
            k.decode() for k in client.scan_iter(count=1000) if not k.decode().startswith(owned)
        ]
        problems += [f"unexpected key {k}" for k in other]
    finally:
        client.close()
    assert not problems, f"Redis differs from PostgreSQL ({len(problems)} problems):\n" + "\n".join(
        problems[:50]
    )
    return counts


def view_problems(conn: psycopg.Connection[Any], client: redis.Redis) -> list[str]:
    """Contract 6b: each view equals its SQL computation (members, and the scores of
    sorted sets: ``extract(epoch from <score column>)``); an empty set has no key."""
    problems: list[str] = []
    for table in TRACKED_TABLES:
        for view in table.views:
            score = f'extract(epoch from "{view.score}")::float8' if view.score else "NULL"
            expected: dict[str, dict[str, float | None]] = {}
            for value, row_id, points in conn.execute(
                f'SELECT "{view.column}"::text, "{table.primary_key}"::text, {score}'
                f' FROM "{table.schema}"."{table.name}" WHERE "{view.column}" IS NOT NULL'
            ).fetchall():
                expected.setdefault(view.key(value), {})[row_id] = points
            actual: dict[str, dict[str, float | None]] = {}
            for found in scan(client, view.key_prefix):
                for raw in found:
                    key = raw.decode()
                    kind: Any = client.type(raw)
                    if kind == (b"zset" if view.sorted else b"set"):
                        if view.sorted:
                            pairs: Any = client.zrange(raw, 0, -1, withscores=True)
                            actual[key] = {text(m): float(v) for m, v in pairs}
                        else:
                            actual[key] = {text(m): None for m in client.smembers(raw)}
                    else:
                        problems.append(f"view {key} is a {text(kind)}")
            for key in sorted(expected.keys() | actual.keys()):
                want, have = expected.get(key, {}), actual.get(key, {})
                if want != have:
                    missing = sorted(want.keys() - have.keys())[:5]
                    extra = sorted(have.keys() - want.keys())[:5]
                    scores = sorted(i for i in want.keys() & have.keys() if want[i] != have[i])[:5]
                    problems.append(
                        f"view {key}: missing {missing} extra {extra} different scores {scores}"
                    )
    return problems


def redis_state(redis_url: str) -> dict[str, str]:
    client = redis_client(redis_url, decode_responses=True)
    try:
        return client.hgetall(STATE_KEY)  # type: ignore[return-value]
    finally:
        client.close()


def wait_rebuilt(url: str, redis_url: str) -> None:
    """Until an online rebuild is done. Each backfill window waits for the stream to pass
    the WAL position it was read at, so keep writing (fences) meanwhile."""

    def done() -> bool:
        fence(url, redis_url)
        return not redis_state(redis_url).get("rebuild")

    wait_for(done, 90, "the rebuild to finish")


def slot_confirmed(database_url: str, slot: str) -> int | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return parse_lsn(row[0]) if row and row[0] else None


@contextlib.contextmanager
def running(daemon: Daemon, timeout: float = 60.0) -> Iterator[Daemon]:
    daemon.start()
    try:
        daemon.wait_ready(timeout)
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


class Load:
    """A writer thread: small multi-row transactions on a fixed set of rows, until
    stopped. It reconnects when PostgreSQL goes away (restarts are part of the cases)."""

    def __init__(self, database_url: str, rows: list[str], seed: int = 7) -> None:
        self.database_url = database_url
        self.rows = rows
        self.commits = 0
        self.failures = 0
        self._seed = seed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_commits(self, more: int, timeout: float = 60.0) -> None:
        target = self.commits + more
        wait_for(lambda: self.commits >= target, timeout, f"{more} more commits")

    def _run(self) -> None:
        rng = random.Random(self._seed)
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.database_url, connect_timeout=3)
                for row in rng.sample(self.rows, min(4, len(self.rows))):
                    conn.execute(
                        "INSERT INTO tickets (id, title) VALUES (%s, '0')"
                        " ON CONFLICT (id) DO UPDATE SET title = (tickets.title::int + 1)::text,"
                        " updated_at = now()",
                        (row,),
                    )
                if rng.random() < 0.1:
                    conn.execute("DELETE FROM tickets WHERE id = %s", (rng.choice(self.rows),))
                conn.commit()
                self.commits += 1
            except psycopg.Error:
                self.failures += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                self._stop.wait(0.2)
        if conn is not None:
            conn.close()


def run_cdc(
    database_url: str, redis_url: str, slot: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``cdc <args>`` as a user runs it: only the environment given (no CDC_* of ours)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    clean.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "CDC_SLOT": slot, **env})
    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@dataclass
class Monitor:
    """Samples Redis and the slot while the test runs.

    - I2: each key's ``_v`` (the LSN of the transaction that wrote it) never goes back.
    - I4: the slot's confirmed_flush_lsn never passes the checkpoint Redis holds.
    """

    database_url: str
    redis_url: str
    slot: str
    rows: list[str]
    regressions: list[str] = field(default_factory=list)
    ack_violations: list[str] = field(default_factory=list)
    samples: int = 0
    _seen: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def check(self, least: int = 3) -> None:
        """Stop sampling; it saw the run (``least`` samples: a server restarting slows
        each one down) and found no regression or early confirmation."""
        self.stop()
        assert self.samples >= least, self.samples
        assert not self.regressions, self.regressions[:10]
        assert not self.ack_violations, self.ack_violations[:10]

    def _run(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        while not self._stop.is_set():
            try:
                confirmed = slot_confirmed(self.database_url, self.slot)
                checkpoint = client.hget("cdc:state", "lsn")
                if confirmed is not None and checkpoint and confirmed > parse_lsn(text(checkpoint)):
                    self.ack_violations.append(
                        f"confirmed {confirmed:X} > checkpoint {checkpoint!r}"
                    )
                pipe = client.pipeline(transaction=False)
                for row in self.rows:
                    pipe.hget(f"ticket:{{{row}}}", "_v")
                for row, version in zip(self.rows, pipe.execute(), strict=True):
                    if version is None:
                        continue
                    value = parse_lsn(text(version))
                    if value < self._seen.get(row, 0):
                        self.regressions.append(f"{row}: {self._seen[row]:X} -> {value:X}")
                    self._seen[row] = max(value, self._seen.get(row, 0))
                self.samples += 1
            except (redis.RedisError, psycopg.Error):
                pass
            time.sleep(0.01)
