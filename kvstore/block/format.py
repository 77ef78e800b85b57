"""Block format v1: constants, codes and the parsed header (shared by both
implementations). The byte layout is in ``docs/block-format.md``; the code that
reads and writes it is ``kvstore/block/reference.py`` (the specification) and
``native/_native.pyx`` (the same bytes, faster).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"KVCB"
VERSION = 1
HEADER_SIZE = 64

#: Everything but the header checksum, little-endian (see docs/block-format.md).
HEADER_STRUCT = struct.Struct("<4sHHBBBBIIIIIQQ12s")
#: Offset of the header checksum (CRC-32C of bytes [0, 60)).
HEADER_CHECKSUM_OFFSET = 60
assert HEADER_STRUCT.size == HEADER_CHECKSUM_OFFSET

MAX_U32 = 0xFFFFFFFF


class DType(enum.IntEnum):
    """Element type of the K/V values (header byte 8)."""

    F16 = 1
    BF16 = 2
    F32 = 3
    F8_E4M3 = 4  # float8 e4m3fn (OCP / NVIDIA "fn": no infinities)
    F8_E5M2 = 5
    I8 = 6
    U8 = 7

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def label(self) -> str:
        """Short name used in messages and accepted by :meth:`parse`."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: DType | str | int) -> DType:
        """A DType from a DType, a code, or a name ("bf16", "bfloat16", ...)."""
        if isinstance(value, DType):
            return value
        if isinstance(value, str):
            found = _BY_NAME.get(value.lower())
            if found is None:
                raise ValueError(f"unknown dtype {value!r}; known: {sorted(_BY_NAME)}")
            return found
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(f"unknown dtype code {value}") from None
        raise TypeError(f"dtype must be a DType, a name or a code, not {type(value).__name__}")


_ITEMSIZE = {
    DType.F16: 2,
    DType.BF16: 2,
    DType.F32: 4,
    DType.F8_E4M3: 1,
    DType.F8_E5M2: 1,
    DType.I8: 1,
    DType.U8: 1,
}

_BY_NAME: dict[str, DType] = {d.label: d for d in DType}
_BY_NAME.update(
    {
        "float16": DType.F16,
        "half": DType.F16,
        "bfloat16": DType.BF16,
        "float32": DType.F32,
        "float8_e4m3fn": DType.F8_E4M3,
        "float8_e4m3": DType.F8_E4M3,
        "float8_e5m2": DType.F8_E5M2,
        "int8": DType.I8,
        "uint8": DType.U8,
    }
)

#: numpy dtype names that imply a DType without ``dtype=``. ``bfloat16`` and
#: ``float8_*`` come from ml_dtypes when it is installed; other arrays (for
#: example uint16 views of bf16) need an explicit ``dtype=``.
NUMPY_NAMES: dict[str, DType] = {
    "float16": DType.F16,
    "float32": DType.F32,
    "int8": DType.I8,
    "uint8": DType.U8,
    "bfloat16": DType.BF16,
    "float8_e4m3fn": DType.F8_E4M3,
    "float8_e5m2": DType.F8_E5M2,
}


def resolve_dtype(np_dtype: np.dtype, explicit: DType | str | int | None) -> DType:
    """The block dtype for page arrays of ``np_dtype``.

    With ``explicit``, the arrays are taken as raw storage of that type (only
    the element size must agree); without it the numpy dtype must name one.
    """
    if not np_dtype.isnative:
        raise ValueError(f"page arrays must be in native byte order, not {np_dtype.str}")
    if explicit is not None:
        dt = DType.parse(explicit)
        if np_dtype.itemsize != dt.itemsize:
            raise ValueError(
                f"dtype {dt.label} has {dt.itemsize}-byte elements but the page arrays "
                f"({np_dtype.name}) have {np_dtype.itemsize}-byte elements"
            )
        return dt
    found = NUMPY_NAMES.get(np_dtype.name)
    if found is None:
        raise ValueError(
            f"cannot tell the block dtype of {np_dtype.name} page arrays; pass dtype= "
            f"(one of {', '.join(d.label for d in DType)})"
        )
    return found


class Layout(enum.IntEnum):
    """Payload order (header byte 9)."""

    #: for each layer: K then V (V absent when kv_count is 1), each
    #: ``tokens x kv_heads x head_dim`` in C order (token-major, "NHD").
    LAYER_KV_TOKEN_HEAD_DIM = 1


class ChecksumAlgorithm(enum.IntEnum):
    """Payload checksum algorithm (header byte 11)."""

    CRC32C = 1


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A parsed v1 header. ``block_bytes`` is the size of the whole block."""

    dtype: DType
    layers: int
    kv_count: int
    tokens: int
    kv_heads: int
    head_dim: int
    payload_bytes: int
    payload_checksum: int
    header_checksum: int
    layout: Layout = Layout.LAYER_KV_TOKEN_HEAD_DIM
    checksum_algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C
    flags: int = 0
    version: int = VERSION

    @property
    def block_bytes(self) -> int:
        return HEADER_SIZE + self.payload_bytes

    @property
    def token_bytes(self) -> int:
        """Bytes of one token of one layer's K (or V)."""
        return self.kv_heads * self.head_dim * self.dtype.itemsize


def payload_size(
    *, layers: int, kv_count: int, tokens: int, kv_heads: int, head_dim: int,
    dtype: DType | str | int,
) -> int:
    """Payload bytes of a block with this shape."""
    return layers * kv_count * tokens * kv_heads * head_dim * DType.parse(dtype).itemsize


def block_size(
    *, layers: int, kv_count: int, tokens: int, kv_heads: int, head_dim: int,
    dtype: DType | str | int,
) -> int:
    """Bytes of a whole block (header + payload) with this shape: how big an
    ``out=`` buffer for :func:`pack` must be."""
    return HEADER_SIZE + payload_size(
        layers=layers, kv_count=kv_count, tokens=tokens, kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype,
    )
