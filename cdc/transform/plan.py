"""Planning: each change of a tracked table becomes the Redis commands that mirror it.

Pure: operations are appended in wire form (RESP bulk strings) to a
:class:`CommandBatch`, which the sink later sends as the arguments of one
:data:`~cdc.transform.script.BATCH_SCRIPT` run, with the checkpoint. The layout is the
contract's (section 6), driven by the table's :class:`~cdc.transform.assemble.TableView`:

- update with every value present: ``DEL key`` + ``HSET key <non-NULL columns> _v
  <lsn>`` (a full replace: NULL columns and dropped columns lose their field); an insert
  is the ``HSET`` alone, since no key exists for a row that did not (deletes, truncates
  and rebuilds remove keys);
- update with unchanged TOASTed values: a patch keeps those fields, sets the others,
  removes NULLed ones; if a kept field is missing (the key was never loaded or was
  dropped) it deletes the key and the row is fetched again (``CommandBatch.patches``);
- primary key changed: the old key goes (or is renamed, for a patch);
- delete: ``DEL key``; truncate: every key of the table, by prefix scan;
- lookup keys (``agent:username:{u}`` -> id) follow their column; old values come from
  the replica identity (see the agents migration);
- a row larger than ``max_row_bytes`` is not cached: its key is deleted (readers fall
  back to PostgreSQL) and the event is counted.

Hot path, compiled by mypyc.
"""

from __future__ import annotations

from typing import Final

from cdc.errors import RecordError
from cdc.protocol.messages import UnchangedToast, Value
from cdc.protocol.resp import CRLF, append_bulk, bulk_header
from cdc.transform.assemble import DELETE, INSERT, OP_NAMES, RowChange, TableView
from schema.keys import VERSION_FIELD, match_prefix

_VERSION_RESP: Final = b"$%d\r\n%s\r\n" % (len(VERSION_FIELD), VERSION_FIELD.encode())


_OP_HSET: Final = b"$1\r\nh\r\n"
_OP_REPLACE: Final = b"$1\r\nr\r\n"
_OP_DEL: Final = b"$1\r\nd\r\n"
_OP_SET: Final = b"$1\r\ns\r\n"
_OP_PATCH: Final = b"$1\r\np\r\n"
_OP_TRUNCATE: Final = b"$1\r\nt\r\n"
_OP_WATCH: Final = b"$1\r\nw\r\n"
_OP_VIEWS: Final = b"$1\r\nu\r\n"
_OP_ADD: Final = b"$1\r\na\r\n"


class PlanError(RecordError):
    """A change that cannot be mirrored (e.g. a row without its primary key)."""


class Boundary:
    """How much of a batch its complete transactions fill (:meth:`CommandBatch.mark`)."""

    def __init__(
        self,
        buf_len: int = 0,
        commands: int = 0,
        args: int = 0,
        patches: int = 0,
        changes: int = 0,
        counts: dict[tuple[str, str], int] | None = None,
        oversized: int = 0,
    ) -> None:
        self.buf_len = buf_len
        self.commands = commands
        self.args = args
        self.patches = patches
        self.changes = changes
        self.counts: dict[tuple[str, str], int] = counts if counts is not None else {}
        self.oversized = oversized

    @property
    def empty(self) -> bool:
        return self.commands == 0 and self.changes == 0


