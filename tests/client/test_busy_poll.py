"""The data plane's busy poll (``busy_poll_us``): the native
``wait_readable`` against its specification (kvstore/_spin.py), the client
option and its environment variable, and calls answered while polled for,
against a real server."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverproc import ServerProcess

from kvstore import Client, _impl, _spin, cpuquota
from kvstore.client import dataplane
from kvstore.client.dataplane import Connection
from kvstore.client.shm import ShmClient
from kvstore.cpuquota import ThrottleWatch
from kvstore.dataplane.frames import HEADER_SIZE, RESPONSE, Op, decode_header, encode_header
from kvstore.errors import InvalidArgument

WaitReadable = Callable[[int, int], bool]

IMPLEMENTATIONS: dict[str, WaitReadable | None] = {
    "spec": _spin.wait_readable,
    "native": _impl.native.wait_readable if _impl.native is not None else None,
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def wait_readable(request: pytest.FixtureRequest) -> WaitReadable:
    fn = IMPLEMENTATIONS[request.param]
    if fn is None:
        pytest.skip("KVSTORE_PURE=1: no native module")
    return fn


def test_ready_at_once_when_bytes_are_waiting(wait_readable: WaitReadable,
                                              pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.send(b"x")
    assert wait_readable(a.fileno(), 10**9) is True
    assert a.recv(1) == b"x"  # the poll consumed nothing


def test_gives_up_after_its_time(wait_readable: WaitReadable,
                                 pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    start = time.monotonic_ns()
    assert wait_readable(a.fileno(), 2_000_000) is False
    assert time.monotonic_ns() - start >= 2_000_000


def test_no_time_no_poll(wait_readable: WaitReadable,
                         pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.send(b"x")
    assert wait_readable(a.fileno(), 0) is False  # 0: off, even with bytes waiting


def test_a_closed_peer_ends_the_poll(wait_readable: WaitReadable,
                                     pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.close()
    assert wait_readable(a.fileno(), 10**9) is True  # the receive then reports it
    assert a.recv(1) == b""


def test_a_bad_descriptor_is_refused(wait_readable: WaitReadable) -> None:
    with pytest.raises(ValueError, match="file descriptor"):
        wait_readable(-1, 1000)


def test_native_poll_lets_other_threads_run(pair: tuple[socket.socket, socket.socket]) -> None:
    """The native poll releases the GIL: the thread that answers is Python
    code, and the poll (20 s at most) sees its answer."""
    native = IMPLEMENTATIONS["native"]
    if native is None:
        pytest.skip("KVSTORE_PURE=1: no native module")
    a, b = pair
    got: list[bool] = []
    poller = threading.Thread(target=lambda: got.append(native(a.fileno(), 20 * 10**9)))
    start = time.monotonic()
    poller.start()
    total = sum(i * i for i in range(200_000))  # Python work while it polls
    b.send(total.to_bytes(16, "little"))
    poller.join(30)
    assert got == [True]
    assert time.monotonic() - start < 15


# -- the client option -----------------------------------------------------------------


def test_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSTORE_BUSY_POLL_US", raising=False)
    assert Client("127.0.0.1:1", data_plane=False).busy_poll_us == 50
    monkeypatch.setenv("KVSTORE_BUSY_POLL_US", "0")
    assert Client("127.0.0.1:1", data_plane=False).busy_poll_us == 0
    monkeypatch.setenv("KVSTORE_BUSY_POLL_US", " 200 ")
    assert Client("127.0.0.1:1", data_plane=False).busy_poll_us == 200
    # The argument wins over the environment.
    assert Client("127.0.0.1:1", data_plane=False, busy_poll_us=7).busy_poll_us == 7


@pytest.mark.parametrize("value", [-1, 10_001, 1.5, True, "50"])
def test_bad_values_are_refused(value: object) -> None:
    with pytest.raises(InvalidArgument, match=r"busy_poll_us must be a whole number of "
                                               r"microseconds from 0 to 10000"):
        Client("127.0.0.1:1", busy_poll_us=value)  # type: ignore[arg-type]


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_BUSY_POLL_US", "fast")
    with pytest.raises(InvalidArgument, match=r"not 'fast' \(from \$KVSTORE_BUSY_POLL_US\)"):
        Client("127.0.0.1:1")


# -- against a server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("busy-poll")
    server = ServerProcess(tmp, "--l1-shm-path", f"/dev/shm/kvstore-busy-poll-{os.getpid()}",
                           l1_capacity="64MiB")
    with server:
        yield server


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_answers_arrive_while_polled_for(shm_server: ServerProcess, transport: str,
                                        cpu_to_itself: None) -> None:
    """With a poll long enough for a loaded machine (10 ms), small Gets and
    Lookups are answered while the call polls; with 0 no call polls. Either
    way the answers are the same."""
    blocks = {f"k{i}".encode(): os.urandom(4096 + i) for i in range(8)}
    polled = {}
    for busy in (0, 10_000):
        with Client(shm_server.tcp, namespace="default", data_plane=transport,
                    busy_poll_us=busy) as c:
            c.put(blocks)
            for _ in range(5):
                assert c.get(list(blocks)) == list(blocks.values())
                assert c.lookup([*blocks, b"none"]).found == 8
            bufs = [bytearray(8192)]
            assert c.get_into([b"k3"], bufs) == [4099]
            assert bytes(bufs[0][:4099]) == blocks[b"k3"]
            assert c.data_plane_calls > 0
            dp = c._data_plane
            assert dp is not None
            polled[busy] = dp.polled
    assert polled[0] == 0
    assert polled[10_000] >= 1


def test_shm_client_polls_for_its_leases(shm_server: ServerProcess, cpu_to_itself: None) -> None:
    blob = os.urandom(1 << 20)
    with ShmClient(shm_server.unix_target, namespace="default", busy_poll_us=10_000) as c:
        c.put({b"big": blob})
        buf = bytearray(1 << 20)
        for _ in range(5):
            assert c.get_into([b"big"], [buf]) == [1 << 20]
        assert bytes(buf) == blob
        dp = c._data_plane
        assert dp is not None
        assert dp.polled >= 1


def test_native_poll_without_yielding(pair: tuple[socket.socket, socket.socket]) -> None:
    """The benchmarks' switch: polls back to back, same answers."""
    native = _impl.native
    if native is None:
        pytest.skip("KVSTORE_PURE=1: no native module")
    a, b = pair
    old = native._spin_yield(False)
    try:
        assert old is True  # yielding is the default
        assert native.wait_readable(a.fileno(), 1_000_000) is False
        b.send(b"x")
        assert native.wait_readable(a.fileno(), 10**9) is True
    finally:
        native._spin_yield(old)
    assert native._spin_yield() is True


