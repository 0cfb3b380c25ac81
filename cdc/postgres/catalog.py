"""What the daemon asks PostgreSQL's catalog, on an ordinary (non-replication) connection.

Slot status, server settings, the role's attributes, the publication's tables, replica
identities and column lists. Every query here is read-only and needs no privilege beyond
``LOGIN`` and ``SELECT`` on the tracked tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdc.errors import PostgresUnavailable
from cdc.postgres.source import SESSION_OPTIONS, connect_error
from schema.keys import TrackedTable
from schema.lsn import Lsn, parse_lsn

Conn = psycopg.Connection[tuple[object, ...]]


def connect(conninfo: str, what: str = "PostgreSQL", timeout: float = 10.0) -> Conn:
    """An autocommit session with the replication session's settings, keeping the
    ``options`` of ``conninfo`` (``Settings.catalog_conninfo`` carries the timeouts there)."""
    try:
        own = conninfo_to_dict(conninfo).get("options")
    except psycopg.Error:
        own = None
    options = f"{own} {SESSION_OPTIONS}" if own else SESSION_OPTIONS
    try:
        return psycopg.connect(
            conninfo,
            autocommit=True,
            options=options,
            application_name="cdc",
            connect_timeout=max(1, int(timeout)),
        )
    except psycopg.OperationalError as exc:
        raise connect_error(exc, what) from None


@dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str
    slot_type: str
    database: str | None
    active: bool
    active_pid: int | None
    restart_lsn: Lsn | None
    confirmed_flush_lsn: Lsn | None
    wal_status: str | None
    current_lsn: Lsn
    two_phase: bool

    @property
    def lag_bytes(self) -> int | None:
        if self.confirmed_flush_lsn is None:
            return None
        return max(0, self.current_lsn - self.confirmed_flush_lsn)

    @property
    def retained_bytes(self) -> int | None:
        if self.restart_lsn is None:
            return None
        return max(0, self.current_lsn - self.restart_lsn)

    @property
    def invalidated(self) -> bool:
        return self.wal_status == "lost"


def slot_info(conn: Conn, slot: str) -> SlotInfo | None:
    row = conn.execute(
        """
        SELECT slot_name, plugin, slot_type, database, active, active_pid,
               restart_lsn::text, confirmed_flush_lsn::text, wal_status,
               pg_current_wal_lsn()::text, two_phase
        FROM pg_replication_slots WHERE slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotInfo(
        name=str(row[0]),
        plugin=str(row[1] or ""),
        slot_type=str(row[2]),
        database=str(row[3]) if row[3] is not None else None,
        active=bool(row[4]),
        active_pid=int(str(row[5])) if row[5] is not None else None,
        restart_lsn=parse_lsn(str(row[6])) if row[6] else None,
        confirmed_flush_lsn=parse_lsn(str(row[7])) if row[7] else None,
        wal_status=str(row[8]) if row[8] is not None else None,
        current_lsn=parse_lsn(str(row[9])),
        two_phase=bool(row[10]),
    )


def current_wal_lsn(conn: Conn) -> Lsn:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def emit_message(conn: Conn, prefix: str, content: str) -> None:
    """Write a non-transactional logical message into the WAL (every slot decodes it).

    ``EXECUTE`` on ``pg_logical_emit_message`` is granted to every role by default;
    ``psycopg.errors.InsufficientPrivilege`` when it was revoked."""
    conn.execute("SELECT pg_logical_emit_message(false, %s, %s)", (prefix, content))


