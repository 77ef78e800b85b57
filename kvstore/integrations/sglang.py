"""kvstore as an SGLang HiCache storage backend (the L3 under SGLang's host pool).

Launch::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic \\
      --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "kvstore.integrations.sglang", "class_name": "KVStoreHiCache",
        "interface_v1": 1, "kvstore_target": "unix:/run/kvstore/kvstore.sock"}'

SGLang's ``StorageBackendFactory`` imports this class and calls
``cls(storage_config, {})``; the host pool arrives afterwards through
``register_mem_pool_host``. With ``"interface_v1": 1`` the cache controller
calls the zero-copy ``batch_get_v1`` / ``batch_set_v1``: each page moves
between the host pool's own memory (the pointers of
``get_page_buffer_meta``) and kvstore's arena in one copy. Without it, the
legacy ``batch_get`` / ``batch_set`` move flat page tensors. Both store a page
as the same bytes (the legacy flat page: K of every layer, then V), so the two
paths read each other's pages.

Keys: SGLang's page keys are 32-byte hashes in hex; each becomes its 32 raw
bytes. Namespace: ``sglang.<model>.tp<rank>of<size>`` (one per MLA model:
its KV is the same on every TP rank), plus the pipeline, context-parallel and
decode-context-parallel shard, like HiCacheFile's file suffix. Hybrid models
(sidecar pools moved by ``batch_*_v2``) are refused at attach.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
from typing import Any

from kvstore.integrations import engine_missing

try:
    import torch  # type: ignore[import-not-found, unused-ignore]
    from sglang.srt.mem_cache.hicache_storage import (  # type: ignore[import-not-found, unused-ignore]
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )
except ImportError as exc:
    raise engine_missing("sglang", "SGLang (and PyTorch)",
                         "'sglang==0.5.23' (kvstore's sglang extra)") from exc

from kvstore.integrations.link import LinkConfig, StoreLink, bounded_namespace

_NS_BAD = re.compile(r"[^A-Za-z0-9._:-]")


def page_key(key: str) -> bytes:
    """An SGLang page key as a kvstore key: hex hashes as their bytes."""
    if len(key) <= 128 and len(key) % 2 == 0:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if 0 < len(raw) <= 64:
            return raw
    data = key.encode()
    return data if len(data) <= 64 else hashlib.sha256(data).digest()


def namespace_for(cfg: HiCacheStorageConfig, base: str | None = None) -> str:
    """``sglang.<model>`` (or ``base``, the ``kvstore_namespace`` setting)
    followed by the worker's place in the parallel layout: every rank's
    blocks are its own (a ``kvstore_namespace`` replaced the whole name, and
    every rank of a TP group read the others' pages)."""
    model = _NS_BAD.sub("-", (cfg.model_name or "model").replace("/", "-"))
    head = _NS_BAD.sub("-", base) if base else f"sglang.{model}"
    ns = "" if cfg.is_mla_model else f".tp{cfg.tp_rank}of{cfg.tp_size}"
    if cfg.pp_size > 1:
        ns += f".pp{cfg.pp_rank}of{cfg.pp_size}"
    if cfg.attn_cp_size > 1:
        ns += f".cp{cfg.attn_cp_rank}of{cfg.attn_cp_size}"
    dcp_size = getattr(cfg, "dcp_size", 1) or 1
    if dcp_size > 1:
        # Decode context parallel: each DCP rank writes its own shard of an MLA
        # page, and the shard depends on TP size and the logical page size too
        # (HiCacheFile's key suffix names the same four).
        ns += (f".tp{cfg.tp_size}.dcp{getattr(cfg, 'dcp_rank', 0)}of{dcp_size}"
               f".page{getattr(cfg, 'logical_page_size', None)}")
    return bounded_namespace(head, _NS_BAD.sub("-", ns))


def _session(extra_info: HiCacheStorageExtraInfo | None) -> str | None:
    info = extra_info.extra_info if extra_info is not None else None
    if isinstance(info, dict):
        sid = info.get("session_id") or info.get("rid")
        return str(sid) if sid else None
    return None


def _bytes_at(ptr: int, size: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * size).from_address(ptr)).cast("B")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


