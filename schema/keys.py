"""The Redis key layout, and which tables are streamed to Redis: declared here, once.

Both the ``cdc`` daemon (which writes these keys) and the ``writer``'s cache reader (which
reads them) import this module, so the layout cannot drift between them. What is cached is
declared in ``schema/cache.toml`` (see :mod:`schema.config`): adding a table to the cache
is an entry there plus the migration that adds it to the publication; no code changes.

Layout (contract section 6):

===============================  ======  =================================================
key                              type    content
===============================  ======  =================================================
``ticket:{<id>}``                hash    one field per non-NULL column of the row
``agent:{<id>}``                 hash    the same, without ``password_hash``
``agent:username:{<username>}``  string  the agent's id
``cdc:*``                        any     the daemons' own state (``cdc:state``, or
                                        ``cdc:state:<slot>`` per daemon when several
                                        share Redis), registry (``cdc:tables``) and
                                        channel (``cdc:applied``)
===============================  ======  =================================================

Views (contract section 6b), kept from the cached rows in the same atomic apply:

================================  ==========  ==============================================
key                               type        content
================================  ==========  ==============================================
``tickets:status:{<status>}``     sorted set  ticket ids; score: ``updated_at`` epoch seconds
``tickets:assignee:{<agent id>}`` set         ids of the tickets assigned to that agent
``agents:status:{<status>}``      set         agent ids
================================  ==========  ==============================================

``changes:<table>`` is the change feed's stream (contract section 6c), when enabled.

Field values are the text PostgreSQL prints for the column (``col::text``) in a session with
``TimeZone=UTC``. Fields starting with ``_`` are the daemon's (``_v``: the LSN of the
transaction that last wrote the row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Everything the daemon keeps for itself lives under this prefix.
CDC_PREFIX = "cdc:"
# Hash holding the checkpoint (``lsn``), the fence token and the source's identity.
STATE_KEY = CDC_PREFIX + "state"
# Pub/sub channel: the daemon publishes its checkpoint (``X/Y``) there inside each batch's
# atomic apply, so readers waiting on a token wake when it is visible (``&cdc:*`` in an ACL).
APPLIED_CHANNEL = CDC_PREFIX + "applied"
# The slot a daemon uses unless CDC_SLOT says otherwise.
DEFAULT_SLOT = "cdc_cache"
# Several daemons on one Redis (README "Several daemons, one Redis"): hash of table name ->
# the state key of the daemon that mirrors it, so readers find whose checkpoint to wait on.
REGISTRY_KEY = CDC_PREFIX + "tables"


def state_key(slot: str, mirrors_all: bool = True) -> str:
    """The checkpoint hash of the daemon on ``slot``.

    A daemon that mirrors every declared table, and any daemon on the default slot, keeps
    the single-daemon layout (``cdc:state``, plain ``X/Y`` messages on ``cdc:applied``),
    so existing caches and tooling see no change. A daemon that mirrors part of them
    (its publication holds only some) keys its state by slot: ``cdc:state:<slot>``.
    Slot names are ``[a-z0-9_]``, safe in a key name."""
    if mirrors_all or slot == DEFAULT_SLOT:
        return STATE_KEY
    return f"{STATE_KEY}:{slot}"


def applied_message(state: str, lsn: str) -> str:
    """What a daemon publishes on :data:`APPLIED_CHANNEL` when its checkpoint is ``lsn``:
    ``X/Y`` for :data:`STATE_KEY` (unchanged), ``X/Y <state key>`` for a keyed state (a
    reader that only knows the first form ignores the second)."""
    return lsn if state == STATE_KEY else f"{lsn} {state}"


def parse_applied(message: str) -> tuple[str, str]:
    """(state key, ``X/Y``) of a message on :data:`APPLIED_CHANNEL`."""
    lsn, _, state = message.partition(" ")
    return state or STATE_KEY, lsn


# Hash field names starting with this are the daemon's, not columns.
RESERVED_FIELD_PREFIX = "_"
# The LSN (PostgreSQL text form) of the transaction that last wrote a row.
VERSION_FIELD = "_v"
# Set in cdc:state ("1") when the daemon keeps the views (contract 6b) of every row.
VIEWS_STATE_FIELD = "views"


@dataclass(frozen=True, slots=True)
class LookupKey:
    """A string key mapping one column's value to the row's id (``agent:username:{x}``)."""

    prefix: str
    column: str

    def key(self, value: str) -> str:
        return f"{self.prefix}:{{{value}}}"

    @property
    def key_prefix(self) -> str:
        """What every key of this lookup starts with."""
        return f"{self.prefix}:{{"


@dataclass(frozen=True, slots=True)
class View:
    """Row ids grouped by one column's value: ``<prefix>:{<value>}``, a set, or a sorted
    set scored by the epoch seconds of the ``score`` column."""

    prefix: str
    column: str
    score: str | None = None

    def key(self, value: str) -> str:
        return f"{self.prefix}:{{{value}}}"

    @property
    def key_prefix(self) -> str:
        """What every key of this view starts with."""
        return f"{self.prefix}:{{"

    @property
    def sorted(self) -> bool:
        return self.score is not None

    def key_value(self, key: str) -> str | None:
        """The column value a key of this view is for, or None if the key is not one."""
        if key.startswith(self.key_prefix) and key.endswith("}"):
            return key[len(self.key_prefix) : -1]
        return None


# The change feed of a table is the stream ``changes:<table>`` (contract section 6c).
FEED_PREFIX = "changes:"


def match_prefix(prefix: str) -> str:
    """A Redis glob (``SCAN MATCH``) for every key that starts with ``prefix``."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"


