"""Bad input: a typed error before anything reaches PostgreSQL (reliability, "Bad input").

The ``offline`` writer's pool points at a port nobody listens on and is never opened: if
an operation tried to talk to PostgreSQL it would raise ``Unavailable``, so getting
``InvalidInput`` proves the input was refused first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
import pytest

from devstack.servers import free_port
from schema import keys
from writer import (
    Database,
    InvalidInput,
    OutcomeUnknown,
    Unavailable,
    Writer,
)


@pytest.fixture
def offline() -> Writer:
    database = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/none", timeout=0.5)
    return Writer(database)


Case = tuple[str, Callable[[Writer], Any], str]

CASES: list[Case] = [
    ("wrong type", lambda w: w.create_ticket({"title": 42}), "title"),
    ("wrong enum", lambda w: w.create_ticket({"title": "t", "priority": "whenever"}), "priority"),
    ("unknown field", lambda w: w.create_ticket({"title": "t", "color": "red"}), "color"),
    ("missing required", lambda w: w.create_ticket({"description": "no title"}), "title"),
    ("nul byte", lambda w: w.create_ticket({"title": "a\x00b"}), "title"),
    (
        "nul in json",
        lambda w: w.create_ticket({"title": "t", "customer": {"n": "a\x00"}}),
        "customer",
    ),
    (
        "nan in json",
        lambda w: w.create_ticket({"title": "t", "customer": {"n": float("nan")}}),
        "customer",
    ),
    ("over-long", lambda w: w.create_ticket({"title": "x" * 501}), "title"),
    (
        "over-long description",
        lambda w: w.create_ticket({"title": "t", "description": "x" * 1_000_001}),
        "description",
    ),
    (
        "naive datetime",
        lambda w: w.create_ticket({"title": "t", "sla_due_at": datetime(2030, 1, 1)}),
        "sla_due_at",
    ),
    (
        "string for datetime",
        lambda w: w.create_ticket({"title": "t", "sla_due_at": "tomorrow"}),
        "sla_due_at",
    ),
    (
        "bool for int",
        lambda w: w.add_attachment("t", {"filename": "f", "stored_path": "/f", "size_bytes": True}),
        "size_bytes",
    ),
    (
        "negative size",
        lambda w: w.add_attachment("t", {"filename": "f", "stored_path": "/f", "size_bytes": -1}),
        "size_bytes",
    ),
    ("control char in id", lambda w: w.create_ticket({"id": "a\nb", "title": "t"}), "id"),
    ("empty id", lambda w: w.create_ticket({"id": "", "title": "t"}), "id"),
    ("over-long id", lambda w: w.create_ticket({"id": "x" * 129, "title": "t"}), "id"),
    ("bad id argument", lambda w: w.update_ticket("", {"title": "t"}), "ticket_id"),
    (
        "non-string id argument",
        lambda w: w.change_ticket_status(7, {"to_status": "closed"}),  # type: ignore[arg-type]
        "ticket_id",
    ),
    ("empty update", lambda w: w.update_ticket("t", {}), ""),
    ("clearing a required column", lambda w: w.update_ticket("t", {"title": None}), "title"),
    (
        "short password",
        lambda w: w.create_agent({"username": "u", "display_name": "U", "password": "short"}),
        "password",
    ),
    ("password not a string", lambda w: w.set_agent_password("a", 12345678), "password"),  # type: ignore[arg-type]
    (
        "bad email",
        lambda w: w.create_agent(
            {"username": "u", "display_name": "U", "password": "12345678", "email": "nope"}
        ),
        "email",
    ),
    (
        "bad role",
        lambda w: w.create_agent(
            {"username": "u", "display_name": "U", "password": "12345678", "role": "god"}
        ),
        "role",
    ),
    (
        "blank username",
        lambda w: w.create_agent({"username": "  ", "display_name": "U", "password": "12345678"}),
        "username",
    ),
    ("bad status", lambda w: w.change_ticket_status("t", {"to_status": "done"}), "to_status"),
    ("not a mapping", lambda w: w.create_ticket(["title"]), ""),  # type: ignore[arg-type]
    (
        "no recipients",
        lambda w: w.record_email(
            {"email_type": "x", "sender": "a@b.io", "recipients": [], "subject": "s"}
        ),
        "recipients",
    ),
    (
        "bad checksum",
        lambda w: w.add_attachment(
            "t", {"filename": "f", "stored_path": "/f", "size_bytes": 1, "checksum_sha256": "xyz"}
        ),
        "checksum_sha256",
    ),
]


@pytest.mark.parametrize(("name", "call", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_postgres(
    offline: Writer, name: str, call: Callable[[Writer], Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        call(offline)
    if field:
        assert field in info.value.fields, info.value.problems


def test_offline_writer_really_is_offline(offline: Writer) -> None:
    # The control for the cases above: valid input does try PostgreSQL, and fails there.
    with pytest.raises(Unavailable):
        offline.create_ticket({"title": "valid"})


def test_error_messages_never_carry_the_values(offline: Writer) -> None:
    with pytest.raises(InvalidInput) as info:
        offline.create_agent({"username": "u", "display_name": "U", "password": "s3cr"})
    assert "s3cr" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_bad_input_leaves_the_database_untouched(writer: Writer, database_url: str) -> None:
    for _, call, _ in CASES:
        with pytest.raises(InvalidInput):
            call(writer)
    with psycopg.connect(database_url) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM tickets), (SELECT count(*) FROM agents),"
            " (SELECT count(*) FROM audit_logs)"
        ).fetchone()
    assert counts == (0, 0, 0)


@pytest.mark.parametrize(
    "odd", ["a:b", "*", "?", "[x]", "{y}", "}{", "with space", "ünï©ødé", "a}b{c", "a}"]
)
def test_odd_ids_are_accepted_and_give_distinct_keys(writer: Writer, odd: str) -> None:
    ticket = writer.create_ticket({"id": odd, "title": "t"}).value
    assert ticket.id == odd
    agent = writer.create_agent(
        {"id": odd, "username": odd, "display_name": "D", "password": "12345678"}
    ).value
    assert agent.username == odd


def test_odd_ids_never_collide_in_redis_keys() -> None:
    ids = ["a", "a}", "{a", "a}b", "a:b", "a}{b", "", " a", "a ", "*", "?", "[]", "ä"]
    all_keys = [keys.ticket_key(i) for i in ids] + [keys.agent_key(i) for i in ids]
    all_keys += [keys.agent_username_key(i) for i in ids]
    assert len(set(all_keys)) == len(all_keys)
    for i in ids:
        assert keys.TICKETS.key_id(keys.ticket_key(i)) == i
        assert keys.AGENTS.key_id(keys.agent_username_key(i)) is None


def test_connection_lost_during_commit_is_outcome_unknown(
    writer: Writer, database_url: str
) -> None:
    """A deferred trigger holds COMMIT open; the backend is killed while it waits."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(
            """
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON tickets
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
            """
        )
        killed: list[int] = []

        def kill_when_committing() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'writer'"
                    " AND wait_event = 'PgSleep'"
                ).fetchone()
                if row:
                    admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    killed.append(row[0])
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_when_committing)
        killer.start()
        with pytest.raises(OutcomeUnknown) as info:
            writer.create_ticket({"title": "in doubt"})
        killer.join()
        assert killed
        assert "may or may not" in str(info.value)
        # The writer is still usable afterwards (the broken connection left the pool).
        admin.execute("DROP TRIGGER slow_commit ON tickets")
        assert writer.create_ticket({"title": "after"}).value.title == "after"
