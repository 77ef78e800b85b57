"""An in-process dict as an LMCache remote connector: the framework's own ceiling.

Put copies each chunk's bytes into a dict; get allocates a memory object from
the local CPU backend and copies them back. No I/O, no serialisation beyond
LMCache's own: what is left is LMCache's remote-backend path plus two memcpys.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector


class DictConnector(RemoteConnector):
    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any,
                 config: Any) -> None:
        super().__init__(config, local_cpu_backend.metadata)
        self.local_cpu_backend = local_cpu_backend
        self.data: dict[str, bytes] = {}

    def _get(self, key: Any) -> Any:
        data = self.data.get(key.to_string())
        if data is None:
            return None
        obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
        memoryview(obj.byte_array).cast("B")[: len(data)] = data
        return self.reshape_partial_chunk(obj, len(data))

    async def exists(self, key: Any) -> bool:
        return key.to_string() in self.data

    def exists_sync(self, key: Any) -> bool:
        return key.to_string() in self.data

    async def get(self, key: Any) -> Any:
        return self._get(key)

    async def put(self, key: Any, memory_obj: Any) -> None:
        self.data[key.to_string()] = bytes(memoryview(memory_obj.byte_array).cast("B"))

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[Any], memory_objs: list[Any]) -> None:
        for key, obj in zip(keys, memory_objs, strict=True):
            await self.put(key, obj)

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[Any]) -> list[Any]:
        return [self._get(k) for k in keys]

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[Any]) -> int:
        for i, key in enumerate(keys):
            if key.to_string() not in self.data:
                return i
        return len(keys)

    async def list(self) -> list[str]:
        return list(self.data)

    async def close(self) -> None:
        self.data.clear()
