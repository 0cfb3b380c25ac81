"""Ticket operations: create, update, change status, assign, comment, attach, resolve, close.

Each is one statement, so one transaction of its own or a part of the caller's. A status
change writes ``ticket_status_history`` and an assignment writes ``ticket_assignments`` in
the same statement as the change; every operation appends its audit log there too (unless
the writer was built with ``audit=False``).

Each operation is a plan (:mod:`writer.steps`): pure, it yields its one :class:`Write`
and returns the row as written; :class:`writer.Writer`, :class:`writer.AsyncWriter` and
the caller's-transaction layer (:mod:`writer.joined`) all run these same functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from schema.enums import TICKET_TRANSITIONS, TicketStatus
from schema.models import (
    Assignment,
    AttachmentCreate,
    CommentCreate,
    StatusChange,
    Ticket,
    TicketAttachment,
    TicketComment,
    TicketCreate,
    TicketUpdate,
)
from writer.base import audit, identifier, optional_identifier, to_model, validate
from writer.errors import FieldProblem, InvalidInput, InvalidReference, InvalidTransition, NotFound
from writer.ids import new_id
from writer.statements import (
    AUDIT_CTE,
    adapt,
    insert,
    returning,
    ticket_number_default,
    update,
    written,
)
from writer.steps import Options, Plan, Write

_ALLOWED_TRANSITIONS = sorted(
    f"{src.value}>{dst.value}" for src, targets in TICKET_TRANSITIONS.items() for dst in targets
)


@cache
def _create_sql(columns: tuple[str, ...]) -> str:
    """INSERT of just the columns the caller set; the server fills in the rest.

    One statement per shape of input (prepared once per connection): fewer parameters
    to send and parse is measurably faster than sending NULLs and defaults."""
    overrides: dict[str, str] = {}
    insert_columns = list(columns)
    if "ticket_number" not in columns:
        insert_columns.append("ticket_number")
        overrides["ticket_number"] = ticket_number_default()
    if "status" in columns:
        insert_columns += ["resolved_at", "closed_at"]
        overrides["resolved_at"] = "CASE WHEN %(status)s IN ('resolved', 'closed') THEN now() END"
        overrides["closed_at"] = "CASE WHEN %(status)s = 'closed' THEN now() END"
    return insert("tickets", insert_columns, overrides=overrides)


@cache
def _status_sql() -> str:
    cols = ", ".join(f"t.{c}" for c in returning("tickets").split(", "))
    return f"""
WITH cur AS (SELECT id, status FROM tickets WHERE id = %(id)s FOR UPDATE),
row AS (
    UPDATE tickets t SET
        status = %(to_status)s,
        updated_at = now(),
        resolved_at = CASE
            WHEN %(to_status)s = 'resolved' THEN now()
            WHEN %(to_status)s = 'closed' THEN COALESCE(t.resolved_at, now())
            ELSE NULL END,
        closed_at = CASE WHEN %(to_status)s = 'closed' THEN now() ELSE NULL END,
        reopen_count = t.reopen_count
            + CASE WHEN cur.status IN ('resolved', 'closed') AND %(to_status)s = 'open'
                   THEN 1 ELSE 0 END,
        resolution = COALESCE(%(resolution)s, t.resolution)
    FROM cur
    WHERE t.id = cur.id AND (cur.status || '>' || %(to_status)s) = ANY(%(allowed)s)
    RETURNING {cols}, cur.status AS previous_status
),
history AS (
    INSERT INTO ticket_status_history
        (ticket_id, from_status, to_status, changed_by, reason, comment)
    SELECT id, previous_status, status, %(changed_by)s, %(reason)s, %(comment)s FROM row
){AUDIT_CTE}
SELECT cur.status AS current_status, row.* FROM cur LEFT JOIN row ON true
"""


@cache
def _assign_sql() -> str:
    cols = ", ".join(f"t.{c}" for c in returning("tickets").split(", "))
    return f"""
