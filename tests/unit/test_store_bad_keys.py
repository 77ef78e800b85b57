"""Every store call that takes many keys rejects a bad one before acting, and
names it by its position (what the client shows the user)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import load
from kvstore.errors import InvalidKey
from kvstore.store import TieredStore

CALLS: dict[str, Callable[[TieredStore, list[bytes]], Any]] = {
    "delete": lambda s, keys: s.delete("ns", keys),
    "prefetch": lambda s, keys: s.prefetch("ns", "session", keys),
    "pin": lambda s, keys: s.pin("ns", keys, 1000),
    "unpin": lambda s, keys: s.unpin("ns", keys),
}


@pytest.mark.parametrize("bad, says", [(b"", "key is empty (key #1)"),
                                       (b"k" * 65, "key is 65 bytes (key #1)")])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_bad_key_is_named_by_position(tmp_path: Path, call: str, bad: bytes, says: str) -> None:
    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "1MiB",
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        try:
            await store.put_bytes("ns", b"kept", b"value")
            with pytest.raises(InvalidKey) as info:
                result = CALLS[call](store, [b"kept", bad])
                if isinstance(result, Awaitable):
                    await result
            assert says in str(info.value)
            assert await store.get_bytes("ns", b"kept") == b"value"
        finally:
            await store.close()

    asyncio.run(go())
