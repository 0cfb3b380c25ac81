"""Reading tracked rows with SQL, as the text PostgreSQL prints for each column.

Snapshots, backfills and ``cdc verify`` all read rows this way: every column cast to
``text`` in a session with the same settings as the replication connection, and handed
over as ``bytes`` (a custom loader skips decoding), so a row read here and the same row
streamed by pgoutput produce identical Redis hashes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.adapt import Loader

from schema.keys import TrackedTable

Conn = psycopg.Connection[tuple[object, ...]]
Row = tuple[bytes | None, ...]


class _RawText(Loader):
    """text -> bytes, without decoding (the bytes go to Redis as they are)."""

    def load(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(data)


def raw_text_cursor(conn: Conn, name: str | None = None) -> psycopg.Cursor[tuple[object, ...]]:
    cur = conn.cursor(name=name) if name else conn.cursor()
    cur.adapters.register_loader("text", _RawText)
    return cur


def _select(table: TrackedTable, columns: Sequence[str]) -> sql.Composed:
    cols = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)
    return sql.SQL("SELECT {} FROM {}.{}").format(
        cols, sql.Identifier(table.schema), sql.Identifier(table.name)
    )


def iter_rows(
    conn: Conn, table: TrackedTable, columns: Sequence[str], chunk: int
) -> Iterator[list[Row]]:
    """Every row of ``table``, in chunks, through a server-side cursor (bounded memory).

    Must run inside a transaction (the caller's snapshot)."""
    with raw_text_cursor(conn, name=f"cdc_read_{table.name}") as cur:
        cur.execute(_select(table, columns))
        while True:
            rows = cur.fetchmany(chunk)
            if not rows:
                return
            yield rows  # type: ignore[misc]


def rows_after(
    conn: Conn, table: TrackedTable, columns: Sequence[str], after: str | None, limit: int
) -> list[Row]:
    """Up to ``limit`` rows with primary key greater than ``after``, in key order."""
    pk = sql.Identifier(table.primary_key)
    query = _select(table, columns)
    if after is not None:
        query = sql.SQL("{} WHERE {} > %s").format(query, pk)
    query = sql.SQL("{} ORDER BY {} LIMIT {}").format(query, pk, sql.Literal(limit))
    with raw_text_cursor(conn) as cur:
        cur.execute(query, (after,) if after is not None else None)
        return cur.fetchall()  # type: ignore[return-value]


def rows_by_id(
    conn: Conn, table: TrackedTable, columns: Sequence[str], ids: Sequence[str]
) -> list[Row]:
    """The rows whose primary key (as text) is one of ``ids``."""
    query = sql.SQL("{} WHERE {}::text = ANY(%s)").format(
        _select(table, columns), sql.Identifier(table.primary_key)
    )
    with raw_text_cursor(conn) as cur:
        cur.execute(query, (list(ids),))
        return cur.fetchall()  # type: ignore[return-value]


def existing_ids(conn: Conn, table: TrackedTable, ids: Sequence[str]) -> set[str]:
    query = sql.SQL("SELECT {}::text FROM {}.{} WHERE {}::text = ANY(%s)").format(
        sql.Identifier(table.primary_key),
        sql.Identifier(table.schema),
        sql.Identifier(table.name),
        sql.Identifier(table.primary_key),
    )
    rows = conn.execute(query, (list(ids),)).fetchall()
    return {str(r[0]) for r in rows}
