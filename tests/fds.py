"""Counting this process's open descriptors, for tests that a close leaves
nothing open."""

from __future__ import annotations

import gc
import os
import time


def open_fds() -> dict[str, str]:
    """This process's open descriptors and what each is."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (the listing's own descriptor, closed by now)
            continue
    return out


def fds_opened_since(before: dict[str, str], wait_s: float = 15.0) -> list[str]:
    """What is open now that was not in ``before``, once what closes late has
    closed (an empty list as soon as nothing is). A gRPC call cut by a close
    ends in an exception whose traceback holds its frames, and with them
    grpc's call objects, which hold the channel's socket: Python's cycle
    collector frees them, not the close (collected here). grpc's threads
    close the channel's descriptors in their own time: a bounded wait."""
    deadline = time.monotonic() + wait_s
    while (opened := _opened(before)) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)  # (polling a count, not synchronising with anything we control)
    return opened


def _opened(before: dict[str, str]) -> list[str]:
    # By descriptor and what it is: a number closed since (an event loop's)
    # and reused by a new socket counts as new.
    return sorted(what for fd, what in open_fds().items() if before.get(fd) != what)
