"""``python -m cdc`` and the ``cdc`` command (the console script's entry point).

The garbage collector is off while the command's modules load: importing them creates
tens of thousands of long-lived objects and no garbage, and collecting them cost about
30 ms of a 390 ms start (``make bench``: restart to ready, measured with and without).
Once loaded they are frozen out of the collector's sight (``gc.freeze``) and it is back
on before the command runs.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    from cdc.ops.cli import main as command

    if sys.argv[1:2] == ["run"]:
        import cdc.runtime.daemon  # noqa: F401 - what `cdc run` imports first, loaded here
    gc.freeze()
    gc.enable()
    command()


if __name__ == "__main__":
    main()