class CommandBatch:
    """Operations for the batch script, in wire form, and what applying them reports."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.commands = 0
        self.args = 0
        # (index of the operation in this batch, table name, row id) for each patch: the
        # script reports the index of a key it found incomplete and dropped; refetch it.
        self.patches: list[tuple[int, str, bytes]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.oversized: list[tuple[str, int]] = []
        self.changes = 0
        # (index of the first operation, table name) of each change, for error reports.
        self.tables: list[tuple[int, str]] = []
        # (index of the first operation, commit LSN text, place in the transaction) of each
        # change, b"" and 0 for a load or backfill write: the versions cluster mode writes
        # under (cdc.cache.cluster_sink); the single-node script does not read them.
        self.marks: list[tuple[int, bytes, int]] = []

    def clear(self) -> None:
        self.buf = bytearray()
        self.commands = 0
        self.args = 0
        self.patches = []
        self.counts = {}
        self.oversized = []
        self.changes = 0
        self.tables = []
        self.marks = []

    @property
    def empty(self) -> bool:
        return self.commands == 0

    def count(self, table: str, op: str, n: int = 1) -> None:
        key = (table, op)
        self.counts[key] = self.counts.get(key, 0) + n

    def table_of(self, index: int) -> str:
        """The table whose change produced operation ``index``."""
        name = ""
        for first, table in self.tables:
            if first > index:
                break
            name = table
        return name

    def mark(self) -> Boundary:
        """Where the batch ends now (taken at each transaction's commit)."""
        return Boundary(
            len(self.buf),
            self.commands,
            self.args,
            len(self.patches),
            self.changes,
            dict(self.counts),
            len(self.oversized),
        )

    def split(self, cut: Boundary) -> CommandBatch:
        """Keep what precedes ``cut``; return the rest as a new batch."""
        rest = CommandBatch()
        rest.buf = self.buf[cut.buf_len :]
        rest.commands = self.commands - cut.commands
        rest.args = self.args - cut.args
        rest.patches = [(i - cut.commands, t, r) for i, t, r in self.patches[cut.patches :]]
        rest.changes = self.changes - cut.changes
        rest.oversized = self.oversized[cut.oversized :]
        rest.counts = {
            k: n - cut.counts.get(k, 0) for k, n in self.counts.items() if n - cut.counts.get(k, 0)
        }
        kept: list[tuple[int, str]] = []
        for first, table in self.tables:
            if first < cut.commands:
                kept.append((first, table))
            else:
                rest.tables.append((first - cut.commands, table))
        if kept and rest.commands and (not rest.tables or rest.tables[0][0] > 0):
            rest.tables.insert(0, (0, kept[-1][1]))
        self.tables = kept
        marks: list[tuple[int, bytes, int]] = []
        for first, lsn, seq in self.marks:
            if first < cut.commands:
                marks.append((first, lsn, seq))
            else:
                rest.marks.append((first - cut.commands, lsn, seq))
        if marks and rest.commands and (not rest.marks or rest.marks[0][0] > 0):
            rest.marks.insert(0, (0, marks[-1][1], marks[-1][2]))
        self.marks = marks
        del self.buf[cut.buf_len :]
        del self.patches[cut.patches :]
        del self.oversized[cut.oversized :]
        self.commands = cut.commands
        self.args = cut.args
        self.changes = cut.changes
        self.counts = dict(cut.counts)
        return rest

    def op(self, code: bytes, nargs: int) -> bytearray:
        """Start an operation of ``nargs`` arguments; the caller appends them to the buffer."""
        buf = self.buf
        buf += code
        n = b"%d" % nargs
        buf += bulk_header(len(n))
        buf += n
        buf += CRLF
        self.args += 2 + nargs
        self.commands += 1
        return buf


def _row_size(values: tuple[Value, ...]) -> int:
    size = 0
    for value in values:
        if isinstance(value, bytes):
            size += len(value)
    return size


class _TableSpec:
    """What the ``w`` and ``u`` operations need of a table, precomputed in wire form."""

    def __init__(self, view: TableView, feed: bool) -> None:
        tracked = view.tracked
        self.view = view
        self.nviews = len(tracked.views)
        spec = bytearray()
        append_bulk(spec, b"%d" % self.nviews)
        for v in tracked.views:
            append_bulk(spec, b"z" if v.score is not None else b"s")
            append_bulk(spec, v.key_prefix.encode())
            append_bulk(spec, v.column.encode())
            append_bulk(spec, (v.score if v.score is not None else v.column).encode())
        self.views = bytes(spec)
        self.views_nargs = 1 + 4 * self.nviews
        # For the ``a`` operation: per view its kind, key prefix, and the positions of
        # its column and score column in a row (-1: not in the relation).
        names = view.column_names
        self.view_kinds: list[bytes] = []
        self.view_prefixes: list[bytes] = []
        self.view_columns: list[int] = []
        self.view_scores: list[int] = []
        for v in tracked.views:
            self.view_kinds.append(b"z" if v.score is not None else b"s")
            self.view_prefixes.append(v.key_prefix.encode())
            self.view_columns.append(names.index(v.column) if v.column in names else -1)
            score = v.score if v.score is not None else v.column
            self.view_scores.append(names.index(score) if score in names else -1)
        # The cached columns, for an update's changed columns in the feed.
        columns = bytearray()
        ncols = 0
        for i in range(len(view.included)):
            if view.included[i]:
                columns += view.field_resp[i]
                ncols += 1
        self.columns = bytes(columns)
        self.ncols = ncols
        self.feed = feed
        self.feed_key = tracked.feed_key.encode()


class Planner:
    """Turns row changes into commands; ``max_row_bytes`` caps a cached row's size.

    With ``change_feed`` each change also appends an entry to its table's stream, capped
    at about ``feed_maxlen`` entries (contract section 6c)."""

    def __init__(
        self, max_row_bytes: int, change_feed: bool = False, feed_maxlen: int = 100_000
    ) -> None:
        self.max_row_bytes = max_row_bytes
        self.change_feed = change_feed
        self.feed_maxlen = b"%d" % feed_maxlen
        self._specs: dict[int, _TableSpec] = {}

    def _spec(self, view: TableView) -> _TableSpec:
        spec = self._specs.get(id(view))
        if spec is None or spec.view is not view:
            if len(self._specs) > 256:
                self._specs.clear()
            spec = _TableSpec(view, self.change_feed)
            self._specs[id(view)] = spec
        return spec

    # -- rows from the stream ----------------------------------------------------------

    def change(self, change: RowChange, version: bytes, out: CommandBatch) -> None:
        view = change.view
        name = view.tracked.name
        out.changes += 1
        out.count(name, OP_NAMES[change.op])
        tables = out.tables
        if not tables or tables[-1][1] != name:
            tables.append((out.commands, name))
        out.marks.append((out.commands, version, change.seq))
        spec = self._spec(view)
        feed = spec.feed
        seq = b"%d" % (change.seq - 1)
        if change.op == INSERT:
            new = change.new
            assert new is not None
            new_id = _pk(view, new)
            # A new row has no key yet (deletes, truncates and rebuilds remove keys), so
            # no DEL first: it costs Redis a command per row on the busiest path. Nor
            # view membership: its views are added from the values, nothing read.
            if self._write(view, new, version, out, replace=False) and spec.nviews:
                _append_add(out, spec, new_id, new)
            if feed:
                self._finish(out, spec, [b"insert", new_id, _columns(view, new)], version, seq)
            return
        old = change.old
        if change.op == DELETE:
            assert old is not None
            old_id = _pk(view, old)
            if spec.nviews:
                _append_watch(out, spec, old_id, view.key(old_id), False)
            self._delete(view, old, out)
            self._finish(out, spec, [b"delete", old_id, b""] if feed else [], version, seq)
            return
        new = change.new
        assert new is not None
        new_id = _pk(view, new)
        moved_from: bytes | None = None
        moved_id = b""
        if old is not None:
            before = old[view.pk_index]
            if isinstance(before, bytes) and before != new_id:
                moved_from = view.key(before)
                moved_id = before
        key = view.key(new_id)
        if moved_from is not None:
            if spec.nviews:
                _append_watch(out, spec, moved_id, moved_from, False)
                _append_watch(out, spec, new_id, key, False)
            entries = [b"delete", moved_id, b"", b"insert", new_id, _columns(view, new)]
        else:
            if spec.nviews or feed:
                _append_watch(out, spec, new_id, key, feed)
            entries = [b"update", new_id, b""]
        if old is not None:
            self._drop_changed_lookups(view, old, new, out)
        if _has_unchanged(new):
            self._patch(view, new_id, new, moved_from, version, out)
        else:
            if moved_from is not None:
                _append_del(out, moved_from)
            self._write(view, new, version, out)
        self._finish(out, spec, entries if feed else [], version, seq)

    def _finish(
        self,
        out: CommandBatch,
        spec: _TableSpec,
        entries: list[bytes],
        version: bytes,
        seq: bytes,
    ) -> None:
        """The ``u`` operation closing a change: views moved, feed entries appended."""
        if not spec.nviews and not entries:
            return
        count = len(entries) // 3
        buf = out.op(_OP_VIEWS, 7 * count)
        for k in range(count):
            append_bulk(buf, spec.feed_key)
            append_bulk(buf, self.feed_maxlen)
            append_bulk(buf, entries[3 * k])
            append_bulk(buf, entries[3 * k + 1])
            append_bulk(buf, version)
            append_bulk(buf, seq)
            append_bulk(buf, entries[3 * k + 2])

    # -- whole rows (stream, snapshot, backfill) ------------------------------------------

    def write_row(
        self,
        view: TableView,
        values: tuple[Value, ...],
        version: bytes,
        out: CommandBatch,
        replace: bool = True,
        views_empty: bool = False,
    ) -> None:
        """Replace the row's hash with ``values`` (all present), set its lookups and
        views (no feed entry: this is a load, not a change).

        ``replace=False`` skips the leading ``DEL`` for rows known to have no key yet;
        ``views_empty`` (a snapshot load, which clears view keys first) adds the row to
        its views without reading what the hash held.
        """
        spec = self._spec(view)
        out.marks.append((out.commands, b"", 0))
        if views_empty:
            if self._write(view, values, version, out, replace) and spec.nviews:
                _append_add(out, spec, _pk(view, values), values)
            return
        if spec.nviews:
            row_id = _pk(view, values)
            _append_watch(out, spec, row_id, view.key(row_id), False)
        self._write(view, values, version, out, replace)
        if spec.nviews:
            out.op(_OP_VIEWS, 0)

    def _write(
        self,
        view: TableView,
        values: tuple[Value, ...],
        version: bytes,
        out: CommandBatch,
        replace: bool = True,
    ) -> bool:
        """Write the row's hash and lookups; False when the row is too large to cache."""
        row_id = _pk(view, values)
        key = view.key(row_id)
        included = view.included
        fields = 0
        size = 0
        for i in range(len(values)):
            value = values[i]
            if isinstance(value, bytes) and included[i]:
                fields += 1
                size += len(value)
        if size > self.max_row_bytes:
            out.oversized.append((view.tracked.name, size))
            _append_del(out, key)
            for index in range(len(view.lookup_indexes)):
                position = view.lookup_indexes[index]
                value = values[position] if position >= 0 else None
                if isinstance(value, bytes):
                    _append_del(out, view.lookup_key(index, value))
            return False
        buf = out.op(_OP_REPLACE if replace else _OP_HSET, 3 + 2 * fields)
        append_bulk(buf, key)
        field_resp = view.field_resp
        for i in range(len(values)):
            value = values[i]
            if isinstance(value, bytes) and included[i]:
                buf += field_resp[i]
                buf += bulk_header(len(value))
                buf += value
                buf += CRLF
        buf += _VERSION_RESP
        append_bulk(buf, version)
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            value = values[position] if position >= 0 else None
            if isinstance(value, bytes):
                _append_set(out, view.lookup_key(index, value), row_id)
        return True

    def delete_row(
        self, view: TableView, row_id: bytes, lookups: tuple[bytes | None, ...], out: CommandBatch
    ) -> None:
        spec = self._spec(view)
        out.marks.append((out.commands, b"", 0))
        key = view.key(row_id)
        if spec.nviews:
            _append_watch(out, spec, row_id, key, False)
        _append_del(out, key)
        for index in range(len(lookups)):
            value = lookups[index]
            if value is not None:
                _append_del(out, view.lookup_key(index, value))
        if spec.nviews:
            out.op(_OP_VIEWS, 0)

    def truncate(
        self, views: tuple[TableView, ...], out: CommandBatch, version: bytes = b"", seq: int = 1
    ) -> None:
        """Remove every key of the tables (rows, lookups, views); one feed entry each."""
        patterns: list[bytes] = []
        for view in views:
            out.count(view.tracked.name, "truncate")
            patterns.append(match_prefix(view.key_prefix.decode()).encode())
            for prefix in view.lookup_prefixes:
                patterns.append(match_prefix(prefix.decode()).encode())
            for v in view.tracked.views:
                patterns.append(match_prefix(v.key_prefix).encode())
        if views:
            out.tables.append((out.commands, views[0].tracked.name))
        out.marks.append((out.commands, version, seq))
        buf = out.op(_OP_TRUNCATE, len(patterns))
        for pattern in patterns:
            append_bulk(buf, pattern)
        if self.change_feed and views:
            buf = out.op(_OP_VIEWS, 7 * len(views))
            for view in views:
                append_bulk(buf, view.tracked.feed_key.encode())
                append_bulk(buf, self.feed_maxlen)
                append_bulk(buf, b"truncate")
                append_bulk(buf, b"")
                append_bulk(buf, version)
                append_bulk(buf, b"%d" % (seq - 1))
                append_bulk(buf, b"")
        out.changes += 1

    # -- internals --------------------------------------------------------------------------

    def _delete(self, view: TableView, old: tuple[Value, ...], out: CommandBatch) -> None:
        row_id = _pk(view, old)
        _append_del(out, view.key(row_id))
        for index in range(len(view.lookup_indexes)):
            value = old[view.lookup_indexes[index]] if view.lookup_indexes[index] >= 0 else None
            if isinstance(value, bytes):
                _append_del(out, view.lookup_key(index, value))

    def _drop_changed_lookups(
        self, view: TableView, old: tuple[Value, ...], new: tuple[Value, ...], out: CommandBatch
    ) -> None:
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            if position < 0:
                continue
            before = old[position]
            if isinstance(before, bytes) and before != new[position]:
                _append_del(out, view.lookup_key(index, before))

    def _patch(
        self,
        view: TableView,
        row_id: bytes,
        new: tuple[Value, ...],
        moved_from: bytes | None,
        version: bytes,
        out: CommandBatch,
    ) -> None:
        key = view.key(row_id)
        set_args: list[bytes] = []
        del_args: list[bytes] = []
        keep_args: list[bytes] = []
        size = 0
        for i in range(len(new)):
            if not view.included[i]:
                continue
            value = new[i]
            name = view.field_names[i]
            if isinstance(value, bytes):
                set_args.append(name)
                set_args.append(value)
                size += len(value)
            elif isinstance(value, UnchangedToast):
                keep_args.append(name)
            else:
                del_args.append(name)
        if size > self.max_row_bytes:
            out.oversized.append((view.tracked.name, size))
            _append_del(out, key)
            if moved_from is not None:
                _append_del(out, moved_from)
            return
        set_args.append(VERSION_FIELD.encode())
        set_args.append(version)
        args = [key, moved_from if moved_from is not None else b""]
        args.append(b"%d" % (len(set_args) // 2))
        args += set_args
        args.append(b"%d" % len(del_args))
        args += del_args
        args.append(b"%d" % len(keep_args))
        args += keep_args
        out.patches.append((out.commands, view.tracked.name, row_id))
        buf = out.op(_OP_PATCH, len(args))
        for arg in args:
            append_bulk(buf, arg)
        for index in range(len(view.lookup_indexes)):
            position = view.lookup_indexes[index]
            value = new[position] if position >= 0 else None
            if isinstance(value, bytes):
                _append_set(out, view.lookup_key(index, value), row_id)


def _pk(view: TableView, values: tuple[Value, ...]) -> bytes:
    if view.pk_index < 0:
        raise PlanError(f"table {view.tracked.name} has no column {view.tracked.primary_key!r}")
    value = values[view.pk_index]
    if not isinstance(value, bytes):
        raise PlanError(f"a row of {view.tracked.name} arrived without its primary key")
    return value


def _has_unchanged(values: tuple[Value, ...]) -> bool:
    for value in values:
        if isinstance(value, UnchangedToast):
            return True
    return False


def _columns(view: TableView, values: tuple[Value, ...]) -> bytes:
    """The cached columns a row has a value for (NULL ones have no field)."""
    names: list[bytes] = []
    for i in range(len(values)):
        value = values[i]
        if view.included[i] and (isinstance(value, (bytes, UnchangedToast))):
            names.append(view.field_names[i])
    return b",".join(names)


def _append_watch(
    out: CommandBatch, spec: _TableSpec, row_id: bytes, key: bytes, diff: bool
) -> None:
    """The ``w`` operation: note the row's view values (and, with ``diff``, its cached
    columns) before the operations of its change."""
    ncols = spec.ncols if diff else 0
    buf = out.op(_OP_WATCH, 3 + ncols + spec.views_nargs)
    append_bulk(buf, row_id)
    append_bulk(buf, key)
    append_bulk(buf, b"%d" % ncols)
    if diff:
        buf += spec.columns
    buf += spec.views


def _append_add(
    out: CommandBatch, spec: _TableSpec, row_id: bytes, values: tuple[Value, ...]
) -> None:
    """The ``a`` operation: add a new row's id to its views, from its values."""
    buf = out.op(_OP_ADD, 2 + 4 * spec.nviews)
    append_bulk(buf, row_id)
    append_bulk(buf, b"%d" % spec.nviews)
    for v in range(spec.nviews):
        position = spec.view_columns[v]
        value = values[position] if position >= 0 else None
        score_at = spec.view_scores[v]
        score = values[score_at] if score_at >= 0 else None
        present = isinstance(value, bytes)
        append_bulk(buf, spec.view_kinds[v] if present else b"-")
        append_bulk(buf, spec.view_prefixes[v])
        append_bulk(buf, value if isinstance(value, bytes) else b"")
        append_bulk(buf, score if isinstance(score, bytes) else b"")


def _append_del(out: CommandBatch, key: bytes) -> None:
    buf = out.op(_OP_DEL, 1)
    buf += bulk_header(len(key))
    buf += key
    buf += CRLF


def _append_set(out: CommandBatch, key: bytes, value: bytes) -> None:
    buf = out.op(_OP_SET, 2)
    append_bulk(buf, key)
    append_bulk(buf, value)
