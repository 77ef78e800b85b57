"""The store's per-tier occupancy counters stay equal to a recount of its
index through random puts, overwrites, reads (promotions), deletes and
evictions with both tiers under pressure."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from kvstore.config import load
from kvstore.store import TieredStore
from kvstore.types import TierName


def recount(store: TieredStore) -> dict[TierName, list[int]]:
    # The index's by-namespace view holds exactly the same entries.
    assert {(ns, k): e for ns, keys in store.index.blocks.by_namespace.items()
            for k, e in keys.items()} == dict(store.index.blocks)
    held = {t: [0, 0] for t in TierName}
    for e in store.index.blocks.values():
        for tier, present in ((TierName.L1, e.l1_offset >= 0), (TierName.L2, e.l2),
                              (TierName.L3, e.l3)):
            if present:
                held[tier][0] += 1
                held[tier][1] += e.size
    for record in store.index.cold.records() if store.index.cold is not None else ():
        # The compact index holds blocks that are in L2 (and maybe L3) only.
        for tier, present in ((TierName.L2, True), (TierName.L3, record.l3)):
            if present:
                held[tier][0] += 1
                held[tier][1] += record.size
    return held


@pytest.mark.parametrize("compact", ["true", "false"])
def test_counters_match_the_index(tmp_path: Path, compact: str) -> None:
    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "2MiB",
                       "KVSTORE_L2_COMPACT_INDEX": compact,
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "3MiB",
                       "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        rng = random.Random(7)
        keys = [f"k{i}".encode() for i in range(40)]
        most_cold = 0
        for step in range(600):
            key = rng.choice(keys)
            op = rng.random()
            if op < 0.5:
                await store.put_bytes("ns", key, os.urandom(rng.choice([4096, 70_000, 300_000])),
                                      ack=rng.choice([1, 1, 2]))  # type: ignore[arg-type]
            elif op < 0.85:
                await store.get_bytes("ns", key)
            else:
                await store.delete("ns", [key])
            most_cold = max(most_cold,
                            len(store.index.cold) if store.index.cold is not None else 0)
            if step % 50 == 0:
                await asyncio.sleep(0)  # let L2 commit callbacks run in between
                assert store.counts.held == recount(store)
        assert store.l2 is not None
        await asyncio.get_running_loop().run_in_executor(None, store.l2.flush_sync)
        await asyncio.sleep(0)
        assert store.counts.held == recount(store)
        assert store.index.busy_pins == 0
        assert (most_cold > 0) == (compact == "true")  # the compact index was exercised
        stats = store.stats()
        assert stats.tiers[0].bytes <= 2 * 1024 * 1024
        await store.close()

    asyncio.run(go())
