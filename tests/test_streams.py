"""StreamBuffers (cdc/streams.py) on hand-built protocol-2 messages: no servers."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cdc.protocol.messages import Begin, Commit, Insert, Relation
from cdc.runtime.streams import StreamBuffers, StreamError

HEADER = b"w" + bytes(24)


def frame(payload: bytes) -> bytes:
    return HEADER + payload


def start(xid: int, first: bool = False) -> bytes:
    return frame(b"S" + struct.pack(">IB", xid, 1 if first else 0))


def stop() -> bytes:
    return frame(b"E")


def commit(xid: int, lsn: int) -> bytes:
    return frame(b"c" + struct.pack(">IBQQq", xid, 0, lsn, lsn + 8, 1234))


def abort(xid: int, subxid: int) -> bytes:
    return frame(b"A" + struct.pack(">II", xid, subxid))


def relation(xid: int) -> bytes:
    column = b"\x01id\x00" + struct.pack(">Ii", 25, -1)
    return frame(b"R" + struct.pack(">II", xid, 16400) + b"public\x00t\x00d\x00\x01" + column)


def insert(xid: int, value: bytes) -> bytes:
    return frame(
        b"I"
        + struct.pack(">II", xid, 16400)
        + b"N\x00\x01t"
        + struct.pack(">I", len(value))
        + value
    )


def values(messages: object) -> list[bytes]:
    out = []
    for message in messages:  # type: ignore[attr-defined]
        if isinstance(message, Insert):
            value = message.new[0]
            assert isinstance(value, bytes)
            out.append(value)
    return out


def feed_all(buffers: StreamBuffers, *messages: bytes) -> list[object]:
    replayed: list[object] = []
    for data in messages:
        result = buffers.feed(data)
        if result is not None:
            replayed.extend(result)
    return replayed


@pytest.mark.parametrize("memory", [0, 300, 1 << 20])
def test_interleaved_transactions_replay_at_their_commit(tmp_path: Path, memory: int) -> None:
    buffers = StreamBuffers(tmp_path, "slot", memory)
    out = feed_all(
        buffers,
        start(10, True),
        relation(10),
        insert(10, b"a1"),
        insert(10, b"a2"),
        stop(),
        start(20, True),
        relation(20),
        insert(20, b"b1"),
        stop(),
        start(10),
        insert(10, b"a3"),
        stop(),
    )
    assert out == []
    b = feed_all(buffers, commit(20, 500))
    assert isinstance(b[0], Begin)
    assert b[0].final_lsn == 500
    assert b[0].xid == 20
    assert isinstance(b[1], Relation)
    assert values(b) == [b"b1"]
    assert isinstance(b[-1], Commit)
    assert b[-1].commit_lsn == 500
    assert b[-1].end_lsn == 508
    a = feed_all(buffers, commit(10, 600))
    assert values(a) == [b"a1", b"a2", b"a3"]
    assert buffers.open == {}
    assert buffers.memory_bytes == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("memory", [0, 250, 1 << 20])
def test_subtransaction_abort_cuts_back_to_its_first_change(tmp_path: Path, memory: int) -> None:
    buffers = StreamBuffers(tmp_path, "slot", memory)
    out = feed_all(
        buffers,
        start(10, True),
        relation(10),
        insert(10, b"top1"),
        insert(11, b"sub11-a"),  # SAVEPOINT s11
        insert(12, b"sub12-a"),  # SAVEPOINT s12 inside s11
        stop(),
        abort(10, 12),  # ROLLBACK TO s12
        start(10),
        insert(11, b"sub11-b"),
        insert(13, b"sub13"),
        stop(),
        abort(10, 13),
        abort(10, 99),  # a subtransaction that streamed nothing
        start(10),
        insert(10, b"top2"),
        stop(),
        commit(10, 700),
    )
    assert values(out) == [b"top1", b"sub11-a", b"sub11-b", b"top2"]
    assert buffers.stats.subxact_aborts == 3
    assert list(tmp_path.iterdir()) == []


def test_abort_removes_the_spill_file_and_clean_removes_stale_ones(tmp_path: Path) -> None:
    stale = tmp_path / "slot.5.abc.spill"
    stale.write_bytes(b"x")
    other = tmp_path / "other.5.abc.spill"
    other.write_bytes(b"x")
    buffers = StreamBuffers(tmp_path, "slot", 0)
    assert buffers.clean() == 1
    assert not stale.exists()
    assert other.exists()
    feed_all(buffers, start(10, True), relation(10), insert(10, b"a"), stop())
    (path,) = buffers.spill_paths()
    assert path.exists()
    feed_all(buffers, abort(10, 10))
    assert not path.exists()
    assert buffers.stats.aborted == 1
    assert feed_all(buffers, commit(10, 800))[1:] == [Commit(0, 800, 808, 1234)]


def test_out_of_order_stream_messages_are_refused(tmp_path: Path) -> None:
    buffers = StreamBuffers(tmp_path, "slot", 0)
    with pytest.raises(StreamError):
        buffers.feed(stop())
    buffers.feed(start(1, True))
    with pytest.raises(StreamError):
        buffers.feed(start(2, True))
    with pytest.raises(StreamError):
        buffers.feed(commit(1, 5))


def test_spill_file_of_several_megabytes_replays_in_order(tmp_path: Path) -> None:
    # Past the 1 MB write buffer and read chunks, with a message larger than a chunk, and
    # a subtransaction cut that reaches back into what is already in the file.
    buffers = StreamBuffers(tmp_path, "slot", 0)
    stream = [start(10, True), relation(10)]
    stream += [insert(10, b"top%d" % i + b"." * (i % 300)) for i in range(20_000)]
    stream += [insert(10, b"huge" + b"h" * (3 << 20))]
    stream += [insert(11, b"sub%d" % i + b"." * 200) for i in range(10_000)]  # 2+ MB
    stream += [stop(), abort(10, 11), start(10)]
    stream += [insert(10, b"after%d" % i) for i in range(5_000)]
    stream += [stop(), commit(10, 900)]
    got = values(feed_all(buffers, *stream))
    expected = [b"top%d" % i + b"." * (i % 300) for i in range(20_000)]
    expected += [b"huge" + b"h" * (3 << 20)]
    expected += [b"after%d" % i for i in range(5_000)]
    assert got == expected
    assert list(tmp_path.iterdir()) == []
