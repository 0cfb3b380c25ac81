"""Redis high availability: ``redis+sentinel://`` and ``CDC_REDIS_MIN_REPLICAS`` (case 22).

A primary, a replica and three Sentinels run on loopback (:class:`SentinelGroup`); the
daemon is a subprocess given the Sentinel URL. The primary is killed with SIGKILL while
writes stream: the daemon follows the promoted replica with no manual step, repairs what
the replica lacked (a replay from its checkpoint, or an online rebuild when the checkpoint
is behind what PostgreSQL already confirmed), and converges. With
``CDC_REDIS_MIN_REPLICAS=1`` nothing is confirmed to PostgreSQL while the replica is
stopped, and confirmation resumes once it is back.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from cdc.cache.sink import RedisSink
from cdc.cache.wire import RedisWire, WireError
from cdc.errors import RedisUnavailable
from devstack.redis_ha import SentinelGroup, SentinelServer, make_tls_files
from schema.lsn import parse_lsn
from schema.redis_url import RedisTarget, async_redis_client, redis_client
from tests.helpers import (
    Daemon,
    Load,
    assert_converged,
    fence,
    running,
    slot_confirmed,
    wait_for,
)
from writer import CacheReader, Writer

Conn = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with SentinelGroup(tmp_path / "sentinel-group").running() as g:
        yield g


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A primary and one replica, no Sentinels."""
    with SentinelGroup(tmp_path / "pair", sentinels=0).running() as g:
        yield g


def _state_lsn(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        raw = client.hget("cdc:state", "lsn")
    finally:
        client.close()
    assert isinstance(raw, bytes)
    return parse_lsn(raw.decode())


def _events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == event]


class PairSampler:
    """Writes two rows in each transaction with the same value; samples both in one MULTI."""

    def __init__(self, database_url: str, redis_url: str) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.samples = 0
        self.torn: list[tuple[bytes | None, bytes | None]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._write, daemon=True),
            threading.Thread(target=self._sample, daemon=True),
        ]

    def start(self) -> PairSampler:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def wait_samples(self, more: int) -> None:
        target = self.samples + more
        wait_for(lambda: self.samples >= target, 60, f"{more} more samples")

    def _write(self) -> None:
        value = 0
        with psycopg.connect(self.database_url) as conn:
            while not self._stop.is_set():
                value += 1
                for row in ("pair-a", "pair-b"):
                    conn.execute(
                        "INSERT INTO tickets (id, title) VALUES (%s, %s)"
                        " ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title",
                        (row, str(value)),
                    )
                conn.commit()
                self._stop.wait(0.005)

    def _sample(self) -> None:
        client = redis_client(self.redis_url, socket_timeout=2)
        while not self._stop.is_set():
            try:
                pipe = client.pipeline(transaction=True)
                pipe.hget("ticket:{pair-a}", "title")
                pipe.hget("ticket:{pair-b}", "title")
                a, b = pipe.execute()
            except redis.RedisError:
                self._stop.wait(0.05)  # the master is changing: ask the Sentinels again
                continue
            self.samples += 1
            if a is not None and b is not None and a != b:
                self.torn.append((a, b))
            self._stop.wait(0.002)
        client.close()


def test_follows_the_master_through_a_failover_under_load(
    make_daemon: Callable[..., Daemon], database_url: str, group: SentinelGroup
) -> None:
    rows = [f"sen-{i}" for i in range(30)]
    with running(make_daemon(REDIS_URL=group.url())) as daemon:
        load = Load(database_url, rows).start()
        pairs = PairSampler(database_url, group.url()).start()
        try:
            load.wait_commits(100)
            fence(database_url, group.master_url())
            old = group.master_port()
            load.wait_commits(50)
            killed_at = datetime.now(UTC)
            group.nodes[old].kill()  # SIGKILL, while the load goes on
            new = group.wait_failover(old)
            promoted_at = datetime.now(UTC)
            load.wait_commits(100)
            # Writes made after the failover reach the new master through the daemon.
            fence(database_url, group.master_url(), timeout=60)
            pairs.wait_samples(50)
        finally:
            load.stop()
            pairs.stop()
        # Both rows of a transaction, read in one MULTI from whichever node was master:
        # never one without the other's value (a promoted replica is a consistent prefix).
        assert pairs.torn == [], pairs.torn[:5]
        assert pairs.samples > 50
        assert load.commits > 250
        assert new != old
        assert_converged(database_url, group.master_url())
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
        assert daemon.ready()
        assert _events(daemon, "connection problem"), daemon.log()
        resumed = [
            datetime.fromisoformat(e["timestamp"])
            for e in _events(daemon, "streaming")
            if datetime.fromisoformat(e["timestamp"]) > killed_at
        ]
        assert resumed, daemon.log()
        print(
            f"failover: Sentinels promoted after {(promoted_at - killed_at).total_seconds():.2f}s,"
            f" the daemon streamed to the new master after"
            f" {(resumed[0] - killed_at).total_seconds():.2f}s; {pairs.samples} atomic samples, 0 torn"
        )


