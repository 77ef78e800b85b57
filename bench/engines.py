"""kvstore through the engines' own storage paths, side by side with their other backends.

Run in the engines venv (``./dev.sh test-engines`` builds it)::

    $KVSTORE_ENGINES_VENV/bin/python -m bench.engines [--rounds 3] [--batch 16]

LMCache (its own RemoteBackend, CPU only, a Llama-3-8B-shaped cache: 32
layers x 8 KV heads x 128 dims, bf16 = 128 KiB per token): put and get
throughput of 32 MiB chunks (256 tokens) and 2 MiB chunks (16 tokens) through
kvstore's connector (same host over shared memory; TCP), an in-process dict
connector (the framework's ceiling), LMCache's ``lm://`` server and its Redis
connector; and the latency of a 16k-token prefix (LMCache's lookup, then the
get of its 64 chunks). SGLang: its cache controller's storage calls, kvstore's
``batch_set_v1`` / ``batch_get_v1`` against HiCacheFile's ``batch_set`` /
``batch_get``, with a Llama-3-8B page-first host pool (64-token pages, 8 MiB).
Prints a table and writes ``bench/results/engines.png`` and ``engines.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

warnings.simplefilter("ignore")

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    # (--help in the project's venv, which has no torch: the imports below
    # failed before argparse could answer)
    print(__doc__)
    raise SystemExit(0)

import torch  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402

from bench._peers.redis_proc import RedisServer, ensure_redis_server  # noqa: E402
from bench._server import BenchServer  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
TOKEN_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2
RESULTS = Path(__file__).resolve().parent / "results"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- LMCache ---------------------------------------------------------------------------


def lmcache_config(kind: str, chunk: int, cpu_gb: float, addr: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"chunk_size": chunk, "local_cpu": True, "max_local_cpu_size": cpu_gb,
                           "save_unfull_chunk": True, "blocking_timeout_secs": 60}
    if kind.startswith("kvstore"):
        cfg["remote_storage_plugins"] = ["kvstore"]
        cfg["extra_config"] = {
            "remote_storage_plugin.kvstore.module_path": "kvstore.integrations.lmcache",
            "remote_storage_plugin.kvstore.class_name": "KVStoreConnector",
            "remote_storage_plugin.kvstore.target": addr,
            "remote_storage_plugin.kvstore.timeout": 120}
    elif kind == "dict":
        cfg["remote_storage_plugins"] = ["dict"]
        cfg["extra_config"] = {
            "remote_storage_plugin.dict.module_path": "bench._engines.dict_connector",
            "remote_storage_plugin.dict.class_name": "DictConnector"}
    else:  # lm:// and redis:// through LMCache's own URL adapters
        cfg["remote_url"] = addr
        cfg["remote_serde"] = "naive"
    return cfg


class LMCacheSide:
    """One LMCacheEngine whose RemoteBackend is driven directly."""

    def __init__(self, kind: str, chunk: int, cpu_gb: float, addr: str) -> None:
        self.chunk = chunk
        meta = LMCacheMetadata(model_name="meta-llama/Llama-3-8B", world_size=1,
                               local_world_size=1, worker_id=0, local_worker_id=0,
                               kv_dtype=torch.bfloat16,
                               kv_shape=(LAYERS, 2, chunk, KV_HEADS, HEAD_DIM), chunk_size=chunk)
        cfg = LMCacheEngineConfig.from_dict(lmcache_config(kind, chunk, cpu_gb, addr))
        self.instance = f"bench-{kind}-{chunk}-{time.time_ns()}"
        self.engine = LMCacheEngineBuilder.get_or_create(
            self.instance, cfg, meta, MockGPUConnector(meta.kv_shape), lambda t, r: None,
            lambda o, r: o)
        self.engine.post_init()
        backends = self.engine.storage_manager.storage_backends
        self.local = backends["LocalCPUBackend"]
        self.remote = backends[next(n for n in backends if n.startswith("RemoteBackend"))]
        deadline = time.monotonic() + 30
        while self.remote.connection is None and time.monotonic() < deadline:
            self.remote.init_connection()
            time.sleep(0.05)
        self.meta = meta

    def alloc(self, n: int) -> list[Any]:
        shapes, dtypes = self.meta.get_shapes(), self.meta.get_dtypes()
        from lmcache.v1.memory_management import MemoryFormat

        objs = [self.local.allocate(shapes, dtypes, MemoryFormat.KV_2LTD) for _ in range(n)]
        if any(o is None for o in objs):
            raise RuntimeError("LMCache's local CPU buffer is too small for the batch")
        return objs

    def keys(self, n: int, salt: int) -> list[CacheEngineKey]:
        return [CacheEngineKey("meta-llama/Llama-3-8B", 1, 0, (salt << 24) + i, torch.bfloat16)
                for i in range(n)]

    def put(self, keys: list[Any], objs: list[Any]) -> float:
        """The RemoteBackend's batched put (serialise, then the connector's batched
        put on LMCache's loop), waited for: its own submit returns before the I/O."""
        start = time.perf_counter()
        conn = self.remote.connection
        ser = [self.remote.serializer.serialize(o) for o in objs]
        try:
            if conn.support_batched_put():
                coro = conn.batched_put(keys, ser)
            else:
                async def each() -> None:
                    await asyncio.gather(*(conn.put(k, o) for k, o in zip(keys, ser,
                                                                            strict=True)))
                coro = each()
            asyncio.run_coroutine_threadsafe(coro, self.remote.loop).result(300)
        finally:
            for o in ser:
                o.ref_count_down()
        return time.perf_counter() - start

    def get(self, keys: list[Any]) -> tuple[float, list[Any]]:
        start = time.perf_counter()
        got = self.remote.batched_get_blocking(keys)
        return time.perf_counter() - start, got

    def lookup(self, keys: list[Any]) -> tuple[float, int]:
        start = time.perf_counter()
        loop = self.remote.loop
        fut = asyncio.run_coroutine_threadsafe(
            self.remote.batched_async_contains("bench", keys), loop)
        n = fut.result(60)
        return time.perf_counter() - start, n

    def close(self) -> None:
        LMCacheEngineBuilder.destroy(self.instance)


