"""Daemon peak resident memory while it applies one 1,000,000-row transaction (<= 150 MB).

The daemon is started and ready first (its baseline is printed), then one transaction
inserts 1,000,000 tickets while the daemon streams it. The figure is the kernel's own
high-water mark of the daemon's resident set (``VmHWM`` in ``/proc/<pid>/status``),
read once Redis' checkpoint has passed the transaction; ``VmRSS`` is also sampled every
50 ms to show when the peak happened. Every row must be in Redis at the end.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import redis

from bench.common import DaemonProcess, current_lsn, row, stack, wait_checkpoint
from bench.drain import FILL
from schema.keys import TICKETS

ROWS = 1_000_000
TARGET_MB = 150.0


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def main() -> list[str]:
    with stack() as s:
        daemon = DaemonProcess(s).start().wait_ready()
        try:
            pid = daemon.pid
            baseline = _status_kib(pid, "VmRSS") / 1024
            samples: list[tuple[float, float]] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append((time.monotonic(), _status_kib(pid, "VmRSS") / 1024))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            with psycopg.connect(s.database_url, autocommit=True) as conn:
                conn.execute(FILL, {"prefix": "m", "first": 1, "last": ROWS})
            committed = time.monotonic()
            done = wait_checkpoint(s.redis_url, current_lsn(s.database_url), timeout=1800)
            stop.set()
            sampler.join()
            peak = _status_kib(pid, "VmHWM") / 1024
            keys = sum(
                1
                for _ in redis.Redis.from_url(s.redis_url).scan_iter(
                    TICKETS.key_prefix + "m*", count=10_000
                )
            )
        finally:
            daemon.stop()
    peak_at = max(samples, key=lambda s: s[1])[0] - started if samples else float("nan")
    return [
        row(
            "memory: daemon resident set when ready", f"{baseline:.1f} MB", "(for reference)", None
        ),
        row(
            f"memory: daemon peak RSS, one {ROWS:,}-row transaction",
            f"{peak:.1f} MB",
            f"<= {TARGET_MB:g} MB",
            peak <= TARGET_MB and keys == ROWS,
        ),
        row(
            "  insert / applied after commit / peak at",
            f"{committed - started:.1f}/{done - committed:.1f}/{peak_at:.1f} s",
            "(for reference)",
            None,
        ),
        row("  rows in Redis", f"{keys:,} of {ROWS:,}", "all", keys == ROWS),
    ]


if __name__ == "__main__":
    print("\n".join(main()))
