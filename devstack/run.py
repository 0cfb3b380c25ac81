"""``make run``: the whole pipeline on this machine, with a demo workload and live progress.

1. PostgreSQL (``wal_level=logical``) and Redis under ``.run/``, unless ``DATABASE_URL`` /
   ``REDIS_URL`` point elsewhere (then those are used and left running).
2. ``alembic upgrade head``.
3. ``cdc run`` as a child process (its log: ``.run/daemon.log``).
4. A demo workload through the ``writer`` library: agents, tickets, status changes,
   assignments, comments.
5. One line per second: changes/s applied by the daemon, replication lag, writes/s, keys.

Ctrl-C stops the workload, then the daemon (SIGTERM: it confirms and exits 0), then the
servers it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
from dotenv import load_dotenv

from devstack.servers import PostgresServer, RedisServer, free_port
from schema.redis_url import redis_client

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".run"
DATABASE = "support"


def _ports() -> dict[str, int]:
    """Ports chosen once and kept, so the data under .run/ is reused across runs."""
    path = RUN / "ports.json"
    if path.exists():
        data: dict[str, int] = json.loads(path.read_text())
        return data
    ports = {"postgres": free_port(), "redis": free_port(), "metrics": free_port()}
    RUN.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ports))
    return ports


def _migrate(url: str) -> None:
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True
    )


class Workload:
    """What a support team's services would write, through the writer library only."""

    def __init__(self, database_url: str, rate: float) -> None:
        from writer import Writer

        self.writer = Writer.connect(database_url, max_size=2)
        self.rate = rate
        self.writes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.writer.close()

    def _run(self) -> None:
        from writer import WriterError

        rng = random.Random()  # noqa: S311 - demo data, not secrets
        agents: list[str] = []
        tickets: list[str] = []
        statuses = ["in_progress", "pending", "resolved", "closed", "open"]
        interval = 1.0 / self.rate
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                roll = rng.random()
                if len(agents) < 5 or roll < 0.02:
                    name = f"agent-{rng.randrange(10**6)}"
                    agents.append(
                        self.writer.create_agent(
                            {
                                "username": name,
                                "display_name": name.title(),
                                "password": "demo-password",
                            }
                        ).value.id
                    )
                elif roll < 0.35 or not tickets:
                    ticket = self.writer.create_ticket(
                        {
                            "title": f"Order #{rng.randrange(10**5)} has a problem",
                            "description": "The customer wrote in. " * rng.randrange(1, 20),
                            "priority": rng.choice(["low", "medium", "high", "urgent"]),
                            "customer": {
                                "name": f"Customer {rng.randrange(1000)}",
                                "vip": rng.random() < 0.1,
                            },
                            "tags": rng.sample(
                                ["billing", "shipping", "refund", "login", "bug"], 2
                            ),
                        },
                        actor=rng.choice(agents),
                    )
                    tickets.append(ticket.value.id)
                elif roll < 0.6:
                    self.writer.change_ticket_status(
                        rng.choice(tickets),
                        {"to_status": rng.choice(statuses)},
                        actor=rng.choice(agents),
                    )
                elif roll < 0.75:
                    self.writer.assign_ticket(rng.choice(tickets), {"agent_id": rng.choice(agents)})
                elif roll < 0.9:
                    self.writer.add_comment(
                        rng.choice(tickets),
                        {"content": "Looking into it.", "author_id": rng.choice(agents)},
                    )
                else:
                    self.writer.update_agent(
                        rng.choice(agents), {"status": rng.choice(["online", "busy", "away"])}
                    )
                self.writes += 1
            except WriterError:
                self.errors += 1  # e.g. a status change that is not allowed: part of the demo
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))


def _metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("cdc_") and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
    return out


def _changes(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("cdc_changes_total{"))


