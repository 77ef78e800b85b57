"""The channel settings engines turn on (docs/protocol.md, "Client settings"),
from raw stubs over TCP and the unix socket: keepalive pings as Go, Java and
C++ engines send them, compressed messages, a compressed message that would
inflate past the server's limit."""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.wire.pb import kvstore_pb2 as pb
from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc

MiB = 1024**2

#: What engines set: a ping every second (the busiest common setting), also
#: on an idle channel, with no cap on pings between data frames.
ENGINE_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A connection of its own: the test's other channels send no data on it.
    ("grpc.use_local_subchannel_pool", 1),
]
#: Long enough for gRPC's default server policy to have ended the connection
#: twice over (it did after 3 s: the third ping within 5 minutes).
OPEN_SECONDS = 7.0


def read_all(stub: pb_grpc.KVStoreStub, namespace: str, keys: list[bytes],
             **kw: object) -> dict[int, bytes]:
    blocks: dict[int, bytearray] = {}
    for chunk in stub.Get(pb.GetRequest(namespace=namespace, keys=keys), timeout=30, **kw):
        if chunk.hit:
            blocks.setdefault(chunk.index, bytearray()).extend(chunk.data)
    return {i: bytes(b) for i, b in blocks.items()}


def put_chunks(namespace: str, key: bytes, data: bytes,
               chunk: int = MiB) -> Iterator[pb.PutChunk]:
    for offset in range(0, len(data), chunk):
        message = pb.PutChunk(data=data[offset:offset + chunk])
        if offset == 0:
            message.namespace, message.key, message.block_size = namespace, key, len(data)
        yield message


def test_keepalive_pings_every_second_keep_streams_and_channels(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A health Watch (a call that sees no data) and a Put stream that stays open
    between blocks, on channels pinging every second: neither is cut with
    UNAVAILABLE "Too many pings", and the idle channel stays connected."""
    with server_factory() as server:
        outcomes: dict[str, object] = {}
        watch_ended = threading.Event()

        def watch(target: str, name: str) -> None:
            with grpc.insecure_channel(target, options=ENGINE_KEEPALIVE) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                replies = health.Watch(health_pb2.HealthCheckRequest(service=""),
                                       timeout=OPEN_SECONDS)
                try:
                    for reply in replies:
                        outcomes[f"{name} status"] = reply.status
                except grpc.RpcError as err:
                    outcomes[f"{name} watch"] = (err.code(), err.details())

        def put(target: str, name: str) -> None:
            def stream() -> Iterator[pb.PutChunk]:
                yield pb.PutChunk(namespace="ka", key=f"{name}-1".encode(), block_size=3,
                                  data=b"one")
                # The engine keeps its stream open between blocks.
                watch_ended.wait(OPEN_SECONDS + 30)
                yield pb.PutChunk(key=f"{name}-2".encode(), block_size=3, data=b"two")

            with grpc.insecure_channel(target, options=ENGINE_KEEPALIVE) as channel:
                try:
                    reply = pb_grpc.KVStoreStub(channel).Put(stream(), timeout=OPEN_SECONDS + 60)
                    outcomes[f"{name} put"] = reply.stored
                except grpc.RpcError as err:
                    outcomes[f"{name} put"] = (err.code(), err.details())

        def idle(target: str, name: str) -> None:
            states: list[grpc.ChannelConnectivity] = []
            with grpc.insecure_channel(target, options=ENGINE_KEEPALIVE) as channel:
                channel.subscribe(states.append)
                pb_grpc.KVStoreStub(channel).Stats(pb.StatsRequest(), timeout=10)
                watch_ended.wait(OPEN_SECONDS + 30)
                outcomes[f"{name} idle"] = states[-1]
                channel.unsubscribe(states.append)

        targets = {"tcp": server.tcp, "unix": server.unix_target}
        watchers = [threading.Thread(target=watch, args=(t, n)) for n, t in targets.items()]
        others = [threading.Thread(target=f, args=(t, n))
                  for n, t in targets.items() for f in (put, idle)]
        for thread in (*watchers, *others):
            thread.start()
        for thread in watchers:
            thread.join(OPEN_SECONDS + 30)
        watch_ended.set()
        for thread in others:
            thread.join(60)
        for name in targets:
            assert outcomes.get(f"{name} status") == health_pb2.HealthCheckResponse.SERVING
            code, _ = outcomes[f"{name} watch"]  # type: ignore[misc]
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, outcomes  # open until its deadline
            assert outcomes[f"{name} put"] == 2, outcomes
            assert outcomes[f"{name} idle"] == grpc.ChannelConnectivity.READY, outcomes


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate],
                         ids=["gzip", "deflate"])
def test_compressed_puts_and_gets_are_byte_exact(server_factory, compression) -> None:  # type: ignore[no-untyped-def]
    """Compression on the channel or per call: blocks land byte for byte, and the
    size checks see the decompressed bytes."""
    with server_factory() as server:
        for target in (server.tcp, server.unix_target):
            blocks = {b"random": os.urandom(3 * MiB), b"zeros": bytes(5 * MiB),
                      b"text": b"kv-cache " * 100_001}
            with grpc.insecure_channel(target, compression=compression) as channel:
                stub = pb_grpc.KVStoreStub(channel)
                for key, data in blocks.items():
                    assert stub.Put(put_chunks("z", key, data), timeout=30).bytes == len(data)
                assert read_all(stub, "z", list(blocks)) == dict(enumerate(blocks.values()))
            with grpc.insecure_channel(target) as channel:  # per call
                stub = pb_grpc.KVStoreStub(channel)
                stub.Put(put_chunks("z", b"per-call", bytes(2 * MiB)), timeout=30,
                         compression=compression)
                assert read_all(stub, "z", [b"per-call"], compression=compression) == \
                    {0: bytes(2 * MiB)}
                # 1,000 bytes declared, 2,000 sent (a few dozen on the wire).
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Put(iter([pb.PutChunk(namespace="z", key=b"short", block_size=1000,
                                               data=bytes(2000))]),
                             timeout=10, compression=compression)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "2000 bytes sent for a block declared as 1000" in refused.value.details()


def test_a_compressed_message_cannot_inflate_past_the_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    """256 MiB of zeros is 254 KiB gzipped: the server refuses it against its
    8 MiB message limit as it inflates, stores nothing and stays up."""
    size = 256 * MiB
    assert len(zlib.compress(bytes(size))) < 300 * 1024
    with server_factory() as server:
        rss_before = server.rss_bytes()
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(server.tcp, compression=grpc.Compression.Gzip,
                                   options=options) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Put(iter([pb.PutChunk(namespace="z", key=b"bomb", block_size=size,
                                           data=bytes(size))]), timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in refused.value.details()
            assert server.alive()
            assert stub.Lookup(pb.LookupRequest(namespace="z", keys=[b"bomb"]),
                               timeout=10).found == 0
        assert server.rss_bytes() - rss_before < 64 * MiB
