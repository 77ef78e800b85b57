"""SGLang HiCache: kvstore loaded by SGLang's StorageBackendFactory ("dynamic"), moving
pages of SGLang's own host pool (MHATokenToKVPoolHost) in all four layouts."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from conftest import quiet_import
from serverproc import ServerProcess

torch: Any = quiet_import("torch")
hicache: Any = quiet_import("sglang.srt.mem_cache.hicache_storage")
factory: Any = quiet_import("sglang.srt.mem_cache.storage.backend_factory")
pool_info: Any = quiet_import("sglang.srt.mem_cache.device_pool_info")
pool_mha: Any = quiet_import("sglang.srt.mem_cache.pool_host.mha")
pool_mla: Any = quiet_import("sglang.srt.mem_cache.pool_host.mla")

LAYERS, HEADS, DIM, PAGE = 4, 2, 16, 8
LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head"]


def host_pool(layout: str) -> Any:
    """SGLang's own host KV pool on the CPU (no pinning), sized for 64 device tokens."""
    tokens = 64
    k = tuple(torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(LAYERS))
    v = tuple(torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(LAYERS))
    ptrs = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64) for ts in (k, v)]
    buffers = pool_info.KVBuffers(k=k, v=v, k_data_ptrs=ptrs[0], v_data_ptrs=ptrs[1],
                                  layout=pool_info.KVBufferLayout.NHD)
    info = pool_info.MHABufferInfo(buffers=buffers, page_size=PAGE, head_num=HEADS,
                                   head_dim=DIM, v_head_dim=DIM, dtype=torch.bfloat16,
                                   device=torch.device("cpu"))
    return pool_mha.MHATokenToKVPoolHost(info, 4.0, 0, PAGE, layout, pin_memory=False,
                                         device="cpu", device_capacity_tokens=tokens,
                                         start_layer=0, end_layer=LAYERS)


def mla_host_pool(layout: str) -> Any:
    """SGLang's own MLA host pool on the CPU: one row of kv_lora_rank +
    qk_rope_head_dim per token and layer (no K/V pair)."""
    tokens, rank, rope = 64, 16, 8
    bufs = tuple(torch.zeros(tokens, 1, rank + rope, dtype=torch.bfloat16)
                 for _ in range(LAYERS))
    info = pool_info.MLABufferInfo(
        buffers=bufs, data_ptrs=torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64),
        layer_indices=tuple(range(LAYERS)), device_layer_num=LAYERS, page_size=PAGE,
        kv_lora_rank=rank, qk_rope_head_dim=rope, kv_cache_dim=rank + rope,
        dtype=torch.bfloat16, device=torch.device("cpu"))
    return pool_mla.MLATokenToKVPoolHost(info, 4.0, 0, PAGE, layout, pin_memory=False,
                                         device="cpu", device_capacity_tokens=tokens,
                                         start_layer=0, end_layer=LAYERS,
                                         target_layer_num=LAYERS)


def backend(target: str, *, v1: bool, layout: str = "page_first", mla: bool = False,
            **extra: Any) -> Any:
    """The backend as SGLang makes it: from --hicache-storage-backend dynamic and its
    extra config, through the engine's own factory."""
    config = hicache.HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=False,
        is_page_first_layout=layout != "layer_first", model_name="meta-llama/Llama-3-8B",
        extra_config={"backend_name": "kvstore", "module_path": "kvstore.integrations.sglang",
                      "class_name": "KVStoreHiCache", "interface_v1": int(v1),
                      "kvstore_target": target, "kvstore_retry_s": 0.05, **extra})
    store = factory.StorageBackendFactory.create_backend("dynamic", config, None)
    return store


def page_hashes(n: int, salt: str = "") -> list[str]:
    out, prev = [], salt
    for i in range(n):
        prev = hashlib.sha256(f"{prev}:{i}".encode()).hexdigest()
        out.append(prev)
    return out


def fill(pool: Any, indices: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(indices), PAGE):
        page = torch.randn(pool.get_dummy_flat_data_page().shape, generator=gen)
        pool.set_from_flat_data_page(int(indices[start]), page.to(torch.bfloat16))


