"""The :class:`Writer`: the one object services use to change tickets and agents.

It writes **only** to PostgreSQL (the ``cdc`` daemon derives Redis from the WAL), one
transaction per operation, and every operation returns :class:`~writer.db.Written`: the
row as written plus a read-your-writes token for :class:`writer.reader.CacheReader`.

    with Writer.connect(os.environ["DATABASE_URL"]) as writer:
        created = writer.create_ticket({"title": "Printer on fire"}, actor="agent-7")
        created.value.ticket_number, created.token

The operations themselves are plans (:mod:`writer.steps`) shared with
:class:`writer.AsyncWriter` and the caller's-transaction layer (:meth:`Writer.transaction`);
this class only runs them on its pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from pydantic import SecretStr

from schema.models import Agent
from writer import agents, records, tickets
from writer.config import PoolConfig
from writer.db import Database, Written
from writer.errors import OutcomeUnknown
from writer.steps import Offload, Options, Plan, Read, Step, Write, drive, method_of

if TYPE_CHECKING:
    from writer.joined import Transaction

P = ParamSpec("P")
T = TypeVar("T")


class _OwnTransaction:
    """Runs a plan's steps on the pool, each write its own transaction; keeps the token."""

    __slots__ = ("db", "token")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.token: str | None = None

    def __call__(self, step: Step) -> Any:
        if isinstance(step, Write):
            rows, self.token = self.db.write(step.entity, step.sql, step.params)
            return rows
        if isinstance(step, Read):
            return [dict(row) for row in self.db.read(step.sql, step.params)]
        assert isinstance(step, Offload)
        return step.fn(*step.args)


def _operation(
    plan: Callable[Concatenate[Options, P], Plan[T]],
) -> Callable[Concatenate[Writer, P], Written[T]]:
    def method(self: Writer, /, *args: P.args, **kwargs: P.kwargs) -> Written[T]:
        run = _OwnTransaction(self._db)
        value = drive(plan(self._opts, *args, **kwargs), run)
        if run.token is None:  # pragma: no cover - every operation writes
            raise OutcomeUnknown(f"{plan.__name__}: no write was made")
        return Written(value, run.token)

    return method_of(method, plan)


class Writer:
    """Typed write operations over a connection pool.

    ``audit=False`` skips the audit-log row operations append by default.
    """

    def __init__(self, database: Database, *, audit: bool = True) -> None:
        self._db = database
        self._opts = Options(audit=audit)

    @classmethod
    def connect(
        cls,
        database_url: str,
        *,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        pool_timeout: float | None = None,
        pool_recycle: float | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
        audit: bool = True,
    ) -> Writer:
        """A writer on a new pool; unset sizes come from ``DB_POOL_*`` (:mod:`writer.config`)."""
        config = PoolConfig.resolve(
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            pool_recycle=pool_recycle,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
        )
        database = Database(database_url, pool=config)
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

    # -- the caller's transaction ------------------------------------------------------

    @contextmanager
    def transaction(self, conn: Any, *, commit: bool = True) -> Iterator[Transaction]:
        """Run operations inside the transaction of ``conn`` (see :mod:`writer.joined`).

        ``conn``: a psycopg ``Connection``, or a SQLAlchemy ``Session`` / ``Connection``
        on psycopg. With ``commit=True`` the block's end commits it (an exception rolls it
        back) and ``tx.token`` is then set; with ``commit=False`` you commit, then call
        ``tx.token_after_commit()``."""
        from writer.joined import Transaction, run_joined

        with run_joined(Transaction(self, conn), commit=commit) as tx:
            yield tx

    def token_after_commit(self, tx: Transaction) -> str:
        """The token of a caller's transaction, once it committed (else ``TokenPending``)."""
        return tx.token_after_commit()

    # -- operations ----------------------------------------------------------------------

    create_ticket = _operation(tickets.create_ticket)
    update_ticket = _operation(tickets.update_ticket)
    change_ticket_status = _operation(tickets.change_ticket_status)
    resolve_ticket = _operation(tickets.resolve_ticket)
    close_ticket = _operation(tickets.close_ticket)
    reopen_ticket = _operation(tickets.reopen_ticket)
    assign_ticket = _operation(tickets.assign_ticket)
    add_comment = _operation(tickets.add_comment)
    add_attachment = _operation(tickets.add_attachment)
    create_agent = _operation(agents.create_agent)
    update_agent = _operation(agents.update_agent)
    set_agent_password = _operation(agents.set_agent_password)
    deactivate_agent = _operation(agents.deactivate_agent)
    reactivate_agent = _operation(agents.reactivate_agent)
    append_audit_log = _operation(records.append_audit_log)
    record_email = _operation(records.record_email)
    archive_session = _operation(records.archive_session)

    def authenticate_agent(self, username: str, password: str | SecretStr) -> Written[Agent] | None:
        """The agent if ``password`` is right and the account is active, else None.

        A successful login records ``last_login_at`` (and upgrades an outdated hash)."""
        run = _OwnTransaction(self._db)
        agent = drive(agents.authenticate_agent(self._opts, username, password), run)
        if agent is None or run.token is None:
            return None
        return Written(agent, run.token)
