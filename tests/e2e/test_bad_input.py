"""Bad input gets a precise status and message, the server stays up and no
stored block is lost. Raw stubs speak the proto directly (any-language
engines do), the SDK must raise the matching kvstore exception."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import AsyncClient, Client
from kvstore.errors import (
    BlockTooLarge,
    CapacityExhausted,
    InvalidArgument,
    InvalidKey,
    InvalidNamespace,
    KVStoreError,
    TierNotConfigured,
    UnknownNamespace,
)
from kvstore.wire.pb import kvstore_pb2 as pb
from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc

MiB = 1024**2


@pytest.fixture
def stub(shared_server) -> Iterator[pb_grpc.KVStoreStub]:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(shared_server.tcp) as channel:
        yield pb_grpc.KVStoreStub(channel)


def put_status(stub: pb_grpc.KVStoreStub, chunks: list[pb.PutChunk]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Put(iter(chunks), timeout=30)
    return info.value


def assert_still_serving(target: str) -> None:
    with Client(target, namespace="alive") as c:
        c.put({b"ping": b"pong"})
        assert c.get([b"ping"]) == [b"pong"]


def test_block_over_max_size_names_the_limit(stub: pb_grpc.KVStoreStub, shared_server) -> None:  # type: ignore[no-untyped-def]
    err = put_status(stub, [pb.PutChunk(namespace="bad", key=b"k", block_size=64 * MiB + 1)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "67108864" in err.details() and "max_block_bytes" in err.details()
    assert dict(err.trailing_metadata())["kvstore-error"] == "BlockTooLarge"
    assert_still_serving(shared_server.tcp)


def test_sdk_raises_block_too_large(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--server-max-block-bytes", "1MiB") as server, \
            Client(server.tcp, namespace="bad") as c:
        with pytest.raises(BlockTooLarge, match="1048576"):
            c.put({b"big": os.urandom(MiB + 1)})
        c.put({b"ok": os.urandom(MiB)})
        assert c.lookup([b"ok", b"big"]).found == 1


def test_a_put_refused_mid_stream_over_grpc_raises_its_class(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Over gRPC the server refuses a block while the client is still writing
    it: the SDK raises the server's class every time. (grpc.aio replaced the
    server's status with "Internal error from Core", INTERNAL, in about 1
    Put in 5: a KVStoreError no caller could act on.)"""
    with server_factory("--server-max-block-bytes", "1MiB") as server, \
            Client(server.tcp, namespace="bad", data_plane=False) as c:
        seen = []
        for _ in range(15):
            for size in (2 * MiB, 9 * MiB):
                with pytest.raises(KVStoreError) as refused:
                    c.put({b"ok": b"o" * 1000, b"big": bytes(size)})
                seen.append(type(refused.value).__name__)
        assert set(seen) == {"BlockTooLarge"}, seen
        assert c.get([b"ok"]) == [b"o" * 1000]  # the block before it was stored
        # Each Put went once: the server's status is read where grpc.aio set
        # it first (sending the Put again stored its first block twice, and
        # the server counted 65 Puts for 40).
        assert c.stats().puts == len(seen)


