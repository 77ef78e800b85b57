"""PUTs begun from the readable callback (kvstore/dataplane/put.py), against a
real server: answers stay in request order, a block that must wait (for L1
room, for an overwrite's L2 delete) is finished by the connection's task, a
bad block stops the PUT where the task would have, a client that stalls
mid-payload is dropped, and a large PUT received piece by piece leaves the
socket waking for the next small request. Each test also reads the server's
counters of PUTs begun from the callback and handed to the task: the path
it means to exercise is the one taken."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess

from dataplane.raw import (
    CLOSING,
    ERROR,
    GET,
    PING,
    PUT,
    block_of,
    get,
    get_meta,
    header,
    metric,
    put,
    put_meta,
    request,
    session,
    u32,
    u64,
    wait_until,
)
from kvstore.checksum import checksum
from kvstore.server.auth import hash_token

KiB, MiB = 1024, 1024**2
BEGUN, HANDED = "kvstore_dataplane_puts_begun_total", "kvstore_dataplane_puts_handed_over_total"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("dp-put-now"),
                           "--server-metrics-listen", "127.0.0.1:0",
                           "--server-data-plane-timeout-ms", "1000", l1_capacity="64MiB")
    with server:
        yield server


def _put_frame(rid: int, blocks: list[tuple[bytes, bytes, int | None]], ack: int = 0,
               fmt: int = 0) -> bytes:
    """A PUT of (key, bytes, crc32c or None) blocks."""
    meta = put_meta("ns", [(k, len(v), fmt, crc) for k, v, crc in blocks], ack)
    return request(PUT, rid, meta, b"".join(v for _, v, _ in blocks))


class Paths:
    """The server's counts of PUTs begun from the callback and handed over,
    since this was made."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.start = self._now()

    def _now(self) -> tuple[float, float]:
        return metric(self.server.data_dir, BEGUN), metric(self.server.data_dir, HANDED)

    def since(self) -> tuple[float, float]:
        begun, handed = self._now()
        return begun - self.start[0], handed - self.start[1]


def _kv_block(layers: int, seed: int) -> bytes:
    """A valid block-format (KV_V1) block: ``layers`` layers of K and V pages."""
    import numpy as np

    from kvstore._impl import pack

    rng = np.random.default_rng(seed)
    pages = [[rng.integers(0, 2**15, (2, 16, 8, 64), dtype=np.int16).view(np.float16)
              for _ in range(layers)] for _ in range(2)]
    return bytes(pack(pages[0], pages[1], [0, 1]))


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_requests_sent_with_puts_are_answered_in_order(srv: ServerProcess, kind: str) -> None:
    raw = session(srv.tcp, kind=kind)
    paths = Paths(srv)
    small, large = os.urandom(4 * KiB), os.urandom(300 * KiB)
    # One send: each PUT's answer must come before the answers of what follows it.
    raw.send(_put_frame(1, [(b"small", small, checksum(small))])
             + request(GET, 2, get_meta("ns", [b"small"]))
             + _put_frame(3, [(b"large", large, checksum(large)), (b"two", b"2" * 5, None)])
             + request(GET, 4, get_meta("ns", [b"large", b"two"]))
             + request(PING, 5))
    first = raw.frame()
    assert (first.op, first.rid, first.meta) == (PUT | 0x80, 1, u32(1) + u64(4 * KiB))
    assert [block_of(raw.frame())] == [small]
    third = raw.frame()
    assert (third.op, third.rid, third.meta) == (PUT | 0x80, 3, u32(2) + u64(300 * KiB + 5))
    got = [raw.frame(), raw.frame()]
    assert [f.rid for f in got] == [4, 4] and [block_of(f) for f in got] == [large, b"22222"]
    assert (raw.frame().op, 5) == (PING | 0x80, 5)
    assert paths.since() == (2, 0)  # both begun and answered from the callback


def test_a_small_request_after_a_put_sent_in_pieces_is_answered(srv: ServerProcess) -> None:
    """TCP: while a large payload comes, the server asks the socket to wake
    it only once 256 KiB wait (SO_RCVLOWAT); after the PUT it must wake for
    a request of a few bytes again."""
    raw = session(srv.tcp, kind="tcp")
    paths = Paths(srv)
    block = os.urandom(MiB)
    data = _put_frame(1, [(b"pieces", block, checksum(block))])
    cut = len(data) - len(block) + 64 * KiB
    raw.send(data[:cut])
    # Not synchronisation: the rest is sent later so that the server has to
    # wait for it (with the wake-up raised); the test holds either way.
    time.sleep(0.05)
    raw.send(data[cut:])
    assert raw.frame().meta == u32(1) + u64(MiB)
    started = time.monotonic()
    raw.send(request(PING, 2))
    assert raw.frame().op == PING | 0x80
    assert time.monotonic() - started < 1.0, "the PING waited for bytes that never came"
    assert paths.since() == (1, 0)
    assert [block_of(f) for f in get(raw, 3, "ns", [b"pieces"])] == [block]


