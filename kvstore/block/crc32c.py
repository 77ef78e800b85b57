"""CRC-32C (Castagnoli) in pure Python + numpy: the reference checksum.

Definition (the same as ``native/kv_crc32c.h``): polynomial 0x1EDC6F41,
bit-reflected (0x82F63B78), register initialised to 0xFFFFFFFF, result
inverted; ``crc32c(b"123456789") == 0xE3069283``. ``seed`` chains like
``zlib.crc32``: ``crc32c(b, crc32c(a)) == crc32c(a + b)``.

:func:`crc32c_bytewise` is the textbook definition (one table lookup per
byte). :func:`crc32c` computes the same value faster for large buffers by
running thousands of independent lanes side by side in numpy and joining them
with "append N zero bytes" operators (a CRC is linear over GF(2)). Both are
tested against each other.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

POLY = 0x82F63B78  # 0x1EDC6F41 bit-reflected
CHECK_VALUE = 0xE3069283  # crc32c(b"123456789")

_SMALL = 4096  # below this many bytes the plain byte loop is as fast


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


TABLE: list[int] = _make_table()
_TABLE_NP = np.array(TABLE, dtype=np.uint32)


def _raw_bytewise(reg: int, data: bytes | bytearray | memoryview) -> int:
    """Advance the raw CRC register over ``data`` (no inversions)."""
    table = TABLE
    for b in bytes(data):
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def crc32c_bytewise(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``seed``: the definition."""
    return _raw_bytewise(seed ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


# -- GF(2) operators on the register: "append n zero bytes" -----------------------


def _apply(mat: tuple[int, ...], v: int) -> int:
    r = 0
    i = 0
    while v:
        if v & 1:
            r ^= mat[i]
        v >>= 1
        i += 1
    return r


def _compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """a after b."""
    return tuple(_apply(a, col) for col in b)


_ONE_ZERO_BYTE = tuple(TABLE[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32))
_IDENTITY = tuple(1 << i for i in range(32))


@lru_cache(maxsize=128)
def _zeros_operator(n: int) -> tuple[int, ...]:
    """The linear map taking a register to the register after n zero bytes."""
    result, op = _IDENTITY, _ONE_ZERO_BYTE
    while n:
        if n & 1:
            result = _compose(op, result)
        n >>= 1
        if n:
            op = _compose(op, op)
    return result


@lru_cache(maxsize=128)
def _zeros_tables(n: int) -> np.ndarray:
    """``_zeros_operator(n)`` as four 256-entry tables (one per register byte)."""
    mat = _zeros_operator(n)
    return np.array(
        [[_apply(mat, b << (8 * k)) for b in range(256)] for k in range(4)], dtype=np.uint32
    )


def _shift_many(regs: np.ndarray, n: int) -> np.ndarray:
    """Append n zero bytes to every register in ``regs`` (uint32 array)."""
    t = _zeros_tables(n)
    return (
        t[0][regs & 0xFF]
        ^ t[1][(regs >> 8) & 0xFF]
        ^ t[2][(regs >> 16) & 0xFF]
        ^ t[3][regs >> 24]
    )


def _raw_lanes(reg: int, data: np.ndarray) -> int:
    """Raw register after ``data`` (uint8, 1-D), lane-parallel."""
    n = data.shape[0]
    if n < _SMALL:
        return _raw_bytewise(reg, data.tobytes())
    lanes = 1 << min(16, (n // 64).bit_length() - 1)  # lanes of at least 64 bytes
    lane_len = n // lanes
    main = lanes * lane_len
    cols = np.ascontiguousarray(data[:main].reshape(lanes, lane_len).T)  # (lane_len, lanes)
    regs = np.zeros(lanes, dtype=np.uint32)
    regs[0] = reg
    table = _TABLE_NP
    for j in range(lane_len):
        regs = table[(regs & 0xFF) ^ cols[j]] ^ (regs >> 8)
    # Join neighbours: register(A ‖ B) = shift_len(B)(register(A)) ^ register_from_0(B)
    length = lane_len
    while regs.shape[0] > 1:
        regs = _shift_many(regs[0::2], length) ^ regs[1::2]
        length *= 2
    return _raw_lanes(int(regs[0]), data[main:])


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, seed: int = 0) -> int:
    """CRC-32C of ``data`` (any C-contiguous buffer) continuing from ``seed``."""
    view = memoryview(data)  # type: ignore[arg-type, unused-ignore]  # (numpy < 2.5's stubs)
    if not view.c_contiguous:
        raise ValueError("checksum needs a C-contiguous buffer")
    arr = np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view,
                        dtype=np.uint8)
    return _raw_lanes((seed & 0xFFFFFFFF) ^ 0xFFFFFFFF, arr) ^ 0xFFFFFFFF
