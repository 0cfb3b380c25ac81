"""SQL for the writer's operations, built once from the SQLAlchemy tables.

Every operation is one statement: the change itself in a CTE named ``row``, followed by
the rows that must commit with it (status history, assignment history, audit log) as
further data-modifying CTEs that select from ``row``; if ``row`` is empty (the target does
not exist) nothing else is written. Column lists come from :mod:`schema.tables`, so a new
column needs no SQL edits here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from functools import cache
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import JSONB

from schema.tables import Agent, Ticket

# Columns the writer never returns (and never puts in an audit log).
SECRET_COLUMNS = frozenset({"password_hash"})


def table_of(model: Any) -> Table:
    table: Table = model.__table__
    return table


@cache
def returning(table_name: str) -> str:
    table = _tables()[table_name]
    return ", ".join(c.name for c in table.columns if c.name not in SECRET_COLUMNS)


@cache
def json_columns(table_name: str) -> frozenset[str]:
    table = _tables()[table_name]
    return frozenset(c.name for c in table.columns if isinstance(c.type, JSONB))


def _tables() -> dict[str, Table]:
    from schema.tables import metadata

    return dict(metadata.tables)


def adapt(table_name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters for psycopg: jsonb columns wrapped, enums as their values."""
    jsonish = json_columns(table_name)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in jsonish and value is not None:
            out[name] = Jsonb(value)
        elif isinstance(value, Enum):
            out[name] = value.value
        else:
            out[name] = value
    return out


AUDIT_CTE = """
, audit AS (
    INSERT INTO audit_logs (event_type, operator_id, target_type, target_id, details, ip_address)
    SELECT %(audit_event)s, %(audit_operator)s, %(audit_target_type)s, row.id::text,
           %(audit_details)s, %(audit_ip)s
    FROM row
    WHERE %(audit_enabled)s
)"""


def audit_params(
    enabled: bool,
    event: str,
    target_type: str,
    operator: str | None,
    ip_address: str | None,
    details: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "audit_enabled": enabled,
        "audit_event": event,
        "audit_target_type": target_type,
        "audit_operator": operator,
        "audit_ip": ip_address,
        "audit_details": Jsonb(dict(details)),
    }


def insert(
    table_name: str, columns: Iterable[str], overrides: Mapping[str, str] | None = None
) -> str:
    """``WITH row AS (INSERT … RETURNING …)`` + audit, selecting what the server decided.

    ``overrides`` maps a column to an SQL expression used instead of its parameter
    (e.g. a default when the parameter is NULL). Only ``id``, the overridden columns and
    those left to their defaults come back: the caller already has the rest (see
    :func:`written`), and shipping and decoding every column is measurable per write.
    """
    cols = list(columns)
    exprs = [(overrides or {}).get(c, f"%({c})s") for c in cols]
    decided = [
        "id",
        *(
            c
            for c in returning(table_name).split(", ")
            if c != "id" and (c not in cols or c in (overrides or {}))
        ),
    ]
    return (
        f"WITH row AS (INSERT INTO {table_name} ({', '.join(cols)}) "
        f"VALUES ({', '.join(exprs)}) RETURNING {', '.join(decided)})"
        f"{AUDIT_CTE}\nSELECT * FROM row"
    )


def written(values: Mapping[str, Any], returned: Mapping[str, Any]) -> dict[str, Any]:
    """The row as written: the values sent, overlaid with what the server decided."""
    return {**values, **returned}


def update(table_name: str, columns: Iterable[str], extra_sets: Iterable[str] = ()) -> str:
    """``WITH row AS (UPDATE … WHERE id = %(id)s RETURNING …)`` + audit."""
    sets = [f"{c} = %({c})s" for c in columns]
    sets.extend(extra_sets)
    return (
        f"WITH row AS (UPDATE {table_name} SET {', '.join(sets)} "
        f"WHERE id = %(id)s RETURNING {returning(table_name)})"
        f"{AUDIT_CTE}\nSELECT * FROM row"
    )


def ticket_number_default() -> str:
    """The column's server default, as SQL (from the model: one source of truth)."""
    default = table_of(Ticket).c.ticket_number.server_default
    return str(getattr(default, "arg", ""))


def agents_table() -> Table:
    return table_of(Agent)
