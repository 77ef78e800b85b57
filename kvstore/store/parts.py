"""What the store's parts share: the objects every part calls, handed to
each once when :class:`kvstore.store.tiered.TieredStore` builds them (see
:mod:`kvstore.store` for who calls what), and small helpers."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from kvstore.policy import Policy
from kvstore.store.index import Index
from kvstore.store.stats import Stats
from kvstore.tiers.base import WriteDone
from kvstore.tiers.memory import MemoryTier

log = logging.getLogger("kvstore.store")


class LoopHandoff:
    """Calls from another thread (the L2 writer's completions), run on the
    event loop in the order made, with one wake-up of the loop per burst.

    ``loop.call_soon_threadsafe`` per call writes to the loop's wake-up
    socket each time, and every such write gives up the GIL: while the event
    loop is busy (a Put storm walking L1 for victims) the writer then waits up
    to a switch interval (5 ms) to get it back, once per block -- a
    1,000-block commit measured 2-8 s instead of milliseconds, and the writer
    falling behind made the loop busier still. Here only the first call of a
    burst wakes the loop; the rest join the queue it drains."""

    __slots__ = ("_calls", "_lock", "_scheduled", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = \
            collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (from any thread)."""
        with self._lock:
            self._calls.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    self._scheduled = False
                    return
                batch = list(self._calls)
                self._calls.clear()
            for fn, args in batch:
                try:
                    fn(*args)
                except Exception:  # one completion's bug must not lose the others
                    log.exception("store completion failed")


class Progress:
    """Wakes Puts waiting for L1 room or L2 write-queue room whenever a pin,
    a reservation or a queued write goes."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def start(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()

    async def wait(self, deadline: float) -> bool:
        """False once ``deadline`` (time.monotonic) passed with no progress."""
        assert self._event is not None
        self._event.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(self._event.wait(), remaining)
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Shared:
    """The index and counters, the policy and its clock, the L1 arena, the
    executor for blocking work, the wake-up for waiting Puts, and whether L1
    bytes are checked on their way out (``l1.verify_reads``)."""

    index: Index
    stats: Stats
    policy: Policy
    clock: Callable[[], float]
    l1: MemoryTier
    executor: concurrent.futures.ThreadPoolExecutor
    progress: Progress
    verify_l1: bool = True


class Part:
    """A part of the store: the shared objects as its own attributes (one
    attribute load each on the hot paths, not two)."""

    def __init__(self, shared: Shared) -> None:
        self.index = shared.index
        self.stats = shared.stats
        self.policy = shared.policy
        self.clock = shared.clock
        self.l1 = shared.l1
        self.executor = shared.executor
        self.progress = shared.progress


def writer_settled(loop: asyncio.AbstractEventLoop) \
        -> tuple[asyncio.Future[BaseException | None], WriteDone]:
    """A future on ``loop`` and the L2 writer's ``done`` callback that settles
    it, from the writer thread, with the write's error (None: committed)."""
    settled: asyncio.Future[BaseException | None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not settled.done():
            settled.set_result(error)

    def done(error: BaseException | None, existed: bool) -> None:  # writer thread
        loop.call_soon_threadsafe(settle, error)
    return settled, done


def spawn(tasks: set[asyncio.Task[None]],
          coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coro`` in the background, held in ``tasks`` until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
