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
import os
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")

#: How long an interrupted Get waits for the driver to stop writing into the
#: caller's buffers (it checks between messages: one message's copy).
STOP_WAIT_S = 10.0


class CallJob:
    """One call handed to the driver: what it runs, its outcome, and (for a
    stream) the call to cancel when the waiting thread is interrupted."""

    __slots__ = ("call", "cancelled", "claim", "done", "error", "finished", "result", "run")

    def __init__(self, run: Callable[[CallJob], Any]) -> None:
        self.run = run
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
        """Record a stream's call as soon as it exists: one the waiting
        thread gave up on before that is cancelled here."""
        self.call = call
        if self.cancelled:
            call.cancel()

    def cancel(self) -> None:
        # Either this sees the call or started() sees the flag (the GIL
        # orders the two writes and the two reads).
        self.cancelled = True
        call = self.call
        if call is not None:
            call.cancel()


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
    up the interpreter's exit."""

    def __init__(self) -> None:
        self._jobs: SimpleQueue[CallJob | None] | None = None  # None: no thread
        #: writes interrupted before their answer (see settle())
        self._unsettled: list[CallJob] = []
        self._pid = os.getpid()  # the process whose thread reads ``_jobs``

    def call(self, fn: Callable[[], T], write: bool = False) -> T:
        """``fn()``, on the driver when this is the main thread. ``write``: a
        call that stores or removes blocks (see :meth:`settle`)."""
        if not on_main_thread():
            return fn()
        return self.run(CallJob(lambda job: fn()), write)

    def run(self, job: CallJob, write: bool = False) -> Any:
        """Run ``job`` on the driver and return what it returned (or raise
        what it raised). Interrupted: a stream is cancelled and, before the
        interrupt goes on, has stopped writing into the caller's buffers; a
        unary call goes on to its end on this thread while later calls get
        another."""
        jobs = self._jobs
        if jobs is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                self._unsettled, self._pid = [], os.getpid()  # (the parent's threads')
            jobs = self._jobs = SimpleQueue()
            _thread.start_new_thread(_drive, (jobs,))
        try:
            jobs.put(job)
            job.done.acquire()
        except BaseException:
            # (the interrupt may come just after the acquire succeeded: then
            # the lock is this thread's and the job over, nothing to wait
            # for; or before the driver started the job: then it never will)
            if not job.finished and not job.claim.acquire(blocking=False):
                job.cancel()
                if job.call is None or not job.done.acquire(timeout=STOP_WAIT_S):
                    self._retire()
                    if write:
                        self._unsettled.append(job)
            raise
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return job.result

    def settle(self, timeout: float | None) -> None:
        """Before a write: wait (at most ``timeout`` each) for the writes
        interrupted before their answer (a Put, a Delete, a Flush: they go
        on), so that none lands after this one (a Delete acknowledged, then
        undone by an interrupted Put)."""
        if self._unsettled and self._pid != os.getpid():
            self._unsettled = []  # (the parent's threads were answering them)
        while self._unsettled:
            job = self._unsettled[0]
            if not job.finished:
                job.done.acquire(timeout=-1 if timeout is None else timeout)
            self._unsettled.pop(0)

    def _retire(self) -> None:
        """The thread finishes the call it runs, then ends; the next call
        starts another."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None

    def close(self) -> None:
        if self._pid == os.getpid():
            self._retire()


def _drive(jobs: SimpleQueue[CallJob | None]) -> None:
    while (job := jobs.get()) is not None:
        if not job.claim.acquire(blocking=False):
            continue  # its caller gave up on it before it began
        try:
            job.result = job.run(job)
        except BaseException as exc:  # handed to the waiting thread
            job.error = exc
        finally:
            job.finished = True
            job.done.release()
        del job
