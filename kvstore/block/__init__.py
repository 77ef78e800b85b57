"""KV-cache blocks: block format v1, pack/unpack with a fused checksum, chained keys.

The functions come from the implementation ``kvstore._impl`` chose (the Cython
extension, or the pure-Python reference with ``KVSTORE_PURE=1``);
``IMPLEMENTATION`` says which. Types and constants are shared by both.
See ``docs/block-format.md``.

The implementation is resolved on first use of one of its names, not when this
package is imported, so that ``kvstore._impl`` and the extension can import
``kvstore.block.format`` without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvstore.block.format import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    BlockHeader,
    ChecksumAlgorithm,
    DType,
    Layout,
    block_size,
    payload_size,
)

if TYPE_CHECKING:
    from kvstore._impl import (
        IMPLEMENTATION,
        block_keys,
        checksum,
        copy_and_checksum,
        pack,
        parse_header,
        unpack_into,
        verify,
    )

_FROM_IMPL = frozenset(
    {"pack", "unpack_into", "verify", "parse_header", "block_keys", "checksum",
     "copy_and_checksum", "IMPLEMENTATION"}
)

__all__ = [
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "MAGIC",
    "VERSION",
    "BlockHeader",
    "ChecksumAlgorithm",
    "DType",
    "Layout",
    "block_keys",
    "block_size",
    "checksum",
    "copy_and_checksum",
    "pack",
    "parse_header",
    "payload_size",
    "unpack_into",
    "verify",
]


if not TYPE_CHECKING:
    # (hidden from type checkers: a module __getattr__ makes every name Any to them)
    def __getattr__(name: str) -> Any:
        if name in _FROM_IMPL:
            from kvstore import _impl

            value = getattr(_impl, name)
            globals()[name] = value  # later lookups skip this function
            return value
        raise AttributeError(f"module 'kvstore.block' has no attribute {name!r}")
