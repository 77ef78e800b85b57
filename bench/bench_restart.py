"""Warm-restart time: rebuilding the index from L2 metadata and from an L3 listing.

    python -m bench.bench_restart [--sizes 100000 1000000] [--l3-sizes 100000] [--out F]

For each size N it writes N small blocks' metadata and payloads straight into
an LMDB L2 (the layout the server uses), then measures, in one run:

* ``l2_rebuild_s``: ``TieredStore.start()`` on that data dir — the index
  rebuilt from the ``meta`` sub-database without reading payloads;
* ``server_ready_s``: a real ``kvstore serve`` subprocess from exec to its
  ready file (imports, arena, index rebuild, listening);
* ``l2_scan_only_s``: the raw LMDB metadata scan, the floor for the rebuild.

For L3 it lays out N objects in a ``file://`` object store (the same obstore
code path as ``s3://``) and measures the background listing that indexes them
(``l3_listing_s``) while the server already serves. JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb

from kvstore.checksum import checksum
from kvstore.config import load
from kvstore.store import TieredStore
from kvstore.tiers.base import BlockMeta
from kvstore.tiers.lmdb_tier import encode_key
from kvstore.tiers.object import HEADER, LAYOUT_VERSION, MAGIC

PAYLOAD = 1024


def fill_l2(path: Path, n: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=max(1 << 30, n * (PAYLOAD + 512) * 2), max_dbs=4,
                    sync=False, metasync=False)
    data_db = env.open_db(b"data")
    meta_db = env.open_db(b"meta")
    payload = os.urandom(PAYLOAD)
    meta = BlockMeta(PAYLOAD, checksum(payload), time.time()).pack()
    batch = 50_000
    for start in range(0, n, batch):
        with env.begin(write=True) as txn:
            for i in range(start, min(n, start + batch)):
                key = encode_key(("bench", struct.pack(">Q", i) + b"\0" * 24))
                txn.put(key, payload, db=data_db)
                txn.put(key, meta, db=meta_db)
    env.sync(True)
    env.close()


def fill_l3(root: Path, n: int) -> None:
    ns_dir = root / "restart" / "bench"
    ns_dir.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(PAYLOAD)
    header = HEADER.pack(MAGIC, LAYOUT_VERSION, b"\0\0\0", PAYLOAD, checksum(payload),
                         time.time())
    body = header + payload
    for i in range(n):
        (ns_dir / (struct.pack(">Q", i) + b"\1" * 24).hex()).write_bytes(body)


def time_rebuild(data_dir: Path) -> float:
    config = load(env={"KVSTORE_DATA_DIR": str(data_dir), "KVSTORE_L1_CAPACITY": "64MiB",
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "1TiB"})

    async def go() -> float:
        store = TieredStore(config)
        started = time.perf_counter()
        await store.start()
        took = time.perf_counter() - started
        await store.close()
        return took

    return asyncio.run(go())


def time_scan(path: Path) -> float:
    started = time.perf_counter()
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    meta_db = env.open_db(b"meta", create=False)
    count = 0
    with env.begin(db=meta_db, buffers=True) as txn:
        for _ in txn.cursor():
            count += 1
    env.close()
    return time.perf_counter() - started


def time_server(data_dir: Path, extra: list[str], wait_l3: int = 0) -> dict[str, float]:
    ready = data_dir / "ready.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(data_dir),
           "--server-listen", "127.0.0.1:0", "--l1-capacity", "64MiB", "--l1-prefault", "false",
           "--l2-capacity", "1TiB", "--ready-file", str(ready), *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"})
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError("server exited")
            time.sleep(0.005)
        out = {"server_ready_s": time.perf_counter() - started}
        if wait_l3:
            from kvstore import Client
            from kvstore.types import TierName

            target = json.loads(ready.read_text())["tcp"]
            with Client(target) as c:
                while True:
                    l3 = next(t for t in c.stats().tiers if t.tier == TierName.L3)
                    if l3.blocks >= wait_l3:
                        break
                    time.sleep(0.01)
            out["l3_listing_s"] = time.perf_counter() - started - out["server_ready_s"]
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--l3-sizes", type=int, nargs="*", default=[100_000])
    p.add_argument("--out")
    args = p.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {"l2": [], "l3": []}
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="kvstore-restart-"))
        try:
            t = time.perf_counter()
            fill_l2(tmp / "l2", n)
            print(f"filled L2 with {n} blocks in {time.perf_counter() - t:.1f} s",
                  file=sys.stderr)
            row: dict[str, float] = {"blocks": n, "l2_scan_only_s": time_scan(tmp / "l2"),
                                     "l2_rebuild_s": time_rebuild(tmp)}
            row.update(time_server(tmp, []))
            row["rebuild_us_per_block"] = row["l2_rebuild_s"] / n * 1e6
            results["l2"].append(row)
            print(json.dumps(row), file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for n in args.l3_sizes:
        tmp = Path(tempfile.mkdtemp(prefix="kvstore-restart-l3-"))
        try:
            t = time.perf_counter()
            fill_l3(tmp / "objects", n)
            print(f"laid out {n} L3 objects in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            row = {"blocks": n}
            row.update(time_server(tmp / "node", ["--l3-url", f"file://{tmp}/objects/restart"],
                                   wait_l3=n))
            results["l3"].append(row)
            print(json.dumps(row), file=sys.stderr)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
