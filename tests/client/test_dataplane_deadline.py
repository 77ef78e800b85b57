"""The sync client's ``timeout`` is each data-plane call's deadline, as over
gRPC (docs/dataplane.md, client): an SDK review's Get of three 60 MiB blocks
under a 50 ms timeout took 0.17 s and succeeded, because the timeout bounded
each wait on the socket, not the call. A peer that answers steadily but
slowly (each wait short) is emulated on a socket pair."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peers import recv_exactly
from pki import make_ca, needs_openssl

from kvstore.client.dataplane import Connection, _set_timeouts
from kvstore.dataplane import frames
from kvstore.dataplane.frames import HEADER, HEADER_SIZE
from kvstore.errors import DeadlineExceeded

BLOCK = 1 << 20
PIECE = 4096


def _dripping_peer(sock: socket.socket, stop: threading.Event) -> None:
    """Reads one GET, answers with one 1 MiB block, 4 KiB every 10 ms
    (2.6 s in all: never a wait near the client's timeout)."""
    head = recv_exactly(sock, HEADER_SIZE)
    recv_exactly(sock, HEADER.unpack(head)[5])
    rid = HEADER.unpack(head)[4]
    try:
        sock.sendall(frames.encode_get_frame(rid, 0, 1, BLOCK, 0))
        for _ in range(BLOCK // PIECE):
            if stop.wait(0.01):
                return
            sock.sendall(b"x" * PIECE)
    except OSError:
        return  # the client gave up and closed


@contextlib.contextmanager
def slow_peer(peer: Callable[[socket.socket, threading.Event], None], sock: socket.socket,
              ours: socket.socket, name: str, timeout: float) -> Iterator[tuple[Connection, float]]:
    """``peer`` on its end of the pair, and our end as a connection with
    ``timeout`` whose call has just begun (with when it began)."""
    stop = threading.Event()
    thread = threading.Thread(target=peer, args=(sock, stop))
    thread.start()
    try:
        _set_timeouts(ours, timeout)  # (as the SDK's connections are)
        conn = Connection(ours, name, timeout)
        started = time.monotonic()
        conn.begin_call(started + timeout)
        yield conn, started
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.parametrize("into", [False, True])
def test_a_call_answered_steadily_but_slowly_ends_at_its_timeout(
        pair: tuple[socket.socket, socket.socket], into: bool) -> None:
    a, b = pair
    timeout = 0.3
    with slow_peer(_dripping_peer, b, a, "slow-peer", timeout) as (conn, started):
        with pytest.raises(DeadlineExceeded, match=r"ran past its timeout of 0\.3 s"):
            conn.get("ns", [b"k"], "", [memoryview(bytearray(BLOCK))] if into else None)
        took = time.monotonic() - started
        assert took < 1.1 * timeout + 0.2, took  # (the peer needs 2.6 s)
        assert conn.broken  # the rest of the answer would follow: never reused


def test_the_next_call_on_a_connection_waits_its_whole_timeout_again(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A call that ended near its deadline cut the socket's wait limit; the
    next call on the same connection gets its own timeout back."""
    a, _ = pair
    _set_timeouts(a, 5.0)
    conn = Connection(a, "peer", 5.0)
    conn.begin_call(time.monotonic() + 0.5)  # a call with little left
    conn._check_deadline("test")  # its wait is cut to what is left
    conn.begin_call(time.monotonic() + 5.0)
    limit = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    assert limit[:8] == (5).to_bytes(8, "little"), limit  # five seconds again


def _slow_reader(sock: socket.socket, stop: threading.Event) -> None:
    """Reads a PUT's header and metadata, then its payload 16 KiB every
    10 ms (1.6 MB/s), never answering: each wait of the sender is short."""
    head = recv_exactly(sock, HEADER_SIZE)
    recv_exactly(sock, HEADER.unpack(head)[5])
    try:
        while not stop.wait(0.01):
            if not sock.recv(16384):
                return
    except OSError:
        return


def test_a_put_to_a_reader_that_takes_its_bytes_slowly_ends_at_its_timeout(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A fix review: a blocking send on a unix socket restarts its limit for
    every chunk the kernel moves, and a 1 GiB Put to a server read in bursts
    ran 21 x its timeout. A large payload goes in non-blocking pieces."""
    a, b = pair
    timeout = 0.3
    payload = memoryview(bytearray(12 << 20))  # 7.5 s at the reader's pace
    with slow_peer(_slow_reader, b, a, "slow-reader", timeout) as (conn, started):
        with pytest.raises(DeadlineExceeded, match="whether it took effect is unknown"):
            conn.put("ns", 1, "", [(b"k", payload)], 0)
        took = time.monotonic() - started
        assert took < 1.1 * timeout + 0.2, took
        assert conn.broken


def test_a_deadline_a_microsecond_away_never_lifts_the_wait_limit(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A fix review: under 1 µs left made the limit 0, which is no limit."""
    a, _ = pair
    _set_timeouts(a, 5.0)
    conn = Connection(a, "peer", 5.0)
    conn.begin_call(time.monotonic() + 0.0004)
    try:
        conn._check_deadline("test")
    except DeadlineExceeded:
        return  # (already past: as good)
    limit = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    assert limit != bytes(16), "the wait limit was lifted"


@needs_openssl
def test_a_tls_handshake_with_a_silent_peer_ends_at_the_setup_timeout(tmp_path: Path) -> None:
    """A fix review: the TLS handshake ran on a blocking socket, whose loop
    retried the kernel's EAGAIN: a peer that accepted the connection and said
    nothing (a dead backend behind a port-forward) held the call for ever."""
    from kvstore import TLS
    from kvstore.client._dproute import Route
    from kvstore.client.dataplane import DataPlane

    ca = make_ca(tmp_path, "ca")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        owner = types.SimpleNamespace(_tls=TLS(ca=str(ca)))
        started = time.monotonic()
        with pytest.raises(OSError):
            DataPlane._connect(owner, Route("", "127.0.0.1", port, "127.0.0.1"),  # type: ignore[arg-type]
                               0.5)
        assert time.monotonic() - started < 3.0
