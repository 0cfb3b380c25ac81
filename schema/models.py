"""Pydantic models: what services pass to the ``writer`` and what they get back.

Input models (``*Create``, ``*Update`` and the command models) are strict: a wrong type,
an unknown field, a NUL byte, an over-long value, a naive datetime or a missing required
field is refused here, before anything reaches PostgreSQL. Identifiers and usernames may
hold any printable character (``:*?[]{}``, spaces, unicode): Redis keys wrap them in
braces after a fixed prefix, so distinct ids always give distinct keys.

Output models mirror the tables (``schema.tables``) minus secrets: ``Agent`` has no
``password_hash``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    StringConstraints,
)

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

# -- field types ---------------------------------------------------------------------

MAX_JSON_BYTES = 256 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _json_safe(value: Any) -> Any:
    """Reject what jsonb cannot store: NUL in strings, NaN/Infinity; cap the size."""

    def walk(node: Any) -> None:
        if isinstance(node, str):
            _no_nul(node)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ValueError("must not contain NaN or Infinity")
        elif isinstance(node, dict):
            for key, item in node.items():
                _no_nul(key)
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(value)
    if len(orjson.dumps(value)) > MAX_JSON_BYTES:
        raise ValueError(f"is larger than {MAX_JSON_BYTES} bytes as JSON")
    return value


# A primary key supplied by a caller: 1-128 printable characters, anything else allowed.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128), AfterValidator(_printable)
]
Username = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(_printable)
]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_printable)]
Email = Annotated[
    str,
    StringConstraints(max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
    AfterValidator(_no_nul),
]
NoNul = AfterValidator(_no_nul)
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), NoNul]
ShortText = Annotated[str, StringConstraints(max_length=200), NoNul]
Title = Annotated[str, StringConstraints(min_length=1, max_length=500), NoNul]
LongText = Annotated[str, StringConstraints(max_length=1_000_000), NoNul]
Comment = Annotated[str, StringConstraints(min_length=1, max_length=100_000), NoNul]
Url = Annotated[str, StringConstraints(max_length=2048), NoNul]
StoragePath = Annotated[str, StringConstraints(min_length=1, max_length=1024), NoNul]
Subject = Annotated[str, StringConstraints(max_length=998), NoNul]
ErrorText = Annotated[str, StringConstraints(max_length=10_000), NoNul]
Phone = Annotated[str, StringConstraints(max_length=32, pattern=r"^[0-9+()\- ]*$")]
Keyword = Annotated[
    str, StringConstraints(min_length=1, max_length=100), AfterValidator(_printable)
]
IpAddress = Annotated[str, StringConstraints(max_length=45, pattern=r"^[0-9a-fA-F:.]+$")]
JsonObject = Annotated[dict[str, JsonValue], AfterValidator(_json_safe)]
JsonList = Annotated[list[JsonValue], AfterValidator(_json_safe)]
Labels = Annotated[list[Label], Field(max_length=100)]

# Enumerations accept their string values (lax) while everything else is strict.
Status = Annotated[TicketStatus, Field(strict=False)]
Priority = Annotated[TicketPriority, Field(strict=False)]
Kind = Annotated[TicketType, Field(strict=False)]
Role = Annotated[AgentRole, Field(strict=False)]
Presence = Annotated[AgentStatus, Field(strict=False)]


class Input(BaseModel):
    """Base of every model a service passes in: strict, closed, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, str_strip_whitespace=False)


class Output(BaseModel):
    """Base of every model the writer returns: built from trusted database rows."""

    model_config = ConfigDict(frozen=True, from_attributes=True)


# -- tickets ---------------------------------------------------------------------------


class TicketCreate(Input):
    id: Identifier | None = None
    ticket_number: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    title: Title
    description: LongText | None = None
    status: Status = TicketStatus.OPEN
    priority: Priority = TicketPriority.MEDIUM
    ticket_type: Kind = TicketType.OTHER
    category: ShortText | None = None
    channel: ShortText | None = None
    customer: JsonObject = Field(default_factory=dict)
    session_name: ShortText | None = None
    assignee_id: Identifier | None = None
    created_by: Identifier | None = None
    tags: Labels = Field(default_factory=list)
    extra_data: JsonObject = Field(default_factory=dict)
    sla_due_at: AwareDatetime | None = None


