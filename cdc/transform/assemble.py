"""Transaction assembly: from decoded messages to changes of tracked tables.

A pure state machine. It keeps the relation cache (pgoutput sends a Relation message
before the first change of a table and again after its schema changed), resolves each
change to a :class:`TableView` of a tracked table (untracked relations are dropped), checks
that changes arrive inside Begin/Commit, and numbers the changes of the transaction so a
transaction applied in chunks can be resumed exactly where it stopped.

Output is one event per input message, or None:

- :class:`TxBegin` / :class:`TxCommit` around each transaction,
- :class:`RowChange` (insert, update, delete) and :class:`TableTruncate`,
- :class:`SchemaChange` when a tracked table's columns differ from what was known,
- :class:`RepairRequest` for a ``cdc verify --repair`` request written into the WAL
  (:data:`REPAIR_PREFIX`); logical messages of other prefixes are dropped.

Like the decoder, this is on the hot path and compiled by mypyc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, Union

from cdc.errors import RecordError
from cdc.protocol.messages import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Record,
    Relation,
    RelationColumn,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    TypeInfo,
    Update,
    Value,
)
from schema.keys import TrackedTable

INSERT: Final = 1
UPDATE: Final = 2
DELETE: Final = 3
OP_NAMES: Final = ("", "insert", "update", "delete")
# Prefix of the logical messages (``pg_logical_emit_message``) by which ``cdc verify
# --repair`` asks the daemon streaming the table to re-read rows (see cdc.ops.verify).
REPAIR_PREFIX: Final = "cdc:repair"
# The largest request content taken (verify sends 1,000 ids at a time, far less).
REPAIR_MAX_BYTES: Final = 1 << 20


class AssemblyError(RecordError):
    """Messages in an order the protocol does not allow (a bug upstream, never retried)."""


class StreamingUnsupported(AssemblyError):
    """Protocol-2 streaming of in-progress transactions arrived; the daemon never asks
    for it (large transactions are applied in chunks after their commit instead)."""


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


# Output-function text that differs from ``col::text`` (contract section 6), by type OID.
CAST_NONE: Final = 0
CAST_BOOL: Final = 1  # boolout 't'/'f'; ::text is 'true'/'false'
CAST_BPCHAR: Final = 2  # char(n) keeps trailing blanks; ::text trims them
CAST_INET: Final = 3  # inet_out drops a host's /32 or /128; ::text keeps it
TEXT_CASTS: Final = {16: CAST_BOOL, 1042: CAST_BPCHAR, 869: CAST_INET}


def text_cast(kind: int, value: bytes) -> bytes:
    """``value`` (output-function text) as ``col::text`` prints it."""
    if kind == CAST_BOOL:
        return b"true" if value == b"t" else b"false" if value == b"f" else value
    if kind == CAST_BPCHAR:
        return value.rstrip(b" ")
    if kind == CAST_INET:
        if b"/" in value:
            return value
        return value + (b"/128" if b":" in value else b"/32")
    return value


@dataclass(frozen=True)
class TableView:
    """A relation as the planner needs it: column positions and precomputed key parts."""

    relation: Relation
    tracked: TrackedTable
    # Position of the primary key column in a tuple, and of each lookup column.
    pk_index: int
    lookup_indexes: tuple[int, ...]
    # Per column: whether it is written to Redis (False for excluded columns).
    included: tuple[bool, ...]
    # Per column: the field name as a RESP bulk string.
    field_resp: tuple[bytes, ...]
    # Per column: the field name as bytes (for HDEL/patch arguments).
    field_names: tuple[bytes, ...]
    key_prefix: bytes
    lookup_prefixes: tuple[bytes, ...]
    table_name: str
    # Per column: the cast from output-function text to ``::text`` (CAST_NONE mostly).
    casts: tuple[int, ...]
    has_casts: bool

    @property
    def name(self) -> str:
        return self.tracked.name

    def key(self, row_id: bytes) -> bytes:
        return self.key_prefix + row_id + b"}"

    def lookup_key(self, index: int, value: bytes) -> bytes:
        return self.lookup_prefixes[index] + value + b"}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return self.relation.column_names


def make_view(relation: Relation, tracked: TrackedTable) -> TableView:
    names = relation.column_names
    pk_index = names.index(tracked.primary_key) if tracked.primary_key in names else -1
    lookup_indexes = tuple(
        names.index(lookup.column) if lookup.column in names else -1 for lookup in tracked.lookups
    )
    encoded = tuple(name.encode("utf-8") for name in names)
    casts = tuple(TEXT_CASTS.get(c.type_oid, CAST_NONE) for c in relation.columns)
    return TableView(
        relation=relation,
        tracked=tracked,
        pk_index=pk_index,
        lookup_indexes=lookup_indexes,
        included=tuple(name not in tracked.excluded_columns for name in names),
        field_resp=tuple(_bulk(name) for name in encoded),
        field_names=encoded,
        key_prefix=tracked.key_prefix.encode("utf-8"),
        lookup_prefixes=tuple(lookup.key_prefix.encode("utf-8") for lookup in tracked.lookups),
        table_name=tracked.name,
        casts=casts,
        has_casts=any(casts),
    )


def view_from_columns(tracked: TrackedTable, columns: list[str]) -> TableView:
    """A view for rows read with SQL (snapshot, backfill, verify) rather than streamed."""
    relation = Relation(
        relation_id=0,
        namespace=tracked.schema,
        name=tracked.name,
        replica_identity="d",
        # Rows read with SQL are already ``::text``: type 25 (text) needs no cast.
        columns=tuple(RelationColumn(0, name, 25, -1) for name in columns),
        synthetic=True,
    )
    return make_view(relation, tracked)


class TxBegin(Record):
    _fields = ("xid", "final_lsn", "commit_time")

    def __init__(self, xid: int, final_lsn: int, commit_time: int) -> None:
        self.xid: Final = xid
        self.final_lsn: Final = final_lsn
        self.commit_time: Final = commit_time


class TxCommit(Record):
    _fields = ("xid", "final_lsn", "end_lsn", "commit_time", "changes")

    def __init__(
        self, xid: int, final_lsn: int, end_lsn: int, commit_time: int, changes: int
    ) -> None:
        self.xid: Final = xid
        self.final_lsn: Final = final_lsn
        self.end_lsn: Final = end_lsn
        self.commit_time: Final = commit_time
        self.changes: Final = changes


class RowChange(Record):
    """A row change; ``seq``: its position within its transaction, from 1."""

    _fields = ("view", "op", "new", "old", "seq")

    def __init__(
        self, view: TableView, op: int, new: TupleData | None, old: TupleData | None, seq: int
    ) -> None:
        self.view: Final = view
        self.op: Final = op
        self.new: Final = new
        self.old: Final = old
        self.seq: Final = seq


class TableTruncate(Record):
    _fields = ("views", "seq")

    def __init__(self, views: tuple[TableView, ...], seq: int) -> None:
        self.views: Final = views
        self.seq: Final = seq


class SchemaChange(Record):
    _fields = ("view", "previous")

    def __init__(self, view: TableView, previous: tuple[str, ...]) -> None:
        self.view: Final = view
        self.previous: Final = previous


class RepairRequest(Record):
    """Re-read these rows of a table from PostgreSQL (``cdc verify --repair``)."""

    _fields = ("table", "ids")

    def __init__(self, table: str, ids: tuple[str, ...]) -> None:
        self.table: Final = table
        self.ids: Final = ids


def repair_content(table: str, ids: list[str]) -> str:
    """The content of a :data:`REPAIR_PREFIX` message asking to re-read ``ids`` of
    ``table`` (schema-qualified)."""
    return json.dumps({"table": table, "ids": ids}, separators=(",", ":"))


def repair_request(content: bytes) -> RepairRequest | None:
    """The request a :data:`REPAIR_PREFIX` message holds; None when it is not one.

    Anyone who may call ``pg_logical_emit_message`` can write such a message, so a
    malformed, oversized or odd one is dropped, never a reason to stop: at most
    :data:`REPAIR_MAX_BYTES` of JSON, ids that are text PostgreSQL can hold (no NUL, valid
    UTF-8)."""
    if len(content) > REPAIR_MAX_BYTES:
        return None
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    table = data.get("table")
    ids = data.get("ids")
    if not isinstance(table, str) or not isinstance(ids, list):
        return None
    return RepairRequest(table, tuple(i for i in ids if _storable(i)))


def _storable(value: object) -> bool:
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeError:
        return False
    return True


Event = Union[TxBegin, TxCommit, RowChange, TableTruncate, SchemaChange, RepairRequest]  # noqa: UP007


class Assembler:
    """Feeds on messages in stream order; see the module docstring."""

    def __init__(self, tracked: tuple[TrackedTable, ...]) -> None:
        self._tracked = {(t.schema, t.name): t for t in tracked}
        self._views: dict[int, TableView] = {}
        self._columns_seen: dict[tuple[str, str], tuple[str, ...]] = {}
        self._untracked: set[int] = set()
        self._in_tx = False
        self._xid = 0
        self._final_lsn = 0
        self._seq = 0

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    @property
    def views(self) -> dict[int, TableView]:
        return self._views

    @property
    def seq(self) -> int:
        """Tracked changes of the current transaction so far."""
        return self._seq

    def feed(self, msg: Message) -> Event | None:
        if isinstance(msg, Insert):
            view = self._change_view(msg.relation_id)
            if view is None:
                return None
            self._seq += 1
            new = _cast(view, msg.new) if view.has_casts else msg.new
            return RowChange(view, INSERT, new, None, self._seq)
        if isinstance(msg, Update):
            view = self._change_view(msg.relation_id)
            if view is None:
                return None
            self._seq += 1
            if view.has_casts:
                old = _cast(view, msg.old) if msg.old is not None else None
                return RowChange(view, UPDATE, _cast(view, msg.new), old, self._seq)
            return RowChange(view, UPDATE, msg.new, msg.old, self._seq)
        if isinstance(msg, Delete):
            view = self._change_view(msg.relation_id)
            if view is None:
                return None
            self._seq += 1
            old = _cast(view, msg.old) if view.has_casts else msg.old
            return RowChange(view, DELETE, None, old, self._seq)
        if isinstance(msg, Begin):
            if self._in_tx:
                raise AssemblyError("Begin inside a transaction")
            self._in_tx = True
            self._xid = msg.xid
            self._final_lsn = msg.final_lsn
            self._seq = 0
            return TxBegin(msg.xid, msg.final_lsn, msg.commit_time)
        if isinstance(msg, Commit):
            if not self._in_tx:
                raise AssemblyError("Commit outside a transaction")
            self._in_tx = False
            return TxCommit(self._xid, self._final_lsn, msg.end_lsn, msg.commit_time, self._seq)
        if isinstance(msg, Relation):
            return self._relation(msg)
        if isinstance(msg, Truncate):
            views = tuple(
                v for v in (self._views.get(r) for r in msg.relation_ids) if v is not None
            )
            self._seq += 1
            if not self._in_tx:
                raise AssemblyError("Truncate outside a transaction")
            return TableTruncate(views, self._seq) if views else None
        if isinstance(msg, StreamStart | StreamStop | StreamCommit | StreamAbort):
            raise StreamingUnsupported("received a streamed in-progress transaction")
        if isinstance(msg, LogicalMessage):
            return repair_request(msg.content) if msg.prefix == REPAIR_PREFIX else None
        if isinstance(msg, Origin | TypeInfo):
            return None
        raise AssemblyError(f"unexpected message {type(msg).__name__}")

    def _change_view(self, relation_id: int) -> TableView | None:
        if not self._in_tx:
            raise AssemblyError("row change outside a transaction")
        view = self._views.get(relation_id)
        if view is None and relation_id not in self._untracked:
            raise AssemblyError(f"change for relation {relation_id} before its Relation message")
        return view

    def _relation(self, msg: Relation) -> SchemaChange | None:
        tracked = self._tracked.get((msg.namespace, msg.name))
        if tracked is None:
            self._untracked.add(msg.relation_id)
            self._views.pop(msg.relation_id, None)
            return None
        view = make_view(msg, tracked)
        self._untracked.discard(msg.relation_id)
        self._views[msg.relation_id] = view
        ident = (msg.namespace, msg.name)
        previous = self._columns_seen.get(ident)
        columns = msg.column_names
        self._columns_seen[ident] = columns
        if previous is not None and previous != columns and not msg.synthetic:
            return SchemaChange(view, previous)
        return None


def _cast(view: TableView, values: TupleData) -> TupleData:
    casts = view.casts
    out: list[Value] = []
    for i in range(len(values)):
        value = values[i]
        if isinstance(value, bytes) and i < len(casts) and casts[i] != CAST_NONE:
            out.append(text_cast(casts[i], value))
        else:
            out.append(value)
    return tuple(out)
