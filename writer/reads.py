"""The reads, written once: pure plans of Wait / Redis / Query steps for both readers.

Each read (a row by id, an agent by username, a list over a view) is a generator that
validates its input and yields what it needs: :class:`Wait` for a token, :class:`Redis`
commands (in one pipeline, atomic when asked), a PostgreSQL :class:`Query` as fallback.
:class:`writer.reader.CacheReader` and :class:`~writer.reader.AsyncCacheReader` only run
them (as :mod:`writer.steps` does for the write operations).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import Table

from schema import keys, lsn
from schema.enums import AgentStatus, TicketStatus
from schema.keys import AGENTS, TICKETS, TrackedTable
from schema.models import Agent, Ticket
from schema.pgtext import row_from_text
from schema.tables import Agent as AgentTable
from schema.tables import Ticket as TicketTable
from writer.base import identifier
from writer.errors import FieldProblem, InvalidInput
from writer.statements import returning

M = TypeVar("M", bound=BaseModel)
E = TypeVar("E", bound=Enum)
T = TypeVar("T")

_TICKETS: Table = TicketTable.__table__  # type: ignore[assignment]
_AGENTS: Table = AgentTable.__table__  # type: ignore[assignment]


def parse_lsn(text: str) -> int:
    """A token's text (``'16/B374D848'``) to an integer WAL position."""
    try:
        return lsn.parse_lsn(text)
    except lsn.LsnError:
        raise InvalidInput(
            "token", [FieldProblem(("token",), "not a WAL position (X/Y)", "lsn")]
        ) from None


# -- view keys (contract 6b) ---------------------------------------------------------------


def ticket_status_key(status: str) -> str:
    return f"tickets:status:{{{status}}}"


def ticket_assignee_key(agent_id: str) -> str:
    return f"tickets:assignee:{{{agent_id}}}"


def agent_status_key(status: str) -> str:
    return f"agents:status:{{{status}}}"


