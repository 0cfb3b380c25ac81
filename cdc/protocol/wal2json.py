"""Decoder for wal2json ``format-version 2``, producing the same messages as pgoutput.

wal2json writes one JSON object per change (plus ``B``/``C`` around each transaction with
``include-transaction``), with each column's value as PostgreSQL printed it, except that
numbers are bare JSON numbers and booleans ``true``/``false``. This decoder turns them
back into PostgreSQL's ``col::text`` (numbers keep their exact digits), so both plugins
lead to identical Redis hashes.

wal2json has no Relation messages and omits unchanged TOASTed columns, so the decoder is
told each table's current columns (:meth:`Wal2JsonDecoder.set_columns`, from the catalog):
a known column missing from an UPDATE is an unchanged TOAST value. It makes up Relation
messages (``synthetic=True``) when a table is first seen or its columns change.

Known wal2json limitations: ``NaN``/``Infinity`` in numeric columns arrive as ``null``;
binary content of logical messages is not representable. Use pgoutput (the default) when
that matters.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from cdc.protocol.messages import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    DecodeError,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Relation,
    RelationColumn,
    Truncate,
    Update,
    Value,
    unix_to_pg_time,
)
from cdc.transform.assemble import CAST_BOOL, CAST_BPCHAR, CAST_INET, text_cast
from schema.lsn import parse_lsn

START_OPTIONS = {
    "format-version": "2",
    "include-transaction": "1",
    "include-xids": "1",
    "include-lsn": "1",
    "include-timestamp": "1",
}


def _raw(text: str) -> str:
    return text


_TYPE_CASTS = {"boolean": CAST_BOOL, "character": CAST_BPCHAR, "inet": CAST_INET}


def _value(value: Any, type_name: str | None = None) -> Value:
    if value is None:
        return None
    if value is True:
        return b"true"
    if value is False:
        return b"false"
    if isinstance(value, str):
        raw = value.encode("utf-8")
        kind = _TYPE_CASTS.get((type_name or "").split("(", 1)[0])
        return text_cast(kind, raw) if kind else raw
    # Objects or arrays only appear for json columns printed unquoted (never by wal2json 2).
    return json.dumps(value, separators=(", ", ": ")).encode("utf-8")


def _timestamp(text: str | None) -> int:
    if not text:
        return 0
    return unix_to_pg_time(datetime.fromisoformat(text).timestamp())


class Wal2JsonDecoder:
    """Stateful only in what it was told about tables and the relations it made up."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[str, ...]] = {}
        self._relids: dict[tuple[str, str], int] = {}
        self._announced: dict[tuple[str, str], tuple[str, ...]] = {}

    def set_columns(self, schema: str, table: str, columns: list[str]) -> None:
        self._known[(schema, table)] = tuple(columns)

    def decode(self, payload: bytes) -> list[Message]:
        try:
            data = json.loads(payload, parse_float=_raw, parse_int=_raw)
        except ValueError as exc:
            raise DecodeError(f"wal2json sent invalid JSON: {exc}") from None
        if not isinstance(data, dict) or "action" not in data:
            raise DecodeError("wal2json message without an action (is format-version 2 set?)")
        action = data["action"]
        try:
            if action == "B":
                return [
                    Begin(
                        parse_lsn(data["lsn"]), _timestamp(data.get("timestamp")), int(data["xid"])
                    )
                ]
            if action == "C":
                return [
                    Commit(
                        0,
                        parse_lsn(data["lsn"]),
                        parse_lsn(data["nextlsn"]),
                        _timestamp(data.get("timestamp")),
                    )
                ]
            if action in ("I", "U", "D"):
                return self._change(action, data)
            if action == "T":
                relation = self._relation(data["schema"], data["table"], None)
                out: list[Message] = [relation[1]] if relation[1] is not None else []
                out.append(Truncate((relation[0],)))
                return out
            if action == "M":
                content = data.get("content") or ""
                return [
                    LogicalMessage(
                        bool(data.get("transactional")),
                        parse_lsn(data["lsn"]) if data.get("lsn") else 0,
                        str(data.get("prefix", "")),
                        str(content).encode("utf-8"),
                    )
                ]
        except (KeyError, TypeError) as exc2:
            raise DecodeError(f"wal2json {action!r} message lacks {exc2}") from None
        raise DecodeError(f"unsupported wal2json action {action!r}")

    def _relation(
        self, schema: str, table: str, seen: list[str] | None
    ) -> tuple[int, Relation | None]:
        ident = (schema, table)
        relid = self._relids.setdefault(ident, len(self._relids) + 1)
        columns = list(self._known.get(ident, ()))
        if seen:
            for name in seen:
                if name not in columns:
                    columns.append(name)
        current = tuple(columns)
        if self._announced.get(ident) == current:
            return relid, None
        self._announced[ident] = current
        self._known[ident] = current
        relation = Relation(
            relation_id=relid,
            namespace=schema,
            name=table,
            replica_identity="d",
            columns=tuple(RelationColumn(0, name, 0, -1) for name in current),
            synthetic=True,
        )
        return relid, relation

    def _change(self, action: str, data: dict[str, Any]) -> list[Message]:
        schema, table = data["schema"], data["table"]
        new_cols = data.get("columns") or []
        old_cols = data.get("identity") or []
        relid, relation = self._relation(schema, table, [c["name"] for c in new_cols])
        columns = self._announced[(schema, table)]
        out: list[Message] = [relation] if relation is not None else []
        if action == "I":
            out.append(Insert(relid, self._tuple(columns, new_cols, absent_unchanged=False)))
        elif action == "U":
            old = self._tuple(columns, old_cols, absent_unchanged=False) if old_cols else None
            out.append(
                Update(relid, self._tuple(columns, new_cols, absent_unchanged=True), old, True)
            )
        else:
            out.append(Delete(relid, self._tuple(columns, old_cols, absent_unchanged=False), True))
        return out

    @staticmethod
    def _tuple(
        columns: tuple[str, ...], given: list[dict[str, Any]], absent_unchanged: bool
    ) -> tuple[Value, ...]:
        values = {c["name"]: _value(c.get("value"), c.get("type")) for c in given}
        missing: Value = UNCHANGED_TOAST if absent_unchanged else None
        return tuple(values.get(name, missing) for name in columns)
