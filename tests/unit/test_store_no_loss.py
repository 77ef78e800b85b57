"""Nothing acknowledged is lost while blocks move through all three tiers:
random puts (memory, local and remote acks), overwrites, reads, lookups with leases,
prefetches and deletes, with L1 and L2 both under pressure, so blocks keep
cooling into the compact index, warming out of it and being demoted to L3
(a file:// object store). After every step each live key reads back as its
last acknowledged value, and at the end after a restart too."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from kvstore.config import load
from kvstore.errors import CapacityExhausted
from kvstore.store import TieredStore
from kvstore.types import AckLevel


@pytest.mark.parametrize("compact", ["true", "false"])
def test_every_acknowledged_block_reads_back(tmp_path: Path, compact: str) -> None:
    env = {"KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "1MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "2MiB",
           "KVSTORE_L2_COMPACT_INDEX": compact, "KVSTORE_L3_URL": f"file://{tmp_path}/l3",
           "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"}

    async def settle(store: TieredStore) -> None:
        # Let L2 commits and L3 demotions finish (bounded).
        assert store.l2 is not None
        for _ in range(2000):
            await asyncio.get_running_loop().run_in_executor(None, store.l2.flush_sync)
            await asyncio.sleep(0.005)
            if store.l3 is None or not store.l3.queued:
                return
        raise AssertionError("L3 demotions did not finish")

    async def go() -> None:
        rng = random.Random(11)
        store = TieredStore(load(env=env))
        await store.start()
        keys = [f"k{i:03}".encode() for i in range(120)]
        truth: dict[bytes, bytes] = {}
        for step in range(700):
            key = rng.choice(keys)
            op = rng.random()
            if op < 0.45:
                data = rng.randbytes(rng.choice([3000, 40_000, 120_000]))
                try:
                    await store.put_bytes("ns", key, data,
                                          ack=rng.choice([AckLevel.MEMORY, AckLevel.LOCAL,
                                                          AckLevel.REMOTE]))
                except CapacityExhausted:
                    continue  # all of the small L1 leased: refused, nothing changed
                truth[key] = data
            elif op < 0.75:
                assert await store.get_bytes("ns", key) == truth.get(key), f"step {step}"
            elif op < 0.85:
                chain = rng.sample(keys, 8)
                result = await store.lookup("ns", chain, lease_ms=rng.choice([0, 50]))
                for k, tier in zip(chain, result.tiers, strict=True):
                    assert (tier is not None) == (k in truth), f"step {step}"
            elif op < 0.9:
                store.prefetch("ns", "s", rng.sample(keys, 4))
                await asyncio.sleep(0)
            else:
                await store.delete("ns", [key])
                truth.pop(key, None)
            if step % 100 == 99:
                await settle(store)
        await settle(store)
        for key in keys:
            assert await store.get_bytes("ns", key) == truth.get(key)
        await store.close()
        again = TieredStore(load(env=env))
        await again.start()
        if again.l3 is not None:
            await asyncio.wait_for(again.l3.scan_done.wait(), 30)
        for key in keys:
            assert await again.get_bytes("ns", key) == truth.get(key)
        await again.close()

    asyncio.run(go())
