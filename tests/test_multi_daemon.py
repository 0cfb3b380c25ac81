"""Several daemons, one Redis (issue 9 item 6): tickets on one slot, agents on another.

The migrations create one publication (``cdc_cache``); these tests take ``agents`` out of
it and publish it in ``cdc_agents``, so two daemons split the tracked tables, one slot
each, on one Redis database. Each keeps its own state (``cdc:state:<slot>``, its fence
and checkpoint), writes only its tables' row/view/lookup keys, detects its own state's
loss and rebuilds only its tables; ``cdc verify`` and ``cdc slot reset`` of one slot touch
only that daemon's tables. Readers' token waits follow the daemon that mirrors the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import redis

from cdc.cache.sink import RedisSink
from cdc.errors import Fenced
from cdc.transform.plan import CommandBatch
from schema.keys import (
    AGENTS,
    REGISTRY_KEY,
    TICKETS,
    agent_status_key,
    applied_message,
    match_prefix,
    parse_applied,
    state_key,
    ticket_status_key,
)
from tests.helpers import ROOT, Daemon, Load, assert_converged, fence, run_cdc, text, wait_for
from writer import AsyncCacheReader, CacheReader, Writer
from writer.db import Database

Conn = psycopg.Connection[tuple[Any, ...]]
ROWS = [f"k{i}" for i in range(30)]
GROUP = [f"g{i}" for i in range(5)]  # rows every sampled transaction writes together


def split_publications(pg: Conn) -> None:
    """``cdc_cache`` keeps tickets; ``cdc_agents`` publishes agents (without the excluded
    column, as the migrations publish it)."""
    pg.execute("ALTER PUBLICATION cdc_cache DROP TABLE agents")
    if pg.info.server_version >= 150000:
        columns = [
            str(r[0])
            for r in pg.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'agents'::regclass"
                " AND attnum > 0 AND NOT attisdropped AND attname <> 'password_hash'"
                " ORDER BY attnum"
            ).fetchall()
        ]
        pg.execute(f"CREATE PUBLICATION cdc_agents FOR TABLE agents ({', '.join(columns)})")
    else:
        pg.execute("CREATE PUBLICATION cdc_agents FOR TABLE agents")


@dataclass
class Split:
    tickets: Daemon
    agents: Daemon

    @property
    def tickets_state(self) -> str:
        return state_key(self.tickets.slot, mirrors_all=False)

    @property
    def agents_state(self) -> str:
        return state_key(self.agents.slot, mirrors_all=False)


@pytest.fixture
def split(make_daemon: Callable[..., Daemon], pg: Conn, slot_name: str) -> Split:
    split_publications(pg)
    return Split(
        make_daemon(CDC_SLOT=slot_name + "_t", CDC_PUBLICATION="cdc_cache"),
        make_daemon(CDC_SLOT=slot_name + "_a", CDC_PUBLICATION="cdc_agents"),
    )


def insert_agents(pg: Conn, ids: list[str], prefix: str = "") -> None:
    for agent_id in ids:
        pg.execute(
            "INSERT INTO agents (id, username, display_name, password_hash)"
            " VALUES (%s, %s, '0', 'secret-hash') ON CONFLICT (id) DO NOTHING",
            (agent_id, f"{prefix}user-{agent_id}"),
        )


def fence_agents(database_url: str, redis_url: str, marker: str) -> None:
    """:func:`tests.helpers.fence` for the agents daemon."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO agents (id, username, display_name, password_hash)"
            " VALUES ('__fence__', '__fence__', %s, 'x')"
            " ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name",
            (marker,),
        )
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for(
            lambda: client.hget(AGENTS.key("__fence__"), "display_name") == marker.encode(),
            60,
            "the agents fence row to reach Redis",
        )
    finally:
        client.close()


def converged(database_url: str, redis_url: str, marker: str) -> dict[str, int]:
    fence_agents(database_url, redis_url, marker)
    return assert_converged(database_url, redis_url)


@dataclass
class GroupWriter:
    """Transactions that write the same value to every GROUP ticket *and* every GROUP
    agent: one transaction, two daemons."""

    database_url: str
    commits: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> GroupWriter:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.database_url, connect_timeout=3)
                n += 1
                conn.execute("UPDATE tickets SET title = %s WHERE id = ANY(%s)", (str(n), GROUP))
                conn.execute(
                    "UPDATE agents SET display_name = %s WHERE id = ANY(%s)", (str(n), GROUP)
                )
                conn.commit()
                self.commits += 1
            except psycopg.Error:
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                self._stop.wait(0.2)


