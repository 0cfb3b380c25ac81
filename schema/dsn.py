"""PostgreSQL connection strings: every form libpq takes, one normaliser, no secret shown.

``writer``, ``cdc`` and ``migrations`` all read ``DATABASE_URL`` (and the daemon
``CDC_DATABASE_URL``) through :func:`parse_dsn`. It accepts what libpq accepts:

- a ``postgresql://`` / ``postgres://`` URL, with ``?password=`` and any other libpq
  parameter, multi-host (``postgresql://a,b/db?target_session_attrs=read-write``);
- a keyword DSN (``host=a,b dbname=support user=cdc password=… target_session_attrs=…``);
- ``service=…`` (``PGSERVICEFILE``), and nothing at all for the password, which libpq then
  takes from ``PGPASSWORD`` or ``.pgpass`` / ``passfile`` when it connects;
- the SQLAlchemy forms ``postgresql+psycopg://`` and ``postgresql+asyncpg://`` (their
  driver-specific parameters are refused: everything here connects with psycopg).

Parsing is libpq's own (``psycopg.conninfo.conninfo_to_dict``); the normalised form is a
keyword DSN built by ``make_conninfo``. Nothing here redacts a string: what may be shown
(:meth:`Dsn.describe`) is rebuilt from the parsed parameters without the secret ones, and an
invalid string is never echoed (libpq's own messages may quote a fragment of it), only what
is wrong with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

#: Parameters whose value is a secret: never shown, registered for masking.
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})

#: Parameters asyncpg (and SQLAlchemy's asyncpg dialect) understand and libpq does not.
ASYNCPG_ONLY_PARAMETERS = frozenset(
    {
        "ssl",
        "direct_tls",
        "command_timeout",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "prepared_statement_cache_size",
        "prepared_statement_name_func",
        "server_settings",
        "async_fallback",
    }
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_PLAIN = ("postgresql", "postgres")
_SQLALCHEMY = {
    "postgresql+psycopg": "psycopg",
    "postgres+psycopg": "psycopg",
    "postgresql+psycopg2": "psycopg",
    "postgresql+asyncpg": "asyncpg",
    "postgres+asyncpg": "asyncpg",
}
# Shown first in describe(), in this order; the rest sorted.
_DISPLAY_ORDER = ("host", "hostaddr", "port", "dbname", "user", "service")
_FORMS = "a postgresql:// URL or a keyword DSN (host=… dbname=… user=…)"


class DsnError(ValueError):
    """A connection string that cannot be used. The message names the variable and what is
    wrong; it never contains the string (or any part of it)."""


@dataclass(frozen=True, slots=True)
class Dsn:
    """A parsed connection string. ``str()``/``repr()`` show :meth:`describe`, never the
    password; :attr:`conninfo` is what to hand to psycopg (it may contain the password)."""

    params: Mapping[str, str] = field(repr=False)
    form: str = "keyword"  # "url", "keyword", "sqlalchemy+psycopg", "sqlalchemy+asyncpg"
    extra_secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def conninfo(self) -> str:
        """The libpq keyword DSN (contains the password if one was given)."""
        return make_conninfo("", **self.params)

    def describe(self) -> str:
        """The connection without secrets: ``host=… port=… dbname=… user=… password=***``."""
        shown: dict[str, str] = {}
        for key in (*_DISPLAY_ORDER, *sorted(set(self.params) - set(_DISPLAY_ORDER))):
            if key in self.params:
                shown[key] = "***" if key in SECRET_PARAMETERS else self.params[key]
        if not shown:
            return "(libpq defaults)"
        return make_conninfo("", **shown)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"Dsn({self.describe()!r})"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value this string carries (to mask them wherever text is printed)."""
        found = [self.params[k] for k in SECRET_PARAMETERS if self.params.get(k)]
        return tuple(dict.fromkeys([*found, *self.extra_secrets]))

    def with_params(self, **params: str) -> Dsn:
        return Dsn({**self.params, **params}, self.form, self.extra_secrets)


