"""Three-tier replay: per-tier hits, writes to L2/L3 per hit and a modelled TTFT.

The single-tier simulator (``sim.py``) answers "how many blocks does the first tier
serve"; this one answers what the whole store does with a policy: which tier serves each
hit, how many blocks each tier has to write for it, and what that does to time to first
token. It drives the same Policy objects, through their general per-block calls
(``victim`` / ``on_remove`` / ``on_insert`` / ``on_hit``), and follows the life of a block
in ``kvstore/store/``:

* **Put** (a block no tier holds): into L1, and written behind to L2 (the store queues
  every Put for L2, whatever the acknowledgement level), so L2 holds a superset of L1
  unless L2 itself evicted the copy.
* **L1 eviction**: the policy's action. ``DEMOTE`` keeps the L2 copy (and writes one if
  L2 lost it); ``DROP`` removes the block from every tier (the session policy's
  choice for the blocks of a ``SessionEnd(discard=True)``; dead blocks otherwise leave
  L1 with ``DEMOTE``, as in the server, and L2 with ``DROP``, never uploaded to L3).
* **L2 eviction**: ``DEMOTE`` uploads the block to L3 (if it is not there yet) when L3 is
  configured; otherwise, or on ``DROP``, the L2 copy goes (an L1 copy stays).
* **L3 eviction** (only with an L3 capacity): the copy goes.
* **Hits**: a block read from L2 or L3 is promoted into L1 when ``policy.admit`` says so.
  A block read from L3 is not written back to L2 (the store does not either); it is
  written to L2 again only if L1 later demotes it.

Capacities are in blocks (all blocks of a trace have the same size). Metrics per run:
hits per tier, misses (recomputed blocks), blocks written to L2 and to L3 (and per hit of
any tier), promotions, and a modelled TTFT: per request, recomputed tokens at the prefill
rate plus tokens loaded from each tier at that tier's rate (``--rates``; defaults below,
stated with every figure).

    .venv/bin/python -m bench.replay.tiered --runs a:16 --l1 1 --l2 10 --l3 0 \\
        --policies lru,s3fifo,sieve,gdsf,session,session+end --out /tmp/tiered

``--l3 0`` means an L3 without a capacity limit (an object store), ``--l3 -1`` no L3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.replay.workloads import REQ, Workload
from kvstore.policy.base import Action, Policy
from kvstore.types import TierName

L1, L2, L3 = TierName.L1, TierName.L2, TierName.L3
KEY = {t: t.name.lower() for t in TierName}  # result keys: "l1", "l2", "l3"

#: TTFT model, tokens per second: recompute by prefill, or load from each tier.
RATES = {"prefill": 10_000.0, "l1": 100_000.0, "l2": 50_000.0, "l3": 20_000.0}


@dataclass
class TieredResult:
    policy: str
    caps: dict[str, int]
    refs: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"l1": 0, "l2": 0, "l3": 0})
    writes: dict[str, int] = field(default_factory=lambda: {"l1": 0, "l2": 0, "l3": 0})
    promotions: int = 0
    drops: int = 0  # blocks an eviction removed from the whole store (policy: DROP)
    requests: int = 0
    ttft_mean_s: float = 0.0
    ttft_p90_s: float = 0.0
    seconds: float = 0.0

    @property
    def all_hits(self) -> int:
        return sum(self.hits.values())

    def as_dict(self, tokens_per_block: int) -> dict[str, Any]:
        d = asdict(self)
        h = self.all_hits
        d["misses"] = self.refs - h
        d["hit_rate"] = h / self.refs if self.refs else 0.0
        for t in ("l1", "l2", "l3"):
            d[f"hit_rate_{t}"] = self.hits[t] / self.refs if self.refs else 0.0
        d["l2_writes_per_hit"] = self.writes["l2"] / h if h else 0.0
        d["l3_writes_per_hit"] = self.writes["l3"] / h if h else 0.0
        d["prefill_tokens_saved"] = h * tokens_per_block
        d["refs_per_s"] = self.refs / self.seconds if self.seconds else 0.0
        return d


class _Tiers:
    """Which blocks each tier holds, and the moves between them (the store's rules)."""

    def __init__(self, policy: Policy, caps: dict[TierName, int], r: TieredResult,
                 size: int) -> None:
        self.p = policy
        self.caps = caps
        self.held: dict[TierName, set[Any]] = {t: set() for t in caps}
        self.r = r
        self.size = size
        self.has_l3 = L3 in caps

    def _remove(self, tier: TierName, b: Any) -> None:
        self.held[tier].discard(b)
        self.p.on_remove(tier, b)

    def _make_room(self, tier: TierName, now: float) -> bool:
        cap = self.caps[tier]
        held = self.held[tier]
        while cap and len(held) >= cap:
            v = self.p.victim(tier, now, held.__contains__)
            if v is None:
                return False
            b, action = v
            if b not in held:  # a stale entry: evicting it only cleans up
                self.p.on_remove(tier, b)
                continue
            self._evict(tier, b, action, now)
        return True

    def _evict(self, tier: TierName, b: Any, action: Action, now: float) -> None:
        if tier is L1:
            self._remove(L1, b)
            if action is Action.DROP:
                self.r.drops += 1
                for t in (L2, L3):
                    if t in self.held and b in self.held[t]:
                        self._remove(t, b)
            elif L2 in self.held and b not in self.held[L2]:
                self.insert(L2, b, now, None)
        elif tier is L2:
            self._remove(L2, b)
            if action is Action.DEMOTE and self.has_l3 and b not in self.held[L3]:
                self.insert(L3, b, now, None)
            elif b not in self.held[L1] and not (self.has_l3 and b in self.held[L3]):
                self.r.drops += 1
        else:
            self._remove(tier, b)
            if not any(b in h for h in self.held.values()):
                self.r.drops += 1

    def insert(self, tier: TierName, b: Any, now: float, session: str | None) -> bool:
        if not self._make_room(tier, now):
            return False
        self.held[tier].add(b)
        self.r.writes[KEY[tier]] += 1
        self.p.on_insert(tier, b, self.size, now, session)
        return True


def simulate_tiers(w: Workload, policy: Policy, caps: dict[TierName, int],
                   rates: dict[str, float] | None = None) -> TieredResult:
    """Replay ``w`` through L1/L2(/L3) of ``caps`` blocks (0: no limit) under ``policy``.
    ``policy`` must have been built for exactly the tiers in ``caps``."""
    if tuple(caps) != policy.tiers:
        raise ValueError(f"policy tiers {policy.tiers} != simulated tiers {tuple(caps)}")
    rate = {**RATES, **(rates or {})}
    r = TieredResult(policy.name, {KEY[t]: c for t, c in caps.items()})
    tiers = _Tiers(policy, caps, r, w.tokens_per_block)
    held = tiers.held
    in1, in2 = held[L1], held[L2]
    in3 = held.get(L3, set())
    tpb = w.tokens_per_block
    cost = {k: tpb / v for k, v in rate.items()}
    ttfts: list[float] = []
    t0 = time.perf_counter()
    for now, kind, stream, payload in w.events:
        if kind != REQ:
            policy.on_session_event(payload, now)  # type: ignore[arg-type]
            continue
        blocks: Sequence[Any] = payload  # type: ignore[assignment]
        policy.on_request(blocks, now, stream)
        # What the Lookup finds, tier by tier, before anything moves
        where = [L1 if b in in1 else L2 if b in in2 else L3 if b in in3 else None
                 for b in blocks]
        found1 = [b for b, t in zip(blocks, where, strict=True) if t is L1]
        if found1:
            policy.on_hits(L1, found1, now, stream)
        n1 = len(found1)
        n2 = n3 = 0
        seen: set[Any] = set()
        for b, t in zip(blocks, where, strict=True):
            if t is L1 or b in seen:  # (a repeated missing block: a miss again, Put once)
                continue
            seen.add(b)
            if t is None:
                tiers.insert(L1, b, now, stream)  # the Put; L2 gets it written behind
                if b in in1 and b not in in2:
                    tiers.insert(L2, b, now, stream)
                continue
            if t is L2:
                n2 += 1
            else:
                n3 += 1
            policy.on_hit(t, b, now, stream)
            if b not in in1 and policy.admit(L1, b, tpb, now):
                r.promotions += 1
                tiers.insert(L1, b, now, stream)
        n = len(blocks)
        misses = n - n1 - n2 - n3
        r.refs += n
        r.requests += 1
        r.hits["l1"] += n1
        r.hits["l2"] += n2
        r.hits["l3"] += n3
        ttfts.append(misses * cost["prefill"] + n1 * cost["l1"] + n2 * cost["l2"]
                     + n3 * cost["l3"])
    r.seconds = time.perf_counter() - t0
    if ttfts:
        ttfts.sort()
        r.ttft_mean_s = sum(ttfts) / len(ttfts)
        r.ttft_p90_s = ttfts[int(0.9 * (len(ttfts) - 1))]
    return r


def _pct_caps(w: Workload, l1: float, l2: float, l3: float) -> dict[TierName, int]:
    def blocks(pct: float) -> int:
        return 0 if pct == 0 else max(1, int(w.n_unique * pct / 100))
    caps = {L1: blocks(l1), L2: blocks(l2)}
    if caps[L1] == 0 or caps[L2] == 0:
        raise ValueError("L1 and L2 need a capacity (> 0 %)")
    if l3 >= 0:
        caps[L3] = blocks(l3)
    return caps


#: label -> (policy, hint mode of the workload)
VARIANTS = {"lru": ("lru", "engine"), "s3fifo": ("s3fifo", "engine"),
            "sieve": ("sieve", "engine"), "gdsf": ("gdsf", "engine"),
            "session": ("session", "engine"), "session+end": ("session", "session_end")}


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| workload | policy | hit % (L1 / L2 / L3) | L2 writes / hit | L3 writes / hit "
            "| drops | TTFT mean / p90 (s) |\n| --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for d in rows:
        lines.append(
            f"| {d['workload']} | {d['label']} | {d['hit_rate'] * 100:.1f} "
            f"({d['hit_rate_l1'] * 100:.1f} / {d['hit_rate_l2'] * 100:.1f} / "
            f"{d['hit_rate_l3'] * 100:.1f}) | {d['l2_writes_per_hit']:.3f} | "
            f"{d['l3_writes_per_hit']:.3f} | {d['drops']} | "
            f"{d['ttft_mean_s']:.2f} / {d['ttft_p90_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.replay.workloads import agent_files, agent_workload, load_sessions, split_half
    from kvstore.policy import POLICIES

    ap = argparse.ArgumentParser(prog="python -m bench.replay.tiered", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="a:16", help="agent layouts half:K, comma-separated")
    ap.add_argument("--l1", type=float, default=1.0, help="L1 capacity, %% of unique blocks")
    ap.add_argument("--l2", type=float, default=10.0, help="L2 capacity, %% of unique blocks")
    ap.add_argument("--l3", type=float, default=0.0,
                    help="L3 capacity, %% of unique blocks (0: no limit, -1: no L3)")
    ap.add_argument("--policies", default=",".join(VARIANTS))
    ap.add_argument("--max-sessions", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rates", default="",
                    help="JSON tokens/s overriding " + json.dumps(RATES))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rates = {**RATES, **(json.loads(args.rates) if args.rates else {})}
    if args.l1 <= 0 or args.l2 <= 0:
        ap.error("--l1 and --l2 must be > 0 (percent of the unique blocks)")
    labels = args.policies.split(",")
    bad = [lb for lb in labels if lb not in VARIANTS]
    if bad:
        ap.error(f"unknown policies {bad}; choose from {sorted(VARIANTS)}")
    rows = []
    for run in args.runs.split(","):
        half, k_s = run.split(":")
        files = split_half(agent_files(), half)[:args.max_sessions]
        if not files:
            ap.error(f"no agent traces for half {half!r} (are ../shared/traces there?)")
        sessions = load_sessions(files)
        loaded: dict[str, Workload] = {}
        for label in labels:
            pol, hints = VARIANTS[label]
            w = loaded.get(hints)
            if w is None:
                w = loaded[hints] = agent_workload(sessions, float(k_s), args.seed, hints,
                                                   name=f"agent-{half}")
            caps = _pct_caps(w, args.l1, args.l2, args.l3)
            policy = POLICIES[pol](list(caps))
            res = simulate_tiers(w, policy, caps, rates)
            d = res.as_dict(w.tokens_per_block)
            d.update(label=label, workload=f"agent-{half} K={k_s}", rates=rates,
                     pct={"l1": args.l1, "l2": args.l2, "l3": args.l3})
            rows.append(d)
            print(f"{d['workload']} {label:>12} hit {d['hit_rate'] * 100:.2f}% "
                  f"(L1 {d['hit_rate_l1'] * 100:.2f} L2 {d['hit_rate_l2'] * 100:.2f} "
                  f"L3 {d['hit_rate_l3'] * 100:.2f}) L2 w/hit {d['l2_writes_per_hit']:.3f} "
                  f"L3 w/hit {d['l3_writes_per_hit']:.3f} TTFT {d['ttft_mean_s']:.2f}s "
                  f"({d['refs_per_s'] / 1e6:.2f}M refs/s)", flush=True)
    print(markdown(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tiered.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