WITH cur AS (SELECT id, assignee_id FROM tickets WHERE id = %(id)s FOR UPDATE),
row AS (
    UPDATE tickets t SET assignee_id = %(agent_id)s, updated_at = now()
    FROM cur WHERE t.id = cur.id
    RETURNING {cols}, cur.assignee_id AS previous_assignee
),
assignment AS (
    INSERT INTO ticket_assignments (ticket_id, from_agent_id, agent_id, assigned_by, reason)
    SELECT id, previous_assignee, assignee_id, %(assigned_by)s, %(reason)s FROM row
){AUDIT_CTE}
SELECT * FROM row
"""


_TOUCH_TICKET = """
, touch AS (
    UPDATE tickets SET updated_at = now(),
        first_response_at = COALESCE(first_response_at, CASE WHEN %(first_response)s THEN now() END)
    WHERE id = %(ticket_id)s
)"""

_COMMENT_COLUMNS = (
    "id",
    "ticket_id",
    "content",
    "author_id",
    "author_name",
    "comment_type",
    "mentions",
    "extra_data",
)
_ATTACHMENT_COLUMNS = (
    "id",
    "ticket_id",
    "comment_id",
    "filename",
    "stored_path",
    "content_type",
    "size_bytes",
    "checksum_sha256",
    "uploaded_by",
    "extra_data",
)


@cache
def _child_insert_sql(table: str, columns: tuple[str, ...]) -> str:
    sql = insert(table, columns)
    head, tail = sql.split(AUDIT_CTE, 1)
    return head + _TOUCH_TICKET + AUDIT_CTE + tail


def _ticket_fk_missing(exc: InvalidReference, ticket_id: str) -> NotFound | InvalidReference:
    if exc.constraint and exc.constraint.endswith("_ticket_id_tickets"):
        return NotFound("ticket", ticket_id)
    return exc


def create_ticket(
    opts: Options, data: TicketCreate | Mapping[str, Any], *, actor: str | None = None
) -> Plan[Ticket]:
    ticket = validate(TicketCreate, data)
    actor = optional_identifier(actor, "actor")
    values = ticket.model_dump(exclude_none=True, exclude_unset=True)
    values["id"] = ticket.id or new_id()
    if ticket.status is not TicketStatus.OPEN:
        values["status"] = ticket.status
    params = adapt("tickets", values)
    params.update(audit(opts, "ticket.created", "ticket", actor, {"status": ticket.status.value}))
    rows = yield Write("ticket", _create_sql(tuple(values)), params)
    return to_model(Ticket, written(values, rows[0]))


def update_ticket(
    opts: Options,
    ticket_id: str,
    changes: TicketUpdate | Mapping[str, Any],
    *,
    actor: str | None = None,
) -> Plan[Ticket]:
    ticket_id = identifier(ticket_id, "ticket_id")
    update_model = validate(TicketUpdate, changes)
    actor = optional_identifier(actor, "actor")
    fields = sorted(update_model.model_fields_set)
    if not fields:
        raise InvalidInput("TicketUpdate", [FieldProblem((), "no field to update", "empty_update")])
    for name in ("title", "priority", "ticket_type", "customer", "tags", "extra_data"):
        if name in fields and getattr(update_model, name) is None:
            raise InvalidInput(
                "TicketUpdate", [FieldProblem((name,), "cannot be cleared", "not_nullable")]
            )
    values = {name: getattr(update_model, name) for name in fields}
    params = adapt("tickets", values)
    params["id"] = ticket_id
    params.update(audit(opts, "ticket.updated", "ticket", actor, {"fields": fields}))
    sql = update("tickets", fields, extra_sets=["updated_at = now()"])
    rows = yield Write("ticket", sql, params)
    if not rows:
        raise NotFound("ticket", ticket_id)
    return to_model(Ticket, rows[0])


def change_ticket_status(
    opts: Options,
    ticket_id: str,
    change: StatusChange | Mapping[str, Any],
    *,
    actor: str | None = None,
) -> Plan[Ticket]:
    """Move a ticket to another status, recording ``ticket_status_history``."""
    ticket_id = identifier(ticket_id, "ticket_id")
    status_change = validate(StatusChange, change)
    actor = optional_identifier(actor, "actor")
    changed_by = status_change.changed_by or actor
    to_status = status_change.to_status.value
    params: dict[str, Any] = {
        "id": ticket_id,
        "to_status": to_status,
        "allowed": _ALLOWED_TRANSITIONS,
        "changed_by": changed_by,
        "reason": status_change.reason,
        "comment": status_change.comment,
        "resolution": status_change.resolution,
    }
    params.update(audit(opts, "ticket.status_changed", "ticket", changed_by, {"to": to_status}))
    rows = yield Write("ticket", _status_sql(), params)
    if not rows:
        raise NotFound("ticket", ticket_id)
    row = dict(rows[0])
    current = row.pop("current_status")
    if row.get("id") is None:
        raise InvalidTransition(ticket_id, str(current), to_status)
    row.pop("previous_status", None)
    return to_model(Ticket, row)


def resolve_ticket(
    opts: Options, ticket_id: str, *, resolution: str | None = None, actor: str | None = None
) -> Plan[Ticket]:
    return (
        yield from change_ticket_status(
            opts,
            ticket_id,
            {"to_status": TicketStatus.RESOLVED, "resolution": resolution},
            actor=actor,
        )
    )


def close_ticket(
    opts: Options, ticket_id: str, *, reason: str | None = None, actor: str | None = None
) -> Plan[Ticket]:
    return (
        yield from change_ticket_status(
            opts, ticket_id, {"to_status": TicketStatus.CLOSED, "reason": reason}, actor=actor
        )
    )


def reopen_ticket(
    opts: Options, ticket_id: str, *, reason: str | None = None, actor: str | None = None
) -> Plan[Ticket]:
    return (
        yield from change_ticket_status(
            opts, ticket_id, {"to_status": TicketStatus.OPEN, "reason": reason}, actor=actor
        )
    )


def assign_ticket(
    opts: Options,
    ticket_id: str,
    assignment: Assignment | Mapping[str, Any],
    *,
    actor: str | None = None,
) -> Plan[Ticket]:
    """Assign (or, with ``agent_id=None``, unassign), recording ``ticket_assignments``."""
    ticket_id = identifier(ticket_id, "ticket_id")
    request = validate(Assignment, assignment)
    actor = optional_identifier(actor, "actor")
    assigned_by = request.assigned_by or actor
    params: dict[str, Any] = {
        "id": ticket_id,
        "agent_id": request.agent_id,
        "assigned_by": assigned_by,
        "reason": request.reason,
    }
    params.update(audit(opts, "ticket.assigned", "ticket", assigned_by, {"to": request.agent_id}))
    rows = yield Write("ticket", _assign_sql(), params)
    if not rows:
        raise NotFound("ticket", ticket_id)
    row = dict(rows[0])
    row.pop("previous_assignee", None)
    return to_model(Ticket, row)


def add_comment(
    opts: Options,
    ticket_id: str,
    comment: CommentCreate | Mapping[str, Any],
    *,
    actor: str | None = None,
) -> Plan[TicketComment]:
    ticket_id = identifier(ticket_id, "ticket_id")
    data = validate(CommentCreate, comment)
    actor = optional_identifier(actor, "actor")
    values = data.model_dump()
    values["id"] = data.id or new_id()
    values["ticket_id"] = ticket_id
    params = adapt("ticket_comments", values)
    params["first_response"] = data.comment_type.value == "public" and data.author_id is not None
    params.update(
        audit(
            opts,
            "ticket.commented",
            "ticket_comment",
            actor or data.author_id,
            {"ticket_id": ticket_id},
        )
    )
    try:
        rows = yield Write(
            "ticket comment", _child_insert_sql("ticket_comments", _COMMENT_COLUMNS), params
        )
    except InvalidReference as exc:
        raise _ticket_fk_missing(exc, ticket_id) from None
    return to_model(TicketComment, written(values, rows[0]))


def add_attachment(
    opts: Options,
    ticket_id: str,
    attachment: AttachmentCreate | Mapping[str, Any],
    *,
    actor: str | None = None,
) -> Plan[TicketAttachment]:
    ticket_id = identifier(ticket_id, "ticket_id")
    data = validate(AttachmentCreate, attachment)
    actor = optional_identifier(actor, "actor")
    values = data.model_dump()
    values["id"] = data.id or new_id()
    values["ticket_id"] = ticket_id
    params = adapt("ticket_attachments", values)
    params["first_response"] = False
    params.update(
        audit(
            opts,
            "ticket.attachment_added",
            "ticket_attachment",
            actor or data.uploaded_by,
            {"ticket_id": ticket_id},
        )
    )
    try:
        rows = yield Write(
            "ticket attachment",
            _child_insert_sql("ticket_attachments", _ATTACHMENT_COLUMNS),
            params,
        )
    except InvalidReference as exc:
        raise _ticket_fk_missing(exc, ticket_id) from None
    return to_model(TicketAttachment, written(values, rows[0]))
