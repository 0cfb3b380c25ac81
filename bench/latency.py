"""Commit-to-visible latency: a PostgreSQL commit until its key appears in Redis.

The writers are ``pgbench`` clients (C, so that on a 2-core machine the load generator
leaves CPU to what is measured) inserting one ticket per transaction at an offered rate:
1,000 commits/s with one client, 5,000 with four (``--rate``: Poisson arrivals, so bursts
happen as they would). Each id carries ``clock_timestamp()`` taken as its row is
inserted, just before COMMIT. An observer process subscribed to Redis keyspace
notifications (``hset`` on ``ticket:*``) stamps each key's first appearance with the same
wall clock. Latency = seen - inserted, so the commit itself counts against the pipeline.

"No growing backlog" (at 5,000/s): PostgreSQL's WAL position minus Redis' checkpoint is
sampled every 0.2 s; its least-squares trend over the run must stay under 1 MiB, every
commit must be seen, the achieved rate must be >= 95% of the offered one, and once the
writers stop Redis must catch up within 1 s.

Targets (contract section 9): p50 <= 1 ms, p99 <= 3 ms at 1,000/s; p50 <= 2 ms,
p99 <= 10 ms, no growing backlog at 5,000/s.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import shutil
import socket
import subprocess
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import hiredis
import psycopg
import redis

from bench.common import DaemonProcess, Stack, percentile, row, stack
from cdc.cache.wire import RedisAddress
from cdc.protocol.resp import command
from devstack.servers import postgres_bin_dir
from schema.keys import STATE_KEY
from schema.lsn import parse_lsn

SECONDS = 10
# The id carries the commit's time: clock_timestamp() as the row is inserted, just
# before COMMIT (so the commit's own few microseconds count as latency, not against it).
INSERT = """\
INSERT INTO tickets (id, title, description, priority, ticket_type, channel, customer, tags)
VALUES ('CASE-' || :client_id::text || '-'
        || (extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text,
        'Order #1042 arrived damaged', 'The customer sent photos of the box.',
        'high', 'after_sale', 'email', '{"name": "Ada Lovelace"}', '["shipping"]');
"""


def _observe(redis_url: str, ready: Event, stop: Event, out: str) -> None:
    """Record when each ticket key first appears (wall clock: ids carry PostgreSQL's).

    A raw socket and hiredis rather than redis-py's pubsub, which costs ~10x more CPU per
    message: on 2 cores that would be taken from what is being measured."""
    address = RedisAddress.from_url(redis_url)
    prefix = f"__keyspace@{address.db}__:ticket:".encode()
    sock = socket.create_connection((address.host, address.port))
    sock.settimeout(0.1)
    sock.sendall(command(b"PSUBSCRIBE", prefix + b"*"))
    reader = hiredis.Reader()
    seen: dict[str, float] = {}
    while not stop.is_set():
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        now = time.time()
        reader.feed(chunk)
        while (message := reader.gets()) is not False:
            if message[0] == b"psubscribe":
                ready.set()
            elif message[3] == b"hset":
                seen.setdefault(message[2][len(prefix) :].decode(), now)
    sock.close()
    Path(out).write_text(json.dumps(seen))


def _id_time(key: str) -> float:
    """The commit-time stamp an id carries: ``{<case>-<client>-<epoch µs>}``."""
    return int(key.strip("{}").rsplit("-", 1)[1]) / 1e6


def _applied(client: redis.Redis) -> int:
    value = client.hget(STATE_KEY, "lsn")
    return parse_lsn(value) if value else 0


def _wal_lsn(conn: psycopg.Connection[Any]) -> int:
    found = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert found is not None
    return parse_lsn(str(found[0]))


def _slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares trend of (seconds, bytes) samples, in bytes per second."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (b - mean_b) for t, b in samples)
    return cov / var if var else 0.0


def run_case(s: Stack, rate: int, writers: int) -> dict[str, Any]:
    client = redis.Redis.from_url(s.redis_url)
    client.config_set("notify-keyspace-events", "Kh")
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    seen_path = s.directory / f"seen-{rate}.json"
    observer = ctx.Process(target=_observe, args=(s.redis_url, ready, stop, str(seen_path)))
    observer.start()
    ready.wait(30)
    script = s.directory / f"insert-{rate}.sql"
    script.write_text(INSERT.replace("CASE", f"r{rate}"))
    pgbench = shutil.which("pgbench") or str(postgres_bin_dir() / "pgbench")
    bench = subprocess.Popen(
        [
            pgbench,
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={writers}",
            f"--jobs={min(writers, 2)}",
            f"--rate={rate}",
            f"--time={SECONDS}",
            f"--file={script}",
            s.database_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    backlog: list[tuple[float, int]] = []
    started = time.monotonic()
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        while bench.poll() is None:
            backlog.append((time.monotonic() - started, _wal_lsn(conn) - _applied(client)))
            time.sleep(0.2)
        end = _wal_lsn(conn)
        stopped = time.monotonic()
        while _applied(client) < end and time.monotonic() - stopped < 30:
            time.sleep(0.001)
        catch_up = time.monotonic() - stopped
    output = bench.stdout.read() if bench.stdout else ""
    time.sleep(0.2)
    stop.set()
    observer.join()
    client.config_set("notify-keyspace-events", "")
    seen: dict[str, float] = json.loads(seen_path.read_text())
    processed = int(re.search(r"actually processed: (\d+)", output).group(1))  # type: ignore[union-attr]
    tps = float(re.search(r"tps = ([\d.]+)", output).group(1))  # type: ignore[union-attr]
    latencies = [seen_at - _id_time(key) for key, seen_at in seen.items()]
    ordered = [
        seen_at - _id_time(key) for key, seen_at in sorted(seen.items(), key=lambda kv: kv[1])
    ]
    quarter = max(1, len(ordered) // 4)
    return {
        "achieved": tps,
        "commits": processed,
        "missing": processed - len(seen),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
        "p50_first_quarter": percentile(ordered[:quarter], 50),
        "p50_last_quarter": percentile(ordered[-quarter:], 50),
        "backlog_max": max((b for _, b in backlog), default=0),
        "backlog_slope": _slope(backlog),
        "catch_up": catch_up,
    }


def main() -> list[str]:
    lines = []
    with stack() as s:
        daemon = DaemonProcess(s).start().wait_ready()
        try:
            for rate, writers, p50_target, p99_target in (
                (1000, 1, 1.0, 3.0),
                (5000, 4, 2.0, 10.0),
            ):
                r = run_case(s, rate, writers)
                p50, p99 = r["p50"] * 1000, r["p99"] * 1000
                grows = r["backlog_slope"] * SECONDS
                keeps_up = (
                    r["missing"] == 0
                    and r["achieved"] >= 0.95 * rate
                    and r["catch_up"] <= 1.0
                    and grows < (1 << 20)
                )
                label = f"{rate:,} commits/s, {writers} writer{'s' if writers > 1 else ''}"
                lines += [
                    row(
                        f"latency {label}: p50",
                        f"{p50:.2f} ms",
                        f"<= {p50_target:g} ms",
                        p50 <= p50_target,
                    ),
                    row(
                        f"latency {label}: p99",
                        f"{p99:.2f} ms",
                        f"<= {p99_target:g} ms",
                        p99 <= p99_target,
                    ),
                    row(
                        f"  max {r['max'] * 1000:.1f} ms; p50 first/last quarter",
                        f"{r['p50_first_quarter'] * 1e3:.2f}/{r['p50_last_quarter'] * 1e3:.2f} ms",
                        "(for reference)",
                        None,
                    ),
                    row(
                        f"  commits: {r['commits']:,} at {r['achieved']:,.0f}/s",
                        f"{r['missing']} not seen",
                        "(for reference)",
                        None,
                    ),
                    row(
                        f"  backlog: max {r['backlog_max']:,} B, trend {grows:+,.0f} B/run",
                        f"caught up in {r['catch_up'] * 1000:.0f} ms",
                        "no growing backlog",
                        keeps_up if rate == 5000 else None,
                    ),
                ]
        finally:
            daemon.stop()
    return lines


if __name__ == "__main__":
    for line in main():
        print(line)
