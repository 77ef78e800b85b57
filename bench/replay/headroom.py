"""How much of the LRU -> Belady gap better information about return times would close.

A diagnostic for the session policy, not a policy: the same policy, fed hints that an
engine could only have with knowledge it does not have in these traces, on the in-range
cells of the lab (LRU and Belady are run in the same process):

* ``as given``: the workload's hints (``--hints``, default ``session_end``);
* ``long-tool bit``: one bit more per tool call — a tool turn whose stream is not back
  within ``--long`` s (60) is reported as awaiting the user (~11% of tool calls on these
  traces). An engine that knows its tools (``TurnEnd.tool_name``: a file read vs a build
  or a permission prompt) has roughly this bit; the traces carry no tool names;
* ``gap at turn end``: every TurnEnd carries the true time to the stream's next request
  (``expected_gap_ms``);
* ``gap at request``: the true time to the stream's next request is known from the
  moment a request arrives (while the model runs, before the turn ends) and until the
  turn end;
* ``both``: the true gap from the request on and again at the turn end (close to MIN:
  the rest is what ranking whole streams cannot express).

    .venv/bin/python -m bench.replay.headroom                 # 5 cells, ~6 min
    .venv/bin/python -m bench.replay.headroom --cells a:16:2  # one cell
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any

from bench.replay import sim
from bench.replay.workloads import (
    REQ,
    Workload,
    agent_files,
    agent_workload,
    load_sessions,
    split_half,
)
from kvstore.policy import POLICIES
from kvstore.policy.session import SessionPolicy
from kvstore.types import BlockId, SessionEvent, TierName, TurnEnd, TurnEndReason

CELLS = "a:16:1,a:16:2,b:16:1,b:16:2,all:64:2"
L1 = TierName.L1


def _rewrite_turn_ends(w: Workload, fn: Any) -> Workload:
    """A copy of ``w`` whose TurnEnd events are ``fn(event, seconds to the stream's next
    request or None)``."""
    nxt: dict[Any, float] = {}
    out = list(w.events)
    for i in range(len(out) - 1, -1, -1):
        t, kind, stream, p = out[i]
        if kind == REQ:
            nxt[stream] = t
        elif isinstance(getattr(p, "event", None), TurnEnd):
            gap = nxt[stream] - t if stream in nxt else None
            out[i] = (t, kind, stream, fn(p, gap))
    w2 = copy.copy(w)
    w2.events = out
    return w2


def long_tool_bit(w: Workload, long_s: float) -> Workload:
    def fn(ev: SessionEvent, gap: float | None) -> SessionEvent:
        te = ev.event
        assert isinstance(te, TurnEnd)
        if te.reason == TurnEndReason.TOOL_CALL and (gap is None or gap > long_s):
            return SessionEvent(ev.namespace, ev.session_id,
                                TurnEnd(TurnEndReason.AWAITING_USER))
        return ev
    return _rewrite_turn_ends(w, fn)


def gap_at_turn_end(w: Workload) -> Workload:
    def fn(ev: SessionEvent, gap: float | None) -> SessionEvent:
        te = ev.event
        assert isinstance(te, TurnEnd)
        if gap is None:
            return ev
        return SessionEvent(ev.namespace, ev.session_id,
                            TurnEnd(te.reason, expected_gap_ms=int(gap * 1000) + 1))
    return _rewrite_turn_ends(w, fn)


class _GapAtRequest(SessionPolicy):
    """The session policy told, at each request, when the stream's next one comes."""

    def __init__(self, tiers: Sequence[TierName], gaps: dict[tuple[Any, float], float]) -> None:
        super().__init__(tiers)
        self._true_gaps = gaps

    def on_request(self, blocks: Sequence[BlockId], now: float,
                   session: str | None = None) -> None:
        super().on_request(blocks, now, session)
        if session is not None:
            g = self._true_gaps.get((session, now))
            if g is not None:
                self._streams[session].expected = g


def _request_gaps(w: Workload) -> dict[tuple[Any, float], float]:
    gaps: dict[tuple[Any, float], float] = {}
    nxt: dict[Any, float] = {}
    for t, kind, stream, _ in reversed(w.events):
        if kind == REQ:
            if stream in nxt:
                gaps[(stream, t)] = max(nxt[stream] - t, 1e-3)
            nxt[stream] = t
    return gaps


def run_cell(w: Workload, pct: float, long_s: float) -> dict[str, float]:
    cap = max(1, int(w.n_unique * pct / 100))
    out: dict[str, float] = {"lru": sim.simulate(w, POLICIES["lru"]([L1]), cap).hits,
           "belady": sim.belady(w, cap).hits}
    out["as given"] = sim.simulate(w, SessionPolicy([L1]), cap).hits
    out["long-tool bit"] = sim.simulate(long_tool_bit(w, long_s), SessionPolicy([L1]), cap).hits
    out["gap at turn end"] = sim.simulate(gap_at_turn_end(w), SessionPolicy([L1]), cap).hits
    gaps = _request_gaps(w)
    out["gap at request"] = sim.simulate(w, _GapAtRequest([L1], gaps), cap).hits
    out["both"] = sim.simulate(gap_at_turn_end(w), _GapAtRequest([L1], gaps), cap).hits
    out["refs"] = w.n_refs
    return out


VARIANTS = ("as given", "long-tool bit", "gap at turn end", "gap at request", "both")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay.headroom", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=CELLS, help="half:K:pct, comma-separated")
    ap.add_argument("--hints", default="session_end", choices=("engine", "session_end"))
    ap.add_argument("--long", type=float, default=60.0, dest="long_s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-sessions", type=int, default=None)
    args = ap.parse_args(argv)
    rows = []
    for cell in args.cells.split(","):
        half, k, pct = cell.split(":")
        files = split_half(agent_files(), half)[:args.max_sessions]
        if not files:
            ap.error("no agent traces (are ../shared/traces there?)")
        w = agent_workload(load_sessions(files), float(k), args.seed, args.hints,
                           name=f"agent-{half}")
        r = run_cell(w, float(pct), args.long_s)
        gap = r["belady"] - r["lru"]  # = LRU's misses - Belady's
        closed = {v: (r[v] - r["lru"]) / gap if gap else 0.0 for v in VARIANTS}
        rows.append((cell, r, closed))
        print(f"{cell}: LRU {r['lru'] / r['refs'] * 100:.2f}%, Belady "
              f"{r['belady'] / r['refs'] * 100:.2f}%; gap closed "
              + ", ".join(f"{v} {closed[v] * 100:.1f}%" for v in VARIANTS), flush=True)
    print("\n| cell (LRU hit) | " + " | ".join(VARIANTS) + " |")
    print("| --- |" + " --- |" * len(VARIANTS))
    for cell, r, closed in rows:
        print(f"| {cell} ({r['lru'] / r['refs'] * 100:.1f}) | "
              + " | ".join(f"{closed[v] * 100:.0f}%" for v in VARIANTS) + " |")
    means = {v: sum(c[v] for _, _, c in rows) / len(rows) for v in VARIANTS}
    print("| mean | " + " | ".join(f"**{means[v] * 100:.0f}%**" for v in VARIANTS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
