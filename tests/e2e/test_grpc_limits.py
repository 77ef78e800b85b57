"""What one client's open connections and calls can make the gRPC server
hold (found by a review of what tenants share): connections past
server.max_connections are closed as they are accepted, calls past
server.max_calls are refused at once, and a Put stream that sends nothing
ends after server.put_idle_ms. Each once held the server past its memory
bound (60,000 silent Put streams: 420 MB; 20,000 idle connections ran it out
of file descriptors, and L3 reads failed "Too many open files")."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import Client
from kvstore.errors import ConnectionFailed
from kvstore.wire.pb import kvstore_pb2 as pb
from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc

#: An HTTP/2 client preface and an empty SETTINGS frame: a connection that
#: asks for nothing.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_peer(socks: list[socket.socket], enough: int, timeout: float) -> int:
    """How many of ``socks`` the server has closed, waiting up to ``timeout``
    for ``enough`` of them (it sends its SETTINGS to a connection it keeps,
    and nothing more)."""
    open_ = {s.fileno(): s for s in socks}
    closed = 0
    deadline = time.monotonic() + timeout
    while open_ and closed < enough and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_), [], [], 0.1)
        for fd in ready:
            try:
                data = open_[fd].recv(65536)
            except OSError:
                data = b""
            if not data:
                closed += 1
                del open_[fd]
    return closed


def test_connections_past_the_limit_are_closed_and_the_rest_serve(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--server-max-connections", "8", "--server-data-plane", "false") \
            as server:
        host, _, port = server.tcp.rpartition(":")
        before = open_fds(server.pid)
        flood = []
        try:
            for _ in range(40):
                sock = socket.create_connection((host, int(port)), timeout=10)
                sock.sendall(PREFACE)
                flood.append(sock)
            closed = closed_by_peer(flood, 32, 15.0)
            assert closed == 32, f"{closed} of 40 connections closed past the limit of 8"
            held = open_fds(server.pid) - before
            assert held < 24, f"the server holds {held} more descriptors (40 connections)"
        finally:
            for sock in flood:
                sock.close()
        # Room again once the server has seen the 8 it held close (it learns
        # that on its own time: a client connecting at once can still be one
        # past the limit, seen in CI with two pytest workers).
        deadline = time.monotonic() + 15
        while True:
            try:
                with Client(server.tcp, namespace="n", timeout=10) as c:
                    c.put({b"k": b"v"})
                    assert c.get([b"k"]) == [b"v"]
                break
            except ConnectionFailed:
                assert time.monotonic() < deadline, "no room 15 s after the flood closed"
                time.sleep(0.1)  # a bounded retry, not synchronisation


def test_calls_past_a_caller_s_share_are_refused_and_the_probes_still_answer(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """server.max_calls 16, auth on: one identity holds its half (8 silent Put
    streams); its next call is refused at once, the health check (what the
    orchestrator's probes call) answers, and another identity's calls are
    served. (grpc's own limit counted the probes: one tenant holding every
    call failed them, and the server was restarted.)"""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvstore.server.auth import hash_token

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{hash_token('tok-a')} a n\n{hash_token('tok-b')} b n\n")
    with server_factory("--server-max-calls", "16", "--server-data-plane", "false",
                        "--auth-tokens-file", str(tokens)) \
            as server, grpc.insecure_channel(server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        auth_a = (("authorization", "Bearer tok-a"),)
        release = threading.Event()

        def silent() -> Iterator[pb.PutChunk]:
            release.wait(60)
            return
            yield  # (a generator that sends nothing until released)

        def hold() -> grpc.Future:
            return stub.Put.future(silent(), timeout=60, metadata=auth_a)

        held = [hold() for _ in range(8)]
        started = list(held)
        try:
            deadline = time.monotonic() + 15
            refused = None
            while refused is None and time.monotonic() < deadline:
                # The server starts a channel's calls in no set order: a probe
                # that got there before a held call took its place, and the
                # held call was refused (1 run in ~30). Hold another instead.
                for i, f in enumerate(held):
                    if f.done():
                        held[i] = hold()
                        started.append(held[i])
                try:
                    stub.Put(iter([pb.PutChunk(namespace="n", key=b"k", block_size=1,
                                               data=b"v")]), timeout=10, metadata=auth_a)
                except grpc.RpcError as err:
                    refused = err
            assert refused is not None, "the 9th call of the identity was not refused"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "its share" in (refused.details() or "")
            with grpc.insecure_channel(server.tcp) as probe:
                answer = health_pb2_grpc.HealthStub(probe).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with Client(server.tcp, namespace="n", token="tok-b") as other:  # another identity
                other.put({b"k": b"v"})
                assert other.get([b"k"]) == [b"v"]
        finally:
            release.set()
            for f in started:  # (they end as an empty Put: namespace required)
                f.exception(timeout=30)


def test_a_put_stream_that_sends_nothing_ends_after_put_idle(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--server-put-idle-ms", "500", "--server-data-plane", "false") \
            as server, grpc.insecure_channel(server.tcp) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        release = threading.Event()

        def one_block_then_silence() -> Iterator[pb.PutChunk]:
            yield pb.PutChunk(namespace="n", key=b"first", block_size=5, data=b"first")
            release.wait(60)

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(one_block_then_silence(), timeout=60)
        release.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no message for 0.5 s after 1 blocks (server.put_idle_ms)" in \
            (info.value.details() or "")
        assert time.monotonic() - started < 30
        with Client(server.tcp, namespace="n") as c:
            assert c.get([b"first"]) == [b"first"]  # the block before was stored


def test_a_low_open_files_limit_for_the_connection_limits_is_said(tmp_path: Path) -> None:
    """(the preflight's warning; a unit check of its arithmetic)"""
    from kvstore.config import load
    from kvstore.server import preflight

    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_SERVER_MAX_CONNECTIONS":
                       "100000"})
    said = preflight.open_files_shortfall(config, limit=4096)
    assert said is not None and "server.max_connections" in said
    assert preflight.open_files_shortfall(config, limit=1 << 20) is None
