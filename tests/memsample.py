"""A server's own memory, the figure docs/reliability.md bounds (RssAnon +
RssShmem of /proc/PID/status), sampled while a test loads the server."""

from __future__ import annotations

import threading


def own_memory(pid: int) -> int:
    """RssAnon + RssShmem of ``pid``, in bytes."""
    total = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "RssShmem"):
                total += int(rest.split()[0]) * 1024
    return total


class PeakMemory:
    """Samples ``pid``'s own memory every 20 ms on a thread of its own, from
    its creation until :meth:`stop`: :attr:`before` and :attr:`peak`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = own_memory(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, own_memory(self.pid))
            except (OSError, ValueError):
                return  # (the process is gone)

    def window(self, seconds: float) -> None:
        """Let it sample for ``seconds`` (what the load holds meanwhile)."""
        self._stop.wait(seconds)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def grew(self) -> int:
        return self.peak - self.before
