"""The server's busy-polling event loop (kvstore/server/loop.py,
``server.busy_poll_us``): when it spins, what it returns, that it keeps the
loop's timers, and that a real server with it answers and then goes quiet."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess

from kvstore import Client, cpuquota
from kvstore.config import load
from kvstore.errors import InvalidConfig
from kvstore.server.loop import (
    GIVE_UP_AFTER,
    MAX_SCALE,
    RETRY_EVERY,
    BusyPollSelector,
    loop_factory,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def selector() -> Iterator[BusyPollSelector]:
    sel = BusyPollSelector(10_000)
    yield sel
    sel.close()


def _activate(sel: BusyPollSelector, a: socket.socket, b: socket.socket) -> None:
    """One select that finds an event: the next blocking one may spin."""
    b.send(b"x")
    assert len(sel.select(5.0)) == 1
    assert a.recv(1) == b"x"


def test_no_spin_before_any_activity(selector: BusyPollSelector,
                                     pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    selector.register(a, 1)  # EVENT_READ
    assert selector.select(0.001) == []
    assert selector.spins == 0


def test_an_event_during_the_spin_is_returned(selector: BusyPollSelector,
                                              pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    key = selector.register(a, 1)
    _activate(selector, a, b)
    b.send(b"y")  # pending when the spin starts: found by its first poll
    ready = selector.select(5.0)
    assert [(k.fileobj, ev) for k, ev in ready] == [(key.fileobj, 1)]
    assert (selector.spins, selector.caught) == (1, 1)


def _timed_idle_select(budget_us: int, pair: tuple[socket.socket, socket.socket],
                       timeout: float) -> tuple[BusyPollSelector, float]:
    """An active selector of ``budget_us``, then one select that finds
    nothing within ``timeout``: the selector (closed) and the seconds taken."""
    a, b = pair
    with BusyPollSelector(budget_us) as sel:
        sel.register(a, 1)
        _activate(sel, a, b)
        start = time.monotonic()
        assert sel.select(timeout) == []
        took = time.monotonic() - start
        assert sel.select(0.001) == []  # no activity since: no spin
        assert sel.select(0) == []  # a non-blocking select never spins
    return sel, took


def test_a_spin_that_runs_out_ends_in_the_usual_wait(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Nothing arrives: one spin (of its 2 ms), then the blocking select
    returns at the timeout with nothing; the next select does not spin (no
    activity since)."""
    sel, took = _timed_idle_select(2_000, pair, 0.05)
    assert took >= 0.04
    assert (sel.spins, sel.caught) == (1, 0)


