"""Hot-standby takeover: ``kill -9`` of the active daemon until the standby serves.

An active daemon and a standby (``CDC_STANDBY=true``) run on one slot. Each run writes a
row, waits until it is in Redis, kills the active daemon with SIGKILL and, at once, writes
another row; it then measures, from the kill, when the standby's ``/readyz`` answers 200
and when that row is in Redis. The standby becomes the active daemon of the next run and
a new standby is started. Prints each run and the median.

Run: ``PYTHONPATH=. .venv/bin/python -m bench.takeover [runs] [--cluster]``; with
``--cluster`` Redis is a 3-primary Redis Cluster on loopback (tests/cluster.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import sys
import time
import urllib.request

import psycopg
import redis

from bench.common import DaemonProcess, Stack, stack
from schema.redis_url import redis_client


def ready(daemon: DaemonProcess) -> bool:
    with contextlib.suppress(OSError):
        url = f"http://127.0.0.1:{daemon.metrics_port}/readyz"
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    return False


def wait_standing_by(daemon: DaemonProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "standby: waiting for the slot" in daemon.log_path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise TimeoutError("the standby did not start waiting")


def write(conn: psycopg.Connection[tuple[object, ...]], row: str) -> None:
    conn.execute(
        "INSERT INTO tickets (id, title) VALUES (%s, 'x')"
        " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title",
        (row,),
    )


def visible(client: redis.Redis | redis.RedisCluster, row: str) -> bool:
    return bool(client.exists("ticket:{" + row + "}"))


def run(s: Stack, runs: int) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    client = redis_client(s.redis_url)
    conn = psycopg.connect(s.database_url, autocommit=True)
    env = {"CDC_STANDBY": "true", "CDC_RETRY_MAX": "1"}
    active = DaemonProcess(s, "cdc_cache", **env).start().wait_ready()
    for n in range(runs):
        standby = DaemonProcess(s, "cdc_cache", **env)
        standby.log_path = s.directory / f"daemon-{n}.log"
        standby.start()
        wait_standing_by(standby)
        write(conn, f"before{n}")
        while not visible(client, f"before{n}"):
            time.sleep(0.005)
        killed = time.monotonic()
        os.kill(active.pid, signal.SIGKILL)
        write(conn, f"after{n}")
        ready_at = seen_at = 0.0
        deadline = killed + 60
        while (not ready_at or not seen_at) and time.monotonic() < deadline:
            now = time.monotonic()
            if not ready_at and ready(standby):
                ready_at = now
            if not seen_at and visible(client, f"after{n}"):
                seen_at = now
            time.sleep(0.005)
        assert active.proc is not None
        active.proc.wait(10)
        out.append((ready_at - killed, seen_at - killed))
        print(
            f"run {n + 1}: ready {ready_at - killed:.3f} s, write visible {seen_at - killed:.3f} s",
            flush=True,
        )
        active = standby
    active.stop()
    conn.close()
    client.close()
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    runs = int(args[0]) if args else 5
    with stack() as s:
        if "--cluster" in sys.argv:
            from tests.cluster import RedisCluster

            cluster = RedisCluster(s.directory / "cluster").start()
            try:
                results = run(dataclasses.replace(s, redis_url=cluster.url), runs)
            finally:
                cluster.stop()
        else:
            results = run(s, runs)
    print(
        f"median of {runs}: ready {statistics.median(r for r, _ in results):.3f} s,"
        f" write visible {statistics.median(v for _, v in results):.3f} s"
    )


if __name__ == "__main__":
    main()
