"""A circuit breaker: turn an outage into fast "unavailable" answers.

States:

- **closed**: requests flow; each failed request counts, a success resets the
  count. ``failures`` consecutive failed requests open the breaker.
- **open**: requests are refused at once (the caller raises TierUnavailable)
  for ``reset_s`` seconds.
- **half-open**: after ``reset_s``, exactly one request (the probe) is let
  through; others are still refused. A successful probe closes the breaker, a
  failed one opens it again for another ``reset_s``.

Pure state, no I/O and no clock of its own (``clock`` is injected), so it is
tested without sleeping. Not thread-safe: use it from one event loop.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        reset_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError("breaker failures must be at least 1")
        if reset_s < 0:
            raise ValueError("breaker reset_s must not be negative")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.opened = 0  # times the breaker opened (for stats and tests)
        self.refused = 0  # requests refused while open

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def retry_after(self) -> float:
        """Seconds until the next probe may go out (0 when not open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_s - self._clock())

    def allow(self) -> bool:
        """Whether a request may go out now. When it returns True the caller
        must report the outcome: :meth:`success`, :meth:`failure` or
        :meth:`abandon` (the request was cancelled before it had one)."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.reset_s:
                self.refused += 1
                return False
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            self.refused += 1
            return False
        self._probe_in_flight = True
        return True

    def success(self) -> None:
        self._consecutive = 0
        self._probe_in_flight = False
        self._state = BreakerState.CLOSED

    def failure(self) -> None:
        self._consecutive += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self._consecutive >= self.failures
        ):
            self._open()
        # already OPEN: a request that started before the breaker opened
        # finished late; keep the original opening time.

    def abandon(self) -> None:
        """The request was cancelled: no verdict on the server. A cancelled
        probe frees the slot so that the next request probes."""
        self._probe_in_flight = False

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self.opened += 1