def setting(conn: Conn, name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


@dataclass(frozen=True)
class RoleInfo:
    name: str
    superuser: bool
    replication: bool


def role_info(conn: Conn) -> RoleInfo:
    row = conn.execute(
        "SELECT rolname, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    return RoleInfo(str(row[0]), bool(row[1]), bool(row[2]))


def publication_tables(conn: Conn, publication: str) -> set[tuple[str, str]] | None:
    """(schema, table) pairs of the publication, or None if it does not exist."""
    exists = conn.execute(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    if exists is None:
        return None
    rows = conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (publication,)
    ).fetchall()
    return {(str(s), str(t)) for s, t in rows}


@dataclass(frozen=True)
class IdentityInfo:
    """A table's replica identity: which columns UPDATE/DELETE carry for the old row."""

    exists: bool
    kind: str  # 'd' default (primary key), 'f' full, 'i' index, 'n' nothing
    columns: frozenset[str]  # the identity's columns ('f': every column)


def replica_identity(conn: Conn, table: TrackedTable) -> IdentityInfo:
    row = conn.execute(
        """
        SELECT c.relreplident::text, c.oid FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
        """,
        (table.schema, table.name),
    ).fetchone()
    if row is None:
        return IdentityInfo(False, "n", frozenset())
    kind, oid = str(row[0]), row[1]
    if kind == "f":
        return IdentityInfo(True, kind, frozenset(table_columns(conn, table)))
    if kind == "n":
        return IdentityInfo(True, kind, frozenset())
    flag = "indisprimary" if kind == "d" else "indisreplident"
    cols = conn.execute(
        f"""
        SELECT a.attname FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = %s AND i.{flag}
        """,
        (oid,),
    ).fetchall()
    return IdentityInfo(True, kind, frozenset(str(c[0]) for c in cols))


def table_columns(conn: Conn, table: TrackedTable) -> list[str]:
    """Columns in attribute order, as pgoutput publishes them (no dropped or generated)."""
    rows = conn.execute(
        """
        SELECT a.attname FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0
          AND NOT a.attisdropped AND a.attgenerated = ''
        ORDER BY a.attnum
        """,
        (table.schema, table.name),
    ).fetchall()
    return [str(r[0]) for r in rows]


#: The first server version with publication column lists (``pg_publication_tables.attnames``).
COLUMN_LISTS_VERSION = 150000


def has_column_lists(conn: Conn) -> bool:
    return conn.info.server_version >= COLUMN_LISTS_VERSION


def publication_columns(conn: Conn, publication: str, table: TrackedTable) -> list[str] | None:
    """The columns ``publication`` publishes of ``table`` (its column list, or every
    column), in attribute order; None before PostgreSQL 15 or if the table is not in it."""
    if not has_column_lists(conn):
        return None
    row = conn.execute(
        "SELECT attnames FROM pg_publication_tables"
        " WHERE pubname = %s AND schemaname = %s AND tablename = %s",
        (publication, table.schema, table.name),
    ).fetchone()
    if row is None or row[0] is None:
        return None
    published = {str(name) for name in row[0]}  # type: ignore[attr-defined]
    return [c for c in table_columns(conn, table) if c in published]


def readable_columns(conn: Conn, table: TrackedTable, publication: str | None) -> list[str]:
    """The columns snapshots, backfills and ``verify`` read: what the publication
    publishes (so a row read with SQL and the same row streamed agree), never an excluded
    column (``agents.password_hash``: not granted to the daemon's role, never read)."""
    columns = publication_columns(conn, publication, table) if publication else None
    if columns is None:
        columns = table_columns(conn, table)
    return [c for c in columns if c not in table.excluded_columns]


def unreadable_columns(conn: Conn, table: TrackedTable, columns: list[str]) -> list[str]:
    """Those of ``columns`` the current role may not SELECT."""
    rows = conn.execute(
        """
        SELECT a.attname FROM pg_attribute a
        WHERE a.attrelid = %s::regclass AND a.attname = ANY(%s)
          AND NOT has_column_privilege(current_user, a.attrelid, a.attnum, 'SELECT')
        ORDER BY a.attnum
        """,
        (table.qualified_name, columns),
    ).fetchall()
    return [str(r[0]) for r in rows]


def schema_fingerprint(
    conn: Conn, tables: tuple[TrackedTable, ...]
) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """Per table: (column, type oid, attnum) of every column. Any DDL that changes what a
    row looks like in Redis changes this."""
    out: dict[str, tuple[tuple[str, int, int], ...]] = {}
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, a.attname, a.atttypid::int, a.attnum::int
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
          AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
        ORDER BY n.nspname, c.relname, a.attnum
        """,
        ([t.schema for t in tables], [t.name for t in tables]),
    ).fetchall()
    by_name = {(t.schema, t.name): t.name for t in tables}
    grouped: dict[str, list[tuple[str, int, int]]] = {}
    for schema, rel, col, typ, num in rows:
        grouped.setdefault(by_name[(str(schema), str(rel))], []).append(
            (str(col), int(str(typ)), int(str(num)))
        )
    for name, cols in grouped.items():
        out[name] = tuple(cols)
    return out


def terminate(conn: Conn, pid: int) -> bool:
    try:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    except psycopg.Error as exc:
        raise PostgresUnavailable(
            f"cannot terminate pid {pid}: {str(exc).strip().splitlines()[0]}"
        ) from None
    return bool(row and row[0])
