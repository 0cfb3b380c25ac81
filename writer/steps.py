"""Operations as plans: pure generators that say what they need; thin layers run them.

Every writer operation (:mod:`writer.tickets`, :mod:`writer.agents`, :mod:`writer.records`)
is written once, as a generator that validates its input, builds its statement and
*yields* what it needs done, the way psycopg's ``generators`` say what they wait for:

- :class:`Write`: the operation's one data-changing statement (the layer answers its rows);
- :class:`Read`: a query before it (the login lookup);
- :class:`Offload`: CPU-bound work (argon2 hashing) an event loop must not run inline.

The plan never touches a connection, a pool or a clock. :func:`drive` and
:func:`drive_async` run a plan with a sync or an async executor (own pooled transaction,
or the caller's transaction: :mod:`writer.client`, :mod:`writer.aclient`,
:mod:`writer.joined`), so there is exactly one copy of each statement and each check.
A :class:`~writer.errors.WriterError` raised while running a step is thrown back into the
plan, which may translate it (a missing parent ticket's foreign key becomes ``NotFound``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from writer.errors import WriterError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Options:
    """What a writer decides for every operation it runs."""

    audit: bool = True


@dataclass(frozen=True, slots=True)
class Write:
    """Run the data-changing statement; the answer is its rows (dicts)."""

    entity: str
    sql: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Read:
    """Run a query; the answer is its rows (dicts)."""

    sql: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Offload:
    """Call ``fn(*args)``: CPU-bound, so an async layer runs it in a worker thread."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


Step = Write | Read | Offload
Plan = Generator[Step, Any, T]


def method_of(method: F, plan: Callable[..., Any]) -> F:
    """Dress a layer's wrapper as ``plan``: its name, its docs, its parameters (``opts``
    becomes ``self``), so ``help()`` and editors show the operation, not ``*args``."""
    signature = inspect.signature(plan)
    params = list(signature.parameters.values())
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *params[1:]],
        return_annotation=inspect.Signature.empty,
    )
    method.__name__ = method.__qualname__ = plan.__name__
    method.__doc__ = plan.__doc__
    return method


def drive(plan: Plan[T], run: Callable[[Step], Any]) -> T:
    """Run ``plan`` to its end, answering each step with ``run(step)``."""
    answer: Any = None
    error: WriterError | None = None
    while True:
        try:
            step = plan.send(answer) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            answer = run(step)
        except WriterError as exc:
            error = exc


async def drive_async(plan: Plan[T], run: Callable[[Step], Awaitable[Any]]) -> T:
    """:func:`drive` with an async executor."""
    answer: Any = None
    error: WriterError | None = None
    while True:
        try:
            step = plan.send(answer) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            answer = await run(step)
        except WriterError as exc:
            error = exc
