"""Whether this process's CPU quota ran out lately: the cgroup's count of
throttled periods, read at most once a second.

Why: a busy poll (the server's event loop after answering, the SDK's wait
for an answer) trades CPU for latency. Under a CPU quota (a container's
``cpu`` limit) that CPU is the quota's: a loop whose spins keep finding
requests ran its CPU flat out, and a quota of half a CPU was then throttled
for a third of the time, its requests stalled for the rest of each period
(docs/deploy.md, "Under a CPU quota"). So both stop polling for
``THROTTLED_PAUSE_S`` after the count rose. One place finds and reads the
count for both (kvstore/server/loop.py, kvstore/client/dataplane.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

#: How often (s) the count of throttled periods is read, and how long (s)
#: polling stays off after it rose. Measured, quota of half a CPU, one
#: client's 4 KiB Gets one after another, 4 rounds each, same run: 32-34
#: MB/s, p99 0.51-0.56 ms, throttled 0.14-0.69 s of 3 s with the server
#: spinning; 37-39 MB/s, p99 0.19-0.46 ms, throttled 0.00-0.13 s with the
#: pause, as with busy_poll_us 0 (docs/deploy.md, "Under a CPU quota").
THROTTLE_CHECK_S = 1.0
THROTTLED_PAUSE_S = 10.0


def cpu_stat_path(proc_cgroup: str = "/proc/self/cgroup",
                  root: str = "/sys/fs/cgroup") -> Path | None:
    """The ``cpu.stat`` of this process's cgroup (v1 ``cpu`` controller or
    v2), None when there is none. Inside a container whose cgroup namespace
    hides the path, the mount's own ``cpu.stat`` is the container's."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        rel = path.lstrip("/")
        if "cpu" in controllers.split(","):  # v1
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                candidates += [Path(root, mount, rel, "cpu.stat"), Path(root, mount, "cpu.stat")]
        elif controllers == "":  # v2 (unified)
            candidates += [Path(root, rel, "cpu.stat"), Path(root, "cpu.stat")]
    for candidate in candidates:
        if throttled_periods(candidate) is not None:
            return candidate
    return None


def throttled_periods(path: Path) -> int | None:
    """``nr_throttled`` of a ``cpu.stat`` file (None: unreadable, or none)."""
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            if line.startswith("nr_throttled "):
                return int(line.split()[1])
    return None


class ThrottleWatch:
    """:meth:`quota_left`: False for ``THROTTLED_PAUSE_S`` after the count of
    throttled periods of the cgroup ``cpu_stat`` finds rose (found anew at
    each read: a process moved to another cgroup reads that one's; None: no
    cgroup ``cpu`` controller, never paused). Cheap between reads (a clock
    comparison); unsynchronised, as a race between threads only reads the
    file twice."""

    def __init__(self, cpu_stat: Callable[[], Path | None] = cpu_stat_path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cpu_stat = cpu_stat
        self._clock = clock
        self._throttled: int | None = None
        self._check_at = 0.0
        #: polling stays off until then (clock seconds)
        self.paused_until = 0.0

    def quota_left(self) -> bool:
        now = self._clock()
        if now >= self._check_at:
            self._check_at = now + THROTTLE_CHECK_S
            path = self._cpu_stat()
            count = throttled_periods(path) if path is not None else None
            if count is not None and self._throttled is not None and count > self._throttled:
                self.paused_until = now + THROTTLED_PAUSE_S
            self._throttled = count
        return now >= self.paused_until
