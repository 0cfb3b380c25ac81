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
from writer.base import Operations, to_model, validate
from writer.db import Written
from writer.ids import new_id
from writer.statements import adapt, returning

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


class RecordOperations(Operations):
    def append_audit_log(self, entry: AuditLogCreate | Mapping[str, Any]) -> Written[AuditLogEntry]:
        """An audit entry on its own (operations append theirs in their own transaction)."""
        data = validate(AuditLogCreate, entry)
        params = adapt("audit_logs", data.model_dump())
        rows, token = self._db.write("audit log", _sql("audit_logs", _AUDIT_COLUMNS), params)
        return Written(to_model(AuditLogEntry, rows[0]), token)

    def record_email(self, record: EmailRecordCreate | Mapping[str, Any]) -> Written[EmailRecord]:
        data = validate(EmailRecordCreate, record)
        values = data.model_dump()
        values["id"] = data.id or new_id()
        columns = tuple(values)
        rows, token = self._db.write(
            "email record", _sql("email_records", columns), adapt("email_records", values)
        )
        return Written(to_model(EmailRecord, rows[0]), token)

    def archive_session(
        self, session: SessionArchiveCreate | Mapping[str, Any]
    ) -> Written[SessionArchive]:
        """Keep a closed chat session; ``message_count`` defaults to the history's length."""
        data = validate(SessionArchiveCreate, session)
        values = data.model_dump()
        values["id"] = data.id or new_id()
        if values["message_count"] is None:
            values["message_count"] = len(data.history)
        columns = tuple(values)
        rows, token = self._db.write(
            "session archive", _sql("session_archives", columns), adapt("session_archives", values)
        )
        return Written(to_model(SessionArchive, rows[0]), token)
