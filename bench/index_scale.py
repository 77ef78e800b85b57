"""The block index at scale: memory per block, Lookup and Put latency, warm restart.

    .venv/bin/python -m bench.index_scale [--quick] [--sizes 10k 100k 1M 10M] [--out FILE]

For each index size N (default 10k, 100k, 1M, 10M; 10M only if the 1M figures
say it fits in memory and time, otherwise the JSON says why it was skipped):

1. In process (a fresh child process per N): a ``TieredStore`` built from
   ``kvstore.config.load(env=...)`` (L1 64 MiB, L2 in a temp dir) is loaded
   with N blocks exactly as a warm restart does it (``_rebuild_from_l2``: an
   ``Entry(size, checksum, created, l2=True)`` per block and
   ``policy.on_insert(L2, ...)``), without gRPC. Memory per block = RSS delta
   / N (and, for N <= 100k, tracemalloc's count with the top allocation
   sites). Then ``await store.lookup(ns, chain)`` of a 1,000-key chain of
   present keys, and ``await store.put_bytes`` of 4 KiB blocks, p50/p99.
2. Live server over its unix socket: N block records (the 24-byte metadata
   the L2 tier keeps per block, and a 1-byte payload: L2's open drops
   metadata without one) are written into the LMDB ``meta`` and ``data``
   databases of a fresh data dir, then ``kvstore serve`` is started on
   it: it rebuilds its index from those records at start (the warm-restart
   path), so the live server holds N blocks without N Puts. Measured: time to
   ready (rebuild), server RSS minus an empty server's, ``Client.lookup`` of a
   1,000-key chain over the unix socket (p50/p99) and ``Client.put`` of one
   4 KiB block (p50/p99). Gets are not measured here (no payloads exist).

Keys are 32 bytes (BLAKE2b of the block number), one namespace. Targets from
issue 6: <= 200 bytes of memory per block; Lookup of a 1,000-key chain < 1 ms
p50 over the unix socket.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NS = "bench-index"
CHAIN = 1000
# The baseline (l2.compact_index off: a full Entry per block) runs up to here.
FULL_ENTRY_MAX = 1_000_000
PUT_BYTES = 4096


def key_of(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


def _lat(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(_pct(values, 0.5) * 1e3, 4),
            "p99_ms": round(_pct(values, 0.99) * 1e3, 4),
            "mean_ms": round(statistics.fmean(values) * 1e3, 4), "n": len(values)}


def _chains(n: int, count: int) -> list[list[bytes]]:
    """``count`` chains of CHAIN consecutive present keys, spread over the index."""
    length = min(CHAIN, n)
    step = max(1, (n - length) // max(1, count))
    return [[key_of(s + j) for j in range(length)] for s in
            (min(n - length, i * step) for i in range(count))]


# --------------------------------------------------------------------------- in process


# LRU, pinned: the bench measures the index, with the lightest policy's
# per-block node (figures comparable with docs/index.md, measured before the
# session policy became the default; the session policy adds its own state).
POLICY = "lru"


def _make_config(tmp: str, compact: bool = True) -> Any:
    from kvstore import config as kvconfig

    return kvconfig.load(env={
        "KVSTORE_L2_COMPACT_INDEX": "true" if compact else "false",
        "KVSTORE_DATA_DIR": tmp,
        "KVSTORE_L1_CAPACITY": "64MiB",
        "KVSTORE_L1_PREFAULT": "false",
        "KVSTORE_L2_ENABLED": "true",
        # Room for every indexed block (10M x 64 KiB): the bench measures the
        # index, not L2 evicting down to a capacity.
        "KVSTORE_L2_CAPACITY": "1024TiB",
        "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
        "KVSTORE_POLICY_NAME": POLICY,
    })


def inproc_main(conn: Any, n: int, reps: int, trace: bool, compact: bool = True) -> None:
    """``trace``: only count the load with tracemalloc (its own bookkeeping
    would inflate an RSS delta taken in the same process)."""
    try:
        conn.send(("ok", asyncio.run(_inproc(n, reps, trace, compact))))
    except Exception as exc:
        import traceback

        conn.send(("error", f"{exc}\n{traceback.format_exc()}"))


async def _inproc(n: int, reps: int, trace: bool, compact: bool) -> dict[str, Any]:
    import tracemalloc

    from kvstore.store import TieredStore

    out: dict[str, Any] = {"blocks": n, "compact_index": compact}
    with tempfile.TemporaryDirectory(prefix="kvstore-index-") as tmp:
        store = TieredStore(_make_config(tmp, compact))
        await store.start()
        # Keys and metadata first (what L2's scan hands the rebuild), then the
        # index itself; only the latter is counted.
        created0 = time.time() - n * 1e-3
        gc.collect()
        rss0 = rss_bytes()
        if trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        # What L2's scan hands the rebuild (the keys are the index's own
        # objects afterwards, so they are counted), then the rebuild's
        # indexing itself (TieredStore.index_l2_blocks).
        keys = [key_of(i) for i in range(n)]
        sizes = array("Q", [65536]) * n
        sums = array("L", range(n))
        created = array("d", [created0]) * n
        store.index_l2_blocks([NS] * n, keys, sizes, sums, created)
        del sizes, sums, created
        load_s = time.perf_counter() - t0
        if trace:
            snap = tracemalloc.take_snapshot()
            tracemalloc.stop()
            stats = snap.statistics("lineno")
            traced = sum(s.size for s in stats)
            out["tracemalloc_bytes_per_block"] = round(traced / n, 1)
            out["tracemalloc_top"] = [
                {"where": f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}",
                 "bytes_per_block": round(s.size / n, 1)} for s in stats[:4]]
            out["tracemalloc_note"] = (
                "the keys (a 65-byte bytes object each) are counted; with l2.compact_index "
                "off, placement.py and index.py (kvstore/store/) lines are the Entry / index "
                "dict slot, lru.py the policy's OrderedDict node; with it on, coldindex.py "
                "lines are the per-namespace dict and columns")
            await store.close()
            return out
        del keys  # the index holds what it needs of them (the full index: the keys)
        gc.collect()
        rss1 = rss_bytes()
        out["load_seconds"] = round(load_s, 3)
        out["load_us_per_block"] = round(load_s / n * 1e6, 3)
        out["rss_bytes_per_block"] = round((rss1 - rss0) / n, 1)

        chains = _chains(n, 16)
        gc_pauses: list[tuple[int, float]] = []
        gc_t0 = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_t0[0] = time.perf_counter()
            else:
                gc_pauses.append((info["generation"], time.perf_counter() - gc_t0[0]))

        gc.callbacks.append(on_gc)
        lat = []
        for i in range(reps):
            chain = chains[i % len(chains)]
            s = time.perf_counter()
            r = await store.lookup(NS, chain)
            lat.append(time.perf_counter() - s)
            if r.found != len(chain):
                raise RuntimeError(f"in-process lookup found {r.found} of {len(chain)}")
        out["lookup_chain"] = len(chains[0])
        out["lookup"] = _lat(lat)
        data = os.urandom(PUT_BYTES)
        lat = []
        for i in range(reps):
            s = time.perf_counter()
            await store.put_bytes(NS, b"new-%d" % i, data)
            lat.append(time.perf_counter() - s)
        out["put_4k"] = _lat(lat)
        gc.callbacks.remove(on_gc)
        full = [t for g, t in gc_pauses if g == 2]
        out["gc_during_lookups_and_puts"] = {
            "collections": len(gc_pauses), "full_collections": len(full),
            "longest_full_ms": round(max(full) * 1e3, 2) if full else 0.0,
            "total_ms": round(sum(t for _, t in gc_pauses) * 1e3, 2)}
        s = time.perf_counter()
        store.stats()
        out["stats_ms"] = round((time.perf_counter() - s) * 1e3, 3)
        await store.close()
    return out


# --------------------------------------------------------------------------- live server


def fill_lmdb_main(conn: Any, l2_dir: str, n: int) -> None:
    """Write N block records into L2: metadata, and a 1-byte payload each
    (0.29.4's open drops metadata without its payload as damaged)."""
    try:
        import lmdb

        from kvstore.tiers.base import BlockMeta
        from kvstore.tiers.lmdb_tier import encode_key

        t0 = time.perf_counter()
        Path(l2_dir).mkdir(parents=True, exist_ok=True)
        env = lmdb.open(l2_dir, map_size=max(1 << 30, n * 400), max_dbs=4, subdir=True,
                        sync=False, metasync=False)
        data = env.open_db(b"data")
        meta = env.open_db(b"meta")
        created0 = time.time() - n * 1e-3
        batch = 200_000
        for start in range(0, n, batch):
            items = sorted(
                (encode_key((NS, key_of(i))), BlockMeta(1, i & 0xFFFFFFFF,
                                                        created0 + i * 1e-3).pack())
                for i in range(start, min(n, start + batch)))
            with env.begin(write=True) as txn:
                txn.cursor(db=meta).putmulti(items, dupdata=False, overwrite=True)
                txn.cursor(db=data).putmulti(((k, b"\0") for k, _ in items),
                                             dupdata=False, overwrite=True)
        env.sync(True)
        env.close()
        conn.send(("ok", round(time.perf_counter() - t0, 2)))
    except Exception as exc:
        conn.send(("error", repr(exc)))


def _child(target: Any, *args: Any) -> Any:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(child, *args))
    p.start()
    child.close()
    try:
        status, value = parent.recv()
    finally:
        p.join(60)
    if status != "ok":
        raise RuntimeError(value)
    return value


