"""The session policy's gap model: how long until a stream's next request.

Gaps (turn end -> the same stream's next request) are learned online per hint class, and
per tool name for tool calls, as log-binned histograms; a stream that has already waited
``a`` seconds is expected back after E[G - a | G > a] (or a per-hit cost, see ``per_hit``).
"""

from __future__ import annotations

import math

from kvstore.types import TurnEndReason

RUNNING, UNSPEC, TOOL, USER, DONE = range(5)
CLASS_NAMES = ("running", "unspecified", "tool_call", "awaiting_user", "done")
REASON_CLASS = {
    TurnEndReason.UNSPECIFIED: UNSPEC,
    TurnEndReason.TOOL_CALL: TOOL,
    TurnEndReason.AWAITING_USER: USER,
    TurnEndReason.DONE: DONE,
}
#: Prior guess of the gap (s) per class, worth one observation each.
PRIOR = (30.0, 30.0, 10.0, 300.0, 3600.0)

_NBINS = 56  # half-octave bins from 0.25 s to ~2^23.5 s
NEVER = 1e12  # expected remaining time of a stream not expected back


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
        for c, g in enumerate(PRIOR):
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
        back before it would be evicted anyway is worth little, however soon its mean).

        Each bin's samples count by their mean. Bins are ordered, so only two bins need
        a look of their own: the age's (some of its samples may not exceed the age) and
        that of age + T (some may come within T, some after); every bin between them is
        back within T, every bin after it beyond T -- constant time, from the suffix sums
        (the ranking computes this for every stream holding blocks, at every request)."""
        return self.per_hit_many([cls], [age], horizon)[0]

    def per_hit_many(self, classes: list[int], ages: list[float],
                     horizon: float) -> list[float]:
        """``per_hit(c, a, horizon)`` for each class and age: one call for all the streams
        a ranking keys (hundreds, at every request), with ``_bin`` inlined."""
        stale = self._stale
        for cls in set(classes):
            if stale[cls]:
                self._refresh(cls)
        cnts, tots, scs, sts = self.cnt, self.tot, self._scnt, self._stot
        log2 = math.log2
        top = _NBINS - 1
        out: list[float] = []
        append = out.append
        for cls, age in zip(classes, ages, strict=True):
            sc = scs[cls]
            if age <= 0.25:  # i = _bin(age)
                i = 0
            else:
                i = int(2.0 * log2(age)) + 4
                if i > top:
                    i = top
            if sc[i] <= 0.0:  # no gap as long as the age seen: no hit below (long idle)
                append(NEVER + age)
                continue
            cnt, tot, st = cnts[cls], tots[cls], sts[cls]
            x = age + horizon  # b = _bin(age + horizon)
            if x <= 0.25:
                b = 0
            else:
                b = int(2.0 * log2(x)) + 4
                if b > top:
                    b = top
            hits = occ = 0.0
            c = cnt[i]
            if c > 0:
                m = tot[i] / c - age
                if m > 0:
                    if m <= horizon:
                        hits += c
                        occ += c * m
                    else:
                        occ += c * horizon
            if b > i:
                c = sc[i + 1] - sc[b]  # back within T, all of them
                if c > 0:
                    hits += c
                    occ += (st[i + 1] - st[b]) - age * c
                c = cnt[b]
                if c > 0:
                    m = tot[b] / c - age
                    if m <= horizon:
                        hits += c
                        occ += c * m
                    else:
                        occ += c * horizon
            occ += horizon * sc[b + 1]  # beyond T
            append(NEVER + age if hits <= 0 else occ / hits)
        return out

    def remaining(self, cls: int, age: float) -> float:
        """Time still to wait for a stream of this class that waited ``age``: the
        conditional mean E[G - a | G > a] (the ranking key with ``horizon`` 0)."""
        if self._stale[cls]:
            self._refresh(cls)
        i = _bin(age)
        # samples in the age's own bin count only if some of them exceed the age
        n, s = self._scnt[cls][i], self._stot[cls][i]
        if n > 0 and s / n <= age:
            n, s = self._scnt[cls][i + 1], self._stot[cls][i + 1]
        if n <= 0:
            return NEVER + age
        return max(s / n - age, 1e-3)
