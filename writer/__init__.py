"""The write library services import: PostgreSQL only, typed, with read-your-writes tokens.

- :class:`AsyncWriter` (``writer.aclient``) and :class:`Writer` (``writer.client``): the
  operations; each returns :class:`Written`. Both run the same plans (``writer.steps``);
  ``writer.transaction(conn)`` runs them inside the caller's transaction
  (``writer.joined``).
- :class:`AsyncCacheReader` and :class:`CacheReader` (``writer.reader``): Redis first,
  PostgreSQL on a miss or when the cache is not ready; wait for a token when asked (woken
  by the daemon's ``cdc:applied`` messages).
- :mod:`writer.errors`: the error tree; :mod:`writer.config`: the pool settings.

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
from writer.aclient import AsyncWriter
from writer.client import Writer
from writer.config import PoolConfig
from writer.db import AsyncDatabase, Contention, Database, Written
from writer.errors import (
    Conflict,
    InvalidConfiguration,
    InvalidInput,
    InvalidReference,
    InvalidTransition,
    NotFound,
    OutcomeUnknown,
    TokenPending,
    Unavailable,
    WriterError,
)
from writer.joined import AsyncTransaction, Transaction
from writer.reader import AsyncCacheReader, CacheReader

__all__ = [
    "Agent",
    "AgentCreate",
    "AgentUpdate",
    "Assignment",
    "AsyncCacheReader",
    "AsyncDatabase",
    "AsyncTransaction",
    "AsyncWriter",
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
    "InvalidConfiguration",
    "InvalidInput",
    "InvalidReference",
    "InvalidTransition",
    "NotFound",
    "OutcomeUnknown",
    "PoolConfig",
    "SessionArchive",
    "SessionArchiveCreate",
    "StatusChange",
    "Ticket",
    "TicketAttachment",
    "TicketComment",
    "TicketCreate",
    "TicketUpdate",
    "TokenPending",
    "Transaction",
    "Unavailable",
    "Writer",
    "WriterError",
    "Written",
]