@dataclass
class Sampler:
    """Reads each daemon's GROUP rows and state in one MULTI: whenever a daemon's state
    says its cache is consistent (a checkpoint, no load, no rebuild), its rows all hold
    one transaction's value (whole transactions per daemon). Across the two daemons no
    such promise exists: ``split`` counts samples where tickets and agents differ."""

    redis_url: str
    states: dict[str, tuple[str, str, str]]  # table -> (state key, key prefix, field)
    samples: dict[str, int] = field(default_factory=dict)
    torn: list[str] = field(default_factory=list)
    split: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        while not self._stop.is_set():
            try:
                pipe = client.pipeline(transaction=True)
                for state, prefix, column in self.states.values():
                    pipe.hmget(state, "lsn", "loading", "rebuild")
                    for row in GROUP:
                        pipe.hget(f"{prefix}{row}}}", column)
                replies = iter(pipe.execute())
            except redis.RedisError:
                continue
            seen: dict[str, str] = {}
            for table in self.states:
                lsn, loading, rebuild = next(replies)
                values = [next(replies) for _ in GROUP]
                if not lsn or loading == "1" or rebuild:
                    continue
                self.samples[table] = self.samples.get(table, 0) + 1
                if len(set(values)) != 1:
                    self.torn.append(f"{table}: {values}")
                seen[table] = values[0]
            if len(seen) == 2 and len(set(seen.values())) == 2:
                self.split += 1
        client.close()


def cdc(database_url: str, redis_url: str, daemon: Daemon, *args: str) -> Any:
    return run_cdc(
        database_url,
        redis_url,
        daemon.slot,
        *args,
        CDC_PUBLICATION=daemon.env["CDC_PUBLICATION"],
    )


def keys_of(client: redis.Redis, prefixes: tuple[str, ...]) -> dict[str, bytes | None]:
    """Every key with one of the prefixes, with a dump of its value."""
    out: dict[str, bytes | None] = {}
    for prefix in prefixes:
        for raw in client.scan_iter(match=match_prefix(prefix), count=1000):
            out[raw.decode()] = client.dump(raw)
    return out


def rebuilt(daemon: Daemon) -> bool:
    return any(e.get("event") == "rebuild complete" for e in daemon.events())


def test_two_daemons_through_kill_and_data_loss(
    split: Split, pg: Conn, database_url: str, redis_url: str
) -> None:
    pg.execute(
        "INSERT INTO tickets (id, title) SELECT unnest(%s::text[]), '0'", (GROUP + ROWS[:5],)
    )
    insert_agents(pg, GROUP + [f"a{i}" for i in range(20)])
    split.tickets.start()
    split.agents.start()
    split.tickets.wait_ready()
    split.agents.wait_ready()
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    # Each says at start which tables it mirrors, and records them in its own state.
    for daemon, table in ((split.tickets, "tickets"), (split.agents, "agents")):
        mirroring = [e for e in daemon.events() if e.get("event") == "mirroring"]
        assert mirroring, daemon.log()
        assert mirroring[0]["tables"] == table
        assert mirroring[0]["not_mirrored"] == ("agents" if table == "tickets" else "tickets")
    tickets_state = client.hgetall(split.tickets_state)
    agents_state = client.hgetall(split.agents_state)
    assert tickets_state["tables"] == "tickets"
    assert agents_state["tables"] == "agents"
    assert tickets_state["fence"] != agents_state["fence"]
    assert not client.exists("cdc:state")  # neither daemon writes the single-daemon state
    assert client.hgetall(REGISTRY_KEY) == {
        "tickets": split.tickets_state,
        "agents": split.agents_state,
    }
    converged(database_url, redis_url, "m0")

    load = Load(database_url, ROWS).start()
    group = GroupWriter(database_url).start()
    sampler = Sampler(
        redis_url,
        {
            "tickets": (split.tickets_state, TICKETS.key_prefix, "title"),
            "agents": (split.agents_state, AGENTS.key_prefix, "display_name"),
        },
    ).start()
    try:
        load.wait_commits(20)
        # kill -9 of each, in turn: the other streams on; the restarted one resumes.
        for daemon in (split.tickets, split.agents):
            daemon.kill()
            other = split.agents if daemon is split.tickets else split.tickets
            target = group.commits + 5
            wait_for(lambda: group.commits > target, 60, "commits meanwhile")  # noqa: B023
            assert other.ready()
            daemon.start()
            daemon.wait_ready()
            load.wait_commits(10)
        assert not rebuilt(split.tickets)
        assert not rebuilt(split.agents)

        # Redis loses everything: each daemon finds its own state gone and rebuilds its
        # own tables (online, while the writers go on).
        client.flushdb()
        wait_for(lambda: rebuilt(split.tickets) and rebuilt(split.agents), 120, "both rebuilds")
        for state in (split.tickets_state, split.agents_state):
            wait_for(lambda: not client.hget(state, "rebuild"), 60, "the rebuild")  # noqa: B023
        load.wait_commits(10)
    finally:
        sampler.stop()
        group.stop()
        load.stop()
    counts = converged(database_url, redis_url, "end")
    assert counts["tickets"] >= len(GROUP)
    assert counts["agents"] >= len(GROUP) + 20
    assert client.hget(split.tickets_state, "tables") == "tickets"
    assert client.hget(split.agents_state, "tables") == "agents"
    assert client.hgetall(REGISTRY_KEY) == {
        "tickets": split.tickets_state,
        "agents": split.agents_state,
    }
    # Each detected its own state's loss.
    for daemon in (split.tickets, split.agents):
        reasons = [e for e in daemon.events() if e.get("event") == "the cache must be rebuilt"]
        assert reasons, daemon.log()
    # Whole transactions per daemon, all along.
    assert sampler.samples.get("tickets", 0) > 0
    assert sampler.samples.get("agents", 0) > 0
    assert not sampler.torn, sampler.torn[:10]
    print(
        f"samples {sampler.samples}, torn 0, split across daemons {sampler.split},"
        f" group commits {group.commits}"
    )