def test_a_promoted_replica_behind_the_confirmed_position_is_rebuilt(
    make_daemon: Callable[..., Daemon], database_url: str, group: SentinelGroup, pg: Conn
) -> None:
    """The replica misses writes PostgreSQL already counts as confirmed: its ``cdc:state``
    is present but behind the slot. The daemon notices and rebuilds online."""
    daemon = make_daemon(REDIS_URL=group.url())
    with running(daemon):
        pg.execute("INSERT INTO tickets (id, title) VALUES ('old-1', 'before')")
        fence(database_url, group.master_url())
        old = group.master_port()
        (replica_port,) = group.replica_ports()
        replica = group.nodes[replica_port]
        replica.signal(signal.SIGSTOP)
        try:
            # Cut the replication link too: what already sits in the stopped replica's
            # socket buffer would otherwise still reach it after SIGCONT.
            master = group.node(old)
            master.client_kill_filter(_type="replica")
            master.close()
            stale = _state_lsn(group.master_url())
            for i in range(20):
                pg.execute("INSERT INTO tickets (id, title) VALUES (%s, 'lost')", (f"lost-{i}",))
            pg.execute("UPDATE tickets SET title = 'changed' WHERE id = 'old-1'")
            fence(database_url, group.master_url())
            wait_for(
                lambda: (slot_confirmed(database_url, daemon.slot) or 0) > stale,
                30,
                "PostgreSQL to confirm past the replica's checkpoint",
            )
            group.nodes[old].kill()
        finally:
            replica.signal(signal.SIGCONT)
        group.wait_failover(old)
        # The promoted replica holds the old checkpoint and none of the "lost" rows.
        client = redis.Redis.from_url(group.master_url())
        assert client.hget("ticket:{old-1}", "title") in (b"before", b"changed")
        wait_for(lambda: client.hget("ticket:{lost-19}", "title") == b"lost", 60, "repair")
        assert_converged(database_url, group.master_url())
        client.close()
        rebuilds = _events(daemon, "the cache must be rebuilt")
        assert rebuilds, daemon.log()
        assert "behind" in rebuilds[-1]["reason"], rebuilds
        assert daemon.ready()


def test_min_replicas_holds_the_confirmation_until_a_replica_has_the_batch(
    make_daemon: Callable[..., Daemon], database_url: str, pair: SentinelGroup, pg: Conn
) -> None:
    master = pair.master_url()
    (replica_port,) = pair.replica_ports()
    replica = pair.nodes[replica_port]
    daemon = make_daemon(REDIS_URL=master, CDC_REDIS_MIN_REPLICAS="1")
    with running(daemon):
        fence(database_url, master)
        wait_for(
            lambda: (slot_confirmed(database_url, daemon.slot) or 0) >= _state_lsn(master),
            30,
            "the first confirmation",
        )
        replica.signal(signal.SIGSTOP)
        try:
            row = pg.execute(
                "INSERT INTO tickets (id, title) VALUES ('wait-1', 'needs a replica')"
                " RETURNING pg_current_wal_insert_lsn()::text"
            ).fetchone()
            assert row is not None
            written = parse_lsn(row[0])
            client = redis.Redis.from_url(master)
            # Applied on the master...
            wait_for(lambda: client.hget("ticket:{wait-1}", "title"), 30, "the apply")
            # ... but WAIT found no replica, twice (the batch, then the retry's claim).
            wait_for(
                lambda: (
                    len(
                        [
                            e
                            for e in _events(daemon, "connection problem")
                            if "CDC_REDIS_MIN_REPLICAS" in e.get("error", "")
                        ]
                    )
                    >= 2
                ),
                60,
                "WAIT to time out twice",
            )
            confirmed = slot_confirmed(database_url, daemon.slot) or 0
            assert confirmed < written, "confirmed without a replica"
            assert _state_lsn(master) >= written
        finally:
            replica.signal(signal.SIGCONT)
        wait_for(
            lambda: (slot_confirmed(database_url, daemon.slot) or 0) >= written,
            60,
            "the confirmation once the replica is back",
        )
        replica_client = redis.Redis(port=replica_port)
        assert replica_client.hget("ticket:{wait-1}", "title") == b"needs a replica"
        replica_client.close()
        client.close()
        assert_converged(database_url, master)
        assert daemon.ready()