def test_an_async_put_refused_mid_stream_over_grpc_raises_its_class(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The same through AsyncClient (its own grpc.aio call: it raised a bare
    "Internal error from Core" for 2 to 16 Puts in 50)."""

    async def main(target: str) -> list[str]:
        seen = []
        async with AsyncClient(target, namespace="bad", data_plane=False) as c:
            for _ in range(15):
                for size in (2 * MiB, 9 * MiB):
                    with pytest.raises(KVStoreError) as refused:
                        await c.put({b"ok": b"o" * 1000, b"big": bytes(size)})
                    seen.append(type(refused.value).__name__)
            assert await c.get([b"ok"]) == [b"o" * 1000]
        return seen

    with server_factory("--server-max-block-bytes", "1MiB") as server:
        seen = asyncio.run(main(server.tcp))
    assert set(seen) == {"BlockTooLarge"}, seen


@pytest.mark.parametrize("key", [b"", b"k" * 65])
def test_bad_keys_are_invalid_argument(stub: pb_grpc.KVStoreStub, key: bytes) -> None:
    err = put_status(stub, [pb.PutChunk(namespace="bad", key=key, block_size=4, data=b"abcd")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key" in err.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Get(pb.GetRequest(namespace="bad", keys=[key]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Lookup(pb.LookupRequest(namespace="bad", keys=[b"fine", key]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key #1" in info.value.details()


def test_sdk_raises_invalid_key_and_namespace(shared_server) -> None:  # type: ignore[no-untyped-def]
    with Client(shared_server.tcp) as c:
        with pytest.raises(InvalidNamespace):
            c.get([b"k"])
        with pytest.raises(InvalidKey):
            c.get([b"x" * 65], namespace="bad")
        with pytest.raises(InvalidNamespace):
            c.get([b"k"], namespace="has/slash")


@pytest.mark.parametrize("namespace", ["", "bad/slash", "-leading", "x" * 129])
def test_missing_or_malformed_namespace(stub: pb_grpc.KVStoreStub, namespace: str) -> None:
    err = put_status(stub, [pb.PutChunk(namespace=namespace, key=b"k", block_size=1, data=b"a")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "namespace" in err.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Lookup(pb.LookupRequest(namespace=namespace, keys=[b"k"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_namespace_when_restricted(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--server-namespaces", "llama,qwen") as server, \
            Client(server.tcp) as c:
        c.put({b"k": b"v"}, namespace="llama")
        with pytest.raises(UnknownNamespace, match="'mistral'"):
            c.put({b"k": b"v"}, namespace="mistral")
        assert c.get([b"k"], namespace="llama") == [b"v"]


def test_ack_remote_without_l3_is_failed_precondition(shared_server) -> None:  # type: ignore[no-untyped-def]
    with Client(shared_server.tcp, namespace="bad") as c, \
            pytest.raises(TierNotConfigured, match="L3"):
        c.put({b"r": b"v"}, ack="remote")


def test_stream_ending_inside_a_block_stores_nothing_of_it(stub: pb_grpc.KVStoreStub) -> None:
    err = put_status(stub, [
        pb.PutChunk(namespace="trunc", key=b"whole", block_size=4, data=b"abcd"),
        pb.PutChunk(key=b"half", block_size=8, data=b"abcd"),
    ])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4 of 8 bytes" in err.details()
    res = stub.Lookup(pb.LookupRequest(namespace="trunc", keys=[b"whole", b"half"]), timeout=30)
    # The complete block before the broken one was stored.
    assert list(res.tiers) == [pb.TIER_L1, pb.TIER_UNSPECIFIED]


def test_more_bytes_than_declared_is_rejected(stub: pb_grpc.KVStoreStub) -> None:
    err = put_status(stub, [
        pb.PutChunk(namespace="over", key=b"k", block_size=4, data=b"abc"),
        pb.PutChunk(data=b"de"),
    ])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block #0: 5 bytes sent for a block declared as 4 bytes" in err.details()
    res = stub.Lookup(pb.LookupRequest(namespace="over", keys=[b"k"]), timeout=30)
    assert res.found == 0


def test_a_key_repeated_inside_a_block_says_so(stub: pb_grpc.KVStoreStub) -> None:
    """Only a block's first chunk carries its key and size: a later chunk of
    the same block that repeats the key is refused with what is wrong (it
    was told "block_size is 0"), and the block before it stays stored."""
    err = put_status(stub, [
        pb.PutChunk(namespace="rep", key=b"done", block_size=2, data=b"ok"),
        pb.PutChunk(key=b"k", block_size=4, data=b"ab"),
        pb.PutChunk(key=b"k", data=b"cd"),
    ])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block #1: a chunk names a key before the block is complete (2 of 4" \
        in err.details()
    res = stub.Lookup(pb.LookupRequest(namespace="rep", keys=[b"done", b"k"]), timeout=30)
    assert list(res.tiers) == [pb.TIER_L1, pb.TIER_UNSPECIFIED]


@pytest.mark.parametrize("later", [
    pb.PutChunk(namespace="tenant-b", key=b"x", block_size=2, data=b"xx"),
    pb.PutChunk(ack=pb.ACK_LEVEL_LOCAL, key=b"x", block_size=2, data=b"xx"),
    pb.PutChunk(key=b"x", block_size=4, data=b"xx", format=pb.BLOCK_FORMAT_RAW),
], ids=["namespace", "ack", "format"])
def test_a_later_message_naming_another_namespace_ack_or_format_is_refused(
        stub: pb_grpc.KVStoreStub, later: pb.PutChunk) -> None:
    """The stream's first message sets its namespace and ack, a block's first
    chunk its format. Later messages naming others were ignored and the Put
    answered OK: a block sent for another tenant's namespace went into the
    first one's, an ack=local block was acknowledged at memory."""
    chunks = [pb.PutChunk(namespace="tenant-a", key=b"first", block_size=2, data=b"ok"), later]
    if later.block_size == 4:  # the format: on the block's next chunk
        chunks.append(pb.PutChunk(data=b"yy", format=pb.BLOCK_FORMAT_KV_V1))
    err = put_status(stub, chunks)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "block #1" in err.details()
    for namespace, want in (("tenant-a", [pb.TIER_L1, pb.TIER_UNSPECIFIED]),
                            ("tenant-b", [pb.TIER_UNSPECIFIED, pb.TIER_UNSPECIFIED])):
        res = stub.Lookup(pb.LookupRequest(namespace=namespace, keys=[b"first", b"x"]),
                          timeout=30)
        assert list(res.tiers) == want, namespace
    # Repeating the first message's values is fine.
    stub.Put(iter([pb.PutChunk(namespace="tenant-c", ack=pb.ACK_LEVEL_MEMORY, key=b"a",
                               block_size=2, data=b"a"),
                   pb.PutChunk(namespace="tenant-c", ack=pb.ACK_LEVEL_MEMORY, data=b"b")]),
             timeout=30)


def test_a_size_repeated_inside_a_block_or_a_negative_ack_says_so(
        stub: pb_grpc.KVStoreStub) -> None:
    # They were told "block #1 starts before block #0 is complete" (no key
    # was sent) and "unknown acknowledgement level 18446744073709551615".
    err = put_status(stub, [pb.PutChunk(namespace="rep2", key=b"k", block_size=4, data=b"ab"),
                            pb.PutChunk(block_size=4, data=b"cd")])
    assert "block #0: a chunk sets block_size without a key" in err.details()
    err = put_status(stub, [pb.PutChunk(namespace="rep2", ack=-1, key=b"k", block_size=1)])
    assert err.details() == "unknown acknowledgement level -1"


def test_data_before_key_is_rejected(stub: pb_grpc.KVStoreStub) -> None:
    err = put_status(stub, [pb.PutChunk(namespace="order", data=b"orphan")])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_disconnect_mid_block_leaves_nothing_visible(shared_server) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(shared_server.tcp)
    stub = pb_grpc.KVStoreStub(channel)
    sent_half = threading.Event()

    def chunks() -> Iterator[pb.PutChunk]:
        yield pb.PutChunk(namespace="cut", key=b"done", block_size=MiB, data=b"d" * MiB)
        yield pb.PutChunk(key=b"partial", block_size=4 * MiB, data=b"p" * MiB)
        sent_half.set()
        # Block here until the call is cancelled: the server sees a broken stream.
        threading.Event().wait(30)
        yield pb.PutChunk(data=b"p" * MiB)

    future = stub.Put.future(chunks(), timeout=60)
    assert sent_half.wait(30)
    # Wait (bounded) until the server has taken the complete first block.
    with grpc.insecure_channel(shared_server.tcp) as probe_channel:
        probe = pb_grpc.KVStoreStub(probe_channel)
        for _ in range(500):
            if probe.Lookup(pb.LookupRequest(namespace="cut", keys=[b"done"])).found == 1:
                break
            time.sleep(0.01)
        future.cancel()
        channel.close()
        res = probe.Lookup(pb.LookupRequest(namespace="cut", keys=[b"done", b"partial"]))
        assert list(res.tiers) == [pb.TIER_L1, pb.TIER_UNSPECIFIED]
    assert_still_serving(shared_server.tcp)


def test_a_put_stalled_mid_block_gives_its_l1_room_back(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A client that sends a block's first chunk and then nothing holds that block's L1
    room only for server.put_idle_ms: then its stream fails DEADLINE_EXCEEDED, nothing
    of the block is visible, and another client's Put that needs the room succeeds."""
    with server_factory("--server-put-idle-ms", "500", l1_capacity="8MiB") as server, \
            grpc.insecure_channel(server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        release = threading.Event()

        def chunks() -> Iterator[pb.PutChunk]:
            yield pb.PutChunk(namespace="stall", key=b"stalled", block_size=6 * MiB,
                              data=b"s" * 1024)
            release.wait(60)  # silence, far longer than put_idle_ms

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(chunks(), timeout=60)
        release.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "server.put_idle_ms" in (info.value.details() or "")
        assert time.monotonic() - started < 30
        with Client(server.tcp, namespace="stall") as c:
            c.put({b"other": os.urandom(6 * MiB)})  # the room came back
            assert c.lookup([b"stalled", b"other"]).found == 0
            assert c.get([b"stalled"]) == [None]
            assert len(c.get([b"other"])[0] or b"") == 6 * MiB


def test_l1_full_of_leased_blocks_is_resource_exhausted(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(l1_capacity="8MiB") as server, Client(server.tcp, namespace="full") as c:
        keys = [f"b{i}".encode() for i in range(8)]
        c.put({k: os.urandom(MiB) for k in keys}, ack="local")
        assert c.lookup(keys, lease_ms=60_000).found == 8
        with pytest.raises(CapacityExhausted, match="L1 is full"):
            c.put({b"one-more": os.urandom(MiB)})
        # Nothing stored was lost, and the server still serves.
        assert all(v is not None for v in c.get(keys))
        assert c.lookup([b"one-more"]).found == 0


def test_lmdb_map_full_grows_silently(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--l2-initial-map-size", "2MiB", l1_capacity="8MiB") as server, \
            Client(server.tcp, namespace="grow") as c:
        blobs = {f"g{i}".encode(): os.urandom(MiB) for i in range(24)}
        for k, v in blobs.items():
            c.put({k: v}, ack="local")
        assert c.get(list(blobs)) == list(blobs.values())
        mdb = server.data_dir / "l2" / "data.mdb"
        assert mdb.stat().st_size > 20 * MiB


def test_names_the_server_keeps_are_bounded(shared_server) -> None:  # type: ignore[no-untyped-def]
    """Session ids, owners and tool names are kept by the server (per session,
    lease, tool): over 1,024 bytes they are INVALID_ARGUMENT, on gRPC and in the SDK."""
    long = "s" * 1025
    with grpc.insecure_channel(shared_server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        calls = [
            lambda: stub.Lookup(pb.LookupRequest(namespace="n", keys=[b"k"], session_id=long)),
            lambda: stub.GetSmall(pb.GetRequest(namespace="n", keys=[b"k"], session_id=long)),
            lambda: stub.Put(iter([pb.PutChunk(namespace="n", key=b"k", block_size=1,
                                               data=b"x", session_id=long)])),
            lambda: stub.SessionEvent(pb.SessionEventRequest(
                namespace="n", session_id=long, session_end=pb.SessionEnd())),
            lambda: stub.SessionEvent(pb.SessionEventRequest(
                namespace="n", session_id="s", turn_end=pb.TurnEnd(reason=1, tool_name=long))),
            lambda: stub.OpenDataPlane(pb.OpenDataPlaneRequest(namespace="n", shm_owner=long)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert "at most 1024" in (info.value.details() or "")
        ok = stub.Lookup(pb.LookupRequest(namespace="n", keys=[b"k"], session_id="s" * 1024))
        assert ok.found == 0
    with Client(shared_server.tcp, namespace="n") as c, \
            pytest.raises(InvalidArgument, match="at most 1024"):
        c.lookup([b"k"], session_id=long)
    assert_still_serving(shared_server.tcp)


def test_a_get_chunk_is_at_least_64_kib(shared_server) -> None:  # type: ignore[no-untyped-def]
    """max_chunk_bytes below 64 KiB is raised to it: a 1-byte chunk size would make
    one Get of a large block minutes of server CPU."""
    with Client(shared_server.tcp, namespace="chunks") as c:
        c.put({b"big": os.urandom(MiB)})
    with grpc.insecure_channel(shared_server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        chunks = list(stub.Get(pb.GetRequest(namespace="chunks", keys=[b"big"],
                                             max_chunk_bytes=1), timeout=30))
    assert len(chunks) == MiB // (64 * 1024)
    assert b"".join(ch.data for ch in chunks) and sum(len(ch.data) for ch in chunks) == MiB


@pytest.mark.parametrize("path", ["grpc", "data-plane", "shm"])
def test_a_block_larger_than_l2_is_refused(server_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           path: str) -> None:
    """ack=local keeps a block in L2: one larger than l2.capacity was
    acknowledged, evicted from L2 at once, and lost to the next kill. At
    ack=memory (an outside review), such a block was written to L2 and
    trimmed from it at once each time it was to leave L1: L1 evicted nothing
    more, and every later Put waited out its deadline."""
    from kvstore.client.shm import ShmClient

    shm = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}"
    with server_factory("--l2-capacity", "16KiB", "--l1-shm-path", shm,
                        l1_capacity="256KiB") as server:
        big, small = os.urandom(64 * 1024), os.urandom(8 * 1024)
        client = ShmClient(server.unix_target, namespace="l2", timeout=10) if path == "shm" \
            else Client(server.tcp, namespace="l2", data_plane=path == "data-plane", timeout=10)
        with client as c:
            with pytest.raises(BlockTooLarge, match=r"l2\.capacity"):
                c.put({b"small": small, b"big": big}, ack="local")
            assert c.put({b"small": small}, ack="local").stored == 1  # one that fits: kept
        server.kill()
        server.start()
        with Client(server.tcp, namespace="l2") as c:
            assert c.get([b"small"]) == [small]
        client = ShmClient(server.unix_target, namespace="l2", timeout=10) if path == "shm" \
            else Client(server.tcp, namespace="l2", data_plane=path == "data-plane", timeout=10)
        with client as c:
            with pytest.raises(BlockTooLarge, match=r"l2\.capacity"):
                c.put({b"big": big}, ack="memory")
            # L1 (256 KiB) goes on making room: 1 MiB of blocks that fit L2.
            for i in range(128):
                assert c.put({b"f%03d" % i: os.urandom(8 * 1024)}).stored == 1
            assert c.get([b"big"]) == [None]
