"""One write and its read-your-writes token in a single round trip (libpq pipeline mode).

A write is one autocommit statement; its token is ``pg_current_wal_flush_lsn()`` read
*after* it committed. Sent separately that is two round trips; psycopg's high-level
pipeline adds more than it saves here (measured). So this module drives libpq's
pipeline directly through psycopg's public ``conn.pgconn`` and ``Transformer``::

    [PREPARE] EXECUTE stmt, SYNC, token query, SYNC      -> one write, one wait

The SYNC between them ends the statement's implicit transaction, so it commits before
the token query runs. The exchange is a generator that yields what it waits for (psycopg's
own style), so the sync and the async writer run the same code: ``conn.wait(gen)``.
Statements are converted once from ``%(name)s`` to ``$n`` and prepared once per
connection; parameters go as text, their types inferred by the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
import psycopg
from psycopg import errors as pgerrors
from psycopg import pq
from psycopg.abc import PQGen
from psycopg.abc import Transformer as TransformerType
from psycopg.adapt import PyFormat, Transformer
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg.waiting import Wait

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")

# After a synchronous commit returns, its commit record is flushed, so the flush position
# is at or past its end; and the walsender can always read up to the flush position (the
# insert position can sit past WAL nobody flushes for a while, so a reader could wait on
# it for nothing). With synchronous_commit=off only the insert position is past our commit.
TOKEN_SQL = b"SELECT pg_current_wal_flush_lsn()::text"
ASYNC_COMMIT_TOKEN_SQL = b"SELECT pg_current_wal_insert_lsn()::text"
SYNC_COMMIT_SQL = "SELECT current_setting('synchronous_commit')"

# The token query of each pooled connection (set when the pool opens it).
_TOKEN: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def configure(conn: psycopg.Connection[Any]) -> None:
    """Per connection: fast JSON for jsonb, the token query matching synchronous_commit."""
    set_json_dumps(orjson.dumps, conn)
    set_json_loads(orjson.loads, conn)
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(SYNC_COMMIT_SQL).fetchone()
    _TOKEN[conn] = token_sql(row[0] if row else None)


async def configure_async(conn: psycopg.AsyncConnection[Any]) -> None:
    """:func:`configure` for a connection of the async pool."""
    set_json_dumps(orjson.dumps, conn)
    set_json_loads(orjson.loads, conn)
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(SYNC_COMMIT_SQL)
        row = await cur.fetchone()
    _TOKEN[conn] = token_sql(row[0] if row else None)


def token_sql(synchronous_commit: str | None) -> bytes:
    """The position past a commit made under that ``synchronous_commit`` setting."""
    return ASYNC_COMMIT_TOKEN_SQL if synchronous_commit == "off" else TOKEN_SQL


@dataclass(frozen=True)
class Statement:
    """SQL with ``$n`` placeholders, its parameter names in order, a name to prepare it."""

    sql: bytes
    names: tuple[str, ...]
    name: bytes

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


@lru_cache(maxsize=512)
def statement(sql: str) -> Statement:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    converted = _PLACEHOLDER.sub(number, sql)
    digest = hashlib.sha1(converted.encode(), usedforsecurity=False).hexdigest()[:16]
    return Statement(converted.encode(), tuple(names), f"cdc_w_{digest}".encode())


# Statements already prepared on each connection (connections are pooled, reused).
_PREPARED: weakref.WeakKeyDictionary[Any, set[bytes]] = weakref.WeakKeyDictionary()


class SendFailed(Exception):
    """The connection was already unusable: nothing reached the server."""


@dataclass
class Outcome:
    rows: list[dict[str, Any]]
    token: str | None
    error: psycopg.Error | None


def execute_with_token(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    stmt: Statement,
    params: Mapping[str, Any],
) -> PQGen[Outcome]:
    """Run ``stmt`` (autocommit) and read the token after it, in one round trip.

    A generator in psycopg's style: it drives libpq without blocking and yields what it
    waits for (socket readable / writable); ``conn.wait(gen)`` runs it on a sync
    connection, ``await aconn.wait(gen)`` on an async one (which, if the task is
    cancelled meanwhile, cancels the query on the server before re-raising).

    Raises :class:`psycopg.OperationalError` if the connection breaks once the pipeline
    was sent (the statement may have committed), :class:`SendFailed` if it was broken
    before anything could be sent. A statement error is returned, not raised.
    """
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK or conn.closed:
        raise SendFailed("connection is closed")
    transformer = Transformer(conn)
    values = stmt.values(params)
    dumped: Sequence[Any] = transformer.dump_sequence(values, [PyFormat.TEXT] * len(values))
    prepared = _PREPARED.setdefault(conn, set())
    fresh = stmt.name not in prepared
    pgconn.enter_pipeline_mode()
    try:
        if fresh:
            pgconn.send_prepare(stmt.name, stmt.sql)
        pgconn.send_query_prepared(stmt.name, dumped, result_format=pq.Format.BINARY)
        pgconn.pipeline_sync()
        pgconn.send_query_params(_TOKEN.get(conn, TOKEN_SQL), None)
        pgconn.pipeline_sync()
        yield from _flush(pgconn)
        results = yield from _collect(pgconn, syncs=2)
    finally:
        if pgconn.status == pq.ConnStatus.OK and pgconn.pipeline_status != pq.PipelineStatus.OFF:
            with contextlib.suppress(psycopg.Error):
                pgconn.exit_pipeline_mode()
    if fresh:
        prepare_result = results.pop(0)
        if prepare_result.status != pq.ExecStatus.COMMAND_OK:
            return Outcome(
                [], None, pgerrors.error_from_result(prepare_result, encoding=conn.info.encoding)
            )
        prepared.add(stmt.name)
    result, token_result = results[0], results[-1]
    token = None
    if token_result.status == pq.ExecStatus.TUPLES_OK:
        raw = token_result.get_value(0, 0)
        token = bytes(raw).decode() if raw is not None else None
    if result.status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.PIPELINE_ABORTED):
        return Outcome([], token, pgerrors.error_from_result(result, encoding=conn.info.encoding))
    return Outcome(_rows(transformer, result), token, None)


def _flush(pgconn: pq.abc.PGconn) -> PQGen[None]:
    while pgconn.flush() == 1:
        yield Wait.RW
        pgconn.consume_input()


def _collect(pgconn: pq.abc.PGconn, syncs: int) -> PQGen[list[pq.abc.PGresult]]:
    """Every result up to the ``syncs``-th PIPELINE_SYNC (the syncs left out)."""
    results: list[pq.abc.PGresult] = []
    seen = 0
    while seen < syncs:
        while pgconn.is_busy():
            yield Wait.R
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            if pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError("the connection was lost")
            continue
        if result.status == pq.ExecStatus.PIPELINE_SYNC:
            seen += 1
        else:
            results.append(result)
    return results


def _rows(transformer: TransformerType, result: pq.abc.PGresult) -> list[dict[str, Any]]:
    if result.status != pq.ExecStatus.TUPLES_OK:
        return []
    transformer.set_pgresult(result)
    names = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
    return [
        dict(zip(names, transformer.load_row(i, tuple), strict=True)) for i in range(result.ntuples)
    ]
