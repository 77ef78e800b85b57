"""Session-aware placement (the policy class; gaps.py, streams.py, ranking.py and duel.py
hold its parts): rank streams by when they are expected to come back.

See docs/policy.md for the reasoning. In short, an agent's next request resends its whole
context, so every block of a stream's latest request is reused together, at the stream's
next request, and blocks that fell out of it are never reused. The policy therefore ranks
*streams* (sessions or sub-agents) by the expected time until their next request and evicts:

1. dead blocks: referenced by no live stream's latest request (compacted out, or their
   session ended), oldest first. From the first tier they are demoted all the same (every
   Put reaches L2 before it leaves L1, the store's promise); from any lower tier they are
   dropped (never uploaded to L3). A SessionEnd with ``discard`` drops its session's
   private blocks from every tier, the first included;
2. then stream by stream, the stream expected back last first; within a stream the end of
   its context first (a prefix cache loses the least that way); a block another live stream
   also references (a shared prefix) goes with the stream that referenced it last, its
   owner;
3. blocks with no session (e.g. Mooncake) form one pseudo-stream ranked by LRU age.

The expected time to the next request is learned online, per hint class (request running,
tool call, awaiting user, done, unspecified; a tool call also per tool name, once that tool
has been seen a few times), as a log-binned histogram of the gaps already
observed (turn end -> next request of the same stream), conditioned on the time already
waited: ``E[G - a | G > a]``. A stream that waited longer than any gap seen is not expected
back. An ``expected_gap_ms`` hint is used while it has not elapsed.

Fallback towards LRU: whenever the session choice differs from LRU's, the pair is remembered;
whichever of the two blocks is referenced first shows which choice was wrong. A clamped
counter (``trust``) moves by one per resolved pair; below zero the policy evicts LRU's
choice. This is a ghost-LRU comparison limited to the decisions where the two differ.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import compress, repeat
from operator import is_not
from typing import Any

from kvstore.config import SessionPolicyConfig
from kvstore.policy.base import Action, Evictable, Policy
from kvstore.policy.session.duel import Duel
from kvstore.policy.session.gaps import (
    NEVER,
    PRIOR,
    REASON_CLASS,
    RUNNING,
    TOOL,
    UNSPEC,
    GapModel,
)
from kvstore.policy.session.ranking import Ranking
from kvstore.policy.session.streams import (
    ABSENT,
    TURN_ENDS_PER_USE,
    Stream,
    TierState,
    pop_res,
)
from kvstore.types import BlockId, SessionEnd, SessionEvent, TierName, TurnEnd


class SessionPolicy(Duel, Policy):
    name = "session"

    def __init__(self, tiers: Sequence[TierName], config: SessionPolicyConfig | None = None,
                 **knobs: Any) -> None:
        """``knobs``: options of ``config`` (default: ``SessionPolicyConfig()``) to
        override, by name (an unknown name is a TypeError)."""
        super().__init__(tiers)
        cfg = config or SessionPolicyConfig()
        if knobs:
            cfg = dataclasses.replace(cfg, **knobs)
        self.config = cfg
        self.learn = cfg.learn  # False: keep the prior gap model (tests)
        self.gaps = GapModel()
        self.rerank_s = cfg.rerank_s
        self._streams: dict[str, Stream] = {}
        # The same streams, least recently active first (``max_streams``: the first is
        # forgotten). Apart from ``_streams``, whose order is the ranking's tie-break.
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.max_streams = cfg.max_streams
        self.max_tracked_blocks = cfg.max_tracked_blocks
        self._tracked_blocks = 0  # len(s.cur) over every stream
        self._last_name: str | None = None  # the stream of the latest call, cached
        self._last_s: Stream | None = None
        self._tiers = {t: TierState() for t in tiers}
        self._nlive: dict[Any, int] = {}  # block -> live streams whose latest request has it
        self._pins: dict[Any, float] = {}
        self._dirty = True
        self.stats = {"session_choice": 0, "lru_choice": 0, "agree": 0, "dead": 0,
                      "to_lru": 0, "to_session": 0}
        self._init_duel(cfg)
        # Ranking key: ``horizon`` > 0: seconds per hit within that many seconds (see
        # GapModel.per_hit); < 0: the same with a horizon of -horizon x the cache's
        # characteristic time, the first tier's turnover time (how long it takes to evict
        # as many blocks as it holds: about how long a block not used again stays); 0: the
        # conditional mean remaining wait E[G - a | G > a]. (Until issue 16 the
        # characteristic time was an EWMA of how long LRU's choice's stream had been
        # idle: at the upper capacities LRU's head is a stream idle for hours that the
        # ranking keeps for lack of anything worse, so the horizon ran away to ~20 h.)
        self.horizon = cfg.horizon
        # The stream whose request is being placed (the latest caller, its request
        # running) is keyed as if back ``placing_scale`` times later than its class
        # says: its misses are placed with its class's key at age 0, and the replays
        # find that key too good against the streams already resident (measured, on
        # the cross-validation cells, with and without hints: docs/policy.md, "The
        # stream being placed").
        self.placing_scale = cfg.placing_scale
        self._turn_n = 0  # first-tier victims since the turnover clock last started
        self._turn_t = -1.0  # when it started (< 0: not yet)
        self._turn_T = 0.0  # seconds the first tier took to evict as many blocks as it holds
        self._tier0 = self.tiers[0]
        self._action = {t: self.default_action(t) for t in self.tiers}
        # A dead block leaves the first tier for the next (never lost on the way) and
        # leaves every lower tier for good; blocks in ``_discard`` (SessionEnd(discard))
        # leave the store from any tier.
        self._dead_action = {t: Action.DEMOTE if t is self._tier0 and len(self.tiers) > 1
                             else Action.DROP for t in self.tiers}
        self._discard: set[Any] = set()
        # Gaps after a tool call, per tool name (TurnEnd.tool_name): how long a tool runs,
        # or waits for a person's approval, depends on the tool far more than on anything
        # else an engine knows. A tool's own distribution ranks its streams once it has
        # ``tool_min`` observations; until then (and beyond ``max_tools`` names) the
        # tool-call class does. Both learn from every gap.
        self.max_tools = cfg.max_tools
        self.tool_min = cfg.tool_min
        self._tool_cls: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping

    def _stream(self, session: str) -> Stream:
        s = self._last_s
        if s is not None and self._last_name == session:
            return s  # (the most recently active already)
        recent = self._recent
        s = self._streams.get(session)
        if s is None:
            if len(recent) >= self.max_streams:
                self._forget(self._streams[next(iter(recent))])
            s = self._streams[session] = Stream(session, self.tiers)
            recent[session] = None
        else:
            recent.move_to_end(session)
        self._last_name, self._last_s = session, s
        return s

    def tracked_streams(self) -> int:
        """Streams whose state the policy keeps (at most ``max_streams``)."""
        return len(self._streams)

    def _forget(self, s: Stream) -> None:
        """Drop a stream's state (``max_streams``): it no longer keeps its latest
        request's blocks live, and the blocks it owns become ownerless, ranked by LRU age
        with the blocks of no session, as last used at its latest request, its newest
        blocks first (as its own ranking would offer them). They join that queue's end:
        with sessions only, the queue stays in LRU order (streams are forgotten least
        recently active first). If it returns it starts afresh, as a new stream."""
        del self._streams[s.name]
        del self._recent[s.name]
        if self._last_s is s:
            self._last_name = self._last_s = None
        nlive = self._nlive
        for b in s.cur:
            c = nlive.get(b, 0) - 1
            if c > 0:
                nlive[b] = c
            else:
                nlive.pop(b, None)
        self._tracked_blocks -= len(s.cur)
        s.cur = ()
        t = s.last_req if s.last_req is not None else s.t_state
        for tier, ts in self._tiers.items():
            own, free = ts.own, ts.free
            res = s.res[tier]
            for b in reversed(res):
                own[b] = None
                free[b] = t
            res.clear()  # (a ranking that still holds it finds it empty)
        self._dirty = True

    def _adopt(self, tier: TierName, ts: TierState, block: Any, s: Stream | None) -> None:
        """Make ``s`` (None: nobody) the owner of a resident block."""
        old = ts.own.get(block)
        if old is not None:
            old.res[tier].pop(block, None)
        else:
            ts.free.pop(block, None)
            ts.dead.pop(block, None)
        ts.own[block] = s
        if s is not None:
            s.res[tier][block] = None

    def _kill(self, block: Any) -> None:
        """No live stream references the block any more: it goes to the dead queues."""
        for tier, ts in self._tiers.items():
            if block in ts.own:
                self._adopt(tier, ts, block, None)
                ts.free.pop(block, None)
                ts.dead[block] = None

    # ------------------------------------------------------------------ Policy interface

    def on_request(self, blocks: Sequence[BlockId], now: float,
                   session: str | None = None) -> None:
        if session is None:
            return
        if self.duel:
            self._duel(blocks)
        s = self._stream(session)
        if s.last_req is not None and self.learn:
            if s.cls != RUNNING:
                g = now - s.t_state
                self.gaps.observe(s.cls, g)
                if s.tool >= 0:
                    self.gaps.observe(s.tool, g)
            self.gaps.observe(RUNNING, now - s.last_req)  # request to request, any class
        s.last_req = s.t_state = now
        s.cls = RUNNING
        s.turn_ends_left = TURN_ENDS_PER_USE
        s.tool = -1
        s.expected = 0.0
        s.ended = False
        new = dict.fromkeys(blocks)  # (a dict: the request's order, for s.cur)
        cur = tuple(new)
        old = s.cur
        nlive = self._nlive
        discard = self._discard
        n_old = len(old)
        if cur[:n_old] == old:  # the common case: the previous request, then new blocks
            added: Any = cur[n_old:]  # (in no particular order below: nlive is a map)
        else:
            added = new.keys() - old
        for b in added:
            nlive[b] = nlive.get(b, 0) + 1
            if discard:
                discard.discard(b)  # wanted again: no longer to be discarded
        if len(old) + len(added) > len(new):  # some of the previous request's blocks left
            for b in old:  # (in that request's order: the dead queues' order)
                if b not in new:
                    c = nlive.get(b, 0) - 1
                    if c > 0:
                        nlive[b] = c
                    else:
                        nlive.pop(b, None)
                        self._kill(b)
        s.cur = cur
        self._tracked_blocks += len(cur) - n_old
        if self._tracked_blocks > self.max_tracked_blocks:
            self._shed()
        self._dirty = True

    def _shed(self) -> None:
        """Forget the least recently active streams (never the latest) until the
        blocks of the latest requests kept are within ``max_tracked_blocks``."""
        recent = self._recent
        while self._tracked_blocks > self.max_tracked_blocks and len(recent) > 1:
            self._forget(self._streams[next(iter(recent))])

    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None:
        ts = self._tiers[tier]
        pairs = self._pairs
        if pairs and block in pairs:
            self._resolve(block)
        lru = ts.lru
        if block in lru:
            lru.move_to_end(block)
        else:
            lru[block] = None
        own = ts.own
        if session is not None:
            s = self._last_s
            if s is None or self._last_name != session:
                s = self._stream(session)
            if tier is self.tiers[0]:
                # A block placed in the first tier for the stream: a use of it
                # (an L2 write-back or an L3 demotion finishing is not).
                s.turn_ends_left = TURN_ENDS_PER_USE
            o = own.get(block, ABSENT)
            if o is not s:
                if o is ABSENT:  # not resident before: in no queue, owned by nobody
                    own[block] = s
                    s.res[tier][block] = None
                else:
                    self._adopt(tier, ts, block, s)
        elif block not in own:
            own[block] = None
            ts.free[block] = now

    def on_hit(self, tier: TierName, block: BlockId, now: float,
               session: str | None = None) -> None:
        ts = self._tiers[tier]
        if block not in ts.lru:
            return
        if session is not None and tier is self.tiers[0]:
            self._own_hits += 1
        ts.lru.move_to_end(block)
        if self._pairs and block in self._pairs:
            self._resolve(block)
        if block == ts.peek:
            ts.peek = None
        if session is not None:
            s = self._stream(session)
            if tier is self.tiers[0]:
                s.turn_ends_left = TURN_ENDS_PER_USE
            if ts.own[block] is not s:
                self._adopt(tier, ts, block, s)
        elif ts.own[block] is None and block in ts.free:
            ts.free[block] = now
            ts.free.move_to_end(block)

    def on_hits(self, tier: TierName, blocks: Sequence[BlockId], now: float,
                session: str | None = None) -> None:
        if session is None:
            on_hit = self.on_hit
            for b in blocks:
                on_hit(tier, b, now, session)
            return
        ts = self._tiers[tier]
        lru, own = ts.lru, ts.own
        mte = lru.move_to_end
        s = self._stream(session)
        if tier is self.tiers[0]:
            s.turn_ends_left = TURN_ENDS_PER_USE
        if tier is self.tiers[0]:
            self._own_hits += len(blocks)
        pairs = self._pairs
        pk = ts.peek
        if pk is None:  # the common case, without the peek test
            try:  # every block in this tier (the simulator's hits): each step in C
                deque(map(mte, blocks), 0)
            except KeyError:  # (block by block; moving again keeps the same LRU order)
                for b in blocks:
                    try:
                        mte(b)
                    except KeyError:
                        continue  # not in this tier
                    if b in pairs:
                        self._resolve(b)
                    if own[b] is not s:
                        self._adopt(tier, ts, b, s)
                return
            if pairs:  # (each test made when the loop above would make it: lazily)
                for b in filter(pairs.__contains__, blocks):
                    self._resolve(b)
            for b in compress(blocks, map(is_not, map(own.__getitem__, blocks), repeat(s))):
                self._adopt(tier, ts, b, s)
            return
        for b in blocks:
            if b not in lru:
                continue
            mte(b)
            if pairs and b in pairs:
                self._resolve(b)
            if own[b] is not s:
                self._adopt(tier, ts, b, s)
            if b == pk:
                ts.peek = pk = None

    def on_remove(self, tier: TierName, block: BlockId) -> None:
        ts = self._tiers[tier]
        if ts.lru.pop(block, False) is False:
            return
        old = ts.own.pop(block, None)
        if old is not None:
            pop_res(old.res[tier], block)
        else:
            ts.free.pop(block, None)
            ts.dead.pop(block, None)
        if block == ts.peek:
            ts.peek = None
        if self._pins and tier is self._tier0:
            self._pins.pop(block, None)  # (a pin is on the first tier; deleted or gone)
        if self._discard and block in self._discard and \
                not any(block in t.lru for t in self._tiers.values()):
            self._discard.discard(block)

    def on_session_event(self, event: SessionEvent, now: float) -> None:
        s = self._stream(event.session_id)
        ev = event.event
        if isinstance(ev, TurnEnd):
            if s.turn_ends_left <= 0:
                # Resent with no use of the stream since (a request, a hit, a
                # block put), a turn end kept its age at 0, and with it blocks
                # no one read in L1 -- one tenant held another's hit rate below
                # LRU's so, without a single read. Past TURN_ENDS_PER_USE
                # (the traces have a second turn end now and then), ignored.
                return
            s.turn_ends_left -= 1
            s.cls = REASON_CLASS.get(ev.reason, UNSPEC)
            s.t_state = now
            s.expected = ev.expected_gap_ms / 1000.0 if ev.expected_gap_ms > 0 else 0.0
            s.tool = self._tool_class(ev.tool_name) if ev.tool_name and s.cls == TOOL else -1
        elif isinstance(ev, SessionEnd):
            self._end(s, ev.discard)
        self._dirty = True

    def _end(self, s: Stream, discard: bool = False) -> None:
        # The class and time of its last turn end stay: an engine may end a session after
        # an idle timeout it chooses, and a session ended so may still come back. Its gap
        # is then one of its last class's (an idle main session's: awaiting the user), and
        # a long one -- exactly the tail that the timeout would otherwise hide from that
        # class's histogram, making every stream of the class look more likely back soon.
        s.ended = True
        nlive = self._nlive
        survivors = []
        for b in s.cur:
            c = nlive.get(b, 0) - 1
            if c > 0:
                nlive[b] = c
                survivors.append(b)
            else:
                nlive.pop(b, None)
                self._kill(b)
                if discard and any(b in ts.lru for ts in self._tiers.values()):
                    self._discard.add(b)  # (resident only: on_remove forgets it)
        self._tracked_blocks -= len(s.cur)
        s.cur = ()
        if survivors:  # shared with live streams: hand them to the latest active one
            heirs: dict[Any, Stream] = {}  # survivor -> the latest active live stream with it
            shared = set(survivors)
            for t in self._streams.values():
                if t.ended or not t.cur:
                    continue
                last = t.last_req or 0.0
                for b in shared.intersection(t.cur):
                    h = heirs.get(b)
                    if h is None or last > (h.last_req or 0.0):
                        heirs[b] = t  # (the first of equals, as max() would choose)
            for tier, ts in self._tiers.items():
                for b in survivors:
                    if ts.own.get(b, False) is s:
                        self._adopt(tier, ts, b, heirs.get(b))
        for tier, ts in self._tiers.items():  # whatever is left is private and dead
            for b in list(s.res[tier]):
                self._adopt(tier, ts, b, None)
                ts.dead[b] = None
                if discard:
                    self._discard.add(b)

    def pin(self, blocks: Sequence[BlockId], until: float) -> None:
        # A pin is on the first tier and lasts while the block stays there
        # (on_remove drops it): one recorded for a block not there would
        # be inherited by the next block inserted under its id.
        pins = self._pins
        if until <= 0.0:
            for b in blocks:
                pins.pop(b, None)
            return
        lru = self._tiers[self._tier0].lru
        for b in blocks:
            if b in lru:
                pins[b] = until

    # ------------------------------------------------------------------ victims

    def _pinned(self, block: Any, now: float) -> bool:
        until = self._pins.get(block)
        if until is None:
            return False
        if until > now:
            return True
        del self._pins[block]
        return False

    def expected_remaining(self, s: Stream, now: float) -> float:
        if s.ended:
            return 2 * NEVER
        age = now - s.t_state
        if s.expected > age:
            return s.expected - age
        cls = s.cls
        if s.tool >= 0 and self.gaps.n[s.tool] > self.tool_min:  # (the prior is one)
            cls = s.tool
        h = self.horizon
        if h < 0.0:
            h = -h * self._turn_T  # (horizon_s(), inlined)
        key = self.gaps.per_hit(cls, age, h) if h > 0.0 else self.gaps.remaining(cls, age)
        if s is self._last_s and s.cls == RUNNING:
            key *= self.placing_scale
        return key

    def _set_keys(self, streams: list[Stream], now: float) -> None:
        """``s.key = expected_remaining(s, now)`` for each stream, the calls inlined (the
        ranking keys every stream holding blocks or live at every rebuild: with hundreds of
        streams this loop is a good part of a replay)."""
        h = self.horizon
        if h < 0.0:
            h = -h * self._turn_T
        gaps = self.gaps
        remaining = gaps.remaining
        n, tool_min = gaps.n, self.tool_min
        never2 = 2 * NEVER
        learned: list[Stream] = []  # keyed by the gap model, in one call if per hit
        classes: list[int] = []
        ages: list[float] = []
        for s in streams:
            if s.ended:
                s.key = never2
                continue
            age = now - s.t_state
            if s.expected > age:
                s.key = s.expected - age
                continue
            cls = s.cls
            if s.tool >= 0 and n[s.tool] > tool_min:
                cls = s.tool
            if h > 0.0:
                learned.append(s)
                classes.append(cls)
                ages.append(age)
            else:
                s.key = remaining(cls, age)
        if learned:
            for s, k in zip(learned, gaps.per_hit_many(classes, ages, h), strict=True):
                s.key = k
        # (a running stream has no hinted gap: a request clears it, only a turn end sets it)
        placing = self._last_s
        if placing is not None and placing.cls == RUNNING and not placing.ended \
                and placing in streams:
            placing.key *= self.placing_scale

    def horizon_s(self) -> float:
        """The ranking key's horizon in seconds now (0: none yet, or ``horizon`` 0)."""
        h = self.horizon
        return -h * self._turn_T if h < 0.0 else h

    def _turnover(self, now: float) -> None:
        """One first-tier victim: the tier's turnover time is measured victim-count by
        victim-count (as many victims as the tier holds blocks)."""
        n = self._turn_n + 1
        if n >= self._cap:
            if self._turn_t >= 0.0:
                self._turn_T = now - self._turn_t
            self._turn_t = now
            n = 0
        self._turn_n = n

    def _tool_class(self, name: str) -> int:
        """The gap model's class for calls of tool ``name`` (-1: over ``max_tools``)."""
        cls = self._tool_cls.get(name)
        if cls is None:
            if len(self._tool_cls) >= self.max_tools:
                return -1
            cls = self._tool_cls[name] = self.gaps.add_class(PRIOR[TOOL])
        return cls


    def _ranking(self, tier: TierName, ts: TierState, now: float) -> Ranking:
        """Session-order victims: (block, drop?) — dead, then streams worst first."""
        return Ranking(tier, ts, self._streams.values(), self._set_keys,
                       lambda: self._last_s, now)

    @staticmethod
    def _dead_again(ts: TierState, now: float) -> None:
        """Dead blocks passed over by earlier victim calls back at the head of
        the dead queue (those still resident and ownerless), before a ranking
        is built: offered first again, at most once per rerank_s (a quota's
        victim passing over many of another namespace's would otherwise have
        every call take them off and back)."""
        dead = ts.dead
        for b in reversed(list(ts.passed)):
            if ts.own.get(b, False) is None:
                dead[b] = None
                dead.move_to_end(b, last=False)
        ts.passed.clear()
        ts.passed_t = now

    def _lru_candidate(self, ts: TierState, now: float, evictable: Evictable | None) -> Any:
        pins = self._pins
        for b in ts.lru:
            if pins and self._pinned(b, now):
                continue
            if evictable is None or evictable(b):
                return b
        return None

    def _rerank(self, ts: TierState, now: float) -> None:
        """Drop every tier's ranking; each is rebuilt on demand, from the state at ``now``.
        (Every tier counts as ranked at ``now``: a victim in another tier must not drop
        this one's ranking again, which a store evicting from L1 and L2 in turn would do
        at every call.)"""
        for t in self._tiers.values():
            t.gen = None
            t.peek = None
            t.rank_t = now
        self._dirty = False

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        ts = self._tiers[tier]
        lru = ts.lru
        first = tier is self._tier0
        if first and len(lru) > self._cap:
            self._cap = len(lru)  # full: the tier holds this many blocks
        if self._dirty or now - ts.rank_t > self.rerank_s:
            self._rerank(ts, now)
        sc = ts.peek
        if sc is not None and (sc not in lru or (evictable is not None and not evictable(sc))):
            sc = ts.peek = None
        pins = self._pins
        if sc is None:
            gen = ts.gen
            if gen is None:
                if ts.passed and now - ts.passed_t >= self.rerank_s:
                    self._dead_again(ts, now)
                gen = ts.gen = self._ranking(tier, ts, now)
            for b, drop in gen:
                if b not in lru:
                    continue
                if (pins and self._pinned(b, now)) or (evictable is not None
                                                        and not evictable(b)):
                    if drop:
                        # Off the dead queue (the ranking took it); kept aside
                        # rather than lost (it stayed resident, ownerless and
                        # in no queue, while live blocks went before it).
                        ts.passed[b] = None
                    continue
                sc, ts.peek_drop = b, drop
                break
            ts.peek = sc
        if pins or evictable is not None:
            lc = self._lru_candidate(ts, now, evictable)
        else:
            lc = next(iter(lru)) if lru else None
        if lc is not None and first and self.horizon < 0.0:
            self._turnover(now)
        stats = self.stats
        if sc is None:
            if lc is None:
                return None
            stats["lru_choice"] += 1
            if self._discard and lc in self._discard:
                return lc, Action.DROP  # (SessionEnd(discard), whoever chose it)
            return lc, self._action[tier]
        if lc is None or sc == lc:
            stats["agree"] += 1
            chosen = sc
        else:
            self._record_pair(sc, lc)
            if self.trust >= 0 and not self.lru_mode:
                stats["session_choice"] += 1
                chosen = sc
            else:
                stats["lru_choice"] += 1
                if self._discard and lc in self._discard:
                    return lc, Action.DROP
                return lc, self._action[tier]
        ts.peek = None
        if self._discard and chosen in self._discard:
            return chosen, Action.DROP
        if ts.peek_drop:
            stats["dead"] += 1
            return chosen, self._dead_action[tier]
        return chosen, self._action[tier]
