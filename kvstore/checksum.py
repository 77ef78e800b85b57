"""The payload checksum used by the index and tiers.

One function, one algorithm for the whole store: CRC-32C (Castagnoli), the
same checksum as the block format's (docs/block-format.md), computed
incrementally as chunks arrive: ``checksum(b, checksum(a)) == checksum(a + b)``.
It comes from the implementation ``kvstore._impl`` chose: the native one
(AVX-512 VPCLMULQDQ / SSE4.2, GIL released for large buffers; use
:func:`copy_and_checksum` to copy and checksum in one pass) or, with
``KVSTORE_PURE=1``, the pure-Python reference (about 0.1 GB/s).

``checksum(data, seed=0) -> int``: the checksum of ``data`` continuing from
``seed`` (the checksum so far). ``copy_and_checksum(dest, offset, data,
seed=0) -> int``: copy ``data`` into ``dest[offset:]`` and return the checksum
continued from ``seed`` over the copied bytes, in one pass over the data.
"""

from __future__ import annotations

from kvstore._impl import checksum, copy_and_checksum

ALGORITHM = "crc32c"

__all__ = ["ALGORITHM", "checksum", "copy_and_checksum"]
