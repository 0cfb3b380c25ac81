"""``make bench``: every performance figure of contract section 9, from one run on the same
servers, printed and written to ``bench/results.json`` (``python -m bench.report`` turns
that into the README's "Measured" table).

One private PostgreSQL and Redis serve every case, one after another: restart to ready,
latency at 1,000 and 5,000 commits/s, the writer, then the drains (a backlog of small
transactions, one 200,000-row and one 1,000,000-row transaction, each as a backlog and
live). Benchmarks measure and print; they never assert. The machine (cores, CPU model,
load before and after, versions) is recorded with the numbers: on a shared machine they
move from run to run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import async_writer_bench, drain, latency, token_wait, writer_bench
from bench.common import ROOT, DaemonProcess, Stack, median, stack

RESULTS = ROOT / "bench" / "results.json"
RESTARTS = 5
# Benchmarks of the writer library that start their own servers; their lines are kept
# in the JSON as printed.
OTHERS: list[tuple[str, Callable[[], list[str]]]] = [
    ("async_writer", async_writer_bench.main),
    ("token_wait", token_wait.main),
]


def machine(s: Stack) -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    with psycopg.connect(s.database_url) as conn:
        found = conn.execute("SHOW server_version").fetchone()
    pg_version = str(found[0]) if found else "?"
    redis_version = str(redis.Redis.from_url(s.redis_url).info("server")["redis_version"])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "host": platform.node(),
        "cores": os.cpu_count(),
        "cpu": model,
        "load_before": os.getloadavg(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "redis": redis_version,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "compiled": _compiled(),
    }


def _compiled() -> bool:
    """Whether the hot path runs mypyc-compiled (as installed by ``make``)."""
    import cdc.transform.core

    return not str(cdc.transform.core.__file__).endswith(".py")


def restart_to_ready(s: Stack) -> dict[str, Any]:
    """Process start to ``/readyz`` 200 on an existing slot, median of 5."""
    times = []
    for _ in range(RESTARTS):
        daemon = DaemonProcess(s).start().wait_ready(poll=0.002)
        times.append(daemon.ready_at - daemon.started_at)
        daemon.stop()
    return {"median_ms": median(times) * 1000, "all_ms": [t * 1000 for t in times]}


def run() -> dict[str, Any]:
    results: dict[str, Any] = {}
    with stack() as s:
        results["machine"] = machine(s)
        first = DaemonProcess(s).start().wait_ready()  # creates the slot, loads a snapshot
        first.stop()
        print("restart to ready ...", flush=True)
        results["restart"] = restart_to_ready(s)
        print("latency ...", flush=True)
        daemon = DaemonProcess(s).start().wait_ready()
        try:
            results["latency"] = {
                str(rate): latency.run_case(s, rate, writers)
                for rate, writers in ((1000, 1), (5000, 4))
            }
            print("writer ...", flush=True)
            results["writer"] = writer_bench.measure(s)
        finally:
            daemon.stop()
        print("drains ...", flush=True)
        results.update(drain.run(s))
        results["machine"]["load_after"] = os.getloadavg()
    for name, bench in OTHERS:
        print(f"{name} ...", flush=True)
        results[name] = bench()
    return results


def lines(results: dict[str, Any]) -> list[str]:
    """The figures as text, one per line, each with its ratio or target."""
    m = results["machine"]
    out = [
        f"# {m['cores']} cores ({m['cpu']}), load {_load(m)}; PostgreSQL {m['postgresql']},"
        f" Redis {m['redis']}, Python {m['python']}{'' if m['compiled'] else ' (not compiled)'}",
    ]
    for name, label in (
        ("backlog_100", "backlog 200,000 rows in 100-row transactions"),
        ("one_200k", "backlog: one 200,000-row transaction"),
        ("one_1m", "backlog: one 1,000,000-row transaction"),
    ):
        r = results[name]
        out += [
            f"{label}: pg_recvlogical {r['recvlogical_rows_per_s']:,.0f} rows/s;"
            f" daemon from start {r['daemon_rows_per_s_from_start']:,.0f}"
            f" ({r['ratio_from_start']:.2f}x), from ready {r['daemon_rows_per_s_from_ready']:,.0f}"
            f" ({r['ratio_from_ready']:.2f}x), steady {r['daemon_rows_per_s_steady']:,.0f}"
            f" ({r['ratio_steady']:.2f}x); CPU {r['daemon_cpu_us_per_row']:.2f} us/row;"
            f" peak RSS {r['daemon_peak_rss_mb']:.0f} MB; server spill"
            f" {r['server_spill_bytes']:,} B, stream {r['server_stream_bytes']:,} B",
        ]
    for name in ("one_200k_live", "one_1m_live"):
        r = results[name]
        out.append(
            f"live one {r['rows']:,}-row transaction: COMMIT to last row visible"
            f" {r['commit_to_visible_s'] * 1000:,.0f} ms (written in {r['write_seconds']:.1f} s);"
            f" peak RSS {r['daemon_peak_rss_mb']:.0f} MB ({r['daemon_rss_ready_mb']:.0f} MB ready);"
            f" server spill {r['server_spill_bytes']:,} B, stream {r['server_stream_bytes']:,} B;"
            f" {r['rows_in_redis']:,} rows in Redis",
        )
    r = results["restart"]
    out.append(
        f"restart to ready: median {r['median_ms']:.0f} ms of"
        f" {', '.join(f'{t:.0f}' for t in r['all_ms'])} (target <= 300 ms)"
    )
    for rate, r in results["latency"].items():
        out.append(
            f"latency at {int(rate):,} commits/s offered ({r['achieved']:,.0f}/s achieved):"
            f" p50 {r['p50'] * 1000:.2f} ms, p99 {r['p99'] * 1000:.2f} ms,"
            f" {r['missing']} not seen, caught up in {r['catch_up'] * 1000:.0f} ms"
        )
    w = results["writer"]
    out.append(
        f"writer create_ticket {w['writer'] * 1e6:.0f} us: {w['writer'] / w['raw']:.2f}x a raw"
        f" INSERT ({w['raw'] * 1e6:.0f} us), {w['writer'] / w['dual']:.2f}x the seeds' dual"
        f" write ({w['dual'] * 1e6:.0f} us); without the audit log"
        f" {w['writer_no_audit'] / w['raw']:.2f}x"
    )
    for name, _ in OTHERS:
        out += results.get(name, [])
    return out


def _load(m: dict[str, Any]) -> str:
    before = m["load_before"][0]
    after = m.get("load_after", [float("nan")])[0]
    return f"{before:.1f} before, {after:.1f} after"


def main() -> int:
    results = run()
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines(results)))
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}; README table: python -m bench.report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
