"""Session ids are the client's names, chosen per tenant: the store's policy sees
them qualified by their namespace.

A policy keys its streams by session id. Two tenants that both call a
session ``main`` (or one that learns another's id) would otherwise share one
stream: each one's turn-end hints would rank the other's blocks, and a
``SessionEnd`` with ``discard`` from one would drop the other's private blocks
from every tier. Every call carries the namespace (the block ids of
``on_insert``, ``on_hit``, ``on_request``; the event of ``on_session_event``),
so this wrapper turns ``session`` into ``<namespace>\\x1f<session>`` before the
policy sees it. With one namespace a policy makes exactly the same decisions
(the simulator, which has one, calls policies directly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstore.policy.base import Action, Evictable, Policy
from kvstore.types import BlockId, SessionEvent, TierName

#: Between namespace and session id: a namespace never holds it.
_SEP = "\x1f"
#: Qualified ids kept for reuse (the hot calls pass the same few sessions;
#: policy.session.max_streams is 4,096 by default). Each costs up to ~3 KB
#: with 1 KiB ids: 65,536 of them took 212 MB of a flood of distinct ids.
_MEMO_MAX = 4_096


class NamespacedSessions(Policy):
    """``policy`` with every session id qualified by its namespace."""

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy.tiers)
        self.inner = policy
        self.name = policy.name
        self._memo: dict[tuple[str, str], str] = {}

    def _qualified(self, namespace: str, session: str | None) -> str | None:
        if session is None:
            return None
        key = (namespace, session)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            found = self._memo[key] = f"{namespace}{_SEP}{session}"
        return found

    # -- the calls that carry a session ---------------------------------------------------

    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None:
        self.inner.on_insert(tier, block, size, now, self._qualified(block[0], session))

    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None:
        self.inner.on_hit(tier, block, now, self._qualified(block[0], session))

    def on_hits(self, tier: TierName, blocks: Sequence[BlockId], now: float,
                session: str | None = None) -> None:
        if blocks:
            self.inner.on_hits(tier, blocks, now, self._qualified(blocks[0][0], session))

    def on_request(self, blocks: Sequence[BlockId], now: float,
                   session: str | None = None) -> None:
        qualified = self._qualified(blocks[0][0], session) if blocks else session
        self.inner.on_request(blocks, now, qualified)

    def on_session_event(self, event: SessionEvent, now: float) -> None:
        qualified = self._qualified(event.namespace, event.session_id)
        assert qualified is not None
        self.inner.on_session_event(
            SessionEvent(event.namespace, qualified, event.event), now)

    def fill(self, tier: TierName, blocks: Sequence[BlockId], size: int, now: float,
             session: str | None, resident: set[BlockId], capacity: int) -> int:
        qualified = self._qualified(blocks[0][0], session) if blocks else session
        return self.inner.fill(tier, blocks, size, now, qualified, resident, capacity)

    # -- the rest, as they are -------------------------------------------------------------

    def on_remove(self, tier: TierName, block: BlockId) -> None:
        self.inner.on_remove(tier, block)

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        return self.inner.victim(tier, now, evictable)

    def admit(self, tier: TierName, block: BlockId, size: int, now: float) -> bool:
        return self.inner.admit(tier, block, size, now)

    def default_action(self, tier: TierName) -> Action:
        return self.inner.default_action(tier)

    def pin(self, blocks: Sequence[BlockId], until: float) -> None:
        self.inner.pin(blocks, until)

    def __getattr__(self, name: str) -> Any:
        # The policy's own attributes (statistics, tests' views of its state).
        return getattr(self.inner, name)
