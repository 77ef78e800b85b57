"""A data-plane peer that does not speak this client's protocol version.

A server answers a frame whose magic or version it does not know with an ERROR
frame whose request id is 0 (nothing else in such a header is trusted) and
flag CLOSING, naming the problem ("protocol version 2 is not supported (this
side speaks 1)"; docs/dataplane.md, "ERROR"). That is what a client of
another protocol version meets during a rolling upgrade: the SDK must raise
the server's error, not report an answer to the wrong request and lose the
message that names the version. Peers here are emulated on a socket pair.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from peers import recv_exactly

from kvstore.client.aio_dataplane import AioConnection
from kvstore.client.dataplane import Connection
from kvstore.dataplane import frames
from kvstore.dataplane.frames import FLAG_CLOSING, HEADER, HEADER_SIZE, MAGIC, Op
from kvstore.errors import MalformedRequest

_MESSAGE = "malformed frame: protocol version 1 is not supported (this side speaks 2)"


def _refusing_peer(sock: socket.socket) -> None:
    """Reads one request, answers as a server of another version does (request
    id 0, CLOSING; the error frame in that server's own version, 2, would fail
    the header check first, so the frame says 1 as a server that still speaks
    it for its errors does), then closes."""
    head = recv_exactly(sock, HEADER_SIZE)
    meta_len = HEADER.unpack(head)[5]
    recv_exactly(sock, meta_len)
    meta = frames.ErrorInfo(frames.STATUS_CODES["INVALID_ARGUMENT"], "MalformedRequest",
                            _MESSAGE).encode()
    sock.sendall(HEADER.pack(MAGIC, frames.VERSION, Op.ERROR, FLAG_CLOSING, 0, len(meta), 0)
                 + meta)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("when", ["hello", "mid-session"])
def test_sync_refused_for_its_version_raises_the_servers_error(
        pair: tuple[socket.socket, socket.socket], when: str) -> None:
    a, b = pair
    peer = threading.Thread(target=_refusing_peer, args=(b,))
    peer.start()
    try:
        conn = Connection(a, "test-peer", 10.0)
        with pytest.raises(MalformedRequest, match="protocol version 1 is not supported"):
            if when == "hello":
                conn.hello(b"t" * 32)
            else:
                conn.response(conn.send(Op.PING, b""), Op.PING)
        assert conn.broken  # CLOSING: never used again
    finally:
        peer.join(30)


def test_async_hello_refused_for_its_version_raises_the_servers_error(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair

    async def main() -> AioConnection:
        loop = asyncio.get_running_loop()
        a.setblocking(False)
        conn = AioConnection(loop, a, "test-peer", 10.0, lambda c: None)
        try:
            with pytest.raises(MalformedRequest, match="protocol version 1 is not supported"):
                await conn.request(Op.HELLO, frames.Hello(b"t" * 32).encode())
        finally:
            conn.close()
        return conn

    peer = threading.Thread(target=_refusing_peer, args=(b,))
    peer.start()
    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        peer.join(30)
