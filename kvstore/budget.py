"""A byte budget shared by calls on the event loop: what responses (or
requests) held in the server may take, all callers together, each caller at
most a share."""

from __future__ import annotations

import asyncio
from collections import deque

from kvstore.errors import CapacityExhausted

#: The longest a call waits for room in a budget (then CapacityExhausted,
#: RESOURCE_EXHAUSTED): as long as a Put waits for room in L1
#: (kvstore.store.placement).
BUDGET_WAIT_SECONDS = 30.0


class ResponseBudget:
    """The bytes streamed responses may hold in the server, all calls
    together, counted on the event loop (grpc.aio runs every handler there).
    Taking what is free costs no await; otherwise callers wait in order.

    Each caller (``who``: the identity under auth.tokens_file, else the
    namespace) may hold at most :attr:`share` of it (a quarter): past that
    its calls wait for its own to give back, and stand in no one else's way.
    (One tenant's unread Gets held it all, and queued: another tenant's Get
    waited 30 s.) A caller holding nothing may take more than its share in
    one go (a reservation larger than the share)."""

    def __init__(self, capacity: int, share: int | None = None,
                 what: str = "gRPC Get responses",
                 why: str = "their client is slow to read",
                 advice: str = "read what is streaming first, or read over the data plane",
                 advice_all: str = "retry, or read over the data plane") -> None:
        """``what`` holds the bytes, ``why`` they stay, ``advice`` to a caller
        past its share, ``advice_all`` when all is held: the words of the
        CapacityExhausted raised."""
        self.capacity = capacity
        self.share = share if share is not None else max(1, capacity // 4)
        self.what, self.why, self.advice, self.advice_all = what, why, advice, advice_all
        self.free = capacity
        self._held: dict[str, int] = {}
        self._waiters: deque[tuple[int, str, asyncio.Future[None]]] = deque()
        #: bytes that callers of :meth:`take_held` hold, uncounted, while they
        #: wait: all of them, and each caller's
        self.waiting_held = 0
        self._waiting_by: dict[str, int] = {}

    def _within_share(self, nbytes: int, who: str) -> bool:
        held = self._held.get(who, 0)
        return held == 0 or held + nbytes <= self.share

    def _blocked(self) -> bool:
        """Whether a waiter within its share stands first in line (no one
        takes free room before it: large reservations are not starved)."""
        return any(not f.done() and self._within_share(n, w) for n, w, f in self._waiters)

    def take_now(self, nbytes: int, who: str = "") -> bool:
        """Take ``nbytes`` if that needs no wait (no one within their share
        waits before it)."""
        if nbytes <= self.free and self._within_share(nbytes, who) and not self._blocked():
            self._took(nbytes, who)
            return True
        return False

    def _took(self, nbytes: int, who: str) -> None:
        self.free -= nbytes
        self._held[who] = self._held.get(who, 0) + nbytes

    async def take_held(self, nbytes: int, wait: float, who: str, wait_cap: int) -> bool:
        """:meth:`take` for bytes the caller holds already (a request it has
        received): it waits for room only while the bytes so waiting stay
        within ``wait_cap`` all callers together, and within a quarter of it
        for ``who`` (one with nothing waiting may wait with more): they are
        counted nowhere meanwhile. False, at once, past either. (Without the
        caller's part, one caller's waiting requests took it all and another
        caller's were refused at once.)"""
        if self.take_now(nbytes, who):
            return True
        mine = self._waiting_by.get(who, 0)
        if self.waiting_held + nbytes > wait_cap or (mine and mine + nbytes > wait_cap // 4):
            return False
        self.waiting_held += nbytes
        self._waiting_by[who] = mine + nbytes
        try:
            await self.take(nbytes, wait, who)
        finally:
            self.waiting_held -= nbytes
            left = self._waiting_by.get(who, 0) - nbytes
            if left > 0:
                self._waiting_by[who] = left
            else:
                self._waiting_by.pop(who, None)
        return True

    async def take(self, nbytes: int, wait: float, who: str = "") -> None:
        """Take ``nbytes`` (at most :attr:`capacity`: more is never free),
        waiting up to ``wait`` seconds for others to give back enough (then
        CapacityExhausted)."""
        if self.take_now(nbytes, who):
            return
        waiter = (nbytes, who, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                await waiter[2]
        except BaseException as exc:
            if waiter[2].done() and not waiter[2].cancelled():
                self.give(nbytes, who)  # granted as the wait ended: not taken
            else:
                waiter[2].cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass  # a grant in between found it given up and dropped it
                self._grant()  # it may have stood before others that fit
            if isinstance(exc, TimeoutError):
                mine = self._held.get(who, 0)
                if mine + nbytes > self.share:
                    raise CapacityExhausted(
                        f"this caller's {self.what} hold {mine // 1024**2} MiB, its "
                        f"share of the {self.capacity // 1024**2} MiB the server allows them "
                        f"({self.why}); waited {wait:g} s for room: {self.advice}") from None
                raise CapacityExhausted(
                    f"{self.what} hold all {self.capacity // 1024**2} MiB the server "
                    f"allows them ({self.why}); waited {wait:g} s for room: "
                    f"{self.advice_all}") from None
            raise

    def give(self, nbytes: int, who: str = "") -> None:
        self.free += nbytes
        left = self._held.get(who, 0) - nbytes
        if left > 0:
            self._held[who] = left
        else:
            self._held.pop(who, None)
        if self._waiters:
            self._grant()

    def _grant(self) -> None:
        """Grant the waiters in order; one over its share is passed over (it
        waits for its own calls), one within it that does not fit stops the
        line."""
        waiters = self._waiters
        for waiter in list(waiters):
            nbytes, who, future = waiter
            if future.done():  # given up, not yet removed
                waiters.remove(waiter)
                continue
            if not self._within_share(nbytes, who):
                continue
            if nbytes > self.free:
                return
            waiters.remove(waiter)
            self._took(nbytes, who)
            future.set_result(None)


#: What requests naming many keys may hold in the server while their calls
#: run (their answers' sending included), gRPC Gets and the data plane's
#: large requests together, each caller a quarter: apart from the budget for
#: gRPC responses, so that a caller's requests never keep its own responses
#: from room (a fix review: four Gets of 65,536 keys locked each other out
#: for 30 s when both were counted together).
REQUEST_BUDGET_BYTES = 64 * 1024**2


def request_budget() -> ResponseBudget:
    """The server's budget for requests of many keys (REQUEST_BUDGET_BYTES)."""
    return ResponseBudget(
        REQUEST_BUDGET_BYTES, what="requests of many keys",
        why="their answers wait for their clients to read them",
        advice="read the answers of this caller's other requests first, or split the "
               "request", advice_all="retry, or split the request")
