"""Structured logs (structlog), rendered as text or JSON (``CDC_LOG_FORMAT``) on stderr.

Log events name what happened and carry numbers (LSNs, counts, durations); they never
carry row contents or connection secrets, at any level. Connection strings are only shown
rebuilt without their secrets (:meth:`schema.dsn.Dsn.describe`); on top of that, every
rendered line, every one-line error and every uncaught traceback passes through
:func:`scrub`, which masks the secret values the configuration carries (passwords in
``DATABASE_URL``/``CDC_DATABASE_URL``/``REDIS_URL``, ``PGPASSWORD``), should a driver's
exception text ever quote one.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import structlog

from schema.dsn import secret_forms

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

MASK = "***"

# The secret values to mask (raw, percent-encoded, JSON-escaped), longest first.
_secrets: list[str] = []


def set_secrets(secrets: Iterable[str]) -> None:
    """Remember the values :func:`scrub` masks (the settings' passwords)."""
    _secrets[:] = secret_forms(secrets)


def scrub(text: str) -> str:
    """``text`` with every known secret value replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _scrub_rendered(logger: Any, method: str, rendered: Any) -> Any:
    return scrub(rendered) if isinstance(rendered, str) else rendered


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    name = args.thread.name if args.thread is not None else "?"
    sys.stderr.write(scrub(f"Exception in thread {name}:\n{text}"))


class _ScrubbingFormatter(logging.Formatter):
    """For libraries logging through :mod:`logging` (psycopg, redis): masked too."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def configure(fmt: str = "text", level: str = "info", secrets: Iterable[str] = ()) -> None:
    set_secrets(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ScrubbingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS.get(level, logging.INFO), logging.WARNING))
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
            _scrub_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Tracebacks nobody caught (a bug) are printed masked too.
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def get(name: str = "cdc") -> Any:
    return structlog.get_logger(name)
