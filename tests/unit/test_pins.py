"""Pins stay bounded: those of deleted blocks are dropped, not kept for their TTL."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvstore.config import load
from kvstore.store import TieredStore


def test_pins_of_deleted_blocks_do_not_pile_up(tmp_path: Path) -> None:
    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "8MiB",
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_ENABLED": "false",
                       "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        try:
            for round_ in range(20):
                keys = [f"r{round_}-{i}".encode() for i in range(100)]
                for k in keys:
                    await store.put_bytes("ns", k, b"v")
                assert await store.pin("ns", keys, 600_000) == (100, 100)
                await store.delete("ns", keys)
            leases = store.leases
            # The last round's pins at most (the earlier ones went when "ns" pinned again).
            assert leases._pin_count <= 100
            assert sum(map(len, leases._pins.values())) == leases._pin_count
            assert len(store.policy._pins) <= 100  # the policy's copy too
        finally:
            await store.close()

    asyncio.run(go())
