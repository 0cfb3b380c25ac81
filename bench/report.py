"""The README's "Measured" table, from ``bench/results.json`` (``python -m bench.report``).

Rewrites what stands between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in
README.md; ``--print`` shows the table instead.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.all import RESULTS
from bench.common import ROOT

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
README = ROOT / "README.md"


def _mb(value: float) -> str:
    return f"{value:.0f} MB"


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k"


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    load = f"{m['load_before'][0]:.1f} before, {m.get('load_after', [float('nan')])[0]:.1f} after"
    rows = [
        "| figure | target | measured |",
        "|---|---|---|",
    ]
    b = results["backlog_100"]
    rows += [
        "| backlog of 200,000 rows in 100-row transactions, steady state, vs `pg_recvlogical`"
        f" | >= 1.2x | {b['ratio_steady']:.2f}x ({_rate(b['daemon_rows_per_s_steady'])} vs"
        f" {_rate(b['recvlogical_rows_per_s'])} rows/s) |",
        f"| the same from process start | >= 1.0x | {b['ratio_from_start']:.2f}x"
        f" ({_rate(b['daemon_rows_per_s_from_start'])} rows/s) |",
        f"| daemon CPU per row, that backlog | <= 3 µs | {b['daemon_cpu_us_per_row']:.1f} µs |",
    ]
    for name, label in (("one_200k", "200,000"), ("one_1m", "1,000,000")):
        r = results[name]
        live = results[name + "_live"]
        rows += [
            f"| one {label}-row transaction (backlog), from process start, vs `pg_recvlogical`"
            f" | >= 1.0x | {r['ratio_from_start']:.2f}x ({_rate(r['daemon_rows_per_s_from_start'])}"
            f" vs {_rate(r['recvlogical_rows_per_s'])} rows/s;"
            f" from ready {r['ratio_from_ready']:.2f}x) |",
            f"| one {label}-row transaction written live: COMMIT to last row visible | |"
            f" {live['commit_to_visible_s'] * 1000:,.0f} ms |",
            f"| daemon peak RSS, one {label}-row transaction (live / backlog) |"
            f" {'<= 100 MB' if name == 'one_1m' else ''} |"
            f" {_mb(live['daemon_peak_rss_mb'])} / {_mb(r['daemon_peak_rss_mb'])}"
            f" ({_mb(live['daemon_rss_ready_mb'])} ready) |",
            f"| server spill / stream bytes, one {label}-row transaction (live) | spill 0 |"
            f" {live['server_spill_bytes']:,} / {live['server_stream_bytes']:,} |",
        ]
    r = results["restart"]
    rows.append(
        f"| restart to ready (`/readyz` 200), median of {len(r['all_ms'])} | <= 300 ms |"
        f" {r['median_ms']:.0f} ms |"
    )
    targets = {"1000": "p50 <= 0.5 ms, p99 <= 2 ms", "5000": "p50 <= 2 ms, p99 <= 10 ms"}
    for rate, target in targets.items():
        lat = results["latency"][rate]
        rows.append(
            f"| commit-to-visible latency, {int(rate):,} commits/s offered | {target} |"
            f" p50 {lat['p50'] * 1000:.2f} ms, p99 {lat['p99'] * 1000:.2f} ms at"
            f" {lat['achieved']:,.0f}/s achieved, {lat['missing']} missing |"
        )
    w = results["writer"]
    rows += [
        f"| `writer` ticket create vs a raw psycopg INSERT, median of 2,000 | <= 1.25x |"
        f" {w['writer'] / w['raw']:.2f}x ({w['writer'] * 1e6:.0f} vs {w['raw'] * 1e6:.0f} µs) |",
        f"| `writer` vs the seeds' dual write (INSERT + COMMIT, then Redis SET) | |"
        f" {w['writer'] / w['dual']:.2f}x ({w['dual'] * 1e6:.0f} µs) |",
    ]
    header = (
        f"Measured {m['date']} at commit `{m['commit']}` on {m['cores']} cores ({m['cpu']}),"
        f" load {load} (PostgreSQL, Redis, the daemon and the load generator on the same"
        " cores, shared with other work running at the same time: two runs of the same code"
        " differed by up to 4x on some figures, so read the ratios rather than the rates);"
        f" PostgreSQL {m['postgresql']}, Redis {m['redis']}, Python {m['python']}"
        f"{'' if m['compiled'] else ' (hot path not compiled)'}."
    )
    return header + "\n\n" + "\n".join(rows)


def main(argv: list[str]) -> int:
    results = json.loads(RESULTS.read_text())
    text = table(results)
    if "--print" in argv:
        print(text)
        return 0
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        print(f"README.md has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"README.md: Measured table rewritten from {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
