"""L2's trim with demotions to L3 in flight (found by an outside review,
session 22): a block on its way to L3 leaves L2 once there, but the trim
counted it as still in L2, so every write that settled while L2 was over
capacity started more demotions (up to ``l3.write_queue_bytes``), and each
of its steps searched for a victim past every block already in flight: with
many small blocks the event loop ran at 100 % of a CPU (40,000 Puts of 4 KiB
through L2 64 MiB onto a ``file://`` L3: 419 s and 420 s of server CPU,
against 9.7 s and 10.8 s once they count as gone)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from kvstore.config import load
from kvstore.store import TieredStore
from kvstore.types import AckLevel

KiB = 1024


def test_a_trim_starts_demotions_for_what_l2_is_over_not_for_all_it_holds(
        tmp_path: Path) -> None:
    env = {"KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "1MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "2MiB",
           "KVSTORE_L2_COMPACT_INDEX": "false", "KVSTORE_L3_URL": f"file://{tmp_path}/l3",
           "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"}

    async def go() -> None:
        store = TieredStore(load(env=env))
        await store.start()
        assert store.l2 is not None and store.l3 is not None
        mover = store.l3
        # The object store takes no upload until told: every demotion stays in flight.
        gate = asyncio.Event()
        real_put = mover.tier.put

        async def held_put(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            return await real_put(*args, **kwargs)

        mover.tier.put = held_put  # type: ignore[method-assign]
        try:
            for i in range(1000):  # 4 MiB of 4 KiB blocks: L1 1 MiB, L2 2 MiB
                await store.put_bytes("ns", b"k%04d" % i, bytes([i % 251]) * (4 * KiB),
                                      ack=AckLevel.LOCAL)
            await asyncio.get_running_loop().run_in_executor(None, store.l2.flush_sync)
            assert store.writeback is not None
            store.writeback.trim()  # (as each settled write does)
            capacity = 2 * 1024 * KiB
            over = store.index.l2_bytes - capacity
            assert over > 0, "L2 was not over its capacity: nothing to check"
            assert mover.demoting <= over + 4 * KiB, (
                f"{mover.demoting // KiB} KiB of demotions started for an L2 "
                f"{over // KiB} KiB over its capacity")
        finally:
            gate.set()
        for i in range(1000):  # and nothing was lost on the way
            assert await store.get_bytes("ns", b"k%04d" % i) == bytes([i % 251]) * (4 * KiB)
        await store.close()

    asyncio.run(go())


def test_l2_stays_bounded_while_l3_is_slower_than_the_writes(tmp_path: Path) -> None:
    """An outside soak: with L3 healthy but slower than the write rate, the
    demotions reached their bound (l3.write_queue_bytes) and the trim then
    waited for them while every write from L1 landed in L2 all the same: 9 GB
    over a 96 MiB capacity in 10 minutes. Past l3.outage_spill the coldest
    blocks now go without an upload, as during an outage: L2 holds at most
    its capacity and l3.outage_spill more."""
    env = {"KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "1MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "2MiB",
           "KVSTORE_L3_WRITE_QUEUE_BYTES": "512KiB", "KVSTORE_L2_WRITE_QUEUE_BYTES": "64MiB",
           "KVSTORE_L3_URL": f"file://{tmp_path}/l3", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"}

    async def go() -> None:
        store = TieredStore(load(env=env))
        await store.start()
        assert store.l2 is not None and store.l3 is not None and store.writeback is not None
        mover = store.l3
        gate = asyncio.Event()  # the object store takes no upload: L3 is "slow"
        real_put = mover.tier.put

        async def held_put(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            return await real_put(*args, **kwargs)

        mover.tier.put = held_put  # type: ignore[method-assign]
        try:
            for i in range(2000):  # 8 MiB of 4 KiB blocks through L1 1 MiB, L2 2 MiB
                await store.put_bytes("ns", b"k%04d" % i, bytes([i % 251]) * (4 * KiB))
                if i % 100 == 99:
                    await asyncio.get_running_loop().run_in_executor(None, store.l2.flush_sync)
                    store.writeback.trim()
            assert mover.healthy
            bound = 3 * 1024 * KiB + 64 * KiB  # capacity x (1 + outage_spill) + a batch
            assert store.index.l2_bytes <= bound, (
                f"L2 holds {store.index.l2_bytes // KiB} KiB, over {bound // KiB} KiB")
        finally:
            gate.set()
        await store.close()

    asyncio.run(go())