def lmcache_round_trip(side: LMCacheSide, batch: int, rounds: int, salt: int) -> dict[str, Any]:
    src = side.alloc(batch)
    for i, obj in enumerate(src):
        view = memoryview(obj.byte_array).cast("B")
        view[:] = os.urandom(64) * (len(view) // 64)
        view[:8] = i.to_bytes(8, "little")
    want = [bytes(memoryview(o.byte_array).cast("B")) for o in src]
    nbytes = sum(len(w) for w in want)
    puts, gets, failed = [], [], 0
    for r in range(rounds):
        keys = side.keys(batch, salt * 1000 + r)
        puts.append(side.put(keys, src))
        t, got = side.get(keys)
        gets.append(t)
        for obj, w in zip(got, want, strict=True):
            if obj is None or bytes(memoryview(obj.byte_array).cast("B")) != w:
                failed += 1
            if obj is not None:
                obj.ref_count_down()
    for obj in src:
        obj.ref_count_down()
    return {"put_gbs": nbytes / min(puts) / 1e9, "get_gbs": nbytes / min(gets) / 1e9,
            "failed_gets": failed, "gets": batch * rounds}


def lmcache_prefix(side: LMCacheSide, tokens: int, salt: int) -> dict[str, Any]:
    n = tokens // side.chunk
    src = side.alloc(min(n, 8))
    keys = side.keys(n, salt)
    for i in range(0, n, len(src)):
        side.put(keys[i:i + len(src)], src[: len(keys[i:i + len(src)])])
    for obj in src:
        obj.ref_count_down()
    t_lookup, found = side.lookup(keys)
    t_get, got = side.get(keys)
    ok = sum(1 for g in got if g is not None)
    for g in got:
        if g is not None:
            g.ref_count_down()
    return {"lookup_ms": t_lookup * 1e3, "get_ms": t_get * 1e3, "found": found, "got": ok,
            "chunks": n}


class Peers:
    """The servers the connectors talk to (started once, each on its own)."""

    def __init__(self, workdir: Path, l1: str) -> None:
        self.workdir = workdir
        self.kv = BenchServer("--l1-shm-path", f"/dev/shm/kvstore-bench-engines-{os.getpid()}",
                              "--l1-prefault", "false", l1_capacity=l1, unix=True)
        self.lm: subprocess.Popen[bytes] | None = None
        self.lm_port = 0
        self.redis: RedisServer | None = None
        self.notes: list[str] = []

    def start(self) -> None:
        self.kv.start()
        self.lm_port = free_port()
        self.lm = subprocess.Popen([sys.executable, "-m", "lmcache.v1.server", "127.0.0.1",
                                    str(self.lm_port), "cpu"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.lm_port), 1).close()
                break
            except OSError:
                time.sleep(0.1)  # bounded wait for the lm:// server to listen
        path, note = ensure_redis_server(allow_install=True)
        self.notes.append(note)
        if path:
            self.redis = RedisServer(path, self.workdir / "redis", maxmemory="8gb").start()

    def address(self, kind: str) -> str | None:
        if kind == "kvstore-shm":
            return self.kv.unix_target
        if kind == "kvstore-tcp":
            return self.kv.tcp
        if kind == "dict":
            return ""
        if kind == "lm":
            return f"lm://127.0.0.1:{self.lm_port}"
        if kind == "redis":
            return f"redis://127.0.0.1:{self.redis.port}" if self.redis else None
        raise ValueError(kind)

    def stop(self) -> None:
        self.kv.stop()
        if self.lm is not None:
            self.lm.kill()
            self.lm.wait()
        if self.redis is not None:
            self.redis.stop()


# -- SGLang ----------------------------------------------------------------------------


def sglang_side(args: argparse.Namespace, workdir: Path, kv_target: str) -> dict[str, Any]:
    from sglang.srt.mem_cache import hicache_storage as hs
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    page, pages = 64, args.sglang_pages
    dev = 64
    k = tuple(torch.zeros(dev, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(LAYERS))
    v = tuple(torch.zeros(dev, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(LAYERS))
    ptrs = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64) for ts in (k, v)]
    info = MHABufferInfo(buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptrs[0], v_data_ptrs=ptrs[1],
                                           layout=KVBufferLayout.NHD),
                         page_size=page, head_num=KV_HEADS, head_dim=HEAD_DIM,
                         v_head_dim=HEAD_DIM, dtype=torch.bfloat16, device=torch.device("cpu"))
    pool = MHATokenToKVPoolHost(info, 1.0, 0, page, "page_first", pin_memory=False, device="cpu",
                                device_capacity_tokens=dev, start_layer=0, end_layer=LAYERS,
                                host_token_capacity=2 * pages * page + page)
    src, dst = pool.alloc(pages * page), pool.alloc(pages * page)
    pool.kv_buffer.view(torch.uint8).view(-1)[:] = torch.randint(
        0, 255, (pool.kv_buffer.numel() * 2,), dtype=torch.uint8)

    def config(extra: dict[str, Any] | None) -> Any:
        return hs.HiCacheStorageConfig(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
            model_name="meta-llama/Llama-3-8B", extra_config=extra)

    out: dict[str, Any] = {}
    page_bytes = pool.get_data_page(0).numel() * 2
    nbytes = pages * page_bytes
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(workdir / "hicache-file")
    for name in ("kvstore-shm v1", "kvstore-tcp v1", "HiCacheFile"):
        if name == "HiCacheFile":
            store = StorageBackendFactory.create_backend("file", config(None), pool)
        else:
            target = kv_target if "shm" in name else args._kv_tcp
            store = StorageBackendFactory.create_backend("dynamic", config(
                {"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
                 "class_name": "KVStoreHiCache", "interface_v1": 1,
                 "kvstore_target": target}), pool)
        store.register_mem_pool_host(pool)
        puts, gets, bad = [], [], 0
        for r in range(args.rounds):
            keys = [f"{r:04x}{i:060x}{len(name):04x}"[:64] for i in range(pages)]
            start = time.perf_counter()
            if name == "HiCacheFile":  # the controller's legacy set / get
                store.batch_set(keys, [pool.get_data_page(int(src[i * page]))
                                       for i in range(pages)])
            else:
                store.batch_set_v1(keys, src)
            puts.append(time.perf_counter() - start)
            start = time.perf_counter()
            if name == "HiCacheFile":
                got = store.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
                for i, t in enumerate(got):
                    if t is None:
                        bad += 1
                    else:
                        pool.set_from_flat_data_page(int(dst[i * page]), t)
            else:
                bad += sum(1 for ok in store.batch_get_v1(keys, dst) if not ok)
            gets.append(time.perf_counter() - start)
            same = all(torch.equal(  # as bytes: random bf16 bits include NaNs
                pool.get_data_page(int(src[i * page])).view(torch.uint8),
                pool.get_data_page(int(dst[i * page])).view(torch.uint8)) for i in range(pages))
            bad += 0 if same else 1
            say(f"  sglang {name}: round {r + 1}/{args.rounds}")
        out[name] = {"put_gbs": nbytes / min(puts) / 1e9, "get_gbs": nbytes / min(gets) / 1e9,
                     "failed_gets": bad, "page_mib": page_bytes / 2**20, "pages": pages}
        if hasattr(store, "close"):
            store.close()
    shutil.rmtree(workdir / "hicache-file", ignore_errors=True)
    return out


