"""Views (contract 6b) and the change feed (6c), planned and applied by the batch script.

Against a real Redis: the script reads the cached hash before and after each change, so
an update of any column moves a row's id between view keys, a delete removes it, and a
TOASTed patch or a primary key change keeps views right.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from cdc.cache.sink import RedisSink
from cdc.protocol.messages import UNCHANGED_TOAST, Relation, RelationColumn, Value
from cdc.transform.assemble import DELETE, INSERT, UPDATE, RowChange, TableView, make_view
from cdc.transform.plan import CommandBatch, Planner
from schema.keys import AGENTS, TICKETS

COLUMNS = ("id", "status", "assignee_id", "updated_at", "description")
TICKET = make_view(
    Relation(1, "public", "tickets", "d", tuple(RelationColumn(0, n, 25, -1) for n in COLUMNS)),
    TICKETS,
)
AGENT = make_view(
    Relation(
        2,
        "public",
        "agents",
        "i",
        tuple(RelationColumn(0, n, 25, -1) for n in ("id", "username", "status")),
    ),
    AGENTS,
)
T0 = b"2026-12-02 06:09:46.123456+00"
T1 = b"2026-12-02 07:00:00+00"


@pytest.fixture
def client(redis_url: str) -> Any:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def sink(redis_url: str) -> RedisSink:
    s = RedisSink(redis_url, timeout=5)
    s.connect()
    s.claim({"slot": "test"})
    s.reset_state({"lsn": "0/1", "slot": "test"})
    return s


class Applier:
    def __init__(self, sink: RedisSink, planner: Planner) -> None:
        self.sink = sink
        self.planner = planner
        self.lsn = 1

    def __call__(self, *changes: RowChange) -> None:
        batch = CommandBatch()
        version = b"0/%X" % (self.lsn + 1)
        for c in changes:
            self.planner.change(c, version, batch)
        self.lsn += 1
        self.sink.apply(batch, {"lsn": version.decode()})


def change(
    view: TableView,
    op: int,
    new: tuple[Value, ...] | None,
    old: tuple[Value, ...] | None = None,
    seq: int = 1,
) -> RowChange:
    return RowChange(view, op, new, old, seq)


def views(client: Any) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in sorted(client.scan_iter(match="tickets:*")) + sorted(
        client.scan_iter(match="agents:*")
    ):
        if client.type(key) == "zset":
            out[key] = dict(client.zrange(key, 0, -1, withscores=True))
        else:
            out[key] = client.smembers(key)
    return out


def test_views_follow_every_change(sink: RedisSink, client: Any) -> None:
    apply = Applier(sink, Planner(1 << 20))
    apply(
        change(TICKET, INSERT, (b"1", b"open", b"a", T0, b"d")),
        change(TICKET, INSERT, (b"2", b"open", None, T0, b"d")),
        change(AGENT, INSERT, (b"a", b"ann", b"online")),
    )
    assert views(client) == {
        "tickets:assignee:{a}": {"1"},
        "tickets:status:{open}": {"1": 1796191786.123456, "2": 1796191786.123456},
        "agents:status:{online}": {"a"},
    }
    # An update of a non-identity column without old values: the cached hash says where
    # the row was. A TOASTed patch keeps the unchanged field and still moves the id.
    apply(
        change(TICKET, UPDATE, (b"1", b"pending", b"b", T1, UNCHANGED_TOAST)),
        change(TICKET, UPDATE, (b"2", b"open", b"a", T1, b"d2")),
        change(AGENT, UPDATE, (b"a", b"ann", b"busy"), (b"a", b"ann", None)),
    )
    assert views(client) == {
        "tickets:assignee:{a}": {"2"},
        "tickets:assignee:{b}": {"1"},
        "tickets:status:{open}": {"2": 1796194800.0},
        "tickets:status:{pending}": {"1": 1796194800.0},
        "agents:status:{busy}": {"a"},
    }
    # Primary key change, delete: the old id leaves, no empty key stays.
    apply(
        change(TICKET, UPDATE, (b"9", b"pending", b"b", T1, b"d"), (b"1", None, None, None, None)),
        change(TICKET, DELETE, None, (b"2", None, None, None, None)),
        change(AGENT, DELETE, None, (b"a", b"ann", None)),
    )
    assert views(client) == {
        "tickets:assignee:{b}": {"9"},
        "tickets:status:{pending}": {"9": 1796194800.0},
    }
    # A key holding another type is ours: replaced.
    client.set("tickets:status:{closed}", "junk")
    apply(change(TICKET, UPDATE, (b"9", b"closed", None, T1, b"d")))
    assert views(client) == {"tickets:status:{closed}": {"9": 1796194800.0}}
    batch = CommandBatch()
    Planner(1 << 20).truncate((TICKET,), batch)
    sink.apply(batch, {"lsn": "0/99"})
    assert views(client) == {}


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("1970-01-01 00:00:00+00", 0.0),
        ("1969-12-31 23:59:59.5+00", -0.5),
        ("2000-02-29 12:00:00+02", 951818400.0),
        ("2026-12-02 06:09:46.000001+00", 1796191786.000001),
        ("infinity", float("inf")),
        ("0044-03-15 12:00:00+00 BC", -63517780800.0),
    ],
)
def test_scores_are_epoch_seconds(sink: RedisSink, client: Any, text: str, epoch: float) -> None:
    apply = Applier(sink, Planner(1 << 20))
    apply(change(TICKET, INSERT, (b"1", b"open", None, text.encode(), None)))
    assert client.zscore("tickets:status:{open}", "1") == epoch


def test_the_feed_has_one_entry_per_change(sink: RedisSink, client: Any) -> None:
    apply = Applier(sink, Planner(1 << 20, change_feed=True, feed_maxlen=1000))
    apply(
        change(TICKET, INSERT, (b"1", b"open", None, T0, b"d"), seq=1),
        change(TICKET, UPDATE, (b"1", b"pending", None, T0, UNCHANGED_TOAST), seq=2),
        change(
            TICKET,
            UPDATE,
            (b"2", b"pending", None, T0, b"d"),
            (b"1", None, None, None, None),
            seq=3,
        ),
        change(TICKET, DELETE, None, (b"2", None, None, None, None), seq=4),
        change(AGENT, INSERT, (b"a", b"ann", None), seq=5),
    )
    batch = CommandBatch()
    Planner(1 << 20, change_feed=True).truncate((TICKET, AGENT), batch, b"0/9", 6)
    sink.apply(batch, {"lsn": "0/9"})
    entries = [fields for _, fields in client.xrange("changes:tickets")]
    assert entries == [
        {
            "op": "insert",
            "id": "1",
            "lsn": "0/2",
            "seq": "0",
            "columns": "id,status,updated_at,description",
        },
        {"op": "update", "id": "1", "lsn": "0/2", "seq": "1", "columns": "status"},
        {"op": "delete", "id": "1", "lsn": "0/2", "seq": "2", "columns": ""},
        {
            "op": "insert",
            "id": "2",
            "lsn": "0/2",
            "seq": "2",
            "columns": "id,status,updated_at,description",
        },
        {"op": "delete", "id": "2", "lsn": "0/2", "seq": "3", "columns": ""},
        {"op": "truncate", "id": "", "lsn": "0/9", "seq": "5", "columns": ""},
    ]
    assert [f["op"] for _, f in client.xrange("changes:agents")] == ["insert", "truncate"]
    assert client.xrange("changes:agents")[0][1]["columns"] == "id,username"


def test_a_row_too_large_to_cache_is_in_no_view(sink: RedisSink, client: Any) -> None:
    apply = Applier(sink, Planner(40))
    apply(
        change(TICKET, INSERT, (b"1", b"open", b"a", T0, b"x" * 100)),
        change(TICKET, INSERT, (b"2", None, b"a", T0, None)),
    )
    assert client.exists("ticket:{1}") == 0
    assert views(client) == {"tickets:assignee:{a}": {"2"}}
    apply(change(TICKET, UPDATE, (b"2", b"open", b"a", T0, b"y" * 100)))
    assert views(client) == {}