def test_verify_and_reset_touch_only_their_slot(
    split: Split, pg: Conn, database_url: str, redis_url: str
) -> None:
    pg.execute("INSERT INTO tickets (id, title) SELECT 't' || g, 'x' FROM generate_series(1, 30) g")
    insert_agents(pg, [f"a{i}" for i in range(12)])
    pg.execute("UPDATE agents SET status = 'online' WHERE id IN ('a1', 'a2')")
    split.tickets.start()
    split.agents.start()
    split.tickets.wait_ready()
    split.agents.wait_ready()
    converged(database_url, redis_url, "v0")
    client = redis.Redis.from_url(redis_url)

    for daemon, table, rows in ((split.tickets, "tickets", 31), (split.agents, "agents", 13)):
        done = cdc(database_url, redis_url, daemon, "verify", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["tables"] == [table]
        assert report["equal"]
        assert report["rows"] == rows  # its table only (the fences included)

    # A difference in the agents' keys is the agents daemon's: the tickets verify does
    # not see it.
    client.hset(AGENTS.key("a3"), "display_name", "wrong")
    done = cdc(database_url, redis_url, split.tickets, "verify", "--json")
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout)["equal"]
    done = cdc(database_url, redis_url, split.agents, "verify", "--json")
    assert done.returncode == 1
    assert [d["key"] for d in json.loads(done.stdout)["different"]] == [AGENTS.key("a3")]
    # --repair asks the daemons (a logical message both receive): the agents daemon
    # re-reads the row, the tickets daemon leaves another daemon's table alone.
    done = cdc(database_url, redis_url, split.agents, "verify", "--repair")
    assert done.returncode in (0, 1), done.stderr
    wait_for(lambda: client.hget(AGENTS.key("a3"), "display_name") == b"0", 60, "the repair")
    assert "re-reading rows" not in split.tickets.log()

    # Reset of the tickets slot: its keys are reloaded; the agents daemon's keys and
    # state are untouched (same values, same fence), and it streams on.
    agents_prefixes = AGENTS.owned_prefixes
    before = keys_of(client, agents_prefixes)
    assert len(before) > 12
    agents_state = client.hmget(split.agents_state, "fence", "epoch", "tables", "source")
    tickets_epoch = client.hget(split.tickets_state, "epoch")
    split.tickets.stop()
    done = cdc(database_url, redis_url, split.tickets, "slot", "reset", "--yes")
    assert done.returncode == 0, done.stderr
    assert "tickets" in done.stdout, done.stdout
    assert "agents" not in done.stdout, done.stdout
    assert keys_of(client, agents_prefixes) == before
    # (its checkpoint may move on: the agents daemon streams on meanwhile)
    assert client.hmget(split.agents_state, "fence", "epoch", "tables", "source") == agents_state
    assert client.hget(split.tickets_state, "epoch") != tickets_epoch
    assert client.hget(split.tickets_state, "tables") == b"tickets"
    split.tickets.start()
    split.tickets.wait_ready()
    pg.execute("UPDATE tickets SET title = 'after reset' WHERE id = 't1'")
    pg.execute("UPDATE agents SET display_name = 'after reset' WHERE id = 'a1'")
    converged(database_url, redis_url, "v1")
    assert split.agents.proc is not None
    assert split.agents.proc.poll() is None


