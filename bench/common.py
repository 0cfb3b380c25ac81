"""What every benchmark needs: private servers, a migrated database, the daemon.

Benchmarks measure and print; they never assert. Each figure of contract section 9 is
measured side by side with its baseline in the same run, on this machine, and printed
as a ratio (or an absolute number where the target is one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from devstack.servers import PostgresServer, RedisServer, free_port
from schema.lsn import parse_lsn

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stack:
    postgres: PostgresServer
    redis: RedisServer
    database_url: str
    redis_url: str
    directory: Path


@contextlib.contextmanager
def stack(pg_settings: dict[str, str] | None = None) -> Iterator[Stack]:
    """Private PostgreSQL and Redis in a temporary directory, a migrated database."""
    directory = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    os.chmod(directory, 0o755)
    pg = PostgresServer(directory / "pg", settings=pg_settings or {})
    rd = RedisServer(directory / "redis")
    pg.start()
    rd.start()
    try:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        url = pg.url("bench")
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        yield Stack(pg, rd, url, rd.url, directory)
    finally:
        rd.stop()
        pg.destroy()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


class DaemonProcess:
    def __init__(self, s: Stack, slot: str = "cdc_cache", **env: str) -> None:
        self.metrics_port = free_port()
        self.log_path = s.directory / f"daemon-{slot}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        self.env = {
            **base,
            "DATABASE_URL": s.database_url,
            "REDIS_URL": s.redis_url,
            "CDC_SLOT": slot,
            "CDC_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
            "CDC_LOG_FORMAT": "json",
            "CDC_STATE_DIR": str(s.directory / "state"),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at = 0.0

    def start(self) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdc", "run"], cwd=ROOT, env=self.env, stdout=log, stderr=log
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 120, poll: float = 0.05) -> DaemonProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text())
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=1),
            ):
                self.ready_at = time.monotonic()
                return self
            time.sleep(poll)
        raise TimeoutError("daemon not ready")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_checkpoint(
    redis_url: str, target: int, timeout: float = 600, poll: float = 0.002
) -> float:
    """Block until Redis' checkpoint reaches ``target``; the monotonic time it did."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = client.hget("cdc:state", "lsn")
        if value and parse_lsn(value) >= target:
            return time.monotonic()
        time.sleep(poll)
    raise TimeoutError(f"checkpoint did not reach {target:X}")


def current_lsn(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


def row(label: str, value: str, target: str, ok: bool | None) -> str:
    verdict = "" if ok is None else ("met" if ok else "NOT met")
    return f"{label:<58} {value:>22}   target {target:<28} {verdict}"


# -- process and server figures ---------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (``VmHWM``: the resident high-water mark)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def slot_stats(database_url: str, slot: str) -> dict[str, int]:
    """The server's spill and stream counters for ``slot`` (PostgreSQL 14+)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        if conn.info.server_version < 140000:
            return {"spill_bytes": -1, "stream_bytes": -1}
        found = conn.execute(
            "SELECT spill_bytes, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    if found is None:
        return {"spill_bytes": 0, "stream_bytes": 0}
    return {"spill_bytes": int(found[0]), "stream_bytes": int(found[1])}


def reset_slot_stats(database_url: str, slot: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        if conn.info.server_version >= 140000:
            conn.execute("SELECT pg_stat_reset_replication_slot(%s)", (slot,))


def slot_options(database_url: str) -> list[str]:
    """pgoutput options as the daemon asks for them (cdc.daemon.stream_options)."""
    with psycopg.connect(database_url) as conn:
        version = conn.info.server_version
    options = ["proto_version=1"]
    if version >= 140000:
        options = ["proto_version=2", "streaming=on", "messages=true"]
    return [*options, "publication_names=cdc_cache"]
