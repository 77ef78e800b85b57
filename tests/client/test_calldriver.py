"""CallDriver (kvstore/client/_calldriver.py): the main thread's gRPC calls
made from a thread of the client's own, so that an interrupt lands in the
main thread's wait and never inside grpc's code. No server: the jobs are
functions that wait on events the tests set."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvstore.client._calldriver import CallDriver, CallJob, on_main_thread


@pytest.fixture
def interrupt_after() -> Iterator[Any]:
    """``interrupt_after(s)``: a KeyboardInterrupt in the main thread after
    ``s`` seconds (SIGALRM)."""
    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_main_thread_s_calls_run_on_the_driver_and_others_on_their_own() -> None:
    driver = CallDriver()
    assert on_main_thread()
    ran_on = driver.call(threading.get_ident)
    assert ran_on != threading.get_ident()
    assert driver.call(threading.get_ident) == ran_on  # one thread, kept
    other: list[int] = []
    thread = threading.Thread(target=lambda: other.append(
        driver.call(threading.get_ident) - threading.get_ident()))
    thread.start()
    thread.join(10)
    assert other == [0]  # (signals never reach another thread: no hand-over)
    with pytest.raises(ZeroDivisionError):
        driver.call(lambda: 1 // 0)  # what the call raises reaches the caller
    driver.close()


def test_an_interrupted_call_goes_on_and_the_next_one_does_not_wait_for_it(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    driver = CallDriver()
    release = threading.Event()
    finished = threading.Event()

    def slow() -> str:
        release.wait(30)
        finished.set()
        return "late"

    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.call(slow)
    assert not finished.is_set()
    assert driver.call(lambda: "next") == "next"  # another thread took over
    release.set()
    assert finished.wait(10)
    driver.close()


def test_the_next_write_waits_for_an_interrupted_write(interrupt_after) -> None:  # type: ignore[no-untyped-def]
    driver = CallDriver()
    order: list[str] = []
    release = threading.Event()

    def put() -> None:
        release.wait(30)
        order.append("interrupted put")

    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.call(put, write=True)
    threading.Timer(0.2, release.set).start()  # (answered while the next write waits)
    driver.settle(timeout=30)
    order.append("delete")
    assert order == ["interrupted put", "delete"]
    driver.settle(timeout=30)  # settled once: nothing to wait for
    driver.close()


def test_submitted_writes_run_in_order_and_the_next_write_waits_for_them(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    """``submit``: queued without waiting (a pipelined Put's commits), run in
    order, waited for by the next write; ``outcome`` interrupted leaves its
    job going while the next call gets another thread, and a job queued but
    not begun when the wait was interrupted still runs."""
    driver = CallDriver()
    order: list[str] = []
    release = threading.Event()

    def commit(name: str) -> Any:
        def run(job: CallJob) -> str:
            release.wait(30)
            order.append(name)
            return name
        return CallJob(run)

    first = driver.submit(commit("group 1"))
    last = driver.submit(commit("group 2"))
    assert order == []  # (submit returned at once)
    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.outcome(last, timeout=30)
    assert driver.call(lambda: "next") == "next"  # another thread took over
    threading.Timer(0.2, release.set).start()  # (answered while the next write waits)
    driver.settle(timeout=30)
    order.append("delete")
    assert order == ["group 1", "group 2", "delete"]
    assert driver.outcome(first, timeout=30) == "group 1"
    failed = driver.submit(CallJob(lambda job: 1 // 0))
    with pytest.raises(ZeroDivisionError):  # what the job raised reaches the caller
        driver.outcome(failed, timeout=30)
    driver.close()


FORKED_SUBMIT = """
import os, signal, sys, threading
from kvstore.client._calldriver import CallDriver, CallJob
signal.alarm(30)
driver = CallDriver()
driver.call(lambda: None)  # used in the parent
pid = os.fork()
if pid == 0:
    release = threading.Event()
    job = driver.submit(CallJob(lambda job: release.wait(20)))
    recorded = job in driver._unsettled
    release.set()
    driver.settle(10)
    os._exit(0 if recorded else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_s_first_submitted_write_is_waited_for() -> None:
    """Found by a fix review: ``submit`` recorded its job, then the queue's
    start after a fork emptied the record (the parent's): the child's next
    write did not wait for it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORKED_SUBMIT], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"child's submit not recorded: {done.returncode} {done.stderr}"


def test_an_interrupted_stream_is_cancelled_and_stops_before_the_interrupt_goes_on(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    class Call:
        def __init__(self) -> None:
            self.cancelled = threading.Event()

        def cancel(self) -> None:
            self.cancelled.set()

    call = Call()
    writes: list[int] = []

    def stream(job: CallJob) -> None:
        job.started(call)
        while not call.cancelled.wait(0.001):  # (a message each ms until cancelled)
            if job.cancelled:
                break
            writes.append(1)

    driver = CallDriver()
    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.run(CallJob(stream))
    # (the stream stopped on the flag; the cancel, sent from a thread of its
    # own, reaches the call a moment later)
    assert call.cancelled.wait(10)
    seen = len(writes)
    assert driver.call(lambda: len(writes)) == seen  # nothing written after
    driver.close()


def test_a_job_given_up_before_it_began_never_runs() -> None:
    driver = CallDriver()
    gate = threading.Event()
    driver.run(CallJob(lambda job: None))  # (the thread is up)
    blocker = CallJob(lambda job: gate.wait(30))
    ran: list[str] = []
    skipped = CallJob(lambda job: ran.append("ran"))
    # Queue two behind nothing the main thread waits for: the first holds the
    # driver, the second is claimed by its caller (as an interrupt does).
    assert driver._jobs is not None
    driver._jobs.put(blocker)
    driver._jobs.put(skipped)
    assert skipped.claim.acquire(blocking=False)
    gate.set()
    assert blocker.done.acquire(timeout=10)
    driver.call(lambda: None)  # (queued after both)
    assert ran == []
    driver.close()


def test_writes_of_several_threads_wait_for_the_same_interrupted_write(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: ``done`` is taken once, so a second thread settling
    at the same time waited its whole timeout, then failed IndexError."""
    driver = CallDriver()
    release = threading.Event()
    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.call(lambda: release.wait(30), write=True)
    outcomes: list[object] = []

    def write() -> None:
        started = time.monotonic()
        try:
            driver.settle(timeout=20)
            outcomes.append(time.monotonic() - started)
        except Exception as exc:
            outcomes.append(exc)

    writers = [threading.Thread(target=write) for _ in range(3)]
    for w in writers:
        w.start()
    threading.Timer(0.2, release.set).start()
    for w in writers:
        w.join(30)
    assert len(outcomes) == 3
    assert all(isinstance(o, float) and o < 10 for o in outcomes), outcomes
    driver.close()


def test_an_interrupted_stream_is_cancelled_off_the_interrupted_thread(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    """grpc's cancel takes the call's lock in Python code: on the interrupted
    thread a second interrupt could land in it (a review: a double Ctrl-C
    hung the client)."""
    cancelled_on: list[int] = []

    class Call:
        def __init__(self) -> None:
            self.cancelled = threading.Event()

        def cancel(self) -> None:
            cancelled_on.append(threading.get_ident())
            self.cancelled.set()

    call = Call()

    def stream(job: CallJob) -> None:
        job.started(call)
        call.cancelled.wait(30)

    driver = CallDriver()
    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.run(CallJob(stream))
    assert call.cancelled.is_set()
    assert cancelled_on and threading.get_ident() not in cancelled_on
    driver.close()


def test_a_call_whose_thread_never_ends_is_left_past_the_timeout(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kvstore.client import _calldriver
    from kvstore.errors import DeadlineExceeded

    monkeypatch.setattr(_calldriver, "OVERDUE_S", 0.2)
    driver = CallDriver(timeout=0.1)
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="left running"):
        driver.call(lambda: release.wait(30))
    assert time.monotonic() - started < 10
    assert driver.call(lambda: "next") == "next"  # on another thread
    release.set()
    driver.close()


def test_a_closed_driver_runs_calls_on_the_caller_s_thread() -> None:
    driver = CallDriver()
    assert driver.call(threading.get_ident) != threading.get_ident()
    driver.close()
    assert driver.call(threading.get_ident) == threading.get_ident()


def test_a_stream_gets_a_job_on_the_driver_and_none_elsewhere() -> None:
    """``stream``: the main thread's stream runs on the driver with the job
    it records its call in; another thread's, or a closed driver's, runs
    where it is called, with no job (nothing to cancel it)."""
    driver = CallDriver()

    def where(job: CallJob | None) -> tuple[int, bool]:
        return threading.get_ident(), job is not None

    ran_on, with_job = driver.stream(where)
    assert ran_on != threading.get_ident() and with_job
    other: list[tuple[int, bool]] = []
    thread = threading.Thread(target=lambda: other.append(driver.stream(where)))
    thread.start()
    thread.join(10)
    assert other == [(thread.ident, False)]
    driver.close()
    assert driver.stream(where) == (threading.get_ident(), False)


def test_clients_left_unclosed_or_used_after_close_leave_no_thread(shared_server) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: each unclosed Client kept its call thread (300
    clients: 300 threads), and a call after close() started one."""
    import gc

    from kvstore import Client

    def threads() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))

    Client(shared_server.tcp, data_plane=False, aio_put=False).stats()  # (grpc's own threads)
    gc.collect()
    before = threads()
    for _ in range(30):
        Client(shared_server.tcp, data_plane=False, aio_put=False).stats()
    for _ in range(30):
        c = Client(shared_server.tcp, data_plane=False, aio_put=False)
        c.stats()
        c.close()
        with pytest.raises(ValueError):
            c.stats()
    gc.collect()
    deadline = time.monotonic() + 10
    while threads() > before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # bounded poll: the stopped threads end as they see it
    assert threads() <= before + 5, (before, threads())


def test_an_aio_put_never_scheduled_is_waited_for_once() -> None:
    """Found by a review: an interrupt inside run_coroutine_threadsafe left
    the Put unscheduled and its end unmarked; every later write waited out
    its timeout (now the main thread's Puts go through the driver, and a
    settle waits for such a Put once)."""
    import concurrent.futures

    from kvstore.client._aioput import AioPutter

    putter = AioPutter("127.0.0.1:1", [], None)
    putter._settling.append(concurrent.futures.Future())
    started = time.monotonic()
    putter.settle(0.2)
    putter.settle(0.2)
    putter.settle(0.2)
    assert time.monotonic() - started < 0.5
    putter.close()


def interrupted_reserve(interrupt_after: Any) -> tuple[
        CallDriver, threading.Event, list[tuple[str, int]], Any]:
    """A driver whose call (answered "slots" once ``release`` is set) was
    interrupted on the main thread: (driver, release, what its ``orphan``
    was handed, with the thread that handed it, the orphan)."""
    driver = CallDriver()
    release = threading.Event()
    handed: list[tuple[str, int]] = []

    def orphan(result: str) -> None:
        handed.append((result, threading.get_ident()))

    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.call(lambda: (release.wait(30), "slots")[1], orphan=orphan)
    return driver, release, handed, orphan


def test_an_interrupted_call_s_orphan_gets_its_result_once_it_ends(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    """A call whose answer holds something (a reserve's slots), interrupted:
    its ``orphan`` gets the answer on the driver as soon as it comes (a Put
    made meanwhile may be waiting for that room), once; an answer its caller
    got is never orphaned."""
    driver, release, handed, orphan = interrupted_reserve(interrupt_after)
    assert handed == []
    assert driver.call(lambda: "kept", orphan=orphan) == "kept"  # (another thread)
    release.set()
    deadline = time.monotonic() + 10
    while not handed:
        assert time.monotonic() < deadline, "the orphan never got the late answer"
        time.sleep(0.01)  # bounded poll: the driver hands it on as the call ends
    assert handed[0][0] == "slots" and handed[0][1] != threading.get_ident()
    assert driver.next_orphan() is None  # handed on once
    assert len(handed) == 1
    driver.close()


def test_a_call_given_up_after_it_ended_is_orphaned_at_the_next_look() -> None:
    """The interrupt can land after the answer came (the job ended, its
    result not yet taken): then the driver's look has passed, and
    ``next_orphan`` hands the result on, once, one job at a time (a second
    interrupt while one is given back leaves the others for the next look:
    a review saw them all lost)."""
    driver = CallDriver()
    handed: list[str] = []
    first = CallJob(lambda job: "slots 1", handed.append)
    second = CallJob(lambda job: "slots 2", handed.append)
    assert driver.run(first) == "slots 1"  # ended; their caller now gives them up:
    assert driver.run(second) == "slots 2"
    driver._orphaned(first)
    driver._orphaned(second)
    driver._orphaned(first)  # (recorded once)
    give_back = driver.next_orphan()
    assert give_back is not None
    give_back()
    assert handed == ["slots 1"]
    give_back = driver.next_orphan()
    assert give_back is not None
    give_back()
    assert handed == ["slots 1", "slots 2"]
    assert driver.next_orphan() is None
    failed = driver.submit(CallJob(lambda job: 1 // 0, handed.append))
    driver.settle(10)  # (ended: its outcome never read)
    assert failed.finished
    driver._orphaned(failed)
    assert driver.next_orphan() is None  # a call that failed holds nothing
    assert not driver._orphans
    driver.close()


def test_a_closing_caller_waits_for_an_interrupted_call_and_gives_its_result_back_itself(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C in a ``with`` block closes the client right after the interrupt:
    ``keep_orphans`` waits (bounded) for the call still running, and leaves
    its result to the closing caller's ``next_orphan``, not to the driver's
    thread (which handed it on while the client closed its channel)."""
    driver, release, handed, _ = interrupted_reserve(interrupt_after)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    driver.keep_orphans(10)
    assert 0.1 < time.monotonic() - started < 5  # waited for the call to end
    assert handed == []  # not handed on by the driver's thread
    give_back = driver.next_orphan()
    assert give_back is not None
    give_back()
    assert handed == [("slots", threading.get_ident())]
    driver.close()


def test_a_closing_caller_waits_for_an_orphan_being_handed_on(
        interrupt_after) -> None:  # type: ignore[no-untyped-def]
    """One the driver's thread is handing on as the client closes is waited
    for, within the same bound; a call that does not end in the bound is
    left to expire (close does not hang)."""
    driver = CallDriver()
    release, giving_back, given_back = threading.Event(), threading.Event(), threading.Event()

    def slow_orphan(result: str) -> None:
        giving_back.set()
        time.sleep(0.3)  # (the give-back's own round trip, under test)
        given_back.set()

    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        driver.call(lambda: (release.wait(30), "slots")[1], orphan=slow_orphan)
    release.set()
    assert giving_back.wait(10)
    driver.keep_orphans(10)
    assert given_back.is_set()
    assert driver.next_orphan() is None  # (handed on once)
    driver.close()

    stuck = CallDriver()
    never = threading.Event()
    interrupt_after(0.05)
    with pytest.raises(KeyboardInterrupt):
        stuck.call(lambda: (never.wait(30), "slots")[1], orphan=slow_orphan)
    started = time.monotonic()
    stuck.keep_orphans(0.3)
    assert time.monotonic() - started < 3
    assert stuck.next_orphan() is None  # (still running: its slots expire on the server)
    never.set()
    stuck.close()


def test_an_overdue_call_s_orphan_is_recorded_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: a call past its timeout was given up twice (once
    for being overdue, again by the handler of the error that raised), and
    its slots were given back twice."""
    driver = CallDriver(timeout=0.0)
    monkeypatch.setattr(driver, "_overdue", 0.2)
    release = threading.Event()
    handed: list[str] = []
    job = CallJob(lambda job: (release.wait(30), "slots")[1], handed.append)
    from kvstore.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded):
        driver.run(job)
    assert driver._orphans == [job]
    release.set()
    deadline = time.monotonic() + 10
    while not handed:
        assert time.monotonic() < deadline, "the orphan never got the late answer"
        time.sleep(0.01)  # bounded poll: the driver hands it on as the call ends
    assert handed == ["slots"] and driver.next_orphan() is None
    driver.close()


class InterruptingQueue:
    """Stands in for the driver's queue: a put interrupted just before or
    just after it queues the job (as a signal can land either side)."""

    def __init__(self, real: Any, after: bool) -> None:
        self.real, self.after, self.armed = real, after, True

    def put(self, job: Any) -> None:
        if self.armed and job is not None:
            self.armed = False
            if self.after:
                self.real.put(job)
            raise KeyboardInterrupt
        self.real.put(job)

    def get(self) -> Any:
        return self.real.get()


@pytest.mark.parametrize("after", [False, True], ids=["before-queued", "after-queued"])
def test_a_write_interrupted_as_it_is_submitted_never_holds_the_next_write_up(
        after: bool) -> None:
    """Found by a review: a submitted write interrupted before the queue
    took it was recorded but never run, and the next write (a Delete)
    waited out its whole timeout for it. Now it is taken back, whether the
    queue took it or not (then the driver skips it), unless the driver has
    begun it."""
    driver = CallDriver()
    ran: list[str] = []
    driver.call(lambda: None)  # (the thread and its queue exist)
    real = driver._jobs
    driver._jobs = InterruptingQueue(real, after)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        driver.submit(CallJob(lambda job: ran.append("interrupted write")))
    started = time.monotonic()
    driver.settle(5)
    assert time.monotonic() - started < 1, "the next write waited for a write never run"
    assert driver.call(lambda: "next") == "next"  # (behind it on the queue, if queued)
    assert ran == []
    driver.close()


def test_calls_after_one_left_overdue_behind_a_stuck_call_get_a_new_thread(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: a call past its time that never began (its thread
    stuck in an earlier call) was taken back but the stuck thread kept, and
    every later call waited out its own overdue time behind it."""
    from kvstore.errors import DeadlineExceeded

    driver = CallDriver(timeout=0.0)
    monkeypatch.setattr(driver, "_overdue", 0.3)
    release = threading.Event()
    ran: list[str] = []
    driver.submit(CallJob(lambda job: release.wait(30)))  # the stuck call
    with pytest.raises(DeadlineExceeded):
        driver.run(CallJob(lambda job: ran.append("taken back")))
    started = time.monotonic()
    assert driver.run(CallJob(lambda job: "next")) == "next"
    assert time.monotonic() - started < 0.3, "the next call waited behind the stuck one"
    release.set()
    driver.settle(10)
    assert ran == []  # (taken back: it never runs)
    driver.close()