def test_read_your_writes_with_two_daemons(
    split: Split, writer: Writer, pg: Conn, redis_url: str
) -> None:
    split.tickets.start()
    split.agents.start()
    split.tickets.wait_ready()
    split.agents.wait_ready()
    agent = writer.create_agent(
        {"username": "ann", "display_name": "Ann", "password": "12345678", "status": "online"}
    )
    ticket = writer.create_ticket({"title": "first"})
    assigned = writer.assign_ticket(ticket.value.id, {"agent_id": agent.value.id})
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with CacheReader.connect(redis_url) as reader:
        # Each wait follows the checkpoint of the daemon that mirrors the table read.
        assert reader.wait(agent.token, timeout=30, table="agents")
        assert reader.wait(assigned.token, timeout=30, table="tickets")
        found = reader.ticket(ticket.value.id, after=assigned.token, timeout=30)
        assert found is not None
        assert found.assignee_id == agent.value.id
        renamed = writer.update_agent(agent.value.id, {"display_name": "Ann B"})
        seen = reader.agent(agent.value.id, after=renamed.token, timeout=30)
        assert seen is not None
        assert seen.display_name == "Ann B"
        by_name = reader.agent_by_username("ann", after=renamed.token, timeout=30)
        assert by_name is not None
        assert by_name.display_name == "Ann B"
        # The view reads check the state of the daemon that keeps the view.
        assert [t.id for t in reader.tickets_of(agent.value.id, after=assigned.token)] == [
            ticket.value.id
        ]
        assert [a.id for a in reader.agents_with_status("online", after=renamed.token)] == [
            agent.value.id
        ]
        assert client.exists(ticket_status_key("open"), agent_status_key("online")) == 2

        # The agents daemon paused: a ticket write is still visible after its token (the
        # tickets daemon's checkpoint), an agents write is not (its daemon is behind).
        assert split.agents.proc is not None
        os.kill(split.agents.pid, signal.SIGSTOP)
        try:
            retitled = writer.update_ticket(ticket.value.id, {"title": "second"})
            renamed = writer.update_agent(agent.value.id, {"display_name": "Ann C"})
            assert reader.wait(retitled.token, timeout=30, table="tickets")
            assert client.hget(TICKETS.key(ticket.value.id), "title") == "second"
            assert not reader.wait(renamed.token, timeout=0.5, table="agents")
            assert client.hget(AGENTS.key(agent.value.id), "display_name") == "Ann B"
        finally:
            os.kill(split.agents.pid, signal.SIGCONT)
        assert reader.wait(renamed.token, timeout=30, table="agents")
        assert client.hget(AGENTS.key(agent.value.id), "display_name") == "Ann C"
        assert text(client.hget(split.agents_state, "tables") or "") == "agents"

    async def async_reads() -> tuple[bool, bool, Any, Any]:
        retitled = writer.update_ticket(ticket.value.id, {"title": "third"})
        renamed = writer.update_agent(agent.value.id, {"display_name": "Ann D"})
        async with AsyncCacheReader.connect(redis_url) as areader:
            return (
                await areader.wait(retitled.token, timeout=30, table="tickets"),
                await areader.wait(renamed.token, timeout=30, table="agents"),
                await areader.ticket(ticket.value.id, after=retitled.token, timeout=30),
                await areader.agent(agent.value.id, after=renamed.token, timeout=30),
            )

    ticket_ok, agent_ok, found_ticket, found_agent = asyncio.run(async_reads())
    assert ticket_ok
    assert agent_ok
    assert found_ticket.title == "third"
    assert found_agent.display_name == "Ann D"


def test_publication_with_part_of_the_tables_and_overlaps(
    make_daemon: Callable[..., Daemon], pg: Conn, slot_name: str, redis_url: str
) -> None:
    """A publication holding one table is mirrored alone; a second daemon whose
    publication overlaps a live daemon's is refused (exit 2, one line)."""
    split_publications(pg)
    pg.execute("CREATE PUBLICATION cdc_both FOR TABLE tickets")
    first = make_daemon(CDC_SLOT=slot_name + "_t", CDC_PUBLICATION="cdc_cache").start()
    first.wait_ready()
    second = make_daemon(CDC_SLOT=slot_name + "_b", CDC_PUBLICATION="cdc_both").start()
    assert second.wait_exit(60) == 2
    lines = [line for line in second.log().splitlines() if line.startswith("cdc: ")]
    assert len(lines) == 1, second.log()
    assert lines[0].startswith("cdc: table tickets is mirrored by the daemon of cdc:state:")
    assert "must not overlap" in lines[0]
    # Once the first daemon is gone for good (its slot dropped), its state is no one's.
    first.stop()
    pg.execute("SELECT pg_drop_replication_slot(%s)", (first.slot,))
    third = make_daemon(CDC_SLOT=slot_name + "_b", CDC_PUBLICATION="cdc_both").start()
    third.wait_ready()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget(REGISTRY_KEY, "tickets") == state_key(third.slot, mirrors_all=False)