def parse_dsn(text: str, name: str = "DATABASE_URL") -> Dsn:
    """Parse ``text`` as libpq would; :class:`DsnError` (one line, no secret) otherwise."""
    text = text.strip()
    form = "keyword"
    extra: list[str] = []
    match = _SCHEME.match(text)
    if match:
        scheme = match.group(1).lower()
        if scheme in _SQLALCHEMY:
            driver = _SQLALCHEMY[scheme]
            form = f"sqlalchemy+{driver}"
            text = "postgresql://" + text[match.end() :]
            if driver == "asyncpg":
                _refuse_asyncpg_parameters(text, name)
        elif scheme in _PLAIN:
            form = "url"
        else:
            raise DsnError(f"{name} must be {_FORMS}, not a {scheme}:// URL")
        extra = _userinfo_password(text)
    try:
        params = conninfo_to_dict(text)
    except psycopg.Error as exc:
        raise DsnError(f"{name} is not valid: {_reason(str(exc), form)}") from None
    values = {k: str(v) for k, v in params.items() if v is not None}
    for port in values.get("port", "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise DsnError(f"{name} is not valid: a port is not a number from 1 to 65535")
    hosts = values.get("host", "").split(",")
    ports = values.get("port", "").split(",")
    if "port" in values and len(ports) not in (1, len(hosts)):
        raise DsnError(f"{name} is not valid: {len(hosts)} hosts but {len(ports)} ports")
    return Dsn(values, form, tuple(extra))


def _refuse_asyncpg_parameters(url: str, name: str) -> None:
    try:
        query = urlsplit(url).query
    except ValueError:
        return  # libpq reports what is wrong
    for key, _value in parse_qsl(query, keep_blank_values=True):
        if key in ASYNCPG_ONLY_PARAMETERS:
            hint = " (use sslmode=…)" if key == "ssl" else ""
            raise DsnError(
                f"{name}: {key} is an asyncpg-only parameter; remove it{hint}"
                " (the connection is made with psycopg/libpq)"
            )


def _userinfo_password(url: str) -> list[str]:
    """The password in a URL's user info: libpq lets ``?password=`` override it, so it may
    not reach the parsed parameters, and it is still a secret."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [unquote(password)] if password else []


def _reason(message: str, form: str) -> str:
    """What libpq found wrong, without quoting the string (its messages may)."""
    lowered = message.lower()
    if "invalid uri query parameter" in lowered:
        return "a query parameter libpq does not know (see libpq's parameter key words)"
    if "invalid connection option" in lowered:
        return "a parameter libpq does not know (see libpq's parameter key words)"
    if 'missing "="' in lowered:
        return "a word without '=' (keyword DSNs are key=value pairs; quote values with spaces)"
    if "unterminated quoted string" in lowered:
        return "an unterminated quoted value"
    if "percent-encoded" in lowered or "percent-encoding" in lowered:
        return "an invalid percent-encoding"
    if "uri" in lowered or form != "keyword":
        return f"not a URL libpq can read; it must be {_FORMS}"
    return f"it must be {_FORMS}"


def secret_forms(secrets: Iterable[str]) -> list[str]:
    """Each secret as it may appear in text: raw, percent-encoded, JSON-escaped."""
    forms: list[str] = []
    for secret in secrets:
        if not secret:
            continue
        for form in (secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]):
            if form not in forms:
                forms.append(form)
    # Longest first, so a secret containing another is masked whole.
    return sorted(forms, key=len, reverse=True)


def environment_secrets(environ: Mapping[str, str]) -> list[str]:
    """Secrets libpq takes from the environment (``PGPASSWORD``)."""
    value = environ.get("PGPASSWORD")
    return [value] if value else []


def sqlalchemy_engine(dsn: Dsn, **kwargs: Any) -> Engine:
    """A SQLAlchemy engine (psycopg driver) connecting to ``dsn``.

    The URL stays empty and each connection gets the keyword DSN at connect time, so every
    libpq form works (multi-host, service files, ``.pgpass``) and the password never
    becomes part of a SQLAlchemy URL (or of its error messages)."""
    from sqlalchemy import create_engine, event

    engine = create_engine("postgresql+psycopg://", **kwargs)
    conninfo = dsn.conninfo

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        cargs[:] = [conninfo]

    return engine