MASTER_SECRET = "master-pw-7f3a"
SENTINEL_SECRET = "sentinel-pw-91c2"


def test_tls_sentinels_with_passwords_followed_through_a_failover(
    make_daemon: Callable[..., Daemon], database_url: str, writer: Writer, tmp_path: Path
) -> None:
    """``rediss+sentinel://`` with the master's password and ``?sentinel_password=``: TLS
    with a client certificate to the Sentinels and the master, then a failover."""
    files = make_tls_files(tmp_path / "tls")
    with SentinelGroup(
        tmp_path / "tls-group", tls=files, password=MASTER_SECRET, sentinel_password=SENTINEL_SECRET
    ).running() as group:
        url = group.url()
        assert url.startswith("rediss+sentinel://")
        with running(make_daemon(REDIS_URL=url)) as daemon:
            written = writer.create_ticket({"id": "ts-1", "title": "over TLS"})
            reader = CacheReader.connect(url)
            ticket = reader.ticket("ts-1", after=written.token, timeout=30)
            assert ticket is not None
            assert ticket.title == "over TLS"
            old = group.master_port()
            group.nodes[old].kill()
            group.wait_failover(old)
            written = writer.create_ticket({"id": "ts-2", "title": "after the failover"})
            # The reader follows the new master too (redis-py's Sentinel pool).
            wait_for(
                lambda: reader.wait(written.token, timeout=1), 60, "the write on the new master"
            )
            assert_converged(database_url, group.master_url())
            assert daemon.ready()
            for secret in (MASTER_SECRET, SENTINEL_SECRET):
                assert secret not in daemon.log()


def test_wrong_sentinel_password_exits_2(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    with SentinelGroup(
        tmp_path / "auth-group", replicas=0, sentinels=1, sentinel_password=SENTINEL_SECRET
    ).running() as group:
        url = group.url().replace(SENTINEL_SECRET, "wrong-pw-55e1")
        daemon = make_daemon(REDIS_URL=url).start()
        code = daemon.wait_exit(60)
        lines = [line for line in daemon.log().splitlines() if line.strip()]
        assert code == 2, daemon.log()
        assert len(lines) == 1, daemon.log()
        assert "sentinel_password" in lines[0]
        assert "wrong-pw-55e1" not in daemon.log()


def test_a_demoted_master_is_left_like_a_lost_connection(pair: SentinelGroup) -> None:
    """READONLY (the node became a replica under us) closes the connection, so the session
    reconnects and asks the Sentinels again, instead of failing the batch."""
    (replica_port,) = pair.replica_ports()
    sink = RedisSink(f"redis://127.0.0.1:{replica_port}/0", timeout=2)
    sink.connect()
    with pytest.raises(RedisUnavailable, match="READONLY"):
        sink.claim({"slot": "s"})
    assert not sink.connected


def test_a_node_the_sentinels_still_call_master_is_checked_with_role(
    pair: SentinelGroup, tmp_path: Path
) -> None:
    (replica_port,) = pair.replica_ports()
    watcher = SentinelServer(tmp_path / "wrong", replica_port, "wrongmaster")
    with watcher.running():
        wire = RedisWire(RedisTarget.parse(f"redis+sentinel://{watcher.address}/wrongmaster"), 2)
        with pytest.raises(WireError, match="not a master"):
            wire.connect()
        assert not wire.connected
        right = SentinelServer(tmp_path / "right", pair.master_port(), "rightmaster")
        with right.running():
            wire = RedisWire(
                RedisTarget.parse(
                    f"redis+sentinel://{watcher.address},{right.address}/rightmaster/3"
                ),
                2,
            )
            wire.connect()  # the first Sentinel does not know it, the second does
            assert wire.call(b"SET", b"k", b"v") == b"OK"
            wire.close()
            url = f"redis+sentinel://{right.address}/rightmaster/3"
            assert redis_client(url).get("k") == b"v"

            async def read() -> Any:
                client = async_redis_client(url)
                try:
                    return await client.get("k")
                finally:
                    await client.aclose()

            assert asyncio.run(read()) == b"v"