def live_server(n: int, reps: int, base_rss: int | None, timeout: float,
                base_anon: int = 0) -> dict[str, Any]:
    from bench._server import BenchServer
    from kvstore import Client

    out: dict[str, Any] = {"blocks": n}
    with tempfile.TemporaryDirectory(prefix="kvstore-index-live-") as tmp:
        if n:
            out["fill_lmdb_seconds"] = _child(fill_lmdb_main, str(Path(tmp) / "l2"), n)
        server = BenchServer("--l1-prefault", "false", "--l2-capacity", "1024TiB",
                             "--policy-name", POLICY, l1_capacity="64MiB", l2=True, unix=True,
                             data_dir=tmp)
        t0 = time.perf_counter()
        server.start(timeout=timeout)
        out["start_seconds"] = round(time.perf_counter() - t0, 2)
        try:
            assert server.proc is not None
            rss = server.rss_bytes()
            anon = server.rss_bytes("RssAnon")
            out["server_rss_bytes"] = rss
            out["server_rss_anon_bytes"] = anon
            out["server_rss_file_bytes"] = server.rss_bytes("RssFile")
            if base_rss is not None and n:
                # VmRSS also counts the LMDB pages the rebuild read (mapped
                # file pages: page cache the kernel can reclaim); RssAnon is
                # the memory the server itself holds.
                out["rss_bytes_per_block"] = round((rss - base_rss) / n, 1)
                out["rss_anon_bytes_per_block"] = round((anon - base_anon) / n, 1)
            with Client(server.unix_target, namespace=NS, timeout=120) as c:
                if n:
                    chains = _chains(n, 16)
                    c.lookup(chains[0])  # warm the channel
                    lat = []
                    for i in range(reps):
                        chain = chains[i % len(chains)]
                        s = time.perf_counter()
                        r = c.lookup(chain)
                        lat.append(time.perf_counter() - s)
                        if r.found != len(chain):
                            raise RuntimeError(f"lookup over the socket found {r.found} "
                                               f"of {len(chain)}")
                    out["lookup_chain"] = len(chains[0])
                    out["lookup"] = _lat(lat)
                data = os.urandom(PUT_BYTES)
                c.put([(b"warm", data)])
                lat = []
                for i in range(reps):
                    s = time.perf_counter()
                    c.put([(b"new-%d" % i, data)])
                    lat.append(time.perf_counter() - s)
                out["put_4k"] = _lat(lat)
                s = time.perf_counter()
                c.stats()
                out["stats_rpc_ms"] = round((time.perf_counter() - s) * 1e3, 3)
        finally:
            t1 = time.perf_counter()
            server.stop(timeout=max(60.0, timeout))
            out["stop_seconds"] = round(time.perf_counter() - t1, 2)
    return out