def test_a_slow_sender_of_small_blocks_is_followed_block_by_block(srv: ServerProcess) -> None:
    """TCP: the socket is asked to wait for 256 KiB only while more than that
    of the block being received is to come. A PUT of small blocks whose bytes
    come slowly, each within its deadline (1 s here), is taken in as they
    come: asked for the PUT's whole rest, the callback slept past the small
    block's deadline and left it to the task."""
    raw = session(srv.tcp, kind="tcp")
    paths = Paths(srv)
    one, two, three = os.urandom(8 * KiB), os.urandom(8 * KiB), os.urandom(300 * KiB)
    data = _put_frame(1, [(b"s1", one, checksum(one)), (b"s2", two, checksum(two)),
                          (b"s3", three, checksum(three))])
    first = len(data) - len(one) - len(two) - len(three) + len(one)
    # The pauses shape the traffic (not synchronisation): each block's bytes
    # come 0.6 s after the previous block's, within its 1 s deadline.
    raw.send(data[:first])
    time.sleep(0.6)
    raw.send(data[first:first + len(two)])
    time.sleep(0.6)
    raw.send(data[first + len(two):])
    assert raw.frame().meta == u32(3) + u64(316 * KiB)
    assert paths.since() == (1, 0)
    assert [block_of(f) for f in get(raw, 2, "ns", [b"s1", b"s2", b"s3"])] == [one, two, three]


def test_a_bad_block_stops_the_put_where_it_is(srv: ServerProcess) -> None:
    """Blocks before a bad one are stored, it and those after it are not,
    the rest of the payload is read and dropped, and the connection lives."""
    raw = session(srv.tcp, kind="tcp")
    paths = Paths(srv)
    one, two, three = os.urandom(100 * KiB), os.urandom(300 * KiB), os.urandom(200 * KiB)
    raw.send(_put_frame(1, [(b"b1", one, checksum(one)), (b"b2", two, checksum(two) ^ 1),
                            (b"b3", three, None)]))
    answer = raw.frame()
    assert answer.op == ERROR and answer.rid == 1 and not answer.flags & CLOSING
    _, name, message = answer.error()
    assert name == "CorruptBlock" and message.startswith("block #1 failed its CRC-32C check")
    assert [block_of(f) for f in get(raw, 2, "ns", [b"b1", b"b2", b"b3"])] == [one, None, None]
    assert put(raw, 3, "ns", {b"b4": b"after"}).meta == u32(1) + u64(5)
    assert paths.since() == (2, 1)  # the bad one: its task answers the error


def test_an_overwrite_of_a_block_in_l2_is_answered_after_its_delete(
        server_factory: type[ServerProcess]) -> None:
    """ack=memory over a block whose L2 copy must go first: the callback
    hands the PUT to the task, which answers once that delete committed, so
    a kill -9 right after the answer never brings the old bytes back."""
    server = server_factory("--server-metrics-listen", "127.0.0.1:0").start()
    raw = session(server.tcp, kind="unix")
    paths = Paths(server)
    old, new = b"o" * 64 * KiB, b"n" * 64 * KiB
    raw.send(_put_frame(1, [(b"over", old, None)], ack=2))  # acknowledged once in L2
    assert raw.frame().meta == u32(1) + u64(64 * KiB)
    raw.send(_put_frame(2, [(b"over", new, checksum(new))]))
    assert raw.frame().meta == u32(1) + u64(64 * KiB)
    assert paths.since() == (1, 1)  # (the first, at ack=local, was the task's)
    server.kill()
    server.start()
    raw = session(server.tcp, kind="unix")
    assert [block_of(f) for f in get(raw, 3, "ns", [b"over"])] in ([new], [None])


def test_block_format_blocks_are_verified_where_they_are_received(srv: ServerProcess) -> None:
    """KV_V1 blocks of at most 256 KiB are checked in the callback (a bad one
    answered as the task would); a larger one is left to the task, which
    verifies it off the loop."""
    raw = session(srv.tcp, kind="tcp")
    paths = Paths(srv)
    small, large = _kv_block(2, 1), _kv_block(6, 2)  # ~256 KiB, ~768 KiB
    assert len(small) <= 256 * KiB < len(large)
    raw.send(_put_frame(1, [(b"kv-small", small, None)], fmt=1))
    assert raw.frame().meta == u32(1) + u64(len(small))
    bad = bytearray(small)
    bad[-1] ^= 0xFF
    raw.send(_put_frame(2, [(b"kv-bad", bytes(bad), None)], fmt=1))
    answer = raw.frame()
    assert answer.op == ERROR and answer.error()[1] == "CorruptBlock"
    assert answer.error()[2].startswith("block #0")
    assert paths.since() == (2, 1)
    raw.send(_put_frame(3, [(b"kv-large", large, None)], fmt=1))
    assert raw.frame().meta == u32(1) + u64(len(large))
    assert paths.since() == (2, 1)  # never begun there
    assert [block_of(f) for f in get(raw, 4, "ns", [b"kv-small", b"kv-bad", b"kv-large"])] \
        == [small, None, large]


