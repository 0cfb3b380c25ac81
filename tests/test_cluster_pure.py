"""Cluster mode's pure parts: slot tags, versions, the batch split, the ledger, URLs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot as redis_key_slot

from cdc.cache.cluster_sink import _moves, cluster_problem, parse_ops
from cdc.errors import RedisLost
from cdc.runtime import daemon as daemon_module
from cdc.runtime.daemon import Daemon
from cdc.settings import load_settings
from cdc.transform.assemble import view_from_columns
from cdc.transform.cluster_script import (
    SLOTS,
    SlotLedger,
    fence_key,
    key_slot,
    outbox_key,
    parse_slot_ranges,
    slot_ranges,
    slot_tags,
    version,
)
from cdc.transform.plan import CommandBatch, Planner
from devstack.servers import free_port
from schema.keys import TICKETS
from schema.redis_url import RedisTarget


def test_every_slot_has_a_tag_that_hashes_to_it() -> None:
    tags = slot_tags()
    assert len(tags) == SLOTS
    assert all(key_slot(tag.encode()) == slot for slot, tag in enumerate(tags))
    assert key_slot(fence_key(42).encode()) == 42
    assert key_slot(outbox_key(16383).encode()) == 16383
    for key in (b"ticket:{42}", b"plain", b"a{}b", b"{x}{y}", b"cdc:state", b"\xff{"):
        assert key_slot(key) == redis_key_slot(key)


def test_versions_compare_as_strings_in_commit_order() -> None:
    ordered = [(0x10, 0), (0x10, 1), (0x10, 10), (0x1_0000_0000, 0), (0x1_0000_0001, 0)]
    texts = [version(lsn, seq) for lsn, seq in ordered]
    assert texts == sorted(texts)
    assert len({len(t) for t in texts}) == 1


def test_operations_parse_back_with_their_versions() -> None:
    view = view_from_columns(TICKETS, ["id", "title", "status", "updated_at"])
    planner = Planner(1 << 20)
    batch = CommandBatch()
    planner.write_row(view, (b"a", b"t", b"open", b"2026-01-01 00:00:00+00"), b"0/10", batch)
    rest_at = batch.mark()
    planner.write_row(view, (b"b", b"t", None, None), b"0/10", batch)
    ops = parse_ops(batch.buf, batch.args)
    assert [code for code, _ in ops] == [b"w", b"r", b"u", b"w", b"r", b"u"]
    assert ops[1][1][0] == b"ticket:{a}"
    assert batch.marks == [(0, b"", 0), (3, b"", 0)]
    rest = batch.split(rest_at)
    assert batch.marks == [(0, b"", 0)]
    assert rest.marks == [(0, b"", 0)]
    assert [code for code, _ in parse_ops(rest.buf, rest.args)] == [b"w", b"r", b"u"]


def test_the_ledger_finds_slots_that_went_back() -> None:
    ledger = SlotLedger()
    assert ledger.note(5, 0)
    assert ledger.note(5, 1)
    assert ledger.note(9, 7)
    assert not ledger.note(5, 0)  # the slot forgot two runs (and counts this one)
    assert ledger.lost({5: 3, 9: 3}) == [9]
    assert ledger.lost({5: 1, 9: 8}) == [5]  # 1 found: still two short
    layout = frozenset({"0-8191", "8192-16383"})
    assert not ledger.trusts("", "", frozenset())
    ledger.accept({5: 2, 9: 3, 11: 0}, {5: 3, 9: 4, 11: 1})
    assert ledger.complete
    assert not ledger.trusts("", "", frozenset())  # not until the claim recorded it
    ledger.trust("token", "", layout)
    assert ledger.lost({5: 3, 9: 4, 11: 1}) == [5, 9]  # found lost: until repaired
    ledger.repaired()
    assert ledger.trusts("token", "", layout)
    assert not ledger.trusts("other", "", layout)  # another daemon claimed
    assert not ledger.trusts("token", "1", layout)  # verify --repair wrote
    assert not ledger.trusts("token", "", frozenset({"0-8190", "8191-16383"}))  # a reshard
    assert ledger.lost({5: 3, 9: 4, 11: 1}) == []
    assert ledger.lost({5: 3, 9: 4, 11: 0}) == [11]  # the claim's own count is missing
    assert ledger.note(11, 1)
    assert ledger.lost({5: 3, 9: 4, 11: 1}) == [11]
    ledger.distrust()  # a repair or load wrote unscripted
    assert not ledger.trusts("token", "", layout)


def test_a_script_on_a_replica_that_lost_one_keeps_the_shortfall() -> None:
    """A run applied (and noted), lost with its primary; the next script reaches the
    promoted replica, which counts it on top of one run fewer: the claim still finds
    the slot short."""
    ledger = SlotLedger()
    ledger.accept({7: 9}, {7: 10})
    ledger.trust("t", "", frozenset())
    assert ledger.note(7, 10)  # expects 11
    assert not ledger.note(7, 10)  # the replica had 10 and counts this one: 11
    assert ledger.lost({7: 11}) == [7]  # the claim's count shows 11, 12 expected


def test_slots_a_failed_claim_found_lost_stay_lost_until_recorded() -> None:
    ledger = SlotLedger()
    ledger.accept({1: 0, 2: 0}, {1: 1, 2: 1})
    ledger.trust("t1", "", frozenset())
    assert ledger.note(1, 1)  # a script: 1 expects 2 now
    # A failover lost it; the next claim finds 1 (counts 2 with its own) and fails.
    assert ledger.lost({1: 1, 2: 1}) == [1]
    ledger.accept({1: 1, 2: 1}, {1: 2, 2: 2})
    # The claim after that finds what the failed one left: 1 is still lost.
    assert ledger.lost({1: 2, 2: 2}) == [1]
    ledger.accept({1: 2, 2: 2}, {1: 3, 2: 3})
    ledger.trust("t3", "", frozenset())  # recorded (repair_slots) at last
    # ... but one HSET on cdc:state can be lost with its shard: lost until repaired.
    assert ledger.lost({1: 3, 2: 3}) == [1]
    ledger.repaired()
    assert ledger.lost({1: 3, 2: 3}) == []


def test_cluster_urls() -> None:
    target = RedisTarget.parse("redis+cluster://u:secret@a:7000,b:7001")
    assert target.cluster
    assert target.hosts == (("a", 7000), ("b", 7001))
    assert target.password == "secret"
    assert "secret" not in target.describe()
    assert target.describe() == "redis+cluster://u@a:7000,b:7001"
    assert RedisTarget.parse("rediss+cluster://a:7000").tls is not None
    with pytest.raises(ValueError, match="only database 0"):
        RedisTarget.parse("redis+cluster://a:7000/3")
    with pytest.raises(ValueError, match="host:port"):
        RedisTarget.parse("redis+cluster://a:notaport")


def test_slot_ranges_round_trip_and_bad_parts_are_ignored() -> None:
    slots = [0, 1, 2, 7, 9, 10, 16383]
    assert slot_ranges(slots) == "0-2,7,9-10,16383"
    assert slot_ranges([5, 3, 4, 4]) == "3-5"
    assert slot_ranges([]) == ""
    assert parse_slot_ranges(slot_ranges(slots)) == set(slots)
    assert parse_slot_ranges(slot_ranges(list(range(SLOTS)))) == set(range(SLOTS))
    assert parse_slot_ranges("") == set()
    assert parse_slot_ranges("x,3,4-z,-1,16380-99999") == {3, 16380, 16381, 16382, 16383}


def test_a_key_change_with_kept_columns_is_split_at_its_change_bounds() -> None:
    def op(code: bytes, *args: bytes) -> tuple[bytes, list[bytes]]:
        return code, list(args)

    ops = [
        op(b"h", b"ticket:{a}"),  # change 0
        op(b"w", b"a", b"ticket:{a}", b"0", b"0"),  # change 1: a key change with kept columns
        op(b"p", b"ticket:{b}", b"ticket:{a}", b"0", b"0", b"1", b"description"),
        op(b"u"),
        op(b"p", b"ticket:{c}", b"", b"0", b"0", b"1", b"description"),  # change 2: no move
        op(b"p", b"ticket:{e}", b"ticket:{d}", b"0", b"0", b"1", b"description"),  # change 3
    ]
    marks = [(0, b"0/1", 0), (1, b"0/1", 1), (4, b"0/1", 2), (5, b"0/1", 3)]
    assert _moves(ops, marks) == {1: (2, 4), 5: (5, 6)}


def _daemon_on(url: str) -> Daemon:
    settings = load_settings(database_url="postgresql://127.0.0.1:1/x", redis_url=url)
    daemon = Daemon(settings)
    daemon.redis_url = url
    return daemon


def test_clearing_the_cache_of_an_unreachable_cluster_is_redis_lost() -> None:
    """redis-py's cluster client raises RedisClusterException (not a RedisError) when no
    node answers: the rebuild's clear turns it into RedisLost like any Redis failure."""
    with pytest.raises(RedisLost, match="RedisClusterException"):
        _daemon_on(f"redis+cluster://127.0.0.1:{free_port()}")._clear_tracked_keys()


