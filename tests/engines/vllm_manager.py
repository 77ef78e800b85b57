"""vLLM's scheduler-side TieringOffloadingManager on the CPU, made by vLLM's own
OffloadingSpecFactory from a kv_connector_extra_config, for tests and benches."""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from vllm.v1.kv_offload import config as oc
    from vllm.v1.kv_offload.base import (
        LookupResult,
        ReqContext,
        ScheduleEndContext,
        make_offload_key,
    )
    from vllm.v1.kv_offload.factory import OffloadingSpecFactory

_engines = itertools.count()


def tier_config(target: str, **fields: Any) -> dict[str, Any]:
    return {"type": "KVStoreTier", "module_path": "kvstore.integrations.vllm",
            "target": target, "retry_s": 0.05, **fields}


class Manager:
    """A TieringOffloadingManager with kvstore as its one secondary tier."""

    def __init__(self, tier: dict[str, Any], *, block_bytes: int = 64 * 1024,
                 cpu_bytes: int = 8 << 20) -> None:
        extra = {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": cpu_bytes,
                 "block_size": 16, "secondary_tiers": [tier], "tier_poll_interval_s": 0}
        config = oc.OffloadingConfig(
            groups=(oc.OffloadingGroupConfig(tokens_per_block=16, layer_names=("l0",),
                                             group_id=0),),
            worker_kv_bytes_per_block=block_bytes, enable_kv_cache_events=False,
            extra_config=extra, engine_id=f"kvstore-test-{next(_engines)}-{time.time_ns()}",
            model=oc.OffloadingModelConfig(name="meta-llama/Llama-3-8B", dtype="bfloat16"),
            cache=oc.OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
            parallel=oc.OffloadingParallelConfig(
                rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
                is_parallelism_agnostic=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.spec = OffloadingSpecFactory.create_spec(config)
            self.manager = self.spec.get_manager()
        self.tier = self.manager.secondary_tiers[0]
        self.view = self.manager.primary_tier.get_kv_memoryview().cast("B")
        self.chunk_bytes = self.tier.block_size_bytes
        self._reqs = itertools.count()

    def request(self, **params: Any) -> ReqContext:
        req = ReqContext(req_id=f"req-{next(self._reqs)}", kv_transfer_params=params or None)
        self.manager.on_new_request(req)
        return req

    def chunk(self, chunk_id: int) -> memoryview:
        return self.view[chunk_id * self.chunk_bytes:(chunk_id + 1) * self.chunk_bytes]

    def step(self) -> None:
        self.manager.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))

    def settle(self, timeout: float = 30.0) -> None:
        """Step the scheduler until no tier job is in flight."""
        deadline = time.monotonic() + timeout
        self.step()
        while self.manager.has_pending_work():
            if time.monotonic() > deadline:
                raise TimeoutError("tier jobs still pending")
            time.sleep(0.005)  # scheduler steps; the bound above ends the wait
            self.step()

    def store(self, req: ReqContext, keys: list[bytes], payloads: list[bytes]) -> None:
        """GPU -> primary (the bytes written into the primary's chunks) -> kvstore."""
        out = self.manager.prepare_store(keys, req)
        assert out is not None
        ids = list(out.store_spec.chunk_ids)
        by_key = dict(zip(keys, payloads, strict=True))
        for key, cid in zip(out.keys_to_store, ids, strict=True):
            self.chunk(int(cid))[:] = by_key[key]
        self.manager.complete_store(out.keys_to_store, req)
        self.settle()

    def lookup(self, key: bytes, req: ReqContext, until: Callable[[Any], bool] | None = None,
               timeout: float = 30.0) -> Any:
        """vLLM's lookup, stepped until it is no longer RETRY / HIT_PENDING."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.manager.lookup(key, req)
            if result not in (LookupResult.RETRY, LookupResult.HIT_PENDING):
                return result
            if time.monotonic() > deadline:
                return result
            time.sleep(0.005)  # scheduler steps; the bound above ends the wait
            self.step()

    def read(self, key: bytes, req: ReqContext) -> bytes:
        spec = self.manager.prepare_load([key], req)
        [cid] = list(spec.chunk_ids)
        data = bytes(self.chunk(int(cid)))
        self.manager.complete_load([key], req)
        return data

    def finish(self, req: ReqContext) -> None:
        self.manager.on_request_finished(req)
        self.settle()

    def close(self) -> None:
        self.view.release()
        self.manager.shutdown()


def offload_key(i: int, salt: str = "") -> Any:
    import hashlib

    return make_offload_key(hashlib.sha256(f"{salt}{i}".encode()).digest(), 0)