def test_standby_of_one_daemon_takes_over_after_kill_9(
    split: Split, make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """A hot standby for the agents daemon (same slot and publication) takes over after
    its kill -9; the tickets daemon goes on untouched."""
    insert_agents(pg, GROUP)
    split.tickets.start()
    split.agents.env["CDC_STANDBY"] = "true"
    split.agents.start()
    split.tickets.wait_ready()
    split.agents.wait_ready()
    standby = make_daemon(
        CDC_SLOT=split.agents.slot, CDC_PUBLICATION="cdc_agents", CDC_STANDBY="true"
    ).start()
    wait_for(lambda: "standby: waiting for the slot" in standby.log(), 30, "the standby")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    tickets_fence = client.hget(split.tickets_state, "fence")
    group = GroupWriter(database_url).start()
    try:
        wait_for(lambda: group.commits > 10, 60, "commits")
        split.agents.kill()
        standby.wait_ready()
        target = group.commits + 10
        wait_for(lambda: group.commits > target, 60, "commits after the takeover")
    finally:
        group.stop()
    converged(database_url, redis_url, "standby")
    assert str(client.hget(split.agents_state, "owner")).endswith(f":{standby.pid}")
    assert client.hget(split.tickets_state, "fence") == tickets_fence


def test_one_daemon_split_into_two(
    make_daemon: Callable[..., Daemon], pg: Conn, slot_name: str, database_url: str, redis_url: str
) -> None:
    """A single daemon (every table, ``cdc:state``) whose publication then loses agents to
    a second daemon: it rebuilds its tickets under ``cdc:state:<slot>`` and drops its
    former state, so the agents daemon is not refused."""
    insert_agents(pg, GROUP)
    pg.execute("INSERT INTO tickets (id, title) VALUES ('t1', 'x')")
    whole = make_daemon(CDC_SLOT=slot_name + "_t")
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: whole.stop() if whole.proc and whole.proc.poll() is None else 0)
        whole.start().wait_ready()
        converged(database_url, redis_url, "whole")
        whole.stop()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.hget("cdc:state", "tables") == "agents,tickets"
    split_publications(pg)
    tickets = make_daemon(CDC_SLOT=slot_name + "_t", CDC_PUBLICATION="cdc_cache").start()
    tickets.wait_ready()
    agents = make_daemon(CDC_SLOT=slot_name + "_a", CDC_PUBLICATION="cdc_agents").start()
    agents.wait_ready()
    keyed = state_key(slot_name + "_t", mirrors_all=False)
    wait_for(lambda: not client.hget(keyed, "rebuild"), 60, "the tickets rebuild")
    assert not client.exists("cdc:state")
    pg.execute("UPDATE tickets SET title = 'y' WHERE id = 't1'")
    converged(database_url, redis_url, "split")
    assert client.hget(keyed, "tables") == "tickets"


def test_truncate_touches_only_its_daemon(
    split: Split, pg: Conn, database_url: str, redis_url: str
) -> None:
    insert_agents(pg, GROUP)
    pg.execute("UPDATE agents SET status = 'online'")
    pg.execute("INSERT INTO tickets (id, title) SELECT 't' || g, 'x' FROM generate_series(1, 20) g")
    split.tickets.start()
    split.agents.start()
    split.tickets.wait_ready()
    split.agents.wait_ready()
    converged(database_url, redis_url, "t0")
    client = redis.Redis.from_url(redis_url)
    agents_before = keys_of(client, AGENTS.owned_prefixes)
    assert len(agents_before) > 2 * len(GROUP)
    pg.execute("TRUNCATE tickets CASCADE")
    wait_for(lambda: not keys_of(client, TICKETS.owned_prefixes), 60, "the tickets keys to go")
    assert keys_of(client, AGENTS.owned_prefixes) == agents_before
    converged(database_url, redis_url, "t1")


# -- the layout and the sink, without daemons --------------------------------------------------


def test_state_keys_and_messages() -> None:
    assert state_key("cdc_cache") == "cdc:state"
    assert state_key("other") == "cdc:state"  # mirrors every table: the single layout
    assert state_key("cdc_cache", mirrors_all=False) == "cdc:state"  # the default slot
    assert state_key("cdc_agents", mirrors_all=False) == "cdc:state:cdc_agents"
    assert applied_message("cdc:state", "0/10") == "0/10"  # unchanged for old readers
    assert applied_message("cdc:state:cdc_agents", "0/10") == "0/10 cdc:state:cdc_agents"
    assert parse_applied("0/10") == ("cdc:state", "0/10")
    assert parse_applied("0/10 cdc:state:cdc_agents") == ("cdc:state:cdc_agents", "0/10")


