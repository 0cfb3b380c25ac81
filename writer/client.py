"""The :class:`Writer`: the one object services use to change tickets and agents.

It writes **only** to PostgreSQL (the ``cdc`` daemon derives Redis from the WAL), one
transaction per operation, and every operation returns :class:`~writer.db.Written`: the
row as written plus a read-your-writes token for :class:`writer.reader.CacheReader`.

    with Writer.connect(os.environ["DATABASE_URL"]) as writer:
        created = writer.create_ticket({"title": "Printer on fire"}, actor="agent-7")
        created.value.ticket_number, created.token
"""

from __future__ import annotations

from types import TracebackType

from writer.agents import AgentOperations
from writer.db import Database
from writer.records import RecordOperations
from writer.tickets import TicketOperations


class Writer(TicketOperations, AgentOperations, RecordOperations):
    """Typed write operations over a connection pool.

    ``audit=False`` skips the audit-log row operations append by default.
    """

    def __init__(self, database: Database, *, audit: bool = True) -> None:
        self._db = database
        self._audit = audit

    @classmethod
    def connect(
        cls,
        database_url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 10.0,
        audit: bool = True,
    ) -> Writer:
        database = Database(database_url, min_size=min_size, max_size=max_size, timeout=timeout)
        database.open()
        return cls(database, audit=audit)

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
