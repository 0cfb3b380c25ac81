"""docker/: the alert rules pass promtool, the compose file hangs together, and the
dashboard and alerts only ask for metrics the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdc.telemetry.metrics import Metrics

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def exported_metrics() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        for sample in family.samples:
            names.add(sample.name)
    return names


def queried_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b(cdc_[a-z_]+)\b", text))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_alert_rules_and_config(tmp_path: Path) -> None:
    done = subprocess.run(
        ["promtool", "check", "rules", str(DOCKER / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout
    # The config names the rules by their path inside the container: check a copy.
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = (
        (DOCKER / "prometheus" / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/", f"{tmp_path}/")
    )
    (tmp_path / "prometheus.yml").write_text(config)
    done = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_and_alerts_use_exported_metrics() -> None:
    exported = exported_metrics()
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "cdc.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert expressions
    used = queried_metrics("\n".join(expressions)) | queried_metrics(
        (DOCKER / "prometheus" / "alerts.yml").read_text()
    )
    assert used
    assert used <= exported, used - exported
    contract = {
        "cdc_replication_lag_bytes",
        "cdc_replication_lag_seconds",
        "cdc_apply_delay_seconds_bucket",
        "cdc_slot_retained_wal_bytes",
        "cdc_last_applied_lsn",
        "cdc_changes_total",
        "cdc_transactions_total",
        "cdc_connected",
        "cdc_errors_total",
    }
    assert contract <= exported
    assert contract - {"cdc_last_applied_lsn"} <= used | {"cdc_apply_delay_seconds_bucket"}


def test_compose_file_wires_the_pipeline() -> None:
    compose: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "grants", "cdc", "prometheus", "grafana"} <= set(
        services
    )
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
    assert "wal_level=logical" in services["postgres"]["command"]
    assert "noeviction" in services["redis"]["command"]
    cdc = services["cdc"]["environment"]
    assert cdc["DATABASE_URL"].startswith("postgresql://cdc_service:")
    assert cdc["CDC_DATABASE_URL"].startswith("postgresql://cdc_daemon:")
    assert cdc["REDIS_URL"] == "redis://redis:6379/0"
    text = (DOCKER / "compose.yaml").read_text()
    # Every password comes from the environment, with a default that says what it is for.
    for default in re.findall(r"\$\{[A-Z_]+PASSWORD:-([^}]*)\}", text):
        assert default.endswith("-dev-only"), default
    assert (DOCKER / "Dockerfile").exists()
    for script in ("10-cdc-daemon.sql", "20-cdc-service.sql"):
        assert (DOCKER / "grants" / script).exists()
