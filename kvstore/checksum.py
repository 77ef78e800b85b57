"""The payload checksum used by the index and tiers.

One function, one algorithm for the whole store: CRC-32C (Castagnoli), the
same checksum as the block format's (docs/block-format.md), computed
incrementally as chunks arrive: ``checksum(b, checksum(a)) == checksum(a + b)``.
It comes from the implementation ``kvstore._impl`` chose: the native one
(AVX-512 VPCLMULQDQ / SSE4.2, GIL released for large buffers; use
``kvstore.block.copy_and_checksum`` to copy and checksum in one pass) or, with
``KVSTORE_PURE=1``, the pure-Python reference (about 0.1 GB/s).
"""

from __future__ import annotations

from kvstore._impl import checksum as _checksum
from kvstore._impl import copy_and_checksum as _copy_and_checksum
from kvstore.tiers.base import Buffer

ALGORITHM = "crc32c"


def checksum(data: Buffer, seed: int = 0) -> int:
    """Checksum of ``data``, continuing from ``seed`` (the checksum so far)."""
    result: int = _checksum(data, seed)
    return result


def copy_and_checksum(dest: memoryview, offset: int, data: Buffer, seed: int = 0) -> int:
    """Copy ``data`` into ``dest[offset:]`` and return the checksum continued
    from ``seed`` over the copied bytes, in one pass over the data."""
    result: int = _copy_and_checksum(dest, offset, data, seed)
    return result
