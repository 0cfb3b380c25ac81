"""``writer`` ticket create versus a raw psycopg INSERT of the same row (target <= 1.25x),
and versus the seeds' dual write (INSERT + COMMIT, then a Redis SET of the row as JSON).

Median over 2,000 calls each, interleaved in blocks of 100 so all see the same machine.
The raw INSERT is what a service would write by hand: the same columns and values, the
same server defaults (ticket number, timestamps), one transaction, committed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from bench.common import Stack, median, row, stack
from writer import Writer

CALLS = 2000
BLOCK = 100

TICKET: dict[str, Any] = {
    "title": "Order #1042 arrived damaged",
    "description": "The customer sent photos of the box. " * 5,
    "priority": "high",
    "ticket_type": "after_sale",
    "channel": "email",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "vip": False},
    "tags": ["shipping", "damage"],
}

RAW_SQL = (
    "INSERT INTO tickets (id, title, description, status, priority, ticket_type, channel,"
    " customer, tags, extra_data) VALUES (%s, %s, %s, 'open', %s, %s, %s, %s, %s, '{}')"
)


def measure(s: Stack) -> dict[str, float]:
    """Median seconds per call of each way to write a ticket."""
    raw = psycopg.connect(s.database_url)
    cache = redis.Redis.from_url(s.redis_url)
    writer = Writer.connect(s.database_url, max_size=1)
    quiet = Writer(writer.database, audit=False)
    times: dict[str, list[float]] = {
        "raw": [],
        "dual": [],
        "writer": [],
        "writer_no_audit": [],
    }

    def raw_insert() -> str:
        ticket_id = str(uuid.uuid4())
        raw.execute(
            RAW_SQL,
            (
                ticket_id,
                TICKET["title"],
                TICKET["description"],
                TICKET["priority"],
                TICKET["ticket_type"],
                TICKET["channel"],
                Jsonb(TICKET["customer"]),
                Jsonb(TICKET["tags"]),
            ),
        )
        raw.commit()
        return ticket_id

    def dual_write() -> None:
        # The seeds' way: PostgreSQL first, then the cache (two writes that can diverge).
        ticket_id = raw_insert()
        cache.set(f"bench:dual:{ticket_id}", json.dumps({"id": ticket_id, **TICKET}))

    calls: dict[str, Callable[[], object]] = {
        "raw": raw_insert,
        "dual": dual_write,
        "writer": lambda: writer.create_ticket(TICKET),
        "writer_no_audit": lambda: quiet.create_ticket(TICKET),
    }
    for fn in calls.values():  # warm up: prepared statements, pool, caches
        for _ in range(50):
            fn()
    for _ in range(CALLS // BLOCK):
        for name, fn in calls.items():
            for _ in range(BLOCK):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    raw.close()
    writer.close()
    for key in cache.scan_iter("bench:dual:*", count=1000):
        cache.delete(key)
    cache.close()
    return {name: median(values) for name, values in times.items()}


def main() -> list[str]:
    with stack() as s:
        result = measure(s)
    ratio = result["writer"] / result["raw"]
    return [
        row(
            "writer create_ticket (median of 2,000, with audit log)",
            f"{result['writer'] * 1e6:.0f} us",
            "",
            None,
        ),
        row(
            "writer create_ticket without the audit log",
            f"{result['writer_no_audit'] * 1e6:.0f} us",
            "",
            None,
        ),
        row(
            "raw psycopg INSERT + COMMIT of the same row", f"{result['raw'] * 1e6:.0f} us", "", None
        ),
        row("writer / raw INSERT", f"{ratio:.2f}x", "<= 1.25x", ratio <= 1.25),
        row(
            "writer / dual write (INSERT + COMMIT, then Redis SET)",
            f"{result['writer'] / result['dual']:.2f}x",
            "(for reference)",
            None,
        ),
        row(
            "writer without audit / raw INSERT",
            f"{result['writer_no_audit'] / result['raw']:.2f}x",
            "(for reference)",
            None,
        ),
    ]


if __name__ == "__main__":
    print("\n".join(main()))
