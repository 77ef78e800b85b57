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


def copy_and_checksum(dest: memoryview, offset: int, data: Buffer, seed: int = 0) -> int:
    """Copy ``data`` into ``dest[offset:]`` and return the checksum continued
    from ``seed`` over the copied bytes."""
    src = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    n = len(src)
    dest[offset : offset + n] = src
    return zlib.crc32(src, seed)
