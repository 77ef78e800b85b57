"""verify / parse_header: every damaged, malformed, truncated or over-long
block fails with InvalidBlock or CorruptBlock, the same way in both
implementations, and never crashes."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.block import reference
from kvstore.block.crc32c import crc32c
from kvstore.block.format import HEADER_SIZE
from kvstore.errors import CorruptBlock, InvalidBlock, KVStoreError
from tests.block.blockcases import IMPL, Case, cases, error_of, implementations

PROPS = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _small_block() -> bytes:
    rng = np.random.default_rng(11)
    k = [rng.standard_normal((3, 2, 2, 4)).astype(np.float16) for _ in range(2)]
    v = [rng.standard_normal((3, 2, 2, 4)).astype(np.float16) for _ in range(2)]
    return bytes(reference.pack(k, v, [2, 0], tokens=3))


BLOCK = _small_block()


def _same_error_everywhere(fn_name: str, buf: Any) -> tuple[type[BaseException], str] | None:
    errors = [error_of(getattr(impl, fn_name), buf) for _, impl in implementations()]
    assert all(e == errors[0] for e in errors), errors
    return errors[0]


def test_error_classes_map_to_grpc_codes() -> None:
    assert InvalidBlock.code == "INVALID_ARGUMENT"
    assert CorruptBlock.code == "DATA_LOSS"


def test_every_single_bit_flip_is_caught() -> None:
    for _, impl in implementations():
        impl.verify(BLOCK)
    for byte in range(len(BLOCK)):
        for bit in range(8):
            bad = bytearray(BLOCK)
            bad[byte] ^= 1 << bit
            err = _same_error_everywhere("verify", bytes(bad))
            assert err is not None, f"flip of byte {byte} bit {bit} went unnoticed"
            cls, msg = err
            if byte < 8:  # magic, version, header size
                assert cls is InvalidBlock, (byte, bit, msg)
            elif byte < HEADER_SIZE:
                assert cls is CorruptBlock and "header checksum" in msg, (byte, bit, msg)
            else:
                assert cls is CorruptBlock and "payload checksum" in msg, (byte, bit, msg)


@PROPS
@given(case=cases(), data=st.data())
def test_random_bit_flip_in_random_blocks(case: Case, data: st.DataObject) -> None:
    blk = bytearray(case.pack_with(IMPL))
    pos = data.draw(st.integers(0, len(blk) * 8 - 1))
    blk[pos // 8] ^= 1 << (pos % 8)
    err = _same_error_everywhere("verify", bytes(blk))
    assert err is not None and err[0] in (InvalidBlock, CorruptBlock)
    # unpack_into fails the same way and never leaves a "successful" load
    k2, v2 = case.empty_like(np.random.default_rng(0))
    with pytest.raises((InvalidBlock, CorruptBlock)):
        IMPL.unpack_into(bytes(blk), k2, v2, case.page_ids, dtype=case.dtype_arg)


def test_truncated_blocks() -> None:
    for n in range(len(BLOCK)):
        err = _same_error_everywhere("verify", BLOCK[:n])
        assert err is not None and err[0] is InvalidBlock, (n, err)
        assert "truncated" in err[1], err
        if n >= HEADER_SIZE:
            assert _same_error_everywhere("parse_header", BLOCK[:n]) is None  # header alone is fine
    err = _same_error_everywhere("verify", BLOCK[:100])
    assert err is not None and f"the header says {len(BLOCK)} bytes, the buffer has 100" in err[1]


def test_over_long_blocks() -> None:
    for extra in (1, 7, 64, 1000):
        err = _same_error_everywhere("verify", BLOCK + bytes(extra))
        assert err is not None and err[0] is InvalidBlock and "over-long" in err[1]
        k = [np.zeros((3, 2, 2, 4), np.float16) for _ in range(2)]
        with pytest.raises(InvalidBlock, match="over-long"):
            IMPL.unpack_into(BLOCK + bytes(extra), k, [a.copy() for a in k], [0, 1])


def _patched(offset: int, fmt: str, value: int, fix_crc: bool = True) -> bytes:
    """BLOCK with one field changed and (by default) a valid header checksum."""
    buf = bytearray(BLOCK)
    struct.pack_into(fmt, buf, offset, value)
    if fix_crc:
        struct.pack_into("<I", buf, 60, crc32c(bytes(buf[:60])))
    return bytes(buf)


MALFORMED = [
    ("magic", BLOCK.replace(b"KVCB", b"KVCX", 1), "not a kvstore block"),
    ("not a block", b"hello world", "not a kvstore block"),
    ("empty", b"", "truncated block: 0 bytes"),
    ("3 bytes", b"KVC", "truncated block: 3 bytes"),
    ("version 2", _patched(4, "<H", 2), "unsupported block format version 2"),
    ("version 0", _patched(4, "<H", 0), "unsupported block format version 0"),
    ("header size", _patched(6, "<H", 65), "bad header size 65"),
    ("dtype 0", _patched(8, "<B", 0), "unknown dtype code 0"),
    ("dtype 99", _patched(8, "<B", 99), "unknown dtype code 99"),
    ("layout", _patched(9, "<B", 2), "unknown layout code 2"),
    ("kv count", _patched(10, "<B", 3), "K/V count must be 1 or 2, not 3"),
    ("kv count 0", _patched(10, "<B", 0), "K/V count must be 1 or 2, not 0"),
    ("algorithm", _patched(11, "<B", 2), "unknown checksum algorithm code 2"),
    ("flags", _patched(12, "<I", 1 << 31), "unknown flags 0x80000000"),
    ("layers 0", _patched(16, "<I", 0), "layer count is zero"),
    ("tokens 0", _patched(20, "<I", 0), "token count is zero"),
    ("heads 0", _patched(24, "<I", 0), "kv head count is zero"),
    ("dim 0", _patched(28, "<I", 0), "head dim is zero"),
    ("layers", _patched(16, "<I", 3), "payload length 192 disagrees with the shape: "
     "3 layers x 2 x 3 tokens x 2 heads x 4 x 2 bytes = 288"),
    ("payload length", _patched(32, "<Q", 2**64 - 1), "payload length 18446744073709551615"),
    ("huge shape", _patched(20, "<I", 2**32 - 1), "disagrees with the shape"),
    ("crc width", _patched(40, "<Q", 1 << 32), "does not fit in 32 bits"),
    ("reserved", _patched(50, "<B", 1), "reserved header bytes 48-59 are not zero"),
    ("header crc", _patched(16, "<I", 3, fix_crc=False), "header checksum mismatch"),
]


@pytest.mark.parametrize("name,buf,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_headers(name: str, buf: bytes, words: str) -> None:
    for fn in ("verify", "parse_header"):
        err = _same_error_everywhere(fn, buf)
        assert err is not None, name
        assert err[0] is (CorruptBlock if "checksum mismatch" in words else InvalidBlock), err
        assert words in err[1], err


def test_corrupt_payload_in_unpack_into() -> None:
    bad = bytearray(BLOCK)
    bad[-1] ^= 0x10
    for _, impl in implementations():
        k = [np.zeros((3, 2, 2, 4), np.float16) for _ in range(2)]
        v = [a.copy() for a in k]
        with pytest.raises(CorruptBlock, match="payload checksum mismatch"):
            impl.unpack_into(bytes(bad), k, v, [0, 1])
        impl.unpack_into(bytes(bad), k, v, [0, 1], verify=False)  # the caller's choice


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.binary(min_size=60, max_size=70).map(lambda b: b"KVCB" + b))
def test_garbage_never_crashes(buf: bytes) -> None:
    for fn in ("verify", "parse_header"):
        err = _same_error_everywhere(fn, buf)
        assert err is not None and issubclass(err[0], KVStoreError), err


@PROPS
@given(case=cases(max_layers=2), cut=st.integers(0, 10**6))
def test_cut_or_padded_random_blocks(case: Case, cut: int) -> None:
    blk = bytes(case.pack_with(IMPL))
    n = cut % (len(blk) * 2 + 1)
    buf = blk[:n] if n <= len(blk) else blk + bytes(n - len(blk))
    err = _same_error_everywhere("verify", buf)
    if n == len(blk):
        assert err is None
    else:
        assert err is not None and err[0] is InvalidBlock


def test_any_buffer_type() -> None:
    for buf in (BLOCK, bytearray(BLOCK), memoryview(BLOCK), np.frombuffer(BLOCK, np.uint8),
                np.frombuffer(BLOCK, np.uint32)):
        for _, impl in implementations():
            assert impl.verify(buf) == reference.verify(BLOCK)
