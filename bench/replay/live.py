"""Live replay: a small slice of the agent traces through a running kvstore server, and the
simulator on the same slice, same policy, same L1 capacity in blocks.

    .venv/bin/python -m bench.replay live --sessions 8 --refs 5000 --pct 5,10,25 \
        --policy session,lru

The server is started as a subprocess (``kvstore serve``) with L2 disabled, so it has one
tier like the simulator, the policy under test and ``--policy-clock client``: every call
carries gRPC metadata ``kvstore-clock`` = the trace time (s), so the server's policy sees
the same ``now`` as the simulator's. Blocks are 4096 bytes (one arena page), so an L1 of
``capacity * 4096`` bytes holds exactly ``capacity`` blocks.

Per request the replay sends what ``sim.simulate`` models (docs/replay-results.md):
``Lookup(keys, session)`` (the server calls ``policy.on_request``), ``Get(found keys,
session)`` (``on_hit`` each; the blocks served are the hits), then one ``Put`` stream of
the keys the Lookup did not find, each once, with the session id. Hints (TurnEnd /
SessionEnd) are SessionEvent calls at their trace time. The live hit rate is counted on
the client (blocks the Get served) and cross-checked with the server's Stats.

The SDK's ``kvstore.Client`` sends the calls; its ``metadata=`` function gives each call
the current trace time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench.replay import sim
from bench.replay.workloads import (
    REQ,
    Workload,
    _count,
    agent_files,
    agent_workload,
    load_sessions,
    split_half,
)
from kvstore.client import Client
from kvstore.policy import POLICIES
from kvstore.types import SessionEnd, SessionEvent, TierName, TurnEnd

BLOCK_BYTES = 4096
NAMESPACE = "replay"
ROOT = Path(__file__).resolve().parents[2]


def server_has_client_clock() -> bool:
    """Whether this checkout's ``kvstore serve`` supports ``--policy-clock``."""
    out = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    return "--policy-clock" in out.stdout


def coarsen(blocks: list[int], group: int) -> list[int]:
    """Blocks of ``group`` x 64 tokens: position j // group, named by the id of the last
    64-token block in it (a chained prefix hash names its whole prefix; a partial last
    group gets its own id, as an engine's partial block would)."""
    if group <= 1:
        return blocks
    n = len(blocks)
    return [blocks[min(i + group, n) - 1] for i in range(0, n, group)]


def slice_workload(sessions: int = 8, refs: int = 5000, half: str = "b",
                   hints: str = "engine", seed: int = 1, max_requests: int = 60,
                   group: int = 16) -> Workload:
    """The first ``refs`` block references (whole requests) of ``sessions`` sessions of a
    half (those with the smallest contexts, for many requests per reference), laid out as a
    Poisson process averaging K=1 session in progress, with blocks of
    ``group`` x 64 tokens (so a few thousand references span a few hundred requests)."""
    loaded = load_sessions(split_half(agent_files(), half), max_requests=max_requests)
    # the sessions with the smallest contexts (mean request length), at least 10 requests
    loaded = [s for s in loaded if len(s.reqs) >= 10]
    loaded.sort(key=lambda s: (sum(len(q.blocks) for q in s.reqs) / len(s.reqs), s.file))
    w = agent_workload(loaded[:sessions], 1.0, seed, hints, name=f"live-{half}")
    events = []
    n = 0
    for e in w.events:
        if e[1] == REQ:
            if n >= refs:
                break
            e = (e[0], e[1], e[2], coarsen(e[3], group))  # type: ignore[arg-type]
            n += len(e[3])  # type: ignore[arg-type]
        events.append(e)
    out = _count(Workload(w.name, w.tokens_per_block, events, meta=dict(w.meta),
                          groups=w.groups))
    return out


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    target: str
    workdir: tempfile.TemporaryDirectory[str]
    log: IO[bytes]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.workdir.cleanup()


def start_server(policy: str, capacity_blocks: int, timeout: float = 30.0) -> Server:
    wd = tempfile.TemporaryDirectory(prefix="kvstore-live-")
    ready = Path(wd.name) / "ready.json"
    log = open(Path(wd.name) / "server.log", "wb")  # noqa: SIM115 (lives with the server)
    cmd = [sys.executable, "-m", "kvstore", "serve", "--server-listen", "127.0.0.1:0",
           "--ready-file", str(ready), "--data-dir", str(Path(wd.name) / "data"),
           "--l1-capacity", str(capacity_blocks * BLOCK_BYTES), "--l2-enabled", "false",
           "--policy-name", policy, "--policy-clock", "client", "--l1-prefault", "false"]
    # The simulator it is compared with runs the policy's defaults: a
    # KVSTORE_* setting in this shell (a config file, a policy knob) would
    # reach the server only, and show as a difference of its own making.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KVSTORE_") or k == "KVSTORE_PURE"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            text = (Path(wd.name) / "server.log").read_text(errors="replace")
            wd.cleanup()
            raise RuntimeError(f"kvstore serve did not start:\n{text[-3000:]}")
        time.sleep(0.05)
    target = json.loads(ready.read_text())["tcp"]
    return Server(proc, target, wd, log)


