"""Session-aware placement: rank streams by when they are expected to come back.

See docs/policy.md for the reasoning. In short, an agent's next request resends its whole
context, so every block of a stream's latest request is reused together, at the stream's
next request, and blocks that fell out of it are never reused. The policy therefore ranks
*streams* (sessions or sub-agents) by the expected time until their next request and evicts:

1. dead blocks: referenced by no live stream's latest request (compacted out, or their
   session ended), oldest first, dropped rather than demoted;
2. then stream by stream, the stream expected back last first; within a stream the end of
   its context first (a prefix cache loses the least that way); a block another live stream
   also references (a shared prefix) goes with the stream that referenced it last, its
   owner (``defer_shared=True``: passed over, last of all, the former order);
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
_ABSENT: Any = object()  # dict.get default: "no entry" (None is an owner value)


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
        self.n = [0] * len(CLASS_NAMES)  # observations per class, the prior's included
        for c, g in enumerate(_PRIOR):
            self.observe(c, g)

    def add_class(self, prior: float) -> int:
        """A new class (e.g. one tool's calls), seeded with one observation ``prior``."""
        for rows, n in ((self.cnt, _NBINS), (self.tot, _NBINS), (self._scnt, _NBINS + 1),
                        (self._stot, _NBINS + 1)):
            rows.append([0.0] * n)
        self._stale.append(True)
        self.n.append(0)
        cls = len(self.cnt) - 1
        self.observe(cls, prior)
        return cls

    def observe(self, cls: int, gap: float) -> None:
        self.n[cls] += 1
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


def _lru_age_step(avg: float, age: float) -> float:
    """One step of the EWMA (weight 0.001 per victim) of how long the stream owning LRU's
    choice has been idle: the cache's characteristic time, the ranking's horizon."""
    return age if avg <= 0.0 else avg + 0.001 * (age - avg)


def _pop_res(res: dict[Any, None], block: Any) -> None:
    """Remove ``block`` from a stream's resident blocks. Blocks leave mostly from the
    newest end; ``popitem`` takes the last one *and* drops the deleted slots behind it,
    which ``del`` leaves in place (CPython), so that ``reversed(res)`` -- how the ranking
    finds a stream's newest block -- would otherwise skip more and more of them."""
    if res and next(reversed(res)) == block:
        res.popitem()
    else:
        res.pop(block, None)


class _Stream:
    __slots__ = ("cls", "cur", "ended", "expected", "key", "last_req", "name", "own_gap",
                 "res", "t_state", "tool")

    def __init__(self, name: str, tiers: Sequence[TierName]) -> None:
        self.name = name
        self.cur: set[Any] = set()  # block ids of the latest request
        self.cls = RUNNING
        self.tool = -1  # the gap model's class of the tool of a TOOL turn end (-1: none)
        self.t_state = 0.0  # when cls was set
        self.last_req: float | None = None
        self.ended = False
        self.expected = 0.0  # hinted gap (s), 0 if none
        self.own_gap: list[float] = [0.0] * len(CLASS_NAMES)  # this stream's EWMA gap per class
        self.key = 0.0
        # per tier: resident blocks this stream owns, prefix first
        self.res: dict[TierName, dict[Any, None]] = {t: {} for t in tiers}


class _Tier:
    __slots__ = ("a_ended", "active", "active_first", "dead", "free", "gen", "lru", "own",
                 "peek", "peek_drop", "rank_t", "seen_a", "walk", "walk_ended", "walk_res",
                 "walk_seen")

    def __init__(self) -> None:
        self.lru: OrderedDict[Any, None] = OrderedDict()  # all resident, LRU first
        self.own: dict[Any, _Stream | None] = {}  # resident block -> owner (None: no stream)
        self.free: OrderedDict[Any, float] = OrderedDict()  # ownerless: last use, LRU first
        # referenced by no live stream, oldest first (an OrderedDict: taken from the front,
        # which a dict does in time growing with the entries already taken)
        self.dead: OrderedDict[Any, None] = OrderedDict()
        self.gen: Iterator[tuple[Any, bool]] | None = None
        self.peek: Any = None
        self.peek_drop = False
        self.rank_t = -math.inf
        # Published by the ranking (``_candidates``) for ``fill``: its next candidate is
        # the newest block of ``active`` not in ``seen_a`` and not shared, if there is one.
        self.active_first = False
        self.active: _Stream | None = None
        self.seen_a: set[Any] = set()
        self.a_ended = False
        # ... or (``walk``) the newest block of ``walk_res`` not in ``walk_seen`` and not
        # shared, if there is one (a stream ranked before the active one)
        self.walk = False
        self.walk_res: dict[Any, None] = {}
        self.walk_seen: set[Any] = set()
        self.walk_ended = False


class SessionPolicy(Policy):
    name = "session"

    def __init__(self, tiers: Sequence[TierName], trust_limit: int = 2048,
                 rerank_s: float = 2.0, pair_limit: int = 1 << 17, learn: bool = True,
                 quantile: float = 0.0, per_stream: bool = False, duel: bool = True,
                 duel_decay: float = 0.995, duel_margin: float = 0.003,
                 trust_back: int = 256, duel_retry: int = 300, horizon: float = -1.0,
                 defer_shared: bool = False, max_tools: int = 256, tool_min: int = 8,
                 duel_warmup: int = 1000) -> None:
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
        self._last_name: str | None = None  # the stream of the latest call, cached
        self._last_s: _Stream | None = None
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
        # Requests seen since the tier first filled; the duel may switch to LRU only after
        # ``duel_warmup`` of them. While the tier fills and the gap model is still mostly
        # its prior, short stretches where LRU leads are noise, and an LRU episode then
        # costs far more than it saves (agent traces, half b, K=16, 1%, session-end hints:
        # four episodes in the first 1,000 requests cost 10 of the 53 points of the gap to
        # Belady that the policy closes without them).
        self.duel_warmup = duel_warmup
        self._duel_reqs = 0
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
        # True: blocks in the latest request of two or more live streams are passed over
        # and offered after every stream's (the policy before); False: a shared block is
        # offered with its owner's, the stream that referenced it last
        self.defer_shared = defer_shared
        self._tier0 = self.tiers[0]
        self._action = {t: self.default_action(t) for t in self.tiers}
        # Gaps after a tool call, per tool name (TurnEnd.tool_name): how long a tool runs,
        # or waits for a person's approval, depends on the tool far more than on anything
        # else an engine knows. A tool's own distribution ranks its streams once it has
        # ``tool_min`` observations; until then (and beyond ``max_tools`` names) the
        # tool-call class does. Both learn from every gap.
        self.max_tools = max_tools
        self.tool_min = tool_min
        self._tool_cls: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping

    def _stream(self, session: str) -> _Stream:
        s = self._last_s
        if s is not None and self._last_name == session:
            return s
        s = self._streams.get(session)
        if s is None:
            s = self._streams[session] = _Stream(session, self.tiers)
        self._last_name, self._last_s = session, s
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
                if s.tool >= 0:
                    self.gaps.observe(s.tool, g)
                og[s.cls] = g if og[s.cls] <= 0 else 0.5 * og[s.cls] + 0.5 * g
            g = now - s.last_req
            self.gaps.observe(RUNNING, g)  # request to request, any class
            og[RUNNING] = g if og[RUNNING] <= 0 else 0.5 * og[RUNNING] + 0.5 * g
        s.last_req = s.t_state = now
        s.cls = RUNNING
        s.tool = -1
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
        if cap and len(sh) > cap:
            pop = sh.popitem
            for _ in range(len(sh) - cap):
                pop(False)  # the least recently used
        # this policy's hits of the previous request are known now: compare like with like
        d = self.duel_decay
        self._own_acc = self._own_acc * d + self._own_hits
        self._sh_acc = self._sh_acc * d + self._sh_pending
        self._own_hits = 0
        self._sh_pending = h
        if not self.lru_mode:
            if cap:
                self._duel_reqs += 1
            if self._duel_reqs <= self.duel_warmup:
                return
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
            o = own.get(block, _ABSENT)
            if o is not s:
                if o is _ABSENT:  # not resident before: in no queue, owned by nobody
                    own[block] = s
                    s.res[tier][block] = None
                else:
                    self._adopt(tier, ts, block, s)
        elif block not in own:
            own[block] = None
            ts.free[block] = now

    def fill(self, tier: TierName, blocks: Sequence[BlockId], size: int, now: float,
             session: str | None, resident: set[BlockId], capacity: int) -> int:
        """``Policy.fill`` (per block: ``victim`` -> ``on_remove`` while full, then
        ``on_insert``) inlined, for the simulator: same steps, same decisions.

        State that only this loop changes while it runs (the peeked candidate, sizes,
        stats, whether the ranking is current, the LRU head and its owner's last request)
        is kept in locals. Three common steps skip the general one's tests, each only
        while nothing else would happen in it (no pair made or resolved, no re-owned or
        repeated block); the ranking (``_candidates``) publishes where it stands so that
        its next candidate is known without resuming it:

        * bypass: it walks the active stream newest first and the block just inserted is
          its next candidate (MIN's bypass of the request's own tail);
        * walk: it walks a stream ranked before the active one; that stream's newest
          block is the candidate;
        * LRU: LRU's choice is followed (``lru_mode`` / ``trust`` < 0).

        Keep in step with ``victim``, ``on_remove`` and ``on_insert``: the tests compare
        this with ``Policy.fill`` decision by decision."""
        if session is None:
            return super().fill(tier, blocks, size, now, session, resident, capacity)
        ts = self._tiers[tier]
        lru, own, pairs, pins, nlive = ts.lru, ts.own, self._pairs, self._pins, self._nlive
        keep_shared = not self.defer_shared  # shared blocks are offered like the others
        first = tier is self._tier0
        ewma = first and self.horizon < 0.0
        add, discard = resident.add, resident.discard
        s: _Stream | None = None
        res_s: dict[Any, None] = {}
        n = n_lru = n_agree = n_sess = n_dead = 0  # stats, added at the end
        ranked = False  # the ranking is current (nothing here makes it stale once checked)
        nres = len(resident)
        nlru = len(lru)
        pk, pk_drop = ts.peek, ts.peek_drop
        follow = self.trust >= 0 and not self.lru_mode  # session choices (see victim)
        last_lc: Any = _ABSENT  # an LRU head seen, and its owner's last request
        last_lr: float | None = None
        head: Any = _ABSENT  # the LRU head, while the fast steps leave it in place
        prev: Any = None  # the block inserted last, if it is the newest of s's blocks
        # where the ranking stands (copied after every general step)
        af = wk = aend = wend = False
        act: _Stream | None = None
        sa: set[Any] = set()
        wseen: set[Any] = set()
        wres: dict[Any, None] = {}
        for b in blocks:
            if b in resident:
                continue  # a repeat within the request
            if (nres >= capacity and ranked and s is not None and b not in lru
                    and b not in pairs and not pins):
                # (b not in lru: not in own either, they have the same keys)
                if follow and pk is None:
                    if af:
                        if (prev is not None and act is s and prev not in sa
                                and (keep_shared or nlive.get(prev, 0) < 2) and prev in lru
                                and prev in resident):
                            # ---- bypass: the candidate is prev, LRU's choice is the head
                            lc = head if head is not _ABSENT else next(iter(lru))
                            if lc != prev and lc in pairs:
                                head = lc
                                if first and nlru > self._cap:
                                    self._cap = nlru
                                sa.add(prev)
                                pk_drop = aend
                                if ewma:
                                    if lc is not last_lc:
                                        o = own.get(lc)
                                        last_lc = lc
                                        last_lr = o.last_req if o is not None else None
                                    if last_lr is not None:
                                        self._lru_age = _lru_age_step(self._lru_age, now - last_lr)
                                n_sess += 1
                                if pk_drop:
                                    n_dead += 1
                                discard(prev)
                                del lru[prev]
                                del own[prev]
                                res_s.popitem()  # prev, the newest (see _pop_res)
                                add(b)
                                lru[b] = None
                                own[b] = s
                                res_s[b] = None
                                n += 1
                                prev = b
                                continue
                    elif wk and wres:
                        # ---- walk: the candidate is the walked stream's newest block
                        c = next(reversed(wres))
                        if (c not in wseen and (keep_shared or nlive.get(c, 0) < 2) and c in lru
                                and c in resident):
                            lc = head if head is not _ABSENT else next(iter(lru))
                            if c != lc and (c in pairs or lc in pairs):
                                head = lc
                                if first and nlru > self._cap:
                                    self._cap = nlru
                                wseen.add(c)
                                pk_drop = wend
                                if ewma:
                                    if lc is not last_lc:
                                        o = own.get(lc)
                                        last_lc = lc
                                        last_lr = o.last_req if o is not None else None
                                    if last_lr is not None:
                                        self._lru_age = _lru_age_step(self._lru_age, now - last_lr)
                                n_sess += 1
                                if pk_drop:
                                    n_dead += 1
                                discard(c)
                                del lru[c]
                                del own[c]  # (owned by the walked stream)
                                wres.popitem()  # c, the newest (see _pop_res)
                                if c is prev:
                                    prev = None
                                add(b)
                                lru[b] = None
                                own[b] = s
                                res_s[b] = None
                                n += 1
                                prev = b
                                continue
                elif not follow and pk is not None:
                    # ---- LRU: the head leaves, the session choice stays peeked
                    lc = next(iter(lru))
                    if (lc != pk and pk in lru and lc in resident
                            and (pk in pairs or lc in pairs)):
                        if first and nlru > self._cap:
                            self._cap = nlru
                        if ewma:
                            if lc is not last_lc:
                                o = own.get(lc)
                                last_lr = o.last_req if o is not None else None
                            if last_lr is not None:
                                self._lru_age = _lru_age_step(self._lru_age, now - last_lr)
                        last_lc = head = _ABSENT  # lc leaves
                        n_lru += 1
                        discard(lc)
                        del lru[lc]
                        o = own.pop(lc, None)
                        if o is not None:
                            _pop_res(o.res[tier], lc)
                        else:
                            ts.free.pop(lc, None)
                            ts.dead.pop(lc, None)
                        if lc is prev:
                            prev = None
                        add(b)
                        lru[b] = None
                        own[b] = s
                        res_s[b] = None
                        n += 1
                        prev = b
                        continue
            # ---- the general step
            head = _ABSENT
            while nres >= capacity:
                if pins:
                    ts.peek, ts.peek_drop = pk, pk_drop
                    v = self.victim(tier, now, None)
                    pk, pk_drop = ts.peek, ts.peek_drop
                    follow = self.trust >= 0 and not self.lru_mode
                    ranked = False
                    last_lc = _ABSENT
                    if v is None:
                        break
                    x = v[0]
                else:
                    # -- victim(tier, now, None) without pins
                    if first and nlru > self._cap:
                        self._cap = nlru
                    if not ranked:
                        if self._dirty or now - ts.rank_t > self.rerank_s:
                            self._rerank(ts, now)
                            pk = None
                        ranked = True
                    sc = pk
                    if sc is not None and sc not in lru:
                        sc = None
                    if sc is None:
                        gen = ts.gen
                        if gen is None:
                            gen = ts.gen = self._candidates(tier, ts, now)
                        for c, drop in gen:
                            if c in lru:
                                sc, pk_drop = c, drop
                                break
                        pk = sc
                    lc = next(iter(lru)) if lru else None
                    if ewma and lc is not None:
                        if lc is not last_lc:
                            o = own.get(lc)
                            last_lc, last_lr = lc, o.last_req if o is not None else None
                        if last_lr is not None:  # (the ranking reads it when it resumes)
                            self._lru_age = _lru_age_step(self._lru_age, now - last_lr)
                    if sc is None:
                        if lc is None:
                            break
                        n_lru += 1
                        x = lc
                    elif lc is None or sc == lc:
                        n_agree += 1
                        x = sc
                        pk = None
                        if pk_drop:
                            n_dead += 1
                    else:
                        if sc not in pairs and lc not in pairs:
                            pairs[sc] = (lc, -1)
                            pairs[lc] = (sc, +1)
                            if len(pairs) > self.pair_limit:
                                self._trim_pairs()
                        if follow:
                            n_sess += 1
                            x = sc
                            pk = None
                            if pk_drop:
                                n_dead += 1
                        else:
                            n_lru += 1
                            x = lc
                # -- remove x; on_remove(tier, x)
                if x in resident:
                    discard(x)
                    nres -= 1
                if x in lru:
                    del lru[x]
                    nlru -= 1
                    o = own.pop(x, None)
                    if o is not None:
                        _pop_res(o.res[tier], x)
                    else:
                        ts.free.pop(x, None)
                        ts.dead.pop(x, None)
                    if x == pk:
                        pk = None
                    if x is last_lc:  # (it may come back with another owner)
                        last_lc = _ABSENT
                    if x is prev:
                        prev = None
            af, wk, act, sa, aend = (ts.active_first, ts.walk, ts.active, ts.seen_a,
                                     ts.a_ended)
            wres, wseen, wend = ts.walk_res, ts.walk_seen, ts.walk_ended
            if nres < capacity:
                # -- insert b; on_insert(tier, b, size, now, session)
                add(b)
                nres += 1
                n += 1
                if pairs and b in pairs:
                    self._resolve(b)
                    follow = self.trust >= 0 and not self.lru_mode
                if b in lru:
                    lru.move_to_end(b)
                else:
                    lru[b] = None
                    nlru += 1
                if s is None:  # nothing in this loop changes the cached stream after this
                    s = self._stream(session)
                    res_s = s.res[tier]
                o = own.get(b, _ABSENT)
                prev = b  # now the newest of s's blocks (unless it was s's already)
                if o is not s:
                    if o is _ABSENT:
                        own[b] = s
                        res_s[b] = None
                    else:
                        self._adopt(tier, ts, b, s)
                        last_lc = _ABSENT
                else:
                    prev = None
        ts.peek, ts.peek_drop = pk, pk_drop
        if n_lru or n_agree or n_sess or n_dead:
            stats = self.stats
            stats["lru_choice"] += n_lru
            stats["agree"] += n_agree
            stats["session_choice"] += n_sess
            stats["dead"] += n_dead
        return n

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
        if pk is None:  # the common case, without the peek test
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
            _pop_res(old.res[tier], block)
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
            s.tool = self._tool_class(ev.tool_name) if ev.tool_name and s.cls == TOOL else -1
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
        cls = s.cls
        if s.tool >= 0 and self.gaps.n[s.tool] > self.tool_min:  # (the prior is one)
            cls = s.tool
        h = self.horizon
        if h < 0.0:
            h = -h * self._lru_age
        if h > 0.0:
            return self.gaps.per_hit(cls, age, h)
        return self.gaps.remaining(cls, age, self.quantile)

    def _tool_class(self, name: str) -> int:
        """The gap model's class for calls of tool ``name`` (-1: over ``max_tools``)."""
        cls = self._tool_cls.get(name)
        if cls is None:
            if len(self._tool_cls) >= self.max_tools:
                return -1
            cls = self._tool_cls[name] = self.gaps.add_class(_PRIOR[TOOL])
        return cls

    def _candidates(self, tier: TierName, ts: _Tier, now: float) -> Iterator[tuple[Any, bool]]:
        """Session-order victims: (block, drop?) — dead, then streams worst first."""
        own = ts.own
        dead = ts.dead
        while dead:
            b = dead.popitem(last=False)[0]  # leaves the queue; stays resident, ownerless
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
        defer = self.defer_shared
        def take(s: _Stream, seen: set[Any]) -> Any:
            """The stream's newest block not offered yet (shared ones are deferred if
            ``defer_shared``)."""
            for x in reversed(s.res[tier]):
                if x in seen:
                    continue
                seen.add(x)
                if own.get(x) is not s:
                    continue
                if defer and nlive.get(x, 0) >= 2:
                    deferred.append(x)
                    continue
                return x
            return None

        # Blocks are offered newest first and read live: the stream whose request is
        # being placed (``active``) gains blocks while this ranking stands, and those
        # go before any better-ranked stream's. For the stream ranked worst this is
        # bypassing its own request's tail, as MIN would.
        active = self._last_s
        a_idx = len(streams)
        for i, s in enumerate(streams):
            if s is active:
                a_idx = i
        seen_a: set[Any] = set()
        a_ended = active.ended if active is not None else False
        ts.active, ts.seen_a, ts.a_ended = active, seen_a, a_ended
        for i, s in enumerate(streams):
            if not free_done and free_key >= s.key:
                free_done = True
                ts.active_first = ts.walk = False
                yield from self._free_lru(ts)
            seen = seen_a if i == a_idx else set()
            ended = s.ended  # fixed while this ranking stands (an event resets it)
            res_s = s.res[tier]
            check_active = i > a_idx and active is not None
            # every resume from here on starts with the active stream's newest blocks,
            # or (before the active stream) with this stream's
            ts.active_first = i >= a_idx and active is not None
            ts.walk = not ts.active_first
            ts.walk_res, ts.walk_seen, ts.walk_ended = res_s, seen, ended
            while True:
                if check_active:
                    b = take(active, seen_a)  # type: ignore[arg-type]
                    if b is not None:
                        yield b, a_ended
                        continue
                # take(s, seen), inlined
                for b in reversed(res_s):  # (every block in res_s is owned by s)
                    if b in seen:
                        continue
                    seen.add(b)
                    if defer and nlive.get(b, 0) >= 2:
                        deferred.append(b)
                        continue
                    break
                else:
                    break
                yield b, ended
        ts.active_first = ts.walk = False
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

    def _rerank(self, ts: _Tier, now: float) -> None:
        """Drop every tier's ranking; each is rebuilt on demand, from the state at ``now``.
        (Every tier counts as ranked at ``now``: a victim in another tier must not drop
        this one's ranking again, which a store evicting from L1 and L2 in turn would do
        at every call.)"""
        for t in self._tiers.values():
            t.gen = None
            t.peek = None
            t.active_first = t.walk = False
            t.rank_t = now
        self._dirty = False

    def _trim_pairs(self) -> None:
        pairs = self._pairs
        for _ in range(2):
            old = next(iter(pairs))
            other, _d = pairs.pop(old)
            pairs.pop(other, None)

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
                gen = ts.gen = self._candidates(tier, ts, now)
            for b, drop in gen:
                if b not in lru or (pins and self._pinned(b, now)):
                    continue
                if evictable is not None and not evictable(b):
                    continue
                sc, ts.peek_drop = b, drop
                break
            ts.peek = sc
        if pins or evictable is not None:
            lc = self._lru_candidate(ts, now, evictable)
        else:
            lc = next(iter(lru)) if lru else None
        if lc is not None and first and self.horizon < 0.0:
            o = ts.own.get(lc)
            if o is not None and o.last_req is not None:
                age = now - o.last_req
                self._lru_age = _lru_age_step(self._lru_age, age)
        stats = self.stats
        if sc is None:
            if lc is None:
                return None
            stats["lru_choice"] += 1
            return lc, self._action[tier]
        if lc is None or sc == lc:
            stats["agree"] += 1
            chosen = sc
        else:
            pairs = self._pairs
            if sc not in pairs and lc not in pairs:  # each block in one pair at most
                pairs[sc] = (lc, -1)  # sc referenced first: the session choice was wrong
                pairs[lc] = (sc, +1)  # lc referenced first: LRU's choice was
                if len(pairs) > self.pair_limit:
                    self._trim_pairs()
            if self.trust >= 0 and not self.lru_mode:
                stats["session_choice"] += 1
                chosen = sc
            else:
                stats["lru_choice"] += 1
                return lc, self._action[tier]
        ts.peek = None
        if ts.peek_drop:
            stats["dead"] += 1
            return chosen, Action.DROP
        return chosen, self._action[tier]
