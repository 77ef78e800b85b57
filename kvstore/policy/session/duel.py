"""Fallback towards LRU: pair votes (``trust``) and a shadow-LRU duel.

Pair votes: whenever the session choice of a victim differs from LRU's, the pair is
remembered; whichever of the two blocks is referenced first shows which choice was wrong.
A clamped counter (``trust``) moves by one per resolved pair; below zero the policy evicts
LRU's choice. This is a ghost-LRU comparison limited to the decisions where the two differ.

Duel (first tier only): an LRU of the tier's size (learned: the number of blocks held when
``victim`` is called) replays the session requests; decayed hit counts of the shadow and of
the policy decide when to fall back to LRU (``lru_mode``) and when to retry the ranking.
The fallback needs a lead that is significant, not only above the margin: ``duel_z``
standard deviations of the decayed lead, estimated from the decayed squares of the
per-request differences. At high capacities the two are near a tie, the lead swings by a
context's worth of blocks either way, and each LRU episode cost hits; a ranking that
loses request after request (hints that mislead) gets there within a few requests.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import compress, count, islice
from operator import not_
from typing import Any

from kvstore.config import SessionPolicyConfig
from kvstore.types import BlockId


class Duel:
    """Mixed into the session policy: the state and steps of its fallback to LRU."""

    stats: dict[str, int]
    max_tracked_blocks: int

    def _init_duel(self, cfg: SessionPolicyConfig) -> None:
        self.trust = 0  # >= 0: follow the session ranking; < 0: follow LRU
        self.trust_limit = cfg.trust_limit
        self.pair_limit = cfg.pair_limit
        self._pairs: dict[Any, tuple[Any, int]] = {}
        self.duel = cfg.duel
        self.duel_decay = cfg.duel_decay
        self.duel_margin = cfg.duel_margin
        self._z2 = cfg.duel_z * cfg.duel_z
        self.trust_back = cfg.trust_back
        self.duel_retry = cfg.duel_retry  # > 0: in LRU mode, retry the ranking after this many
        self._lru_reqs = 0  # requests (0: only when the pair votes reach trust_back)
        # Requests seen since the tier first filled; the duel may switch to LRU only after
        # ``duel_warmup`` of them. While the tier fills and the gap model is still mostly
        # its prior, short stretches where LRU leads are noise, and an LRU episode then
        # costs far more than it saves (agent traces, half b, K=16, 1%, session-end hints:
        # four episodes in the first 1,000 requests cost 10 of the 53 points of the gap to
        # Belady that the policy closes without them).
        self.duel_warmup = cfg.duel_warmup
        self._duel_reqs = 0
        self._shadow: OrderedDict[Any, None] = OrderedDict()
        self._cap = 0  # tier size in blocks, once known
        self._own_hits = 0  # this policy's first-tier hits since the last request
        self._own_acc = 0.0
        self._sh_acc = 0.0
        self._sq_acc = 0.0  # decayed sum of the squared per-request differences
        self._sh_pending = 0
        self.lru_mode = False

    def _record_pair(self, sc: Any, lc: Any) -> None:
        """The session choice ``sc`` and LRU's ``lc`` differ: the first referenced votes."""
        pairs = self._pairs
        if sc not in pairs and lc not in pairs:  # each block in one pair at most
            pairs[sc] = (lc, -1)  # sc referenced first: the session choice was wrong
            pairs[lc] = (sc, +1)  # lc referenced first: LRU's choice was
            if len(pairs) > self.pair_limit:
                self._trim_pairs()

    def _resolve(self, block: Any) -> None:
        other, delta = self._pairs.pop(block)
        self._pairs.pop(other, None)
        t = self.trust + delta
        lim = self.trust_limit
        self.trust = lim if t > lim else -lim if t < -lim else t

    def _trim_pairs(self) -> None:
        pairs = self._pairs
        for _ in range(2):
            old = next(iter(pairs))
            other, _d = pairs.pop(old)
            pairs.pop(other, None)

    def _significant(self, lead: float, d: float) -> bool:
        """Whether the shadow's decayed lead exceeds ``duel_z`` standard deviations of it.

        The per-request differences (shadow hits - own hits) are heavy-tailed: most are 0,
        a few are a whole context. With weights d**age their variance is estimated as
        (1 - d) * (sq - (1 - d) * lead**2), and the lead's as that / (1 - d**2), i.e.
        (sq - (1 - d) * lead**2) / (1 + d); the test below is lead**2 > z**2 * that,
        rearranged (no square root, no division)."""
        z2 = self._z2
        return lead * lead * (1.0 + d + z2 * (1.0 - d)) > z2 * self._sq_acc

    def _duel(self, blocks: Sequence[BlockId]) -> None:
        """Replay the request on the shadow LRU; update the decayed hit counts and the mode."""
        sh = self._shadow
        mte = sh.move_to_end
        # the leading run of blocks the shadow holds (most of an agent's request: its
        # context) moves to the end in C; the rest block by block, in the same order
        h = next(compress(count(), map(not_, map(sh.__contains__, blocks))), len(blocks))
        deque(map(mte, islice(blocks, h)), 0)
        for b in islice(blocks, h, None):
            if b in sh:
                h += 1
                mte(b)
            else:
                sh[b] = None
        cap = self._cap
        # (until the tier's size is known, the policy's bound on blocks it tracks:
        # lookups of blocks never stored must not grow the shadow without end)
        bound = cap or self.max_tracked_blocks
        if len(sh) > bound:
            pop = sh.popitem
            for _ in range(len(sh) - bound):
                pop(False)  # the least recently used
        # this policy's hits of the previous request are known now: compare like with like
        d = self.duel_decay
        diff = self._sh_pending - self._own_hits
        self._own_acc = self._own_acc * d + self._own_hits
        self._sh_acc = self._sh_acc * d + self._sh_pending
        self._sq_acc = self._sq_acc * d + diff * diff
        self._own_hits = 0
        self._sh_pending = h
        if not self.lru_mode:
            if cap:
                self._duel_reqs += 1
            if self._duel_reqs <= self.duel_warmup:
                return
            lead = self._sh_acc - self._own_acc
            if lead > self.duel_margin * self._sh_acc + 32.0 and self._significant(lead, d):
                self.lru_mode = True  # LRU has been serving more hits lately
                self.trust = 0
                self._lru_reqs = 0
                self.stats["to_lru"] += 1
            return
        self._lru_reqs += 1
        if self.trust >= self.trust_back or 0 < self.duel_retry <= self._lru_reqs:
            # the pairs recorded meanwhile say the session choices would have been right
            self.lru_mode = False
            self._own_acc = self._sh_acc
            self.stats["to_session"] += 1
