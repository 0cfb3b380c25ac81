"""Planning changes into Redis commands, and applying them through the fenced sink."""

from __future__ import annotations

import time

import hiredis
import pytest
import redis

from cdc.cache.sink import RedisSink
from cdc.errors import Fenced, RedisLost
from cdc.protocol.messages import UNCHANGED_TOAST, Relation, RelationColumn, Value
from cdc.protocol.resp import bulk_header, command, reply_end
from cdc.runtime.backfill import XidSnapshot
from cdc.transform.assemble import DELETE, INSERT, UPDATE, RowChange, make_view
from cdc.transform.plan import CommandBatch, Planner
from schema.keys import AGENTS, TICKETS, match_prefix
from schema.lsn import LsnError, format_lsn, parse_lsn

TICKET_REL = Relation(
    1,
    "public",
    "tickets",
    "d",
    tuple(RelationColumn(0, n, 25, -1) for n in ("id", "title", "description", "flag")),
)
AGENT_REL = Relation(
    2,
    "public",
    "agents",
    "i",
    tuple(RelationColumn(0, n, 25, -1) for n in ("id", "username", "password_hash")),
)
TICKET = make_view(TICKET_REL, TICKETS)
AGENT = make_view(AGENT_REL, AGENTS)
V = b"0/ABC"


_AS_COMMAND = {
    b"h": [b"HSET"],
    b"d": [b"DEL"],
    b"s": [b"SET"],
    b"p": [b"PATCH"],
    b"t": [b"TRUNCATE"],
}


def operations(batch: CommandBatch) -> list[tuple[bytes, list[bytes]]]:
    """The batch's operations, each ``(code, arguments)``."""
    reader = hiredis.Reader()
    reader.feed(bytes(batch.buf))
    items = []
    while (item := reader.gets()) is not False:
        items.append(item)
    assert len(items) == batch.args
    ops, at = [], 0
    while at < len(items):
        n = int(items[at + 1])
        ops.append((items[at], items[at + 2 : at + 2 + n]))
        at += 2 + n
    assert len(ops) == batch.commands
    return ops


def commands(batch: CommandBatch) -> list[list[bytes]]:
    """The operations as the Redis commands they stand for (a replace is DEL + HSET);
    view upkeep (``w``/``u``/``a``, tested in test_views.py) is left out."""
    out: list[list[bytes]] = []
    for code, args in operations(batch):
        if code in (b"w", b"u", b"a"):
            continue
        if code == b"r":
            out += [[b"DEL", args[0]], [b"HSET", *args]]
        else:
            out.append(_AS_COMMAND[code] + args)
    return out


def change(
    view: object, op: int, new: tuple[Value, ...] | None, old: tuple[Value, ...] | None = None
) -> RowChange:
    return RowChange(view, op, new, old, 1)  # type: ignore[arg-type]


def test_insert_writes_the_hash_without_nulls_or_excluded_columns() -> None:
    batch = CommandBatch()
    Planner(1000).change(change(TICKET, INSERT, (b"1", b"hello", None, b"true")), V, batch)
    assert commands(batch) == [
        [b"HSET", b"ticket:{1}", b"id", b"1", b"title", b"hello", b"flag", b"true", b"_v", V],
    ]
    assert batch.counts == {("tickets", "insert"): 1}
    batch = CommandBatch()
    Planner(1000).change(change(AGENT, INSERT, (b"a", b"ann", b"$argon2id$secret")), V, batch)
    assert commands(batch) == [
        [b"HSET", b"agent:{a}", b"id", b"a", b"username", b"ann", b"_v", V],
        [b"SET", b"agent:username:{ann}", b"a"],
    ]


def test_update_moves_keys_and_lookups() -> None:
    batch = CommandBatch()
    old = (b"a", b"ann", None)
    Planner(1000).change(change(AGENT, UPDATE, (b"b", b"bea", b"h"), old), V, batch)
    assert commands(batch) == [
        [b"DEL", b"agent:username:{ann}"],
        [b"DEL", b"agent:{a}"],
        [b"DEL", b"agent:{b}"],
        [b"HSET", b"agent:{b}", b"id", b"b", b"username", b"bea", b"_v", V],
        [b"SET", b"agent:username:{bea}", b"b"],
    ]
    batch = CommandBatch()
    Planner(1000).change(change(AGENT, DELETE, None, (b"b", b"bea", None)), V, batch)
    assert commands(batch) == [[b"DEL", b"agent:{b}"], [b"DEL", b"agent:username:{bea}"]]


def test_oversized_rows_are_dropped_and_counted() -> None:
    batch = CommandBatch()
    Planner(10).change(change(TICKET, INSERT, (b"1", b"x" * 50, None, None)), V, batch)
    assert commands(batch) == [[b"DEL", b"ticket:{1}"]]
    assert batch.oversized == [("tickets", 51)]  # "1" + 50 bytes