class TicketUpdate(Input):
    """Only the fields that are set are written; ``None`` clears a nullable column."""

    title: Title | None = None
    description: LongText | None = None
    priority: Priority | None = None
    ticket_type: Kind | None = None
    category: ShortText | None = None
    channel: ShortText | None = None
    customer: JsonObject | None = None
    session_name: ShortText | None = None
    tags: Labels | None = None
    extra_data: JsonObject | None = None
    sla_due_at: AwareDatetime | None = None
    first_response_at: AwareDatetime | None = None


class StatusChange(Input):
    to_status: Status
    changed_by: Identifier | None = None
    reason: ShortText | None = None
    comment: Comment | None = None
    resolution: LongText | None = None


class Assignment(Input):
    agent_id: Identifier | None
    assigned_by: Identifier | None = None
    reason: ShortText | None = None


class CommentCreate(Input):
    id: Identifier | None = None
    content: Comment
    author_id: Identifier | None = None
    author_name: Name | None = None
    comment_type: Annotated[CommentType, Field(strict=False)] = CommentType.PUBLIC
    mentions: Annotated[list[Identifier], Field(max_length=100)] = Field(default_factory=list)
    extra_data: JsonObject = Field(default_factory=dict)


class AttachmentCreate(Input):
    id: Identifier | None = None
    comment_id: Identifier | None = None
    filename: Annotated[
        str, StringConstraints(min_length=1, max_length=255), AfterValidator(_printable)
    ]
    stored_path: StoragePath
    content_type: ShortText | None = None
    size_bytes: Annotated[int, Field(ge=0, le=2**53)]
    checksum_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    uploaded_by: Identifier | None = None
    extra_data: JsonObject = Field(default_factory=dict)


class Ticket(Output):
    id: str
    ticket_number: str
    title: str
    description: str | None
    status: TicketStatus
    priority: TicketPriority
    ticket_type: TicketType
    category: str | None
    channel: str | None
    customer: dict[str, Any]
    session_name: str | None
    assignee_id: str | None
    created_by: str | None
    tags: list[Any]
    extra_data: dict[str, Any]
    resolution: str | None
    reopen_count: int
    sla_due_at: datetime | None
    first_response_at: datetime | None
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    closed_at: datetime | None


class TicketComment(Output):
    id: str
    ticket_id: str
    content: str
    author_id: str | None
    author_name: str | None
    comment_type: CommentType
    mentions: list[Any]
    extra_data: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class TicketAttachment(Output):
    id: str
    ticket_id: str
    comment_id: str | None
    filename: str
    stored_path: str
    content_type: str | None
    size_bytes: int
    checksum_sha256: str | None
    uploaded_by: str | None
    extra_data: dict[str, Any]
    created_at: datetime
    deleted_at: datetime | None


class StatusHistoryEntry(Output):
    id: int
    ticket_id: str
    from_status: TicketStatus | None
    to_status: TicketStatus
    changed_by: str | None
    reason: str | None
    comment: str | None
    extra_data: dict[str, Any]
    changed_at: datetime


class AssignmentEntry(Output):
    id: int
    ticket_id: str
    from_agent_id: str | None
    agent_id: str | None
    assigned_by: str | None
    reason: str | None
    assigned_at: datetime


# -- agents ----------------------------------------------------------------------------


Password = Annotated[SecretStr, Field(min_length=8, max_length=256)]


class AgentCreate(Input):
    id: Identifier | None = None
    username: Username
    display_name: Name
    email: Email | None = None
    password: Password
    role: Role = AgentRole.AGENT
    status: Presence = AgentStatus.OFFLINE
    skills: Labels = Field(default_factory=list)
    max_concurrent_sessions: Annotated[int, Field(ge=1, le=1000)] = 5
    avatar_url: Url | None = None
    phone: Phone | None = None
    extra_data: JsonObject = Field(default_factory=dict)