@dataclass(frozen=True, slots=True)
class TrackedTable:
    """A table whose rows are mirrored to Redis hashes ``<prefix>:{<id>}``."""

    name: str
    prefix: str
    schema: str = "public"
    primary_key: str = "id"
    excluded_columns: frozenset[str] = frozenset()
    lookups: tuple[LookupKey, ...] = ()
    views: tuple[View, ...] = ()
    # Columns the replica identity must carry on UPDATE/DELETE (besides the primary key)
    # so that lookup keys can be removed when their value changes or the row goes.
    identity_columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "identity_columns",
            (self.primary_key, *(lookup.column for lookup in self.lookups)),
        )

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    def key(self, row_id: str) -> str:
        return f"{self.prefix}:{{{row_id}}}"

    @property
    def key_prefix(self) -> str:
        """What every row key of this table starts with (for scans)."""
        return f"{self.prefix}:{{"

    @property
    def feed_key(self) -> str:
        """The change feed's stream of this table."""
        return FEED_PREFIX + self.name

    @property
    def owned_prefixes(self) -> tuple[str, ...]:
        """Every key prefix the cache of this table writes: rows, lookups, views (a
        rebuild clears them; the change feed is history and stays)."""
        return (
            self.key_prefix,
            *(lookup.key_prefix for lookup in self.lookups),
            *(view.key_prefix for view in self.views),
        )

    def key_id(self, key: str) -> str | None:
        """The row id inside a key of this table, or None if the key is not one."""
        if key.startswith(self.key_prefix) and key.endswith("}"):
            return key[len(self.key_prefix) : -1]
        return None


def _declared() -> tuple[TrackedTable, ...]:
    # Imported here: schema.config builds on the classes above.
    from schema.config import load_tables

    return load_tables()


# The tables streamed to Redis, in the order a snapshot loads them: the packaged
# declaration (schema/cache.toml); the daemon reads CDC_CONFIG instead when it is set.
TRACKED_TABLES: tuple[TrackedTable, ...] = _declared()


def tracked_table(name: str) -> TrackedTable:
    for table in TRACKED_TABLES:
        if table.name == name:
            return table
    raise KeyError(name)


TICKETS = tracked_table("tickets")
AGENTS = tracked_table("agents")


def ticket_key(ticket_id: str) -> str:
    return TICKETS.key(ticket_id)


def agent_key(agent_id: str) -> str:
    return AGENTS.key(agent_id)


def agent_username_key(username: str) -> str:
    return AGENTS.lookups[0].key(username)


def _view(table: TrackedTable, column: str) -> View:
    for view in table.views:
        if view.column == column:
            return view
    raise KeyError(f"{table.name} has no view over {column}")


def ticket_status_key(status: str) -> str:
    """``tickets:status:{<status>}`` (contract 6b), as the declaration names it."""
    return _view(TICKETS, "status").key(status)


def ticket_assignee_key(agent_id: str) -> str:
    return _view(TICKETS, "assignee_id").key(agent_id)


def agent_status_key(status: str) -> str:
    return _view(AGENTS, "status").key(status)
