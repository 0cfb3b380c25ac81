"""``AsyncWriter.create_ticket`` versus a raw async psycopg INSERT of the same row.

The async twin of :mod:`bench.writer_bench` (target <= 1.25x): median over 2,000 calls
each, interleaved in blocks of 100. The raw INSERT runs on one ``psycopg.AsyncConnection``
(the same columns, values and server defaults, one transaction, committed); the writer
runs on its async pool of one connection, audit-log row included (and without, for
reference).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import psycopg
from psycopg.types.json import Jsonb

from bench.common import median, row, stack
from bench.writer_bench import BLOCK, CALLS, RAW_SQL, TICKET
from writer import AsyncWriter


async def _measure(url: str) -> dict[str, float]:
    raw = await psycopg.AsyncConnection.connect(url)
    writer = await AsyncWriter.connect(url, pool_size=1, max_overflow=0)
    quiet = AsyncWriter(writer.database, audit=False)

    async def raw_insert() -> None:
        await raw.execute(
            RAW_SQL,
            (
                str(uuid.uuid4()),
                TICKET["title"],
                TICKET["description"],
                TICKET["priority"],
                TICKET["ticket_type"],
                TICKET["channel"],
                Jsonb(TICKET["customer"]),
                Jsonb(TICKET["tags"]),
            ),
        )
        await raw.commit()

    async def with_audit() -> None:
        await writer.create_ticket(TICKET)

    async def without_audit() -> None:
        await quiet.create_ticket(TICKET)

    calls: dict[str, Callable[[], Awaitable[None]]] = {
        "raw": raw_insert,
        "writer": with_audit,
        "writer_no_audit": without_audit,
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():  # warm up: prepared statements, pool, caches
        for _ in range(50):
            await fn()
    for _ in range(CALLS // BLOCK):
        for name, fn in calls.items():
            for _ in range(BLOCK):
                started = time.perf_counter()
                await fn()
                times[name].append(time.perf_counter() - started)
    await raw.close()
    await writer.close()
    return {name: median(values) for name, values in times.items()}


def measure() -> dict[str, float]:
    with stack() as s:
        return asyncio.run(_measure(s.database_url))


def main() -> list[str]:
    result = measure()
    ratio = result["writer"] / result["raw"]
    return [
        row(
            "AsyncWriter create_ticket (median of 2,000)",
            f"{result['writer'] * 1e6:.0f} us",
            "",
            None,
        ),
        row(
            "AsyncWriter create_ticket without the audit log",
            f"{result['writer_no_audit'] * 1e6:.0f} us",
            "",
            None,
        ),
        row("raw async psycopg INSERT + COMMIT", f"{result['raw'] * 1e6:.0f} us", "", None),
        row("AsyncWriter / raw async INSERT", f"{ratio:.2f}x", "<= 1.25x", ratio <= 1.25),
    ]


if __name__ == "__main__":
    print("\n".join(main()))