class KVStoreHiCache(HiCacheStorage):
    """HiCache storage backed by a kvstore server (see the module's docstring).

    Extra-config fields (all optional): ``kvstore_target``,
    ``kvstore_namespace`` (replaces ``sglang.<model>``; the rank suffix is
    kept), ``kvstore_shm`` (auto/on/off), ``kvstore_timeout``,
    ``kvstore_retry_s``, ``kvstore_ack``.
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        extra = storage_config.extra_config or {}
        namespace = namespace_for(storage_config, str(extra.get("kvstore_namespace") or "")
                                  or None)
        self.storage_config = storage_config
        self.link = StoreLink(LinkConfig.from_mapping(extra, prefix="kvstore_",
                                                      namespace=namespace))
        self.mem_pool_host: Any = None
        # An MHA pool's layer_first pieces are K and V of each layer in turn;
        # an MLA pool's are one per layer, already the legacy flat page's order.
        self._kv_pairs = not storage_config.is_mla_model

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        # Hybrid models (Mamba, SWA, DSA and other sidecar pools) move their
        # pools through batch_*_v2, which this backend does not implement:
        # refuse at attach, in one line, rather than fail on the first batch.
        raise NotImplementedError(
            f"kvstore's SGLang backend stores KV pages only (interface_v1 or legacy); "
            f"the hybrid host pool {host_pool_name!s} needs batch_*_v2, which it does not "
            f"implement: use another HiCache backend for hybrid models")

    # -- helpers -------------------------------------------------------------------------

    def _page_pieces(self, host_indices: torch.Tensor, pages: int) -> list[list[memoryview]]:
        """Each page's pieces in the host pool, in the legacy flat-page order."""
        pool = self.mem_pool_host
        ptrs, sizes = pool.get_page_buffer_meta(host_indices)
        per_page = len(ptrs) // pages
        out = []
        for p in range(pages):
            views = [_bytes_at(ptrs[i], sizes[i]) for i in range(p * per_page, (p + 1) * per_page)]
            if self._kv_pairs and getattr(pool, "layout", "") == "layer_first" and per_page > 2:
                views = views[0::2] + views[1::2]  # [K0 V0 K1 V1 ...] -> [K0 K1 ... V0 V1 ...]
            out.append(views)
        return out

    # -- zero-copy interface (interface_v1) ----------------------------------------------------

    def batch_exists(self, keys: list[str],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        return self.link.lookup([page_key(k) for k in keys], _session(extra_info))

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not keys:
            return []
        pieces = self._page_pieces(host_indices, len(keys))
        sizes = self.link.get([page_key(k) for k in keys], pieces, _session(extra_info))
        return [n is not None and n == sum(len(v) for v in p)
                for n, p in zip(sizes, pieces, strict=True)]

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not keys:
            return []
        pieces = self._page_pieces(host_indices, len(keys))
        ok = self.link.put([page_key(k) for k in keys], pieces, _session(extra_info))
        return [ok] * len(keys)

    # -- legacy interface ----------------------------------------------------------------

    def get(self, key: str, target_location: Any = None,
            target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        if not keys:
            return []
        if target_locations is None:
            target_locations = [self.mem_pool_host.get_dummy_flat_data_page() for _ in keys]
        views = [[_tensor_bytes(t)] for t in target_locations]
        sizes = self.link.get([page_key(k) for k in keys], views)
        return [t if n is not None and n == len(v[0]) else None
                for t, v, n in zip(target_locations, views, sizes, strict=True)]

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if not keys:
            return True
        return self.link.put([page_key(k) for k in keys],
                             [[_tensor_bytes(v)] for v in values])

    def exists(self, key: str) -> bool:
        return self.link.lookup([page_key(key)]) == 1

    def clear(self) -> None:
        """kvstore's blocks outlive one engine: clearing is left to kvstore's policy."""

    def close(self) -> None:
        self.link.close()