def _read_header(sock: socket.socket) -> bytes | None:
    """The next frame header from ``sock``; None once the client is gone."""
    head = b""
    while len(head) < HEADER_SIZE:
        chunk = sock.recv(HEADER_SIZE - len(head))
        if not chunk:
            return None
        head += chunk
    return head


def _slow_ping_peer(sock: socket.socket, delays: list[float]) -> None:
    """A peer that answers one PING per entry of ``delays``, each after that
    many seconds (its think time: a far or slow server)."""
    for delay in delays:
        head = _read_header(sock)
        if head is None:
            return
        rid = decode_header(head).request_id
        if delay:
            time.sleep(delay)
        sock.sendall(encode_header(Op.PING | RESPONSE, rid, 0))


@pytest.fixture(autouse=True)
def no_cpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    """The polls these tests count are not paused by a throttled cgroup of the
    host running them (the quota's own test sets its own cpu.stat)."""
    monkeypatch.setattr(dataplane, "_QUOTA", ThrottleWatch(lambda: None))


@pytest.fixture
def cpu_to_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls count by their answers alone, not by the share of the CPU their
    thread held (a loaded host would otherwise change the exact counts these
    tests check; that rule has its own tests: the scripted polls below and the
    two at the end, against a real server)."""
    monkeypatch.setattr(dataplane, "_CONTENDED_SHARE", 0.0)


def test_a_connection_stops_polling_a_slow_server_and_tries_again(
        pair: tuple[socket.socket, socket.socket], cpu_to_itself: None) -> None:
    """Answers later than the poll: after 8 polls that ran out (and one more
    try) the calls sleep at once; every 64th call polls again, and once an
    answer comes within the poll, every call polls again."""
    a, b = pair
    slow, fast = 30, 100
    peer = threading.Thread(target=_slow_ping_peer, args=(b, [0.015] * slow + [0.0] * fast))
    peer.start()
    try:
        conn = Connection(a, "test-peer", 10.0, busy_poll_us=10_000)
        for _ in range(slow):
            assert conn.call(Op.PING, b"") == b""
        assert conn.polled == 0
        assert conn.polls == 9  # 8 in a row ran out, then one more try; then none
        for _ in range(fast):
            assert conn.call(Op.PING, b"") == b""
        # Call 73 (the first after 64 calls without) polled, caught its answer
        # and every later call polls again: 58 polls, all answered in time.
        assert conn.polls == 9 + fast - (72 - slow)
        assert conn.polled == conn.polls - 9
    finally:
        peer.join(30)


def test_no_polling_while_the_cgroup_is_throttled(
        pair: tuple[socket.socket, socket.socket], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, cpu_to_itself: None) -> None:
    """Once the count of throttled periods of the process's cgroup rose (its
    CPU quota spent), calls do not poll for THROTTLED_PAUSE_S, then poll
    again (each poll spent the quota, and a caught one between two
    throttled ones reset the count of misses: polling never stopped)."""
    monkeypatch.setattr(cpuquota, "THROTTLE_CHECK_S", 0.0)  # read cpu.stat at every poll
    stat = tmp_path / "cpu.stat"
    stat.write_text("nr_periods 10\nnr_throttled 0\n")
    watch = ThrottleWatch(lambda: stat)
    monkeypatch.setattr(dataplane, "_QUOTA", watch)
    a, b = pair
    peer = threading.Thread(target=_slow_ping_peer, args=(b, [0.0] * 30))
    peer.start()
    try:
        conn = Connection(a, "test-peer", 10.0, busy_poll_us=10_000)
        for _ in range(10):
            assert conn.call(Op.PING, b"") == b""
        assert conn.polls == 10
        stat.write_text("nr_periods 20\nnr_throttled 3\n")
        for _ in range(10):
            assert conn.call(Op.PING, b"") == b""
        assert conn.polls == 10  # throttled: answered without a poll
        watch.paused_until = 0.0  # the pause over, without waiting its 10 s
        for _ in range(10):
            assert conn.call(Op.PING, b"") == b""
        assert conn.polls == 20
    finally:
        peer.join(30)


class _ScriptedCpu:
    """Stands in for ``wait_readable`` and the two clocks the contention
    rule reads: each poll waits for its answer for real, then reports the
    next scripted (ns the poll lasted, ns this thread ran in it), as it would
    have gone on a CPU shared with the work the script stands for."""

    def __init__(self, script: Iterable[tuple[int, int]]) -> None:
        self._script = iter(script)
        self._wall = self._ran = 0

    def wait_readable(self, fd: int, spin_ns: int) -> bool:
        assert select.select([fd], [], [], 10)[0], "no answer in 10 s"
        took, ran = next(self._script)
        self._wall += took
        self._ran += ran
        return True

    def perf_counter_ns(self) -> int:
        return self._wall

    def thread_time_ns(self) -> int:
        return self._ran

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)  # the call deadlines keep real time


US = 1_000
SERVER_TURN = (40 * US, 4 * US)  # measured: 28-147 µs, ~10 % of it this thread's
LOOP_SLICE = (4_000 * US, 15 * US)  # measured: 0.9-4.7 ms beside a busy loop
SPINNERS = (400 * US, 10 * US)  # measured: 8 polling clients on 2 CPUs, p90 ~430 µs


@pytest.mark.parametrize(("script", "polls"), [
    pytest.param([SERVER_TURN] * 200, 200, id="server-on-its-cpu"),
    # Call 1 gives up at once; calls 65, 129 and 193 try again.
    pytest.param([LOOP_SLICE] * 200, 4, id="busy-loop"),
    # 8 in a row give up, then one more try; then calls 74, 138 (one every 64).
    pytest.param([SPINNERS] * 200, 11, id="spinners"),
    # The long one stops polling for 63 calls; the next poll (a server's
    # turn) polls again for good.
    pytest.param([SERVER_TURN] * 100 + [LOOP_SLICE] + [SERVER_TURN] * 99, 137,
                 id="server-and-one-slice"),
    # Each try the server answers polls again, and the loop's next slice
    # gives up at once: 2 polls in 64 calls.
    pytest.param([SERVER_TURN, LOOP_SLICE] * 100, 8, id="server-and-busy-loop"),
])
def test_polls_stop_for_other_work_not_for_the_server(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch,
        script: list[tuple[int, int]], polls: int) -> None:
    """A poll during which this thread held its CPU for less than half the
    time counts against polling only when it lasted long (other work had the
    CPU: a busy loop's slice, other spinners); one that lost the CPU for a
    millisecond or more stops polling at once. A short one, whose yields ran
    the server on the same CPU, keeps polling (it used to count as a miss:
    the client slept, and the kernel kept it on its server's CPU)."""
    cpu = _ScriptedCpu(script)
    monkeypatch.setattr(dataplane, "wait_readable", cpu.wait_readable)
    monkeypatch.setattr(dataplane, "time", cpu)
    a, b = pair
    peer = threading.Thread(target=_slow_ping_peer, args=(b, [0.0] * len(script)))
    peer.start()
    try:
        conn = Connection(a, "test-peer", 10.0, busy_poll_us=50)
        for _ in script:
            assert conn.call(Op.PING, b"") == b""
        assert conn.polls == polls
        assert conn.polled == polls
    finally:
        peer.join(30)


def test_answers_a_little_later_than_the_poll_widen_it_instead_of_stopping_it(
        pair: tuple[socket.socket, socket.socket], cpu_to_itself: None) -> None:
    """Answers that come after the poll ran out but within 4 times its budget
    (a busy host's slower hops, not a far server) double the connection's
    window, up to 4 times the budget, and are caught from then on: the
    connection never stops polling (the former rule gave up after 8)."""
    a, b = pair
    calls = 20
    peer = threading.Thread(target=_slow_ping_peer, args=(b, [0.005] * calls))
    peer.start()
    try:
        conn = Connection(a, "test-peer", 10.0, busy_poll_us=2_000)  # answers at 2.5x
        for _ in range(calls):
            assert conn.call(Op.PING, b"") == b""
        assert conn.polls == calls  # never gave up
        assert conn.polled >= calls - 5  # the first two widen it (2 ms -> 4 -> 8)
        assert conn._poll_scale[0] >= 2  # 4 unless a loaded machine delayed an answer past 8 ms
    finally:
        peer.join(30)


def _mixed_peer(sock: socket.socket, delays: dict[int, float], count: int) -> None:
    """A peer that answers ``count`` frames (any opcode, payload read and
    dropped), each after ``delays[opcode]`` seconds, with an empty answer."""
    for _ in range(count):
        head = _read_header(sock)
        if head is None:
            return
        h = decode_header(head)
        left = h.meta_len + h.payload_len
        while left:
            left -= len(sock.recv(min(left, 1 << 16)))
        if delays.get(h.opcode):
            time.sleep(delays[h.opcode])
        sock.sendall(encode_header(h.opcode | RESPONSE, h.request_id, 0))


@pytest.mark.parametrize("put_delay", [0.02, 0.006])  # far past the poll; within 4x it
def test_late_put_answers_do_not_stop_the_quick_polls(
        pair: tuple[socket.socket, socket.socket], put_delay: float, cpu_to_itself: None) -> None:
    """PUTs whose answers keep coming after their poll (a loaded server) stop
    polling for PUTs after 8, also when they come within 4 times the poll
    (only quick answers widen the window: a Put's poll is long already, and 4
    times it would spin for milliseconds per Put on a remote server), and not
    for the quick answers: a PING after 12 late PUTs is still polled for and
    caught."""
    a, b = pair
    puts, pings = 12, 5
    peer = threading.Thread(target=_mixed_peer,
                            args=(b, {int(Op.PUT): put_delay, int(Op.PING): 0.0}, puts + pings))
    peer.start()
    try:
        conn = Connection(a, "test-peer", 10.0, busy_poll_us=1_000)  # PUT poll ~3 ms
        body = memoryview(b"p" * 4096)
        for _ in range(puts):
            rid = conn.send(Op.PUT, b"", [body], len(body))
            assert conn.head()[2] == rid
        assert conn._poll_scale[1] == 1  # a Put's poll never widens
        if put_delay > 0.012:  # past 4x the poll: every poll ran out, whatever the load
            assert (conn.polls, conn.polled) == (9, 0)  # 8 ran out, one more try, then none
        polls, before = conn.polls, conn.polled
        for _ in range(pings):
            assert conn.call(Op.PING, b"") == b""
        assert conn.polls - polls == pings  # polled for every one
        # and caught (all of them but on a loaded host, where the peer
        # thread's answer can come after a 1 ms poll: 4 of 5 seen)
        assert conn.polled - before >= pings - 2
    finally:
        peer.join(30)


def test_shm_client_polls_for_its_commits(shm_server: ServerProcess, cpu_to_itself: None) -> None:
    """A shared-memory Put's commit (one frame, answered once the server has
    checked the block's CRC-32C) is polled for too, longer by the block's
    size; a Put on a stocked slot makes that its only frame."""
    blob = os.urandom(1 << 20)
    with ShmClient(shm_server.unix_target, namespace="default", busy_poll_us=10_000) as c:
        c.put({b"c0": blob})  # reserve (or a stocked slot) and commit
        dp = c._data_plane
        assert dp is not None
        polls, before = dp.polls, dp.polled
        for i in range(1, 4):
            c.put({f"c{i}".encode(): blob})
        assert dp.polls - polls >= 3  # polled for every commit
        # and caught (all 3 on a quiet host; on a loaded one a poll that lost
        # its CPU to the other pytest worker misses: 2 of 3 seen in CI)
        assert dp.polled - before >= 1
        assert c.get([b"c3"]) == [blob]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_puts_of_one_chunk_are_polled_for_larger_ones_not(
        shm_server: ServerProcess, transport: str, cpu_to_itself: None) -> None:
    """A Put of up to 1 MiB (one chunk per call, as engines Put) polls for its
    answer; a larger one does not (its poll would mostly run out)."""
    with Client(shm_server.tcp, namespace="default", data_plane=transport,
                busy_poll_us=10_000) as c:
        c.put({b"p-warm": b"w" * 4096})
        dp = c._data_plane
        assert dp is not None
        before = dp.polled
        for i in range(3):
            c.put({f"p{i}".encode(): os.urandom(1 << 20)})
        # (on a loaded host a poll that held the CPU skips the next: 2 of 3
        # seen in a CI run beside other work)
        assert dp.polled - before >= 2
        before = dp.polled
        big = os.urandom(2 << 20)
        for i in range(2):
            c.put({f"big{i}".encode(): big})
        assert dp.polled == before
        assert c.get([b"big1"]) == [big]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_a_client_sharing_its_cpu_stops_polling_and_comes_back(
        shm_server: ServerProcess) -> None:
    """A client whose CPU another runnable process wants (more polling
    clients than CPUs; here a busy loop pinned to the same CPU) gives each of
    its poll's yields to that process and holds the CPU for a sliver of the
    poll, which lasts the loop's time slice (milliseconds): it stops polling
    after a few such polls instead of spinning on every call (it used to, its
    polls still catching the answers), and polls again once it has its CPU to
    itself. The window is 10 ms, longer than the loop's slice (0.29.8's
    review: a rule bound by the window never stopped, 4 ms a Get)."""
    blocks = {f"s{i}".encode(): os.urandom(4096) for i in range(4)}
    cpu = min(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # this thread only
        with Client(shm_server.tcp, namespace="default", data_plane="unix",
                    busy_poll_us=10_000) as c:
            c.put(blocks)
            dp = c._data_plane
            assert dp is not None
            for i in range(200):
                assert c.get([f"s{i % 4}".encode()]) == [blocks[f"s{i % 4}".encode()]]
            contended = dp.polls
            # 8 contended polls give up, then one retry every 64 calls: 12
            # polls on a quiet host. A poll that did hold its CPU (a busy host
            # can leave this thread running through its yields) starts the
            # count again, 9 polls more each time: 13-28 seen under load, 21
            # in a CI run. Without the rule every call polls (201).
            assert contended <= 200 // 3, f"{contended} polls in 200 calls"
            hog.kill()
            hog.wait(timeout=10)
            before = dp.polled
            for _ in range(64 * 30):  # a retry every 64 calls: one held its CPU
                c.get([b"s0"])
                if dp.polled > before:
                    break
            assert dp.polled > before, "polling never came back with the CPU free"
    finally:
        os.sched_setaffinity(0, mine)
        if hog.poll() is None:
            hog.kill()
            hog.wait(timeout=10)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
@pytest.mark.parametrize("busy_poll_us", [50, 10_000])
def test_a_client_sharing_its_cpu_with_its_server_keeps_polling(
        shm_server: ServerProcess, busy_poll_us: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client on the same CPU as its server holds that CPU for a sliver of
    each poll too, but briefly: its yields run the server, which answers. It
    keeps polling. (It used to stop after 8 calls, and the kernel then kept
    the two on one CPU: unpinned 4 KiB Gets 31-39 µs instead of 21-25.)"""
    long_polls = 0  # timed here, not by the rule under test

    def timed_poll(fd: int, spin_ns: int) -> bool:
        nonlocal long_polls
        began, held = time.perf_counter_ns(), time.thread_time_ns()
        caught = native_or_spec_poll(fd, spin_ns)
        took = time.perf_counter_ns() - began
        if took > 250_000 and time.thread_time_ns() - held < took // 2:
            long_polls += 1
        return caught

    native_or_spec_poll = dataplane.wait_readable
    monkeypatch.setattr(dataplane, "wait_readable", timed_poll)
    blocks = {f"c{i}".encode(): os.urandom(4096) for i in range(4)}
    cpu = min(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    server_tasks = [int(t) for t in os.listdir(f"/proc/{shm_server.pid}/task")]
    theirs = {}
    try:
        for t in server_tasks:
            with contextlib.suppress(ProcessLookupError):
                theirs[t] = os.sched_getaffinity(t)
                os.sched_setaffinity(t, {cpu})
        os.sched_setaffinity(0, {cpu})  # this thread only
        with Client(shm_server.tcp, namespace="default", data_plane="unix",
                    busy_poll_us=busy_poll_us) as c:
            c.put(blocks)
            dp = c._data_plane
            assert dp is not None
            before, long_polls = dp.polls, 0
            for i in range(200):
                assert c.get([f"c{i % 4}".encode()]) == [blocks[f"c{i % 4}".encode()]]
            # Every call polls; the former rule: 8, then one every 64 calls
            # (11). It may stop only for polls during which other work held
            # the CPU for long (a loaded host), never for its server's turns:
            # each such poll stops polling for 64 calls at most.
            skipped = 200 - (dp.polls - before)
            assert skipped <= 64 * long_polls, \
                f"{skipped} calls of 200 did not poll; {long_polls} polls lost the CPU for long"
    finally:
        os.sched_setaffinity(0, mine)
        for t, cpus in theirs.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(t, cpus)
