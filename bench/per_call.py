"""One chunk per call, as an engine stores and loads: latency by block size.

    .venv/bin/python -m bench.per_call [--sizes 256KiB 1MiB 1028KiB 2MiB 4MiB 8MiB 32MiB]
        [--paths shm tcp] [--rounds 5] [--before-tree DIR] [--pin none|apart] [--out FILE]

One server with a shared-memory arena (as a same-host deployment runs it: L1 bytes checked
on their way out) and L2 on; this tree's SDK as the client: ``ShmClient`` (``shm``) and a
TCP data-plane ``Client`` (``tcp``). Per size and path, each round Puts a set of keys one
block per call (64 distinct sources, every round the same keys: overwrites after the
first), then Gets them one per call into one buffer. Reported: the median over rounds of
each round's p50 per call, and GB/s.

``--before-tree DIR`` (an older checkout: ``git archive REV | tar -x -C DIR`` plus the
built ``kvstore/_native*.so`` and ``kvstore/v1``) starts a second server from DIR beside
this tree's, the same client talking to both, rounds alternated: a same-run A/B of the
server's side (a flag the older server does not know is ignored by it). ``--pin apart``
puts the servers on one CPU and the client on another (``bench.peers.placement``; every
thread of each process). After each Get round, outside its timing, the buffer is compared
with the block Put under the round's last key.
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

from bench._server import BenchServer, start_from_tree
from bench.peers import pin_process, placement, positive_int, positive_size

KiB, MiB = 1024, 1024 * 1024
DEFAULT_SIZES = ["256KiB", "1MiB", "1028KiB", "2MiB", "4MiB", "8MiB", "32MiB"]


def _keys_for(size: int) -> int:
    """Keys per round: about 256 MiB of blocks, 4 to 64 of them."""
    return max(4, min(64, (256 * MiB) // size))


def _round(client: Any, path: str, size: int, sources: list[memoryview],
           dest: list[memoryview]) -> dict[str, float]:
    keys = [b"%s/%d/%d" % (path.encode(), size, i) for i in range(_keys_for(size))]
    out: dict[str, float] = {}
    for op in ("put", "get"):
        lat = []
        if op == "get":
            # Before the timing: the last round's bytes (the same key's) left in
            # the reused buffer would pass _check_get for a Get that writes nothing.
            dest[0][:] = bytes(size)
        start = time.perf_counter()
        for i, key in enumerate(keys):
            t = time.perf_counter()
            if op == "put":
                client.put([(key, sources[i % len(sources)])])
            else:
                if client.get_into([key], dest) != [size]:
                    raise RuntimeError(f"{path}: a Get of {size} bytes missed")
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        if op == "get":
            _check_get(path, keys[-1], dest[0], sources[(len(keys) - 1) % len(sources)])
        out[f"{op}_p50_us"] = statistics.median(lat) * 1e6
        out[f"{op}_gbps"] = len(keys) * size / elapsed / 1e9
    return out


def _check_get(path: str, key: bytes, got: memoryview, want: memoryview) -> None:
    """After the timing: the buffer holds the last key's bytes as Put (its
    size alone lets a Get that writes nothing pass as a fast one)."""
    import numpy as np

    if not np.array_equal(np.frombuffer(got, dtype=np.uint8),
                          np.frombuffer(want, dtype=np.uint8)):
        raise RuntimeError(f"{path}: a Get of {key.decode()} returned bytes other than those "
                           "Put under it")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # (a list default is not passed through type: sizes parsed below when not given)
    p.add_argument("--sizes", nargs="+", type=positive_size, default=None,
                   help=f"block sizes [default: {' '.join(DEFAULT_SIZES)}]")
    p.add_argument("--paths", nargs="+", choices=["shm", "tcp"], default=["shm", "tcp"])
    p.add_argument("--rounds", type=positive_int, default=5)
    p.add_argument("--before-tree", default="")
    p.add_argument("--pin", choices=["none", "apart"], default="none")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    sizes = args.sizes if args.sizes is not None else [positive_size(s) for s in DEFAULT_SIZES]
    where = placement(args.pin) if args.pin == "apart" else None
    import numpy as np

    from kvstore import Client
    from kvstore.client.shm import ShmClient

    trees = [("this", "")] + ([("before", args.before_tree)] if args.before_tree else [])
    servers: list[tuple[str, BenchServer]] = []
    clients: dict[tuple[str, str], Any] = {}
    tag = f"{os.getpid()}-{os.urandom(3).hex()}"
    try:
        if where is not None:
            # Before any client exists, so the threads they start inherit the
            # client CPU (numpy's may be running already: every thread moved).
            pin_process(os.getpid(), where[1])
        for name, tree in trees:
            server = start_from_tree(tree, "--l1-shm-path",
                                     f"/dev/shm/kvstore-per-call-{tag}-{name}",
                                     l1_capacity="2GiB", l2=True, unix=True)
            servers.append((name, server))
            if where is not None and server.proc is not None:
                pin_process(server.proc.pid, where[0])  # every thread, not the main one
            if "shm" in args.paths:
                clients[(name, "shm")] = ShmClient(server.unix_target, namespace="bench",
                                                   timeout=120)
            if "tcp" in args.paths:
                clients[(name, "tcp")] = Client(server.tcp, namespace="bench", timeout=120,
                                                data_plane="tcp")
        if where is not None:
            pin_process(os.getpid(), where[1])  # any thread started meanwhile
        cells = []
        for size in sizes:
            rng = np.random.default_rng(size)
            sources = [memoryview(rng.integers(0, 256, size, dtype=np.uint8))
                       for _ in range(max(1, min(64, (512 * MiB) // size)))]
            dest = [memoryview(np.ones(size, dtype=np.uint8))]
            for path in args.paths:
                rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
                for _ in range(args.rounds + 1):  # the first: a warm-up, not counted
                    for name, _ in trees:
                        rounds[name].append(_round(clients[(name, path)], path, size,
                                                   sources, dest))
                cell: dict[str, Any] = {"block_bytes": size, "path": path}
                for name, _ in trees:
                    kept = rounds[name][1:]
                    cell[name] = {k: round(statistics.median(r[k] for r in kept), 3)
                                  for k in kept[0]}
                cells.append(cell)
                line = f"{size / MiB:8.3f} MiB {path}: " + "; ".join(
                    f"{name} put {cell[name]['put_p50_us']:.0f} us {cell[name]['put_gbps']:.2f} "
                    f"GB/s, get {cell[name]['get_p50_us']:.0f} us "
                    f"{cell[name]['get_gbps']:.2f} GB/s" for name, _ in trees)
                print(line, flush=True)
        doc = {"sizes": sizes, "paths": args.paths, "rounds": args.rounds,
               "before_tree": args.before_tree, "pin": args.pin, "cells": cells}
        if args.out:
            Path(args.out).write_text(json.dumps(doc, indent=1))
    finally:
        for c in clients.values():
            c.close()
        for _, server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
