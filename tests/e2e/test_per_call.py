"""Per-call cost: the unary GetSmall, and no thread started per call by the
sync client, against a real server (127.0.0.1 and a unix socket)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvstore import AsyncClient, Client
from kvstore.client.shm import ShmClient
from kvstore.wire.pb import kvstore_pb2 as pb

MiB = 1024**2


def ns(request: pytest.FixtureRequest) -> str:
    return "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:100]


def block(i: int, size: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (size // 32 + 1))[:size]


# A client that accepts messages of 3 MiB at most: GetSmall answers up to
# 3 MiB - 64 KiB of blocks per response, and the rest goes by the stream.
SMALL_LIMIT = {"grpc.max_receive_message_length": 3 * MiB}
SIZES = [MiB, 2 * MiB + 5, 1000, 700 * 1024]


def test_get_answers_what_fits_one_message_and_streams_the_rest(
        target: str, request: pytest.FixtureRequest) -> None:
    blocks = {f"k{i}".encode(): block(i, n) for i, n in enumerate(SIZES)}
    keys = [b"k0", b"k1", b"missing", b"k2", b"k3"]
    want = [blocks[b"k0"], blocks[b"k1"], None, blocks[b"k2"], blocks[b"k3"]]
    with Client(target, namespace=ns(request), options=SMALL_LIMIT) as c:
        c.put(blocks)
        assert c.get(keys) == want  # k0 by GetSmall, k1 on by the stream
        assert c.get(keys[2:]) == want[2:]  # more than 2 MiB expected: a stream
        assert c.get([b"k1"]) == [blocks[b"k1"]]  # larger than one response
        outs = [np.zeros(3 * MiB, dtype=np.uint8) for _ in keys]
        sizes = c.get_into(keys, outs)
        assert sizes == [None if w is None else len(w) for w in want]
        for w, out in zip(want, outs, strict=True):
            if w is not None:
                assert out[: len(w)].tobytes() == w


def test_async_client_get_small_and_the_rest(target: str, request: pytest.FixtureRequest) -> None:
    blocks = {f"k{i}".encode(): block(i, n) for i, n in enumerate(SIZES)}
    keys = [b"k3", b"k1", b"nope", b"k0"]

    async def run() -> list[bytes | None]:
        async with AsyncClient(target, namespace=ns(request), options=SMALL_LIMIT) as c:
            await c.put(blocks)
            first = await c.get(keys)
            assert first == await c.get(keys)
            return first

    assert asyncio.run(run()) == [blocks[b"k3"], blocks[b"k1"], None, blocks[b"k0"]]


def test_get_small_response_is_a_get_small_response(
        shared_server, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    namespace = ns(request)
    with Client(shared_server.tcp, namespace=namespace) as c:
        c.put({b"a": block(1, 3000), b"b": block(2, 5000)})
    with grpc.insecure_channel(shared_server.tcp) as ch:
        rpc = ch.unary_unary("/kvstore.v1.KVStore/GetSmall",
                             request_serializer=pb.GetRequest.SerializeToString,
                             response_deserializer=pb.GetSmallResponse.FromString)
        resp = rpc(pb.GetRequest(namespace=namespace, keys=[b"a", b"x", b"b"]))
        assert resp.answered == 3
        assert [(ch.index, ch.hit, ch.block_size, ch.offset) for ch in resp.chunks] == [
            (0, True, 3000, 0), (1, False, 0, 0), (2, True, 5000, 0)]
        assert resp.chunks[0].data == block(1, 3000) and resp.chunks[2].data == block(2, 5000)
        # Room for the first block only: the rest is left to a Get stream.
        resp = rpc(pb.GetRequest(namespace=namespace, keys=[b"a", b"b"],
                                 max_response_bytes=4000))
        assert resp.answered == 1 and len(resp.chunks) == 1
        resp = rpc(pb.GetRequest(namespace=namespace, keys=[b"b"], max_response_bytes=4000))
        assert resp.answered == 0 and not resp.chunks


@pytest.fixture
def shm_server(server_factory, tmp_path: Path) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}"
    with server_factory("--l1-shm-path", path, l1_capacity="64MiB") as server:
        yield server


class _ThreadStarts:
    """Counts threads started while it is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        start = threading.Thread.start

        def counting_start(thread: threading.Thread) -> None:
            self.count += 1
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", counting_start)


