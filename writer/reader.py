"""The cache reader: Redis first, PostgreSQL on a miss, optionally after a write's token.

``CacheReader.ticket(id, after=token)`` first waits (up to ``timeout``) until the daemon's
checkpoint in Redis (``cdc:state`` field ``lsn``) reaches ``token``, i.e. until Redis holds
that write or a later one, then reads the hash. A miss, or a wait that timed out, reads
PostgreSQL instead, so a caller always sees its own writes. The reader never writes to
Redis: only the daemon does, so the cache cannot drift.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import redis
from pydantic import BaseModel
from sqlalchemy import Table

from schema import keys, lsn
from schema.keys import AGENTS, TICKETS, TrackedTable
from schema.models import Agent, Ticket
from schema.pgtext import row_from_text
from schema.redis_url import redis_client
from schema.tables import Agent as AgentTable
from schema.tables import Ticket as TicketTable
from writer.base import identifier
from writer.db import Database
from writer.errors import InvalidInput, Unavailable
from writer.statements import returning

M = TypeVar("M", bound=BaseModel)


def parse_lsn(text: str) -> int:
    """A token's text to an integer WAL position."""
    try:
        return lsn.parse_lsn(text)
    except lsn.LsnError:
        raise InvalidInput("token", []) from None


class CacheReader:
    """Reads tickets and agents from the cache the daemon maintains."""

    def __init__(
        self, client: redis.Redis, database: Database | None = None, *, poll: float = 0.001
    ) -> None:
        self._redis = client
        self._db = database
        self._poll = poll

    @classmethod
    def connect(cls, redis_url: str, database: Database | None = None) -> CacheReader:
        # Every REDIS_URL form the daemon takes (rediss:// with client certificates,
        # redis+sentinel://): one parser for both, in schema.
        return cls(redis_client(redis_url, decode_responses=True), database)

    # -- read-your-writes --------------------------------------------------------------

    def applied_position(self) -> int | None:
        """The daemon's checkpoint: every transaction before it is in Redis."""
        value = self._redis.hget(keys.STATE_KEY, "lsn")
        return parse_lsn(str(value)) if value else None

    def wait(self, token: str, timeout: float = 1.0) -> bool:
        """Wait until Redis reflects the write that returned ``token`` (or a later one)."""
        target = parse_lsn(token)
        deadline = time.monotonic() + timeout
        delay = self._poll
        while True:
            position = self.applied_position()
            if position is not None and position >= target:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # -- lookups -----------------------------------------------------------------------

    def ticket(
        self, ticket_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Ticket | None:
        ticket_id = identifier(ticket_id, "ticket_id")
        return self._get(TICKETS, TicketTable.__table__, Ticket, ticket_id, after, timeout)  # type: ignore[arg-type]

    def agent(
        self, agent_id: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Agent | None:
        agent_id = identifier(agent_id, "agent_id")
        return self._get(AGENTS, AgentTable.__table__, Agent, agent_id, after, timeout)  # type: ignore[arg-type]

    def agent_by_username(
        self, username: str, *, after: str | None = None, timeout: float = 1.0
    ) -> Agent | None:
        fresh = after is None or self.wait(after, timeout)
        if fresh:
            agent_id = self._redis.get(keys.agent_username_key(username))
            if agent_id is not None:
                agent = self._get(AGENTS, AgentTable.__table__, Agent, str(agent_id), None, timeout)  # type: ignore[arg-type]
                if agent is not None and agent.username == username:
                    return agent
        rows = self._query(
            f"SELECT {returning('agents')} FROM agents WHERE username = %(key)s", {"key": username}
        )
        return Agent.model_validate(rows[0]) if rows else None

    def _get(
        self,
        tracked: TrackedTable,
        table: Table,
        model: type[M],
        row_id: str,
        after: str | None,
        timeout: float,
    ) -> M | None:
        fresh = after is None or self.wait(after, timeout)
        if fresh:
            fields: dict[str, str] = self._redis.hgetall(tracked.key(row_id))  # type: ignore[assignment]
            if fields:
                return model.model_validate(row_from_text(table, fields))
        rows = self._query(
            f"SELECT {returning(table.name)} FROM {table.name} WHERE id = %(key)s", {"key": row_id}
        )
        return model.model_validate(rows[0]) if rows else None

    def _query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self._db is None:
            raise Unavailable("cache miss and no database to fall back to")
        return [dict(row) for row in self._db.read(sql, params)]