def run(seconds: float | None = None, rate: float = 50.0) -> int:
    # The contract's configuration is the environment, also read from .env (as the
    # daemon and the migrations read it); variables already set win.
    load_dotenv(ROOT / ".env", override=False)
    ports = _ports()
    started: list[PostgresServer | RedisServer] = []
    database_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    try:
        if not database_url:
            pg = PostgresServer(RUN / "postgres", port=ports["postgres"])
            print(f"starting PostgreSQL in .run/postgres on port {pg.port}", flush=True)
            pg.start()
            started.append(pg)
            with psycopg.connect(pg.url(), autocommit=True) as conn:
                if (
                    conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                    ).fetchone()
                    is None
                ):
                    conn.execute(f"CREATE DATABASE {DATABASE}")
            database_url = pg.url(DATABASE)
        if not redis_url:
            rd = RedisServer(RUN / "redis", port=ports["redis"], persistence=True)
            print(f"starting Redis in .run/redis on port {rd.port}", flush=True)
            rd.start()
            started.append(rd)
            redis_url = rd.url
        print("migrating (alembic upgrade head)", flush=True)
        _migrate(database_url)
        return _run_pipeline(database_url, redis_url, ports["metrics"], seconds, rate)
    finally:
        for server in reversed(started):
            server.stop()
        if started:
            print("stopped the servers it started", flush=True)


def _run_pipeline(
    database_url: str, redis_url: str, metrics_port: int, seconds: float | None, rate: float
) -> int:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CDC_METRICS_ADDR": os.environ.get("CDC_METRICS_ADDR", f"127.0.0.1:{metrics_port}"),
    }
    metrics_port = int(env["CDC_METRICS_ADDR"].rpartition(":")[2])
    log = (RUN / "daemon.log").open("ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "cdc", "run"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    print(
        f"cdc daemon started (pid {daemon.pid}); log: .run/daemon.log; metrics: http://{env['CDC_METRICS_ADDR']}/metrics"
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workload: Workload | None = None
    code = 0
    try:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            if daemon.poll() is not None:
                print(
                    f"the daemon exited with {daemon.returncode}; see .run/daemon.log",
                    file=sys.stderr,
                )
                return daemon.returncode or 1
            ready = f"http://127.0.0.1:{metrics_port}/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=1):
                break
            time.sleep(0.2)
        workload = Workload(database_url, rate)
        workload.start()
        print("demo workload running through the writer; Ctrl-C stops everything", flush=True)
        _progress(stop, daemon, workload, metrics_port, redis_url, seconds)
    finally:
        if workload is not None:
            workload.stop()
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = 1
        print(f"\ncdc daemon stopped (exit code {daemon.returncode})", flush=True)
        signal.signal(signal.SIGINT, previous)
        log.close()
    return code


def _progress(
    stop: threading.Event,
    daemon: subprocess.Popen[bytes],
    workload: Workload,
    metrics_port: int,
    redis_url: str,
    seconds: float | None,
) -> None:
    client = redis_client(redis_url)
    tty = sys.stdout.isatty()
    started = time.monotonic()
    last_changes, last_writes, last_at = 0.0, 0, started
    while not stop.wait(1.0):
        if daemon.poll() is not None:
            print(
                f"\nthe daemon exited with {daemon.returncode}; see .run/daemon.log",
                file=sys.stderr,
            )
            return
        now = time.monotonic()
        try:
            metrics = _metrics(metrics_port)
        except OSError:
            continue
        changes = _changes(metrics)
        elapsed = max(now - last_at, 1e-6)
        line = (
            f"changes/s {(changes - last_changes) / elapsed:7.1f}  "
            f"lag {metrics.get('cdc_replication_lag_seconds', 0) * 1000:7.1f} ms "
            f"{int(metrics.get('cdc_replication_lag_bytes', 0)):>8} B  "
            f"writes/s {(workload.writes - last_writes) / elapsed:6.1f}  "
            f"applied {int(changes):>8}  keys {client.dbsize():>8}"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        last_changes, last_writes, last_at = changes, workload.writes, now
        if seconds is not None and now - started >= seconds:
            return
