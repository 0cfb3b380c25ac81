"""Build hook: compile the daemon's hot path with mypyc when it is available.

The modules listed in ``COMPILED`` are plain, typed Python (decoder, assembler, planner,
RESP encoder, the Redis and PostgreSQL wire loops and the pipeline). mypyc turns them
into C extensions, several times faster on the per-row work; without mypyc (or with
``CDC_PURE_PYTHON=1``) the same source runs as ordinary Python. The suite runs against
whichever was installed; ``tests/test_pure_source.py`` and the decoder tests also run
the pure source.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED: list[str] = [
    "cdc/messages.py",
    "cdc/pgoutput.py",
    "cdc/assemble.py",
    "cdc/resp.py",
    "cdc/plan.py",
    "cdc/core.py",
    "cdc/redis_wire.py",
    "cdc/sink.py",
    "cdc/source.py",
    "cdc/pipeline.py",
    "cdc/streams.py",
]


def ext_modules() -> list[object]:
    if os.environ.get("CDC_PURE_PYTHON") or not COMPILED:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    return list(mypycify(COMPILED, opt_level="3", strict_dunder_typing=False))


setup(ext_modules=ext_modules())
