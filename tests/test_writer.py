"""Every writer operation against a real PostgreSQL, with its side rows and its token."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from schema.enums import AgentStatus, TicketPriority, TicketStatus
from writer import (
    Conflict,
    InvalidReference,
    InvalidTransition,
    NotFound,
    Writer,
)
from writer.passwords import verify_password
from writer.reader import parse_lsn

Conn = psycopg.Connection[tuple[Any, ...]]


def one(pg: Conn, sql: str, *params: Any) -> Any:
    row = pg.execute(sql, params).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


def audit_events(pg: Conn, target_id: str) -> list[str]:
    rows = pg.execute(
        "SELECT event_type FROM audit_logs WHERE target_id = %s ORDER BY id", (target_id,)
    ).fetchall()
    return [r[0] for r in rows]


def new_agent(writer: Writer, username: str = "alice", **extra: Any) -> str:
    data = {
        "username": username,
        "display_name": username.title(),
        "password": "correct horse",
        **extra,
    }
    return writer.create_agent(data).value.id


def test_create_ticket_returns_row_and_a_token_after_its_commit(writer: Writer, pg: Conn) -> None:
    before = one(pg, "SELECT pg_current_wal_insert_lsn()::text")
    due = datetime.now(UTC) + timedelta(days=1)
    written = writer.create_ticket(
        {
            "title": "Printer on fire",
            "description": "x" * 5000,
            "priority": "urgent",
            "customer": {"name": "Bob", "vip": True},
            "tags": ["hardware", "fire"],
            "sla_due_at": due,
        },
        actor="agent-7",
    )
    ticket = written.value
    assert ticket.status is TicketStatus.OPEN
    assert ticket.priority is TicketPriority.URGENT
    assert ticket.ticket_number.startswith("TK-")
    assert ticket.customer == {"name": "Bob", "vip": True}
    assert ticket.sla_due_at == due
    assert ticket.created_at.tzinfo is not None
    assert parse_lsn(written.token) > parse_lsn(before)
    row = one(
        pg, "SELECT title, length(description), tags::text FROM tickets WHERE id = %s", ticket.id
    )
    assert row == ("Printer on fire", 5000, '["hardware", "fire"]')
    assert audit_events(pg, ticket.id) == ["ticket.created"]
    assert (
        one(pg, "SELECT operator_id FROM audit_logs WHERE target_id = %s", ticket.id) == "agent-7"
    )


def test_tokens_increase_with_each_write(writer: Writer) -> None:
    first = writer.create_ticket({"title": "one"})
    second = writer.update_ticket(first.value.id, {"title": "two"})
    assert parse_lsn(second.token) > parse_lsn(first.token)


def test_caller_supplied_ids_and_numbers_are_kept(writer: Writer) -> None:
    ticket = writer.create_ticket(
        {"id": "T {1}:*?[]", "ticket_number": "EXT-9", "title": "t"}
    ).value
    assert (ticket.id, ticket.ticket_number) == ("T {1}:*?[]", "EXT-9")


def test_duplicate_ticket_number_is_a_conflict(writer: Writer, pg: Conn) -> None:
    writer.create_ticket({"ticket_number": "EXT-1", "title": "first"})
    with pytest.raises(Conflict) as info:
        writer.create_ticket({"ticket_number": "EXT-1", "title": "second"})
    assert info.value.constraint == "uq_tickets_ticket_number"
    assert one(pg, "SELECT count(*) FROM tickets") == 1
    assert one(pg, "SELECT count(*) FROM audit_logs") == 1


def test_update_ticket_writes_only_given_fields_and_can_clear(writer: Writer, pg: Conn) -> None:
    created = writer.create_ticket({"title": "t", "category": "billing", "channel": "email"}).value
    updated = writer.update_ticket(created.id, {"category": None, "priority": "high"}).value
    assert updated.category is None
    assert updated.channel == "email"
    assert updated.priority is TicketPriority.HIGH
    assert updated.updated_at > created.updated_at
    assert one(
        pg, "SELECT details->'fields' FROM audit_logs WHERE event_type = 'ticket.updated'"
    ) == [
        "category",
        "priority",
    ]


def test_update_missing_ticket_is_not_found(writer: Writer, pg: Conn) -> None:
    with pytest.raises(NotFound):
        writer.update_ticket("nope", {"title": "x"})
    assert one(pg, "SELECT count(*) FROM audit_logs") == 0


def test_status_change_writes_history_in_the_same_transaction(writer: Writer, pg: Conn) -> None:
    agent = new_agent(writer)
    ticket = writer.create_ticket({"title": "t"}).value
    moved = writer.change_ticket_status(
        ticket.id, {"to_status": "in_progress", "reason": "picked up"}, actor=agent
    ).value
    assert moved.status is TicketStatus.IN_PROGRESS
    history = pg.execute(
        "SELECT from_status, to_status, changed_by, reason FROM ticket_status_history"
        " WHERE ticket_id = %s",
        (ticket.id,),
    ).fetchall()
    assert history == [("open", "in_progress", agent, "picked up")]


def test_invalid_transition_writes_nothing(writer: Writer, pg: Conn) -> None:
    ticket = writer.create_ticket({"title": "t"}).value
    writer.close_ticket(ticket.id)
    with pytest.raises(InvalidTransition) as info:
        writer.change_ticket_status(ticket.id, {"to_status": "pending"})
    assert (info.value.current, info.value.requested) == ("closed", "pending")
    assert (
        one(pg, "SELECT count(*) FROM ticket_status_history WHERE ticket_id = %s", ticket.id) == 1
    )
    assert one(pg, "SELECT status FROM tickets WHERE id = %s", ticket.id) == "closed"


def test_status_change_of_missing_ticket_is_not_found(writer: Writer) -> None:
    with pytest.raises(NotFound):
        writer.change_ticket_status("missing", {"to_status": "closed"})


def test_resolve_close_reopen(writer: Writer, pg: Conn) -> None:
    ticket = writer.create_ticket({"title": "t"}).value
    resolved = writer.resolve_ticket(ticket.id, resolution="rebooted").value
    assert resolved.status is TicketStatus.RESOLVED
    assert resolved.resolved_at is not None
    assert resolved.resolution == "rebooted"
    closed = writer.close_ticket(ticket.id, reason="confirmed").value
    assert closed.closed_at is not None
    assert closed.resolved_at == resolved.resolved_at
    reopened = writer.reopen_ticket(ticket.id).value
    assert (reopened.status, reopened.closed_at, reopened.resolved_at) == (
        TicketStatus.OPEN,
        None,
        None,
    )
    assert reopened.reopen_count == 1
    statuses = pg.execute(
        "SELECT from_status, to_status FROM ticket_status_history WHERE ticket_id = %s ORDER BY id",
        (ticket.id,),
    ).fetchall()
    assert statuses == [("open", "resolved"), ("resolved", "closed"), ("closed", "open")]


def test_assign_writes_assignment_history(writer: Writer, pg: Conn) -> None:
    first = new_agent(writer, "first")
    second = new_agent(writer, "second")
    ticket = writer.create_ticket({"title": "t"}).value
    writer.assign_ticket(ticket.id, {"agent_id": first, "reason": "skills"})
    reassigned = writer.assign_ticket(ticket.id, {"agent_id": second}, actor=first).value
    assert reassigned.assignee_id == second
    unassigned = writer.assign_ticket(ticket.id, {"agent_id": None}).value
    assert unassigned.assignee_id is None
    rows = pg.execute(
        "SELECT from_agent_id, agent_id, assigned_by FROM ticket_assignments"
        " WHERE ticket_id = %s ORDER BY id",
        (ticket.id,),
    ).fetchall()
    assert rows == [(None, first, None), (first, second, first), (second, None, None)]


def test_assign_to_unknown_agent_is_an_invalid_reference(writer: Writer, pg: Conn) -> None:
    ticket = writer.create_ticket({"title": "t"}).value
    with pytest.raises(InvalidReference):
        writer.assign_ticket(ticket.id, {"agent_id": "ghost"})
    assert one(pg, "SELECT count(*) FROM ticket_assignments") == 0


def test_comment_touches_ticket_and_sets_first_response(writer: Writer, pg: Conn) -> None:
    agent = new_agent(writer)
    ticket = writer.create_ticket({"title": "t"}).value
    internal = writer.add_comment(
        ticket.id, {"content": "note", "author_id": agent, "comment_type": "internal"}
    )
    assert one(pg, "SELECT first_response_at FROM tickets WHERE id = %s", ticket.id) is None
    reply = writer.add_comment(
        ticket.id, {"content": "hello", "author_id": agent, "mentions": [agent]}
    ).value
    assert reply.ticket_id == ticket.id
    assert reply.mentions == [agent]
    first_response, updated = one(
        pg, "SELECT first_response_at, updated_at FROM tickets WHERE id = %s", ticket.id
    )
    assert first_response is not None
    assert updated > ticket.updated_at
    assert internal.value.comment_type.value == "internal"


def test_comment_on_missing_ticket_is_not_found(writer: Writer, pg: Conn) -> None:
    with pytest.raises(NotFound):
        writer.add_comment("missing", {"content": "hi"})
    assert one(pg, "SELECT count(*) FROM ticket_comments") == 0


def test_attachment(writer: Writer, pg: Conn) -> None:
    ticket = writer.create_ticket({"title": "t"}).value
    comment = writer.add_comment(ticket.id, {"content": "see file"}).value
    attachment = writer.add_attachment(
        ticket.id,
        {
            "filename": "screen shot.png",
            "stored_path": "/files/1.png",
            "size_bytes": 12345,
            "content_type": "image/png",
            "checksum_sha256": "a" * 64,
            "comment_id": comment.id,
        },
    ).value
    assert attachment.size_bytes == 12345
    assert (
        one(pg, "SELECT comment_id FROM ticket_attachments WHERE id = %s", attachment.id)
        == comment.id
    )
    with pytest.raises(InvalidReference):
        writer.add_attachment(
            ticket.id,
            {"filename": "x", "stored_path": "/x", "size_bytes": 1, "comment_id": "ghost"},
        )
    with pytest.raises(NotFound):
        writer.add_attachment("ghost", {"filename": "x", "stored_path": "/x", "size_bytes": 1})


def test_create_agent_hashes_password_and_never_returns_it(writer: Writer, pg: Conn) -> None:
    written = writer.create_agent(
        {
            "username": "ann",
            "display_name": "Ann",
            "password": "correct horse",
            "role": "supervisor",
            "skills": ["billing", "en"],
            "email": "ann@example.com",
        }
    )
    agent = written.value
    assert "password_hash" not in agent.model_dump()
    assert agent.skills == ["billing", "en"]
    stored = one(pg, "SELECT password_hash FROM agents WHERE id = %s", agent.id)
    assert stored.startswith("$argon2id$")
    assert "correct horse" not in stored
    assert verify_password(stored, "correct horse")


def test_duplicate_username_is_a_conflict(writer: Writer) -> None:
    new_agent(writer, "dup")
    with pytest.raises(Conflict) as info:
        new_agent(writer, "dup")
    assert info.value.constraint == "uq_agents_username"


def test_update_agent_and_rename(writer: Writer, pg: Conn) -> None:
    agent = new_agent(writer, "old")
    updated = writer.update_agent(
        agent, {"username": "new", "status": "busy", "phone": "+1 555"}
    ).value
    assert (updated.username, updated.status, updated.phone) == ("new", AgentStatus.BUSY, "+1 555")
    assert one(pg, "SELECT username FROM agents WHERE id = %s", agent) == "new"
    with pytest.raises(NotFound):
        writer.update_agent("ghost", {"status": "busy"})


def test_password_change_and_authentication(writer: Writer, pg: Conn) -> None:
    agent = new_agent(writer, "bob")
    assert writer.authenticate_agent("bob", "wrong password") is None
    assert writer.authenticate_agent("nobody", "correct horse") is None
    logged_in = writer.authenticate_agent("bob", "correct horse")
    assert logged_in is not None
    assert logged_in.value.last_login_at is not None
    writer.set_agent_password(agent, "battery staple")
    assert writer.authenticate_agent("bob", "correct horse") is None
    assert writer.authenticate_agent("bob", "battery staple") is not None
    assert "agent.password_changed" in audit_events(pg, agent)


def test_deactivate_blocks_login(writer: Writer) -> None:
    agent = new_agent(writer, "carol", status="online")
    deactivated = writer.deactivate_agent(agent).value
    assert (deactivated.is_active, deactivated.status) == (False, AgentStatus.OFFLINE)
    assert writer.authenticate_agent("carol", "correct horse") is None
    assert writer.reactivate_agent(agent).value.is_active
    assert writer.authenticate_agent("carol", "correct horse") is not None
    with pytest.raises(NotFound):
        writer.deactivate_agent("ghost")


def test_audit_log_email_record_session_archive(writer: Writer, pg: Conn) -> None:
    entry = writer.append_audit_log(
        {
            "event_type": "export",
            "operator_id": "admin",
            "details": {"rows": 3},
            "ip_address": "10.0.0.1",
        }
    ).value
    assert entry.details == {"rows": 3}
    email = writer.record_email(
        {
            "email_type": "ticket_reply",
            "sender": "support@example.com",
            "recipients": ["bob@example.com"],
            "subject": "Re: printer",
            "status": "sent",
            "sent_at": datetime.now(UTC),
        }
    ).value
    assert email.recipients == ["bob@example.com"]
    archive = writer.archive_session(
        {
            "session_name": "chat-42",
            "history": [{"role": "user", "content": "hi"}, {"role": "agent", "content": "hello"}],
            "user_profile": {"lang": "en"},
        }
    ).value
    assert archive.message_count == 2
    counts = one(
        pg,
        "SELECT (SELECT count(*) FROM audit_logs), (SELECT count(*) FROM email_records),"
        " (SELECT count(*) FROM session_archives)",
    )
    assert counts == (1, 1, 1)
    with pytest.raises(Conflict):
        writer.archive_session({"session_name": "chat-42"})


def test_audit_can_be_turned_off(writer: Writer, pg: Conn) -> None:
    quiet = Writer(writer.database, audit=False)
    quiet.create_ticket({"title": "t"})
    assert one(pg, "SELECT count(*) FROM audit_logs") == 0
