"""Requests the server cannot use end with a short INVALID_ARGUMENT and the
``kvstore-error`` trailer, and calls the client gives up on end quietly: in
both cases the log stays small and the server keeps serving.

Raw channels send bytes as they are (no stub serialises them), as a buggy
or foreign engine would."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from serverproc import ServerProcess

from kvstore import Client
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

MiB = 1024**2
SERVICE = "/kvstore.v1.KVStore/"
UNARY = ["Lookup", "Delete", "Stats", "SessionEvent", "ShmAttach", "ShmReserve", "ShmCommit",
         "ShmAcquire", "ShmRelease"]
GARBAGE = [
    b"\xff\xff\xff",        # a tag whose varint never ends
    b"\x0a\x05ab",          # field 1, length 5, but 2 bytes follow
    b"\x08\x96\x01\x13",    # a valid field, then a start-group tag with no end
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of our own, so its log holds only what these tests caused."""
    with ServerProcess(tmp_path_factory.mktemp("edge-requests"),
                       env={"KVSTORE_LOG_LEVEL": "INFO"}) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.tcp) as ch:
        yield ch


def call_raw(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError:
    """Send ``body`` as the request of ``method``; return the failure."""
    with pytest.raises(grpc.RpcError) as info:
        if method == "Get":
            list(channel.unary_stream(SERVICE + method)(body, timeout=30))
        else:
            channel.unary_unary(SERVICE + method)(body, timeout=30)
    return info.value


def assert_malformed(err: grpc.RpcError, method: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert dict(err.trailing_metadata() or ())["kvstore-error"] == "MalformedRequest"
    assert f"kvstore.v1.{method}Request" in err.details()
    assert len(err.details()) < 200


def assert_still_serving(target: str) -> None:
    with Client(target, namespace="alive") as c:
        c.put({b"ping": b"pong"})
        assert c.get([b"ping"]) == [b"pong"]


def log_size(server: ServerProcess) -> int:
    return server.log_path.stat().st_size


def test_undecodable_bodies_are_invalid_argument_with_a_small_log(
        server: ServerProcess, channel: grpc.Channel) -> None:
    before = log_size(server)
    for method in ["Get", *UNARY]:
        for body in GARBAGE:
            for _ in range(10):  # a misbehaving client repeats itself
                assert_malformed(call_raw(channel, method, body), method)
    assert_still_serving(server.tcp)
    grown = server.log_path.read_bytes()[before:].decode(errors="replace")
    # 300 bad requests: at most a rate-limited line, never a traceback each.
    assert "Traceback" not in grown
    assert len(grown) < 600, grown


def bad_utf8(message: bytes, field: int) -> bytes:
    """``message`` plus string field ``field`` holding bytes that are not UTF-8."""
    return message + bytes([field << 3 | 2, 2]) + b"\xc3\x28"


@pytest.mark.parametrize("method, body", [
    ("Lookup", bad_utf8(pb.LookupRequest(keys=[b"k"]).SerializeToString(), 1)),
    ("Get", bad_utf8(pb.GetRequest(keys=[b"k"]).SerializeToString(), 1)),
    ("Get", bad_utf8(pb.GetRequest(namespace="ns", keys=[b"k"]).SerializeToString(), 3)),
    ("SessionEvent", bad_utf8(pb.SessionEventRequest(namespace="ns").SerializeToString(), 2)),
])
def test_invalid_utf8_in_a_string_field_is_invalid_argument(
        server: ServerProcess, channel: grpc.Channel, method: str, body: bytes) -> None:
    err = call_raw(channel, method, body)
    assert_malformed(err, method)
    # The wording is the protobuf runtime's (upb names UTF-8, the 5.x runtime
    # only "Error parsing"); what a client relies on is the status and the name.
    assert f"{method}Request" in err.details()
    assert_still_serving(server.tcp)


def test_invalid_utf8_namespace_in_put_is_invalid_argument(channel: grpc.Channel) -> None:
    put = channel.stream_unary(SERVICE + "Put")
    body = bad_utf8(pb.PutChunk(key=b"k", block_size=1, data=b"x").SerializeToString(), 1)
    with pytest.raises(grpc.RpcError) as info:
        put(iter([body]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata() or ())["kvstore-error"] == "MalformedRequest"
    assert "UTF-8" in info.value.details()


def test_an_empty_block_is_invalid_argument_and_earlier_blocks_stay(
        channel: grpc.Channel) -> None:
    stub = pb_grpc.KVStoreStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Put(iter([
            pb.PutChunk(namespace="empty", key=b"whole", block_size=3, data=b"abc"),
            pb.PutChunk(key=b"nothing", block_size=0),
        ]), timeout=30)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.trailing_metadata() or ())["kvstore-error"] == "MalformedRequest"
    assert "block #1" in err.details() and "empty blocks cannot be stored" in err.details()
    res = stub.Lookup(pb.LookupRequest(namespace="empty", keys=[b"whole", b"nothing"]),
                      timeout=30)
    assert list(res.tiers) == [pb.TIER_L1, pb.TIER_UNSPECIFIED]


# --------------------------------------------------------------------- cancellation


def json_records(path: Path) -> list[dict[str, object]]:
    """The log's complete lines (the last one may be half written as it is read)."""
    out = []
    for line in path.read_text(errors="replace").split("\n")[:-1]:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"level": "NOT-JSON", "message": line})
    return out


def test_cancelling_a_get_mid_stream_logs_nothing_above_debug(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--log-format", "json", env={"KVSTORE_LOG_LEVEL": "DEBUG"})
    server.start()
    blocks = {b"big-a": os.urandom(16 * MiB), b"big-b": os.urandom(16 * MiB)}
    with Client(server.tcp, namespace="cancel") as c:
        c.put(blocks)
    started = len(json_records(server.log_path))
    cancels = 12
    with grpc.insecure_channel(server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for _ in range(cancels):
            stream = stub.Get(pb.GetRequest(namespace="cancel", keys=list(blocks),
                                            max_chunk_bytes=64 * 1024), timeout=30)
            first = next(stream)
            assert first.hit and first.block_size == 16 * MiB
            stream.cancel()
    # Every cancelled Get ends with the server's DEBUG line saying so
    # (bounded wait: the server notices the cancels asynchronously).
    deadline = time.monotonic() + 20
    while True:
        records = json_records(server.log_path)[started:]
        ended = sum("cancelled by the client" in str(r.get("message")) for r in records)
        if ended >= cancels or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling the log with a deadline, not synchronisation by sleep
    loud = [r for r in records if r.get("level") != "DEBUG"]
    assert not loud, loud[:3]
    assert ended == cancels
    with Client(server.tcp, namespace="cancel") as c:
        assert c.get(list(blocks)) == list(blocks.values())
