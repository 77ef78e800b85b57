"""LMCache: kvstore loaded through remote_storage_plugins by LMCache's own engine;
store in one LMCacheEngine, retrieve in a fresh one, byte for byte."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import quiet_import
from serverproc import ServerProcess

lm: Any = quiet_import("engines.lmcache_engine")
torch: Any = quiet_import("torch")

CHUNK, LAYERS, HIDDEN, TOKENS = 16, 4, 64, 512


def config(target: str, **extra: Any) -> dict[str, Any]:
    return lm.plugin_config("kvstore", "kvstore.integrations.lmcache", "KVStoreConnector",
                            CHUNK, 0.05, target=target, retry_s=0.05, **extra)


def engine(target: str, **extra: Any) -> Any:
    e = lm.Engine(config(target, **extra), layers=LAYERS, hidden=HIDDEN, tokens=TOKENS)
    gen = torch.Generator().manual_seed(7)
    e.kv.copy_(torch.randn(e.kv.shape, generator=gen).to(e.kv.dtype))
    return e


def ours(e: Any) -> Any:
    conn = e.connector()
    return getattr(conn, "_connector", conn)


@pytest.fixture
def engines() -> Any:
    made: list[Any] = []

    def make(target: str, **extra: Any) -> Any:
        made.append(engine(target, **extra))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_store_then_retrieve_in_a_fresh_engine(shm_server: ServerProcess, engines: Any,
                                               path: str) -> None:
    target = shm_server.unix_target if path == "shm" else shm_server.tcp
    writer = engines(target)
    assert type(ours(writer)).__name__ == "KVStoreConnector"
    tokens = torch.arange(200)  # 12 full chunks and a partial one
    writer.store(tokens)
    reader = engines(target)
    assert _eventually(lambda: reader.lookup(tokens) == 200)
    assert ours(reader).link(next(iter(ours(reader)._links))).same_host == (path == "shm")
    assert reader.retrieve(tokens) == 200
    assert torch.equal(reader.kv[:, :, :200], writer.kv[:, :, :200])
    # Prefix semantics: a longer prompt with the same start hits its stored part.
    longer = torch.cat([tokens, torch.arange(1000, 1100)])
    assert reader.lookup(longer) == 192  # 200 tokens stored; the partial chunk ends the match
    other = torch.arange(5000, 5100)
    assert reader.lookup(other) == 0


def test_kvstore_down_at_start_then_restart_midway(tmp_path: Path, engines: Any) -> None:
    arena = f"/dev/shm/kvstore-engines-lm-{tmp_path.name}"
    server = ServerProcess(tmp_path / "kv", "--l1-shm-path", arena, l1_capacity="64MiB")
    target = f"unix:{tmp_path / 'kv' / 'kvstore.sock'}"
    writer = engines(target)  # kvstore not started yet: the engine starts anyway
    tokens = torch.arange(96)
    writer.store(tokens)  # goes nowhere, raises nothing
    fresh = engines(target)
    assert fresh.lookup(tokens) == 0
    assert fresh.retrieve(tokens) == 0
    try:
        server.start()
        tokens2 = torch.arange(300, 396)
        assert _eventually(lambda: (writer.store(tokens2), fresh.lookup(tokens2))[1] == 96)
        server.kill()  # memory-level blocks are lost with it
        later = engines(target)
        assert later.lookup(tokens2) == 0
        assert later.retrieve(tokens2) == 0
        server.start()
        assert _eventually(lambda: (writer.store(tokens2), later.lookup(tokens2))[1] == 96)
        again = engines(target)
        assert again.retrieve(tokens2) == 96
        assert torch.equal(again.kv[:, :, :96], writer.kv[:, :, :96])
    finally:
        server.kill()


def _eventually(check: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)  # bounded poll on a user-visible answer
    return False


def test_a_plugin_of_another_name_reads_its_own_settings(shm_server: ServerProcess) -> None:
    """LMCache does not tell a plugin class its name: settings under
    ``remote_storage_plugin.mykv.*`` must still be the ones used."""
    cfg = lm.plugin_config("mykv", "kvstore.integrations.lmcache", "KVStoreConnector",
                           CHUNK, 0.05, target=shm_server.tcp, retry_s=0.05)
    made = [lm.Engine(cfg, layers=LAYERS, hidden=HIDDEN, tokens=TOKENS) for _ in range(2)]
    try:
        writer, reader = made
        gen = torch.Generator().manual_seed(11)
        writer.kv.copy_(torch.randn(writer.kv.shape, generator=gen).to(writer.kv.dtype))
        assert ours(writer)._base.target == shm_server.tcp
        tokens = torch.arange(2000, 2064)
        writer.store(tokens)
        assert _eventually(lambda: reader.lookup(tokens) == 64)
        assert reader.retrieve(tokens) == 64
        assert torch.equal(reader.kv[:, :, :64], writer.kv[:, :, :64])
    finally:
        for e in made:
            e.close()


def test_settings_it_cannot_serve_are_refused_at_start(shm_server: ServerProcess) -> None:
    adapter: Any = quiet_import("kvstore.integrations.lmcache")
    lmconfig: Any = quiet_import("lmcache.v1.config")

    def connector(**changes: Any) -> Any:
        raw = {**config(shm_server.tcp), **changes}
        cfg = lmconfig.LMCacheEngineConfig.from_dict(raw)
        return adapter.KVStoreConnector(loop=None, local_cpu_backend=None, config=cfg)

    with pytest.raises(ValueError, match="use_layerwise"):
        connector(use_layerwise=True)
    with pytest.raises(ValueError, match="remote_serde 'cachegen'"):
        connector(remote_serde="cachegen")
    two = lm.plugin_config("kvstore.a", "kvstore.integrations.lmcache", "KVStoreConnector",
                           CHUNK, 0.05)
    two["remote_storage_plugins"].append("kvstore.b")
    two["extra_config"]["remote_storage_plugin.kvstore.b.module_path"] = (
        "kvstore.integrations.lmcache")
    with pytest.raises(ValueError, match=r"kvstore\.a, kvstore\.b"):
        adapter.KVStoreConnector(loop=None, local_cpu_backend=None,
                                 config=lmconfig.LMCacheEngineConfig.from_dict(two))


def test_the_session_id_a_request_can_carry() -> None:
    adapter: Any = quiet_import("kvstore.integrations.lmcache")
    utils: Any = quiet_import("lmcache.utils")
    key = utils.CacheEngineKey("m", 1, 0, 123, torch.bfloat16,
                               request_configs={"lmcache.kvstore.session_id": "agent-1"})
    assert adapter.session_of([key]) == "agent-1"
    assert key.tags is None  # not part of LMCache's own chunk key: its caches stay shared


def test_workers_of_a_long_model_path_keep_their_own_namespaces() -> None:
    """vLLM passes the model as LMCache's model name, often a local snapshot
    path: cut at 128 characters, the world size, worker and dtype after it
    were lost, and worker 1 read worker 0's KV."""
    adapter: Any = quiet_import("kvstore.integrations.lmcache")
    utils: Any = quiet_import("lmcache.utils")
    model = "/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B-Instruct/" \
            "snapshots/0e9e39f249a16976918f6564b8830bc894c89659"
    names = {adapter.namespace_of(utils.CacheEngineKey(model, 2, w, 123, dtype))
             for w in (0, 1) for dtype in (torch.bfloat16, torch.float16)}
    assert len(names) == 4
    assert all(len(n) <= 128 for n in names)


def test_a_get_lmcache_gave_up_on_hands_its_buffers_back(shm_server: ServerProcess,
                                                          engines: Any) -> None:
    """LMCache cancels a get that outlasts its timeout; the thread doing the
    read still finishes, and the memory objects it took go back to LMCache's
    CPU buffer instead of leaking."""
    import asyncio
    import threading

    conn = ours(engines(shm_server.unix_target))
    release = threading.Event()
    taken: list[Any] = []

    def slow_get(keys: list[Any]) -> list[Any]:
        objs = [conn.local_cpu_backend.allocate(conn.meta_shapes, conn.meta_dtypes,
                                                conn.meta_fmt) for _ in keys]
        taken.extend(objs)
        release.wait(10)
        return objs

    conn._get = slow_get

    async def give_up() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.batched_get([object(), object()]), 0.05)
        release.set()
        for _ in range(500):  # the thread ends, then the loop runs the release
            if taken and all(o.get_ref_count() == 0 for o in taken):
                return
            await asyncio.sleep(0.01)

    asyncio.run(give_up())
    assert len(taken) == 2
    assert [o.get_ref_count() for o in taken] == [0, 0]
