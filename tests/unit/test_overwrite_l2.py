"""An overwrite of a block held in L2: what reaches the L2 writer, in order.
A kill -9 can land between any two of the writer's transactions, so the
order is what decides what a restart finds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import load
from kvstore.store import TieredStore
from kvstore.types import AckLevel


def _store(tmp_path: Path) -> TieredStore:
    return TieredStore(load(env={"KVSTORE_DATA_DIR": str(tmp_path / "data"),
                                 "KVSTORE_L1_CAPACITY": "8MiB", "KVSTORE_L1_PREFAULT": "false",
                                 "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"}))


@pytest.mark.parametrize("ack", [AckLevel.LOCAL, AckLevel.MEMORY])
def test_an_overwrite_never_leaves_l2_without_either_block(tmp_path: Path,
                                                           ack: AckLevel) -> None:
    """Acknowledged at local, an overwrite's own L2 write replaces the old
    copy in one transaction: no delete of the old copy goes first (the old
    block, acknowledged at local, was lost to a kill between that delete and
    the write, for an overwrite never acknowledged: an outside soak lost 3 of
    12). Acknowledged at memory, the delete goes first and is committed before
    the answer (an answered overwrite never comes back old); a Delete of a
    block whose overwrite left the old bytes still removes them."""

    async def go() -> None:
        store = _store(tmp_path)
        await store.start()
        assert store.l2 is not None
        try:
            await store.put_bytes("ns", b"k", b"old" * 100_000, ack=AckLevel.LOCAL)
            seen: list[str] = []
            submit = store.l2.submit

            def record(block: Any, data: Any, meta: Any, done: Any) -> None:
                if block == ("ns", b"k"):
                    seen.append("delete" if data is None else "write")
                submit(block, data, meta, done)

            store.l2.submit = record  # type: ignore[method-assign]
            await store.put_bytes("ns", b"k", b"new" * 100_000, ack=ack)
            if ack == AckLevel.LOCAL:
                assert seen == ["write"]
            else:
                assert seen[:1] == ["delete"]
            assert await store.get_bytes("ns", b"k") == b"new" * 100_000
            if ack == AckLevel.LOCAL:
                # The same before the write is queued: a Delete then removes the
                # old bytes the overwrite had left for its write.
                seen.clear()
                writer = await store.begin_put("ns", b"k", 10, None)
                writer.write(b"x" * 10)
                entry = writer.commit(written_next=True)
                assert entry.replaces_l2 and seen == []
                assert await store.delete("ns", [b"k"]) == 1
                assert seen == ["delete"]
        finally:
            await store.close()
        reopened = _store(tmp_path)
        await reopened.start()
        try:
            # local: deleted, never back old; memory: the answered overwrite, flushed at close
            expected = None if ack == AckLevel.LOCAL else b"new" * 100_000
            assert await reopened.get_bytes("ns", b"k") == expected
        finally:
            await reopened.close()

    asyncio.run(go())
