"""Cluster mode as a least-privilege ACL user, and its credentials refused.

A Redis Cluster keeps an ACL per node, so the user of README "TLS and ACL" (the
single-node list plus the cluster additions) is created on every node. The daemon runs as
that user through a snapshot, streaming with views, a ``kill -9`` (the next start
delivers the outboxes) and a ``TRUNCATE``; ``cdc verify`` runs as it too; no node's
``ACL LOG`` may then hold a refused command. The daemon is given a plain ``redis://`` URL
of one node, which it must recognise as a cluster's although the user may not run
``INFO``. A wrong password, or a user lacking a command cluster mode sends, ends the
start with exit code 2 and one line that never shows the password in any form.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from devstack.redis_ha import CLUSTER_ACL_RULES, DAEMON_ACL_RULES, acl_cluster_additions
from schema.redis_url import cluster_url
from tests.cluster import RedisCluster
from tests.helpers import ROOT, Daemon, assert_converged, run_cdc, running
from tests.test_cluster import Workload, seed


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path / "cluster").start()
    try:
        yield c
    finally:
        c.stop()


def add_user(cluster: RedisCluster, user: str, password: str, rules: tuple[str, ...]) -> None:
    """The same ACL user on every node (a cluster does not share ACLs)."""
    for port in cluster.ports:
        node = cluster.node(port)
        node.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *rules)  # type: ignore[no-untyped-call]
        node.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
        node.close()


def refusals(cluster: RedisCluster) -> list[str]:
    """What the nodes' ACL LOGs recorded as refused (command or key, and why)."""
    found = []
    for port in cluster.ports:
        node = cluster.node(port)
        for entry in node.acl_log():
            found.append(f"{port}: {entry.get('object')} ({entry.get('reason')})")
        node.close()
    return found


def test_readme_prints_the_cluster_acl_additions() -> None:
    readme = (ROOT / "README.md").read_text()
    assert acl_cluster_additions("cdc") in readme


