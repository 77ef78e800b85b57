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


def test_the_namespace_follows_every_layout_that_changes_a_chunks_bytes() -> None:
    """A primary-tier chunk is every worker's bytes in rank order: TP 4 and
    TP 2 x PP 2 make chunks of one size and other contents, so they must not
    share keys; data-parallel replicas of one layout should."""
    import dataclasses
    from types import SimpleNamespace

    tier: Any = quiet_import("kvstore.integrations.vllm")
    oc: Any = vm.oc
    group = oc.OffloadingGroupConfig(tokens_per_block=16, layer_names=("l0", "l1"), group_id=0)

    def parallel(tp: int, pp: int, *, dp_index: int = 0, dcp: int = 1) -> Any:
        return oc.OffloadingParallelConfig(
            rank=0, world_size=tp * pp, tp_size=tp, pp_size=pp, pcp_size=1, dcp_size=dcp,
            data_parallel_index=dp_index, data_parallel_size=2, data_parallel_rank_local=None,
            is_parallelism_agnostic=False)

    base_config = oc.OffloadingConfig(
        groups=(group,), worker_kv_bytes_per_block=1 << 16, enable_kv_cache_events=False,
        extra_config={}, engine_id="e0",
        model=oc.OffloadingModelConfig(name="meta-llama/Llama-3-8B", dtype="bfloat16"),
        cache=oc.OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=parallel(4, 1))

    def ns(**changes: Any) -> str:
        name: str = tier._namespace(SimpleNamespace(config=dataclasses.replace(base_config,
                                                                                **changes)))
        assert len(name) <= 128 and name.startswith("vllm.meta-llama-Llama-3-8B.bfloat16.")
        return name

    tp4 = ns()
    assert ns(parallel=parallel(2, 2)) != tp4
    assert ns(parallel=parallel(4, 1, dcp=2)) != tp4
    assert ns(canonical_layout=True, kv_cache_layout="NHD") != tp4
    assert ns(groups=(dataclasses.replace(group, layer_names=("l0",)),)) != tp4
    assert ns(cache=oc.OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=2)) != tp4
    assert ns(parallel=parallel(4, 1, dp_index=1), engine_id="e1") == tp4


def test_a_key_looked_up_again_gets_the_same_answer(shm_server: ServerProcess,
                                                     managers: Any) -> None:
    """vLLM's scheduler looks a key up again in the same call when a
    sliding-window group tightens the hit: the second lookup must answer
    as the first did, not RETRY (which would defer the request at every step)."""
    m = managers(shm_server.unix_target)
    stored, absent = vm.offload_key(1, "again"), vm.offload_key(2, "again")
    req = m.request()
    m.store(req, [stored], [os.urandom(m.chunk_bytes)])
    m.finish(req)
    r = m.request()
    assert m.lookup(absent, r) == MISS
    assert m.manager.lookup(absent, r) == MISS  # no step in between: the same call
    assert m.lookup(stored, r) == HIT
    assert m.manager.lookup(stored, r) == HIT


def test_the_tier_forgets_old_answers(shm_server: ServerProcess, managers: Any) -> None:
    """The answers the tier keeps are those of the last hit_ttl_s, not every
    chunk it ever stored (a long-running scheduler's memory)."""
    m = managers(shm_server.unix_target, hit_ttl_s=0.0)
    payload = os.urandom(m.chunk_bytes)
    r = m.request()
    for batch in range(6):
        keys = [vm.offload_key(i, f"forget{batch}") for i in range(2000)]
        with m.tier._state:
            m.tier._remember(keys, [True] * len(keys))
        assert all(m.tier.lookup(k, r) == HIT for k in keys)  # told once, then past their time
    assert len(m.tier._known) <= 4096
    req = m.request()
    m.store(req, [vm.offload_key(0, "forget-real")], [payload])
    m.finish(req)
    assert len(m.tier._known) <= 4096


def test_lookups_go_before_queued_stores(shm_server: ServerProcess, managers: Any) -> None:
    """The tier's one I/O thread takes a new request's lookups before the
    stores queued ahead of them (a burst of stores must not hold back a time
    to first token); stores keep their order."""
    import threading

    m = managers(shm_server.unix_target)
    tier = m.tier
    order: list[str] = []
    gate = threading.Event()
    tier._do_session = lambda info: gate.wait(10)  # holds the thread while work queues
    tier._do_store = lambda job: (order.append(f"store{job}"), _result(job))[1]
    tier._do_lookups = lambda: order.append("lookup")
    tier._submit(("session", None))
    for i in range(3):
        tier._submit(("store", i))
    tier._submit(("lookup",))
    gate.set()
    tier.drain_jobs()
    assert order == ["lookup", "store0", "store1", "store2"]


def _result(job: int) -> Any:
    tiering: Any = quiet_import("vllm.v1.kv_offload.tiering.base")
    return tiering.JobResult(job_id=job, success=True)
