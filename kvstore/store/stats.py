"""The store's counters: events per tier, blocks and bytes held per tier,
and the request counts Stats reports."""

from __future__ import annotations

import dataclasses

from kvstore.types import StoreStats, TierName, TierStats


class HintCounters:
    """A tier's counters as a prefetch sees them: a hint is not a read, so
    its hits and misses are not counted (``kvstore_tier_hits`` is reads
    served); a corrupt copy it finds is."""

    __slots__ = ("_real", "hits", "misses")

    def __init__(self, real: TierStats) -> None:
        self._real = real
        self.hits = self.misses = 0

    @property
    def corrupt(self) -> int:
        return self._real.corrupt

    @corrupt.setter
    def corrupt(self, value: int) -> None:
        self._real.corrupt = value


class Stats:
    """Counters only; the parts that see an event bump them directly (a
    plain attribute or list update on the hot path, no call)."""

    __slots__ = ("counters", "get_hits", "gets", "held", "puts", "session_events")

    def __init__(self) -> None:
        # Per-tier event counters; occupancy fields are filled in by snapshot().
        self.counters = {t: TierStats(t) for t in TierName}
        # Blocks and payload bytes per tier, kept as entries move (Stats and
        # L2's capacity check never scan the index).
        self.held: dict[TierName, list[int]] = {t: [0, 0] for t in TierName}
        self.puts = self.gets = self.get_hits = self.session_events = 0

    def tier(self, tier: TierName, capacity: int) -> TierStats:
        """The tier's counters with its occupancy and ``capacity``."""
        blocks, nbytes = self.held[tier]
        return dataclasses.replace(self.counters[tier], blocks=blocks, bytes=nbytes,
                                   capacity=capacity, used=nbytes)

    def snapshot(self, tiers: list[TierStats], policy: str) -> StoreStats:
        return StoreStats(tiers, self.puts, self.gets, self.get_hits, self.session_events,
                          policy)
