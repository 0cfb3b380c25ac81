"""The nine tables of the support system, as SQLAlchemy 2 typed models.

These models are the single description of the database: Alembic's migrations are checked
against them (``tests/test_migrations.py`` fails on any difference), and the ``writer``
builds its SQL from their column lists. Timestamps are ``timestamptz``; enumerations are
``text`` with a named CHECK constraint generated from :mod:`schema.enums`; nested data is
``jsonb``.

Only ``tickets`` and ``agents`` are streamed to Redis (see :mod:`schema.keys`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    SmallInteger,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from schema.enums import (
    AgentRole,
    AgentStatus,
    CommentType,
    EmailStatus,
    SessionStatus,
    TicketPriority,
    TicketStatus,
    TicketType,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, enum: type[StrEnum], name: str | None = None) -> CheckConstraint:
    values = ", ".join(f"'{member.value}'" for member in enum)
    return CheckConstraint(f"{column} IN ({values})", name=name or column)


def _now() -> Any:
    return text("now()")


def _empty_json_array() -> Any:
    return text("'[]'::jsonb")


def _empty_json_object() -> Any:
    return text("'{}'::jsonb")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# Ticket numbers come from this sequence unless the caller supplies one.
TICKET_NUMBER_SEQUENCE = Sequence("ticket_number_seq", metadata=Base.metadata)


class Agent(Base):
    """A support agent's account. ``password_hash`` is an argon2id hash; it never leaves
    PostgreSQL (the publication's column list and the daemon's grants both exclude it)."""

    __tablename__ = "agents"
    __table_args__ = (
        _one_of("role", AgentRole),
        _one_of("status", AgentStatus),
        CheckConstraint("max_concurrent_sessions > 0", name="max_concurrent_sessions_positive"),
        # The replica identity of ``agents``: every UPDATE that changes the username and
        # every DELETE carry (id, username), so the username index in Redis can follow.
        UniqueConstraint("id", "username", name="uq_agents_id_username"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    username: Mapped[str] = mapped_column(Text, unique=True)
    display_name: Mapped[str] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(Text, server_default=text("'agent'"))
    status: Mapped[str] = mapped_column(Text, server_default=text("'offline'"))
    skills: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    max_concurrent_sessions: Mapped[int] = mapped_column(Integer, server_default=text("5"))
    is_active: Mapped[bool] = mapped_column(server_default=text("true"))
    avatar_url: Mapped[str | None] = mapped_column(Text)
    phone: Mapped[str | None] = mapped_column(Text)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    extra_data: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Ticket(Base):
    """A customer-support ticket through its whole life."""

    __tablename__ = "tickets"
    __table_args__ = (
        _one_of("status", TicketStatus),
        _one_of("priority", TicketPriority),
        _one_of("ticket_type", TicketType),
        CheckConstraint("reopen_count >= 0", name="reopen_count_not_negative"),
        Index(None, "status", "priority"),
        Index(None, "assignee_id"),
        Index(None, "created_at"),
        Index("ix_tickets_customer", "customer", postgresql_using="gin"),
        Index("ix_tickets_tags", "tags", postgresql_using="gin"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    ticket_number: Mapped[str] = mapped_column(
        Text,
        unique=True,
        server_default=text("'TK-' || lpad(nextval('ticket_number_seq')::text, 8, '0')"),
    )
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'open'"))
    priority: Mapped[str] = mapped_column(Text, server_default=text("'medium'"))
    ticket_type: Mapped[str] = mapped_column(Text, server_default=text("'other'"))
    category: Mapped[str | None] = mapped_column(Text)
    channel: Mapped[str | None] = mapped_column(Text)
    customer: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    session_name: Mapped[str | None] = mapped_column(Text)
    assignee_id: Mapped[str | None] = mapped_column(ForeignKey("agents.id"))
    created_by: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    extra_data: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    resolution: Mapped[str | None] = mapped_column(Text)
    reopen_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    sla_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_response_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TicketComment(Base):
    __tablename__ = "ticket_comments"
    __table_args__ = (
        _one_of("comment_type", CommentType),
        Index(None, "ticket_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    content: Mapped[str] = mapped_column(Text)
    author_id: Mapped[str | None] = mapped_column(Text)
    author_name: Mapped[str | None] = mapped_column(Text)
    comment_type: Mapped[str] = mapped_column(Text, server_default=text("'public'"))
    mentions: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    extra_data: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class TicketAttachment(Base):
    __tablename__ = "ticket_attachments"
    __table_args__ = (
        CheckConstraint("size_bytes >= 0", name="size_not_negative"),
        Index(None, "ticket_id"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    comment_id: Mapped[str | None] = mapped_column(
        ForeignKey("ticket_comments.id", ondelete="SET NULL")
    )
    filename: Mapped[str] = mapped_column(Text)
    stored_path: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    checksum_sha256: Mapped[str | None] = mapped_column(Text)
    uploaded_by: Mapped[str | None] = mapped_column(Text)
    extra_data: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TicketStatusHistory(Base):
    """One row per status change, written in the same transaction as the change."""

    __tablename__ = "ticket_status_history"
    __table_args__ = (
        CheckConstraint(
            "from_status IS NULL OR from_status IN ("
            + ", ".join(f"'{s.value}'" for s in TicketStatus)
            + ")",
            name="from_status",
        ),
        _one_of("to_status", TicketStatus),
        Index(None, "ticket_id", "changed_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    from_status: Mapped[str | None] = mapped_column(Text)
    to_status: Mapped[str] = mapped_column(Text)
    changed_by: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    extra_data: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class TicketAssignment(Base):
    """One row per (re)assignment, written in the same transaction as the change."""

    __tablename__ = "ticket_assignments"
    __table_args__ = (Index(None, "ticket_id", "assigned_at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    ticket_id: Mapped[str] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    from_agent_id: Mapped[str | None] = mapped_column(Text)
    agent_id: Mapped[str | None] = mapped_column(ForeignKey("agents.id"))
    assigned_by: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class AuditLog(Base):
    """Append-only audit trail; the writer adds a row in the transaction it describes."""

    __tablename__ = "audit_logs"
    __table_args__ = (
        Index(None, "target_type", "target_id", "created_at"),
        Index(None, "event_type", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    event_type: Mapped[str] = mapped_column(Text)
    operator_id: Mapped[str | None] = mapped_column(Text)
    target_type: Mapped[str | None] = mapped_column(Text)
    target_id: Mapped[str | None] = mapped_column(Text)
    details: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    ip_address: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class SessionArchive(Base):
    """A closed chat session moved out of Redis into PostgreSQL for keeps."""

    __tablename__ = "session_archives"
    __table_args__ = (
        _one_of("status", SessionStatus),
        CheckConstraint("message_count >= 0", name="message_count_not_negative"),
        Index(None, "user_id", "ended_at"),
        Index(None, "agent_id"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    session_name: Mapped[str] = mapped_column(Text, unique=True)
    user_id: Mapped[str | None] = mapped_column(Text)
    user_profile: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    history: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    status: Mapped[str] = mapped_column(Text, server_default=text("'closed'"))
    agent_id: Mapped[str | None] = mapped_column(Text)
    channel: Mapped[str | None] = mapped_column(Text)
    message_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_by: Mapped[str | None] = mapped_column(Text)
    close_reason: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    extra_data: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    archived_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class EmailRecord(Base):
    """Every email the system sent or tried to send."""

    __tablename__ = "email_records"
    __table_args__ = (
        _one_of("status", EmailStatus),
        CheckConstraint("retry_count >= 0", name="retry_count_not_negative"),
        Index(None, "related_type", "related_id"),
        Index(None, "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    message_id: Mapped[str | None] = mapped_column(Text)
    email_type: Mapped[str] = mapped_column(Text)
    related_type: Mapped[str | None] = mapped_column(Text)
    related_id: Mapped[str | None] = mapped_column(Text)
    sender: Mapped[str] = mapped_column(Text)
    recipients: Mapped[Any] = mapped_column(JSONB)
    cc: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    bcc: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    subject: Mapped[str] = mapped_column(Text)
    body_text: Mapped[str | None] = mapped_column(Text)
    body_html: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    error_message: Mapped[str | None] = mapped_column(Text)
    retry_count: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))
    provider: Mapped[str | None] = mapped_column(Text)
    attachments: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_array())
    extra_data: Mapped[Any] = mapped_column(JSONB, server_default=_empty_json_object())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


metadata = Base.metadata

__all__ = [
    "TICKET_NUMBER_SEQUENCE",
    "Agent",
    "AuditLog",
    "Base",
    "EmailRecord",
    "SessionArchive",
    "Ticket",
    "TicketAssignment",
    "TicketAttachment",
    "TicketComment",
    "TicketStatusHistory",
    "metadata",
]