def test_a_cluster_error_while_clearing_the_cache_is_redis_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slot with no node (a RedisClusterException subclass) during the scans."""

    class Client:
        def close(self) -> None:
            pass

    def scan(client: object, prefix: str) -> Iterator[list[bytes]]:
        raise redis.exceptions.SlotNotCoveredError("slot 7 is not covered by the cluster")

    monkeypatch.setattr(daemon_module, "redis_client", lambda url, **kwargs: Client())
    monkeypatch.setattr(daemon_module, "scan_keys", scan)
    with pytest.raises(RedisLost, match="SlotNotCoveredError"):
        _daemon_on("redis+cluster://127.0.0.1:7000")._clear_tracked_keys()


def test_cluster_problems_are_found_among_the_causes() -> None:
    """redis-py's RedisCluster wraps what a node answered: refused credentials and
    permissions are configuration (exit 2) wherever they sit in the chain."""

    def wrapped(cause: BaseException) -> redis.exceptions.RedisClusterException:
        try:
            try:
                raise cause
            except redis.ResponseError:
                raise redis.exceptions.RedisClusterException("not enabled") from None
        except (redis.exceptions.RedisClusterException, redis.AuthenticationError) as inner:
            outer = redis.exceptions.RedisClusterException("cannot be connected")
            outer.__cause__ = inner
            return outer

    wrong = wrapped(redis.AuthenticationError("invalid username-password pair"))
    assert cluster_problem(wrong) == "the Redis Cluster refused the credentials in REDIS_URL"
    command = wrapped(
        redis.exceptions.NoPermissionError(
            "this user has no permissions to run the 'cluster|slots' command"
        )
    )
    assert cluster_problem(command) == (
        "the Redis user may not run CLUSTER SLOTS on the Redis Cluster: grant it"
        ' +cluster|slots on every node (README "TLS and ACL")'
    )
    key = cluster_problem(
        wrapped(redis.exceptions.NoPermissionError("No permissions to access a key"))
    )
    assert key is not None
    assert key.startswith("the Redis user lacks a permission on the Redis Cluster (NOPERM)")
    assert cluster_problem(redis.exceptions.RedisClusterException("cannot be connected")) is None


def test_a_primary_is_known_by_both_ids_or_by_its_node_id_where_one_side_lacks_the_other() -> None:
    from cdc.cache.cluster_sink import _known

    recorded = {"n1/r1", "n2"}  # n2 recorded before replication ids (or without INFO)
    assert _known("n1/r1", recorded)
    assert not _known("n1/r9", recorded)  # promoted again: a new replication id
    assert _known("n2/r2", recorded)  # the upgrade must not repair every slot
    assert _known("n1", recorded)  # INFO refused now
    assert not _known("n3/r3", recorded)
    assert not _known("n3", recorded)
