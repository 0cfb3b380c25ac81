"""Pool settings: explicit arguments first, then ``DB_POOL_*`` environment, then defaults.

The names are the ones SQLAlchemy services already set (the seeds' ``.env``):

=================  =======  ============================================================
variable           default  meaning
=================  =======  ============================================================
DB_POOL_SIZE       1        connections kept open (psycopg_pool ``min_size``)
DB_MAX_OVERFLOW    9        more connections opened under load, closed when idle again
DB_POOL_TIMEOUT    10       seconds to wait for a free connection, then ``Unavailable``
DB_POOL_RECYCLE    1800     seconds after which a connection is replaced (``max_lifetime``)
=================  =======  ============================================================

The environment is read when a writer connects (never at import); a bad value is an
:class:`~writer.errors.InvalidConfiguration` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from writer.errors import InvalidConfiguration

N = TypeVar("N", int, float)

_ENV = {
    "size": "DB_POOL_SIZE",
    "max_overflow": "DB_MAX_OVERFLOW",
    "timeout": "DB_POOL_TIMEOUT",
    "recycle": "DB_POOL_RECYCLE",
}


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """How many connections, how long to wait for one, when to replace one."""

    size: int = 1
    max_overflow: int = 9
    timeout: float = 10.0
    recycle: float = 1800.0

    @property
    def min_size(self) -> int:
        return self.size

    @property
    def max_size(self) -> int:
        return max(self.size + self.max_overflow, 1)

    @classmethod
    def resolve(
        cls,
        *,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        pool_timeout: float | None = None,
        pool_recycle: float | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> PoolConfig:
        """Explicit arguments, else the environment, else the defaults.

        ``min_size``/``max_size``/``timeout`` are psycopg_pool's own names, accepted as
        well: ``max_size`` is ``pool_size + max_overflow``."""
        env = os.environ if environ is None else environ
        defaults = cls()
        size = _pick(pool_size if pool_size is not None else min_size, env, "size", int)
        overflow = _pick(max_overflow, env, "max_overflow", int)
        wait = _pick(pool_timeout if pool_timeout is not None else timeout, env, "timeout", float)
        recycle = _pick(pool_recycle, env, "recycle", float)
        size = defaults.size if size is None else size
        if max_size is not None:
            explicit_size = pool_size is not None or min_size is not None
            if max_size < 1 or (explicit_size and max_size < size):
                raise InvalidConfiguration("max_size must be >= 1 and >= the pool size")
            # An explicit maximum wins over a larger DB_POOL_SIZE from the environment.
            size = min(size, max_size)
            overflow = max_size - size
        config = cls(
            size=size,
            max_overflow=defaults.max_overflow if overflow is None else overflow,
            timeout=defaults.timeout if wait is None else wait,
            recycle=defaults.recycle if recycle is None else recycle,
        )
        if config.timeout <= 0:
            raise InvalidConfiguration("DB_POOL_TIMEOUT must be a number of seconds > 0")
        return config


def _pick(explicit: N | None, env: Mapping[str, str], field: str, kind: type[N]) -> N | None:
    name = _ENV[field]
    if explicit is not None:
        value = explicit
    elif (raw := env.get(name, "").strip()) != "":
        try:
            value = kind(raw)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise InvalidConfiguration(f"{name} must be {what} >= 0") from None
    else:
        return None
    if value < 0 or (field == "recycle" and value == 0):
        rule = "> 0" if field == "recycle" else ">= 0"
        raise InvalidConfiguration(f"{name} must be {rule}")
    return value
