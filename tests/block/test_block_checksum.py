"""CRC-32C: every native implementation == the reference; copy_and_checksum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore.checksum
from kvstore.block import reference
from kvstore.block.crc32c import CHECK_VALUE, crc32c, crc32c_bytewise
from tests.block.blockcases import (
    IMPL,
    PURE,
    implementations,
    native_module,
    needs_native,
    streaming_stores,
)

# Lengths around the native code's internal boundaries (8-byte words, 256-byte
# fold windows, 3 x 256 and 3 x 8192 interleaved stripes).
EDGES = [0, 1, 7, 8, 9, 255, 256, 257, 511, 512, 513, 767, 768, 769, 1023, 1024, 4095,
         24575, 24576, 24577, 24576 + 768 + 7, 65536 + 13]


def native_impls() -> list[str]:
    return [] if PURE else native_module().crc32c_implementations()


@pytest.fixture(params=native_impls() or [None])
def crc_impl(request: pytest.FixtureRequest) -> object:
    if request.param is None:
        pytest.skip("KVSTORE_PURE=1: no native CRC-32C")
    native = native_module()
    native._use_crc32c(request.param)
    yield request.param
    native._use_crc32c(None)


def test_check_value() -> None:
    assert crc32c(b"123456789") == crc32c_bytewise(b"123456789") == CHECK_VALUE
    for _, impl in implementations():
        assert impl.checksum(b"123456789") == CHECK_VALUE


@needs_native
def test_cpu_dispatch_picks_the_best() -> None:
    native = native_module()
    assert native.crc32c_implementation() == native.crc32c_implementations()[-1]
    assert native.crc32c_implementations()[0] == "table"
    with pytest.raises(ValueError, match="not available"):
        native._use_crc32c("quantum")


@needs_native
def test_edge_lengths(crc_impl: str) -> None:
    native = native_module()
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size=max(EDGES) + 64, dtype=np.uint8).tobytes()
    for n in EDGES:
        for offset in (0, 3):
            chunk = data[offset : offset + n]
            want = crc32c(chunk, 0x1234)
            assert native.checksum(chunk, 0x1234) == want, (crc_impl, n, offset)
            dst = bytearray(n + 5)
            assert native.copy_and_checksum(dst, 5, chunk, 0x1234) == want, (crc_impl, n)
            assert bytes(dst[5:]) == chunk and dst[:5] == bytes(5)


@needs_native
def test_streaming_store_copies(crc_impl: str) -> None:
    native = native_module()
    data = np.random.default_rng(6).integers(0, 256, size=5000, dtype=np.uint8).tobytes()
    with streaming_stores(0):
        for n in (0, 1, 63, 64, 65, 255, 511, 512, 700, 1024 + 256 + 17, 4999):
            for offset in (0, 1, 31, 63, 64):
                dst = bytearray(n + offset + 3)
                got = native.copy_and_checksum(dst, offset, data[:n], 7)
                assert got == crc32c(data[:n], 7), (crc_impl, n, offset)
                assert dst == bytes(offset) + data[:n] + bytes(3)
    big = np.random.default_rng(7).integers(0, 256, size=(9 << 20) + 5, dtype=np.uint8)
    dst_big = np.zeros(big.size + 1, np.uint8)
    assert native.copy_and_checksum(dst_big, 1, big) == reference.checksum(big)
    assert np.array_equal(dst_big[1:], big)


@needs_native
def test_streaming_forced_either_way(crc_impl: str) -> None:
    """``streaming=`` overrides the size threshold; the bytes and CRC are the same."""
    native = native_module()
    data = np.random.default_rng(8).integers(0, 256, size=70000, dtype=np.uint8).tobytes()
    for streaming in (True, False, None):
        for n in (0, 1, 65, 16384, 70000):
            dst = bytearray(n + 4)
            got = native.copy_and_checksum(dst, 1, data[:n], 3, streaming=streaming)
            assert got == crc32c(data[:n], 3), (crc_impl, streaming, n)
            assert dst == b"\0" + data[:n] + bytes(3)
    assert reference.copy_and_checksum(bytearray(3), 0, b"abc", streaming=True) == \
        crc32c(b"abc")


@needs_native
@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=3000), seed=st.integers(0, 2**32 - 1),
       split=st.integers(0, 3000))
def test_native_checksum_matches_reference(data: bytes, seed: int, split: int) -> None:
    want = crc32c_bytewise(data, seed)
    native = native_module()
    try:
        for name in native.crc32c_implementations():
            native._use_crc32c(name)
            assert native.checksum(data, seed) == want, name
            cut = min(split, len(data))
            assert native.checksum(data[cut:], native.checksum(data[:cut], seed)) == want
    finally:
        native._use_crc32c(None)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 70000), seed=st.integers(0, 2**32 - 1))
def test_reference_lanes_match_the_bytewise_definition(n: int, seed: int) -> None:
    data = np.random.default_rng(n).integers(0, 256, size=n, dtype=np.uint8)
    assert crc32c(data, seed) == crc32c_bytewise(data.tobytes(), seed)


def test_large_buffer() -> None:
    data = np.random.default_rng(9).integers(0, 256, size=(3 << 20) + 77, dtype=np.uint8)
    want = reference.checksum(data)
    assert IMPL.checksum(data) == want
    assert IMPL.checksum(data[1000:], IMPL.checksum(data[:1000])) == want
    dst = np.zeros(data.size + 10, np.uint8)
    assert IMPL.copy_and_checksum(dst, 10, data) == want
    assert np.array_equal(dst[10:], data)


def test_copy_and_checksum_buffers() -> None:
    for _, impl in implementations():
        dst = bytearray(10)
        assert impl.copy_and_checksum(dst, 1, memoryview(b"123456789")) == CHECK_VALUE
        assert dst == b"\x00123456789"
        arr = np.zeros(4, np.uint32)  # 16 bytes, read as raw bytes
        assert impl.copy_and_checksum(arr, 0, b"abcd") == crc32c(b"abcd")
        assert arr.tobytes()[:4] == b"abcd"
        assert impl.copy_and_checksum(dst, 10, b"") == 0


def test_store_checksum_is_crc32c() -> None:
    assert kvstore.checksum.ALGORITHM == "crc32c"
    assert kvstore.checksum.checksum(b"123456789") == CHECK_VALUE
    assert kvstore.checksum.checksum(b"56789", kvstore.checksum.checksum(b"1234")) == CHECK_VALUE
