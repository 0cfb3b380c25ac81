"""The CDC daemon: PostgreSQL logical replication (pgoutput) into Redis.

Stages, each a package (see their docstrings for what they own and may import)::

    protocol ─▶ transform ─▶ cache        (pure: protocol, transform)
        ▲                       ▲
    postgres ──── runtime ──────┘          ops (CLI), telemetry

``settings`` and ``errors`` sit at the top; ``failpoints`` serves the tests.
"""

import warnings as _warnings

from cdc.compiled import stale as _stale

if _stale_modules := _stale():
    _warnings.warn(
        "compiled modules are older than their sources (run `make install`): "
        + ", ".join(_stale_modules),
        stacklevel=2,
    )
