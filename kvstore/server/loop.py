"""The server's event loop: asyncio's selector loop (epoll on Linux),
busy-polling for a moment after each burst of activity
(``server.busy_poll_us``).

Why: between two requests of one client the loop sleeps in ``epoll_wait``
and its thread's vCPU halts; the next request then pays for waking it (an
inter-processor interrupt and, on a virtual machine, a VM exit: ~40 µs
measured here, more than the whole work of a small Get). An engine asking for
one chunk at a time sends its next request shortly after the answer (a 1 MiB
shared-memory Get: the client's copy, ~75 µs), so a loop that keeps polling
that long after it answered finds the request without sleeping. Measured on
this 2-vCPU VM (docs/performance.md, "Server busy poll"): the p50 of a 1 MiB
shm Get 267 → 144 µs and of a 4 KiB data-plane Get 58-69 → 31-40 µs.

The cost is bounded: the loop spins only after a ``select`` that returned
events, for at most ``busy_poll_us`` (and never past the loop's own timeout),
with the GIL released and the CPU yielded between polls
(:func:`kvstore._impl.wait_readable`, the same poll the SDK uses). An idle
server spins once per burst and then sleeps as before; a busy one spends at
most ``busy_poll_us`` of CPU per request that arrives later than that, and
after 8 spins in a row that found nothing it spins only once per 64 bursts
until one finds a request (clients whose requests come later than the spin
lasts cost it almost nothing). A spin whose request came only a little later
(within twice its time) doubles the next spins instead of counting as a miss
(``MAX_SCALE``). ``0`` turns it off (the plain asyncio loop).

Under a CPU quota (a container's ``cpu`` limit) the spin spends the quota:
a loop whose spins keep finding requests runs its CPU flat out, and a quota
of half a CPU was then throttled for a third of the time, its requests
stalled for the rest of each period (docs/deploy.md, "Under a CPU quota").
So the loop reads its cgroup's count of throttled periods once a second
(``cpu.stat``; nothing when there is no cgroup ``cpu`` controller) and does
not spin for ``THROTTLED_PAUSE_S`` after the count rose (kvstore/cpuquota.py,
which the SDK's poll reads too).
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable
from pathlib import Path

from kvstore._impl import wait_readable
from kvstore._spin import MAX_BUSY_POLL_US
from kvstore.cpuquota import ThrottleWatch, cpu_stat_path

#: Spins in a row that ran out with nothing after which the loop stops
#: spinning (its clients' requests come later than the spin lasts: large
#: blocks being received, a remote client), and how often it then tries one
#: again; a spin that finds an event turns spinning back on. The SDK's poll
#: follows the same rule (kvstore/client/dataplane.py).
GIVE_UP_AFTER = 8
RETRY_EVERY = 64
#: A spin that ran out, with an event arriving within this many times its
#: budget of the spin's start, doubles the spin (up to this many times the
#: budget) instead of counting towards giving up: the client was only a little
#: slower than the spin (a 1 MiB shm Put's next commit comes after the
#: client's copy, ~150-250 µs, around the default 200 µs). Measured, two
#: servers side by side, rounds alternated: 1 MiB shm Put p50 340 -> 330 and
#: 388 -> 341 µs, shm Get 180 -> 151 and 146 -> 142 µs, 1 MiB TCP Get 525 ->
#: 489 and 478 -> 479 µs with no more server CPU per Get (docs/performance.md).
MAX_SCALE = 2
class BusyPollSelector(selectors.DefaultSelector):
    """The platform's selector (epoll on Linux) whose blocking ``select``
    first polls the selector's own descriptor (readable when any registered
    one has events) for up to ``busy_poll_us``, when the previous ``select``
    found something. A selector without a descriptor of its own (``poll``
    or ``select`` based) never spins."""

    def __init__(self, busy_poll_us: int,
                 cpu_stat: Callable[[], Path | None] | None = None) -> None:
        if not 0 <= busy_poll_us <= MAX_BUSY_POLL_US:
            raise ValueError(f"busy_poll_us must be in 0..{MAX_BUSY_POLL_US}, not {busy_poll_us}")
        super().__init__()
        own_fd = getattr(self, "fileno", None)
        self._fd: int = own_fd() if own_fd is not None else -1
        self.busy_poll_ns = busy_poll_us * 1000 if self._fd >= 0 else 0
        self._active = False
        self._misses = 0  # spins in a row that ran out
        self._scale = 1  # the spin's window in multiples of busy_poll_ns
        #: Spins started, and those that found an event before their time ran out.
        self.spins = 0
        self.caught = 0
        #: Whether the cgroup's CPU quota ran out lately (None: not watched).
        self._quota = ThrottleWatch(cpu_stat) if self.busy_poll_ns and cpu_stat else None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._active and self.busy_poll_ns and (timeout is None or timeout > 0) and \
                self._spin_now():
            budget = self.busy_poll_ns * self._scale
            if timeout is not None:
                budget = min(budget, int(timeout * 1e9))
            self.spins += 1
            started = time.monotonic()
            if wait_readable(self._fd, budget):
                self.caught += 1
                self._misses = 0
                timeout = 0
            else:
                if timeout is not None:
                    # The loop's timers keep their time: the spin counts against it.
                    timeout = max(0.0, timeout - (time.monotonic() - started))
                ready = super().select(timeout)
                self._active = bool(ready)
                if ready and self._scale < MAX_SCALE and \
                        time.monotonic() - started <= self.busy_poll_ns * MAX_SCALE / 1e9:
                    self._scale *= 2  # a little late: a wider spin would have caught it
                else:
                    self._misses += 1
                    if self._misses >= GIVE_UP_AFTER:
                        self._scale = 1
                return ready
        ready = super().select(timeout)
        self._active = bool(ready)
        return ready

    def _spin_now(self) -> bool:
        if self._quota is not None and not self._quota.quota_left():
            return False
        misses = self._misses
        if misses < GIVE_UP_AFTER:
            return True
        self._misses = misses + 1  # counts the bursts passed over too
        return (misses - GIVE_UP_AFTER) % RETRY_EVERY == RETRY_EVERY - 1


def busy_poll_counts(loop: asyncio.AbstractEventLoop) -> tuple[int, int] | None:
    """(spins, spins that found a request) of ``loop``'s selector; None when
    the loop does not busy-poll. The one place that reads the loop's
    selector (asyncio keeps it in a private attribute)."""
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, BusyPollSelector):
        return selector.spins, selector.caught
    return None


def loop_factory(busy_poll_us: int) -> Callable[[], asyncio.AbstractEventLoop]:
    """What ``asyncio.Runner`` builds the server's loop with."""
    if busy_poll_us == 0:
        return asyncio.new_event_loop
    return lambda: asyncio.SelectorEventLoop(BusyPollSelector(busy_poll_us, cpu_stat_path))
