"""The writer's errors: one tree, split into what a caller may retry and what it must fix.

::

    WriterError
    ├── InvalidInput        bad input, refused before anything reached PostgreSQL
    ├── InvalidConfiguration  a bad pool setting or URL, or a connection the writer
    │                       cannot join (an asyncpg-backed session)
    ├── NotFound            the row the operation targets does not exist
    ├── Conflict            a unique constraint refused the write (nothing was written)
    ├── InvalidReference    a referenced row (agent, ticket, comment) does not exist
    ├── InvalidTransition   the ticket cannot move from its status to the one asked
    ├── Unavailable         PostgreSQL could not be reached; nothing was written (retryable)
    ├── OutcomeUnknown      the connection died (or the task was cancelled) after the write
    │                       was sent: it may or may not have been committed; read the row
    │                       back before retrying
    └── TokenPending        a caller's-transaction token asked for before that
                            transaction committed (or after it rolled back)

Messages name fields and constraints, never values: no secrets or row contents leak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class WriterError(Exception):
    """Base of every error the writer raises."""

    retryable: bool = False


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One thing wrong with the input: where (``loc``) and what (``message``, ``kind``)."""

    loc: tuple[str | int, ...]
    message: str
    kind: str

    def __str__(self) -> str:
        where = ".".join(str(part) for part in self.loc) or "input"
        return f"{where}: {self.message}"


class InvalidInput(WriterError, ValueError):
    """The input was refused before anything was sent to PostgreSQL."""

    def __init__(self, model: str, problems: Sequence[FieldProblem]) -> None:
        self.model = model
        self.problems = tuple(problems)
        summary = "; ".join(str(p) for p in self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"invalid {model}: {summary}{more}")

    @property
    def fields(self) -> set[str]:
        return {str(p.loc[0]) for p in self.problems if p.loc}


class NotFound(WriterError, LookupError):
    def __init__(self, entity: str, key: str) -> None:
        self.entity = entity
        self.key = key
        super().__init__(f"{entity} {key!r} does not exist")


class Conflict(WriterError):
    """A unique constraint refused the write; ``constraint`` names which."""

    def __init__(self, entity: str, constraint: str | None) -> None:
        self.entity = entity
        self.constraint = constraint
        super().__init__(f"{entity} conflicts with an existing row (constraint {constraint})")


class InvalidReference(WriterError):
    """A foreign key refused the write: a referenced row does not exist."""

    def __init__(self, entity: str, constraint: str | None) -> None:
        self.entity = entity
        self.constraint = constraint
        super().__init__(f"{entity} references a row that does not exist (constraint {constraint})")


class InvalidTransition(WriterError):
    def __init__(self, ticket_id: str, current: str, requested: str) -> None:
        self.ticket_id = ticket_id
        self.current = current
        self.requested = requested
        super().__init__(f"ticket {ticket_id!r} cannot go from {current!r} to {requested!r}")


class Unavailable(WriterError):
    """PostgreSQL could not be reached or refused the session; nothing was written."""

    retryable = True


class OutcomeUnknown(WriterError):
    """The connection was lost after COMMIT was sent: the write may or may not have landed.

    Do not blindly retry a non-idempotent operation: read the row back first.
    """


class InvalidConfiguration(WriterError, ValueError):
    """A pool setting, a URL or a connection the writer cannot use; says which, in one line."""


class TokenPending(WriterError):
    """The token of a caller's transaction was asked for before it committed.

    A token is only ever taken after the commit it stands for (``never earlier``); a
    transaction that rolled back has no token."""