def test_two_sinks_keep_their_own_state_and_fence(redis_url: str) -> None:
    """Each state has its own fence and checkpoint: a successor on one slot fences that
    slot's predecessor only; each batch publishes its own state's position."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe("cdc:applied")
    sinks = {}
    for slot, table in (("s_t", "tickets"), ("s_a", "agents")):
        sink = RedisSink(redis_url, 5, state_key=state_key(slot, False), mirrors=(table,))
        sink.connect()
        sink.claim({"slot": slot})
        sink.reset_state({"lsn": "0/1", "slot": slot})
        sinks[table] = sink
    assert client.hgetall(REGISTRY_KEY) == {"tickets": "cdc:state:s_t", "agents": "cdc:state:s_a"}
    sinks["tickets"].apply(CommandBatch(), {"lsn": "0/5"})
    sinks["agents"].apply(CommandBatch(), {"lsn": "0/3"})
    assert client.hget("cdc:state:s_t", "lsn") == "0/5"
    assert client.hget("cdc:state:s_a", "lsn") == "0/3"
    assert client.hget("cdc:state:s_a", "tables") == "agents"
    successor = RedisSink(redis_url, 5, state_key="cdc:state:s_a", mirrors=("agents",))
    successor.connect()
    successor.claim({"slot": "s_a"})
    with pytest.raises(Fenced):
        sinks["agents"].apply(CommandBatch(), {"lsn": "0/4"})
    sinks["tickets"].apply(CommandBatch(), {"lsn": "0/6"})  # the other slot goes on
    messages = []
    while (message := pubsub.get_message(timeout=1)) is not None:
        if message["type"] == "message":
            messages.append(message["data"])
    assert messages == ["0/5 cdc:state:s_t", "0/3 cdc:state:s_a", "0/6 cdc:state:s_t"]
    for sink in (*sinks.values(), successor):
        sink.close()
    pubsub.close()


def test_a_table_added_to_the_publication_is_loaded(
    make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """The default slot keeps ``cdc:state`` whatever it mirrors; when its publication
    gains a table the cache does not hold, the daemon rebuilds online and loads it."""
    split_publications(pg)
    insert_agents(pg, GROUP)
    pg.execute("INSERT INTO tickets (id, title) VALUES ('t1', 'x')")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    daemon = make_daemon(CDC_SLOT="cdc_cache").start()
    daemon.wait_ready()
    fence(database_url, redis_url)
    assert client.hget("cdc:state", "tables") == "tickets"
    assert not client.exists(AGENTS.key(GROUP[0]))
    daemon.stop()
    pg.execute("DROP PUBLICATION cdc_agents")
    columns = (
        ""
        if pg.info.server_version < 150000
        else (
            " ("
            + ", ".join(
                str(r[0])
                for r in pg.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = 'agents'::regclass"
                    " AND attnum > 0 AND NOT attisdropped AND attname <> 'password_hash'"
                    " ORDER BY attnum"
                ).fetchall()
            )
            + ")"
        )
    )
    pg.execute(f"ALTER PUBLICATION cdc_cache ADD TABLE agents{columns}")
    again = make_daemon(CDC_SLOT="cdc_cache").start()
    again.wait_ready()
    wait_for(lambda: not client.hget("cdc:state", "rebuild"), 60, "the rebuild")
    converged(database_url, redis_url, "added")
    assert client.hget("cdc:state", "tables") == "agents,tickets"
    reasons = [
        str(e.get("reason"))
        for e in again.events()
        if e.get("event") == "the cache must be rebuilt"
    ]
    assert reasons == ["the daemon now mirrors agents, which the cache does not hold"]


def test_a_table_no_longer_mirrored_leaves_the_registry(redis_url: str) -> None:
    """A daemon whose publication lost a table drops the table's registry entry at its
    claim, and a reader that remembered the entry does not take the daemon's checkpoint
    for that table's any more (it answers from PostgreSQL: the wait says False)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    both = RedisSink(redis_url, 5, state_key="cdc:state", mirrors=("agents", "tickets"))
    both.connect()
    both.claim({"slot": "cdc_cache"})
    both.reset_state({"lsn": "0/10", "slot": "cdc_cache"})
    assert client.hgetall(REGISTRY_KEY) == {"agents": "cdc:state", "tickets": "cdc:state"}
    with CacheReader.connect(redis_url) as reader:
        assert reader.wait("0/10", timeout=5, table="agents")  # remembered: cdc:state
        # Restarted with a publication that holds tickets only (same slot, same state).
        both.close()
        tickets = RedisSink(redis_url, 5, state_key="cdc:state", mirrors=("tickets",))
        tickets.connect()
        tickets.claim({"slot": "cdc_cache"})
        assert client.hgetall(REGISTRY_KEY) == {"tickets": "cdc:state"}
        tickets.apply(CommandBatch(), {"lsn": "0/20"})
        assert reader.wait("0/20", timeout=5, table="tickets")
        # cdc:state passed 0/20, but it no longer mirrors agents.
        assert not reader.wait("0/20", timeout=0.2, table="agents")
        assert not reader.wait("0/10", timeout=0.2, table="agents")
        tickets.close()
    client.close()


