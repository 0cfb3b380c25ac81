"""Build hook: compile the daemon's hot path with mypyc when it is available.

The modules listed by ``cdc/compiled.py`` are plain, typed Python (the pure stages, the
Redis and PostgreSQL wire loops and the pipeline). mypyc turns them
into C extensions, several times faster on the per-row work; without mypyc (or with
``CDC_PURE_PYTHON=1``) the same source runs as ordinary Python. The suite runs against
whichever was installed; ``tests/test_pure_source.py`` and the decoder tests also run
the pure source.
"""

from __future__ import annotations

import os
import runpy

from setuptools import setup


def _compiled() -> list[str]:
    """The one list of compiled modules (cdc/compiled.py), read without importing cdc."""
    return list(runpy.run_path("cdc/compiled.py")["sources"]())


COMPILED: list[str] = _compiled()


def ext_modules() -> list[object]:
    if os.environ.get("CDC_PURE_PYTHON") or not COMPILED:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    return list(mypycify(COMPILED, opt_level="3", strict_dunder_typing=False))


setup(ext_modules=ext_modules())
