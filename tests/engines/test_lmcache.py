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
