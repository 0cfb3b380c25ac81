"""The checkpoint's format: the ``cdc:state`` hash, its fields and its version.

A daemon that mirrors part of the declared tables (several daemons on one Redis) keeps the
same hash under ``cdc:state:<slot>`` (:func:`schema.keys.state_key`).

Every batch moves the checkpoint in the same atomic script run as its changes
(:mod:`cdc.cache.sink`); this module owns what the fields mean and how they are
written and read:

=========  =============================================================================
field      meaning
=========  =============================================================================
format     version of this layout (:data:`FORMAT_VERSION`)
lsn        checkpoint: every transaction whose commit record starts before it is applied
partial    ``<final_lsn>:<n>``: the first n changes of that (large) transaction are applied
fence      token of the one daemon allowed to write (set when it acquired the slot)
owner      host and pid of that daemon (for people)
source     system identifier / database / slot the cache was built from
loading    ``1`` while a snapshot is being loaded (the cache is not consistent yet)
rebuild    progress of an online rebuild (see :mod:`cdc.runtime.backfill`), empty when none
system_id  PostgreSQL system identifier of the server the cache follows
timeline   that server's timeline when last claimed (see :mod:`cdc.runtime.failover`)
epoch      1 for a first load, one more for each rebuild or reset
tables     the tables this daemon mirrors, comma-separated (also in ``cdc:tables``)
=========  =============================================================================

A state without ``format`` was written by version 1 (the same fields): a daemon migrates it
by writing ``format`` when it claims the fence. A newer format than this daemon knows is
refused (:func:`check_format`) rather than misread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cdc.errors import ConfigError
from schema.lsn import Lsn, format_lsn, parse_lsn

FORMAT_FIELD = "format"
FORMAT_VERSION = 2


def format_partial(final_lsn: int, count: int) -> str:
    """The ``partial`` marker: the first ``count`` changes of that transaction are applied."""
    return f"{format_lsn(final_lsn)}:{count}"


def parse_partial(raw: str) -> tuple[Lsn, int]:
    lsn_text, _, count = raw.partition(":")
    return parse_lsn(lsn_text), int(count)


@dataclass(frozen=True)
class CacheState:
    """What ``cdc:state`` says about the cache."""

    lsn: Lsn | None = None
    partial: tuple[Lsn, int] | None = None
    fence: str | None = None
    owner: str | None = None
    source: str | None = None
    loading: bool = False
    rebuild: str | None = None
    format: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.lsn is not None or self.fence is not None or self.loading

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> CacheState:
        text = {k.decode(): v.decode() for k, v in data.items()}
        raw_format = text.get(FORMAT_FIELD, "1")
        return cls(
            lsn=parse_lsn(text["lsn"]) if text.get("lsn") else None,
            partial=parse_partial(text["partial"]) if text.get("partial") else None,
            fence=text.get("fence") or None,
            owner=text.get("owner") or None,
            source=text.get("source") or None,
            loading=text.get("loading") == "1",
            rebuild=text.get("rebuild") or None,
            format=int(raw_format) if raw_format.isdigit() else 0,
            extra=text,
        )


def check_format(state: CacheState) -> None:
    """Refuse a state this daemon cannot read (older formats are migrated at the claim)."""
    if state.format > FORMAT_VERSION or state.format < 1:
        raise ConfigError(
            f"cdc:state has format {state.extra.get(FORMAT_FIELD)!r}, which this daemon"
            f" (format {FORMAT_VERSION}) does not know: run a newer daemon"
        )
