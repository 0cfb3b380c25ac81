"""Recipe for ``pgoutput_capture.json``: real pgoutput payloads for the decoder's unit tests.

Run against a PostgreSQL 15 server with ``wal_level=logical`` (superuser URL, any db)::

    python -m tests.data.capture_pgoutput postgresql://postgres:…@127.0.0.1:5432/postgres

It creates a scratch database, makes every kind of change, and records what a protocol 1
slot and a protocol 2 (streaming) slot send.
"""

from __future__ import annotations

import json
import select
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

OUT = Path(__file__).with_name("pgoutput_capture.json")


def capture(url: str, slot: str, opts: str, options: str = "") -> list[tuple[bool, bytes]]:
    """(inside a stream block, payload) for every XLogData until the slot goes quiet."""
    conn = psycopg.connect(url, replication="database", autocommit=True, options=options)
    conn.execute(f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({opts})")
    pgconn = conn.pgconn
    pgconn.nonblocking = 1
    out: list[tuple[bool, bytes]] = []
    in_stream = False
    last = time.monotonic()
    while time.monotonic() - last < 1.5:
        n, buf = pgconn.get_copy_data(1)
        if n == 0:
            select.select([pgconn.socket], [], [], 0.2)
            pgconn.consume_input()
            continue
        data = bytes(buf)
        if data[0] == 0x77:
            payload = data[25:]
            if payload[:1] == b"S":
                in_stream = True
            out.append((in_stream and payload[:1] not in (b"S", b"E"), payload))
            if payload[:1] == b"E":
                in_stream = False
            last = time.monotonic()
    conn.close()
    return out


def main(admin_url: str) -> None:
    parts = urlsplit(admin_url)
    url = urlunsplit(parts._replace(path="/cdc_capture"))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS cdc_capture WITH (FORCE)")
        admin.execute("CREATE DATABASE cdc_capture")
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE t (id text PRIMARY KEY, n int, big text, flag bool, j jsonb)")
        c.execute("CREATE TABLE u (id int PRIMARY KEY, v text)")
        c.execute("CREATE PUBLICATION p FOR TABLE t, u")
        for slot in ("cap1", "cap2"):
            c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        row = c.execute(
            "SELECT string_agg(md5(g::text), '') FROM generate_series(1, 200) g"
        ).fetchone()
        assert row is not None
        big = str(row[0])
        c.execute("INSERT INTO t VALUES ('a', 1, %s, true, '{\"k\": [1, 2.50]}')", (big,))
        c.execute("UPDATE t SET n = 2 WHERE id = 'a'")  # big unchanged: 'u'
        c.execute("UPDATE t SET id = 'b' WHERE id = 'a'")  # primary key change: 'K'
        c.execute("INSERT INTO u VALUES (1, NULL)")
        c.execute("DELETE FROM t WHERE id = 'b'")
        c.execute("TRUNCATE t, u")
        c.execute("SELECT pg_logical_emit_message(true, 'cdc-test', 'hello')")
        c.execute("INSERT INTO u SELECT g, repeat('x', 100) FROM generate_series(2, 3000) g")
        c.execute("BEGIN")
        c.execute("INSERT INTO u SELECT g, 'z' FROM generate_series(9000, 11000) g")
        c.execute("ROLLBACK")
    v1 = capture(url, "cap1", "proto_version '1', publication_names 'p', messages 'true'")
    v2 = capture(
        url,
        "cap2",
        "proto_version '2', publication_names 'p', messages 'true', streaming 'on'",
        "-c logical_decoding_work_mem=64kB",
    )
    samples: list[list[object]] = []
    per_kind: dict[tuple[bool, int], int] = {}
    for in_stream, payload in v2:
        kind = (in_stream, payload[0])
        if per_kind.get(kind, 0) < 3:
            per_kind[kind] = per_kind.get(kind, 0) + 1
            samples.append([in_stream, payload.hex()])
    fixture = {
        "about": "pgoutput payloads from PostgreSQL 15; recipe: tests/data/capture_pgoutput.py",
        "v1_first_transactions": [payload.hex() for _, payload in v1[:24]],
        "v2_samples": samples,
        "big_value": big,
    }
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'cdc_capture'"
        )
        admin.execute("DROP DATABASE cdc_capture")


if __name__ == "__main__":
    main(sys.argv[1])
