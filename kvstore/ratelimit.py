"""A warning a misbehaving client (or a full disk) can trigger thousands of
times a second, logged at most once per interval with a count of those held
back."""

from __future__ import annotations

import logging
import time


class RateLimitedWarning:
    """One WARNING line on ``logger`` per ``interval`` seconds, counting
    those held back."""

    def __init__(self, logger: logging.Logger, what: str, interval: float,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.level = level
        self.what = what
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def note(self, detail: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        more = f" (and {self._held} more since the last report)" if self._held else ""
        self.logger.log(self.level, "%s: %s%s", self.what, detail, more)
        self._next = now + self.interval
        self._held = 0
