"""``make run``'s program against this test's servers: it migrates, runs the daemon and
the demo workload, shows progress, and stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from devstack.servers import free_port
from tests.helpers import ROOT, Daemon, assert_converged, running


def test_make_run_program(
    database_url: str, redis_url: str, slot_name: str, make_daemon: Callable[..., Daemon]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "CDC_SLOT": slot_name,
            "CDC_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "devstack", "run", "--seconds", "6", "--rate", "40"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    progress = [line for line in done.stdout.splitlines() if line.startswith("changes/s")]
    assert len(progress) >= 3
    assert "lag" in progress[-1]
    applied = int(progress[-1].split("applied")[1].split()[0])
    assert applied > 0
    assert "cdc daemon stopped (exit code 0)" in done.stdout
    # Everything the demo wrote reaches Redis once a daemon runs on the same slot again.
    with running(make_daemon()):
        assert_converged(database_url, redis_url)
