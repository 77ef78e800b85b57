"""The test vectors of docs/block-format.md, against both implementations."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from kvstore.block import reference
from kvstore.block.format import HEADER_SIZE, DType
from tests.block.blockcases import PURE, doc_vectors, implementations, native_module

VECTORS = doc_vectors()
BLOCKS = [v for v in VECTORS if v["kind"] == "block"]
CRCS = [v for v in VECTORS if v["kind"] == "crc32c"]
KEYS = [v for v in VECTORS if v["kind"] == "block_keys"]


def test_the_doc_has_vectors() -> None:
    assert len(BLOCKS) >= 4 and len(CRCS) >= 5 and len(KEYS) >= 3
    assert {DType.parse(v["dtype"]) for v in BLOCKS} >= {DType.F16, DType.BF16, DType.F32}
    assert {len(v["v_pages"] or []) > 0 for v in BLOCKS} == {True, False}


def _pools(vec: dict[str, Any], key: str) -> list[np.ndarray] | None:
    if vec[key] is None:
        return None
    shape = tuple(vec["pool_shape"])
    return [np.frombuffer(bytes.fromhex(h), dtype=vec["numpy_dtype"]).reshape(shape).copy()
            for h in vec[key]]


def _block(vec: dict[str, Any]) -> bytes:
    return bytes.fromhex("".join(vec["header"]) + "".join(vec["payload"]))


@pytest.mark.parametrize("impl_name,impl", implementations())
@pytest.mark.parametrize("vec", BLOCKS, ids=[v["name"] for v in BLOCKS])
def test_block_vector(vec: dict[str, Any], impl_name: str, impl: Any) -> None:
    k, v = _pools(vec, "k_pages"), _pools(vec, "v_pages")
    assert k is not None
    expected = _block(vec)
    dtype = vec["dtype"] if vec["numpy_dtype"] in ("uint16", "uint8") else None
    packed = impl.pack(k, v, vec["page_ids"], tokens=vec["tokens"], dtype=dtype)
    assert bytes(packed) == expected

    header = impl.verify(expected)
    assert header == impl.parse_header(expected)
    assert header.dtype is DType.parse(vec["dtype"])
    assert header.layers == len(k)
    assert header.kv_count == (1 if v is None else 2)
    assert header.tokens == vec["tokens"]
    assert (header.kv_heads, header.head_dim) == tuple(vec["pool_shape"][2:])
    assert header.payload_bytes == len(expected) - HEADER_SIZE
    assert header.payload_checksum == int(vec["payload_checksum"], 16)
    assert header.header_checksum == int(vec["header_checksum"], 16)

    # Unpack into zeroed pools at the same page ids: the listed pages come back
    # (up to the block's last token), every other byte stays zero.
    k2 = [np.zeros_like(a) for a in k]
    v2 = None if v is None else [np.zeros_like(a) for a in v]
    impl.unpack_into(expected, k2, v2, vec["page_ids"], dtype=dtype)
    token_elems = int(np.prod(vec["pool_shape"][2:]))
    for src, dst in zip(k + (v or []), k2 + (v2 or []), strict=True):
        want = np.zeros_like(src)
        left = vec["tokens"] * token_elems
        for p in vec["page_ids"]:
            flat_src, flat_want = src[p].reshape(-1), want[p].reshape(-1)
            n = min(left, flat_src.size)
            flat_want[:n] = flat_src[:n]
            left -= n
        assert want.tobytes() == dst.tobytes()


@pytest.mark.parametrize("vec", CRCS, ids=[v["name"] for v in CRCS])
def test_crc_vector(vec: dict[str, Any]) -> None:
    data, seed, want = bytes.fromhex(vec["data"]), vec["seed"], int(vec["crc"], 16)
    assert reference.checksum(data, seed) == want
    from kvstore.block.crc32c import crc32c_bytewise

    assert crc32c_bytewise(data, seed) == want
    for _, impl in implementations():
        assert impl.checksum(data, seed) == want
    if not PURE:
        native = native_module()
        try:
            for name in native.crc32c_implementations():
                native._use_crc32c(name)
                assert native.checksum(data, seed) == want, name
                dst = bytearray(len(data))
                assert native.copy_and_checksum(dst, 0, data, seed) == want, name
                assert dst == data
        finally:
            native._use_crc32c(None)


@pytest.mark.parametrize("vec", KEYS, ids=[str(i) for i in range(len(KEYS))])
def test_key_vector(vec: dict[str, Any]) -> None:
    salt, extra = bytes.fromhex(vec["namespace_salt"]), bytes.fromhex(vec["extra"])
    want = [bytes.fromhex(k) for k in vec["keys"]]
    assert reference.root_key(salt).hex() == vec["root"]
    for _, impl in implementations():
        assert impl.block_keys(vec["tokens"], vec["block_tokens"], salt, extra) == want


def test_key_encoding_matches_the_doc() -> None:
    """Recompute a chain straight from the byte encoding the doc states."""
    vec = KEYS[0]
    salt, bt = bytes.fromhex(vec["namespace_salt"]), vec["block_tokens"]

    def h(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=32).digest()

    def u32(n: int) -> bytes:
        return n.to_bytes(4, "little")

    parent = h(b"kvstore/block_keys/v1" + u32(len(salt)) + salt)
    assert parent.hex() == vec["root"]
    keys = []
    tokens = vec["tokens"]
    for i in range(len(tokens) // bt):
        body = b"".join(u32(t) for t in tokens[i * bt : (i + 1) * bt])
        parent = h(parent + u32(bt) + body + u32(0))
        keys.append(parent.hex())
    assert keys == vec["keys"]