def test_sync_calls_start_no_thread_per_call(shm_server, monkeypatch: pytest.MonkeyPatch,
                                             request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    namespace = ns(request)
    data = block(7, MiB)
    out = [np.zeros(MiB, dtype=np.uint8)]
    with Client(shm_server.tcp, namespace=namespace) as small, \
            Client(shm_server.tcp, namespace=namespace, unary_get=False) as streamed, \
            ShmClient(shm_server.unix_target, namespace=namespace) as shm:
        small.put({b"k": data})  # starts the client's one Put loop thread
        shm.put({b"s": data})
        threads = _ThreadStarts(monkeypatch)
        for _ in range(10):
            assert small.get([b"k"]) == [data]  # GetSmall
            assert streamed.get([b"k", b"nope"]) == [data, None]  # a Get stream
            assert streamed.get_into([b"k"], out) == [MiB]
            assert shm.put({b"s": data}).stored == 1  # ShmReserve + ShmCommit
            assert shm.get([b"s"]) == [data]
        assert threads.count == 0


def test_get_small_without_a_limit_fits_a_stock_grpc_client(
        shared_server, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    """A client written from the proto alone, on a channel with gRPC's
    default 4 MiB receive limit, sends no max_response_bytes: the answer
    fits that limit (the rest is left to a Get stream), it is not refused."""
    namespace = ns(request)
    blocks = {b"a": block(1, 3 << 20), b"b": block(2, 3 << 20)}
    with Client(shared_server.tcp, namespace=namespace) as c:
        c.put(blocks)
    with grpc.insecure_channel(shared_server.tcp) as ch:  # stock options
        rpc = ch.unary_unary("/kvstore.v1.KVStore/GetSmall",
                             request_serializer=pb.GetRequest.SerializeToString,
                             response_deserializer=pb.GetSmallResponse.FromString)
        resp = rpc(pb.GetRequest(namespace=namespace, keys=[b"a", b"b"]))
        assert resp.answered == 1 and resp.chunks[0].data == blocks[b"a"]
    # A client that says it takes more gets more, up to the server's limit.
    with grpc.insecure_channel(shared_server.tcp, options=[
            ("grpc.max_receive_message_length", 16 << 20)]) as ch:
        big = ch.unary_unary("/kvstore.v1.KVStore/GetSmall",
                             request_serializer=pb.GetRequest.SerializeToString,
                             response_deserializer=pb.GetSmallResponse.FromString)
        resp = big(pb.GetRequest(namespace=namespace, keys=[b"a", b"b"],
                                 max_response_bytes=16 << 20))
        assert resp.answered == 2 and [c.data for c in resp.chunks] == list(blocks.values())


def test_get_small_counts_misses_against_the_response_limit(
        shared_server, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    """Each miss takes a few bytes of the answer too: 65,535 misses before a
    block that nearly fills the default limit still fit a stock client (the
    answer was 4.5 MB, refused), and an explicit max_response_bytes is never
    exceeded; what did not fit is left to a Get stream (answered says where)."""
    namespace = ns(request)
    near = (4 << 20) - (64 << 10) - 4096
    blob = block(3, near)
    with Client(shared_server.tcp, namespace=namespace) as c:
        c.put({b"hit": blob, b"small": block(4, 1 << 20)})
    misses = [b"m%d" % i for i in range(65_535)]
    with grpc.insecure_channel(shared_server.tcp) as ch:  # stock options
        rpc = ch.unary_unary("/kvstore.v1.KVStore/GetSmall",
                             request_serializer=pb.GetRequest.SerializeToString,
                             response_deserializer=pb.GetSmallResponse.FromString)
        resp = rpc(pb.GetRequest(namespace=namespace, keys=[*misses, b"hit"]))
        assert resp.answered == len(misses)  # every miss, not the block that no longer fits
        assert not any(chunk.hit for chunk in resp.chunks)
        limit = 1 << 20
        resp = rpc(pb.GetRequest(namespace=namespace, keys=[*misses[:20_000], b"small"],
                                 max_response_bytes=limit))
        assert resp.ByteSize() <= limit
        assert resp.answered == 20_000
        only_misses = rpc(pb.GetRequest(namespace=namespace, keys=misses[:20_000],
                                        max_response_bytes=64 << 10))
        assert only_misses.ByteSize() <= 64 << 10
        assert 0 < only_misses.answered < 20_000


def test_a_client_gone_before_its_get_small_answer_logs_no_error(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A unary answer the client no longer takes (cancelled, past its
    deadline, refused as over its receive limit) is the client's doing: the
    server logs no ERROR and no traceback for it (grpc.aio logged both, once
    per call: any client could flood the log), one WARNING a minute at most,
    and stays up."""
    server = server_factory().start()
    blocks = {f"b{i}".encode(): block(i, 1 << 20) for i in range(3)}
    with Client(server.tcp, namespace="default") as c:
        c.put(blocks)
    keys = list(blocks)
    with grpc.insecure_channel(server.tcp) as ch:
        rpc = ch.unary_unary("/kvstore.v1.KVStore/GetSmall",
                             request_serializer=pb.GetRequest.SerializeToString,
                             response_deserializer=pb.GetSmallResponse.FromString)
        gone = 0
        for i in range(30):
            try:
                rpc(pb.GetRequest(namespace="default", keys=keys), timeout=0.001 * (1 + i % 10))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                gone += 1
            future = rpc.future(pb.GetRequest(namespace="default", keys=keys))
            future.cancel()
        with grpc.insecure_channel(server.tcp, options=[
                ("grpc.max_receive_message_length", 1 << 20)]) as small:
            refuse = small.unary_unary("/kvstore.v1.KVStore/GetSmall",
                                       request_serializer=pb.GetRequest.SerializeToString,
                                       response_deserializer=pb.GetSmallResponse.FromString)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    refuse(pb.GetRequest(namespace="default", keys=keys,
                                         max_response_bytes=4 << 20))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert gone > 0
        answer = rpc(pb.GetRequest(namespace="default", keys=keys[:1]))
        assert answer.answered == 1 and answer.chunks[0].data == blocks[b"b0"]
    assert server.terminate() == 0
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    # At most one line says it happened (tests/unit/test_logs.py), not one per call.
    said = [line for line in log.splitlines() if "an answer could not be sent" in line]
    assert len(said) <= 1 and all("/kvstore.v1.KVStore/GetSmall" in line for line in said)
