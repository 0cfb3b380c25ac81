"""The declared cache: which tables, keys, lookups and views (a TOML file, pydantic).

:func:`load_tables` reads a file (``CDC_CONFIG``; the default is ``schema/cache.toml``,
shipped in the package, reproducing contract sections 6 and 6b) into
:class:`~schema.keys.TrackedTable` values. It checks what the file alone can tell (key
templates, duplicates, key prefixes that would overlap each other or the daemon's own);
checks against the database (columns exist, tables and columns published, the key names
the primary key) are the daemon's, at start (``cdc.ops.checks``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schema.keys import CDC_PREFIX, FEED_PREFIX, LookupKey, TrackedTable, View

DEFAULT_CONFIG = Path(__file__).with_name("cache.toml")

_IDENT = r"[A-Za-z_][A-Za-z0-9_$]*"
_TEMPLATE = re.compile(r"^([^{}*?\[\]\\\s]+):\{(" + _IDENT + r")\}$")


class CacheConfigError(ValueError):
    """A configuration file that cannot be used; the message is one line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ViewConfig(_Model):
    key: str
    score: str | None = Field(default=None, pattern=f"^{_IDENT}$")


class TableConfig(_Model):
    name: str = Field(pattern=f"^{_IDENT}$")
    schema_: str = Field(default="public", alias="schema", pattern=f"^{_IDENT}$")
    key: str
    exclude: list[str] = []
    lookups: list[str] = []
    views: list[ViewConfig] = []


class CacheConfig(_Model):
    tables: list[TableConfig] = Field(min_length=1)


def _template(text: str, what: str) -> tuple[str, str]:
    match = _TEMPLATE.match(text)
    if match is None:
        raise CacheConfigError(f'{what} "{text}" is not of the form "<prefix>:{{<column>}}"')
    return match.group(1), match.group(2)


def tables_from(config: CacheConfig) -> tuple[TrackedTable, ...]:
    """The tracked tables a parsed file declares (checks what needs no database)."""
    tables: list[TrackedTable] = []
    prefixes: list[tuple[str, str]] = []
    for entry in config.tables:
        where = f"table {entry.name}"
        prefix, pk = _template(entry.key, f"{where}: key")
        prefixes.append((f"{prefix}:{{", f"{where} key"))
        if pk in entry.exclude:
            raise CacheConfigError(f"{where}: the primary key {pk} cannot be excluded")
        lookups = []
        for text in entry.lookups:
            lookup_prefix, column = _template(text, f"{where}: lookup")
            lookups.append(LookupKey(prefix=lookup_prefix, column=column))
            prefixes.append((f"{lookup_prefix}:{{", f"{where} lookup {text}"))
        views = []
        for view in entry.views:
            view_prefix, column = _template(view.key, f"{where}: view")
            views.append(View(prefix=view_prefix, column=column, score=view.score))
            prefixes.append((f"{view_prefix}:{{", f"{where} view {view.key}"))
        for column in [*(v.column for v in views), *(v.score for v in views if v.score)]:
            if column in entry.exclude:
                raise CacheConfigError(f"{where}: a view uses the excluded column {column}")
        if any(t.name == entry.name and t.schema == entry.schema_ for t in tables):
            raise CacheConfigError(f"{where} is declared twice")
        tables.append(
            TrackedTable(
                name=entry.name,
                prefix=prefix,
                schema=entry.schema_,
                primary_key=pk,
                excluded_columns=frozenset(entry.exclude),
                lookups=tuple(lookups),
                views=tuple(views),
            )
        )
    for i, (one, what) in enumerate(prefixes):
        if one.startswith((CDC_PREFIX, FEED_PREFIX)):
            raise CacheConfigError(f"{what}: the prefixes cdc: and changes: are the daemon's")
        for other, other_what in prefixes[i + 1 :]:
            if one.startswith(other) or other.startswith(one):
                raise CacheConfigError(f"{what} and {other_what} use overlapping keys")
    return tuple(tables)


def load_tables(path: str | Path | None = None) -> tuple[TrackedTable, ...]:
    """The tables declared by the file at ``path`` (the packaged default when None)."""
    file = Path(path) if path else DEFAULT_CONFIG
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise CacheConfigError(f"cannot read {file}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CacheConfigError(f"{file} is not valid TOML: {exc}") from None
    try:
        config = CacheConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        place = ".".join(str(p) for p in error["loc"])
        raise CacheConfigError(f"{file}: {place}: {error['msg']}") from None
    try:
        return tables_from(config)
    except CacheConfigError as exc:
        raise CacheConfigError(f"{file}: {exc}") from None