def test_daemon_on_a_cluster_as_the_readme_acl_user(
    database_url: str,
    make_daemon: Callable[..., Daemon],
    cluster: RedisCluster,
    slot_name: str,
) -> None:
    password = uuid.uuid4().hex
    add_user(cluster, "cdc", password, DAEMON_ACL_RULES + CLUSTER_ACL_RULES)
    node_url = f"redis://cdc:{password}@127.0.0.1:{cluster.ports[0]}/0"
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(node_url).info("cluster")
    # Recognised as a cluster's node without INFO (HELLO's mode).
    assert cluster_url(node_url).startswith("redis+cluster://cdc:")
    seed(database_url)
    daemon = make_daemon(REDIS_URL=node_url)
    load = Workload(database_url, seed=3)
    with running(daemon):
        assert_converged(database_url, cluster.url)
        load.start()
        load.wait(60)
        daemon.kill()  # row scripts may have left outboxes: the next claim delivers them
        load.wait(30)
        daemon.start()
        daemon.wait_ready(60)
        load.truncate_at = load.commits + 20
        load.wait(60)
        load.stop()
        assert load.commits > load.truncate_at
        assert_converged(database_url, cluster.url)
        assert daemon.ready()
    done = run_cdc(database_url, node_url, slot_name, "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    log = daemon.log()
    # INFO alone may be refused: the eviction check is then skipped with a warning.
    assert [r for r in refusals(cluster) if not r.split(": ", 1)[1].startswith("info ")] == []
    assert any("may not run INFO" in e.get("event", "") for e in daemon.events()), log
    assert "NOPERM" not in log, log
    assert password not in log


def test_a_user_without_the_cluster_additions_is_refused_at_start(
    make_daemon: Callable[..., Daemon], cluster: RedisCluster
) -> None:
    """The single-node list alone: exit 2 naming the first command missing, before
    anything is written (a refusal inside a slot's script would stop mid-batch)."""
    password = uuid.uuid4().hex
    add_user(cluster, "cdc", password, DAEMON_ACL_RULES)
    url = f"redis+cluster://cdc:{password}@127.0.0.1:{cluster.ports[0]}"
    daemon = make_daemon(REDIS_URL=url)
    daemon.start()
    assert daemon.wait_exit(60) == 2, daemon.log()
    last = daemon.log().strip().splitlines()[-1]
    assert last == (
        "cdc: the Redis user may not run CLUSTER SLOTS on the Redis Cluster: grant it"
        ' +cluster|slots on every node (README "TLS and ACL")'
    ), daemon.log()
    add_user(cluster, "cdc", password, (*DAEMON_ACL_RULES, "+cluster|slots", "+command"))
    daemon = make_daemon(REDIS_URL=url)
    daemon.start()
    assert daemon.wait_exit(60) == 2, daemon.log()
    last = daemon.log().strip().splitlines()[-1]
    assert last.startswith("cdc: the Redis user may not run HINCRBY on cdc:fence:*"), last
    # Everything but the scans a lost-slot repair makes of the view keys.
    scans = ("-sscan", "-zscan")
    add_user(cluster, "cdc", password, (*DAEMON_ACL_RULES, *CLUSTER_ACL_RULES, *scans))
    daemon = make_daemon(REDIS_URL=url)
    daemon.start()
    assert daemon.wait_exit(60) == 2, daemon.log()
    last = daemon.log().strip().splitlines()[-1]
    assert last.startswith("cdc: the Redis user may not run "), last
    assert "SCAN on " in last, last
    assert password not in daemon.log()
    for port in cluster.ports:  # nothing written: no slot was claimed
        assert cluster.node(port).dbsize() == 0


@pytest.mark.parametrize("form", ["redis+cluster", "node"])
def test_wrong_password_on_a_cluster_is_exit_2(
    make_daemon: Callable[..., Daemon], cluster: RedisCluster, form: str
) -> None:
    """Contract 5: refused credentials are configuration (exit 2, one line), not a peer
    that is down; the password shows nowhere, neither as typed nor URL-encoded."""
    add_user(cluster, "cdc", uuid.uuid4().hex, DAEMON_ACL_RULES + CLUSTER_ACL_RULES)
    wrong = f"Wr0ng/{uuid.uuid4().hex[:8]} p@ss%+"
    encoded = quote(wrong, safe="")
    port = cluster.ports[1]
    url = (
        f"redis+cluster://cdc:{encoded}@127.0.0.1:{port},127.0.0.1:{cluster.ports[2]}"
        if form == "redis+cluster"
        else f"redis://cdc:{encoded}@127.0.0.1:{port}/0"
    )
    daemon = make_daemon(REDIS_URL=url)
    daemon.start()
    assert daemon.wait_exit(60) == 2, daemon.log()
    log = daemon.log()
    last = log.strip().splitlines()[-1]
    assert last.startswith("cdc: "), log
    assert "refused the credentials" in last, log
    for shown in (wrong, encoded, quote(wrong), wrong.split("/", 1)[1].split(" ", maxsplit=1)[0]):
        assert shown not in log
    assert "Traceback" not in log


def test_wrong_password_on_a_cluster_for_the_one_shot_commands(
    database_url: str, cluster: RedisCluster, slot_name: str
) -> None:
    """``cdc verify`` and ``cdc slot reset`` refuse the same way (exit 2, one line)."""
    add_user(cluster, "cdc", uuid.uuid4().hex, DAEMON_ACL_RULES + CLUSTER_ACL_RULES)
    wrong = f"Wr0ng/{uuid.uuid4().hex[:8]}"
    url = f"redis+cluster://cdc:{quote(wrong, safe='')}@127.0.0.1:{cluster.ports[0]}"
    for args in (("verify",), ("slot", "reset", "--yes")):
        done = run_cdc(database_url, url, slot_name, *args)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output
        assert output.strip().splitlines()[-1].startswith("cdc: "), output
        assert "refused the credentials" in output, output
        assert wrong not in output
        assert quote(wrong, safe="") not in output
        assert "Traceback" not in output