def _key(block: Any) -> bytes:
    return int(block).to_bytes(8, "big")


def replay_live(w: Workload, target: str) -> dict[str, Any]:
    """Send ``w`` to the server at ``target``; returns refs, hits and the server's Stats."""
    payload = bytes(BLOCK_BYTES)
    refs = hits = puts = 0
    t0 = time.perf_counter()
    clock = [("kvstore-clock", "0.0")]  # the trace time of the call being sent
    with Client(target, namespace=NAMESPACE, metadata=lambda: clock) as kv:
        for now, kind, stream, ev in w.events:
            clock[0] = ("kvstore-clock", repr(float(now)))
            if kind != REQ:
                assert isinstance(ev, SessionEvent)
                e = ev.event
                if isinstance(e, TurnEnd):
                    # as before the SDK: reason and gap, no tool name
                    kv.session_event(ev.session_id, TurnEnd(e.reason, e.expected_gap_ms))
                elif isinstance(e, SessionEnd):
                    kv.session_end(ev.session_id)
                continue
            blocks = list(ev)  # type: ignore[call-overload]
            keys = [_key(b) for b in blocks]
            sid = stream or ""
            lk = kv.lookup(keys, session_id=sid)
            found = [k for k, t in zip(keys, lk.tiers, strict=True) if t is not None]
            if found:
                hits += sum(b is not None for b in kv.get(found, session_id=sid))
            fset = set(found)
            missing: list[bytes] = []
            seen: set[bytes] = set()
            for k in keys:
                if k not in fset and k not in seen:
                    seen.add(k)
                    missing.append(k)
            if missing:
                kv.put([(k, payload) for k in missing], session_id=sid, ack="memory")
                puts += len(missing)
            refs += len(blocks)
        stats = kv.stats()
    l1 = next((t for t in stats.tiers if t.tier == TierName.L1), None)
    return {"refs": refs, "hits": hits, "puts": puts, "seconds": time.perf_counter() - t0,
            "server_l1_hits": l1.hits if l1 else None,
            "server_l1_blocks": l1.blocks if l1 else None,
            "server_l1_evictions": l1.evictions if l1 else None}


def compare(policy: str, w: Workload, capacity: int) -> dict[str, Any]:
    """Simulated and live hit rate of ``policy`` on ``w`` with ``capacity`` blocks."""
    r = sim.simulate(w, POLICIES[policy]([TierName.L1]), capacity)
    srv = start_server(policy, capacity)
    try:
        live = replay_live(w, srv.target)
    finally:
        srv.close()
    sim_hit = r.hits / r.refs if r.refs else 0.0
    live_hit = live["hits"] / live["refs"] if live["refs"] else 0.0
    return {"policy": policy, "capacity_blocks": capacity, "unique": w.n_unique,
            "refs": r.refs, "requests": r.requests, "sim_hits": r.hits,
            "sim_inserts": r.inserts, "live": live, "sim_hit_rate": sim_hit,
            "live_hit_rate": live_hit, "diff_points": 100 * (live_hit - sim_hit)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay live", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--refs", type=int, default=5000, help="block references to replay")
    ap.add_argument("--max-requests", type=int, default=60, help="per session")
    ap.add_argument("--group", type=int, default=16,
                    help="64-token blocks per replayed block (16: 1024-token blocks)")
    ap.add_argument("--half", default="b", choices=("a", "b", "all"))
    ap.add_argument("--hints", default="engine",
                    choices=("engine", "session_end", "none", "wrong"))
    ap.add_argument("--pct", default="10", help="L1 capacity, %% of the slice's unique "
                                                 "blocks, comma-separated")
    ap.add_argument("--policy", default="session,lru", help="comma-separated")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not server_has_client_clock():
        print("kvstore serve has no --policy-clock: live replay needs the client clock")
        return 2
    w = slice_workload(args.sessions, args.refs, args.half, args.hints,
                       max_requests=args.max_requests, group=args.group)
    print(f"slice: {w.n_refs} refs, {w.n_unique} unique blocks, "
          f"{sum(1 for e in w.events if e[1] == REQ)} requests, hints={args.hints}")
    rows = []
    worst = 0.0
    for pct in (float(p) for p in args.pct.split(",")):
        cap = max(1, int(w.n_unique * pct / 100))
        for pol in args.policy.split(","):
            d = compare(pol, w, cap)
            d["pct"] = pct
            rows.append(d)
            worst = max(worst, abs(d["diff_points"]))
            print(f"{pol:>8} {pct:>4g}% ({cap} blocks): sim {100 * d['sim_hit_rate']:.2f}%  "
                  f"live {100 * d['live_hit_rate']:.2f}%  diff {d['diff_points']:+.2f} pt  "
                  f"(server L1 hits {d['live']['server_l1_hits']}, "
                  f"{d['live']['refs'] / d['live']['seconds']:.0f} refs/s live)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"worst |live - sim| = {worst:.2f} points")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
