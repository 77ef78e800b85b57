"""Data plane faults (issue 14 item 3), against a real server: a connection
dropped mid-block, one dropped holding leases and reservations, a reader that
stops reading, malformed frames. Each hurts only its own connection."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator

import pytest
from serverproc import ServerProcess

from dataplane.raw import (
    CLOSING,
    ERROR,
    GET,
    LOOKUP,
    PING,
    PUT,
    SHM_ACQUIRE,
    SHM_RESERVE,
    Raw,
    block_of,
    get,
    get_meta,
    header,
    keys,
    metric,
    open_dp,
    put,
    put_meta,
    request,
    s,
    session,
    slow_session,
    u32,
    u64,
    u64s,
    wait_until,
)
from kvstore import Client

MiB = 1024**2


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    shm = f"/dev/shm/kvstore-test-dpf-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    srv = ServerProcess(tmp_path_factory.mktemp("dp-faults"), "--l1-shm-path", shm,
                        "--server-metrics-listen", "127.0.0.1:0",
                        "--server-data-plane-timeout-ms", "1000", l1_capacity="16MiB")
    with srv:
        yield srv
        # Every test's connections were closed: the server noticed each.
        assert wait_until(lambda: _gauge(srv, "kvstore_dataplane_connections") == 0)


def _gauge(srv: ServerProcess, name: str) -> float:
    return metric(srv.data_dir, name)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_connection_dropped_mid_put_leaves_nothing_and_frees_its_extent(
        fault_server: ServerProcess, kind: str) -> None:
    srv = fault_server
    size = 12 * MiB  # two of them do not fit the 16 MiB L1
    dropped = session(srv.tcp, kind=kind)
    dropped.send(header(PUT, 1, len(meta := put_meta("ns", [(b"half", size, 0, None)])), size)
                 + meta + b"h" * (size // 2))
    assert wait_until(lambda: _gauge(srv, "kvstore_dataplane_put_receiving") == 1)
    dropped.close()
    assert wait_until(lambda: _gauge(srv, "kvstore_dataplane_put_receiving") == 0
                      and _gauge(srv, "kvstore_dataplane_connections") == 0)
    raw = session(srv.tcp, kind=kind)
    raw.send(request(LOOKUP, 2, s("ns") + s("") + u32(0) + keys([b"half"])))
    assert raw.frame().meta == u32(0) + u32(1) + b"\0"
    assert [block_of(f) for f in get(raw, 3, "ns", [b"half"])] == [None]
    # The extent came back: a whole block of the same size fits now, at once.
    started = time.monotonic()
    assert put(raw, 4, "ns", {b"whole": b"w" * size}).meta == u32(1) + u64(size)
    assert time.monotonic() - started < 10
    assert [block_of(f) for f in get(raw, 5, "ns", [b"whole"])] == [b"w" * size]


def test_a_dropped_connection_gives_back_its_reservations_and_leases(
        fault_server: ServerProcess) -> None:
    srv = fault_server
    raw = session(srv.tcp)
    assert put(raw, 1, "ns", {b"leased": b"L" * 100_000}).op == 0x85
    raw.send(request(SHM_ACQUIRE, 2, s("ns") + s("") + u32(60_000) + keys([b"leased"])
                     + u64s([])))
    assert raw.frame().op == 0x88
    raw.send(request(SHM_RESERVE, 3, s("ns") + s("") + u32(2) + s(b"r1") + u64(MiB)
                     + s(b"r2") + u64(MiB)))
    assert raw.frame().op == 0x86
    assert _gauge(srv, "kvstore_shm_leases") == 1
    assert _gauge(srv, "kvstore_shm_reservations") == 2
    raw.close()
    assert wait_until(lambda: _gauge(srv, "kvstore_shm_leases") == 0
                      and _gauge(srv, "kvstore_shm_reservations") == 0)
    other = session(srv.tcp)  # nothing of it was committed; the block is intact
    assert [block_of(f) for f in get(other, 4, "ns", [b"r1", b"r2", b"leased"])] == \
        [None, None, b"L" * 100_000]


def test_a_reader_that_stops_reading_stalls_only_itself_and_is_dropped(
        server_factory: type[ServerProcess]) -> None:
    srv = server_factory("--server-data-plane-timeout-ms", "1000",
                         "--server-metrics-listen", "127.0.0.1:0",
                         l1_capacity="160MiB").start()
    big = os.urandom(1024) * (48 * 1024)  # 48 MiB: far more than the socket buffers hold
    writer = session(srv.tcp, kind="tcp")
    assert put(writer, 1, "ns", {b"big": big, b"small": b"s" * 4096}).op == 0x85
    slow = slow_session(srv.tcp, 64 * 1024)
    slow.send(request(GET, 2, get_meta("ns", [b"big"])))  # ... and read nothing
    # Others are served meanwhile, big blocks included.
    started = time.monotonic()
    for rid in range(10, 13):
        assert [block_of(f) for f in get(writer, rid, "ns", [b"small", b"big"])] == \
            [b"s" * 4096, big]
    assert time.monotonic() - started < 10
    # Its time is up: the server drops it, so the block's pin (its lease) ends.
    assert wait_until(lambda: _gauge(srv, "kvstore_dataplane_connections") == 1, 15)
    got = 0
    try:
        while chunk := slow.sock.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    assert got < 24 + 6 + len(big), "the slow reader got the whole block"
    assert "dropping a slow peer" in srv.log()
    writer.send(request(PING, 20))
    assert writer.frame().op == 0x82


MALFORMED = {
    "bad magic": header(GET, 5, 0, magic=b"XKVD"),
    "bad version": header(GET, 5, 0, version=2),
    "unknown opcode": header(0x42, 5, 0),
    "oversized metadata": header(GET, 5, 1024**2 + 1),
    "oversized payload": header(PUT, 5, 0, 2**40),
    "payload on a GET": request(GET, 5, get_meta("ns", [b"k"]), b"12345"),
    "truncated metadata": request(GET, 5, s("ns") + s("") + u32(5) + s(b"k")),
    "metadata left over": request(GET, 5, get_meta("ns", [b"k"]) + b"\0"),
    "string past the end": request(GET, 5, struct.pack("<H", 500) + b"ns"),
    "invalid utf-8": request(GET, 5, s(b"\xff\xfe") + s("") + keys([b"k"])),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_frame_closes_only_its_connection(fault_server: ServerProcess,
                                                      case: str) -> None:
    srv = fault_server
    bystander = session(srv.tcp, kind="tcp")
    assert put(bystander, 1, "ns", {b"kept": b"k" * 3000}).op == 0x85
    bad = session(srv.tcp)
    bad.send(MALFORMED[case])
    err = bad.frame()
    assert err.op == ERROR and err.flags & CLOSING
    code, name, message = err.error()
    assert (code, name) == (3, "MalformedRequest"), message
    assert err.rid == (0 if case in ("bad magic", "bad version") else 5)
    assert bad.closed()
    assert [block_of(f) for f in get(bystander, 2, "ns", [b"kept"])] == [b"k" * 3000]
    assert wait_until(lambda: _gauge(srv, "kvstore_dataplane_connections") == 1)


def test_a_peer_that_never_says_hello_is_dropped(fault_server: ServerProcess) -> None:
    resp = open_dp(fault_server.tcp)
    host, _, port = resp.tcp_address.rpartition(":")
    idle = Raw(socket.create_connection((host, int(port)), timeout=20))
    started = time.monotonic()
    assert idle.closed()  # after server.data_plane_timeout_ms (1 s here)
    assert time.monotonic() - started < 10


def _arena(srv: ServerProcess) -> str:
    flags = srv.flags
    return flags[flags.index("--l1-shm-path") + 1]


def test_a_corrupt_l1_copy_is_never_served(fault_server: ServerProcess) -> None:
    srv = fault_server
    raw = session(srv.tcp)
    good = os.urandom(64 * 1024)
    meta = put_meta("ns", [(b"scribbled", len(good), 0, None)], ack=2)  # in L2 too
    raw.send(request(PUT, 1, meta, good))
    assert raw.frame().op == 0x85
    raw.send(request(SHM_ACQUIRE, 2, s("ns") + s("") + u32(0) + keys([b"scribbled"])
                     + u64s([])))
    lease = raw.frame().meta
    _, _, lease_id, offset, *_ = struct.unpack_from("<BBQQQIQ", lease, 16)
    raw.send(request(0x09, 9, s("ns") + u64s([lease_id])))  # SHM_RELEASE
    assert raw.frame().op == 0x89
    with open(_arena(srv), "r+b") as fh:
        fh.seek(offset + 1000)
        fh.write(b"\xff" * 16)  # a stray write into the block's L1 bytes
    frames = get(raw, 3, "ns", [b"scribbled"])
    assert block_of(frames[0]) == good  # L2's copy, never the damaged one
    assert frames[0].meta[5] == 2


def test_a_block_only_in_l2_is_served(fault_server: ServerProcess) -> None:
    raw = session(fault_server.tcp, kind="tcp")
    blocks = {f"l2-{i}".encode(): os.urandom(5 * MiB) for i in range(4)}  # > the 16 MiB L1
    for rid, (key, value) in enumerate(blocks.items()):
        assert put(raw, rid, "ns", {key: value}).op == 0x85
    frames = get(raw, 9, "ns", list(blocks))
    assert [block_of(f) for f in frames] == list(blocks.values())
    assert frames[0].meta[5] == 2  # the first one had left L1


def test_sigterm_with_sessions_open_stops_cleanly(server_factory: type[ServerProcess]) -> None:
    shm = f"/dev/shm/kvstore-test-dpt-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    srv = server_factory("--l1-shm-path", shm).start()
    raw = session(srv.tcp, kind="tcp")
    assert put(raw, 1, "ns", {b"k": b"v" * 1000}).op == 0x85
    raw.send(request(SHM_ACQUIRE, 2, s("ns") + s("") + u32(0) + keys([b"k"]) + u64s([])))
    assert raw.frame().op == 0x88
    half = session(srv.tcp)  # a PUT whose payload never comes
    half.send(header(PUT, 1, len(meta := put_meta("ns", [(b"h", MiB, 0, None)])), MiB) + meta)
    assert srv.terminate() == 0
    assert "Traceback" not in srv.log() and "ERROR" not in srv.log()
    assert raw.closed() and half.closed()


def test_a_graceful_stop_lets_data_plane_calls_under_way_finish(server_factory) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM gives the data plane's calls under way the same grace as
    gRPC's: a PUT half sent when the signal comes is answered once the rest
    arrives, and kept across the restart; a connection with no request under
    way is closed at once, and new ones are refused. (Every connection was
    closed at once: the PUT failed, its block lost, in every rolling restart.)"""
    server = server_factory("--server-grace-seconds", "30").start()
    addr = open_dp(server.tcp).tcp_address
    busy = session(server.tcp, kind="tcp")
    idle = session(server.tcp, kind="tcp")
    reader = session(server.tcp, kind="tcp")
    halfway = session(server.tcp, kind="tcp")
    stored = os.urandom(4 * 1024 * 1024)
    assert put(reader, 1, "grace", {b"stored": stored}).op == 0x85
    block = os.urandom(4 * 1024 * 1024)
    frame = request(PUT, 2, put_meta("grace", [(b"inflight", len(block), 0, None)]), block)
    half = len(frame) - len(block) // 2
    busy.send(frame[:half])
    # A GET of an L1 block answered from the socket's callback, read only
    # after the signal (the answer waits, half sent, for the reader), and a
    # request of which only part of the header came before it.
    reader.send(request(GET, 3, get_meta("grace", [b"stored"])))
    small = request(GET, 4, get_meta("grace", [b"absent"]))
    halfway.send(small[:10])
    assert server.proc is not None
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert idle.closed()  # (bounded by the socket's timeout)
    host, _, port = addr.rpartition(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=10).close()
    busy.send(frame[half:])
    answer = busy.frame()
    assert (answer.op, answer.rid, answer.meta) == (0x85, 2, u32(1) + u64(len(block)))
    assert busy.closed()  # closed after its answer
    assert [block_of(f) for f in [reader.frame()]] == [stored]
    assert reader.closed()
    halfway.send(small[10:])
    assert block_of(halfway.frame()) is None
    assert halfway.closed()  # closed after its answer, not serving on (it did, for the grace)
    assert server.proc.wait(60) == 0
    assert time.monotonic() - started < 20  # well before the grace: nothing was left
    server.start()
    with Client(server.tcp, namespace="grace", data_plane=False) as c:
        assert c.get([b"inflight"]) == [block]


