"""Which modules mypyc compiles: the one list ``setup.py``, the Makefile and the
staleness check read.

Everything in the pure stages (:mod:`cdc.protocol`, :mod:`cdc.transform`) is compiled,
plus the I/O modules on the per-row path. Nothing else imports this at run time except
:func:`stale`, which ``cdc/__init__.py`` calls so that a compiled module older than its
edited source is reported instead of silently shadowing it.
"""

from __future__ import annotations

from pathlib import Path

PURE_PACKAGES = ("protocol", "transform")
HOT_IO = (
    "cache/wire.py",
    "cache/sink.py",
    "postgres/source.py",
    "runtime/pipeline.py",
    "runtime/streams.py",
)
ROOT = Path(__file__).resolve().parent


def sources() -> list[str]:
    """The compiled modules' source files, relative to the project root."""
    found = [
        path
        for package in PURE_PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
        if path.name != "__init__.py"
    ]
    found += [ROOT / name for name in HOT_IO]
    return [f"cdc/{path.relative_to(ROOT).as_posix()}" for path in found]


def stale() -> list[str]:
    """Compiled modules whose source was edited after they were built."""
    out = []
    for source in sources():
        path = ROOT.parent / source
        for built in path.parent.glob(path.stem + ".*.so"):
            if built.stat().st_mtime < path.stat().st_mtime:
                out.append(source)
    return out


if __name__ == "__main__":
    print(" ".join(sources()))
