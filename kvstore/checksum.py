"""The payload checksum used by the index and tiers.

One function, one algorithm for the whole store: CRC-32 (zlib polynomial),
computed incrementally as chunks arrive. ``zlib.crc32`` releases the GIL for
large buffers.
"""

from __future__ import annotations

import zlib

from kvstore.tiers.base import Buffer

ALGORITHM = "crc32"


def checksum(data: Buffer, seed: int = 0) -> int:
    """Checksum of ``data``, continuing from ``seed`` (the checksum so far)."""
    return zlib.crc32(data, seed)