def test_a_graceful_stop_closes_without_losing_answers_not_yet_read(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Two GETs answered before the stop and not yet read, then one more
    request sent after it: the client still reads both answers (the server
    closed at once, the late request drew a RST, and the client's kernel
    dropped the unread answers). A connection that has not said HELLO does
    not hold the stop for the grace (it did: 30 s here)."""
    server = server_factory("--server-grace-seconds", "30").start()
    addr = open_dp(server.tcp).tcp_address
    host, _, port = addr.rpartition(":")
    silent = Raw(socket.create_connection((host, int(port)), timeout=20))  # no HELLO
    piped = session(server.tcp, kind="tcp")
    blob = os.urandom(16 * 1024)
    assert put(piped, 2, "linger", {b"b": blob}).op == 0x85
    piped.send(request(GET, 3, get_meta("linger", [b"b"])) +
               request(GET, 4, get_meta("linger", [b"b"])))
    deadline = time.monotonic() + 20
    while _unread(piped) < 2 * (24 + 6 + len(blob)):  # both answers in the client's socket
        assert time.monotonic() < deadline
        time.sleep(0.002)  # polling the kernel's count, bounded
    assert server.proc is not None
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert silent.closed()
    with contextlib.suppress(OSError):  # (the server may have shut its side already)
        piped.send(request(GET, 5, get_meta("linger", [b"b"])))
    assert [block_of(piped.frame()) for _ in range(2)] == [blob, blob]
    assert server.proc.wait(60) == 0
    assert time.monotonic() - started < 20


def _unread(raw: Raw) -> int:
    """Bytes waiting in the client's socket (FIONREAD)."""
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(raw.sock.fileno(), termios.FIONREAD,
                                          b"\0\0\0\0"))[0]