def test_a_table_no_daemon_registers_is_read_from_postgresql(
    redis_url: str, database_url: str, pg: Conn
) -> None:
    """With a registry (several daemons) that names no daemon for tickets, cdc:state is
    another daemon's (here the agents daemon of the default slot): reads of tickets, rows
    and views, with a token or without, are answered by PostgreSQL, not from Redis keys
    no daemon keeps. Without any registry (a single daemon) cdc:state still counts."""
    pg.execute("INSERT INTO tickets (id, title, status) VALUES ('t1', 'fresh', 'open')")
    (token,) = pg.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("",)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    agents = RedisSink(redis_url, 5, state_key="cdc:state", mirrors=("agents",))
    agents.connect()
    agents.claim({"slot": "cdc_cache"})
    agents.reset_state({"lsn": "F/0", "slot": "cdc_cache", "views": "1"})
    pg.execute("SET TimeZone = 'UTC'")
    columns = [
        str(r[0])
        for r in pg.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'tickets'::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ).fetchall()
    ]
    values = pg.execute(
        f"SELECT {', '.join(c + '::text' for c in columns)} FROM tickets WHERE id = 't1'"
    ).fetchone()
    assert values is not None
    row: dict[Any, Any] = {c: str(v) for c, v in zip(columns, values, strict=True) if v is not None}
    client.hset(TICKETS.key("t1"), mapping={**row, "title": "stale"})  # no daemon keeps it
    db = Database(database_url, min_size=1, max_size=1)
    db.open()
    try:
        with CacheReader.connect(redis_url, db) as reader:
            for after in (None, str(token)):
                found = reader.ticket("t1", after=after, timeout=0.2)
                assert found is not None
                assert found.title == "fresh"
                assert [t.id for t in reader.tickets_with_status("open", after=after)] == ["t1"]
            assert not reader.wait(str(token), timeout=0.2, table="tickets")
            assert reader.wait(str(token), timeout=5, table="agents")
        # A single daemon from before the registry and the state's tables field.
        client.delete(REGISTRY_KEY)
        client.hdel("cdc:state", "tables")
        with CacheReader.connect(redis_url, db) as reader:
            found = reader.ticket("t1", after=str(token), timeout=5)
            assert found is not None
            assert found.title == "stale"
    finally:
        db.close()
        agents.close()
        client.close()


def test_two_daemons_of_every_table_on_one_redis_are_refused(
    make_daemon: Callable[..., Daemon], pg: Conn, slot_name: str, redis_url: str
) -> None:
    """Two daemons whose publications hold every table both keep cdc:state: the second
    (another slot, the first's still in PostgreSQL) is refused with one line naming both
    slots, and the first keeps its fence. Once the first slot is dropped, a daemon on a
    new slot may take the state over (here: CDC_ON_SLOT_LOSS=rebuild)."""
    first = make_daemon(CDC_SLOT=slot_name + "_1").start()
    first.wait_ready()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    owned = client.hget("cdc:state", "fence")
    # CDC_ON_SLOT_LOSS=rebuild: a cache without its slot would be rebuilt (taken over).
    second = make_daemon(CDC_SLOT=slot_name + "_2", CDC_ON_SLOT_LOSS="rebuild").start()
    assert second.wait_exit(60) == 2
    lines = [line for line in second.log().splitlines() if line.startswith("cdc: ")]
    assert len(lines) == 1, second.log()
    assert f"slot {first.slot}, not of slot {second.slot}" in lines[0]
    assert client.hget("cdc:state", "fence") == owned
    assert first.proc is not None
    assert first.proc.poll() is None
    first.stop()
    pg.execute("SELECT pg_drop_replication_slot(%s)", (first.slot,))
    third = make_daemon(CDC_SLOT=slot_name + "_2", CDC_ON_SLOT_LOSS="rebuild").start()
    third.wait_ready()
    assert client.hget("cdc:state", "slot") == third.slot


# Runs the daemon with its rebuild's clearing of the tracked keys cut short: one key
# unlinked, then kill -9 (what a crash mid-clear leaves behind).
_KILLED_MID_CLEAR = """
import os, signal, sys
import redis
from cdc.runtime import daemon
from schema.keys import match_prefix

def clear(self):
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    for table in self.tables:
        for prefix in table.owned_prefixes:
            for key in client.scan_iter(match=match_prefix(prefix)):
                client.unlink(key)
                os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

daemon.Daemon._clear_tracked_keys = clear
sys.argv = ["cdc", "run"]
from cdc.__main__ import main
main()
"""


