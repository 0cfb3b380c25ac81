"""Draining a backlog into Redis versus ``pg_recvlogical`` to /dev/null, and one large
transaction while it is written.

Backlog: the daemon's slot and one for pg_recvlogical (same pgoutput options as the
daemon: protocol 2 with streaming on PostgreSQL 14+) stand at the same position, the
backlog is written while neither runs, then each drains it in turn. pg_recvlogical's
time is its whole run with ``--endpos``. The daemon's is taken three ways: from its
process start, from ready (``/readyz`` 200), and in steady state (while Redis'
checkpoint goes from 10% to 100% of the backlog's WAL; for one transaction, from ready).
Its CPU time per row is read
from ``/proc/<pid>/stat`` between ready and the end of the drain.

Live: with the daemon streaming, one transaction writes all its rows, then COMMIT; the
figure is the time from COMMIT until the last row is in Redis (with streaming the daemon
already holds the transaction then). Peak RSS is the kernel's ``VmHWM`` of a daemon
started just before; the server's spill and stream bytes are those of the daemon's slot.

Between cases the slot's restart_lsn is moved past what was written (a checkpoint while
the daemon runs): PostgreSQL decodes WAL from there again at every session start and
never streams before the confirmed position, so an earlier case would show as spill.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

import psycopg
import redis

from bench.common import (
    DaemonProcess,
    Stack,
    cpu_seconds,
    current_lsn,
    reset_slot_stats,
    slot_options,
    slot_stats,
    status_kib,
)
from devstack.servers import postgres_bin_dir
from schema.lsn import parse_lsn

FILL = """
INSERT INTO tickets (id, title, description, status, priority, ticket_type, channel, customer, tags)
SELECT %(prefix)s::text || g, 'Order #' || g || ' arrived damaged',
       repeat('The customer wrote in. ', 4),
       'open', 'high', 'after_sale', 'email',
       jsonb_build_object('name', 'Customer ' || g, 'email', 'c' || g || '@example.com'),
       '["shipping", "damage"]'
FROM generate_series(%(first)s::int, %(last)s::int) g
"""

SLOT = "cdc_cache"
# A smaller run to try the benchmark itself (``CDC_BENCH_SCALE=0.05``); figures need 1.
SCALE = float(os.environ.get("CDC_BENCH_SCALE", "1"))


def _write(s: Stack, rows: int, transactions: int, prefix: str) -> int:
    per = rows // transactions
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        for t in range(transactions):
            conn.execute(FILL, {"prefix": prefix, "first": t * per + 1, "last": (t + 1) * per})
    return current_lsn(s.database_url)


def _checkpoint(client: redis.Redis) -> int:
    value = client.hget("cdc:state", "lsn")
    return parse_lsn(value) if value else 0


def _restart_lsn(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
        ).fetchone()
    return parse_lsn(str(found[0])) if found and found[0] else 0


def settle(s: Stack, daemon: DaemonProcess, timeout: float = 20.0) -> None:
    """With ``daemon`` running: Redis has everything written so far, and the slot's
    restart_lsn has moved past it too. Otherwise the next session decodes the previous
    case's WAL again, and PostgreSQL never streams (it spills) before the confirmed
    position: that would count against the next case's spill bytes."""
    target = current_lsn(s.database_url)
    client = redis.Redis.from_url(s.redis_url)
    while _checkpoint(client) < target:
        time.sleep(0.01)
    deadline = time.monotonic() + timeout
    while _restart_lsn(s.database_url) < target and time.monotonic() < deadline:
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # logs the running transactions the slot moves on
            conn.execute("SELECT pg_logical_emit_message(false, 'bench', 'settle')")
        time.sleep(0.5)


def catch_up(s: Stack) -> None:
    """Run the daemon until Redis and the slot have everything written so far."""
    daemon = DaemonProcess(s).start().wait_ready()
    settle(s, daemon)
    daemon.stop()