def test_the_spin_never_outlasts_the_loops_timeout(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A timer due in 5 ms is not held back by a 10 ms spin budget."""
    sel, took = _timed_idle_select(10_000, pair, 0.005)
    # Bounded: the spin took min(10 ms, 5 ms), the wait the rest (a loaded
    # machine may add to both, never the spin's full 10 ms on top).
    assert took < 0.5
    assert (sel.spins, sel.caught) == (1, 0)


def test_spinning_stops_after_misses_and_is_retried(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Clients whose requests come later than the spin: after 8 bursts whose
    spin ran out, the loop spins once per 64 bursts; a retry that finds a
    request turns spinning back on for every burst."""
    a, b = pair
    with BusyPollSelector(200) as sel:
        sel.register(a, 1)
        for _ in range(8):
            _activate(sel, a, b)
            assert sel.select(0.002) == []
        assert (sel.spins, sel.caught) == (8, 0)
        for _ in range(GIVE_UP_AFTER + RETRY_EVERY - 9):  # passed over: no spin
            _activate(sel, a, b)
            assert sel.select(0.002) == []
        assert sel.spins == 8
        _activate(sel, a, b)
        b.send(b"r")  # the retry's spin finds it
        assert len(sel.select(5.0)) == 1
        assert (sel.spins, sel.caught) == (9, 1)
        assert a.recv(1) == b"r"
        _activate(sel, a, b)  # spinning again at every burst
        assert sel.select(0.002) == []
        assert sel.spins == 11  # _activate's select spun too (after the catch)


def test_no_spinning_while_the_cgroup_is_throttled(
        pair: tuple[socket.socket, socket.socket], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the cgroup's count of throttled periods rises (a CPU quota spent),
    the loop stops spinning for THROTTLED_PAUSE_S, then spins again."""
    monkeypatch.setattr(cpuquota, "THROTTLE_CHECK_S", 0.0)  # read cpu.stat at every spin
    stat = tmp_path / "cpu.stat"
    stat.write_text("nr_periods 10\nnr_throttled 0\nthrottled_time 0\n")
    a, b = pair
    with BusyPollSelector(200, lambda: stat) as sel:
        sel.register(a, 1)
        _activate(sel, a, b)
        assert sel.select(0.002) == []
        assert sel.spins == 1
        stat.write_text("nr_periods 20\nnr_throttled 3\nthrottled_time 9000000\n")
        for _ in range(5):
            _activate(sel, a, b)
            assert sel.select(0.002) == []
        assert sel.spins == 1
        assert sel._quota is not None
        sel._quota.paused_until = 0.0  # the pause over, without waiting its 10 s
        _activate(sel, a, b)
        assert sel.select(0.002) == []
        assert sel.spins == 2


def _event_after(sel: BusyPollSelector, a: socket.socket, b: socket.socket,
                 delay: float) -> float:
    """An active ``sel``, then one select whose event is sent ``delay`` s
    later (from a timer thread): the seconds that select took."""
    _activate(sel, a, b)
    timer = threading.Timer(delay, b.send, (b"d",))
    start = time.monotonic()
    timer.start()
    try:
        assert len(sel.select(5.0)) == 1
    finally:
        timer.join(10)
    took = time.monotonic() - start
    assert a.recv(1) == b"d"
    return took


def test_a_request_a_little_later_than_the_spin_widens_it(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A request that arrives after the spin ran out but within twice its
    time doubles the spin (no miss counted), and the wider spin catches the
    next one as late; the spin never grows past twice its budget. The
    requests come from a timer thread 15 ms after a 10 ms spin starts; a try
    whose timing a loaded machine moved (the timer outside 10-20 ms, or the
    spin descheduled past its own time) is made again: with two busy loops
    beside the test, 1-14 tries were needed (5 ran out in a loaded run), each
    up to ~40 ms."""
    a, b = pair
    for _ in range(100):
        with BusyPollSelector(10_000) as sel:
            sel.register(a, 1)
            if not 0.0105 < _event_after(sel, a, b, 0.015) < 0.0195 or sel.caught:
                continue  # (caught: the spin was descheduled past its own time)
            assert (sel.spins, sel.caught, sel._misses, sel._scale) == (1, 0, 0, 2)
            if _event_after(sel, a, b, 0.015) >= 0.0195:
                continue
            # 3 spins: the first request's, _activate's (its byte is already
            # there) and the 20 ms one, the last two caught.
            assert (sel.spins, sel.caught, sel._scale) == (3, 2, MAX_SCALE)
            return
    pytest.fail("in 100 tries the timer never fired within 10-20 ms of the spin's start")


def test_a_request_far_later_than_the_spin_is_a_miss(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A request later than twice the spin counts as a miss, as before, and
    the spin keeps its time."""
    a, b = pair
    with BusyPollSelector(2_000) as sel:  # 2 ms; the request comes at 50 ms
        sel.register(a, 1)
        _event_after(sel, a, b, 0.05)
        assert (sel.spins, sel.caught, sel._misses, sel._scale) == (1, 0, 1, 1)


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        BusyPollSelector(-1)
    with pytest.raises(ValueError, match="busy_poll_us"):
        BusyPollSelector(10_001)


def test_zero_is_the_plain_loop() -> None:
    loop = loop_factory(0)()
    try:
        assert not isinstance(getattr(loop, "_selector", None), BusyPollSelector)
    finally:
        loop.close()


def test_the_busy_loop_runs_asyncio() -> None:
    """Callbacks, timers and a socket's readable callback on the busy loop."""
    loop = loop_factory(500)()
    try:
        a, b = socket.socketpair()
        a.setblocking(False)
        got: list[bytes] = []

        async def main() -> None:
            done = asyncio.Event()

            def readable() -> None:
                got.append(a.recv(16))
                if len(got) == 3:
                    done.set()
                else:
                    loop.call_later(0.001, b.send, b"m")

            loop.add_reader(a, readable)
            b.send(b"m")
            await asyncio.wait_for(done.wait(), 10)
            loop.remove_reader(a)

        loop.run_until_complete(main())
        a.close()
        b.close()
        assert got == [b"m"] * 3
        assert isinstance(loop._selector, BusyPollSelector)  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_no_busy_poll_metrics_when_it_is_off(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client", reason="the metrics need kvstore[metrics]")
    with ServerProcess(tmp_path, "--server-busy-poll-us", "0",
                       "--server-metrics-listen", "127.0.0.1:0") as server:
        with Client(server.tcp, namespace="default", data_plane="tcp") as c:
            c.put({b"k": b"v" * 4096})
            assert c.get([b"k"]) == [b"v" * 4096]
        assert server.metric("kvstore_loop_busy_polls_total") is None
        assert server.metric("kvstore_dataplane_requests_total")


@pytest.mark.parametrize("value", ["-1", "10001"])
def test_config_refuses_out_of_range(value: str) -> None:
    with pytest.raises(InvalidConfig, match=r"server\.busy_poll_us"):
        load(env={"KVSTORE_SERVER_BUSY_POLL_US": value})
    assert load(env={}).server.busy_poll_us == 200


def _cpu_seconds(pid: int) -> float:
    # The process's own count (utime + stime, clock ticks): it keeps the time
    # of threads that have ended (a thread ending between the listing of
    # /proc/PID/task and the read of its schedstat failed a CI run).
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_busy_polling_server_answers_and_then_goes_quiet(tmp_path: Path) -> None:
    """The default server (busy_poll_us 200) answers Gets over the data
    plane, its polls finding requests (its metrics say so); once its client
    stops, it spends next to no CPU: the spin is per burst, not a spinning
    loop."""
    pytest.importorskip("prometheus_client", reason="the metrics need kvstore[metrics]")
    blocks = {f"k{i}".encode(): os.urandom(4096) for i in range(16)}
    with ServerProcess(tmp_path, "--server-busy-poll-us", "200",
                       "--server-metrics-listen", "127.0.0.1:0") as server:
        with Client(server.tcp, namespace="default", data_plane="tcp",
                    busy_poll_us=10_000) as c:
            c.put(blocks)
            for _ in range(50):
                assert c.get(list(blocks)[:4]) == list(blocks.values())[:4]
            assert c.data_plane_calls > 0
            sample = server.metrics("kvstore_loop_busy_polls_total",
                                    "kvstore_loop_busy_poll_hits_total")
            polls = sample["kvstore_loop_busy_polls_total"]
            hits = sample["kvstore_loop_busy_poll_hits_total"]
            assert polls is not None and hits is not None
            assert 1 <= hits <= polls
            start = _cpu_seconds(server.pid)
            window = time.monotonic() + 1.0
            while time.monotonic() < window:  # a measuring window, not a wait for an event
                time.sleep(0.1)
            idle_cpu = _cpu_seconds(server.pid) - start
        # A spinning loop would spend the whole second; background timers a few ms.
        assert idle_cpu < 0.3, f"an idle server spent {idle_cpu:.3f} CPU s in 1 s"


CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


@pytest.fixture
def cpu_quota_cgroup() -> Iterator[Path]:
    """A cgroup v1 ``cpu`` child with a tenth of a CPU (period 100 ms, as
    Kubernetes sets it); needs root and the v1 controller."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists() or os.geteuid() != 0:
        pytest.skip("needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    group = CGROUP_CPU / f"kvstore-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("10000")
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup: {exc}")
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # (gone meanwhile)
                (CGROUP_CPU / "cgroup.procs").write_text(pid)
        group.rmdir()


def _throttled(group: Path) -> int:
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["nr_throttled"])


def test_a_throttled_server_stops_spinning(tmp_path: Path, cpu_quota_cgroup: Path) -> None:
    """A server in a CPU quota it spends (a tenth of a CPU, one client asking
    without pause) stops spinning once its cgroup is throttled: the spin would
    spend CPU the quota no longer has, and the rest of each period the loop
    cannot run at all. It used to keep spinning after every request."""
    pytest.importorskip("prometheus_client", reason="the metrics need kvstore[metrics]")
    blocks = {f"k{i}".encode(): os.urandom(4096) for i in range(4)}
    with ServerProcess(tmp_path, "--server-busy-poll-us", "200",
                       "--server-metrics-listen", "127.0.0.1:0") as server:
        (cpu_quota_cgroup / "cgroup.procs").write_text(str(server.pid))
        with Client(server.tcp, namespace="default", data_plane="unix", busy_poll_us=0) as c:
            c.put(blocks)
            deadline = time.monotonic() + 30
            while _throttled(cpu_quota_cgroup) == 0:
                assert time.monotonic() < deadline, "the quota never throttled the server"
                c.get([b"k0"])
            # The server reads its cgroup's count once a second: 1.5 s more of
            # requests (the quota keeps throttling it), then a measured window.
            window = time.monotonic() + 1.5
            while time.monotonic() < window:
                c.get([b"k1"])
            polls = server.metric("kvstore_loop_busy_polls_total")
            for i in range(300):
                assert c.get([f"k{i % 4}".encode()]) == [blocks[f"k{i % 4}".encode()]]
            after = server.metric("kvstore_loop_busy_polls_total")
        assert polls is not None and after is not None
        assert _throttled(cpu_quota_cgroup) > 0
        # Metrics scrapes are requests too: a spin or two at most.
        assert after - polls <= 5, f"{after - polls:.0f} spins in 300 throttled requests"
