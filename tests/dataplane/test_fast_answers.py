"""Requests answered from the socket's readable callback (a PING, a GET of
small L1 hits) against a real server: in request order among those the
connection's task answers, byte-split frames included, and a reader too
slow for such an answer is still dropped after data_plane_timeout_ms."""

from __future__ import annotations

import os
import socket
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
    MORE,
    PING,
    PUT,
    Frame,
    Raw,
    block_of,
    get,
    get_meta,
    keys,
    metric,
    put,
    put_meta,
    request,
    s,
    session,
    slow_session,
    u32,
    u64,
    wait_until,
)

MiB = 1024**2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    shm = f"/dev/shm/kvstore-test-dpq-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    srv = ServerProcess(tmp_path_factory.mktemp("dp-fast"), "--l1-shm-path", shm,
                        "--server-metrics-listen", "127.0.0.1:0",
                        "--server-data-plane-timeout-ms", "1000", l1_capacity="64MiB")
    with srv:
        yield srv


def _answers(raw: Raw, count: int) -> list[Frame]:
    """``count`` requests' answers (a GET's frames up to the one without MORE)."""
    out: list[Frame] = []
    for _ in range(count):
        out.append(raw.frame())
        while out[-1].op == GET | 0x80 and out[-1].flags & MORE:
            out.append(raw.frame())
    return out


def _pipeline(fresh_key: bytes, fresh: bytes) -> bytes:
    """Requests the callback answers (PING, GETs of L1 hits) mixed with ones
    only the task does (a miss, a PUT, a LOOKUP, a bad key, a bad PING)."""
    return b"".join([
        request(GET, 10, get_meta("ns", [b"small"])),
        request(GET, 11, get_meta("ns", [b"missing"])),
        request(PUT, 12, put_meta("ns", [(fresh_key, len(fresh), 0, None)]), fresh),
        request(GET, 13, get_meta("ns", [fresh_key])),  # after its PUT: a hit
        request(PING, 14),
        request(LOOKUP, 15, s("ns") + s("") + u32(0) + keys([b"small", fresh_key, b"x"])),
        request(GET, 16, get_meta("ns", [b"small", b"large", fresh_key])),
        request(GET, 17, get_meta("ns", [b""])),  # an empty key: an error, not fatal
        request(GET, 18, get_meta("ns", [b"large"])),
        request(PING, 19, b"junk"),  # PING takes no metadata: fatal
    ])


def _check(frames: list[Frame], small: bytes, large: bytes, fresh: bytes) -> None:
    assert [f.rid for f in frames] == [10, 11, 12, 13, 14, 15, 16, 16, 16, 17, 18, 19]
    assert block_of(frames[0]) == small and frames[0].meta[5] == 1
    assert block_of(frames[1]) is None
    assert frames[2].op == PUT | 0x80 and frames[2].meta == u32(1) + u64(len(fresh))
    assert block_of(frames[3]) == fresh
    assert frames[4].op == PING | 0x80 and frames[4].meta == b""
    assert frames[5].meta == u32(2) + u32(3) + bytes([1, 1, 0])
    assert [block_of(f) for f in frames[6:9]] == [small, large, fresh]
    assert frames[9].op == ERROR and not frames[9].flags & CLOSING
    assert frames[9].error()[1] == "InvalidKey"
    assert block_of(frames[10]) == large
    assert frames[11].op == ERROR and frames[11].flags & CLOSING
    assert frames[11].error()[1] == "MalformedRequest"


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("split", [0, 7, 4099])
def test_pipelined_requests_are_answered_in_order(server: ServerProcess, kind: str,
                                                  split: int) -> None:
    small, large = os.urandom(4096), os.urandom(MiB)
    fresh = os.urandom(5000)
    raw = session(server.tcp, kind=kind)
    assert put(raw, 1, "ns", {b"small": small, b"large": large}).op == PUT | 0x80
    if kind == "tcp":
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fresh_key = f"fresh-{kind}-{split}".encode()
    data = _pipeline(fresh_key, fresh)
    if not split:
        raw.send(data)
    else:  # frames cut across many receives (the server sees halves of them)
        for at in range(0, len(data), split):
            raw.send(data[at:at + split])
    frames = _answers(raw, 10)
    _check(frames, small, large, fresh)
    assert raw.closed()
    # The PUT in the middle stored its block.
    again = session(server.tcp, kind=kind)
    assert [block_of(f) for f in get(again, 2, "ns", [fresh_key])] == [fresh]


def test_a_corrupt_small_l1_copy_is_not_served_and_is_dropped(server: ServerProcess) -> None:
    raw = session(server.tcp)
    good = os.urandom(4096)
    assert put(raw, 1, "ns", {b"scratched": good}).op == PUT | 0x80  # L1 only
    raw.send(request(0x08, 2, s("ns") + s("") + u32(0) + keys([b"scratched"]) + u32(0)))
    lease = raw.frame()
    offset = int.from_bytes(lease.meta[26:34], "little")
    lease_id = int.from_bytes(lease.meta[18:26], "little")
    raw.send(request(0x09, 3, s("ns") + u32(1) + u64(lease_id)))
    assert raw.frame().op == 0x89
    flags = server.flags
    with open(flags[flags.index("--l1-shm-path") + 1], "r+b") as fh:
        fh.seek(offset + 10)
        fh.write(b"\x00\xff\x00\xff")
    # No other copy: a miss, now and after (the damaged copy is gone).
    assert [block_of(f) for f in get(raw, 4, "ns", [b"scratched"])] == [None]
    assert [block_of(f) for f in get(raw, 5, "ns", [b"scratched"])] == [None]


def test_a_reader_too_slow_for_an_l1_answer_is_dropped(server: ServerProcess) -> None:
    writer = session(server.tcp, kind="tcp")
    block = os.urandom(MiB)  # served from the callback (small enough to check there)
    assert put(writer, 1, "ns", {b"slowly": block}).op == PUT | 0x80
    connections = metric(server.data_dir, "kvstore_dataplane_connections")
    slow = slow_session(server.tcp)
    # 32 answers of 1 MiB, none read: far more than the socket buffers hold.
    slow.send(b"".join(request(GET, rid, get_meta("ns", [b"slowly"]))
                       for rid in range(2, 34)))
    started = time.monotonic()
    for rid in range(10, 14):  # others are served meanwhile
        assert [block_of(f) for f in get(writer, rid, "ns", [b"slowly"])] == [block]
    assert time.monotonic() - started < 10
    assert wait_until(lambda: metric(server.data_dir, "kvstore_dataplane_connections")
                      == connections, 15)
    got = 0
    try:
        while chunk := slow.sock.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    assert got < 32 * (30 + MiB), "the slow reader got every answer"
    assert [block_of(f) for f in get(writer, 20, "ns", [b"slowly"])] == [block]
