"""vLLM: kvstore as a secondary tier loaded by vLLM's OffloadingSpecFactory
(TieringOffloadingSpec, module_path); store, cache reset, promotion, load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import quiet_import
from serverproc import ServerProcess

vm: Any = quiet_import("engines.vllm_manager")
base: Any = quiet_import("vllm.v1.kv_offload.base")
HIT, MISS = base.LookupResult.HIT, base.LookupResult.MISS


@pytest.fixture
def managers() -> Any:
    made: list[Any] = []

    def make(target: str, **fields: Any) -> Any:
        made.append(vm.Manager(vm.tier_config(target, **fields)))
        return made[-1]

    yield make
    for m in made:
        m.close()


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_store_reset_promote_load(shm_server: ServerProcess, managers: Any, path: str) -> None:
    target = shm_server.unix_target if path == "shm" else shm_server.tcp
    m = managers(target)
    assert type(m.tier).__name__ == "KVStoreTier"
    keys = [vm.offload_key(i, path) for i in range(6)]
    payloads = [os.urandom(m.chunk_bytes) for _ in keys]
    req = m.request()
    m.store(req, keys, payloads)
    assert m.tier.link.same_host == (path == "shm")
    m.finish(req)

    # A second engine (its own empty primary tier) finds every chunk in kvstore,
    # promotes it into its primary tier, and reads the same bytes.
    other = managers(target)
    req2 = other.request()
    for key, payload in zip(keys, payloads, strict=True):
        assert other.lookup(key, req2) == HIT
        assert other.read(key, req2) == payload
    assert other.lookup(vm.offload_key(99, "absent"), req2) == MISS
    other.finish(req2)

    # The first engine resets its cache (weights reload): kvstore still has the chunks.
    m.manager.reset_cache()
    m.manager.on_reset_flushed()
    req3 = m.request()
    assert m.lookup(keys[3], req3) == HIT
    assert m.read(keys[3], req3) == payloads[3]
    m.finish(req3)


def test_session_hints_reach_kvstore(shm_server: ServerProcess, managers: Any) -> None:
    m = managers(shm_server.unix_target)
    keys = [vm.offload_key(i, "session") for i in range(2)]
    req = m.request(session_id="agent-7", turn_end="tool_call", expected_gap_ms=1500,
                    tool_name="python")
    m.store(req, keys, [os.urandom(m.chunk_bytes) for _ in keys])
    failures = m.tier.link.failures
    m.finish(req)  # TurnEnd sent from the tier's thread
    m.tier.drain_jobs()
    assert m.tier.link.failures == failures  # the SessionEvent call was accepted


def test_kvstore_down_at_start_then_restart_midway(tmp_path: Path, managers: Any) -> None:
    arena = f"/dev/shm/kvstore-engines-vllm-{tmp_path.name}"
    server = ServerProcess(tmp_path / "kv", "--l1-shm-path", arena, l1_capacity="64MiB")
    target = f"unix:{tmp_path / 'kv' / 'kvstore.sock'}"
    m = managers(target)  # kvstore not running: the engine starts anyway
    keys = [vm.offload_key(i, "restart") for i in range(3)]
    payloads = [os.urandom(m.chunk_bytes) for _ in keys]
    req = m.request()
    m.store(req, keys, payloads)  # the cascade fails quietly
    m.finish(req)
    other = managers(target)
    r = other.request()
    assert other.lookup(keys[0], r) == MISS
    try:
        server.start()
        m.manager.reset_cache()
        m.manager.on_reset_flushed()
        req = m.request()
        m.store(req, keys, payloads)
        m.finish(req)
        assert _hit_eventually(other, keys[0])
        server.kill()
        assert other.lookup(keys[1], other.request()) == MISS
        server.start()
        # The first store after an unnoticed restart may fail (the tier then
        # reconnects); the engine stores again on its next pass.
        assert _stored_eventually(m, keys, payloads, target)
        late = managers(target)
        r = late.request()
        assert late.lookup(keys[2], r) == HIT
        assert late.read(keys[2], r) == payloads[2]
    finally:
        server.kill()


def _hit_eventually(m: Any, key: bytes) -> bool:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if m.lookup(key, m.request(), timeout=5) == HIT:
            return True
        time.sleep(0.02)  # bounded poll on a user-visible answer
    return False


def _stored_eventually(m: Any, keys: list[bytes], payloads: list[bytes], target: str) -> bool:
    """Store through the engine until kvstore holds every key (checked with the SDK)."""
    import time

    from kvstore import Client

    deadline = time.monotonic() + 20
    with Client(target, namespace=m.tier.link.config.namespace) as kv:
        while time.monotonic() < deadline:
            m.manager.reset_cache()
            m.manager.on_reset_flushed()
            req = m.request()
            m.store(req, keys, payloads)
            m.finish(req)
            if kv.lookup([bytes(k) for k in keys]).found == len(keys):
                return True
            time.sleep(0.02)  # bounded retry, as the engine's next store pass would
    return False
