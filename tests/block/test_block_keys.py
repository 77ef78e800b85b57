"""Chained block keys: native == reference, prefixes, namespaces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.block import reference
from tests.block.blockcases import IMPL, error_of, implementations, native_module, needs_native

token_lists = st.lists(st.integers(0, 2**32 - 1), max_size=200)


@needs_native
@settings(max_examples=80, deadline=None)
@given(tokens=token_lists, block_tokens=st.integers(1, 40), salt=st.binary(max_size=40),
       extra=st.binary(max_size=20))
def test_native_keys_equal_reference(tokens: list[int], block_tokens: int, salt: bytes,
                                     extra: bytes) -> None:
    native = native_module()
    want = reference.block_keys(tokens, block_tokens, salt, extra)
    assert native.block_keys(tokens, block_tokens, salt, extra) == want
    assert native.block_keys(tuple(tokens), block_tokens, salt, extra) == want
    assert native.block_keys(iter(tokens), block_tokens, salt, extra) == want
    assert native.block_keys(np.array(tokens, dtype=np.int64), block_tokens, salt, extra) == want
    assert native.block_keys(np.array(tokens, dtype=np.uint32), block_tokens, salt, extra) == want


@settings(max_examples=60, deadline=None)
@given(tokens=token_lists, block_tokens=st.integers(1, 16), cut=st.integers(0, 200))
def test_keys_of_a_prefix_are_a_prefix(tokens: list[int], block_tokens: int, cut: int) -> None:
    full = IMPL.block_keys(tokens, block_tokens, b"ns")
    assert len(full) == len(tokens) // block_tokens
    assert all(len(k) == 32 for k in full)
    part = IMPL.block_keys(tokens[:cut], block_tokens, b"ns")
    assert part == full[: len(part)]
    assert len(set(full)) == len(full)  # a chain never repeats a key


def test_namespaces_and_extra_are_disjoint() -> None:
    tokens = list(range(64))
    seen: set[bytes] = set()
    variants = [(b"tenant-a/model", b""), (b"tenant-b/model", b""), (b"", b""),
                (b"tenant-a/model", b"lora:1"), (b"tenant-a/model", b"lora:2"),
                (b"tenant-a/mode", b"l"), (b"tenant-a/model\x00", b"")]
    for salt, extra in variants:
        keys = IMPL.block_keys(tokens, 16, salt, extra)
        assert not seen & set(keys), (salt, extra)
        seen |= set(keys)
    # same tokens, different block size: different keys
    assert not set(IMPL.block_keys(tokens, 8, b"ns")) & set(IMPL.block_keys(tokens, 16, b"ns"))
    # one token differs: that block and every later one differ, earlier ones not
    other = tokens.copy()
    other[40] += 1
    a, b = IMPL.block_keys(tokens, 16, b"ns"), IMPL.block_keys(other, 16, b"ns")
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))


BAD = [
    ("negative token", lambda m: m.block_keys([1, -1], 1, b"")),
    ("token too big", lambda m: m.block_keys([1, 2**32], 1, b"")),
    ("huge token", lambda m: m.block_keys([2**70], 1, b"")),
    ("bad token in numpy", lambda m: m.block_keys(np.array([5, -3, 2]), 1, b"")),
    ("float token", lambda m: m.block_keys([1.0], 1, b"")),
    ("block_tokens 0", lambda m: m.block_keys([1], 0, b"")),
    ("str salt", lambda m: m.block_keys([1], 1, "ns")),
    ("str extra", lambda m: m.block_keys([1], 1, b"", "x")),
]


@pytest.mark.parametrize("name,call", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(name: str, call: object) -> None:
    errors = [error_of(call, impl) for _, impl in implementations()]
    assert errors[0] is not None and errors[0][0] in (TypeError, ValueError), errors
    assert all(e == errors[0] for e in errors), errors


def test_no_key_for_a_partial_block() -> None:
    assert IMPL.block_keys(list(range(15)), 16, b"ns") == []
    assert IMPL.block_keys([], 16, b"ns") == []
    assert len(IMPL.block_keys(list(range(33)), 16, b"ns")) == 2
