"""A whole LMCacheEngine on the CPU, built from LMCache's own config, for tests and benches.

LMCache's MockGPUConnector copies nothing; ``CPUCopyConnector`` stands in for
the GPU connector with a real copy between a CPU "paged" KV cache
([2, layers, tokens, hidden]) and LMCache's memory objects, so a retrieve in a
fresh engine can be checked byte for byte.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector import GPUConnectorInterface
    from lmcache.v1.metadata import LMCacheMetadata

_ids = itertools.count()


class CPUCopyConnector(GPUConnectorInterface):
    """A GPU connector whose "GPU" cache is a CPU tensor [2, layers, tokens, hidden]."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        memory_obj.tensor.copy_(self.kv[:, :, start:end])

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        self.kv[:, :, start:end].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, s, e in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(obj, s, e)

    def batched_to_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
        for obj, s, e in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(obj, s, e)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.kv.shape[1], num_tokens, self.kv.shape[3]])


def plugin_config(plugin: str, module: str, cls: str, chunk_size: int, cpu_gb: float,
                  **extra: Any) -> dict[str, Any]:
    """An LMCache config dict with one remote storage plugin."""
    return {
        "chunk_size": chunk_size, "local_cpu": True, "max_local_cpu_size": cpu_gb,
        "remote_storage_plugins": [plugin], "save_unfull_chunk": True,
        "extra_config": {f"remote_storage_plugin.{plugin}.module_path": module,
                         f"remote_storage_plugin.{plugin}.class_name": cls,
                         **{f"remote_storage_plugin.{plugin}.{k}": v for k, v in extra.items()}},
    }


class Engine:
    """One LMCacheEngine over a CPU KV cache of ``tokens`` tokens."""

    def __init__(self, config: dict[str, Any], *, layers: int, hidden: int, tokens: int,
                 dtype: torch.dtype = torch.bfloat16, model: str = "meta-llama/Llama-3-8B",
                 remote_only: bool = False) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = LMCacheEngineConfig.from_dict(config)
        chunk = int(config["chunk_size"])
        heads = 8
        meta = LMCacheMetadata(model_name=model, world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=dtype,
                               kv_shape=(layers, 2, chunk, heads, hidden // heads),
                               chunk_size=chunk)
        self.kv = torch.zeros(2, layers, tokens, hidden, dtype=dtype)
        self.instance = f"kvstore-test-{next(_ids)}"
        self.engine = LMCacheEngineBuilder.get_or_create(
            self.instance, cfg, meta, CPUCopyConnector(self.kv),
            lambda t, r: None, lambda o, r: o)
        self.engine.post_init()
        self.remote_only = remote_only

    def remote(self) -> Any:
        """The RemoteBackend LMCache made for the plugin."""
        backends = self.engine.storage_manager.storage_backends
        [name] = [n for n in backends if n.startswith("RemoteBackend")]
        return backends[name]

    def connector(self) -> Any:
        return self.remote().connection

    def store(self, tokens: torch.Tensor) -> None:
        self.engine.store(tokens)

    def lookup(self, tokens: torch.Tensor) -> int:
        return int(self.engine.lookup(tokens))

    def retrieve(self, tokens: torch.Tensor) -> int:
        mask = self.engine.retrieve(tokens)
        return int(mask.sum().item())

    def close(self) -> None:
        LMCacheEngineBuilder.destroy(self.instance)
