"""``cdc verify``: compare every tracked row with its Redis key, optionally repair.

Pass 1 walks each table (a server-side cursor, bounded memory), compares each row's text
values with its hash (fields starting with ``_`` are the daemon's and ignored), checks
lookup keys, and scans Redis for keys whose rows do not exist. Because the daemon keeps
streaming meanwhile, a difference may only be in flight: pass 2 waits until the daemon's
checkpoint passes the WAL position of pass 1, then re-reads just the differing keys from
both sides. Only what still differs is reported (and, with ``--repair``, rewritten).

Repairs never overwrite a newer change. While a daemon streams the slot, the differing
rows are handed to it through the WAL (``pg_logical_emit_message`` with the prefix
``cdc:repair``) and its online backfill re-reads them, deciding by transaction visibility
which streamed changes the read has not seen (:mod:`cdc.runtime.backfill`). With no
daemon running, and for lookup keys, a key is rewritten here only if it still holds
what was read before its row was (see :meth:`Verifier._rewrite`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg import errors as pgerrors

from cdc import failpoints
from cdc.cache.views import members, reconcile
from cdc.errors import ConfigError, PostgresUnavailable, RedisUnavailable
from cdc.ops.checks import publication_mirror
from cdc.postgres import catalog
from cdc.postgres.rows import Row, existing_ids, iter_rows, rows_by_id
from cdc.runtime.snapshot import is_cluster, scan_keys
from cdc.settings import Settings
from cdc.transform.assemble import REPAIR_PREFIX, TableView, repair_content, view_from_columns
from cdc.transform.cluster_script import UNCOUNTED_FIELD
from schema.keys import (
    RESERVED_FIELD_PREFIX,
    STATE_KEY,
    TRACKED_TABLES,
    VERSION_FIELD,
    TrackedTable,
    View,
    state_key,
)
from schema.lsn import lsn_bytes, parse_lsn
from schema.redis_url import RedisTarget, cluster_url, redis_client

if TYPE_CHECKING:
    import redis

CHUNK = 1000
# How long --repair waits for the running daemon to re-read the rows it was given.
REPAIR_WAIT = 30.0
# While rows still differ, they are asked for again this often (seconds).
REPAIR_ASK_EVERY = 2.0


@dataclass
class Difference:
    key: str
    kind: str  # missing | extra | different
    fields: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "kind": self.kind}
        if self.fields:
            out["fields"] = self.fields
        return out


@dataclass
class Report:
    rows: int = 0
    keys_scanned: int = 0
    differences: list[Difference] = field(default_factory=list)
    repaired: int = 0
    rebuilding: bool = False
    # The tables checked: those the publication holds (several daemons split them).
    tables: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        by_kind: dict[str, list[Any]] = {"missing": [], "extra": [], "different": []}
        for diff in self.differences:
            by_kind[diff.kind].append(diff.key if diff.kind != "different" else diff.as_dict())
        return {
            "equal": self.equal,
            "rows": self.rows,
            "keys_scanned": self.keys_scanned,
            **by_kind,
            "repaired": self.repaired,
            "rebuilding": self.rebuilding,
            "tables": self.tables,
        }

    def lines(self, limit: int = 100) -> list[str]:
        out = []
        for diff in self.differences[:limit]:
            suffix = f" ({', '.join(diff.fields)})" if diff.fields else ""
            out.append(f"{diff.kind:<9} {diff.key}{suffix}")
        if len(self.differences) > limit:
            out.append(f"... and {len(self.differences) - limit} more")
        counts = {
            k: sum(1 for d in self.differences if d.kind == k)
            for k in ("missing", "extra", "different")
        }
        summary = (
            f"checked {self.rows} rows ({', '.join(self.tables)})"
            f" and {self.keys_scanned} keys: "
            f"{counts['missing']} missing, {counts['extra']} extra, {counts['different']} different"
        )
        if self.repaired:
            summary += f"; repaired {self.repaired}"
        if self.rebuilding:
            summary += (
                " (the daemon is rebuilding the cache: differences are expected until it finishes)"
            )
        out.append(summary)
        return out


def expected_hash(view: TableView, row: Row) -> dict[bytes, bytes]:
    return {
        view.field_names[i]: value
        for i, value in enumerate(row)
        if value is not None and view.included[i]
    }


def actual_hash(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    reserved = RESERVED_FIELD_PREFIX.encode()
    return {k: v for k, v in fields.items() if not k.startswith(reserved)}


def too_large(view: TableView, row: Row, limit: int) -> bool:
    """Whether the daemon leaves ``row`` out of the cache (``CDC_MAX_ROW_BYTES``: the
    same sum of its cached values' bytes as :mod:`cdc.transform.plan` takes)."""
    size = 0
    for i, value in enumerate(row):
        if value is not None and view.included[i]:
            size += len(value)
    return size > limit


def compare(
    view: TableView, row: Row | None, fields: dict[bytes, bytes], limit: int | None = None
) -> tuple[str, list[str]] | None:
    """None when equal, else (kind, differing field names). ``limit``: a row larger than
    that is not cached (its key must be absent)."""
    if row is not None and limit is not None and too_large(view, row, limit):
        row = None
    if row is None:
        return ("extra", []) if fields else None
    if not fields:
        return ("missing", [])
    expected = expected_hash(view, row)
    actual = actual_hash(fields)
    if expected == actual:
        return None
    names = sorted({k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)})
    return ("different", [n.decode() for n in names])


