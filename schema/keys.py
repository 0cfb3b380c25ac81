"""The Redis key layout, and which tables are streamed to Redis: declared here, once.

Both the ``cdc`` daemon (which writes these keys) and the ``writer``'s cache reader (which
reads them) import this module, so the layout cannot drift between them. Adding a table to
the cache is a new :class:`TrackedTable` entry here plus the migration that adds it to the
publication; no daemon code changes.

Layout (contract section 6):

===============================  ======  =================================================
key                              type    content
===============================  ======  =================================================
``ticket:{<id>}``                hash    one field per non-NULL column of the row
``agent:{<id>}``                 hash    the same, without ``password_hash``
``agent:username:{<username>}``  string  the agent's id
``cdc:*``                        any     the daemon's own state (checkpoint, fence) and
                                        channel (``cdc:applied``)
===============================  ======  =================================================

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
# Hash field names starting with this are the daemon's, not columns.
RESERVED_FIELD_PREFIX = "_"
# The LSN (PostgreSQL text form) of the transaction that last wrote a row.
VERSION_FIELD = "_v"


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

    def key_id(self, key: str) -> str | None:
        """The row id inside a key of this table, or None if the key is not one."""
        if key.startswith(self.key_prefix) and key.endswith("}"):
            return key[len(self.key_prefix) : -1]
        return None


TICKETS = TrackedTable(name="tickets", prefix="ticket")
AGENTS = TrackedTable(
    name="agents",
    prefix="agent",
    excluded_columns=frozenset({"password_hash"}),
    lookups=(LookupKey(prefix="agent:username", column="username"),),
)

# The tables streamed to Redis, in the order a snapshot loads them.
TRACKED_TABLES: tuple[TrackedTable, ...] = (AGENTS, TICKETS)


def ticket_key(ticket_id: str) -> str:
    return TICKETS.key(ticket_id)


def agent_key(agent_id: str) -> str:
    return AGENTS.key(agent_id)


def agent_username_key(username: str) -> str:
    return AGENTS.lookups[0].key(username)


def tracked_table(name: str) -> TrackedTable:
    for table in TRACKED_TABLES:
        if table.name == name:
            return table
    raise KeyError(name)