# -- report ----------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"LMCache {size}", results["lmcache"][size]) for size in results["lmcache"]]
    if results.get("sglang"):
        panels.append(("SGLang HiCache (8 MiB pages)", results["sglang"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, rows) in zip(axes, panels, strict=True):
        names = list(rows)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [rows[n]["put_gbs"] for n in names], 0.4, label="put")
        ax.bar([x + 0.2 for x in xs], [rows[n]["get_gbs"] for n in names], 0.4, label="get")
        ax.set_xticks(list(xs), names, rotation=20, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="32 MiB chunks per batch")
    ap.add_argument("--small-batch", type=int, default=128, help="2 MiB chunks per batch")
    ap.add_argument("--prefix-tokens", type=int, default=16384)
    ap.add_argument("--sglang-pages", type=int, default=32)
    ap.add_argument("--only", default="", help="comma list of connectors (default: all)")
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--sizes", default="both", help="both, 32 or 2 (MiB chunks)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    kinds = ["kvstore-shm", "kvstore-tcp", "dict", "lm", "redis"]
    if args.only:
        kinds = [k for k in kinds if k in args.only.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-engines-"))
    big = args.batch * 256 * TOKEN_BYTES
    l1 = f"{max(4 << 30, 3 * max(big, args.prefix_tokens * TOKEN_BYTES)) >> 20}MiB"
    peers = Peers(workdir, l1)
    results: dict[str, Any] = {"lmcache": {"32 MiB chunks": {}, "2 MiB chunks": {}},
                               "prefix": {}, "notes": peers.notes}
    try:
        say(f"bench.engines: starting kvstore (L1 {l1}), lm:// server, redis ...")
        peers.start()
        args._kv_tcp = peers.kv.tcp
        salt = 1
        for kind in kinds:
            addr = peers.address(kind)
            if addr is None:
                continue
            for label, chunk, batch in (("32 MiB chunks", 256, args.batch),
                                        ("2 MiB chunks", 16, args.small_batch)):
                if args.sizes != "both" and args.sizes != label.split()[0]:
                    continue
                need_gb = 3 * max(batch * chunk, args.prefix_tokens) * TOKEN_BYTES / 1e9
                say(f"  lmcache {kind}: {label} x {batch}, {args.rounds} rounds ...")
                side = LMCacheSide(kind, chunk, need_gb, addr)
                try:
                    results["lmcache"][label][kind] = lmcache_round_trip(side, batch,
                                                                         args.rounds, salt)
                    if chunk == 256 and kind != "redis":  # redis: its batched get of a
                        # long prefix did not finish here (LMCache 0.5.6); throughput only
                        say(f"  lmcache {kind}: {args.prefix_tokens}-token prefix ...")
                        results["prefix"][kind] = lmcache_prefix(side, args.prefix_tokens,
                                                                 salt + 500)
                except Exception as exc:  # one peer failing must not lose the others' rows
                    say(f"  lmcache {kind}: {label} failed: {type(exc).__name__}: {exc}")
                    results["notes"].append(f"{kind} {label}: {type(exc).__name__}: {exc}")
                finally:
                    if kind != "redis":  # LMCache 0.5.6's RedisConnector.close() waits on its
                        side.close()     # own event loop from that loop and never returns
                salt += 1
                save(results, args.out)  # a later peer that dies must not lose these rows
        if not args.skip_sglang:
            say("  sglang: kvstore v1 vs HiCacheFile ...")
            results["sglang"] = sglang_side(args, workdir, peers.kv.unix_target)
    finally:
        peers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    save(results, args.out)
    plot(results, args.out / "engines.png")
    say(f"wrote {args.out / 'engines.json'} and {args.out / 'engines.png'}")
    if "redis" in kinds:
        os._exit(0)  # the Redis engine was left open (see above): do not wait on its threads
    return 0


def save(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(json.dumps(results, indent=2))


def print_table(results: dict[str, Any]) -> None:
    for label, rows in results["lmcache"].items():
        print(f"\nLMCache RemoteBackend, {label} (Llama-3-8B shape, bf16)")
        print(f"{'connector':<14}{'put GB/s':>10}{'get GB/s':>10}{'failed gets':>13}")
        for name, r in rows.items():
            print(f"{name:<14}{r['put_gbs']:>10.2f}{r['get_gbs']:>10.2f}"
                  f"{r['failed_gets']:>7}/{r['gets']}")
    print("\n16k-token prefix (LMCache lookup, then get of its chunks)")
    print(f"{'connector':<14}{'lookup ms':>10}{'get ms':>10}{'found':>8}")
    for name, r in results["prefix"].items():
        print(f"{name:<14}{r['lookup_ms']:>10.1f}{r['get_ms']:>10.1f}"
              f"{r['got']:>5}/{r['chunks']}")
    print("\nSGLang HiCache storage (page_first, 8 MiB pages)")
    print(f"{'backend':<16}{'set GB/s':>10}{'get GB/s':>10}{'failed':>8}")
    for name, r in results.get("sglang", {}).items():
        print(f"{name:<16}{r['put_gbs']:>10.2f}{r['get_gbs']:>10.2f}{r['failed_gets']:>8}")


if __name__ == "__main__":
    raise SystemExit(main())
