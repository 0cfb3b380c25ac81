"""``python -m devstack run [--seconds N] [--rate R]``: what ``make run`` runs."""

from __future__ import annotations

import argparse
import sys

from devstack.run import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("run", help="servers, migrations, the daemon and a demo workload")
    start.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)"
    )
    start.add_argument("--rate", type=float, default=50.0, help="demo writes per second")
    args = parser.parse_args()
    return run(seconds=args.seconds, rate=args.rate)


if __name__ == "__main__":
    sys.exit(main())
