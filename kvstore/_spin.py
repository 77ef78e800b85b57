"""Busy polling a socket for an answer that is about to arrive: the
pure-Python specification of the native ``wait_readable`` (kvstore/_impl.py
chooses one).

Why spin at all: a thread that sleeps in ``recv`` while its answer is tens
of microseconds away is woken by the kernel when the answer lands, and on a
virtual machine waking a halted vCPU costs an inter-processor interrupt and
a VM exit each way, ~40 µs measured here (docs/performance.md, "Busy
polling"): a fifth of a 1 MiB shared-memory Get. A thread that polls instead
keeps its vCPU running, so the answer needs no wake-up. The SDK spins only
for a bounded time per answer (``busy_poll_us``), then sleeps as before: the
cost is at most that much client CPU per call, and between two polls the
thread yields its CPU to anything else runnable there.
"""

from __future__ import annotations

import os
import select
import time

#: The longest a busy poll may be asked to last (µs), by a client
#: (``busy_poll_us``) or the server (``server.busy_poll_us``): past a few
#: milliseconds a poll only burns the CPU a sleep would give back. Here, a
#: module with no native import, so that config loading can read it.
MAX_BUSY_POLL_US = 10_000


def wait_readable(fd: int, spin_ns: int) -> bool:
    """Poll ``fd`` with a zero timeout until it is readable (or has an error
    or hang-up, which the caller's receive then reports) or ``spin_ns``
    nanoseconds have passed. True when it became ready, False when the time
    ran out (the caller then waits in the kernel as usual)."""
    if fd < 0:
        raise ValueError(f"not an open file descriptor: {fd}")
    if spin_ns <= 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic_ns() + spin_ns
    while True:
        if poller.poll(0):
            return True
        if time.monotonic_ns() >= deadline:
            return False
        # Between polls the CPU goes to whatever else is runnable on it (the
        # server, when both share a CPU): measured, p99 of a 4 KiB Get 133 ->
        # 86 µs unpinned, and no worse on separate CPUs.
        os.sched_yield()
