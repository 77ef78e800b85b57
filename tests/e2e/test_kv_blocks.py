"""Engine pages in, engine pages out: put_kv / get_kv_into over gRPC and over
shared memory, with the server verifying every block-format block on Put."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvstore import Client
from kvstore.block import block_keys, pack
from kvstore.client.shm import ShmClient
from kvstore.errors import CorruptBlock, InvalidBlock
from kvstore.wire.pb import kvstore_pb2 as pb

LAYERS, PAGES, PAGE_TOKENS, HEADS, DIM = 4, 16, 16, 2, 64


def engine_cache(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (PAGES, PAGE_TOKENS, HEADS, DIM)
    k = [rng.standard_normal(shape).astype(np.float16) for _ in range(LAYERS)]
    v = [rng.standard_normal(shape).astype(np.float16) for _ in range(LAYERS)]
    return k, v


def empty_cache() -> tuple[list[np.ndarray], list[np.ndarray]]:
    shape = (PAGES, PAGE_TOKENS, HEADS, DIM)
    return ([np.zeros(shape, np.float16) for _ in range(LAYERS)],
            [np.zeros(shape, np.float16) for _ in range(LAYERS)])


def round_trip(client, namespace: str) -> None:  # type: ignore[no-untyped-def]
    tokens = list(range(1000, 1000 + 4 * 2 * PAGE_TOKENS))  # 4 blocks of 2 pages
    keys = block_keys(tokens, 2 * PAGE_TOKENS, namespace.encode())
    k, v = engine_cache(1)
    src_pages = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert client.put_kv(keys, k, v, src_pages, namespace=namespace).stored == 4
    k2, v2 = empty_cache()
    dst_pages = [[9, 3], [15, 0], [7, 8], [1, 2]]  # wherever the engine has room
    missing = block_keys(tokens + [7] * 64, 2 * PAGE_TOKENS, namespace.encode())[4]
    restored = client.get_kv_into([*keys[:3], missing], k2, v2, dst_pages, namespace=namespace)
    assert restored == 3
    for layer in range(LAYERS):
        for src, dst in zip(src_pages[:3], dst_pages[:3], strict=True):
            assert np.array_equal(k[layer][src], k2[layer][dst])
            assert np.array_equal(v[layer][src], v2[layer][dst])


def test_put_kv_and_get_kv_into_over_grpc(shared_server) -> None:  # type: ignore[no-untyped-def]
    with Client(shared_server.tcp) as c:
        round_trip(c, "kv-grpc")


def test_put_kv_and_get_kv_into_over_shared_memory(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shm = f"/dev/shm/kvstore-kvtest-{os.getpid()}-{tmp_path.name}"
    with server_factory("--l1-shm-path", shm, l1_capacity="32MiB") as server, \
            ShmClient(server.unix_target) as c:
        round_trip(c, "kv-shm")


def test_a_page_id_past_the_arrays_is_refused_before_anything_is_written(shared_server) -> None:  # type: ignore[no-untyped-def]
    """A bad page id for a later block was found only as that block was
    scattered: the earlier blocks had been written into the engine's pages
    (and the count restored lost with the error). Now nothing is sent."""
    tokens = list(range(3000, 3000 + 3 * 2 * PAGE_TOKENS))
    with Client(shared_server.tcp) as c:
        keys = block_keys(tokens, 2 * PAGE_TOKENS, b"kv-range")
        k, v = engine_cache(2)
        assert c.put_kv(keys, k, v, [[0, 1], [2, 3], [4, 5]], namespace="kv-range").stored == 3
        k2, v2 = empty_cache()
        with pytest.raises(ValueError, match=r"page_lists\[2\] names page 16"):
            c.get_kv_into(keys, k2, v2, [[0, 1], [2, 3], [16, 5]], namespace="kv-range")
        assert not any(np.count_nonzero(a) for a in k2 + v2)


def test_server_rejects_bad_blocks_naming_the_field(shared_server) -> None:  # type: ignore[no-untyped-def]
    k, v = engine_cache(2)
    good = bytes(pack(k, v, [0, 1]))
    bad_payload = bytearray(good)
    bad_payload[-5] ^= 0x10
    bad_header = bytearray(good)
    bad_header[0:4] = b"NOPE"
    with Client(shared_server.tcp, namespace="kv-bad") as c:
        c.put({b"good": good}, block_format=1)
        with pytest.raises(CorruptBlock, match=r"(?i)payload"):
            c.put({b"flipped": bytes(bad_payload)}, block_format=1)
        with pytest.raises(InvalidBlock, match=r"(?i)magic"):
            c.put({b"garbage": bytes(bad_header)}, block_format=1)
        with pytest.raises(InvalidBlock):
            c.put({b"short": good[:100]}, block_format=1)
        # A batch's error says which of its blocks is bad (the gRPC stream and
        # the data plane alike); the blocks before it are stored.
        for data_plane in (True, False):
            with Client(shared_server.tcp, namespace=f"kv-bad-{data_plane}",
                        data_plane=data_plane) as batch:
                with pytest.raises(InvalidBlock, match=r"^block #1: .*(?i:magic)"):
                    batch.put({b"first": good, b"second": bytes(bad_header)}, block_format=1)
                with pytest.raises(CorruptBlock, match=r"^block #2: .*(?i:payload)"):
                    batch.put({b"a": good, b"b": good, b"c": bytes(bad_payload)},
                              block_format=1)
                hits = batch.lookup([b"first", b"second", b"a", b"b", b"c"]).tiers
                assert [t is not None for t in hits] == [True, False, True, True, False]
        # As raw bytes the same data is accepted: the format is the caller's claim.
        c.put({b"raw": bytes(bad_header)})
        assert c.lookup([b"good", b"flipped", b"garbage", b"short"]).found == 1
        assert c.get([b"good"]) == [good]


def test_bad_block_over_the_wire_is_data_loss_status(shared_server) -> None:  # type: ignore[no-untyped-def]
    k, v = engine_cache(3)
    block = bytearray(pack(k, v, [0]))
    block[-1] ^= 1
    with grpc.insecure_channel(shared_server.tcp) as ch:
        put = ch.stream_unary("/kvstore.v1.KVStore/Put",
                              request_serializer=pb.PutChunk.SerializeToString,
                              response_deserializer=pb.PutResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            put(iter([pb.PutChunk(namespace="kv-wire", key=b"k", block_size=len(block),
                                  data=bytes(block), format=pb.BLOCK_FORMAT_KV_V1)]))
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
