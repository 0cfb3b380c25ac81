"""Turning a cached row (PostgreSQL's text form of each column) back into Python values.

Redis holds ``col::text`` for every non-NULL column (contract section 6). The cache reader
uses :func:`row_from_text` to rebuild the values an output model expects; the converter for
each column follows from its SQLAlchemy type, so a new column needs no code here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, SmallInteger, Table
from sqlalchemy.dialects.postgresql import JSONB

from schema.keys import RESERVED_FIELD_PREFIX

Converter = Callable[[str], Any]


def parse_bool(text: str) -> bool:
    """``true``/``false`` (``bool::text``); ``t``/``f`` (boolout) too."""
    if text in ("true", "t"):
        return True
    if text in ("false", "f"):
        return False
    raise ValueError(f"not a PostgreSQL boolean: {text!r}")


def parse_timestamptz(text: str) -> datetime:
    """``2026-11-22 10:54:27.358178+00`` (ISO DateStyle) to an aware datetime."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {text!r}")
    return value


def _converter(column_type: Any) -> Converter:
    if isinstance(column_type, JSONB):
        return json.loads
    if isinstance(column_type, DateTime):
        return parse_timestamptz
    if isinstance(column_type, Boolean):
        return parse_bool
    if isinstance(column_type, BigInteger | Integer | SmallInteger):
        return int
    return str


_CACHE: dict[str, dict[str, Converter]] = {}


def converters(table: Table) -> dict[str, Converter]:
    found = _CACHE.get(table.name)
    if found is None:
        found = {column.name: _converter(column.type) for column in table.columns}
        _CACHE[table.name] = found
    return found


def row_from_text(table: Table, fields: Mapping[str, str]) -> dict[str, Any]:
    """Column values from a cached hash; columns without a field are NULL (None)."""
    convert = converters(table)
    row: dict[str, Any] = dict.fromkeys(convert)
    for name, text in fields.items():
        if name.startswith(RESERVED_FIELD_PREFIX):
            continue
        fn = convert.get(name)
        # A column the models do not know yet (added by a newer migration) is skipped.
        if fn is not None:
            row[name] = fn(text)
    return row
