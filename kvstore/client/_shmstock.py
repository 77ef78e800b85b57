"""A ShmClient's stock of anonymous slots: one round trip per shared-memory Put.

A shared-memory Put is ShmReserve (the server carves slots) then ShmCommit.
A reservation names its key, so it cannot be made before the Put's keys are
known. Servers that set ``ShmAttachResponse.anonymous_slots`` also reserve
slots *without* a key, bound to one at commit (``ShmCommitBlock.key``), and
a ShmCommit may ask for more of them for the next Puts
(``ShmCommitRequest.reserve_next``, answered in ``next_slots``). This module
keeps those: a Put whose block sizes the stock covers takes its slots from
here, copies, and sends one ShmCommit, which also restocks what it used.
The first Put of a size still reserves (and asks for stock).

The stock is small and bounded (``max_per_size`` slots of one size per
namespace, and ``max_bytes`` in all): it holds L1 room that no one else can
use. Each slot carries the deadline of its reservation as the client counts
it (never later than the server's): a slot past it is no longer used but
abandoned by the next commit in its namespace (a no-op if the server has
already taken it back), and :meth:`SlotStock.drain` hands every slot held to
``ShmClient.close`` to abandon. Slots of a client that dies expire on the
server like any reservation. Thread-safe: one ShmClient may Put from
several threads.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MiB = 1024 * 1024


class StockBudget:
    """The L1 bytes all of one client's stocks may hold together: a stock per
    data-plane connection, and a client shared by n threads has n of them
    (64 threads held 512 MiB of L1 this way, every other client starved)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._lock = threading.Lock()

    def room(self) -> int:
        return self.max_bytes - self.held

    def claim(self, size: int) -> bool:
        with self._lock:
            if self.held + size > self.max_bytes:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size


@dataclass(slots=True)
class StockSlot:
    """An anonymous slot in stock (as ShmSlot gave it)."""

    slot_id: int
    offset: int
    size: int
    #: time.monotonic() after which the server may have taken it back.
    deadline: float


class SlotStock:
    """Anonymous slots for the next Puts, per (namespace, size). See the
    module's docstring."""

    def __init__(self, max_per_size: int = 4, max_bytes: int = 8 * MiB,
                 budget: StockBudget | None = None) -> None:
        self.max_per_size = max_per_size
        self.max_bytes = max_bytes
        #: Shared with the client's other stocks (None: this one's bounds only).
        self.budget = budget
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, int], list[StockSlot]] = {}
        # Ids to abandon with the next commit in their namespace (stale or
        # surplus slots, never written).
        self._abandon: dict[str, list[int]] = {}

    def take(self, namespace: str, sizes: Sequence[int], now: float) -> list[StockSlot | None]:
        """A slot from stock for each of ``sizes`` (None where there is none).
        Slots past their deadline are set aside for abandoning."""
        out: list[StockSlot | None] = []
        with self._lock:
            for size in sizes:
                held = self._slots.get((namespace, size))
                if held and held[0].deadline <= now:
                    stale = [s for s in held if s.deadline <= now]
                    self._abandon.setdefault(namespace, []).extend(s.slot_id for s in stale)
                    self._give(sum(s.size for s in stale))
                    held[:] = [s for s in held if s.deadline > now]
                # The oldest first: each slot is used as soon after its
                # reservation as it can be.
                slot = held.pop(0) if held else None
                if slot is not None:
                    self._give(slot.size)
                out.append(slot)
        return out

    def _give(self, nbytes: int) -> None:
        if self.budget is not None and nbytes:
            self.budget.give(nbytes)

    def wanted(self, namespace: str, sizes: Sequence[int]) -> list[int]:
        """Sizes to ask the next commit to reserve (``reserve_next``): none of
        a size whose stock still covers another Put like this one; else
        enough to fill it up to ``max_per_size``, within the bounds. Why fill
        rather than top up by one: the server reserves the slots before it
        answers the commit (~30 µs of its 100-150 µs on a 1 MiB commit), so
        one commit in several pays for it instead of every one (1 MiB Puts
        of one key, same run: p50 357 -> 313 and 312 -> 291 µs)."""
        asked: list[int] = []
        with self._lock:
            held_bytes = -1  # counted only when something is asked (most Puts ask nothing)
            room = 0
            counts = ((sizes[0], 1),) if len(sizes) == 1 else Counter(sizes).items()
            for size, count in counts:
                have = len(self._slots.get((namespace, size), ()))
                if have >= min(count, self.max_per_size):
                    continue
                if held_bytes < 0:
                    held_bytes = self._held_bytes()
                    room = self.budget.room() if self.budget is not None else self.max_bytes
                for _ in range(self.max_per_size - have):
                    if held_bytes + size > self.max_bytes or size > room:
                        break
                    room -= size
                    held_bytes += size
                    asked.append(size)
        return asked

    def add(self, namespace: str, slots: Iterable[tuple[int, int, int]], deadline: float) -> None:
        """Put slots (id, offset, size) in stock; any over the bounds (several
        threads restocking at once) wait to be abandoned."""
        with self._lock:
            held_bytes = self._held_bytes()
            for slot_id, offset, size in slots:
                held = self._slots.setdefault((namespace, size), [])
                if len(held) >= self.max_per_size or held_bytes + size > self.max_bytes or \
                        (self.budget is not None and not self.budget.claim(size)):
                    self._abandon.setdefault(namespace, []).append(slot_id)
                    continue
                held_bytes += size
                held.append(StockSlot(slot_id, offset, size, deadline))
            for held in self._slots.values():
                held.sort(key=lambda s: s.deadline)  # the oldest first

    def put_back(self, namespace: str, slots: Sequence[StockSlot]) -> None:
        """Return slots taken for a Put that never used them."""
        for slot in slots:
            self.add(namespace, [(slot.slot_id, slot.offset, slot.size)], slot.deadline)

    def to_abandon(self, namespace: str) -> list[int]:
        """Ids set aside for abandoning in ``namespace`` (handed over once)."""
        with self._lock:
            return self._abandon.pop(namespace, [])

    def drain(self) -> dict[str, list[int]]:
        """Every slot held or set aside, by namespace; the stock is then empty."""
        with self._lock:
            out = self._abandon
            self._abandon = {}
            for (ns, _), held in self._slots.items():
                out.setdefault(ns, []).extend(s.slot_id for s in held)
                self._give(sum(s.size for s in held))
            self._slots.clear()
        return {ns: ids for ns, ids in out.items() if ids}

    def __del__(self) -> None:
        # A session dropped with slots in stock (its connection broke: the
        # server takes them back): its share of the budget goes back too.
        self._give(sum(s.size for held in self._slots.values() for s in held))

    def _held_bytes(self) -> int:
        return sum(s.size for held in self._slots.values() for s in held)

    def held(self) -> int:
        """Slots in stock (a test's and a metric's view)."""
        with self._lock:
            return sum(len(held) for held in self._slots.values())
