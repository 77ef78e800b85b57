"""The placement-policy interface.

A policy is pure code: no I/O, no clock of its own (``now`` is passed in, in
seconds), no locks. The same objects drive the live TieredStore and the trace
simulator in ``bench/replay``, so a hit rate measured offline is the server's.

Protocol, per tier the policy was built for:

* ``on_insert`` — a block was placed in the tier (Put, promotion, demotion).
* ``on_hit`` — a block was read from the tier (``on_hits``: several, in order).
* ``on_remove`` — a block left the tier (evicted, deleted, found corrupt).
  Called for every removal, including those that follow ``victim``.
* ``on_session_event`` — a session hint (turn ended, session ended).
* ``victim`` — the next block to remove from the tier to make room, and
  whether it moves to the next tier down (DEMOTE) or leaves the store (DROP).
  Blocks for which ``evictable`` returns False (leased, still being written)
  are skipped and stay in place. None when nothing can be evicted.
* ``admit`` — whether a block should be placed in the tier at all (e.g. a
  promotion into L1 on an L2 hit).
* ``on_request`` (optional) — the ordered block ids of one Lookup/Get of a session,
  before its hits and inserts.
* ``pin`` (optional) — keep blocks until a deadline (pin with TTL); a hint.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence

from kvstore.types import BlockId, SessionEvent, TierName

Evictable = Callable[[BlockId], bool]


class Action(enum.Enum):
    DEMOTE = "demote"  # keep it in the next tier down
    DROP = "drop"  # remove it from the store


class Policy(abc.ABC):
    #: The name used in config (``policy.name``) and reported by Stats.
    name: str = ""

    def __init__(self, tiers: Sequence[TierName]) -> None:
        # Tiers this store has, fastest first; the last one drops, never demotes.
        self.tiers = tuple(tiers)

    def default_action(self, tier: TierName) -> Action:
        return Action.DROP if tier == self.tiers[-1] else Action.DEMOTE

    @abc.abstractmethod
    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None: ...

    @abc.abstractmethod
    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None: ...

    @abc.abstractmethod
    def on_remove(self, tier: TierName, block: BlockId) -> None: ...

    @abc.abstractmethod
    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None: ...

    def on_session_event(self, event: SessionEvent, now: float) -> None:  # noqa: B027
        """Hints are optional: the default ignores them."""

    def admit(self, tier: TierName, block: BlockId, size: int, now: float) -> bool:
        return True

    def on_hits(self, tier: TierName, blocks: Sequence[BlockId], now: float,
                session: str | None = None) -> None:
        """Several hits of one read, in order; exactly ``on_hit`` for each block (policies
        override it only to be faster, e.g. in the trace simulator)."""
        on_hit = self.on_hit
        for b in blocks:
            on_hit(tier, b, now, session)

    def fill(self, tier: TierName, blocks: Sequence[BlockId], size: int, now: float,
             session: str | None, resident: set[BlockId], capacity: int) -> int:
        """Simulator fast path: Put ``blocks`` (a request's misses, in order) into a tier
        that holds ``resident`` (updated here) and at most ``capacity`` blocks. Exactly
        the server's sequence per block not already resident: while the tier is full,
        ``victim`` -> remove it -> ``on_remove``; then insert -> ``on_insert``. Returns
        the number of blocks inserted. The simulator's accelerator
        (``kvstore.policy.fast``) inlines it for some policies, with the same decisions;
        the decisions themselves live in the methods above."""
        victim, on_remove, on_insert = self.victim, self.on_remove, self.on_insert
        add, discard = resident.add, resident.discard
        n = 0
        for b in blocks:
            if b in resident:
                continue  # a repeat within the request
            while len(resident) >= capacity:
                v = victim(tier, now, None)
                if v is None:
                    break
                discard(v[0])
                on_remove(tier, v[0])
            if len(resident) < capacity:
                add(b)
                n += 1
                on_insert(tier, b, size, now, session)
        return n

    def on_request(self, blocks: Sequence[BlockId], now: float,  # noqa: B027
                   session: str | None = None) -> None:
        """Optional: the block ids one request (Lookup/Get) of ``session`` references, in
        order, called once before that request's hits and inserts. A session's latest
        request tells a policy which of its blocks the context still holds. Default: ignore.
        """

    def pin(self, blocks: Sequence[BlockId], until: float) -> None:  # noqa: B027
        """Optional: keep ``blocks`` (where a tier holds them) until time ``until`` (s),
        e.g. a client's pin with a TTL. A hint, not a lease. Default: ignore."""