class AgentUpdate(Input):
    """Only the fields that are set are written; ``None`` clears a nullable column."""

    username: Username | None = None
    display_name: Name | None = None
    email: Email | None = None
    role: Role | None = None
    status: Presence | None = None
    skills: Labels | None = None
    max_concurrent_sessions: Annotated[int, Field(ge=1, le=1000)] | None = None
    avatar_url: Url | None = None
    phone: Phone | None = None
    extra_data: JsonObject | None = None


class Agent(Output):
    id: str
    username: str
    display_name: str
    email: str | None
    role: AgentRole
    status: AgentStatus
    skills: list[Any]
    max_concurrent_sessions: int
    is_active: bool
    avatar_url: str | None
    phone: str | None
    last_login_at: datetime | None
    extra_data: dict[str, Any]
    created_at: datetime
    updated_at: datetime


# -- audit, email, sessions --------------------------------------------------------------


class AuditLogCreate(Input):
    event_type: Keyword
    operator_id: Identifier | None = None
    target_type: ShortText | None = None
    target_id: Identifier | None = None
    details: JsonObject = Field(default_factory=dict)
    ip_address: IpAddress | None = None


class AuditLogEntry(Output):
    id: int
    event_type: str
    operator_id: str | None
    target_type: str | None
    target_id: str | None
    details: dict[str, Any]
    ip_address: str | None
    created_at: datetime


class EmailRecordCreate(Input):
    id: Identifier | None = None
    message_id: ShortText | None = None
    email_type: Keyword
    related_type: ShortText | None = None
    related_id: Identifier | None = None
    sender: Email
    recipients: Annotated[list[Email], Field(min_length=1, max_length=500)]
    cc: Annotated[list[Email], Field(max_length=500)] = Field(default_factory=list)
    bcc: Annotated[list[Email], Field(max_length=500)] = Field(default_factory=list)
    subject: Subject
    body_text: LongText | None = None
    body_html: LongText | None = None
    status: Annotated[EmailStatus, Field(strict=False)] = EmailStatus.PENDING
    error_message: ErrorText | None = None
    retry_count: Annotated[int, Field(ge=0, le=1000)] = 0
    provider: ShortText | None = None
    attachments: JsonList = Field(default_factory=list)
    extra_data: JsonObject = Field(default_factory=dict)
    sent_at: AwareDatetime | None = None


class EmailRecord(Output):
    id: str
    message_id: str | None
    email_type: str
    related_type: str | None
    related_id: str | None
    sender: str
    recipients: list[Any]
    cc: list[Any]
    bcc: list[Any]
    subject: str
    body_text: str | None
    body_html: str | None
    status: EmailStatus
    error_message: str | None
    retry_count: int
    provider: str | None
    attachments: list[Any]
    extra_data: dict[str, Any]
    sent_at: datetime | None
    created_at: datetime
    updated_at: datetime


class SessionArchiveCreate(Input):
    id: Identifier | None = None
    session_name: Annotated[
        str, StringConstraints(min_length=1, max_length=200), AfterValidator(_printable)
    ]
    user_id: Identifier | None = None
    user_profile: JsonObject = Field(default_factory=dict)
    history: JsonList = Field(default_factory=list)
    status: Annotated[SessionStatus, Field(strict=False)] = SessionStatus.CLOSED
    agent_id: Identifier | None = None
    channel: ShortText | None = None
    message_count: Annotated[int, Field(ge=0)] | None = None
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime | None = None
    closed_by: Identifier | None = None
    close_reason: ShortText | None = None
    summary: LongText | None = None
    tags: Labels = Field(default_factory=list)
    extra_data: JsonObject = Field(default_factory=dict)


class SessionArchive(Output):
    id: str
    session_name: str
    user_id: str | None
    user_profile: dict[str, Any]
    history: list[Any]
    status: SessionStatus
    agent_id: str | None
    channel: str | None
    message_count: int
    started_at: datetime | None
    ended_at: datetime | None
    closed_by: str | None
    close_reason: str | None
    summary: str | None
    tags: list[Any]
    extra_data: dict[str, Any]
    archived_at: datetime
