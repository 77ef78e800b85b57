"""Single-tier trace simulator driving the same Policy objects as the TieredStore.

Per request, in the order a client of the live server sends it (``bench/replay/live.py``
replays exactly this): ``Lookup(keys, session)`` -> ``policy.on_request(blocks, now,
stream)``; the blocks resident at that moment are the hits, read in order by one
``Get`` -> ``policy.on_hits`` (= ``on_hit`` per block); then every missing block, in order,
is ``Put``: while the tier is full ``victim`` -> remove -> ``on_remove``, then insert ->
``on_insert``. A block that appears twice in a missing request is inserted once and
counted as a miss twice. Session hints go to ``on_session_event``. Capacity is in blocks
(all blocks of a trace have the same size).

``belady`` is the offline bound (MIN: evict the block whose next use is furthest; the
incoming block competes too, i.e. bypass allowed) on the same reference string.

Speed: payloads are lists of interned ints (see ``workloads``), so a run allocates
nothing per reference; the hit phase of a request is one ``on_hits`` call and the Put
phase one ``fill`` call (``Policy.fill`` is exactly the per-block sequence above;
``kvstore.policy.fast`` inlines it for some policies, with the same decisions).

Per-group attribution: when ``w.groups`` maps a stream to a label (e.g. the tuning /
held-out half a session belongs to), refs and hits are also counted per label
(``Result.extra``: ``refs:<label>``, ``hits:<label>``).
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import filterfalse

from bench.replay.workloads import REQ, Workload
from kvstore.policy.base import Policy
from kvstore.policy.fast import fill_for
from kvstore.types import TierName

L1 = TierName.L1

#: TTFT model: misses are recomputed by prefill, hits are loaded from the store.
PREFILL_TOKENS_PER_S = 10_000.0
LOAD_TOKENS_PER_S = 100_000.0


@dataclass
class Result:
    policy: str
    capacity: int
    refs: int = 0
    hits: int = 0
    inserts: int = 0
    unique: int = 0
    requests: int = 0
    ttft_mean_s: float = 0.0
    ttft_p90_s: float = 0.0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def misses(self) -> int:
        return self.refs - self.hits

    def as_dict(self, tokens_per_block: int) -> dict[str, object]:
        d = asdict(self)
        d["hit_rate"] = self.hits / self.refs if self.refs else 0.0
        d["misses"] = self.misses
        # misses a big enough cache would have served (all but first references)
        d["capacity_misses"] = self.misses - self.unique
        d["prefill_tokens_saved"] = self.hits * tokens_per_block
        d["inserts_per_hit"] = self.inserts / self.hits if self.hits else float("inf")
        d["refs_per_s"] = self.refs / self.seconds if self.seconds else 0.0
        return d


def _summarise(r: Result, ttfts: list[float]) -> None:
    if ttfts:
        ttfts.sort()
        r.ttft_mean_s = sum(ttfts) / len(ttfts)
        r.ttft_p90_s = ttfts[int(0.9 * (len(ttfts) - 1))]


class _Groups:
    """refs / hits per label of ``w.groups`` (stream -> label)."""

    def __init__(self, w: Workload) -> None:
        self.of = w.groups
        self.refs: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    def add(self, stream: str | None, n: int, h: int) -> None:
        g = self.of.get(stream) if stream is not None else None
        if g is not None:
            self.refs[g] = self.refs.get(g, 0) + n
            self.hits[g] = self.hits.get(g, 0) + h

    def into(self, r: Result) -> None:
        for g, n in self.refs.items():
            r.extra[f"refs:{g}"] = n
            r.extra[f"hits:{g}"] = self.hits[g]


def _payload(p: object) -> Sequence[int]:
    return p if type(p) is list else list(p)  # type: ignore[arg-type, return-value]


def simulate(w: Workload, policy: Policy, capacity: int) -> Result:
    res: set[object] = set()
    on_hits, fill = policy.on_hits, fill_for(policy)
    on_request, on_event = policy.on_request, policy.on_session_event
    tpb = w.tokens_per_block
    miss_s, hit_s = tpb / PREFILL_TOKENS_PER_S, tpb / LOAD_TOKENS_PER_S
    groups = _Groups(w) if w.groups else None
    hits = inserts = refs = 0
    ttfts: list[float] = []
    append = ttfts.append
    t0 = time.perf_counter()
    for now, kind, stream, payload in w.events:
        if kind != REQ:
            on_event(payload, now)  # type: ignore[arg-type]
            continue
        blocks = _payload(payload)
        n = len(blocks)
        on_request(blocks, now, stream)
        if res.issuperset(blocks):  # all hits (the common case for an agent's context)
            on_hits(L1, blocks, now, stream)
            h = n
        else:
            # ``on_hits`` does not change ``res``: split the request before it
            found = list(filter(res.__contains__, blocks))
            h = len(found)
            if h:
                missing = list(filterfalse(res.__contains__, blocks))
                on_hits(L1, found, now, stream)
            else:
                missing = blocks
            # the Puts: the blocks the Lookup did not find, in order, each once (a found
            # block that this request's own inserts evict is not Put again: the server
            # has already served it); ``fill`` = victim -> remove -> on_remove while
            # full, then insert -> on_insert, per block
            inserts += fill(L1, missing, tpb, now, stream, res, capacity)
        refs += n
        hits += h
        append((n - h) * miss_s + h * hit_s)
        if groups is not None:
            groups.add(stream, n, h)
    r = Result(policy.name, capacity, refs, hits, inserts, w.n_unique, len(ttfts))
    r.seconds = time.perf_counter() - t0
    _summarise(r, ttfts)
    if groups is not None:
        groups.into(r)
    return r


def next_uses(w: Workload) -> array:
    """For each reference (in replay order), the index of the next reference to the same
    block (a large sentinel if none)."""
    flat = array("q")
    for blocks in w.refs():
        flat.extend(blocks)
    n = len(flat)
    nxt = array("q", bytes(8 * n))
    last: dict[int, int] = {}
    big = 1 << 62
    for i in range(n - 1, -1, -1):
        b = flat[i]
        nxt[i] = last.get(b, big)
        last[b] = i
    return nxt


def belady(w: Workload, capacity: int, nxt: Sequence[int] | None = None) -> Result:
    if nxt is None:
        nxt = next_uses(w)
    tpb = w.tokens_per_block
    miss_s, hit_s = tpb / PREFILL_TOKENS_PER_S, tpb / LOAD_TOKENS_PER_S
    cache: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block)
    push, pop = heapq.heappush, heapq.heappop
    groups = _Groups(w) if w.groups else None
    hits = inserts = 0
    i = 0
    ttfts: list[float] = []
    t0 = time.perf_counter()
    for _, kind, stream, payload in w.events:
        if kind != REQ:
            continue
        blocks = _payload(payload)
        h = 0
        for b in blocks:
            nu = nxt[i]
            i += 1
            if b in cache:
                h += 1
            else:
                inserts += 1
            cache[b] = nu
            push(heap, (-nu, b))
            while len(cache) > capacity:
                negnu, v = pop(heap)
                if cache.get(v) == -negnu:
                    del cache[v]
        n = len(blocks)
        ttfts.append((n - h) * miss_s + h * hit_s)
        hits += h
        if groups is not None:
            groups.add(stream, n, h)
        if len(heap) > 4 * capacity + 4096:
            heap = [(-nu, b) for b, nu in cache.items()]
            heapq.heapify(heap)
    r = Result("belady", capacity, i, hits, inserts, w.n_unique, len(ttfts))
    r.seconds = time.perf_counter() - t0
    _summarise(r, ttfts)
    if groups is not None:
        groups.into(r)
    return r
