"""Fail points: pauses and corruptions a test switches on through the environment.

``CDC_FAILPOINTS`` holds ``name=action`` pairs separated by ``;``. Unset (always, in
production) every point is one false module-level test. Points:

==================  ==========================================================
name                where
==================  ==========================================================
before_send         a batch is ready and about to be sent to Redis (the one before it is sent)
after_send          right after a batch was sent to Redis, before the next one
record              each XLogData record before it is decoded
cluster_checkpoint  cluster mode: every slot of a batch applied, ``cdc:state`` not yet moved
cluster_counted     cluster mode: a claim read every slot's count, nothing recorded yet
repair_write        ``cdc verify --repair`` read a row and is about to rewrite its key
repair_hand_over    ``cdc verify --repair`` read what differs and is about to hand it to
                    the running daemon
==================  ==========================================================

Actions: ``pause:<path>`` blocks while the file ``<path>`` exists, after creating
``<path>.hit`` (so a test knows the daemon is held there); ``corrupt`` (``record``
only) damages the first row change's tuple so that it cannot be decoded;
``fail:<path>`` raises :class:`~cdc.errors.RedisUnavailable` once, when the file
``<path>`` exists (it is removed), as a Redis that stops answering there would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_POINTS: dict[str, str] = {}
for _item in os.environ.get("CDC_FAILPOINTS", "").split(";"):
    _name, _, _action = _item.partition("=")
    if _name.strip():
        _POINTS[_name.strip()] = _action.strip()

ACTIVE = bool(_POINTS)
_done: set[str] = set()


def hit(name: str) -> None:
    """Pass through fail point ``name`` (pauses there when asked to)."""
    action = _POINTS.get(name, "")
    if action.startswith("fail:"):
        path = Path(action[len("fail:") :])
        if path.exists():
            path.unlink()
            from cdc.errors import RedisUnavailable

            raise RedisUnavailable(f"fail point {name}")
    if action.startswith("pause:"):
        path = Path(action[len("pause:") :])
        if path.exists():
            Path(f"{path}.hit").touch()
            while path.exists():
                time.sleep(0.01)


def record(data: bytes) -> bytes:
    """The ``record`` point: ``data`` itself, or damaged once when asked to."""
    if _POINTS.get("record") != "corrupt" or "record" in _done or len(data) < 34:
        return data
    if data[25] != 0x49:  # not an Insert
        return data
    _done.add("record")
    # 'I', relation id, 'N', column count, then the first column's kind byte.
    return data[:33] + b"X" + data[34:]
