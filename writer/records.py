"""Append-only records: audit logs, email records, archived chat sessions."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from schema.models import (
    AuditLogCreate,
    AuditLogEntry,
    EmailRecord,
    EmailRecordCreate,
    SessionArchive,
    SessionArchiveCreate,
)
from writer.base import to_model, validate
from writer.ids import new_id
from writer.statements import adapt, returning
from writer.steps import Options, Plan, Write

_AUDIT_COLUMNS = ("event_type", "operator_id", "target_type", "target_id", "details", "ip_address")


def _plain_insert(table: str, columns: tuple[str, ...]) -> str:
    placeholders = ", ".join(f"%({c})s" for c in columns)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"
        f" RETURNING {returning(table)}"
    )


@cache
def _sql(table: str, columns: tuple[str, ...]) -> str:
    return _plain_insert(table, columns)


def append_audit_log(
    opts: Options, entry: AuditLogCreate | Mapping[str, Any]
) -> Plan[AuditLogEntry]:
    """An audit entry on its own (operations append theirs in their own transaction)."""
    data = validate(AuditLogCreate, entry)
    params = adapt("audit_logs", data.model_dump())
    rows = yield Write("audit log", _sql("audit_logs", _AUDIT_COLUMNS), params)
    return to_model(AuditLogEntry, rows[0])


def record_email(opts: Options, record: EmailRecordCreate | Mapping[str, Any]) -> Plan[EmailRecord]:
    data = validate(EmailRecordCreate, record)
    values = data.model_dump()
    values["id"] = data.id or new_id()
    columns = tuple(values)
    rows = yield Write(
        "email record", _sql("email_records", columns), adapt("email_records", values)
    )
    return to_model(EmailRecord, rows[0])


def archive_session(
    opts: Options, session: SessionArchiveCreate | Mapping[str, Any]
) -> Plan[SessionArchive]:
    """Keep a closed chat session; ``message_count`` defaults to the history's length."""
    data = validate(SessionArchiveCreate, session)
    values = data.model_dump()
    values["id"] = data.id or new_id()
    if values["message_count"] is None:
        values["message_count"] = len(data.history)
    columns = tuple(values)
    rows = yield Write(
        "session archive", _sql("session_archives", columns), adapt("session_archives", values)
    )
    return to_model(SessionArchive, rows[0])
