"""The publication the migrations create: ``CDC_PUBLICATION``, default ``cdc_cache``."""

from __future__ import annotations

import os
import re

DEFAULT_PUBLICATION = "cdc_cache"


def publication_name() -> str:
    name = os.environ.get("CDC_PUBLICATION") or DEFAULT_PUBLICATION
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", name):
        raise SystemExit(f"CDC_PUBLICATION {name!r} is not a plain identifier")
    return name
