"""Every performance figure of contract section 9, one after another (``make bench``).

Each benchmark starts its own private PostgreSQL and Redis, measures the product and its
baseline side by side in the same run, and prints one line per figure: the value, the
target and whether it was met. Run one alone with ``python -m bench.<name>``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable

from bench import async_writer_bench, drain, latency, memory, token_wait, writer_bench

BENCHMARKS: list[tuple[str, Callable[[], list[str]]]] = [
    ("writer", writer_bench.main),
    ("async_writer", async_writer_bench.main),
    ("token_wait", token_wait.main),
    ("drain", drain.main),
    ("latency", latency.main),
    ("memory", memory.main),
]


def main(names: list[str]) -> int:
    chosen = [(n, f) for n, f in BENCHMARKS if not names or n in names]
    unknown = set(names) - {n for n, _ in BENCHMARKS}
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    print(f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}")
    for name, run in chosen:
        started = time.monotonic()
        lines = run()
        print(f"\n## {name} ({time.monotonic() - started:.0f} s)")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