def test_truncate_and_resp_helpers() -> None:
    batch = CommandBatch()
    Planner(10).truncate((TICKET, AGENT), batch)
    (cmd,) = commands(batch)
    assert cmd == [
        b"TRUNCATE",
        b"ticket:{*",
        b"tickets:status:{*",
        b"tickets:assignee:{*",
        b"agent:{*",
        b"agent:username:{*",
        b"agents:status:{*",
    ]
    assert match_prefix("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\*"
    assert bulk_header(5000) == b"$5000\r\n"
    assert command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def sink(redis_url: str) -> RedisSink:
    s = RedisSink(redis_url, timeout=5)
    s.connect()
    s.claim({"slot": "test"})
    s.reset_state({"lsn": "0/1", "slot": "test"})
    return s


def apply(sink: RedisSink, *changes: RowChange, lsn: str = "0/2") -> list[tuple[str, bytes]]:
    batch = CommandBatch()
    planner = Planner(1 << 20)
    for c in changes:
        planner.change(c, V, batch)
    return sink.apply(batch, {"lsn": lsn}).incomplete_rows


def test_patch_keeps_unchanged_toast_and_refetches_incomplete_keys(
    sink: RedisSink, client: redis.Redis
) -> None:
    apply(sink, change(TICKET, INSERT, (b"1", b"t1", b"big text", b"true")))
    assert apply(sink, change(TICKET, UPDATE, (b"1", b"t2", UNCHANGED_TOAST, None))) == []
    assert client.hgetall("ticket:{1}") == {
        b"id": b"1",
        b"title": b"t2",
        b"description": b"big text",
        b"_v": V,
    }
    # A key without the kept field (never loaded, or dropped): deleted, reported for a refetch.
    assert apply(sink, change(TICKET, UPDATE, (b"2", b"x", UNCHANGED_TOAST, None))) == [
        ("tickets", b"2")
    ]
    assert client.exists("ticket:{2}") == 0
    client.set("ticket:{3}", "not a hash")
    assert apply(sink, change(TICKET, UPDATE, (b"3", b"x", UNCHANGED_TOAST, None))) == [
        ("tickets", b"3")
    ]
    # A primary key change with an unchanged TOAST value renames the key.
    apply(
        sink, change(TICKET, UPDATE, (b"9", b"t3", UNCHANGED_TOAST, None), (b"1", None, None, None))
    )
    assert client.exists("ticket:{1}") == 0
    assert client.hget("ticket:{9}", "description") == b"big text"
    assert client.hget("cdc:state", "lsn") == b"0/2"


def test_a_second_claim_fences_the_first(
    redis_url: str, sink: RedisSink, client: redis.Redis
) -> None:
    successor = RedisSink(redis_url, timeout=5)
    successor.connect()
    successor.claim({"slot": "test"})
    with pytest.raises(Fenced):
        apply(sink, change(TICKET, INSERT, (b"z", b"zombie", None, None)), lsn="0/5")
    assert client.exists("ticket:{z}") == 0
    assert client.hget("cdc:state", "lsn") == b"0/1"
    apply(successor, change(TICKET, INSERT, (b"s", b"successor", None, None)))
    assert client.exists("ticket:{s}") == 1


def test_lost_state_is_detected(sink: RedisSink, client: redis.Redis) -> None:
    client.flushdb()
    with pytest.raises(RedisLost):
        apply(sink, change(TICKET, INSERT, (b"1", b"x", None, None)))
    assert client.dbsize() == 0


def test_reply_end_finds_whole_replies_only() -> None:
    replies = bytearray(b"+OK\r\n*3\r\n:1\r\n$-1\r\n*2\r\n$3\r\nabc\r\n-ERR x\r\n:7\r\n")
    ends = []
    at = 0
    while at < len(replies):
        at = reply_end(replies, at)
        ends.append(at)
    assert ends == [5, 39, len(replies)]
    for cut in range(6, 39):  # any prefix of the array is incomplete
        assert reply_end(replies[:cut], 5) == -1
    with pytest.raises(ValueError, match="not a RESP2 reply"):
        reply_end(bytearray(b"?x\r\n"), 0)


def test_pipelined_batches_are_answered_in_order(sink: RedisSink, client: redis.Redis) -> None:
    """Two batches in flight: readiness is the whole answer, and each gets its own."""
    first, second = CommandBatch(), CommandBatch()
    planner = Planner(1 << 20)
    for i in range(3000):
        planner.change(change(TICKET, INSERT, (b"%d" % i, b"t", None, None)), V, first)
    planner.change(change(TICKET, UPDATE, (b"x", b"y", UNCHANGED_TOAST, None)), V, second)
    one = sink.send(first, {"lsn": "0/10"})
    two = sink.send(second, {"lsn": "0/20"})
    deadline = time.monotonic() + 10
    while not sink.ready(one):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert sink.receive(one).incomplete_rows == []
    # The second answer's bytes may already be buffered; it is still read whole.
    assert sink.receive(two).incomplete_rows == [("tickets", b"x")]
    assert client.hget("cdc:state", "lsn") == b"0/20"
    assert client.dbsize() == 3001  # the rows and cdc:state
    third = sink.send(CommandBatch(), {"lsn": "0/30"})
    assert sink.receive(third).incomplete_rows == []
    assert client.hget("cdc:state", "lsn") == b"0/30"


def test_lsn_text() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/16B3748")) == "0/16B3748"
    assert parse_lsn(b"A/b") == (10 << 32) | 11
    for bad in ("", "1", "x/1", "1/", "123456789/1"):
        with pytest.raises(LsnError):
            parse_lsn(bad)


def test_xid_visibility_across_the_epoch() -> None:
    snap = XidSnapshot.parse("1000:1010:1003,1007")
    assert snap.sees(999)
    assert snap.sees(1005)
    assert not snap.sees(1003)
    assert not snap.sees(1010)
    assert not snap.sees(2000)
    wrapped = XidSnapshot.parse(f"{(1 << 32) + 5}:{(1 << 32) + 20}:")
    assert wrapped.sees(4)  # xid 4 of the new epoch: before xmin
    assert wrapped.sees(0xFFFFFFF0)  # the previous epoch: long committed
    assert not wrapped.sees(25)
