"""Backfill windows against a real PostgreSQL: what a window may write, and when it opens."""

from __future__ import annotations

import hiredis
import psycopg

from cdc.runtime.backfill import Backfill
from cdc.transform.plan import CommandBatch, Planner
from schema.keys import TICKETS

Conn = psycopg.Connection[tuple[object, ...]]


def _insert(pg: Conn, *ids: str) -> None:
    for ticket_id in ids:
        pg.execute(
            "INSERT INTO tickets (id, title, customer) VALUES (%s, 'title', '{}')", (ticket_id,)
        )


def _written_keys(batch: CommandBatch) -> set[bytes]:
    reader = hiredis.Reader()
    reader.feed(bytes(batch.buf))
    items = []
    while (item := reader.gets()) is not False:
        items.append(item)
    keys, at = set(), 0
    while at < len(items):  # operations: code, n, n arguments
        if items[at] in (b"h", b"r"):
            keys.add(items[at + 2])
        at += 2 + int(items[at + 1])
    return keys


def _xid32(conn: Conn) -> int:
    row = conn.execute("SELECT txid_current()").fetchone()
    assert row is not None
    return int(str(row[0])) & 0xFFFFFFFF


def test_rows_changed_by_unseen_transactions_are_left_to_the_stream(
    pg: Conn, database_url: str
) -> None:
    _insert(pg, "t1", "t2", "t3")
    backfill = Backfill(Planner(1 << 20), chunk=100)
    backfill.request_table(TICKETS, "test")
    with psycopg.connect(database_url, autocommit=True) as reader:
        window = backfill.open(reader)
    assert window is not None
    assert set(window.rows) == {b"t1", b"t2", b"t3"}
    # A transaction committed after the window's snapshot changes t2.
    with pg.transaction():
        xid = _xid32(pg)
        pg.execute("UPDATE tickets SET title = 'newer' WHERE id = 't2'")
    assert not window.snapshot.sees(xid)
    backfill.dirty([b"t2"])
    assert not backfill.ready(window.high_water - 1)
    assert backfill.ready(window.high_water)
    batch = CommandBatch()
    backfill.flush(batch)
    assert _written_keys(batch) == {b"ticket:{t1}", b"ticket:{t3}"}
    assert backfill.stats.rows_dirty == 1
    assert not backfill.busy  # one chunk held the whole table


def test_a_window_waits_for_applied_transactions_its_snapshot_cannot_see(
    pg: Conn, database_url: str
) -> None:
    """The stream can deliver a commit before snapshots see it: the window must not open."""
    _insert(pg, "t1")
    backfill = Backfill(Planner(1 << 20), chunk=100)
    backfill.request_rows(TICKETS, ["t1", "gone"], "test")
    with psycopg.connect(database_url) as other:
        # Still running: invisible to any snapshot taken now, as a just-streamed commit
        # can be for a moment.
        xid = _xid32(other)
        other.execute("UPDATE tickets SET title = 'streamed' WHERE id = 't1'")
        backfill.recent.add(xid, {"tickets"})
        assert backfill.open(pg) is None
        assert backfill.stats.retries == 1
        assert backfill.queue[0].ids == {"t1", "gone"}  # nothing was given up
        other.commit()
    window = backfill.open(pg)
    assert window is not None
    title = window.view.column_names.index("title")
    assert window.rows[b"t1"][title] == b"streamed"
    assert window.missing == {b"gone"}  # requested but absent: its key is deleted


def test_a_refused_id_drops_only_itself_and_a_tag_waits_for_the_rest(
    pg: Conn, database_url: str
) -> None:
    """One id PostgreSQL cannot take (a NUL byte) among a slot repair's: only it is
    dropped; the others are written, and the repair's tag is pending until they are."""
    _insert(pg, "t1", "t3")
    backfill = Backfill(Planner(1 << 20), chunk=100)
    backfill.request_rows(TICKETS, ["t1", "bad\x00", "t3"], "test", "slot-repair")
    written: set[bytes] = set()
    with psycopg.connect(database_url, autocommit=True) as reader:
        for _ in range(20):
            if backfill.open(reader) is None:
                continue
            assert backfill.pending("slot-repair")
            batch = CommandBatch()
            backfill.flush(batch)
            written |= _written_keys(batch)
            if not backfill.busy:
                break
    assert written == {b"ticket:{t1}", b"ticket:{t3}"}
    assert not backfill.pending("slot-repair")


def test_a_refused_id_among_many_is_found_by_halving(pg: Conn, database_url: str) -> None:
    """One bad id in a chunk of 512: the chunk is halved until only it is left, so the
    others are written in a few queries (one query per id would take over 500)."""
    ids = [f"t{i:03}" for i in range(511)]
    _insert(pg, *ids)
    backfill = Backfill(Planner(1 << 20), chunk=512)
    backfill.request_rows(TICKETS, [*ids[:200], "bad\x00", *ids[200:]], "test", "slot-repair")
    written: set[bytes] = set()
    queries = 0
    with psycopg.connect(database_url, autocommit=True) as reader:
        while backfill.busy and queries < 600:
            queries += 1
            if backfill.open(reader) is None:
                continue
            batch = CommandBatch()
            backfill.flush(batch)
            written |= _written_keys(batch)
    assert written == {f"ticket:{{{i}}}".encode() for i in ids}
    assert not backfill.pending("slot-repair")
    print(f"one refused id among 512: {queries} queries")
    assert queries <= 2 * 10 + 2, queries


def test_a_window_abandoned_for_a_schema_change_keeps_its_ids_requested(
    pg: Conn, database_url: str
) -> None:
    _insert(pg, "t1", "t2")
    backfill = Backfill(Planner(1 << 20), chunk=100)
    backfill.request_rows(TICKETS, ["t1", "t2", "gone"], "test", "slot-repair")
    with psycopg.connect(database_url, autocommit=True) as reader:
        assert backfill.open(reader) is not None
        backfill.schema_changed(TICKETS)
        assert backfill.pending("slot-repair")
        window = backfill.open(reader)
    assert window is not None
    assert set(window.rows) == {b"t1", b"t2"}
    assert window.missing == {b"gone"}