# --------------------------------------------------------------------------- main


def _parse_count(text: str) -> int:
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def _log(msg: str) -> None:
    print(f"index_scale: {msg}", file=sys.stderr, flush=True)


def _too_big(phase: str, n: int, prev: dict[str, Any] | None,
             max_seconds: float) -> str | None:
    """Why ``phase`` at ``n`` blocks would not fit, judged from the last size run."""
    if prev is None:
        return None
    scale = n / prev["blocks"]
    per_block = prev[phase].get("rss_bytes_per_block") or 0
    need = per_block * n * 1.6  # the keys and the rebuild's scan list on top of the index
    secs = scale * prev[f"{phase}_seconds"]
    avail = mem_available()
    if need > 0.5 * avail:
        return (f"needs about {need / 2**30:.1f} GiB ({per_block:.0f} B/block measured at "
                f"{prev['blocks']:,}, x1.6 for the load's transient copies): more than half "
                f"of MemAvailable ({avail / 2**30:.1f} GiB) on this shared machine")
    if secs > max_seconds:
        return (f"estimated {secs:.0f} s (x{scale:.0f} the {prev['blocks']:,} run), over "
                f"--max-seconds {max_seconds:.0f}")
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    _log("empty server (baseline RSS) ...")
    base = live_server(0, 20, None, 60)
    base_rss = base["server_rss_bytes"]
    base_anon = base["server_rss_anon_bytes"]
    prev: dict[str, Any] = {}  # phase -> the last row that ran it
    for n in args.sizes:
        row: dict[str, Any] = {"blocks": n}
        for phase in ("in_process", "in_process_full", "server"):
            if phase == "in_process_full" and n > FULL_ENTRY_MAX:
                continue  # the baseline: ~450 B/block, too slow and big beyond
            why = _too_big(phase, n, prev.get(phase), args.max_seconds)
            if why:
                _log(f"skipping {n:,} blocks ({phase}): {why}")
                skipped.append({"blocks": n, "phase": phase, "reason": why})
                continue
            t0 = time.perf_counter()
            if phase.startswith("in_process"):
                compact = phase == "in_process"
                _log(f"{n:,} blocks: in process ({'compact' if compact else 'full'} "
                     "index entries) ...")
                res = _child(inproc_main, n, args.reps, False, compact)
                if n <= 100_000:
                    traced = _child(inproc_main, n, args.reps, True, compact)
                    res.update({k: v for k, v in traced.items() if k.startswith("tracemalloc")})
                _log(f"{n:,} blocks: {res['rss_bytes_per_block']} B/block, lookup p50 "
                     f"{res['lookup']['p50_ms']} ms, put p50 {res['put_4k']['p50_ms']} ms "
                     "in process")
            else:
                _log(f"{n:,} blocks: live server ...")
                res = live_server(n, args.reps, base_rss, timeout=max(120.0, n / 20_000),
                                  base_anon=base_anon)
                _log(f"{n:,} blocks: server start {res['start_seconds']} s, "
                     f"{res.get('rss_bytes_per_block')} B/block "
                     f"({res.get('rss_anon_bytes_per_block')} anonymous), lookup p50 "
                     f"{res['lookup']['p50_ms']} ms, put p50 {res['put_4k']['p50_ms']} ms over "
                     "the unix socket")
            row[phase] = res
            row[f"{phase}_seconds"] = round(time.perf_counter() - t0, 1)
            prev[phase] = row
        if len(row) > 1:
            results.append(row)
    growth: dict[str, Any] = {}
    for phase in ("in_process", "in_process_full", "server"):
        rows = [r for r in results if phase in r]
        if len(rows) > 1:
            a, b = rows[0][phase], rows[-1][phase]
            growth[phase] = {
                "from_blocks": rows[0]["blocks"], "to_blocks": rows[-1]["blocks"],
                "lookup_p50_ratio": round(b["lookup"]["p50_ms"] / a["lookup"]["p50_ms"], 2),
                "lookup_p99_ratio": round(b["lookup"]["p99_ms"] / a["lookup"]["p99_ms"], 2),
                "put_p50_ratio": round(b["put_4k"]["p50_ms"] / a["put_4k"]["p50_ms"], 2),
                "put_p99_ratio": round(b["put_4k"]["p99_ms"] / a["put_4k"]["p99_ms"], 2),
            }
    targets = []
    for r in results:
        for phase in ("in_process", "in_process_full", "server"):
            for field, what in (("rss_bytes_per_block", "RSS"),
                                ("rss_anon_bytes_per_block", "anonymous RSS")):
                bpb = r.get(phase, {}).get(field)
                if bpb is not None and r["blocks"] >= 100_000:  # smaller: RSS noise
                    targets.append({"target": f"memory per block <= 200 B at {r['blocks']:,} "
                                              f"blocks ({phase.replace('_', '-')} {what} delta)",
                                    "value": bpb, "ok": bpb <= 200})
        if "server" not in r:
            continue
        p50 = r["server"]["lookup"]["p50_ms"]
        targets.append({"target": f"Lookup of a {CHAIN}-key chain p50 < 1 ms over the unix "
                                  f"socket at {r['blocks']:,} blocks",
                        "value": p50, "ok": p50 < 1.0})
    return {
        "bench": "index_scale",
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "reps": args.reps, "chain_keys": CHAIN, "put_block_bytes": PUT_BYTES,
            "key_bytes": 32, "namespace": NS,
            "policy": POLICY,
            "empty_server": base,
            "method": "in process: keys made and indexed by TieredStore.index_l2_blocks "
                      "(what the rebuild from L2 calls), RSS delta / N, keys included; "
                      "in_process = l2.compact_index on (the default), in_process_full = off "
                      "(a full Entry per block, the baseline); live: LMDB meta records written "
                      "directly, server rebuilds its index at start; Lookup/Put over the "
                      "unix socket with kvstore.Client",
            "seconds": round(time.perf_counter() - t_start, 1),
        },
        "results": results,
        "skipped": skipped,
        "growth": growth,
        "targets": targets,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=_parse_count, default=None,
                   help="index sizes [default: 10k 100k 1M 10M; --quick 10k 100k 1M]")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="smoke test: 1k and 5k blocks")
    p.add_argument("--reps", type=int, default=None, help="calls per latency [default: 200]")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="skip a size whose estimated time exceeds this [default: 600]")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes = args.sizes or [1_000, 5_000]
        args.reps = args.reps or 20
    args.sizes = args.sizes or ([10_000, 100_000, 1_000_000] if args.quick else
                                [10_000, 100_000, 1_000_000, 10_000_000])
    args.reps = args.reps or 200
    doc = run(args)
    for t in doc["targets"]:
        mark = {True: "PASS", False: "MISS"}[t["ok"]]
        print(f"  {mark} {t['target']}: {t['value']}", file=sys.stderr)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