def agents_columns(pg: Conn) -> str:
    """The column list agents is published with (not password_hash), where supported."""
    if pg.info.server_version < 150000:
        return ""
    rows = pg.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'agents'::regclass"
        " AND attnum > 0 AND NOT attisdropped AND attname <> 'password_hash' ORDER BY attnum"
    ).fetchall()
    return " (" + ", ".join(str(r[0]) for r in rows) + ")"


@pytest.mark.parametrize("why", ["tables_added", "source"])
def test_kill_9_while_a_rebuild_clears_keys_rebuilds_again(
    why: str, make_daemon: Callable[..., Daemon], pg: Conn, database_url: str, redis_url: str
) -> None:
    """A rebuild (the publication gained a table; the cache was built from another
    source) killed while it clears the tracked keys: the restart rebuilds again and
    converges, instead of resuming from a cache that lost keys for good."""
    if why == "tables_added":
        split_publications(pg)
    insert_agents(pg, GROUP)
    pg.execute("INSERT INTO tickets (id, title) SELECT unnest(%s::text[]), 'x'", (ROWS,))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    daemon = make_daemon(CDC_SLOT="cdc_cache").start()
    daemon.wait_ready()
    fence(database_url, redis_url)
    daemon.stop()
    if why == "tables_added":
        assert client.hget("cdc:state", "tables") == "tickets"
        pg.execute("DROP PUBLICATION cdc_agents")
        pg.execute(f"ALTER PUBLICATION cdc_cache ADD TABLE agents{agents_columns(pg)}")
    else:
        client.hset("cdc:state", "source", "1/other/cdc_cache")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_CLEAR],
        cwd=ROOT,
        env=daemon.environment(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert b"the cache must be rebuilt" in killed.stdout + killed.stderr
    again = make_daemon(CDC_SLOT="cdc_cache").start()
    again.wait_ready()
    wait_for(lambda: not client.hget("cdc:state", "rebuild"), 60, "the rebuild")
    converged(database_url, redis_url, "after the kill")
    assert client.hget("cdc:state", "tables") == "agents,tickets"
    assert client.hget("cdc:state", "source") != "1/other/cdc_cache"


def _tickets_daemon_user(admin: redis.Redis, state: str, hdel: bool) -> str:
    """An ACL user with only what the tickets daemon of a split needs (README's commands,
    no INFO), its own state and the registry; ``hdel``: may clean the registry."""
    user = f"t_{uuid.uuid4().hex[:8]}"
    commands = (
        "+ping +select +role +multi +exec +watch +unwatch +wait +eval +evalsha +script|load"
        " +scan +type +exists +get +mget +set +del +unlink +rename +hget +hmget +hgetall"
        " +hexists +hset +sadd +srem +zadd +zrem +sscan +zscan +zscore +xadd +publish"
    ) + (" +hdel" if hdel else "")
    admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL",
        "SETUSER",
        user,
        "on",
        ">pw-" + user,
        "resetkeys",
        "~ticket:*",
        "~tickets:*",
        f"~{state}",
        "~cdc:tables",
        "resetchannels",
        "&cdc:*",
        "-@all",
        *commands.split(),
    )
    return user


def test_least_privilege_users_of_one_daemon(
    split: Split, redis_url: str, database_url: str
) -> None:
    """The startup permission check covers what the daemon of part of the tables sends
    (its own state, the registry with HDEL), also for a user that may not run INFO: a
    user with exactly that starts and converges, one without HDEL is refused (exit 2)."""
    split.agents.start().wait_ready()
    admin = redis.Redis.from_url(redis_url)
    host, db = redis_url.split("://", 1)[1].split("/", 1)
    users = [_tickets_daemon_user(admin, split.tickets_state, hdel) for hdel in (False, True)]
    try:
        lacking, enough = (f"redis://{u}:pw-{u}@{host}/{db}" for u in users)
        split.tickets.env["REDIS_URL"] = lacking
        split.tickets.start()
        assert split.tickets.wait_exit(60) == 2
        lines = [line for line in split.tickets.log().splitlines() if line.startswith("cdc: ")]
        assert len(lines) == 1, split.tickets.log()
        assert "may not run HDEL on cdc:tables" in lines[0]
        split.tickets.env["REDIS_URL"] = enough
        split.tickets.start().wait_ready()
        converged(database_url, redis_url, "least privilege")
        assert admin.hget(REGISTRY_KEY, "tickets") == split.tickets_state.encode()
    finally:
        split.tickets.stop()
        for user in users:
            admin.acl_deluser(user)
        admin.close()
