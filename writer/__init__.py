"""The write library services import: PostgreSQL only, typed, with read-your-writes tokens.

- :class:`Writer` (``writer.client``): the operations; each returns :class:`Written`.
- :class:`CacheReader` (``writer.reader``): Redis first, PostgreSQL on a miss, waits for a
  token when asked.
- :mod:`writer.errors`: the error tree.

``writer`` never imports ``cdc``: the daemon is a separate process.
"""

from schema.models import (
    Agent,
    AgentCreate,
    AgentUpdate,
    Assignment,
    AttachmentCreate,
    AuditLogCreate,
    AuditLogEntry,
    CommentCreate,
    EmailRecord,
    EmailRecordCreate,
    SessionArchive,
    SessionArchiveCreate,
    StatusChange,
    Ticket,
    TicketAttachment,
    TicketComment,
    TicketCreate,
    TicketUpdate,
)
from writer.client import Writer
from writer.db import Contention, Database, Written
from writer.errors import (
    Conflict,
    InvalidInput,
    InvalidReference,
    InvalidTransition,
    NotFound,
    OutcomeUnknown,
    Unavailable,
    WriterError,
)
from writer.reader import CacheReader

__all__ = [
    "Agent",
    "AgentCreate",
    "AgentUpdate",
    "Assignment",
    "AttachmentCreate",
    "AuditLogCreate",
    "AuditLogEntry",
    "CacheReader",
    "CommentCreate",
    "Conflict",
    "Contention",
    "Database",
    "EmailRecord",
    "EmailRecordCreate",
    "InvalidInput",
    "InvalidReference",
    "InvalidTransition",
    "NotFound",
    "OutcomeUnknown",
    "SessionArchive",
    "SessionArchiveCreate",
    "StatusChange",
    "Ticket",
    "TicketAttachment",
    "TicketComment",
    "TicketCreate",
    "TicketUpdate",
    "Unavailable",
    "Writer",
    "WriterError",
    "Written",
]