def pages(pool: Any, indices: Any) -> list[bytes]:
    return [pool.get_data_page(int(indices[s])).contiguous().view(torch.uint8).numpy().tobytes()
            for s in range(0, len(indices), PAGE)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("v1", [True, False], ids=["v1", "legacy"])
def test_pages_round_trip_through_the_factory(shm_server: ServerProcess, layout: str,
                                              v1: bool) -> None:
    src, dst = host_pool(layout), host_pool(layout)
    store = backend(shm_server.unix_target, v1=v1, layout=layout)
    store.register_mem_pool_host(src)
    assert type(store).__name__ == "KVStoreHiCache"
    keys = page_hashes(6, layout)
    idx = src.alloc(6 * PAGE)
    fill(src, idx, seed=1)
    if v1:
        assert all(store.batch_set_v1(keys, idx))
    else:
        assert store.batch_set(keys, [src.get_data_page(int(idx[i * PAGE])) for i in range(6)])
    assert store.link.same_host

    # A fresh engine (another host pool) finds the prefix and reads it back.
    reader = backend(shm_server.unix_target, v1=v1, layout=layout)
    reader.register_mem_pool_host(dst)
    info = hicache.HiCacheStorageExtraInfo(prefix_keys=[])
    assert reader.batch_exists(keys + page_hashes(2, "absent"), info) == 6
    assert reader.batch_exists(page_hashes(1, "absent") + keys, info) == 0
    out = dst.alloc(6 * PAGE)
    if v1:
        assert reader.batch_get_v1(keys, out, info) == [True] * 6
    else:
        got = reader.batch_get(keys, [dst.get_dummy_flat_data_page() for _ in keys])
        assert all(t is not None for t in got)
        for i, t in enumerate(got):
            dst.set_from_flat_data_page(int(out[i * PAGE]), t)
    assert pages(dst, out) == pages(src, idx)


def test_v1_and_legacy_read_each_others_pages(shm_server: ServerProcess) -> None:
    for layout in LAYOUTS:
        src, dst = host_pool(layout), host_pool(layout)
        writer = backend(shm_server.unix_target, v1=True, layout=layout)
        writer.register_mem_pool_host(src)
        keys = page_hashes(3, "mixed" + layout)
        idx = src.alloc(3 * PAGE)
        fill(src, idx, seed=2)
        assert all(writer.batch_set_v1(keys, idx))
        reader = backend(shm_server.unix_target, v1=False, layout=layout)
        reader.register_mem_pool_host(dst)
        got = reader.batch_get(keys, [dst.get_dummy_flat_data_page() for _ in keys])
        want = [src.get_data_page(int(idx[i * PAGE])) for i in range(3)]
        assert all(torch.equal(g.view(torch.uint8), w.contiguous().view(torch.uint8))
                   for g, w in zip(got, want, strict=True)), layout


def test_tcp_path(shm_server: ServerProcess) -> None:
    src, dst = host_pool("page_first"), host_pool("page_first")
    store = backend(shm_server.tcp, v1=True)
    store.register_mem_pool_host(src)
    keys = page_hashes(4, "tcp")
    idx = src.alloc(4 * PAGE)
    fill(src, idx, seed=3)
    assert all(store.batch_set_v1(keys, idx))
    assert not store.link.same_host
    reader = backend(shm_server.tcp, v1=True)
    reader.register_mem_pool_host(dst)
    out = dst.alloc(4 * PAGE)
    assert reader.batch_get_v1(keys, out) == [True] * 4
    assert pages(dst, out) == pages(src, idx)


def test_kvstore_down_at_start_then_restart_midway(tmp_path: Any) -> None:
    arena = f"/dev/shm/kvstore-engines-restart-{tmp_path.name}"
    server = ServerProcess(tmp_path / "kv", "--l1-shm-path", arena, l1_capacity="64MiB")
    target = f"unix:{tmp_path / 'kv' / 'kvstore.sock'}"
    src, dst = host_pool("page_first"), host_pool("page_first")
    # The engine starts first: the backend loads, every call answers a miss.
    store = backend(target, v1=True)
    store.register_mem_pool_host(src)
    keys = page_hashes(4, "restart")
    idx = src.alloc(4 * PAGE)
    fill(src, idx, seed=4)
    assert store.batch_set_v1(keys, idx) == [False] * 4
    assert store.batch_exists(keys) == 0
    try:
        server.start()
        assert _eventually(lambda: all(store.batch_set_v1(keys, idx)))
        assert store.batch_exists(keys) == 4
        server.kill()  # no SIGTERM flush: memory-level blocks are gone
        out = dst.alloc(4 * PAGE)
        store.register_mem_pool_host(dst)
        assert store.batch_get_v1(keys, out) == [False] * 4
        assert store.batch_exists(keys) == 0
        server.start()
        store.register_mem_pool_host(src)
        assert _eventually(lambda: all(store.batch_set_v1(keys, idx)))
        store.register_mem_pool_host(dst)
        assert store.batch_get_v1(keys, out) == [True] * 4
        assert pages(dst, out) == pages(src, idx)
    finally:
        server.kill()


def _eventually(check: Any, timeout: float = 20.0) -> bool:
    """Poll ``check`` until it holds (the link retries every 50 ms here)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)  # bounded poll on a user-visible answer
    return False


def test_dcp_shards_of_an_mla_page_get_their_own_namespace() -> None:
    """Under decode context parallelism each DCP rank writes its own shard of
    an MLA page under the same page key: the shards must not overwrite each other."""
    adapter: Any = quiet_import("kvstore.integrations.sglang")

    def config(tp_rank: int, dcp_rank: int, dcp_size: int, tp_size: int = 4) -> Any:
        return hicache.HiCacheStorageConfig(
            tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
            attn_cp_size=1, is_mla_model=True, enable_storage_metrics=False,
            is_page_first_layout=True, model_name="deepseek-ai/DeepSeek-V3",
            dcp_size=dcp_size, dcp_rank=dcp_rank,
            logical_page_size=64 if dcp_size > 1 else None)

    shards = {adapter.namespace_for(config(r, r, 2)) for r in range(2)}
    assert len(shards) == 2
    # The same shard in another DCP group is the same bytes: one namespace.
    assert adapter.namespace_for(config(2, 0, 2)) == adapter.namespace_for(config(0, 0, 2))
    # Without DCP an MLA model keeps one namespace for every rank, as before.
    assert adapter.namespace_for(config(0, 0, 1)) == adapter.namespace_for(config(3, 0, 1))
    assert adapter.namespace_for(config(0, 0, 1)) == "sglang.deepseek-ai-DeepSeek-V3"
    assert all(ns not in shards for ns in [adapter.namespace_for(config(0, 0, 1))])


def test_every_tp_rank_keeps_its_own_namespace() -> None:
    """A long model path cut at 128 characters lost the ``.tp<r>of<n>``
    suffix, and a ``kvstore_namespace`` setting (the same on every rank)
    replaced it: either way rank 1 read rank 0's pages."""
    adapter: Any = quiet_import("kvstore.integrations.sglang")

    def config(tp_rank: int, model: str) -> Any:
        return hicache.HiCacheStorageConfig(
            tp_rank=tp_rank, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0,
            attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
            is_page_first_layout=True, model_name=model)

    long = "/models/" + "meta-llama--Llama-3.1-8B-Instruct-" * 4
    assert len({adapter.namespace_for(config(r, long)) for r in (0, 1)}) == 2
    custom = {adapter.namespace_for(config(r, "m"), "team-a") for r in (0, 1)}
    assert custom == {"team-a.tp0of2", "team-a.tp1of2"}


def test_a_hybrid_models_sidecar_pool_is_refused_at_attach(shm_server: ServerProcess) -> None:
    store = backend(shm_server.unix_target, v1=True)
    store.register_mem_pool_host(host_pool("page_first"))
    with pytest.raises(NotImplementedError, match=r"mamba.*batch_\*_v2"):
        store.register_mem_host_pool_v2(host_pool("page_first"), "mamba")


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_mla_pages_v1_and_legacy_store_the_same_bytes(shm_server: ServerProcess,
                                                      layout: str) -> None:
    """An MLA pool's layer_first page is one piece per layer, already the
    legacy flat page's order: v1 must store it as it is (it used to reorder
    it as if its pieces were K/V pairs)."""
    src, dst = mla_host_pool(layout), mla_host_pool(layout)
    writer = backend(shm_server.unix_target, v1=True, layout=layout, mla=True)
    writer.register_mem_pool_host(src)
    keys = page_hashes(3, "mla" + layout)
    idx = src.alloc(3 * PAGE)
    fill(src, idx, seed=5)
    assert all(writer.batch_set_v1(keys, idx))
    reader = backend(shm_server.unix_target, v1=False, layout=layout, mla=True)
    reader.register_mem_pool_host(dst)
    got = reader.batch_get(keys, [dst.get_dummy_flat_data_page() for _ in keys])
    want = [src.get_data_page(int(idx[i * PAGE])) for i in range(3)]
    assert all(torch.equal(g.view(torch.uint8), w.contiguous().view(torch.uint8))
               for g, w in zip(got, want, strict=True))
    # And back: legacy pages read by v1 into a fresh pool.
    legacy_keys = page_hashes(2, "mla-legacy" + layout)
    legacy = backend(shm_server.unix_target, v1=False, layout=layout, mla=True)
    legacy.register_mem_pool_host(src)
    assert legacy.batch_set(legacy_keys, want[:2])
    out = dst.alloc(2 * PAGE)
    v1_reader = backend(shm_server.unix_target, v1=True, layout=layout, mla=True)
    v1_reader.register_mem_pool_host(dst)
    assert v1_reader.batch_get_v1(legacy_keys, out) == [True, True]
    assert pages(dst, out) == pages(src, idx)[:2]
