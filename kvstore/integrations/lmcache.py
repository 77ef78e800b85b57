"""kvstore as an LMCache remote storage plugin (and so for vLLM via LMCacheConnectorV1).

LMCache config (YAML, or the same keys as ``LMCACHE_*`` env / a config dict)::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 5
    remote_storage_plugins: ["kvstore"]
    extra_config:
      remote_storage_plugin.kvstore.module_path: kvstore.integrations.lmcache
      remote_storage_plugin.kvstore.class_name: KVStoreConnector
      remote_storage_plugin.kvstore.target: unix:/run/kvstore/kvstore.sock

LMCache's ``ConnectorManager`` imports the class and wraps it in its
``DynamicConnectorAdapter``, which calls ``cls(loop=, local_cpu_backend=,
config=)``: no metadata is passed, so it is taken from the local CPU backend
(the RemoteBackend needs one anyway). Do not also set ``remote_url`` to a
kvstore scheme: that creates a second RemoteBackend.

Keys: ``CacheEngineKey.to_string()`` can exceed kvstore's 64-byte key limit,
so the model / world size / worker / dtype become the namespace
(``lmcache.<model>.w<world>.<worker>.<dtype>``) and the chunk hash (with any
``lmcache.tag.*`` tags but the session) the key. Session: a request config
``lmcache.kvstore.session_id`` (in vLLM, an entry of the request's
``kv_transfer_params``; vLLM's connector forwards only ``lmcache.*`` entries)
reaches kvstore with every Lookup / Get / Put of that request's chunks.
``lmcache.tag.session_id`` is read too, but LMCache makes every tag part of the
chunk key, so it splits LMCache's own caches per session. Not supported, and
refused at start: ``use_layerwise`` and a ``remote_serde`` other than ``naive``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from typing import Any

from kvstore.integrations import engine_missing

try:
    from lmcache.utils import CacheEngineKey  # type: ignore[import-not-found, unused-ignore]
    from lmcache.v1.memory_management import MemoryObj  # type: ignore[import-not-found, unused-ignore]
    from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector  # type: ignore[import-not-found, unused-ignore]
except ImportError as exc:
    raise engine_missing("lmcache", "LMCache",
                         "'lmcache==0.5.6' (kvstore's lmcache extra)") from exc

from kvstore.integrations.link import LinkConfig, StoreLink, bounded_namespace

_NS_BAD = re.compile(r"[^A-Za-z0-9._:-]")
# Where a request's session id may be, first found wins. vLLM's LMCache
# connector forwards only the ``lmcache.*`` entries of a request's
# kv_transfer_params, and makes every ``lmcache.tag.*`` entry part of the chunk
# key (which splits LMCache's own CPU and disk caches per session), so
# ``lmcache.kvstore.session_id`` is the one to use; the others are read too.
_SESSION_CONFIGS = ("lmcache.kvstore.session_id", "lmcache.tag.session_id",
                    "kvstore.session_id")


def namespace_of(key: CacheEngineKey) -> str:
    model = _NS_BAD.sub("-", key.model_name.replace("/", "-"))
    tail = _NS_BAD.sub("-", f".w{key.world_size}.{key.worker_id}.{key._dtype_str}")
    return bounded_namespace(f"lmcache.{model}", tail)


def key_bytes(key: CacheEngineKey) -> bytes:
    raw = key.chunk_hash_hex
    tags = [f"{k}%{v}" for k, v in (key.tags or ()) if k != "session_id"]
    if tags:
        raw += "@" + "@".join(tags)
    data = raw.encode()
    return data if len(data) <= 64 else hashlib.sha256(data).digest()


def session_of(keys: list[CacheEngineKey]) -> str | None:
    configs = keys[0].request_configs if keys else None
    if configs:
        for name in _SESSION_CONFIGS:
            if configs.get(name):
                return str(configs[name])
    return None


class KVStoreConnector(RemoteConnector):
    """LMCache ``RemoteConnector`` over a kvstore server (see the module's docstring).

    Extra-config fields under ``remote_storage_plugin.<name>.``: ``target``,
    ``shm`` (auto/on/off), ``timeout``, ``retry_s``, ``ack``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any,
                 config: Any, plugin_name: str | None = None) -> None:
        _check_supported(config)
        name = plugin_name or _plugin_name(config)
        super().__init__(config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        extra = config.extra_config or {}
        self._base = LinkConfig.from_mapping(extra, prefix=f"remote_storage_plugin.{name}.",
                                             namespace="lmcache")
        self._links: dict[str, StoreLink] = {}
        self._links_lock = threading.Lock()

    def link(self, namespace: str) -> StoreLink:
        link = self._links.get(namespace)
        if link is None:
            with self._links_lock:
                link = self._links.setdefault(namespace, StoreLink(LinkConfig(
                    target=self._base.target, namespace=namespace, shm=self._base.shm,
                    timeout=self._base.timeout, retry_s=self._base.retry_s,
                    ack=self._base.ack)))
        return link

    def _groups(self, keys: list[CacheEngineKey]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(namespace_of(key), []).append(i)
        return groups

    # -- blocking batch operations (run off the event loop) ------------------------------

    def _contains(self, keys: list[CacheEngineKey]) -> int:
        """How many leading keys are stored: one Lookup per namespace (one in practice)."""
        groups = self._groups(keys)
        if len(groups) == 1:
            [(ns, _)] = groups.items()
            return self.link(ns).lookup([key_bytes(k) for k in keys], session_of(keys))
        present = [False] * len(keys)
        for ns, idx in groups.items():
            hits = self.link(ns).exists([key_bytes(keys[i]) for i in idx], session_of(keys))
            for i, hit in zip(idx, hits, strict=True):
                present[i] = hit
        return present.index(False) if False in present else len(keys)

    def _put(self, keys: list[CacheEngineKey], objs: list[MemoryObj]) -> None:
        for ns, idx in self._groups(keys).items():
            self.link(ns).put([key_bytes(keys[i]) for i in idx],
                              [[_bytes(objs[i])] for i in idx], session_of(keys))

    def _get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        out: list[MemoryObj | None] = [None] * len(keys)
        for ns, idx in self._groups(keys).items():
            objs = [self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes,
                                                    self.meta_fmt) for _ in idx]
            usable = [o for o in objs if o is not None]
            if len(usable) < len(objs):  # the local CPU buffer is full: nothing to read into
                for o in usable:
                    o.ref_count_down()
                continue
            sizes = self.link(ns).get([key_bytes(keys[i]) for i in idx],
                                      [[_bytes(o)] for o in objs], session_of(keys))
            for i, obj, size in zip(idx, objs, sizes, strict=True):
                if size is None or size % self.single_token_size:
                    obj.ref_count_down()
                    continue
                out[i] = self.reshape_partial_chunk(obj, size)
        return out

    # -- RemoteConnector ---------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        return await asyncio.to_thread(self._contains, [key]) == 1

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._contains([key]) == 1

    async def _get_off_loop(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        """``_get`` on a thread. LMCache gives up on a slow get by cancelling
        the coroutine (its get timeout), which cannot stop the thread: the
        memory objects that thread then returns are handed back to LMCache's
        CPU buffer instead of being lost with the answer nobody reads."""
        work = asyncio.ensure_future(asyncio.to_thread(self._get, keys))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(_release_unread)
            raise

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        return (await self._get_off_loop([key]))[0]

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await asyncio.to_thread(self._put, [key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        await asyncio.to_thread(self._put, list(keys), list(memory_objs))

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        return await self._get_off_loop(list(keys))

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        return self._contains(list(keys))

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey],
                                     pin: bool = False) -> int:
        return await asyncio.to_thread(self._contains, list(keys))

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str,
                                       keys: list[CacheEngineKey]) -> list[MemoryObj]:
        """The leading chunks found (LMCache's prefix contract), in one Get."""
        got = await self._get_off_loop(list(keys))
        out: list[MemoryObj] = []
        for obj in got:
            if obj is None:
                break
            out.append(obj)
        for obj in got[len(out):]:
            if obj is not None:
                obj.ref_count_down()
        return out

    async def list(self) -> list[str]:
        return []  # kvstore has no listing by design: the engine never needs one

    async def close(self) -> None:
        for link in list(self._links.values()):
            link.close()

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return False  # eviction is kvstore's policy, not the engine's


def _release_unread(work: asyncio.Future[list[MemoryObj | None]]) -> None:
    if work.cancelled() or work.exception() is not None:
        return
    for obj in work.result():
        if obj is not None:
            obj.ref_count_down()


def _check_supported(config: Any) -> None:
    """Refuse, in one line, the LMCache settings whose objects this connector
    would store under the wrong key or read back in the wrong shape."""
    if getattr(config, "use_layerwise", False):
        # One object per layer under keys that differ only in their layer:
        # the connector keys a whole chunk.
        raise ValueError("kvstore's LMCache connector stores whole chunks: "
                         "use_layerwise: true is not supported")
    serde = getattr(config, "remote_serde", "naive")
    if serde not in (None, "naive"):
        # cachegen / kivi objects are compressed, of any size: the connector
        # reads a chunk back into a full chunk's memory object.
        raise ValueError(f"kvstore's LMCache connector stores raw chunks: remote_serde "
                         f"{serde!r} is not supported (use 'naive')")


def _plugin_name(config: Any) -> str:
    """The plugin name this connector was configured under. LMCache's
    ``DynamicConnectorAdapter`` does not pass it, so it is the one entry of
    ``remote_storage_plugins`` whose ``module_path`` is this module ("kvstore"
    if none is); two such entries cannot be told apart and are refused."""
    extra = config.extra_config or {}
    ours = sorted(name for name in (getattr(config, "remote_storage_plugins", None) or ())
                  if extra.get(f"remote_storage_plugin.{name}.module_path") == __name__)
    if len(ours) > 1:
        raise ValueError(f"remote_storage_plugins names kvstore's connector {len(ours)} times "
                         f"({', '.join(ours)}): LMCache does not tell a plugin its own name, "
                         "so their settings cannot be told apart; configure one")
    return ours[0] if ours else "kvstore"


def _bytes(obj: MemoryObj) -> memoryview:
    view = obj.byte_array
    return (view if isinstance(view, memoryview) else memoryview(view)).cast("B")
