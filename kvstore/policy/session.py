"""Session-aware placement: rank streams by when they are expected to come back.

See docs/policy.md for the reasoning. In short, an agent's next request resends its whole
context, so every block of a stream's latest request is reused together, at the stream's
next request, and blocks that fell out of it are never reused. The policy therefore ranks
*streams* (sessions or sub-agents) by the expected time until their next request and evicts:

1. dead blocks: referenced by no live stream's latest request (compacted out, or their
   session ended), oldest first, dropped rather than demoted;
2. then stream by stream, the stream expected back last first; within a stream the end of
   its context first (a prefix cache loses the least that way); blocks another live stream
   also references (shared prefixes) are passed over and go last;
3. blocks with no session (e.g. Mooncake) form one pseudo-stream ranked by LRU age.

The expected time to the next request is learned online, per hint class (request running,
tool call, awaiting user, done, unspecified), as a log-binned histogram of the gaps already
observed (turn end -> next request of the same stream), conditioned on the time already
waited: ``E[G - a | G > a]``. A stream that waited longer than any gap seen is not expected
back. An ``expected_gap_ms`` hint is used while it has not elapsed.

Fallback towards LRU: whenever the session choice differs from LRU's, the pair is remembered;
whichever of the two blocks is referenced first shows which choice was wrong. A clamped
counter (``trust``) moves by one per resolved pair; below zero the policy evicts LRU's
choice. This is a ghost-LRU comparison limited to the decisions where the two differ.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from kvstore.policy.base import Action, Evictable, Policy
from kvstore.types import BlockId, SessionEnd, SessionEvent, TierName, TurnEnd, TurnEndReason

RUNNING, UNSPEC, TOOL, USER, DONE = range(5)
CLASS_NAMES = ("running", "unspecified", "tool_call", "awaiting_user", "done")
_REASON_CLASS = {
    TurnEndReason.UNSPECIFIED: UNSPEC,
    TurnEndReason.TOOL_CALL: TOOL,
    TurnEndReason.AWAITING_USER: USER,
    TurnEndReason.DONE: DONE,
}
#: Prior guess of the gap (s) per class, worth one observation each.
_PRIOR = (30.0, 30.0, 10.0, 300.0, 3600.0)

_NBINS = 56  # half-octave bins from 0.25 s to ~2^23.5 s
_NEVER = 1e12  # expected remaining time of a stream not expected back


def _bin(gap: float) -> int:
    if gap <= 0.25:
        return 0
    i = int(2.0 * math.log2(gap)) + 4
    return i if i < _NBINS else _NBINS - 1


class GapModel:
    """Per-class histogram of observed gaps with suffix sums for E[G - a | G > a]."""

    def __init__(self) -> None:
        self.cnt = [[0.0] * _NBINS for _ in CLASS_NAMES]
        self.tot = [[0.0] * _NBINS for _ in CLASS_NAMES]
        self._scnt = [[0.0] * (_NBINS + 1) for _ in CLASS_NAMES]
        self._stot = [[0.0] * (_NBINS + 1) for _ in CLASS_NAMES]
        self._stale = [True] * len(CLASS_NAMES)
        for c, g in enumerate(_PRIOR):
            self.observe(c, g)

    def observe(self, cls: int, gap: float) -> None:
        i = _bin(gap)
        self.cnt[cls][i] += 1.0
        self.tot[cls][i] += gap
        self._stale[cls] = True

    def _refresh(self, cls: int) -> None:
        sc, st = self._scnt[cls], self._stot[cls]
        cnt, tot = self.cnt[cls], self.tot[cls]
        sc[_NBINS] = st[_NBINS] = 0.0
        for i in range(_NBINS - 1, -1, -1):
            sc[i] = sc[i + 1] + cnt[i]
            st[i] = st[i + 1] + tot[i]
        self._stale[cls] = False

    def per_hit(self, cls: int, age: float, horizon: float) -> float:
        """Expected seconds of residence per hit of a stream of this class that waited
        ``age`` if it is kept at most ``horizon`` s more: E[min(G - a, T) | G > a] /
        P(G - a <= T | G > a), the inverse of LHD's hit density (a stream unlikely to be
        back before it would be evicted anyway is worth little, however soon its mean)."""
        cnt, tot = self.cnt[cls], self.tot[cls]
        hits = occ = 0.0
        for j in range(_bin(age), _NBINS):
            c = cnt[j]
            if c <= 0:
                continue
            m = tot[j] / c - age  # the bin's samples, by their mean
            if m <= 0:
                continue
            if m <= horizon:
                hits += c
                occ += c * m
            else:
                occ += c * horizon
        if hits <= 0:
            return _NEVER + age
        return occ / hits

    def remaining(self, cls: int, age: float, q: float = 0.0) -> float:
        """Time still to wait for a stream of this class that waited ``age``: the
        conditional mean E[G - a | G > a] (``q`` = 0), else the conditional ``q``-quantile
        (robust to the heavy tail of user think times, which swamps the mean)."""
        if self._stale[cls]:
            self._refresh(cls)
        i = _bin(age)
        sc = self._scnt[cls]
        if q > 0.0:
            cnt, tot = self.cnt[cls], self.tot[cls]
            # samples in the age's own bin count only if their mean exceeds the age
            if cnt[i] > 0 and tot[i] / cnt[i] <= age:
                i += 1
            n = sc[i] if i < _NBINS else 0.0
            if n <= 0:
                return _NEVER + age
            want = q * n
            acc = 0.0
            for j in range(i, _NBINS):
                acc += cnt[j]
                if acc >= want:
                    return max(tot[j] / cnt[j] - age, 1e-3)
            return _NEVER + age
        # samples in the age's own bin count only if some of them exceed the age
        n, s = sc[i], self._stot[cls][i]
        if n > 0 and s / n <= age:
            n, s = sc[i + 1], self._stot[cls][i + 1]
        if n <= 0:
            return _NEVER + age
        return max(s / n - age, 1e-3)


class _Stream:
    __slots__ = ("cls", "cur", "ended", "expected", "key", "last_req", "name", "own_gap",
                 "res", "t_state")

    def __init__(self, name: str, tiers: Sequence[TierName]) -> None:
        self.name = name
        self.cur: set[Any] = set()  # block ids of the latest request
        self.cls = RUNNING
        self.t_state = 0.0  # when cls was set
        self.last_req: float | None = None
        self.ended = False
        self.expected = 0.0  # hinted gap (s), 0 if none
        self.own_gap: list[float] = [0.0] * len(CLASS_NAMES)  # this stream's EWMA gap per class
        self.key = 0.0
        # per tier: resident blocks this stream owns, prefix first
        self.res: dict[TierName, dict[Any, None]] = {t: {} for t in tiers}


class _Tier:
    __slots__ = ("dead", "free", "gen", "lru", "own", "peek", "peek_drop", "rank_t")

    def __init__(self) -> None:
        self.lru: OrderedDict[Any, None] = OrderedDict()  # all resident, LRU first
        self.own: dict[Any, _Stream | None] = {}  # resident block -> owner (None: no stream)
        self.free: OrderedDict[Any, float] = OrderedDict()  # ownerless: last use, LRU first
        self.dead: dict[Any, None] = {}  # referenced by no live stream, oldest first
        self.gen: Iterator[tuple[Any, bool]] | None = None
        self.peek: Any = None
        self.peek_drop = False
        self.rank_t = -math.inf


class SessionPolicy(Policy):
    name = "session"

    def __init__(self, tiers: Sequence[TierName], trust_limit: int = 2048,
                 rerank_s: float = 2.0, pair_limit: int = 1 << 17, learn: bool = True,
                 quantile: float = 0.0, per_stream: bool = False, duel: bool = True,
                 duel_decay: float = 0.995, duel_margin: float = 0.003,
                 trust_back: int = 256, duel_retry: int = 300, horizon: float = -1.0) -> None:
        super().__init__(tiers)
        self.per_stream = per_stream
        self.quantile = quantile
        self.learn = learn  # False: keep the prior gap model (tests)
        self.gaps = GapModel()
        self.trust = 0  # >= 0: follow the session ranking; < 0: follow LRU
        self.trust_limit = trust_limit
        self.rerank_s = rerank_s
        self.pair_limit = pair_limit
        self._streams: dict[str, _Stream] = {}
        self._last: tuple[str | None, _Stream | None] = (None, None)
        self._tiers = {t: _Tier() for t in tiers}
        self._nlive: dict[Any, int] = {}  # block -> live streams whose latest request has it
        self._pairs: dict[Any, tuple[Any, int]] = {}
        self._pins: dict[Any, float] = {}
        self._dirty = True
        self.stats = {"session_choice": 0, "lru_choice": 0, "agree": 0, "dead": 0,
                      "to_lru": 0, "to_session": 0}
        # Shadow LRU duel (first tier only): an LRU of the tier's size (learned: the number
        # of blocks held when ``victim`` is called) replays the session requests; decayed
        # hit counts of the shadow and of this policy decide when to fall back to LRU.
        self.duel = duel
        self.duel_decay = duel_decay
        self.duel_margin = duel_margin
        self.trust_back = trust_back
        self.duel_retry = duel_retry  # > 0: in LRU mode, retry the ranking after this many
        self._lru_reqs = 0  # requests (0: only when the pair votes reach trust_back)
        self._shadow: OrderedDict[Any, None] = OrderedDict()
        self._cap = 0  # tier size in blocks, once known
        self._own_hits = 0  # this policy's first-tier hits since the last request
        self._own_acc = 0.0
        self._sh_acc = 0.0
        self._sh_pending = 0
        self.lru_mode = False
        # Ranking key: ``horizon`` > 0: seconds per hit within that many seconds (see
        # GapModel.per_hit); < 0: the same with a horizon of -horizon x the cache's
        # characteristic time (EWMA of how long LRU's victim's stream has been idle);
        # 0: the conditional mean remaining wait E[G - a | G > a].
        self.horizon = horizon
        self._lru_age = 0.0

    # ------------------------------------------------------------------ bookkeeping

    def _stream(self, session: str) -> _Stream:
        name, s = self._last
        if name == session and s is not None:
            return s
        s = self._streams.get(session)
        if s is None:
            s = self._streams[session] = _Stream(session, self.tiers)
        self._last = (session, s)
        return s

    def _resolve(self, block: Any) -> None:
        other, delta = self._pairs.pop(block)
        self._pairs.pop(other, None)
        t = self.trust + delta
        lim = self.trust_limit
        self.trust = lim if t > lim else -lim if t < -lim else t

    def _adopt(self, tier: TierName, ts: _Tier, block: Any, s: _Stream | None) -> None:
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
            og = s.own_gap
            if s.cls != RUNNING:
                g = now - s.t_state
                self.gaps.observe(s.cls, g)
                og[s.cls] = g if og[s.cls] <= 0 else 0.5 * og[s.cls] + 0.5 * g
            g = now - s.last_req
            self.gaps.observe(RUNNING, g)  # request to request, any class
            og[RUNNING] = g if og[RUNNING] <= 0 else 0.5 * og[RUNNING] + 0.5 * g
        s.last_req = s.t_state = now
        s.cls = RUNNING
        s.expected = 0.0
        s.ended = False
        new = set(blocks)
        old = s.cur
        nlive = self._nlive
        for b in (new - old) if old else new:
            nlive[b] = nlive.get(b, 0) + 1
        if old:
            for b in old - new:
                c = nlive.get(b, 0) - 1
                if c > 0:
                    nlive[b] = c
                else:
                    nlive.pop(b, None)
                    self._kill(b)
        s.cur = new
        self._dirty = True

    def _duel(self, blocks: Sequence[BlockId]) -> None:
        """Replay the request on the shadow LRU; update the decayed hit counts and the mode."""
        sh = self._shadow
        mte = sh.move_to_end
        h = 0
        for b in blocks:
            if b in sh:
                h += 1
                mte(b)
            else:
                sh[b] = None
        cap = self._cap
        if cap:
            pop = sh.popitem
            while len(sh) > cap:
                pop(last=False)
        # this policy's hits of the previous request are known now: compare like with like
        d = self.duel_decay
        self._own_acc = self._own_acc * d + self._own_hits
        self._sh_acc = self._sh_acc * d + self._sh_pending
        self._own_hits = 0
        self._sh_pending = h
        if not self.lru_mode:
            if self._sh_acc - self._own_acc > self.duel_margin * self._sh_acc + 32.0:
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

    def on_insert(self, tier: TierName, block: BlockId, size: int, now: float,
                  session: str | None = None) -> None:
        ts = self._tiers[tier]
        if self._pairs and block in self._pairs:
            self._resolve(block)
        ts.lru[block] = None
        ts.lru.move_to_end(block)
        if session is not None:
            s = self._stream(session)
            if ts.own.get(block, False) is not s:
                self._adopt(tier, ts, block, s)
        elif block not in ts.own:
            ts.own[block] = None
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
            self._own_hits += len(blocks)
        pairs = self._pairs
        pk = ts.peek
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
            old.res[tier].pop(block, None)
        else:
            ts.free.pop(block, None)
            ts.dead.pop(block, None)
        if block == ts.peek:
            ts.peek = None

    def on_session_event(self, event: SessionEvent, now: float) -> None:
        s = self._stream(event.session_id)
        ev = event.event
        if isinstance(ev, TurnEnd):
            s.cls = _REASON_CLASS.get(ev.reason, UNSPEC)
            s.t_state = now
            s.expected = ev.expected_gap_ms / 1000.0 if ev.expected_gap_ms > 0 else 0.0
        elif isinstance(ev, SessionEnd):
            self._end(s)
        self._dirty = True

    def _end(self, s: _Stream) -> None:
        s.ended = True
        s.cls = DONE
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
        s.cur = set()
        if survivors:  # shared with live streams: hand them to the latest active one
            for tier, ts in self._tiers.items():
                for b in survivors:
                    if ts.own.get(b, False) is s:
                        heir = max((t for t in self._streams.values()
                                    if not t.ended and b in t.cur),
                                   key=lambda t: t.last_req or 0.0, default=None)
                        self._adopt(tier, ts, b, heir)
        for tier, ts in self._tiers.items():  # whatever is left is private and dead
            for b in list(s.res[tier]):
                self._adopt(tier, ts, b, None)
                ts.dead[b] = None

    def pin(self, blocks: Sequence[BlockId], until: float) -> None:
        for b in blocks:
            self._pins[b] = until

    # ------------------------------------------------------------------ victims

    def _pinned(self, block: Any, now: float) -> bool:
        until = self._pins.get(block)
        if until is None:
            return False
        if until > now:
            return True
        del self._pins[block]
        return False

    def expected_remaining(self, s: _Stream, now: float) -> float:
        if s.ended:
            return 2 * _NEVER
        age = now - s.t_state
        if s.expected > age:
            return s.expected - age
        if self.per_stream:
            own = s.own_gap[s.cls]
            if own > age:  # this stream's own recent gaps in this state predict it best
                return own - age
        h = self.horizon
        if h < 0.0:
            h = -h * self._lru_age
        if h > 0.0:
            return self.gaps.per_hit(s.cls, age, h)
        return self.gaps.remaining(s.cls, age, self.quantile)

    def _candidates(self, tier: TierName, ts: _Tier, now: float) -> Iterator[tuple[Any, bool]]:
        """Session-order victims: (block, drop?) — dead, then streams worst first."""
        own = ts.own
        dead = ts.dead
        while dead:
            b = next(iter(dead))
            del dead[b]  # leaves the queue; it stays resident and ownerless
            dead_again = b in own and own[b] is None
            if dead_again:
                ts.free.pop(b, None)
                yield b, True
        # every stream that holds blocks or may soon (its latest request is being placed)
        streams = [s for s in self._streams.values() if s.res[tier] or s.cur]
        for s in streams:
            s.key = self.expected_remaining(s, now)
        free_key = (now - next(iter(ts.free.values()))) if ts.free else -1.0
        streams.sort(key=lambda s: s.key, reverse=True)
        free_done = not ts.free
        nlive = self._nlive
        deferred: list[Any] = []
        def take(s: _Stream, seen: set[Any]) -> Any:
            """The stream's newest block not offered yet (shared ones are deferred)."""
            for x in reversed(s.res[tier]):
                if x in seen:
                    continue
                seen.add(x)
                if own.get(x) is not s:
                    continue
                if nlive.get(x, 0) >= 2:
                    deferred.append(x)
                    continue
                return x
            return None

        # Blocks are offered newest first and read live: the stream whose request is
        # being placed (``active``) gains blocks while this ranking stands, and those
        # go before any better-ranked stream's. For the stream ranked worst this is
        # bypassing its own request's tail, as MIN would.
        active = self._last[1]
        a_idx = len(streams)
        for i, s in enumerate(streams):
            if s is active:
                a_idx = i
        seen_a: set[Any] = set()
        for i, s in enumerate(streams):
            if not free_done and free_key >= s.key:
                free_done = True
                yield from self._free_lru(ts)
            seen = seen_a if i == a_idx else set()
            while True:
                if i > a_idx and active is not None:
                    b = take(active, seen_a)
                    if b is not None:
                        yield b, active.ended
                        continue
                b = take(s, seen)
                if b is None:
                    break
                yield b, s.ended
        if not free_done:
            yield from self._free_lru(ts)
        for b in deferred:
            if b in own:
                yield b, False

    @staticmethod
    def _free_lru(ts: _Tier) -> Iterator[tuple[Any, bool]]:
        """Ownerless blocks, least recently used first (no copy: they leave as evicted)."""
        free = ts.free
        last = None
        while free:
            b = next(iter(free))
            if b == last:  # the caller passed over it (pinned, not evictable): stop here
                return
            last = b
            yield b, False

    def _lru_candidate(self, ts: _Tier, now: float, evictable: Evictable | None) -> Any:
        pins = self._pins
        for b in ts.lru:
            if pins and self._pinned(b, now):
                continue
            if evictable is None or evictable(b):
                return b
        return None

    def victim(self, tier: TierName, now: float,
               evictable: Evictable | None = None) -> tuple[BlockId, Action] | None:
        ts = self._tiers[tier]
        if tier is self.tiers[0] and len(ts.lru) > self._cap:
            self._cap = len(ts.lru)  # full: the tier holds this many blocks
        if self._dirty or now - ts.rank_t > self.rerank_s or ts.gen is None:
            for t in self._tiers.values():
                t.gen = None
                t.peek = None
            self._dirty = False
            ts.rank_t = now
        sc = ts.peek
        if sc is not None and (sc not in ts.lru or (evictable is not None and not evictable(sc))):
            sc = ts.peek = None
        if sc is None:
            if ts.gen is None:
                ts.gen = self._candidates(tier, ts, now)
            pins = self._pins
            for b, drop in ts.gen:
                if b not in ts.lru or (pins and self._pinned(b, now)):
                    continue
                if evictable is not None and not evictable(b):
                    continue
                sc, ts.peek_drop = b, drop
                break
            ts.peek = sc
        lc = self._lru_candidate(ts, now, evictable)
        if self.horizon < 0.0 and lc is not None and tier is self.tiers[0]:
            o = ts.own.get(lc)
            if o is not None and o.last_req is not None:
                age = now - o.last_req
                la = self._lru_age
                self._lru_age = age if la <= 0.0 else la + 0.001 * (age - la)
        if sc is None:
            if lc is None:
                return None
            self.stats["lru_choice"] += 1
            return lc, self.default_action(tier)
        if lc is None or sc == lc:
            self.stats["agree"] += 1
            chosen = sc
        else:
            pairs = self._pairs
            if sc not in pairs and lc not in pairs:  # each block in one pair at most
                pairs[sc] = (lc, -1)  # sc referenced first: the session choice was wrong
                pairs[lc] = (sc, +1)  # lc referenced first: LRU's choice was
            if len(pairs) > self.pair_limit:
                for _ in range(2):
                    old = next(iter(pairs))
                    other, _d = pairs.pop(old)
                    pairs.pop(other, None)
            if self.trust >= 0 and not self.lru_mode:
                self.stats["session_choice"] += 1
                chosen = sc
            else:
                self.stats["lru_choice"] += 1
                return lc, self.default_action(tier)
        ts.peek = None
        if ts.peek_drop:
            self.stats["dead"] += 1
            return chosen, Action.DROP
        return chosen, self.default_action(tier)
