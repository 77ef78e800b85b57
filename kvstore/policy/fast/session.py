"""The session policy's Put phase for the simulator: ``Policy.fill`` with the calls inlined.

Same steps, same decisions as ``victim`` -> ``on_remove`` while full, then ``on_insert``,
per block (tests/policy compare the two decision by decision), about twice as fast. It
reads and writes the policy's private state, as a friend module: keep it in step with
``kvstore/policy/session/policy.py``. The server never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstore.policy.base import Policy
from kvstore.policy.session.policy import SessionPolicy
from kvstore.policy.session.streams import ABSENT, TURN_ENDS_PER_USE, Stream, pop_res
from kvstore.types import BlockId, TierName


def session_fill(self: SessionPolicy, tier: TierName, blocks: Sequence[BlockId], size: int,
                 now: float, session: str | None, resident: set[BlockId],
                 capacity: int) -> int:
    """``Policy.fill`` (per block: ``victim`` -> ``on_remove`` while full, then
    ``on_insert``) inlined, for the simulator: same steps, same decisions.

    State that only this loop changes while it runs (the peeked candidate, sizes,
    stats, whether the ranking is current, the LRU head and its owner's last request)
    is kept in locals. Three common steps skip the general one's tests, each only
    while nothing else would happen in it (no pair made or resolved, no re-owned or
    repeated block); the ranking (``_candidates``) publishes where it stands so that
    its next candidate is known without resuming it (``Ranking.active_first``/``walk``):

    * bypass: it walks the active stream newest first and the block just inserted is
      its next candidate (MIN's bypass of the request's own tail);
    * walk: it walks a stream ranked before the active one; that stream's newest
      block is the candidate;
    * LRU: LRU's choice is followed (``lru_mode`` / ``trust`` < 0).

    Keep in step with ``victim``, ``on_remove`` and ``on_insert``: the tests compare
    this with ``Policy.fill`` decision by decision."""
    if session is None:
        return Policy.fill(self, tier, blocks, size, now, session, resident, capacity)
    ts = self._tiers[tier]
    lru, own, pairs, pins = ts.lru, ts.own, self._pairs, self._pins
    first = tier is self._tier0
    turn = first and self.horizon < 0.0  # (the turnover clock runs)
    add, discard = resident.add, resident.discard
    s: Stream | None = None
    res_s: dict[Any, None] = {}
    n = n_lru = n_agree = n_sess = n_dead = 0  # stats, added at the end
    ranked = False  # the ranking is current (nothing here makes it stale once checked)
    nres = len(resident)
    nlru = len(lru)
    pk, pk_drop = ts.peek, ts.peek_drop
    follow = self.trust >= 0 and not self.lru_mode  # session choices (see victim)
    head: Any = ABSENT  # the LRU head, while the fast steps leave it in place
    prev: Any = None  # the block inserted last, if it is the newest of s's blocks
    # where the ranking stands (copied after every general step)
    af = wk = aend = wend = False
    act: Stream | None = None
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
                    if (prev is not None and act is s and prev not in sa and prev in lru
                            and prev in resident):
                        # ---- bypass: the candidate is prev, LRU's choice is the head
                        lc = head if head is not ABSENT else next(iter(lru))
                        if lc != prev and lc in pairs:
                            head = lc
                            if first and nlru > self._cap:
                                self._cap = nlru
                            sa.add(prev)
                            pk_drop = aend
                            if turn:  # self._turnover(now), inlined
                                tn = self._turn_n + 1
                                if tn >= self._cap:
                                    if self._turn_t >= 0.0:
                                        self._turn_T = now - self._turn_t
                                    self._turn_t = now
                                    tn = 0
                                self._turn_n = tn
                            n_sess += 1
                            if pk_drop:
                                n_dead += 1
                            discard(prev)
                            del lru[prev]
                            del own[prev]
                            res_s.popitem()  # prev, the newest (see pop_res)
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
                    if c not in wseen and c in lru and c in resident:
                        lc = head if head is not ABSENT else next(iter(lru))
                        if c != lc and (c in pairs or lc in pairs):
                            head = lc
                            if first and nlru > self._cap:
                                self._cap = nlru
                            wseen.add(c)
                            pk_drop = wend
                            if turn:  # self._turnover(now), inlined
                                tn = self._turn_n + 1
                                if tn >= self._cap:
                                    if self._turn_t >= 0.0:
                                        self._turn_T = now - self._turn_t
                                    self._turn_t = now
                                    tn = 0
                                self._turn_n = tn
                            n_sess += 1
                            if pk_drop:
                                n_dead += 1
                            discard(c)
                            del lru[c]
                            del own[c]  # (owned by the walked stream)
                            wres.popitem()  # c, the newest (see pop_res)
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
                    if turn:  # self._turnover(now), inlined
                        tn = self._turn_n + 1
                        if tn >= self._cap:
                            if self._turn_t >= 0.0:
                                self._turn_T = now - self._turn_t
                            self._turn_t = now
                            tn = 0
                        self._turn_n = tn
                    head = ABSENT  # lc leaves
                    n_lru += 1
                    discard(lc)
                    del lru[lc]
                    o = own.pop(lc, None)
                    if o is not None:
                        pop_res(o.res[tier], lc)
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
        head = ABSENT
        while nres >= capacity:
            if pins:
                ts.peek, ts.peek_drop = pk, pk_drop
                v = self.victim(tier, now, None)
                pk, pk_drop = ts.peek, ts.peek_drop
                follow = self.trust >= 0 and not self.lru_mode
                ranked = False
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
                        if ts.passed and now - ts.passed_t >= self.rerank_s:
                            self._dead_again(ts, now)  # (as victim does)
                        gen = ts.gen = self._ranking(tier, ts, now)
                    for c, drop in gen:
                        if c in lru:
                            sc, pk_drop = c, drop
                            break
                    pk = sc
                lc = next(iter(lru)) if lru else None
                if turn and lc is not None:
                    self._turnover(now)
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
                    pop_res(o.res[tier], x)
                else:
                    ts.free.pop(x, None)
                    ts.dead.pop(x, None)
                if x == pk:
                    pk = None
                if x is prev:
                    prev = None
        rk = ts.gen  # where the ranking stands (None: dropped, not rebuilt yet)
        if rk is None:
            af = wk = False
        else:
            af, wk, act, sa, aend = rk.active_first, rk.walk, rk.active, rk.seen_a, rk.a_ended
            wres, wseen, wend = rk.walk_res, rk.walk_seen, rk.walk_ended
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
                if tier is self.tiers[0]:
                    s.turn_ends_left = TURN_ENDS_PER_USE  # (as on_insert: a use)
                res_s = s.res[tier]
                if self._dirty:  # a new stream made another one forgotten (max_streams)
                    ranked = False
            o = own.get(b, ABSENT)
            prev = b  # now the newest of s's blocks (unless it was s's already)
            if o is not s:
                if o is ABSENT:
                    own[b] = s
                    res_s[b] = None
                else:
                    self._adopt(tier, ts, b, s)
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