def recvlogical(s: Stack, slot: str, end: int) -> float:
    binary = shutil.which("pg_recvlogical") or str(postgres_bin_dir() / "pg_recvlogical")
    options = [arg for option in slot_options(s.database_url) for arg in ("-o", option)]
    started = time.monotonic()
    subprocess.run(
        [
            binary,
            "-d",
            s.database_url,
            "--slot",
            slot,
            "--start",
            "--endpos",
            f"{end >> 32:X}/{end & 0xFFFFFFFF:X}",
            *options,
            "-f",
            "/dev/null",
            "--no-loop",
        ],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


def backlog_case(s: Stack, rows: int, transactions: int, prefix: str) -> dict[str, Any]:
    """The backlog drained by pg_recvlogical, then by the daemon (stopped meanwhile)."""
    recv_slot = f"recv_{prefix}"
    start = current_lsn(s.database_url)
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (recv_slot,))
    end = _write(s, rows, transactions, prefix)
    recv_seconds = recvlogical(s, recv_slot, end)
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (recv_slot,))

    reset_slot_stats(s.database_url, SLOT)
    client = redis.Redis.from_url(s.redis_url)
    daemon = DaemonProcess(s).start().wait_ready(poll=0.005)
    cpu_ready = cpu_seconds(daemon.pid)
    tenth = start + (end - start) // 10
    steady_from = None
    while True:
        at = _checkpoint(client)
        now = time.monotonic()
        if steady_from is None and at >= tenth:
            steady_from = now
        if at >= end:
            done = now
            break
        time.sleep(0.005)
    cpu = cpu_seconds(daemon.pid) - cpu_ready
    peak = status_kib(daemon.pid, "VmHWM") / 1024
    daemon.stop()
    stats = slot_stats(s.database_url, SLOT)
    assert steady_from is not None
    recv_rate = rows / recv_seconds
    from_start = rows / (done - daemon.started_at)
    from_ready = rows / (done - daemon.ready_at)
    # One transaction moves the checkpoint once, at its end: no steady state to see.
    steady = 0.9 * rows / max(done - steady_from, 1e-6) if transactions > 1 else from_ready
    return {
        "rows": rows,
        "transactions": transactions,
        "recvlogical_rows_per_s": recv_rate,
        "daemon_rows_per_s_from_start": from_start,
        "daemon_rows_per_s_from_ready": from_ready,
        "daemon_rows_per_s_steady": steady,
        "ratio_from_start": from_start / recv_rate,
        "ratio_from_ready": from_ready / recv_rate,
        "ratio_steady": steady / recv_rate,
        "daemon_cpu_us_per_row": cpu / rows * 1e6,
        "daemon_peak_rss_mb": peak,
        "server_spill_bytes": stats["spill_bytes"],
        "server_stream_bytes": stats["stream_bytes"],
    }


def live_case(s: Stack, rows: int, prefix: str) -> dict[str, Any]:
    """One transaction written while the daemon streams; COMMIT to its last row in Redis."""
    daemon = DaemonProcess(s).start().wait_ready()
    settle(s, daemon)
    reset_slot_stats(s.database_url, SLOT)
    client = redis.Redis.from_url(s.redis_url)
    baseline = status_kib(daemon.pid, "VmRSS") / 1024
    last = f"ticket:{{{prefix}{rows}}}"
    try:
        started = time.monotonic()
        with psycopg.connect(s.database_url) as conn:
            conn.execute(FILL, {"prefix": prefix, "first": 1, "last": rows})
            written = time.monotonic()
            committing = time.monotonic()
            conn.commit()
        committed = time.monotonic()
        while not client.exists(last):
            time.sleep(0.001)
        visible = time.monotonic()
        peak = status_kib(daemon.pid, "VmHWM") / 1024
        keys = sum(1 for _ in client.scan_iter(f"ticket:{{{prefix}*", count=10_000))
    finally:
        daemon.stop()
    stats = slot_stats(s.database_url, SLOT)
    return {
        "rows": rows,
        "write_seconds": written - started,
        "commit_seconds": committed - committing,
        "commit_to_visible_s": visible - committing,
        "daemon_rss_ready_mb": baseline,
        "daemon_peak_rss_mb": peak,
        "server_spill_bytes": stats["spill_bytes"],
        "server_stream_bytes": stats["stream_bytes"],
        "rows_in_redis": keys,
    }


def run(s: Stack) -> dict[str, Any]:
    """Every drain figure, one after another on the same servers."""
    results: dict[str, Any] = {}
    catch_up(s)
    results["backlog_100"] = backlog_case(s, int(200_000 * SCALE), int(2000 * SCALE), "many")
    for rows, name in ((int(200_000 * SCALE), "one_200k"), (int(1_000_000 * SCALE), "one_1m")):
        catch_up(s)
        results[name] = backlog_case(s, rows, 1, f"b{name}")
        results[name + "_live"] = live_case(s, rows, f"l{name}")
    return results