def test_a_put_that_stalls_mid_payload_is_dropped_and_gives_back_its_extent(
        srv: ServerProcess) -> None:
    stalled = session(srv.tcp, kind="tcp")
    paths = Paths(srv)
    size = 8 * MiB
    stalled.send(header(PUT, 1, len(meta := put_meta("ns", [(b"stalled", size, 0, None)])), size)
                 + meta + b"s" * MiB)
    other = session(srv.tcp, kind="unix")
    assert put(other, 1, "ns", {b"meanwhile": b"m" * KiB}).meta == u32(1) + u64(KiB)
    # The data plane's timeout is 1 s: then the server closes the connection.
    stalled.sock.settimeout(15)
    assert stalled.closed()
    assert wait_until(lambda: metric(srv.data_dir, "kvstore_dataplane_put_receiving") == 0)
    assert "dropping a slow peer" in srv.log()
    assert [block_of(f) for f in get(other, 2, "ns", [b"stalled", b"meanwhile"])] == \
        [None, b"m" * KiB]
    assert paths.since() == (2, 1)  # its deadline's timer handed it to the task


def test_a_block_the_callback_has_no_room_for_is_stored_by_the_task(
        server_factory: type[ServerProcess]) -> None:
    """The first block fits at once; the second needs the first evicted,
    which waits for its L2 write: the task reserves it, and no byte that
    came meanwhile is lost."""
    srv = server_factory("--server-data-plane-timeout-ms", "10000",
                         "--server-metrics-listen", "127.0.0.1:0", l1_capacity="16MiB").start()
    holder = session(srv.tcp, kind="unix")  # a PUT under way holds 12 MiB of L1
    holder.send(header(PUT, 1, len(meta := put_meta("ns", [(b"held", 12 * MiB, 0, None)])),
                       12 * MiB) + meta + b"h" * KiB)
    raw = session(srv.tcp, kind="tcp")
    paths = Paths(srv)
    first, second = os.urandom(2 * MiB), os.urandom(4 * MiB)  # 12 + 2 fit, + 4 do not
    raw.send(_put_frame(1, [(b"first", first, checksum(first)),
                            (b"second", second, checksum(second))]))
    assert raw.frame().meta == u32(2) + u64(6 * MiB)
    assert paths.since() == (1, 1)  # begun, then the task's: the second block waited
    assert [block_of(f) for f in get(raw, 2, "ns", [b"first", b"second"])] == [first, second]
    holder.send(b"h" * (12 * MiB - KiB))
    assert holder.frame().meta == u32(1) + u64(12 * MiB)


def test_a_put_is_counted_while_it_receives(srv: ServerProcess) -> None:
    raw = session(srv.tcp, kind="unix")
    paths = Paths(srv)
    size = 4 * MiB
    raw.send(header(PUT, 1, len(meta := put_meta("ns", [(b"counted", size, 0, None)])), size)
             + meta + b"c" * (size // 4))
    assert wait_until(lambda: metric(srv.data_dir, "kvstore_dataplane_put_receiving") == 1)
    raw.send(b"c" * (size - size // 4))
    assert raw.frame().meta == u32(1) + u64(size)
    assert metric(srv.data_dir, "kvstore_dataplane_put_receiving") == 0
    assert paths.since() == (1, 0)


def test_a_session_closed_mid_payload_by_a_reload_gives_back_its_extent(
        server_factory: type[ServerProcess], tmp_path: Path) -> None:
    """A reload that revokes a credential cancels its sessions' tasks while
    the callback is taking in a PUT: the connection closes, and the PUT's
    reserved extent is given back with it."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{hash_token('alice-put')} alice ns\n{hash_token('bob-put')} bob ns\n")
    srv = server_factory("--auth-tokens-file", str(tokens), "--server-metrics-listen",
                         "127.0.0.1:0", l1_capacity="16MiB").start()
    raw = session(srv.tcp, "alice-put", kind="tcp")
    paths = Paths(srv)
    size = 12 * MiB
    raw.send(header(PUT, 1, len(meta := put_meta("ns", [(b"cut", size, 0, None)])), size)
             + meta + b"c" * MiB)
    assert wait_until(lambda: metric(srv.data_dir, "kvstore_dataplane_put_receiving") == 1)
    assert metric(srv.data_dir, 'kvstore_tier_used_bytes{tier="L1"}') >= size
    assert paths.since() == (1, 0)  # the callback has it
    tokens.write_text(f"{hash_token('bob-put')} bob ns\n")  # alice's token revoked
    os.kill(srv.pid, signal.SIGHUP)
    assert raw.closed()
    assert wait_until(lambda: metric(srv.data_dir, "kvstore_dataplane_put_receiving") == 0
                      and metric(srv.data_dir, 'kvstore_tier_used_bytes{tier="L1"}') == 0)