class Verifier:
    def __init__(
        self,
        settings: Settings,
        tables: tuple[TrackedTable, ...] = TRACKED_TABLES,
        state_key: str = STATE_KEY,
    ) -> None:
        """``tables``/``state_key``: the daemon's (:func:`verify` finds them from the
        publication, as the daemon does), so each daemon's cache is checked on its own."""
        self.settings = settings
        self.limit = settings.max_row_bytes
        # Per table, the ids of rows too large to cache (found by the row scan).
        self.oversized: dict[str, set[str]] = {}
        self.tables = tables
        self.state_key = state_key
        url = cluster_url(settings.redis, settings.redis_timeout)
        self.redis = _client(url, max(settings.redis_timeout, 10))
        # On a Redis Cluster the scans go over every primary; reads of several keys are
        # split by slot.
        self.cluster = is_cluster(self.redis)

    def close(self) -> None:
        self.redis.close()

    def run(self, repair: bool = False) -> Report:
        report = Report(tables=[t.name for t in self.tables])
        state = self.redis.hgetall(self.state_key)
        report.rebuilding = bool(state.get(b"rebuild")) or state.get(b"loading") == b"1"
        conn = catalog.connect(self.settings.catalog_conninfo, "PostgreSQL (verify)")
        try:
            suspects: list[tuple[TrackedTable, TableView, str]] = []
            for table in self.tables:
                columns = catalog.readable_columns(conn, table, self.settings.publication)
                view = view_from_columns(table, columns)
                suspects += self._scan_table(conn, table, view, report)
            if suspects:
                self._wait_for_daemon(conn)
                suspects = self._confirm(conn, suspects)
            report.differences = self._describe(conn, suspects)
            if repair and report.differences:
                self._uncounted()
                report.repaired = self._repair(conn, suspects)
                self._uncounted()  # and after: a claim may have read the first mark
            # Views after rows: a view is repaired from its rows' (repaired) hashes.
            found = self._view_differences(conn, report)
            if found:
                self._wait_for_daemon(conn)
                found = self._view_differences(conn, Report())
            report.differences += _describe_views(found)
            if repair and found:
                self._uncounted()
                report.repaired += self._repair_views(found)
                self._uncounted()
        except (pgerrors.LockNotAvailable, pgerrors.QueryCanceled) as exc:
            what = (
                "a lock (CDC_LOCK_TIMEOUT)"
                if isinstance(exc, pgerrors.LockNotAvailable)
                else ("a slow query (CDC_STATEMENT_TIMEOUT)")
            )
            raise PostgresUnavailable(f"verify gave up waiting for {what}; try again") from None
        finally:
            conn.close()
        return report

    # -- pass 1 --------------------------------------------------------------------------------

    def _scan_table(
        self, conn: catalog.Conn, table: TrackedTable, view: TableView, report: Report
    ) -> list[tuple[TrackedTable, TableView, str]]:
        suspects: list[tuple[TrackedTable, TableView, str]] = []
        conn.autocommit = False
        try:
            with conn.transaction():
                for rows in iter_rows(conn, table, view.column_names, CHUNK):
                    report.rows += len(rows)
                    pipe = self.redis.pipeline(transaction=False)
                    for row in rows:
                        pipe.hgetall(view.key(_pk(view, row)))
                        for index, position in enumerate(view.lookup_indexes):
                            value = row[position]
                            if value is not None:
                                pipe.get(view.lookup_key(index, value))
                    replies = iter(pipe.execute())
                    for row in rows:
                        row_id = _pk(view, row)
                        if compare(view, row, next(replies), self.limit) is not None:
                            suspects.append((table, view, row_id.decode()))
                        large = too_large(view, row, self.limit)
                        if large:  # not cached, nor its lookups and view members
                            self.oversized.setdefault(table.name, set()).add(row_id.decode())
                        for index, position in enumerate(view.lookup_indexes):
                            value = row[position]
                            if value is not None and next(replies) != row_id and not large:
                                suspects.append((table, view, f"lookup:{index}:{value.decode()}"))
        finally:
            conn.autocommit = True
        # Keys whose rows do not exist (and lookups pointing nowhere).
        for keys in scan_keys(self.redis, table.key_prefix):
            report.keys_scanned += len(keys)
            ids = [table.key_id(k.decode()) for k in keys]
            present = existing_ids(conn, table, [i for i in ids if i is not None])
            suspects += [(table, view, i) for i in ids if i is not None and i not in present]
        for index, lookup in enumerate(table.lookups):
            prefix = lookup.key_prefix
            for keys in scan_keys(self.redis, prefix):
                report.keys_scanned += len(keys)
                names = [k.decode()[len(prefix) : -1] for k in keys]
                targets: list[Any] = (
                    self.redis.mget_nonatomic(keys)  # type: ignore[attr-defined]
                    if self.cluster
                    else self.redis.mget(keys)
                )
                owner_rows = conn.execute(
                    f'SELECT "{lookup.column}"::text, "{table.primary_key}"::text'
                    f' FROM "{table.schema}"."{table.name}"'
                    f' WHERE "{lookup.column}"::text = ANY(%s)',
                    (names,),
                ).fetchall()
                owners = {str(v): str(i) for v, i in owner_rows}
                for name, target in zip(names, targets, strict=True):
                    if target is None or owners.get(name) != target.decode():
                        suspects.append((table, view, f"lookup:{index}:{name}"))
        return _dedupe(suspects)

    # -- pass 2 --------------------------------------------------------------------------------

    def _wait_for_daemon(self, conn: catalog.Conn, timeout: float = 5.0) -> None:
        target = catalog.current_wal_lsn(conn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.redis.hget(self.state_key, "lsn")
            if raw and parse_lsn(raw) >= target:
                return
            time.sleep(0.05)

    def _confirm(
        self, conn: catalog.Conn, suspects: list[tuple[TrackedTable, TableView, str]]
    ) -> list[tuple[TrackedTable, TableView, str]]:
        still: list[tuple[TrackedTable, TableView, str]] = []
        for table, view, ident in suspects:
            if ident.startswith("lookup:"):
                if self._lookup_problem(conn, table, ident) is not None:
                    still.append((table, view, ident))
                continue
            rows = rows_by_id(conn, table, view.column_names, [ident])
            fields = self.redis.hgetall(view.key(ident.encode()))
            if compare(view, rows[0] if rows else None, fields, self.limit) is not None:  # type: ignore[arg-type]
                still.append((table, view, ident))
            elif rows:
                for index, position in enumerate(view.lookup_indexes):
                    value = rows[0][position]
                    if (
                        value is not None
                        and self.redis.get(view.lookup_key(index, value)) != ident.encode()
                    ):
                        still.append((table, view, f"lookup:{index}:{value.decode()}"))
        return still

    def _lookup_problem(self, conn: catalog.Conn, table: TrackedTable, ident: str) -> str | None:
        _, index_text, value = ident.split(":", 2)
        lookup = table.lookups[int(index_text)]
        target = self.redis.get(lookup.key(value))
        row = conn.execute(
            f'SELECT "{table.primary_key}"::text FROM "{table.schema}"."{table.name}"'
            f' WHERE "{lookup.column}"::text = %s',
            (value,),
        ).fetchone()
        owner = str(row[0]) if row else None
        if owner is None and target is None:
            return None
        if owner is None:
            return "extra"
        if target is None:
            return "missing"
        return None if target.decode() == owner else "different"  # type: ignore[union-attr]

    def _describe(
        self, conn: catalog.Conn, suspects: list[tuple[TrackedTable, TableView, str]]
    ) -> list[Difference]:
        out = []
        for table, view, ident in suspects:
            if ident.startswith("lookup:"):
                kind = self._lookup_problem(conn, table, ident)
                _, index_text, value = ident.split(":", 2)
                if kind is not None:
                    out.append(Difference(table.lookups[int(index_text)].key(value), kind))
                continue
            rows = rows_by_id(conn, table, view.column_names, [ident])
            fields = self.redis.hgetall(view.key(ident.encode()))
            found = compare(view, rows[0] if rows else None, fields, self.limit)  # type: ignore[arg-type]
            if found is not None:
                out.append(Difference(table.key(ident), found[0], found[1]))
        return out

    # -- views ---------------------------------------------------------------------------------

    def _view_differences(self, conn: catalog.Conn, report: Report) -> list[ViewDifference]:
        """Each view compared with its SQL computation (contract 6b)."""
        out: list[ViewDifference] = []
        for table in self.tables:
            for view in table.views:
                score = f'extract(epoch from "{view.score}")::float8' if view.score else "NULL"
                expected: dict[tuple[str, str], float | None] = {}
                left_out = self.oversized.get(table.name, set())
                for value, row_id, points in conn.execute(
                    f'SELECT "{view.column}"::text, "{table.primary_key}"::text, {score}'
                    f' FROM "{table.schema}"."{table.name}" WHERE "{view.column}" IS NOT NULL'
                ).fetchall():
                    if str(row_id) in left_out:
                        continue
                    expected[(str(value), str(row_id))] = (
                        None if points is None else float(str(points))
                    )
                seen_keys: set[str] = set()
                for value, row_id, points in members(self.redis, view):
                    if value not in seen_keys:
                        seen_keys.add(value)
                        report.keys_scanned += 1
                    pair = (value, row_id)
                    if pair not in expected:
                        out.append(ViewDifference(table, view, value, row_id, "extra"))
                    elif expected.pop(pair) != points:
                        out.append(ViewDifference(table, view, value, row_id, "different"))
                for value, row_id in expected:
                    out.append(ViewDifference(table, view, value, row_id, "missing"))
        return out

    def _uncounted(self) -> None:
        """On a cluster, before writing: tell the daemon (``cdc:state``) that keys are
        written outside its counting scripts, so its slot counts no longer prove that a
        failover lost nothing (see :class:`cdc.transform.cluster_script.SlotLedger`)."""
        if self.cluster:
            self.redis.hincrby(self.state_key, UNCOUNTED_FIELD, 1)

    def _repair_views(self, found: list[ViewDifference]) -> int:
        """Each differing member made to agree with its row's hash (atomically per
        chunk, so a change the daemon applies meanwhile is never undone)."""
        repaired = 0
        groups: dict[tuple[str, str], list[ViewDifference]] = {}
        for diff in found:
            groups.setdefault((diff.table.name, diff.view.prefix), []).append(diff)
        for diffs in groups.values():
            pairs = [(d.value, d.row_id) for d in diffs]
            repaired += reconcile(self.redis, diffs[0].table, diffs[0].view, pairs)
        return repaired

    # -- repair --------------------------------------------------------------------------------

    def _repair(
        self, conn: catalog.Conn, suspects: list[tuple[TrackedTable, TableView, str]]
    ) -> int:
        """Rewrite each differing key from PostgreSQL, never over a newer change; returns
        how many of them agree afterwards.

        While a daemon streams the slot, nothing is written from here but lookup keys
        that name no row: only the daemon knows which transactions a row read has not
        seen (a DELETE committed just after the read leaves an absent key absent, so no
        token read from Redis can tell), so the rows go to it in the WAL and its backfill
        re-reads them (:meth:`_hand_over`); a lookup's owner row is re-read the same way,
        which rewrites the lookup. Without a daemon nothing else writes, and the keys are
        rewritten here, each only if it still holds what was read (:meth:`_rewrite`)."""
        if not self._daemon_streams(conn):
            return self._rewrite(conn, suspects)
        rows = [s for s in suspects if not s[2].startswith("lookup:")]
        orphans = []
        for table, view, ident in suspects:
            if ident.startswith("lookup:"):
                owner = self._lookup_owner(conn, table, ident)
                if owner is None:
                    orphans.append((table, view, ident))
                else:
                    rows.append((table, view, owner))
        if failpoints.ACTIVE:
            failpoints.hit("repair_hand_over")
        self._hand_over(conn, _dedupe(rows))
        # A lookup naming no row: deleted here, only if it still holds what was read.
        self._rewrite(conn, orphans)
        wanted = {(table.name, ident) for table, _, ident in suspects}
        still = [s for s in self._confirm(conn, suspects) if (s[0].name, s[2]) in wanted]
        return len(suspects) - len(still)

    def _daemon_streams(self, conn: catalog.Conn) -> bool:
        """Whether a daemon streams the slot (then it must do the rewriting)."""
        slot = catalog.slot_info(conn, self.settings.slot)
        if slot is None or not slot.active:
            return False
        if slot.plugin == "pgoutput" and conn.info.server_version < 140000:
            raise ConfigError(
                "cdc verify --repair cannot hand rows to a daemon streaming from PostgreSQL"
                " < 14 (pgoutput has no logical messages there): stop the daemon, then repair"
            )
        return True

    def _lookup_owner(self, conn: catalog.Conn, table: TrackedTable, ident: str) -> str | None:
        """The id of the row a ``lookup:<index>:<value>`` suspect should name, if any."""
        _, index_text, value = ident.split(":", 2)
        lookup = table.lookups[int(index_text)]
        row = conn.execute(
            f'SELECT "{table.primary_key}"::text FROM "{table.schema}"."{table.name}"'
            f' WHERE "{lookup.column}"::text = %s',
            (value,),
        ).fetchone()
        return str(row[0]) if row is not None else None

    def _hand_over(
        self, conn: catalog.Conn, rows: list[tuple[TrackedTable, TableView, str]]
    ) -> None:
        """Ask the daemon to re-read ``rows`` (logical messages, :data:`REPAIR_PREFIX`),
        then wait until they agree (or :data:`REPAIR_WAIT` passed)."""
        pending = rows
        deadline = time.monotonic() + REPAIR_WAIT
        asked = 0.0
        try:
            while pending and time.monotonic() < deadline:
                if time.monotonic() - asked >= REPAIR_ASK_EVERY:
                    # Asked again while they differ: a daemon that restarted meanwhile
                    # lost its queue of requests.
                    self._ask(conn, pending)
                    asked = time.monotonic()
                else:
                    # The daemon writes a re-read row once the stream passed the WAL
                    # position of its read: an idle server writes no WAL, so write some.
                    self._emit(conn, repair_content("", []))
                time.sleep(0.1)
                self._wait_for_daemon(conn, 1.0)
                wanted = {(table.name, ident) for table, _, ident in pending}
                pending = [s for s in self._confirm(conn, pending) if (s[0].name, s[2]) in wanted]
        except pgerrors.InsufficientPrivilege:
            raise ConfigError(
                "cdc verify --repair: the role may not call pg_logical_emit_message, by"
                " which it asks the running daemon to re-read rows (GRANT EXECUTE ON"
                " FUNCTION pg_logical_emit_message(boolean, text, text) to it)"
            ) from None

    def _ask(self, conn: catalog.Conn, rows: list[tuple[TrackedTable, TableView, str]]) -> None:
        by_table: dict[str, list[str]] = {}
        for table, _, ident in rows:
            by_table.setdefault(table.qualified_name, []).append(ident)
        for name, ids in by_table.items():
            for at in range(0, len(ids), CHUNK):
                self._emit(conn, repair_content(name, ids[at : at + CHUNK]))

    @staticmethod
    def _emit(conn: catalog.Conn, content: str) -> None:
        catalog.emit_message(conn, REPAIR_PREFIX, content)

    def _rewrite(
        self, conn: catalog.Conn, suspects: list[tuple[TrackedTable, TableView, str]]
    ) -> int:
        """Rewrite each key from PostgreSQL here, only if it still holds what was read.

        Per key: read what Redis holds (its ``_v``, or a lookup's value), then the row,
        then write in one script only if the key still holds what was read. If the
        daemon changed the key in between, its change is newer than this repair and
        stays. The repaired hash gets ``_v`` = the larger of its old version and the
        checkpoint, so versions never go backwards."""
        repaired = 0
        replace = self.redis.register_script(_REPAIR_SCRIPT)
        for table, view, ident in suspects:
            if ident.startswith("lookup:"):
                _, index_text, value = ident.split(":", 2)
                lookup = table.lookups[int(index_text)]
                key = lookup.key(value)
                seen = self._token(key, None)
                row = conn.execute(
                    f'SELECT "{table.primary_key}"::text FROM "{table.schema}"."{table.name}"'
                    f' WHERE "{lookup.column}"::text = %s',
                    (value,),
                ).fetchone()
                args: list[Any] = [seen, "string"]
                if row is not None:
                    args.append(str(row[0]))
            else:
                key = view.key(ident.encode()).decode()
                seen = self._token(key, VERSION_FIELD)
                rows = rows_by_id(conn, table, view.column_names, [ident])
                args = [seen, "hash"]
                if rows and not too_large(view, rows[0], self.limit):
                    version = self._version(seen)
                    mapping = dict(expected_hash(view, rows[0]))
                    mapping[VERSION_FIELD.encode()] = version
                    for name, field_value in mapping.items():
                        args += [name, field_value]
            if failpoints.ACTIVE:
                failpoints.hit("repair_write")
            if replace(keys=[key], args=args) == 1:
                repaired += 1
        return repaired

    def _token(self, key: str, version_field: str | None) -> str:
        """What a key holds, as the repair script sees it (see _REPAIR_SCRIPT)."""
        kind = _text(self.redis.type(key))
        if kind == "none":
            return ""
        if version_field is not None and kind == "hash":
            return "h:" + _text(self.redis.hget(key, version_field))
        if kind == "string":
            return "s:" + _text(self.redis.get(key))
        return "t:" + kind

    def _version(self, seen: str) -> bytes:
        """``_v`` for a repaired hash: never below its old one or the checkpoint."""
        raw = self.redis.hget(self.state_key, "lsn")
        checkpoint = parse_lsn(raw) if raw else 0
        old = seen[2:] if seen.startswith("h:") and len(seen) > 2 else ""
        if old:
            checkpoint = max(checkpoint, parse_lsn(old))
        return lsn_bytes(checkpoint)


# KEYS[1]: the key; ARGV: the token read before the row (see Verifier._token), the kind
# to write ("hash": field value pairs follow, "string": the value follows; nothing
# following: delete). Writes only if the key still holds what was read.
_REPAIR_SCRIPT = """
local key = KEYS[1]
local kind = redis.call('TYPE', key).ok
local token
if kind == 'none' then
  token = ''
elseif kind == 'hash' and ARGV[2] == 'hash' then
  token = 'h:' .. (redis.call('HGET', key, '_v') or '')
elseif kind == 'string' then
  token = 's:' .. redis.call('GET', key)
else
  token = 't:' .. kind
end
if token ~= ARGV[1] then return 0 end
redis.call('DEL', key)
if #ARGV > 2 then
  if ARGV[2] == 'hash' then
    redis.call('HSET', key, unpack(ARGV, 3))
  else
    redis.call('SET', key, ARGV[3])
  end
end
return 1
"""


@dataclass
class ViewDifference:
    """A view member that its SQL computation does not have, lacks, or scores otherwise."""

    table: TrackedTable
    view: View
    value: str
    row_id: str
    kind: str  # missing | extra | different


def _describe_views(found: list[ViewDifference]) -> list[Difference]:
    """One difference per view key and kind, naming the ids."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for diff in found:
        grouped.setdefault((diff.view.key(diff.value), diff.kind), []).append(diff.row_id)
    return [Difference(key, kind, sorted(ids)) for (key, kind), ids in grouped.items()]


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _pk(view: TableView, row: Row) -> bytes:
    value = row[view.pk_index]
    assert value is not None
    return value


def _dedupe(
    items: list[tuple[TrackedTable, TableView, str]],
) -> list[tuple[TrackedTable, TableView, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for table, view, ident in items:
        if (table.name, ident) not in seen:
            seen.add((table.name, ident))
            out.append((table, view, ident))
    return out


def _client(url: str, timeout: float) -> redis.Redis:
    """redis-py's client for ``url``. A cluster client connects at once: a node refusing
    the credentials (or a permission, or TLS) is configuration (exit 2, one line), an
    unreachable cluster a peer that is down, never a traceback."""
    if not RedisTarget.parse(url).cluster:
        return redis_client(url, socket_timeout=timeout)
    import redis

    from cdc.cache.cluster_sink import cluster_problem

    try:
        return redis_client(url, socket_timeout=timeout)
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        if problem := cluster_problem(exc):
            raise ConfigError(problem) from None
        raise RedisUnavailable(f"cannot reach the Redis Cluster: {type(exc).__name__}") from None


def verify(settings: Settings, repair: bool = False) -> Report:
    declared = settings.tables()
    mirrored = publication_mirror(settings, declared)
    key = state_key(settings.slot, len(mirrored) == len(declared))
    verifier = Verifier(settings, mirrored, key)
    try:
        return verifier.run(repair)
    finally:
        verifier.close()
