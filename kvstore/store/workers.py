"""The store's worker threads (``server.workers``): LMDB reads, checks of large
blocks, native work.

Two rules keep a worker's job from writing into L1 pages that are no longer
its caller's:

* **Every thread starts with the server.** ``ThreadPoolExecutor`` starts its
  threads one by one as jobs come, and queues a job *before* it tries to
  start a thread for it: where the process may not start one more thread (a
  container's ``pids.max``, ``ulimit -u``), ``submit`` raised while the job
  stayed queued, the caller gave back the L1 extent the job was to fill, and
  the job, run later by another thread, wrote an L2 block's bytes into pages
  another block had since been given (a wrong block served: seen under a
  pids limit). With every thread started at start-up, a job never needs a new
  one; a server that cannot start them says so and does not start.
* **A job that fills L1 is waited for** (:func:`run_filling`): a caller
  cancelled while its job runs (a client that gives up on a Get) gives its
  extent back only once the job has returned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from kvstore.errors import InvalidConfig

T = TypeVar("T")

#: How long the threads may take to start together.
START_TIMEOUT_S = 30.0


def start_workers(count: int, name: str = "kvstore-io") -> concurrent.futures.ThreadPoolExecutor:
    """A pool of ``count`` threads, every one of them running before it is
    returned (InvalidConfig, naming server.workers, when they cannot start)."""
    executor = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix=name)
    # Each job holds its thread at the barrier until all have started, so
    # each submit finds no idle thread and starts one of its own.
    barrier = threading.Barrier(count)
    try:
        started = [executor.submit(barrier.wait, START_TIMEOUT_S) for _ in range(count)]
        for job in started:
            job.result(timeout=START_TIMEOUT_S + 1)
    except (RuntimeError, threading.BrokenBarrierError, concurrent.futures.TimeoutError) as exc:
        barrier.abort()
        executor.shutdown(wait=False, cancel_futures=True)
        raise InvalidConfig(
            f"server.workers: cannot start {count} worker threads ({exc or type(exc).__name__}); "
            "raise the limit on threads (ulimit -u, the container's pids limit) or lower "
            "server.workers") from None
    return executor


async def run_filling(executor: concurrent.futures.Executor, fn: Callable[..., T],
                      *args: object) -> T:
    """``fn(*args)`` on ``executor``, for a job that writes into L1 pages the
    caller gives back when this returns or raises: if the caller is cancelled
    while the job runs, the cancellation waits for the job to return (a
    copy: milliseconds); a job not started yet is cancelled at once."""
    job = executor.submit(fn, *args)
    done = asyncio.wrap_future(job)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        if not job.cancel():  # running: it writes into the pages until it returns
            while not done.done():
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    continue  # cancelled again: still not before the job ends
                except BaseException:  # its outcome no longer matters
                    pass
        raise
