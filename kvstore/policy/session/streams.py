"""Stream tracking: who owns which resident block, per tier.

A stream (a session or sub-agent) remembers its latest request (``cur``), its hint state
and, per tier, the resident blocks it owns in reference order. A tier (``TierState``)
keeps every resident block in LRU order, its owner, the ownerless blocks (``free``), the
blocks no live stream references (``dead``) and where its ranking stands.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvstore.policy.session.gaps import RUNNING
from kvstore.types import TierName

if TYPE_CHECKING:
    from kvstore.policy.session.ranking import Ranking

ABSENT: Any = object()  # dict.get default: "no entry" (None is an owner value)


def pop_res(res: dict[Any, None], block: Any) -> None:
    """Remove ``block`` from a stream's resident blocks. Blocks leave mostly from the
    newest end; ``popitem`` takes the last one *and* drops the deleted slots behind it,
    which ``del`` leaves in place (CPython), so that ``reversed(res)`` -- how the ranking
    finds a stream's newest block -- would otherwise skip more and more of them."""
    if res and next(reversed(res)) == block:
        res.popitem()
    else:
        res.pop(block, None)


#: Turn ends that count per use of a stream (Stream.turn_ends_left).
TURN_ENDS_PER_USE = 2


class Stream:
    __slots__ = ("cls", "cur", "ended", "expected", "key", "last_req", "name", "res",
                 "t_state", "tool", "turn_ends_left")

    def __init__(self, name: str, tiers: Sequence[TierName]) -> None:
        self.name = name
        # block ids of the latest request, in its order (a tuple: 8 bytes a block, where
        # a set took ~80 -- its table grows fourfold; membership tests use the request's)
        self.cur: tuple[Any, ...] = ()
        self.cls = RUNNING
        self.tool = -1  # the gap model's class of the tool of a TOOL turn end (-1: none)
        self.t_state = 0.0  # when cls was set
        self.last_req: float | None = None
        self.ended = False
        self.expected = 0.0  # hinted gap (s), 0 if none
        # TurnEnds that may still count before the stream is used again (a
        # request, a first-tier hit or insert refills it): one resent alone
        # keeps nothing young for long
        self.turn_ends_left = 0
        self.key = 0.0
        # per tier: resident blocks this stream owns, prefix first
        self.res: dict[TierName, dict[Any, None]] = {t: {} for t in tiers}


class TierState:
    __slots__ = ("dead", "free", "gen", "lru", "own", "passed", "passed_t", "peek",
                 "peek_drop", "rank_t")

    def __init__(self) -> None:
        self.lru: OrderedDict[Any, None] = OrderedDict()  # all resident, LRU first
        self.own: dict[Any, Stream | None] = {}  # resident block -> owner (None: no stream)
        self.free: OrderedDict[Any, float] = OrderedDict()  # ownerless: last use, LRU first
        # referenced by no live stream, oldest first (an OrderedDict: taken from the front,
        # which a dict does in time growing with the entries already taken)
        self.dead: OrderedDict[Any, None] = OrderedDict()
        # dead blocks a ranking took off that queue but a victim call passed over
        # (pinned, not evictable then), back at its head when a ranking is next
        # built, at most once per rerank_s (passed_t: when they last went back)
        self.passed: dict[Any, None] = {}
        self.passed_t = -math.inf
        self.gen: Ranking | None = None  # the current ranking, resumed victim by victim
        self.peek: Any = None  # the ranking's candidate not evicted yet
        self.peek_drop = False
        self.rank_t = -math.inf