# -- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait until Redis reflects ``token`` in ``table``: the checkpoint of the daemon that
    mirrors it (several may share Redis) reaches it; answers whether it does (False: timed
    out, or Redis could not be asked)."""

    token: str
    timeout: float
    table: str


@dataclass(frozen=True, slots=True)
class Locate:
    """Answers the name of the state hash of the daemon that mirrors ``table``
    (:data:`schema.keys.REGISTRY_KEY`; ``cdc:state`` when none is registered)."""

    table: str


@dataclass(frozen=True, slots=True)
class Redis:
    """Run ``commands`` in one pipeline (``atomic``: inside ``MULTI``); answers the replies,
    or None when Redis could not answer (the plan then reads PostgreSQL)."""

    commands: tuple[tuple[str, ...], ...]
    atomic: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """Read PostgreSQL (the fallback); answers rows as dicts."""

    sql: str
    params: dict[str, Any]


ReadStep = Wait | Locate | Redis | Query
ReadPlan = Generator[ReadStep, Any, T]

_STATE_FIELDS = ("lsn", "loading", "rebuild", "views")


def _ready(state: Sequence[str | None]) -> bool:
    """Whether the views can answer: a checkpoint, no snapshot loading, no rebuild, and the
    daemon says it keeps the views (``views`` set in ``cdc:state``: an empty view has no
    key, so a daemon that keeps none would otherwise look like one with empty views)."""
    lsn, loading, rebuild, views = state
    return bool(lsn) and loading != "1" and not rebuild and bool(views)


def _from_hash(table: Table, model: type[M], fields: dict[str, str]) -> M:
    return model.model_validate(row_from_text(table, fields))


def _select(table: Table, where: str, order: str = "", limit: bool = False) -> str:
    sql = f"SELECT {returning(table.name)} FROM {table.name} WHERE {where}"
    if order:
        sql += f" ORDER BY {order}"
    if limit:
        sql += " LIMIT %(limit)s"
    return sql


def _row_plan(
    tracked: TrackedTable, table: Table, model: type[M], row_id: str, after: str | None, t: float
) -> ReadPlan[M | None]:
    fresh = after is None or (yield Wait(after, t, tracked.name))
    if fresh:
        replies = yield Redis((("HGETALL", tracked.key(row_id)),))
        if replies and replies[0]:
            return _from_hash(table, model, replies[0])
    rows = yield Query(_select(table, "id = %(key)s"), {"key": row_id})
    return model.model_validate(rows[0]) if rows else None


def ticket_plan(ticket_id: str, after: str | None, timeout: float) -> ReadPlan[Ticket | None]:
    ticket_id = identifier(ticket_id, "ticket_id")
    return (yield from _row_plan(TICKETS, _TICKETS, Ticket, ticket_id, after, timeout))


def agent_plan(agent_id: str, after: str | None, timeout: float) -> ReadPlan[Agent | None]:
    agent_id = identifier(agent_id, "agent_id")
    return (yield from _row_plan(AGENTS, _AGENTS, Agent, agent_id, after, timeout))


def agent_by_username_plan(
    username: str, after: str | None, timeout: float
) -> ReadPlan[Agent | None]:
    username = identifier(username, "username")  # what a username may be, or more
    fresh = after is None or (yield Wait(after, timeout, AGENTS.name))
    if fresh:
        replies = yield Redis((("GET", keys.agent_username_key(username)),))
        agent_id = replies[0] if replies else None
        if agent_id is not None:
            replies = yield Redis((("HGETALL", AGENTS.key(str(agent_id))),))
            if replies and replies[0]:
                agent = _from_hash(_AGENTS, Agent, replies[0])
                if agent.username == username:
                    return agent
    rows = yield Query(_select(_AGENTS, "username = %(key)s"), {"key": username})
    return Agent.model_validate(rows[0]) if rows else None


def _status(kind: type[E], value: object) -> E:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise InvalidInput(
            "status", [FieldProblem(("status",), f"must be one of {choices}", "enum")]
        ) from None


def _newest_first(items: list[Ticket]) -> list[Ticket]:
    return sorted(items, key=lambda t: (t.updated_at or datetime.min, t.id), reverse=True)


def _view_plan(
    view: tuple[str, ...],
    tracked: TrackedTable,
    table: Table,
    model: type[M],
    keep: Callable[[M], bool],
    fallback: Query,
    after: str | None,
    timeout: float,
) -> ReadPlan[list[M] | None]:
    """The view's rows from Redis, or None when PostgreSQL must answer (the caller's)."""
    fresh = after is None or (yield Wait(after, timeout, tracked.name))
    if fresh:
        # The state of the daemon that keeps this view (the table's: a view is derived
        # from its own table's rows only).
        state = yield Locate(tracked.name)
        replies = yield Redis((("HMGET", state, *_STATE_FIELDS), view), True)
        if replies is not None and _ready(replies[0]):
            members = replies[1]
            hashes = yield Redis(tuple(("HGETALL", tracked.key(str(m))) for m in members))
            if hashes is not None:
                found = [_from_hash(table, model, fields) for fields in hashes if fields]
                return [item for item in found if keep(item)]
    rows = yield fallback
    return [model.model_validate(row) for row in rows]


def tickets_with_status_plan(
    status: str, limit: int, after: str | None, timeout: float
) -> ReadPlan[list[Ticket]]:
    status = _status(TicketStatus, status).value
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidInput("limit", [FieldProblem(("limit",), "must be an int >= 1", "limit")])
    view = ("ZREVRANGE", ticket_status_key(status), "0", str(limit - 1))
    fallback = Query(
        _select(_TICKETS, "status = %(status)s", "updated_at DESC, id DESC", limit=True),
        {"status": status, "limit": limit},
    )
    items = yield from _view_plan(
        view, TICKETS, _TICKETS, Ticket, lambda t: t.status == status, fallback, after, timeout
    )
    return _newest_first(items or [])[:limit]


def tickets_of_plan(agent_id: str, after: str | None, timeout: float) -> ReadPlan[list[Ticket]]:
    agent_id = identifier(agent_id, "agent_id")
    fallback = Query(
        _select(_TICKETS, "assignee_id = %(agent)s", "updated_at DESC, id DESC"),
        {"agent": agent_id},
    )
    items = yield from _view_plan(
        ("SMEMBERS", ticket_assignee_key(agent_id)),
        TICKETS,
        _TICKETS,
        Ticket,
        lambda t: t.assignee_id == agent_id,
        fallback,
        after,
        timeout,
    )
    return _newest_first(items or [])


def agents_with_status_plan(
    status: str, after: str | None, timeout: float
) -> ReadPlan[list[Agent]]:
    status = _status(AgentStatus, status).value
    fallback = Query(_select(_AGENTS, "status = %(status)s", "username"), {"status": status})
    items = yield from _view_plan(
        ("SMEMBERS", agent_status_key(status)),
        AGENTS,
        _AGENTS,
        Agent,
        lambda a: a.status == status,
        fallback,
        after,
        timeout,
    )
    return sorted(items or [], key=lambda a: a.username)
