"""Draining a 200,000-row backlog into Redis versus ``pg_recvlogical`` to /dev/null.

Two slots are created at the same position (the daemon's by its first start, then one
for pg_recvlogical), the backlog is written while neither runs, then each drains it in
turn, on the same machine, in the same run. The daemon's time runs from when it starts
streaming (its "streaming" log event) to when Redis' checkpoint passes the end of the
backlog; pg_recvlogical's is its whole run with ``--endpos``. Target: daemon rate >=
0.8x pg_recvlogical's.

Two shapes of backlog: 2,000 transactions of 100 rows, and one 200,000-row transaction.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime

import psycopg

from bench.common import DaemonProcess, Stack, current_lsn, row, stack, wait_checkpoint
from devstack.servers import postgres_bin_dir

ROWS = 200_000

FILL = """
INSERT INTO tickets (id, title, description, status, priority, ticket_type, channel, customer, tags)
SELECT %(prefix)s::text || g, 'Order #' || g || ' arrived damaged',
       repeat('The customer wrote in. ', 4),
       'open', 'high', 'after_sale', 'email',
       jsonb_build_object('name', 'Customer ' || g, 'email', 'c' || g || '@example.com'),
       '["shipping", "damage"]'
FROM generate_series(%(first)s::int, %(last)s::int) g
"""


def _backlog(s: Stack, transactions: int, prefix: str) -> int:
    per = ROWS // transactions
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        for t in range(transactions):
            conn.execute(FILL, {"prefix": prefix, "first": t * per + 1, "last": (t + 1) * per})
    return current_lsn(s.database_url)


def _streaming_started(daemon: DaemonProcess, since: float) -> float:
    """Monotonic time of the daemon's last "streaming" event (from its log timestamps)."""
    wall_now, mono_now = time.time(), time.monotonic()
    for line in reversed(daemon.log_path.read_text().splitlines()):
        if '"streaming"' in line:
            event = json.loads(line)
            wall = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            return mono_now - (wall_now - wall)
    return since


def drain_case(s: Stack, transactions: int, prefix: str) -> dict[str, float]:
    recv_slot = f"recv_{prefix}"
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (recv_slot,))
    end = _backlog(s, transactions, prefix)
    end_text = f"{end >> 32:X}/{end & 0xFFFFFFFF:X}"

    recvlogical = shutil.which("pg_recvlogical") or str(postgres_bin_dir() / "pg_recvlogical")
    started = time.monotonic()
    subprocess.run(
        [
            recvlogical,
            "-d",
            s.database_url,
            "--slot",
            recv_slot,
            "--start",
            "--endpos",
            end_text,
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=cdc_cache",
            "-f",
            "/dev/null",
            "--no-loop",
        ],
        check=True,
        capture_output=True,
    )
    recv_seconds = time.monotonic() - started

    daemon = DaemonProcess(s).start()
    launched = time.monotonic()
    done = wait_checkpoint(s.redis_url, end)
    streaming = _streaming_started(daemon, launched)
    daemon.stop()
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (recv_slot,))
    return {
        "recv_seconds": recv_seconds,
        "daemon_seconds": done - streaming,
        "daemon_with_startup": done - launched,
    }


def main() -> list[str]:
    lines = []
    with stack() as s:
        first = DaemonProcess(s).start().wait_ready()  # creates the slot, loads an empty snapshot
        first.stop()
        for label, transactions, prefix in (
            ("2,000 transactions of 100 rows", 2000, "many"),
            ("one 200,000-row transaction", 1, "one"),
        ):
            result = drain_case(s, transactions, prefix)
            ratio = result["recv_seconds"] / result["daemon_seconds"]
            lines += [
                row(
                    f"drain {label}: pg_recvlogical to /dev/null",
                    f"{ROWS / result['recv_seconds']:,.0f} rows/s",
                    "",
                    None,
                ),
                row(
                    f"drain {label}: daemon into Redis",
                    f"{ROWS / result['daemon_seconds']:,.0f} rows/s",
                    "",
                    None,
                ),
                row(
                    f"  daemon / pg_recvlogical ({label})",
                    f"{ratio:.2f}x",
                    ">= 0.8x",
                    ratio >= 0.8,
                ),
                row(
                    "  (daemon including its process start)",
                    f"{result['recv_seconds'] / result['daemon_with_startup']:.2f}x",
                    "(for reference)",
                    None,
                ),
            ]
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
