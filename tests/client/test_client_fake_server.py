"""Client and AsyncClient against an in-process fake server (no kvstore server needed)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import numpy as np
import pytest
from kvstore_client_fake import FakeServer

from kvstore import AsyncClient, Client, PutResult
from kvstore.errors import (
    BlockTooLarge,
    ConnectionFailed,
    InvalidArgument,
    InvalidKey,
    InvalidNamespace,
    TierNotConfigured,
)
from kvstore.types import SessionEnd, TierName, TurnEnd, TurnEndReason
from kvstore.wire.pb import kvstore_pb2 as pb


def _blocks() -> dict[bytes, Any]:
    rng = np.random.default_rng(1)
    return {
        b"small": b"hello",
        b"big": rng.integers(0, 256, size=2_500_000, dtype=np.uint8),  # 3 chunks of 1 MiB
        b"f16": rng.standard_normal((64, 128)).astype(np.float16),
    }


def _as_bytes(buf: Any) -> bytes:
    return memoryview(buf).cast("B").tobytes() if not isinstance(buf, bytes) else buf


def test_put_get_roundtrip(fake_server: FakeServer) -> None:
    blocks = _blocks()
    with Client(fake_server.target, namespace="ns") as kv:
        res = kv.put(blocks, session_id="s1")
        assert res == PutResult(3, sum(len(_as_bytes(b)) for b in blocks.values()))
        out = kv.get([b"big", b"missing", b"small", b"f16"])
    assert out[0] == _as_bytes(blocks[b"big"])
    assert out[1] is None
    assert out[2] == b"hello"
    assert np.array_equal(np.frombuffer(out[3], dtype=np.float16).reshape(64, 128),  # type: ignore[arg-type]
                          blocks[b"f16"])
    msgs = fake_server.state.put_messages
    assert msgs[0].namespace == "ns" and msgs[0].ack == pb.ACK_LEVEL_MEMORY
    assert all(not m.namespace for m in msgs[1:])
    assert max(len(m.data) for m in msgs) == 1 << 20
    assert {m.session_id for m in msgs if m.key} == {"s1"}
    assert fake_server.state.get_requests[0].max_chunk_bytes == 1 << 20


def test_chunk_bytes_and_ack(fake_server: FakeServer) -> None:
    with Client(fake_server.target, namespace="ns", chunk_bytes=1000) as kv:
        kv.put([(b"k", b"x" * 2500)], ack="local")
        assert kv.get([b"k"]) == [b"x" * 2500]
    msgs = fake_server.state.put_messages
    assert [len(m.data) for m in msgs] == [1000, 1000, 500]
    assert msgs[0].ack == pb.ACK_LEVEL_LOCAL
    assert fake_server.state.get_requests[0].max_chunk_bytes == 1000


def test_get_into(fake_server: FakeServer) -> None:
    blocks = _blocks()
    with Client(fake_server.target, namespace="ns") as kv:
        kv.put(blocks)
        big = np.empty(3_000_000, dtype=np.uint8)
        f16 = np.empty((64, 128), dtype=np.float16)
        spare = bytearray(b"untouched")
        sizes = kv.get_into([b"big", b"f16", b"nope"], [big, f16, spare])
    assert sizes == [2_500_000, 64 * 128 * 2, None]
    assert np.array_equal(big[:2_500_000], blocks[b"big"])
    assert np.array_equal(f16, blocks[b"f16"])
    assert spare == b"untouched"


def test_get_into_too_small_cancels_stream(fake_server: FakeServer) -> None:
    with Client(fake_server.target, namespace="ns") as kv:
        kv.put({b"a": b"1" * 10, b"b": b"2" * (3 << 20), b"c": b"3"})
        bufs = [bytearray(10), bytearray(100), bytearray(1)]
        with pytest.raises(InvalidArgument, match=r"buffer #1 is 100 bytes .* 3145728 bytes"):
            kv.get_into([b"a", b"b", b"c"], bufs)
        assert bufs[0] == b"1" * 10
        assert fake_server.state.get_cancelled.wait(5)
        assert kv.get([b"c"]) == [b"3"]  # the channel still works


def test_lookup_delete_stats_events(fake_server: FakeServer) -> None:
    with Client(fake_server.target) as kv:
        kv.put({b"k0": b"0", b"k1": b"1", b"k3": b"3"}, namespace="ns")
        res = kv.lookup([b"k0", b"k1", b"k2", b"k3"], namespace="ns", lease_ms=500)
        assert res.found == 2
        assert res.tiers == [TierName.L1, TierName.L1, None, TierName.L1]
        assert kv.delete([b"k0", b"k2"], namespace="ns") == 1
        st = kv.stats()
        assert st.policy == "lru" and st.tiers[0].tier is TierName.L1 and st.tiers[0].blocks == 2
        kv.session_event("s1", TurnEnd(TurnEndReason.AWAITING_USER), namespace="ns")
        kv.turn_end("s1", "tool_call", 2000, "pytest", namespace="ns")
        kv.session_end("s1", namespace="ns")
    ev = fake_server.state.session_events
    assert [e.WhichOneof("event") for e in ev] == ["turn_end", "turn_end", "session_end"]
    assert ev[1].turn_end.reason == pb.TURN_END_REASON_TOOL_CALL
    assert (ev[1].turn_end.expected_gap_ms, ev[1].turn_end.tool_name) == (2000, "pytest")


def test_empty_calls_send_nothing(fake_server: FakeServer) -> None:
    with Client(fake_server.target, namespace="ns") as kv:
        assert kv.put({}) == PutResult(0, 0)
        assert kv.get([]) == []
        assert kv.get_into([], []) == []
        assert kv.lookup([]).found == 0
        assert kv.delete([]) == 0
    assert not fake_server.state.put_messages and not fake_server.state.get_requests


def test_client_side_validation_is_immediate(fake_server: FakeServer) -> None:
    with Client(fake_server.target) as kv:
        with pytest.raises(InvalidNamespace, match="required"):
            kv.put({b"k": b"v"})
        with pytest.raises(InvalidKey):
            kv.get([b"x" * 65], namespace="ns")
        with pytest.raises(InvalidArgument):
            kv.put({b"k": b"v"}, namespace="ns", ack="disk")
        with pytest.raises(InvalidArgument):
            kv.turn_end("s", "sleeping", namespace="ns")
        with pytest.raises(InvalidArgument):
            kv.session_event("", SessionEnd(), namespace="ns")
    assert not fake_server.state.put_messages
    with pytest.raises(InvalidNamespace):
        Client(fake_server.target, namespace="bad ns")


def test_server_errors_map_to_classes(fake_server: FakeServer) -> None:
    fake_server.state.fail["big"] = (grpc.StatusCode.INVALID_ARGUMENT, "BlockTooLarge",
                                     "block #0 is 9 bytes: max_block_bytes is 8")
    fake_server.state.fail["remote"] = (grpc.StatusCode.FAILED_PRECONDITION, None, "no L3")
    with Client(fake_server.target) as kv:
        with pytest.raises(BlockTooLarge, match="max_block_bytes is 8"):
            kv.put({b"k": b"123456789"}, namespace="big")
        with pytest.raises(BlockTooLarge):
            kv.get([b"k"], namespace="big")
        with pytest.raises(TierNotConfigured, match="no L3"):
            kv.lookup([b"k"], namespace="remote")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_failed_names_target() -> None:
    target = f"127.0.0.1:{_closed_port()}"
    with Client(target, namespace="ns", timeout=5) as kv:
        with pytest.raises(ConnectionFailed, match=target):
            kv.put({b"k": b"v"})
        with pytest.raises(ConnectionFailed, match=target):
            kv.get([b"k"])
        with pytest.raises(ConnectionFailed, match=target):
            kv.stats()


def test_unix_socket_target(tmp_path: Any) -> None:
    server = FakeServer(unix=str(tmp_path / "kv.sock"))
    try:
        for target in (f"unix:{tmp_path}/kv.sock", f"unix://{tmp_path}/kv.sock"):
            with Client(target, namespace="ns") as kv:
                kv.put({b"k": b"v"})
                assert kv.get([b"k"]) == [b"v"]
    finally:
        server.stop()


# --------------------------------------------------------------------------- asyncio


def test_async_client_roundtrip(fake_server: FakeServer) -> None:
    blocks = _blocks()

    async def main() -> None:
        async with AsyncClient(fake_server.target, namespace="ns") as kv:
            res = await kv.put(blocks, ack="memory")
            assert res.stored == 3
            out = await kv.get([b"big", b"nope"])
            assert out == [_as_bytes(blocks[b"big"]), None]
            buf = np.empty(2_500_000, dtype=np.uint8)
            assert await kv.get_into([b"big"], [buf]) == [2_500_000]
            assert np.array_equal(buf, blocks[b"big"])
            with pytest.raises(InvalidArgument, match="buffer #0"):
                await kv.get_into([b"big"], [bytearray(10)])
            assert (await kv.lookup([b"small", b"nope"])).tiers == [TierName.L1, None]
            assert await kv.delete([b"small"]) == 1
            assert (await kv.stats()).policy == "lru"
            await kv.turn_end("s", TurnEndReason.DONE)
            await kv.session_end("s")
            # concurrent calls share the channel
            results = await asyncio.gather(*(kv.get([b"f16"]) for _ in range(8)))
            assert all(r == [_as_bytes(blocks[b"f16"])] for r in results)

    asyncio.run(main())
    assert len(fake_server.state.session_events) == 2


def test_async_errors(fake_server: FakeServer) -> None:
    fake_server.state.fail["big"] = (grpc.StatusCode.INVALID_ARGUMENT, "BlockTooLarge", "too big")
    target = f"127.0.0.1:{_closed_port()}"

    async def main() -> None:
        async with AsyncClient(fake_server.target, namespace="big") as kv:
            with pytest.raises(BlockTooLarge, match="too big"):
                await kv.put({b"k": b"v"})
            with pytest.raises(BlockTooLarge):
                await kv.get([b"k"])
        async with AsyncClient(target, namespace="ns", timeout=5) as kv:
            with pytest.raises(ConnectionFailed, match=target):
                await kv.get([b"k"])
            with pytest.raises(ConnectionFailed, match=target):
                await kv.put({b"k": b"v"})

    asyncio.run(main())


# --------------------------------------------------------------------------- sync Put paths


def _put_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name == "kvstore-put-loop"]


def test_a_put_of_one_message_goes_on_the_sync_channel(fake_server: FakeServer) -> None:
    """One block of at most chunk_bytes is one message: the sync stream is
    quicker for it than the private loop (one thread hop fewer); a Put of
    more than one message starts the loop."""
    before = len(_put_threads())
    with Client(fake_server.target, namespace="ns", chunk_bytes=64 * 1024) as kv:
        assert kv.put({b"one": b"1" * 64 * 1024}) == PutResult(1, 64 * 1024)
        assert len(_put_threads()) == before
        assert kv.put({b"big": b"2" * (64 * 1024 + 1)}) == PutResult(1, 64 * 1024 + 1)
        assert len(_put_threads()) == before + 1
        assert kv.put({b"a": b"3", b"b": b"4"}) == PutResult(2, 2)
        assert kv.get([b"one", b"b"]) == [b"1" * 64 * 1024, b"4"]


@pytest.mark.parametrize("aio_put", [True, False])
def test_sync_put_paths_send_the_same_stream(fake_server: FakeServer, aio_put: bool) -> None:
    """Client.put through the private grpc.aio loop (default) or grpc's sync
    stream call: the same messages, results and errors."""
    before = len(_put_threads())
    blocks = _blocks()
    fake_server.state.fail["big"] = (grpc.StatusCode.INVALID_ARGUMENT, "BlockTooLarge",
                                     "block #0 is 9 bytes: max_block_bytes is 8")
    with Client(fake_server.target, namespace="ns", aio_put=aio_put) as kv:
        assert len(_put_threads()) == before  # nothing started before the first Put
        res = kv.put(blocks, session_id="s1", ack="local")
        assert res == PutResult(3, sum(len(_as_bytes(b)) for b in blocks.values()))
        assert len(_put_threads()) == before + int(aio_put)
        assert kv.get([b"big"]) == [_as_bytes(blocks[b"big"])]
        with pytest.raises(BlockTooLarge, match="max_block_bytes is 8"):
            kv.put({b"k": b"123456789"}, namespace="big")
        # Puts from several threads share the client (and its loop).
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda i: kv.put({f"t{i}".encode(): bytes(1000 + i)}),
                                 range(16)))
        assert all(r.stored == 1 for r in done)
    assert len(_put_threads()) == before  # close() stopped the loop
    msgs = fake_server.state.put_messages
    assert msgs[0].namespace == "ns" and msgs[0].ack == pb.ACK_LEVEL_LOCAL
    assert [len(m.data) for m in msgs[:4]] == [5, 1 << 20, 1 << 20, 2_500_000 - (2 << 20)]
    with pytest.raises(ValueError):
        kv.put({b"k": b"v"})
