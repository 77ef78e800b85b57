"""Single-tier trace simulator driving the same Policy objects as the TieredStore.

Per request: ``policy.on_request(blocks, now, stream)`` once, then for every block in
order a hit (``on_hit``) or a miss: while the tier is full ``victim`` -> remove ->
``on_remove``, then insert -> ``on_insert``. Session hints go to ``on_session_event``.
Capacity is in blocks (all blocks of a trace have the same size).

``belady`` is the offline bound (MIN: evict the block whose next use is furthest; the
incoming block competes too, i.e. bypass allowed) on the same reference string.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import asdict, dataclass, field

from bench.replay.workloads import REQ, Workload
from kvstore.policy.base import Policy
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


def _ttft(miss_blocks: int, hit_blocks: int, tpb: int) -> float:
    return tpb * (miss_blocks / PREFILL_TOKENS_PER_S + hit_blocks / LOAD_TOKENS_PER_S)


def _summarise(r: Result, ttfts: list[float]) -> None:
    if ttfts:
        ttfts.sort()
        r.ttft_mean_s = sum(ttfts) / len(ttfts)
        r.ttft_p90_s = ttfts[int(0.9 * (len(ttfts) - 1))]


def simulate(w: Workload, policy: Policy, capacity: int) -> Result:
    res: set[object] = set()
    add, discard = res.add, res.discard
    on_hit, on_insert = policy.on_hit, policy.on_insert
    on_remove, victim = policy.on_remove, policy.victim
    on_request, on_event = policy.on_request, policy.on_session_event
    tpb = w.tokens_per_block
    hits = inserts = refs = 0
    ttfts: list[float] = []
    t0 = time.perf_counter()
    for now, kind, stream, payload in w.events:
        if kind != REQ:
            on_event(payload, now)  # type: ignore[arg-type]
            continue
        blocks = payload.tolist()  # type: ignore[attr-defined]
        on_request(blocks, now, stream)
        h = 0
        for b in blocks:
            if b in res:
                h += 1
                on_hit(L1, b, now, stream)
                continue
            while len(res) >= capacity:
                v = victim(L1, now, None)
                if v is None:
                    break
                discard(v[0])
                on_remove(L1, v[0])
            if len(res) < capacity:
                add(b)
                inserts += 1
                on_insert(L1, b, tpb, now, stream)
        n = len(blocks)
        refs += n
        hits += h
        ttfts.append(_ttft(n - h, h, tpb))
    r = Result(policy.name, capacity, refs, hits, inserts, w.n_unique, len(ttfts))
    r.seconds = time.perf_counter() - t0
    _summarise(r, ttfts)
    return r


def next_uses(w: Workload) -> list[int]:
    """For each reference (in replay order), the index of the next reference to the same
    block (a large sentinel if none)."""
    flat: list[int] = []
    for blocks in w.refs():
        flat.extend(blocks)
    n = len(flat)
    nxt = [0] * n
    last: dict[int, int] = {}
    big = 1 << 62
    for i in range(n - 1, -1, -1):
        b = flat[i]
        nxt[i] = last.get(b, big)
        last[b] = i
    return nxt


def belady(w: Workload, capacity: int, nxt: list[int] | None = None) -> Result:
    if nxt is None:
        nxt = next_uses(w)
    tpb = w.tokens_per_block
    cache: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block)
    push, pop = heapq.heappush, heapq.heappop
    hits = inserts = 0
    i = 0
    ttfts: list[float] = []
    t0 = time.perf_counter()
    for blocks in w.refs():
        h = 0
        for b in blocks.tolist():
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
        ttfts.append(_ttft(len(blocks) - h, h, tpb))
        hits += h
        if len(heap) > 4 * capacity + 4096:
            heap = [(-nu, b) for b, nu in cache.items()]
            heapq.heapify(heap)
    r = Result("belady", capacity, i, hits, inserts, w.n_unique, len(ttfts))
    r.seconds = time.perf_counter() - t0
    _summarise(r, ttfts)
    return r
