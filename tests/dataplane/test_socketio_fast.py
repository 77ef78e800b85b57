"""SocketIO's answers from the readable callback, over a socketpair: what
``fast`` answers never reaches the task, the first frame it leaves (and all
after it) does, in order; an answer the socket does not take whole is
finished by the task under the timeout, and its ``done`` runs once, however
the connection ends."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from dataplane.raw import GET, PING, PUT, header, request
from kvstore.dataplane.conn import PeerTooSlow, SocketIO

ANSWER = struct.Struct("<4sBBHIIQ")


def _run(body: Callable[[SocketIO, socket.socket], Awaitable[None]]) -> None:
    async def go() -> None:
        ours, theirs = socket.socketpair()
        theirs.settimeout(10)
        io = SocketIO(ours, timeout=0.3)
        try:
            await body(io, theirs)
        finally:
            io.close()
            theirs.close()
    asyncio.run(go())


def _pings(io: SocketIO, answered: list[int], answer_bytes: int = 0) -> None:
    """``io.fast`` answers PINGs (an answer of ``answer_bytes`` payload bytes)."""
    def fast(opcode: int, flags: int, rid: int, meta: memoryview) -> bool:
        if opcode != PING:
            return False
        answered.append(rid)
        parts = (header(PING | 0x80, rid, 0, answer_bytes), b"a" * answer_bytes)
        sent = io.send_now(parts)
        if sent < sum(map(len, parts)):
            io.defer(parts, sent, lambda: answered.append(-rid))
        return True
    io.fast = fast


async def _next_frame(io: SocketIO) -> memoryview | None:
    """What the connection's task does: wait while the callback answers,
    then read the first frame it left."""
    assert await io.next_request() is None  # (no payload sink here)
    return await io.next_header()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "closed"
        out += chunk
    return bytes(out)


def _answer_ids(sock: socket.socket, count: int) -> list[int]:
    ids = []
    for _ in range(count):
        _, _, op, _, rid, meta_len, payload_len = ANSWER.unpack(_recv_exact(sock, 24))
        assert op == PING | 0x80 and meta_len == 0
        _recv_exact(sock, payload_len)
        ids.append(rid)
    return ids


def test_the_task_sees_only_what_fast_leaves_in_order() -> None:
    async def body(io: SocketIO, peer: socket.socket) -> None:
        answered: list[int] = []
        _pings(io, answered)
        put = request(PUT, 3, b"m", b"payload")
        peer.sendall(request(PING, 1) + request(PING, 2) + put + request(PING, 4)
                     + request(GET, 5, b"g"))
        raw = await _next_frame(io)
        assert raw is not None and bytes(raw) == put[:24]
        assert answered == [1, 2]  # PING 4 waits behind the PUT
        assert _answer_ids(peer, 2) == [1, 2]
        assert bytes(await io.read_exact(1)) == b"m"
        await io.discard(7)
        raw = await _next_frame(io)  # PING 4 answered first, then GET 5 is the task's
        assert raw is not None and raw[5] == GET and answered == [1, 2, 4]
        assert _answer_ids(peer, 1) == [4]
    _run(body)


def test_the_callback_answers_while_the_task_waits() -> None:
    async def body(io: SocketIO, peer: socket.socket) -> None:
        answered: list[int] = []
        _pings(io, answered)
        task = asyncio.ensure_future(_next_frame(io))
        loop = asyncio.get_running_loop()
        for rid in (7, 8, 9):
            whole = request(PING, rid)
            peer.sendall(whole[:5])  # half a header first: nothing to answer yet
            for _ in range(3):
                await asyncio.sleep(0)
            peer.sendall(whole[5:])
            assert await asyncio.wait_for(loop.run_in_executor(None, _answer_ids, peer, 1),
                                          10) == [rid]
            assert not task.done()
        peer.sendall(request(GET, 10, b"g"))
        raw = await asyncio.wait_for(task, 10)
        assert raw is not None and raw[5] == GET and answered == [7, 8, 9]
        peer.shutdown(socket.SHUT_WR)
        assert bytes(await io.read_exact(1)) == b"g"
        assert await _next_frame(io) is None  # a clean close between frames
    _run(body)


def test_an_answer_not_sent_whole_is_finished_by_the_task() -> None:
    async def body(io: SocketIO, peer: socket.socket) -> None:
        answered: list[int] = []
        big = 8 * 1024 * 1024  # more than a socketpair's buffers hold
        _pings(io, answered, big)
        peer.sendall(request(PING, 1) + request(PING, 2) + request(GET, 3, b"g"))
        loop = asyncio.get_running_loop()
        reader = loop.run_in_executor(None, _answer_ids, peer, 2)
        raw = await asyncio.wait_for(_next_frame(io), 10)
        assert raw is not None and raw[5] == GET
        assert await asyncio.wait_for(reader, 10) == [1, 2]
        # PING 2 was answered only once PING 1's answer was out, each done once.
        assert answered == [1, -1, 2, -2]
    _run(body)


def test_a_peer_too_slow_for_a_fast_answer_is_dropped_and_done_runs() -> None:
    async def body(io: SocketIO, peer: socket.socket) -> None:
        answered: list[int] = []
        _pings(io, answered, 8 * 1024 * 1024)
        peer.sendall(request(PING, 1) + request(PING, 2))  # ... and read nothing
        with pytest.raises(PeerTooSlow):
            await asyncio.wait_for(_next_frame(io), 10)
        assert answered == [1, -1]
    _run(body)


def test_closing_with_an_answer_half_sent_runs_done() -> None:
    async def body(io: SocketIO, peer: socket.socket) -> None:
        answered: list[int] = []
        _pings(io, answered, 8 * 1024 * 1024)
        peer.sendall(request(PING, 1))
        io._answer_ready()  # what the readable callback does
        assert answered == [1]
        io.close()
        assert answered == [1, -1]
    _run(body)
