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


def _config(tmp_path: Path) -> Any:
    return load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "1MiB",
                     "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})


@pytest.mark.parametrize("call", sorted([*CALLS, "lookup"]))
def test_a_request_of_too_many_keys_is_refused_before_acting(tmp_path: Path, call: str) -> None:
    """One request names at most MAX_KEYS_PER_REQUEST keys: what it costs the event
    loop, and the key list the policy and Prefetch remember per session, stay small."""
    from kvstore.errors import InvalidArgument
    from kvstore.types import MAX_KEYS_PER_REQUEST

    calls = {**CALLS, "lookup": lambda s, keys: s.lookup("ns", keys, 0, "session")}

    async def go() -> None:
        store = TieredStore(_config(tmp_path))
        await store.start()
        try:
            await store.put_bytes("ns", b"kept", b"value")
            keys = [b"kept"] + [i.to_bytes(4, "little") for i in range(MAX_KEYS_PER_REQUEST)]
            with pytest.raises(InvalidArgument, match=f"names {MAX_KEYS_PER_REQUEST + 1} keys"):
                result = calls[call](store, keys)
                if isinstance(result, Awaitable):
                    await result
            assert await store.get_bytes("ns", b"kept") == b"value"
            result = calls[call](store, keys[:MAX_KEYS_PER_REQUEST])  # at the bound: fine
            if isinstance(result, Awaitable):
                await result
        finally:
            await store.close()

    asyncio.run(go())


def test_session_key_lists_kept_for_prefetch_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys of each session's latest Lookup (Prefetch by session) are bounded over
    all sessions: the least recently active sessions' lists go first."""
    from kvstore.store import leases

    monkeypatch.setattr(leases, "_SESSION_KEYS_KEPT", 10)

    async def go() -> None:
        store = TieredStore(_config(tmp_path))
        await store.start()
        try:
            for name in ("a", "b", "c"):
                await store.put_bytes("ns", name.encode(), b"v" * 10)
                keys = [name.encode()] + [f"{name}{i}".encode() for i in range(3)]
                await store.lookup("ns", keys, 0, name)
            assert store.prefetch("ns", "a", []) == (0, 0)  # a's list went first
            assert store.prefetch("ns", "c", []) == (1, 10)
            assert store.prefetch("ns", "b", []) == (1, 10)
        finally:
            await store.close()

    asyncio.run(go())


def test_an_ended_sessions_key_list_goes_at_its_end(tmp_path: Path) -> None:
    """An outside soak: each session's latest Lookup keys stayed until 10,000
    later sessions (or 2^20 keys) pushed them out, ended sessions included
    (~110 B a key, not in the memory budget). A SessionEnd drops them."""
    from kvstore.types import SessionEnd, SessionEvent

    async def go() -> None:
        store = TieredStore(_config(tmp_path))
        await store.start()
        try:
            await store.put_bytes("ns", b"a", b"v" * 10)
            await store.lookup("ns", [b"a", b"a1"], 0, "s1")
            assert store.leases._session_keys == 2
            store.session_event(SessionEvent("ns", "s1", SessionEnd()))
            assert store.leases._session_keys == 0
            assert store.prefetch("ns", "s1", []) == (0, 0)
        finally:
            await store.close()

    asyncio.run(go())
