"""The pure core from captured bytes: pgoutput decoding, transaction assembly, wal2json.

``tests/data/pgoutput_capture.json`` holds real payloads (recipe beside it). When the
hot path runs compiled (mypyc), the same cases also run through the pure-Python source
of the decoder, so both give the same answers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cdc.protocol import pgoutput
from cdc.protocol.messages import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    DecodeError,
    Delete,
    Insert,
    LogicalMessage,
    PrimaryKeepalive,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Update,
    XLogData,
    parse_copy_data,
    standby_status_update,
)
from cdc.protocol.wal2json import Wal2JsonDecoder
from cdc.transform.assemble import (
    CAST_BOOL,
    CAST_BPCHAR,
    CAST_INET,
    DELETE,
    INSERT,
    UPDATE,
    Assembler,
    AssemblyError,
    RowChange,
    SchemaChange,
    StreamingUnsupported,
    TableTruncate,
    TxBegin,
    TxCommit,
    text_cast,
)
from schema.keys import TrackedTable

DATA = json.loads((Path(__file__).parent / "data" / "pgoutput_capture.json").read_text())
V1 = [bytes.fromhex(h) for h in DATA["v1_first_transactions"]]
V2 = [(bool(s), bytes.fromhex(h)) for s, h in DATA["v2_samples"]]
BIG = DATA["big_value"].encode()

T = TrackedTable(name="t", prefix="t")


def pure_decoder() -> ModuleType:
    """cdc/protocol/pgoutput.py loaded from source, whatever is installed."""
    path = Path(pgoutput.__file__ or "").with_suffix(".py")
    if not path.exists():
        path = Path(__file__).resolve().parents[1] / "cdc" / "protocol" / "pgoutput.py"
    spec = importlib.util.spec_from_file_location("pgoutput_pure", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pgoutput_pure"] = module
    spec.loader.exec_module(module)
    return module


DECODERS = [
    pytest.param(pgoutput.decode, id="installed"),
    pytest.param(pure_decoder().decode, id="pure-source"),
]


@pytest.mark.parametrize("decode", DECODERS)
def test_protocol_1_messages(decode: Any) -> None:
    messages = [decode(p) for p in V1]
    kinds = [type(m).__name__ for m in messages]
    assert kinds[:4] == ["Begin", "Relation", "Insert", "Commit"]
    begin, relation, insert, commit = messages[:4]
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    assert begin.xid > 0
    assert commit.commit_lsn == begin.final_lsn < commit.end_lsn
    assert isinstance(relation, Relation)
    assert (relation.namespace, relation.name, relation.replica_identity) == ("public", "t", "d")
    assert relation.column_names == ("id", "n", "big", "flag", "j")
    assert [c.is_key for c in relation.columns] == [True, False, False, False, False]
    assert [c.type_oid for c in relation.columns] == [25, 23, 25, 16, 3802]
    assert isinstance(insert, Insert)
    assert insert.relation_id == relation.relation_id
    assert insert.new == (b"a", b"1", BIG, b"t", b'{"k": [1, 2.50]}')

    unchanged = messages[5]
    assert isinstance(unchanged, Update)
    assert unchanged.old is None
    assert unchanged.new == (b"a", b"2", UNCHANGED_TOAST, b"t", b'{"k": [1, 2.50]}')

    moved = messages[8]
    assert isinstance(moved, Update)
    assert moved.old_is_key
    assert moved.old is not None
    assert moved.old[0] == b"a"
    assert moved.new[0] == b"b"

    null_insert = messages[12]
    assert isinstance(null_insert, Insert)
    assert null_insert.new == (b"1", None)

    delete = messages[15]
    assert isinstance(delete, Delete)
    assert delete.old_is_key
    assert delete.old == (b"b", None, None, None, None)

    truncate = messages[20]
    assert isinstance(truncate, Truncate)
    assert len(truncate.relation_ids) == 2

    message = messages[23]
    assert isinstance(message, LogicalMessage)
    assert (message.transactional, message.prefix, message.content) == (True, "cdc-test", b"hello")


@pytest.mark.parametrize("decode", DECODERS)
def test_protocol_2_streaming_messages(decode: Any) -> None:
    decoded = [decode(payload, in_stream) for in_stream, payload in V2]
    kinds = {type(m) for m in decoded}
    assert {StreamStart, StreamStop, StreamCommit, StreamAbort} <= kinds
    streamed = [
        m for (s, _), m in zip(V2, decoded, strict=True) if s and isinstance(m, Insert | Relation)
    ]
    assert streamed
    assert all(m.xid for m in streamed)
    start = next(m for m in decoded if isinstance(m, StreamStart))
    stream_commit = next(m for m in decoded if isinstance(m, StreamCommit))
    assert stream_commit.xid == start.xid
    assert stream_commit.end_lsn > stream_commit.commit_lsn


@pytest.mark.parametrize("decode", DECODERS)
def test_truncated_or_garbage_bytes_raise_decode_error(decode: Any) -> None:
    for payload in V1 + [p for _, p in V2]:
        for cut in range(len(payload)):
            try:
                decode(payload[:cut])
            except DecodeError:
                continue
            # A shorter prefix may still be a complete message of another shape only
            # for fixed-size messages; anything decoded must be a message.
    with pytest.raises(DecodeError):
        decode(b"")
    with pytest.raises(DecodeError):
        decode(b"Zgarbage")
    with pytest.raises(DecodeError):
        decode(b"I\x00\x00\x00\x01N\x00\x01x")  # unknown column kind


def test_pure_and_installed_decoders_agree() -> None:
    pure = pure_decoder()
    for payload in V1:
        assert repr(pgoutput.decode(payload)) == repr(pure.decode(payload))


def test_copy_data_framing_and_status_update() -> None:
    frame = parse_copy_data(
        b"w" + (5).to_bytes(8, "big") + (9).to_bytes(8, "big") + (7).to_bytes(8, "big") + b"B.."
    )
    assert frame == XLogData(5, 9, 7, b"B..")
    keepalive = parse_copy_data(b"k" + (42).to_bytes(8, "big") + (1).to_bytes(8, "big") + b"\x01")
    assert keepalive == PrimaryKeepalive(42, 1, True)
    with pytest.raises(DecodeError):
        parse_copy_data(b"x")
    status = standby_status_update(1, 2, 3, 4, True)
    assert status[0:1] == b"r"
    assert len(status) == 34
    assert int.from_bytes(status[9:17], "big") == 2
    assert status[-1] == 1


# -- assembly ----------------------------------------------------------------------------------


def test_assembler_events_and_numbering() -> None:
    assembler = Assembler((T,))
    events = [assembler.feed(pgoutput.decode(p)) for p in V1]
    begins = [e for e in events if isinstance(e, TxBegin)]
    commits = [e for e in events if isinstance(e, TxCommit)]
    changes = [e for e in events if isinstance(e, RowChange)]
    assert (len(begins), len(commits)) == (7, 6)  # the capture ends inside the 7th
    assert [c.op for c in changes] == [INSERT, UPDATE, UPDATE, DELETE]  # table u is not tracked
    assert all(c.seq == 1 for c in changes)
    assert changes[0].new is not None
    assert changes[0].new[3] == b"true"  # boolean as bool::text prints it
    assert changes[1].new is not None
    assert changes[1].new[2] is UNCHANGED_TOAST
    truncate = next(e for e in events if isinstance(e, TableTruncate))
    assert [v.tracked.name for v in truncate.views] == ["t"]
    assert commits[0].changes == 1


def test_assembler_refuses_protocol_violations() -> None:
    assembler = Assembler((T,))
    with pytest.raises(AssemblyError):
        assembler.feed(pgoutput.decode(V1[2]))  # an Insert before any Begin
    assembler.feed(pgoutput.decode(V1[0]))
    with pytest.raises(AssemblyError):
        assembler.feed(pgoutput.decode(V1[2]))  # an Insert before its Relation
    with pytest.raises(StreamingUnsupported):
        Assembler((T,)).feed(StreamStop())


def test_schema_change_is_reported_once_columns_differ() -> None:
    assembler = Assembler((T,))
    relation = pgoutput.decode(V1[1])
    assert isinstance(relation, Relation)
    assert assembler.feed(relation) is None
    assert assembler.feed(relation) is None
    narrower = Relation(relation.relation_id, "public", "t", "d", relation.columns[:3])
    event = assembler.feed(narrower)
    assert isinstance(event, SchemaChange)
    assert event.previous == relation.column_names


def test_text_casts() -> None:
    assert text_cast(CAST_BOOL, b"t") == b"true"
    assert text_cast(CAST_BOOL, b"f") == b"false"
    assert text_cast(CAST_BPCHAR, b"ab  ") == b"ab"
    assert text_cast(CAST_INET, b"10.0.0.1") == b"10.0.0.1/32"
    assert text_cast(CAST_INET, b"::1") == b"::1/128"
    assert text_cast(CAST_INET, b"10.0.0.0/8") == b"10.0.0.0/8"


# -- wal2json ------------------------------------------------------------------------------------


W2J = [
    b'{"action":"B","xid":50990,"timestamp":"2026-11-22 11:26:40.724846+00","lsn":"0/C7C57F0","nextlsn":"0/C7C5820"}',
    b'{"action":"I","xid":50990,"lsn":"0/C7C5680","schema":"public","table":"t","columns":['
    b'{"name":"id","type":"text","value":"a"},{"name":"n","type":"numeric","value":1.10},'
    b'{"name":"flag","type":"boolean","value":true},{"name":"j","type":"jsonb","value":"{\\"x\\": 2.50}"},'
    b'{"name":"big","type":"text","value":"xx"},{"name":"c","type":"character(4)","value":"ab  "}]}',
    b'{"action":"C","xid":50990,"timestamp":"2026-11-22 11:26:40.724846+00","lsn":"0/C7C57F0","nextlsn":"0/C7C5820"}',
    b'{"action":"U","xid":50991,"lsn":"0/C7C5820","schema":"public","table":"t","columns":['
    b'{"name":"id","type":"text","value":"b"},{"name":"n","type":"numeric","value":2},'
    b'{"name":"flag","type":"boolean","value":false},{"name":"j","type":"jsonb","value":null},'
    b'{"name":"c","type":"character(4)","value":null}],'
    b'"identity":[{"name":"id","type":"text","value":"a"}]}',
    b'{"action":"D","xid":50993,"lsn":"0/C7C5A78","schema":"public","table":"t","identity":[{"name":"id","type":"text","value":"b"}]}',
    b'{"action":"T","xid":50994,"lsn":"0/C7C6690","schema":"public","table":"t"}',
    b'{"action":"M","xid":50995,"lsn":"0/C7C6870","transactional":true,"prefix":"pfx","content":"hello"}',
]


def test_wal2json_decoder() -> None:
    decoder = Wal2JsonDecoder()
    decoder.set_columns("public", "t", ["id", "n", "flag", "j", "big", "c"])
    out = [m for payload in W2J for m in decoder.decode(payload)]
    kinds = [type(m).__name__ for m in out]
    assert kinds == [
        "Begin",
        "Relation",
        "Insert",
        "Commit",
        "Update",
        "Delete",
        "Truncate",
        "LogicalMessage",
    ]
    begin, relation, insert, commit, update, delete = out[:6]
    assert isinstance(begin, Begin)
    assert isinstance(commit, Commit)
    assert begin.final_lsn == commit.commit_lsn == 0xC7C57F0
    assert commit.end_lsn == 0xC7C5820
    assert begin.xid == 50990
    assert isinstance(relation, Relation)
    assert relation.synthetic
    assert isinstance(insert, Insert)
    assert insert.new == (b"a", b"1.10", b"true", b'{"x": 2.50}', b"xx", b"ab")
    assert isinstance(update, Update)
    assert update.new == (
        b"b",
        b"2",
        b"false",
        None,
        UNCHANGED_TOAST,
        None,
    )  # 'big' absent: unchanged
    assert update.old == (b"a", None, None, None, None, None)
    assert isinstance(delete, Delete)
    assert delete.old[0] == b"b"
    with pytest.raises(DecodeError):
        decoder.decode(b"not json")
    with pytest.raises(DecodeError):
        decoder.decode(b'{"xid": 1}')


def test_wal2json_new_column_announces_a_relation() -> None:
    decoder = Wal2JsonDecoder()
    decoder.set_columns("public", "t", ["id"])
    first = decoder.decode(
        b'{"action":"I","lsn":"0/1","schema":"public","table":"t","columns":[{"name":"id","type":"text","value":"a"}]}'
    )
    assert [type(m).__name__ for m in first] == ["Relation", "Insert"]
    again = decoder.decode(
        b'{"action":"I","lsn":"0/2","schema":"public","table":"t","columns":[{"name":"id","type":"text","value":"b"}]}'
    )
    assert [type(m).__name__ for m in again] == ["Insert"]
    wider = decoder.decode(
        b'{"action":"I","lsn":"0/3","schema":"public","table":"t","columns":['
        b'{"name":"id","type":"text","value":"c"},{"name":"x","type":"int","value":5}]}'
    )
    assert [type(m).__name__ for m in wider] == ["Relation", "Insert"]
    assert isinstance(wider[0], Relation)
    assert wider[0].column_names == ("id", "x")


def test_compiled_modules_are_not_stale() -> None:
    """A C extension built from older source would shadow the .py silently."""
    cdc_dir = Path(pgoutput.__file__ or "").parent
    for source in cdc_dir.glob("*.py"):
        for built in cdc_dir.glob(source.stem + ".*.so"):
            assert built.stat().st_mtime >= source.stat().st_mtime, (
                f"{built.name} is older than {source.name}: rebuild"
            )
