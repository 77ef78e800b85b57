"""Sustained Puts past L1: what a writer that never stops sees once L1 is full.

    .venv/bin/python -m bench.sustained_put [--l1 64MiB] [--block 4KiB] [--per-call 1 64]
        [--times 3] [--rounds 3] [--before-tree DIR] [--out FILE]

A kvstore server with its defaults (L1 + LMDB L2, write-back ``l2.write_mode = evict``,
``l2.clean_reserve = 0.25``) takes ``--times`` times its L1 capacity of memory-acknowledged
Puts from one data-plane client, each call ``--per-call`` blocks of ``--block`` bytes,
every key new: once L1 holds 75 % dirty blocks the oldest are written to L2 ahead of
eviction, and once it is full every Put evicts. Reported per cell (median over rounds,
each round a fresh server): GB/s before and after L1 filled, p50/p99/max latency per call
in each phase, failed calls (a Put that finds no room for 30 s raises CapacityExhausted).

The baseline is the same workload on an older checkout, same run: ``--before-tree DIR``
(e.g. ``git archive 0123abc | tar -x -C DIR`` plus the built ``kvstore/_native*.so`` and
``kvstore/v1``) starts its server from DIR, alternating with this tree's round by round.
LMDB's own write speed (the bound once L1 is full) is in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench._server import start_from_tree

KiB, MiB = 1024, 1024 * 1024


def _size(text: str) -> int:
    units = {"KiB": KiB, "MiB": MiB, "GiB": 1024 * MiB}
    for unit, mult in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def one_round(tree: str, l1: str, block: int, per_call: int, times: float) -> dict[str, Any]:
    """One fresh server from ``tree`` ("" = this checkout) and one client."""
    from kvstore import Client

    server = start_from_tree(tree, l1_capacity=l1, l2=True, unix=True)
    try:
        capacity = _size(l1)
        calls = int(times * capacity / block / per_call)
        full_at = int(capacity / block / per_call)
        payload = os.urandom(block)
        lat: list[float] = []
        failed = 0
        with Client(server.unix_target, namespace="default", timeout=120,
                    data_plane="unix") as client:
            marks = [time.perf_counter()]
            for call in range(calls):
                if call == full_at:
                    marks.append(time.perf_counter())
                keys = [b"s%09d" % (call * per_call + j) for j in range(per_call)]
                start = time.perf_counter()
                try:
                    client.put([(k, payload) for k in keys])
                except Exception:  # a refused Put is what this bench counts
                    failed += 1
                lat.append(time.perf_counter() - start)
            marks.append(time.perf_counter())
        phases = {"filling": lat[:full_at], "full": lat[full_at:]}
        out: dict[str, Any] = {"failed_calls": failed, "calls": calls}
        for i, (name, values) in enumerate(phases.items()):
            seconds = marks[i + 1] - marks[i]
            nbytes = len(values) * per_call * block
            values = sorted(values)
            out[name] = {
                "gbps": round(nbytes / seconds / 1e9, 4) if seconds > 0 else None,
                "p50_ms": round(values[len(values) // 2] * 1e3, 3) if values else None,
                "p99_ms": round(values[int(len(values) * 0.99)] * 1e3, 3) if values else None,
                "max_ms": round(values[-1] * 1e3, 1) if values else None,
            }
        return out
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--l1", default="64MiB", help="L1 capacity of the server")
    ap.add_argument("--block", default="4KiB", help="block size")
    ap.add_argument("--per-call", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--times", type=float, default=3.0, help="bytes put, in L1 capacities")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before-tree", default="", help="an older checkout run alternately")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    block = _size(args.block)
    trees = {"this": ""}
    if args.before_tree:
        trees["before"] = args.before_tree
    cells = []
    for per_call in args.per_call:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(one_round(tree, args.l1, block, per_call, args.times))
                full = runs[name][-1]["full"]
                print(f"sustained_put: {per_call}/call round {r + 1} {name}: full "
                      f"{full['gbps']} GB/s p50 {full['p50_ms']} ms max {full['max_ms']} ms, "
                      f"failed {runs[name][-1]['failed_calls']}", file=sys.stderr)
        for name, rs in runs.items():
            cell: dict[str, Any] = {"tree": name, "per_call": per_call, "rounds": rs,
                                    "failed_calls": sum(x["failed_calls"] for x in rs)}
            for phase in ("filling", "full"):
                cell[phase] = {k: statistics.median(x[phase][k] for x in rs
                                                    if x[phase][k] is not None)
                               for k in ("gbps", "p50_ms", "p99_ms", "max_ms")}
            cells.append(cell)
    doc = {"l1": args.l1, "block_bytes": block, "times_l1": args.times, "cells": cells,
           "load": os.getloadavg()}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for c in cells:
        print(f"{c['tree']:>6} {c['per_call']:>3}/call  filling {c['filling']['gbps']:.3f} GB/s "
              f"p50 {c['filling']['p50_ms']:.3f} ms | full {c['full']['gbps']:.3f} GB/s "
              f"p50 {c['full']['p50_ms']:.3f} p99 {c['full']['p99_ms']:.3f} max "
              f"{c['full']['max_ms']:.1f} ms | failed calls {c['failed_calls']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
