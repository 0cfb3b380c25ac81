"""Identifiers for rows whose caller did not supply one.

A UUID version 7 in its canonical text form: 48 bits of Unix milliseconds, then random
bits. Ids created together sort together, which keeps the primary-key B-trees compact.
"""

from __future__ import annotations

import os
import time
import uuid


def new_id() -> str:
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80 | rand
    # version 7 in bits 76-79, variant 0b10 in bits 62-63
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return str(uuid.UUID(int=value))
