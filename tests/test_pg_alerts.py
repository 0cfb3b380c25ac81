"""The alert for a stream held back by a standby: promtool's unit test of the rule."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parents[1] / "docker" / "prometheus"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_standby_stall_alert_fires_only_when_stalled() -> None:
    done = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
