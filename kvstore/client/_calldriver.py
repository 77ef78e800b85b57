"""The main thread's gRPC calls, made from a thread of the client's own.

A signal handler's exception (Ctrl-C's KeyboardInterrupt) is raised in the
main thread wherever it happens to be. Inside grpc's sync code it could land
between the acquire and the release of one of the channel's locks (grpc
takes them through ``threading.Condition``, Python code): the lock stayed
held and every later call on that channel hung past its timeout (a review:
40 interrupts of 16 MiB Gets wedged 3 runs of 3; 1,000 of small Gets,
Lookups or Deletes, 3 of 3 each). So a main thread's call runs on
:class:`CallDriver`'s thread, and the main thread waits on a bare lock the
driver releases (a release never waits: an interrupt in that wait leaves
nothing held). Other threads never receive signals and call grpc themselves.
The hand-over costs one thread wake-up each way (~20-40 µs here,
docs/performance.md).
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

#: How long an interrupted Get waits for the driver to stop writing into the
#: caller's buffers (it checks between messages: one message's copy).
STOP_WAIT_S = 10.0

#: How much longer than the client's timeout the caller waits for a call's
#: thread before it leaves the call there (DeadlineExceeded): grpc ends the
#: call at its deadline, so only a thread wedged in grpc waits this long.
OVERDUE_S = 30.0

#: How often a write that waits for an interrupted one looks whether it ended.
SETTLE_POLL_S = 0.05

#: How long a closing client waits for the calls its caller gave up on that
#: hold something (a reserve's slots; see CallDriver.keep_orphans).
ORPHAN_CLOSE_WAIT_S = 2.0


class CallJob:
    """One call handed to the driver: what it runs, its outcome, and (for a
    stream) the call to cancel when the waiting thread is interrupted."""

    __slots__ = ("call", "cancelled", "claim", "done", "error", "finished", "orphan", "result",
                 "run")

    def __init__(self, run: Callable[[CallJob], Any],
                 orphan: Callable[[Any], None] | None = None) -> None:
        self.run = run
        #: For a call whose result holds something (a reserve's slots): what
        #: to do with that result once the caller has given up on the call
        #: (see CallDriver.next_orphan).
        self.orphan = orphan
        self.call: Any = None  # a stream's, set by ``run`` through started()
        self.cancelled = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False  # set before ``done`` is released
        self.done = threading.Lock()
        self.done.acquire()
        # taken (test-and-set, no wait) by the driver as it starts the job,
        # or by the caller giving up on it first: then it never starts
        self.claim = threading.Lock()

    def started(self, call: Any) -> None:
        """Record a stream's call as soon as it exists (on the driver): one
        the waiting thread gave up on before that is cancelled here."""
        self.call = call
        if self.cancelled:
            call.cancel()

    def cancel(self) -> None:
        """Cancel the job's call from a thread of its own: grpc's cancel takes
        the call's lock in Python code, where a second interrupt of the
        caller's thread could land (a review: a double Ctrl-C hung the
        client). Either this sees the call or started() sees the flag (the
        GIL orders the two writes and the two reads)."""
        self.cancelled = True
        call = self.call
        if call is not None:
            _thread.start_new_thread(call.cancel, ())


def on_main_thread() -> bool:
    """Whether this is the thread signal handlers run on."""
    return threading.get_ident() == threading.main_thread().ident


class CallDriver:
    """A thread running the main thread's calls one after another, started
    at the first call, after a fork (the child has no threads but its own)
    and after an interrupt left one running. Started with
    ``_thread.start_new_thread``: ``threading.Thread.start`` waits on a
    ``threading.Event``, whose lock an interrupt can leave in disorder too
    (seen: "release unlocked lock"). Like a daemon thread, it does not hold
    up the interpreter's exit. ``timeout``: the client's, per call."""

    def __init__(self, timeout: float | None = None) -> None:
        self._jobs: SimpleQueue[CallJob | None] | None = None  # None: no thread
        self._overdue = None if timeout is None else timeout + OVERDUE_S
        #: writes interrupted before their answer (see settle())
        self._unsettled: list[CallJob] = []
        #: jobs with an ``orphan`` their callers gave up on (see next_orphan())
        self._orphans: list[CallJob] = []
        #: orphans the driver's thread is handing on now (see _hand_on)
        self._handing_on = 0
        #: the client is closing: orphans are left to it (see keep_orphans)
        self._keep_orphans = False
        self._lock = threading.Lock()  # (for both lists: any thread's calls read them)
        self._pid = os.getpid()  # the process whose thread reads ``_jobs``
        self.closed = False

    def call(self, fn: Callable[[], T], write: bool = False,
             orphan: Callable[[T], None] | None = None) -> T:
        """``fn()``, on the driver when this is the main thread. ``write``: a
        call that stores or removes blocks (see :meth:`settle`); ``orphan``:
        see :class:`CallJob`."""
        if self.closed or not on_main_thread():
            return fn()
        return self.run(CallJob(lambda job: fn(), orphan), write)

    def hands_over(self) -> bool:
        """Whether this thread's calls are made on the driver (the main
        thread's, while the driver is open)."""
        return not self.closed and on_main_thread()

    def submit(self, job: CallJob) -> CallJob:
        """Queue a write ``job`` on the driver and return at once (the main
        thread's later calls queue behind it); recorded first for the next
        write to wait for (:meth:`settle`), as an interrupted write is. Its
        outcome: :meth:`outcome`. For :meth:`hands_over` threads."""
        # (the queue first: after a fork it empties the record, and an
        # interrupt while it starts a thread leaves nothing recorded unqueued)
        jobs = self._queue()
        try:
            with self._lock:
                self._unsettled.append(job)
            jobs.put(job)
        except BaseException:
            # Interrupted just before or after the put: taken back unless the
            # driver has begun it (then it never runs, queued or not, and the
            # next write must not wait for it: a review saw a Delete wait out
            # its whole timeout); begun, it goes on as an interrupted write.
            if job.claim.acquire(blocking=False):
                with self._lock, contextlib.suppress(ValueError):
                    self._unsettled.remove(job)
            else:
                self._orphaned(job)
            raise
        return job

    def outcome(self, job: CallJob, timeout: float | None) -> Any:
        """What a :meth:`submit`-ted job returned (or raise what it raised),
        waiting for it at most ``timeout`` + OVERDUE_S. Interrupted, the job
        goes on (the next write waits for it) while later calls get another
        thread, as :meth:`run`'s."""
        try:
            finished = self._wait_finished(
                job, None if timeout is None else timeout + OVERDUE_S)
            if finished:
                with self._lock, contextlib.suppress(ValueError):
                    self._unsettled.remove(job)
        except BaseException:
            self._orphaned(job)  # (its answer, come or to come, is nobody's)
            if not job.finished:
                self._retire()
            raise
        if not finished:
            self._orphaned(job)
            self._retire()
            raise _overdue_error()
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def stream(self, run: Callable[[CallJob | None], T]) -> T:
        """``run(job)`` on the driver when this is the main thread (a stream's
        call: ``run`` records it with ``job.started`` and stops writing into
        the caller's buffers once ``job.cancelled``), else ``run(None)`` here."""
        if self.closed or not on_main_thread():
            return run(None)
        result: T = self.run(CallJob(run))
        return result

    def run(self, job: CallJob, write: bool = False) -> Any:
        """Run ``job`` on the driver and return what it returned (or raise
        what it raised). Interrupted: a stream is cancelled and, before the
        interrupt goes on, has stopped writing into the caller's buffers; a
        unary call goes on to its end on this thread while later calls get
        another. After :meth:`close`, on the caller's thread (the closed
        channel says so)."""
        if self.closed:
            return job.run(job)
        jobs = self._queue()
        given_up = False  # (overdue: given up once, not again by the except below)
        try:
            jobs.put(job)
            if not job.done.acquire(timeout=-1 if self._overdue is None else self._overdue):
                given_up = True
                if job.claim.acquire(blocking=False):
                    # Never begun: the thread is stuck in an earlier job; the
                    # next calls get another (a review: each waited out its
                    # own overdue time behind the stuck one).
                    self._retire()
                else:  # begun: left to its thread
                    self._give_up(job, write)
                raise _overdue_error()
        except BaseException:
            # (the interrupt may come just after the acquire succeeded: then
            # the lock is this thread's and the job over, nothing to wait
            # for but its result to hand on; or before the driver started
            # the job: then it never will)
            if not given_up and not job.claim.acquire(blocking=False):
                if job.finished:
                    self._orphaned(job)
                else:
                    self._give_up(job, write)
            raise
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def _queue(self) -> SimpleQueue[CallJob | None]:
        """The driver's queue, its thread started if there is none (or it
        was the parent's, before a fork)."""
        jobs = self._jobs
        if jobs is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                with self._lock:  # (the parent's threads' and the parent's results)
                    self._unsettled, self._orphans, self._pid = [], [], os.getpid()
            jobs = self._jobs = SimpleQueue()
            _thread.start_new_thread(_drive, (jobs, self._hand_on))
        return jobs

    def _give_up(self, job: CallJob, write: bool) -> None:
        """The caller leaves a job its driver has begun: a stream is cancelled
        and waited for (briefly) to stop; a write is recorded for the next
        write to wait for; a driver still busy is left to it."""
        if write:  # (recorded first: nothing below may lose it)
            with self._lock:
                self._unsettled.append(job)
        self._orphaned(job)
        stream = job.call is not None
        job.cancel()
        # (a stream not yet begun is cancelled as it begins, before any write)
        if not job.finished and (not stream or not job.done.acquire(timeout=STOP_WAIT_S)):
            self._retire()

    def settle(self, timeout: float | None) -> None:
        """Before a write: wait (at most ``timeout`` each) for the writes
        interrupted before their answer (a Put, a Delete, a Flush: they go
        on), so that none lands after this one (a Delete acknowledged, then
        undone by an interrupted Put). Any thread's write may wait, several
        at once: each looks at ``finished`` (``done`` is taken once)."""
        if not self._unsettled:
            return
        if self._pid != os.getpid():
            with self._lock:
                self._unsettled = []  # (the parent's threads were answering them)
            return
        with self._lock:
            waiting = list(self._unsettled)
        for job in waiting:
            self._wait_finished(job, timeout)
            with self._lock, contextlib.suppress(ValueError):
                self._unsettled.remove(job)

    def _orphaned(self, job: CallJob) -> None:
        """Record a job the caller gave up on whose result holds something
        (its ``orphan``) for :meth:`_hand_on` or :meth:`next_orphan`."""
        if job.orphan is not None:
            with self._lock:
                if job not in self._orphans:
                    self._orphans.append(job)

    def _hand_on(self, job: CallJob) -> None:
        """On the driver, as a job with an ``orphan`` ends: if its caller has
        given up on it already, apply the ``orphan`` here and now (a reserve
        waiting for room would not see its room come back until the caller's
        next write). One the caller gives up on later is left to :meth:`next_orphan`;
        either takes it from the list under the lock: it is handed on once."""
        if not self._orphans:
            return  # (the usual case: its caller took the answer)
        with self._lock:
            if self._keep_orphans:
                return  # (its client gives it back as it closes)
            try:
                self._orphans.remove(job)
            except ValueError:
                return
            self._handing_on += 1
        try:
            if job.error is None and job.orphan is not None:
                with contextlib.suppress(Exception):  # (what it gives back expires anyway)
                    job.orphan(job.result)
        finally:
            with self._lock:
                self._handing_on -= 1

    def keep_orphans(self, timeout: float = ORPHAN_CLOSE_WAIT_S) -> None:
        """As the client closes: from now on the jobs given up on are left to
        :meth:`next_orphan` (the closing caller's), not handed on from the
        driver's thread; wait, at most ``timeout`` in all, for those still
        running to end and for any being handed on now. (Ctrl-C in a ``with``
        block closes the client at once: the interrupted reserve was
        answered on a closing channel, and its slots stayed reserved until
        ``server.shm_reserve_ms``.)"""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._keep_orphans = True
            if self._pid != os.getpid():
                return  # (the parent's: no thread here runs them)
            waiting = [job for job in self._orphans if not job.finished]
        for job in waiting:
            self._wait_finished(job, max(deadline - time.monotonic(), 0.0))
        while self._handing_on and time.monotonic() < deadline:
            time.sleep(SETTLE_POLL_S)

    def next_orphan(self) -> Callable[[], None] | None:
        """The next job its caller gave up on (interrupted) that has ended
        since, taken off the list: its ``orphan`` applied to its result (a
        reserve's slots, to give back); None when there is none. Never
        waits: a job still running stays for a later look."""
        if not self._orphans:
            return None
        with self._lock:
            if self._pid != os.getpid():
                self._orphans = []  # (the parent's)
                return None
            for job in [job for job in self._orphans if job.finished]:
                self._orphans.remove(job)
                if job.error is None and job.orphan is not None:
                    return functools.partial(job.orphan, job.result)
        return None  # (the ones that failed hold nothing)

    @staticmethod
    def _wait_finished(job: CallJob, timeout: float | None) -> bool:
        """Wait (at most ``timeout``) until ``job`` has finished; whether it
        has. Several threads may wait: each looks at ``finished`` (``done``
        is taken once, and given back at once for the others)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.finished:
            left = SETTLE_POLL_S if deadline is None else \
                min(SETTLE_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return False
            if job.done.acquire(timeout=left):
                job.done.release()
                break
        return True

    def _retire(self) -> None:
        """The thread finishes the call it runs, then ends; the next call
        starts another. (The queue is unhooked before the thread is told: an
        interrupt in between left the next calls on a queue no one read.)"""
        jobs, self._jobs = self._jobs, None
        if jobs is not None:
            jobs.put(None)

    def close(self) -> None:
        """Stop the thread (also run when the client is collected unclosed);
        later calls run on their callers' threads."""
        self.closed = True
        if self._pid == os.getpid():
            self._retire()


def _drive(jobs: SimpleQueue[CallJob | None], hand_on: Callable[[CallJob], None]) -> None:
    while (job := jobs.get()) is not None:
        if not job.claim.acquire(blocking=False):
            continue  # its caller gave up on it before it began
        try:
            job.result = job.run(job)
        except BaseException as exc:  # handed to the waiting thread
            job.error = exc
        finally:
            # grpc's call object is let go here: its clean-up takes grpc's
            # locks, and on the caller's thread an interrupt could land in it
            job.call = None
            job.finished = True
            job.done.release()
        if job.orphan is not None:
            hand_on(job)
        del job


def _overdue_error() -> Exception:
    """What a caller gets when its call's thread ran past the client's
    timeout and OVERDUE_S more (the call is left there)."""
    from kvstore.errors import DeadlineExceeded

    return DeadlineExceeded(
        f"the call did not end within the client's timeout and {OVERDUE_S:g} s "
        "more: it is left running on its thread")
