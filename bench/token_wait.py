"""Token-to-visible: from a write's return (token in hand) to the reader knowing Redis has it.

About 1,000 writes/s offered open-loop (a new write every millisecond, whatever the earlier
ones are doing) through :class:`writer.AsyncWriter`; each write then waits on its token
with :class:`writer.AsyncCacheReader`, which wakes on the daemon's ``cdc:applied`` message.
The same load is measured with the sync :class:`writer.CacheReader` (one thread per
writer, paced), and, as the baseline, with the polling wait the reader used before
(``HGET cdc:state lsn`` every 1 ms, backing off to 50 ms).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import redis

from bench.common import DaemonProcess, percentile, row, stack
from schema.lsn import parse_lsn
from writer import AsyncCacheReader, AsyncWriter, CacheReader, Writer

RATE = 1000  # writes per second offered
SECONDS = 8
WARMUP = 1.0


async def _async_pass(database_url: str, redis_url: str) -> list[float]:
    samples: list[float] = []
    async with (
        await AsyncWriter.connect(database_url, pool_size=8, max_overflow=8) as writer,
        AsyncCacheReader.connect(redis_url) as reader,
    ):
        await reader.wait((await writer.create_ticket({"title": "warm"})).token, 10)

        async def one(n: int, record: bool) -> None:
            written = await writer.create_ticket({"title": f"t{n}"})
            started = time.perf_counter()
            if not await reader.wait(written.token, timeout=5):
                raise RuntimeError("a token was not visible within 5 s")
            if record:
                samples.append(time.perf_counter() - started)

        tasks: list[asyncio.Task[None]] = []
        begin = time.perf_counter()
        total = int(RATE * (SECONDS + WARMUP))
        for n in range(total):
            due = begin + n / RATE
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n, n >= RATE * WARMUP)))
        await asyncio.gather(*tasks)
        achieved = total / (time.perf_counter() - begin)
        print(f"  async: offered {RATE}/s, achieved {achieved:.0f}/s")
    return samples


def _poll_wait(client: redis.Redis, token: str, timeout: float) -> bool:
    target = parse_lsn(token)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = client.hget("cdc:state", "lsn")
        if value and parse_lsn(value) >= target:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _threaded_pass(database_url: str, redis_url: str, polling: bool) -> list[float]:
    """Four threads, each paced at RATE/4 writes/s: write, then wait on the token."""
    samples: list[float] = []
    lock = threading.Lock()
    threads_n = 4
    with Writer.connect(database_url, pool_size=threads_n, max_overflow=0) as writer:
        reader = CacheReader.connect(redis_url)
        client = redis.Redis.from_url(redis_url)
        reader.wait(writer.create_ticket({"title": "warm"}).token, 10)

        def work(k: int) -> None:
            per = RATE / threads_n
            begin = time.perf_counter()
            for n in range(int(per * (SECONDS + WARMUP))):
                due = begin + n / per
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                written = writer.create_ticket({"title": f"s{k}-{n}"})
                started = time.perf_counter()
                ok = (
                    _poll_wait(client, written.token, 5)
                    if polling
                    else reader.wait(written.token, timeout=5)
                )
                if not ok:
                    raise RuntimeError("a token was not visible within 5 s")
                if n >= per * WARMUP:
                    with lock:
                        samples.append(time.perf_counter() - started)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reader.close()
        client.close()
    return samples


def measure() -> dict[str, list[float]]:
    with stack() as s:
        daemon = DaemonProcess(s).start().wait_ready()
        try:
            results: dict[str, Any] = {}
            results["async"] = asyncio.run(_async_pass(s.database_url, s.redis_url))
            results["sync"] = _threaded_pass(s.database_url, s.redis_url, polling=False)
            results["poll"] = _threaded_pass(s.database_url, s.redis_url, polling=True)
            return results
        finally:
            daemon.stop()


def main() -> list[str]:
    results = measure()
    lines = []
    labels = {
        "async": "token-to-visible, AsyncCacheReader (cdc:applied)",
        "sync": "token-to-visible, CacheReader, 4 threads (cdc:applied)",
        "poll": "the same with the old polling wait (1-50 ms back-off)",
    }
    for name, label in labels.items():
        values = results[name]
        p50, p99 = percentile(values, 50) * 1e3, percentile(values, 99) * 1e3
        lines.append(
            row(
                f"{label}, {RATE}/s",
                f"p50 {p50:.2f} ms p99 {p99:.2f} ms",
                f"n={len(values)}",
                None,
            )
        )
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
