"""pack / unpack_into: native == reference, round trips, buffers, arguments."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.block import reference
from kvstore.block.format import HEADER_SIZE, DType, block_size
from tests.block.blockcases import (
    IMPL,
    Case,
    cases,
    error_of,
    implementations,
    make_pool,
    native_module,
    needs_native,
    streaming_stores,
)

PROPS = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@needs_native
@PROPS
@given(case=cases(unique_pages=False))
def test_native_pack_is_byte_identical_to_the_reference(case: Case) -> None:
    ref = bytes(case.pack_with(reference))
    assert bytes(case.pack_with(native_module())) == ref
    assert ref[HEADER_SIZE:] == case.expected_payload()


@PROPS
@given(case=cases(), data=st.data())
def test_unpack_restores_what_pack_gathered(case: Case, data: st.DataObject) -> None:
    blk = case.pack_with(IMPL)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k2, v2 = case.empty_like(rng)
    before = [a.copy() for a in k2 + (v2 or [])]
    # Scatter to other page ids of the same count, in another page size when possible.
    header = IMPL.unpack_into(blk, k2, v2, case.page_ids, dtype=case.dtype_arg)
    assert header == IMPL.verify(blk)
    token_elems = case.k[0].shape[2] * case.k[0].shape[3]
    for src, dst, old in zip(case.k + (case.v or []), k2 + (v2 or []), before, strict=True):
        want = old.copy()
        left = case.tokens * token_elems
        for p in case.page_ids:
            n = min(left, src[p].size)
            want[p].reshape(-1)[:n] = src[p].reshape(-1)[:n]
            left -= n
        assert want.tobytes() == dst.tobytes()  # bytes: NaN patterns compare equal
    # and packing the destination again gives the same block
    again = IMPL.pack(k2, v2, case.page_ids, tokens=case.tokens, dtype=case.dtype_arg)
    assert bytes(again) == bytes(blk)


@needs_native
@PROPS
@given(case=cases(), seed=st.integers(0, 2**32 - 1), streaming=st.booleans())
def test_native_unpack_matches_the_reference(case: Case, seed: int, streaming: bool) -> None:
    blk = bytes(case.pack_with(reference))
    results = []
    with streaming_stores(0 if streaming else 1 << 62):
        for impl in (reference, native_module()):
            k2, v2 = case.empty_like(np.random.default_rng(seed))
            impl.unpack_into(blk, k2, v2, case.page_ids, dtype=case.dtype_arg)
            results.append(b"".join(a.tobytes() for a in k2 + (v2 or [])))
        assert results[0] == results[1]
        assert bytes(case.pack_with(native_module())) == blk


@needs_native
def test_streaming_stores_on_a_large_block() -> None:
    """A block over the streaming-store threshold, at its default."""
    rng = np.random.default_rng(2)
    k = [make_pool(rng, (9, 32, 8, 128), "float16", False) for _ in range(11)]
    v = [make_pool(rng, (9, 32, 8, 128), "float16", False) for _ in range(11)]
    ids = [8, 1, 4, 6, 0, 2, 3, 5]
    native = native_module()
    blk = native.pack(k, v, ids, tokens=250)
    assert len(blk) > native._streaming_store_threshold()
    assert bytes(blk) == bytes(reference.pack(k, v, ids, tokens=250))
    k2 = [np.zeros_like(a) for a in k]
    v2 = [np.zeros_like(a) for a in v]
    native.unpack_into(blk, k2, v2, ids)
    for a, b in zip(k + v, k2 + v2, strict=True):
        want, got = a[ids].reshape(-1, 8, 128)[:250], b[ids].reshape(-1, 8, 128)[:250]
        assert want.tobytes() == got.tobytes()


@PROPS
@given(case=cases(max_layers=2), slack=st.integers(0, 100), fill=st.integers(0, 255))
def test_pack_into_a_callers_buffer(case: Case, slack: int, fill: int) -> None:
    fresh = bytes(case.pack_with(IMPL))
    size = len(fresh)
    assert size == block_size(layers=len(case.k), kv_count=1 if case.v is None else 2,
                              tokens=case.tokens, kv_heads=case.k[0].shape[2],
                              head_dim=case.k[0].shape[3], dtype=case.dtype)
    for out in (bytearray([fill]) * (size + slack), np.full(size + slack, fill, np.uint8)):
        view = case.pack_with(IMPL, out=out)
        assert isinstance(view, memoryview) and view.nbytes == size
        assert bytes(view) == fresh
        assert bytes(memoryview(out)[size:]) == bytes([fill]) * slack  # nothing past the block


def _pools(layers: int = 2, shape: tuple[int, ...] = (4, 2, 2, 3), dtype: str = "float16",
           seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_pool(rng, shape, dtype, False) for _ in range(layers)]


def test_pages_with_a_strided_page_axis() -> None:
    rng = np.random.default_rng(1)
    kv = [rng.standard_normal((5, 2, 4, 2, 8)).astype(np.float16) for _ in range(3)]
    k, v = [a[:, 0] for a in kv], [a[:, 1] for a in kv]
    blk = IMPL.pack(k, v, [4, 0, 2])
    copies = reference.pack([a.copy() for a in k], [a.copy() for a in v], [4, 0, 2])
    assert bytes(blk) == bytes(copies)
    kv2 = [np.zeros_like(a) for a in kv]
    IMPL.unpack_into(blk, [a[:, 0] for a in kv2], [a[:, 1] for a in kv2], [4, 0, 2])
    for a, b in zip(kv, kv2, strict=True):
        assert np.array_equal(a[[4, 0, 2]], b[[4, 0, 2]])
        assert not b[[1, 3]].any()


def test_unpack_into_another_page_size() -> None:
    k, v = _pools(shape=(4, 4, 1, 2)), _pools(shape=(4, 4, 1, 2), seed=1)
    blk = IMPL.pack(k, v, [3, 1], tokens=6)  # pages of 4 tokens
    k2 = [np.zeros((6, 2, 1, 2), np.float16) for _ in range(2)]  # pages of 2 tokens
    v2 = [np.zeros((6, 2, 1, 2), np.float16) for _ in range(2)]
    IMPL.unpack_into(blk, k2, v2, [5, 0, 2])
    for src, dst in zip(k + v, k2 + v2, strict=True):
        tokens = np.concatenate([src[3], src[1]])[:6]
        assert np.concatenate([dst[5], dst[0], dst[2]]).tobytes() == tokens.tobytes()


def test_mla_single_latent_block() -> None:
    k = _pools(layers=3, shape=(4, 2, 1, 7))
    blk = IMPL.pack(k, None, [2, 3])
    header = IMPL.verify(blk)
    assert (header.kv_count, header.kv_heads, header.head_dim) == (1, 1, 7)
    k2 = [np.zeros_like(a) for a in k]
    IMPL.unpack_into(blk, k2, None, [2, 3])
    assert all(a[2:].tobytes() == b[2:].tobytes() for a, b in zip(k, k2, strict=True))


def test_dtype_codes_in_the_header() -> None:
    k = _pools(shape=(2, 1, 1, 2), dtype="uint16")
    for name, code in (("bf16", DType.BF16), ("f16", DType.F16), (DType.BF16, DType.BF16),
                       (1, DType.F16), ("bfloat16", DType.BF16)):
        assert IMPL.verify(IMPL.pack(k, k, [0], dtype=name)).dtype is code
    u8 = _pools(shape=(2, 1, 1, 2), dtype="uint8")
    assert IMPL.verify(IMPL.pack(u8, None, [1])).dtype is DType.U8
    assert IMPL.verify(IMPL.pack(u8, None, [1], dtype="f8_e5m2")).dtype is DType.F8_E5M2
    assert IMPL.verify(IMPL.pack(u8, None, [1], dtype="float8_e4m3fn")).dtype is DType.F8_E4M3


def test_ml_dtypes_bfloat16_is_recognised() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    k = [np.ones((2, 2, 1, 4), dtype=ml_dtypes.bfloat16)]
    assert IMPL.verify(IMPL.pack(k, k, [1])).dtype is DType.BF16


# -- argument errors: same class and message from both implementations -----------


def _argument_cases() -> list[tuple[str, Any]]:
    k = _pools()
    v = _pools(seed=1)
    ro = [a.copy() for a in k]
    for a in ro:
        a.flags.writeable = False
    blk = bytes(reference.pack(k, v, [0, 1]))
    blk_mla = bytes(reference.pack(k, None, [0, 1]))
    big = bytes(reference.pack(_pools(layers=3), _pools(layers=3), [0, 1]))
    noncontig = [np.zeros((4, 3, 2, 2), np.float16)[:, :, :, :] .transpose(0, 1, 3, 2) for _ in k]
    u16 = [a.view(np.uint16) for a in k]
    return [
        ("empty k_pages", lambda m: m.pack([], None, [0])),
        ("v length", lambda m: m.pack(k, v[:1], [0])),
        ("not an array", lambda m: m.pack([k[0], [1, 2]], None, [0])),
        ("ndim", lambda m: m.pack([k[0][0]], None, [0])),
        ("empty dim", lambda m: m.pack([np.zeros((0, 2, 2, 3), np.float16)], None, [0])),
        ("shape", lambda m: m.pack([k[0], np.zeros((4, 2, 2, 4), np.float16)], None, [0])),
        ("dtype mismatch", lambda m: m.pack(k, [a.astype(np.float32) for a in v], [0])),
        ("non-contiguous page", lambda m: m.pack(noncontig, None, [0])),
        ("uint16 needs dtype", lambda m: m.pack(u16, None, [0])),
        ("itemsize", lambda m: m.pack(k, None, [0], dtype="f32")),
        ("unknown dtype", lambda m: m.pack(k, None, [0], dtype="f64")),
        ("big-endian", lambda m: m.pack([a.astype(">f2") for a in k], None, [0])),
        ("no pages", lambda m: m.pack(k, v, [])),
        ("negative page", lambda m: m.pack(k, v, [0, -1])),
        ("page out of range", lambda m: m.pack(k, v, [3, 4, 9])),
        ("page not int", lambda m: m.pack(k, v, [0.5])),
        ("tokens too many", lambda m: m.pack(k, v, [0, 1], tokens=5)),
        ("tokens too few", lambda m: m.pack(k, v, [0, 1], tokens=2)),
        ("tokens zero", lambda m: m.pack(k, v, [0], tokens=0)),
        ("out too small", lambda m: m.pack(k, v, [0], out=bytearray(10))),
        ("out read-only", lambda m: m.pack(k, v, [0], out=bytes(1000))),
        ("unpack read-only", lambda m: m.unpack_into(blk, ro, v, [0, 1])),
        ("unpack layers", lambda m: m.unpack_into(big, k, v, [0, 1])),
        ("unpack wants v", lambda m: m.unpack_into(blk, k, None, [0, 1])),
        ("unpack no v", lambda m: m.unpack_into(blk_mla, k, v, [0, 1])),
        ("unpack heads", lambda m: m.unpack_into(
            blk, _pools(shape=(4, 2, 1, 3)), _pools(shape=(4, 2, 1, 3)), [0, 1])),
        ("unpack dtype", lambda m: m.unpack_into(blk, u16, u16, [0, 1], dtype="bf16")),
        ("unpack page count", lambda m: m.unpack_into(blk, k, v, [0])),
        ("unpack repeated page", lambda m: m.unpack_into(blk, k, v, [2, 2])),
        ("copy overflow", lambda m: m.copy_and_checksum(bytearray(4), 2, b"abc")),
        ("copy negative offset", lambda m: m.copy_and_checksum(bytearray(4), -1, b"a")),
        ("copy read-only dst", lambda m: m.copy_and_checksum(b"abcd", 0, b"a")),
    ]


ARG_CASES = _argument_cases()


@pytest.mark.parametrize("name,call", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_argument_errors(name: str, call: Any) -> None:
    errors = [error_of(call, impl) for _, impl in implementations()]
    assert errors[0] is not None, f"{name}: the reference accepted it"
    assert errors[0][0] in (ValueError, TypeError), errors[0]
    assert all(e == errors[0] for e in errors), errors


def test_many_layers_and_pages() -> None:
    """More arrays and page ids than the native module describes without a malloc."""
    rng = np.random.default_rng(4)
    k = [make_pool(rng, (700, 1, 1, 3), "uint8", False) for _ in range(70)]
    v = [make_pool(rng, (700, 1, 1, 3), "uint8", False) for _ in range(70)]
    ids = [int(p) for p in rng.permutation(700)[:600]]
    blk = IMPL.pack(k, v, ids)
    assert bytes(blk) == bytes(reference.pack(k, v, ids))
    k2 = [np.zeros_like(a) for a in k]
    v2 = [np.zeros_like(a) for a in v]
    IMPL.unpack_into(blk, k2, v2, np.array(ids))
    assert all(np.array_equal(a[ids], b[ids]) for a, b in zip(k + v, k2 + v2, strict=True))
    repeated = [*ids[:300], ids[7]]
    blk = IMPL.pack(k, v, repeated)
    errors = [error_of(impl.unpack_into, blk, k2, v2, repeated) for _, impl in implementations()]
    assert errors[0] == (ValueError, f"page_ids[300] = {ids[7]} repeats page_ids[7]")
    assert all(e == errors[0] for e in errors)
