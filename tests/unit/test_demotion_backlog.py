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


def hold_uploads(mover: Any) -> asyncio.Event:
    """Hold the object store's uploads until the event returned is set."""
    gate = asyncio.Event()
    real_put = mover.tier.put

    async def held_put(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await real_put(*args, **kwargs)

    mover.tier.put = held_put
    return gate


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
        gate = hold_uploads(mover)
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
    the larger of capacity x (1 + l3.outage_spill) and capacity + the
    demotions in flight (here the first: a small upload queue)."""
    env = {"KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "1MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "2MiB",
           "KVSTORE_L3_WRITE_QUEUE_BYTES": "512KiB", "KVSTORE_L2_WRITE_QUEUE_BYTES": "64MiB",
           "KVSTORE_L3_URL": f"file://{tmp_path}/l3", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"}

    async def go() -> None:
        store = TieredStore(load(env=env))
        await store.start()
        assert store.l2 is not None and store.l3 is not None and store.writeback is not None
        mover = store.l3
        gate = hold_uploads(mover)  # the object store takes no upload: L3 is "slow"
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


def test_a_read_of_another_version_never_deletes_it(tmp_path: Path) -> None:
    """A review of this try's first fix, which deleted an intact L3 object of
    another version when its header's time was older than the reader's
    entry: B put K at local (t0), A then put K at remote (t1 > t0), B's L2
    demoted its K to L3 (header t0) over A's object; A's read took it for
    stale and deleted it -- B's acknowledged block, in L3 only, was gone."""
    l3 = f"file://{tmp_path}/l3"

    def env(name: str, l2: bool = True) -> dict[str, str]:
        e = {"KVSTORE_DATA_DIR": str(tmp_path / name), "KVSTORE_L1_CAPACITY": "1MiB",
             "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "2MiB",
             "KVSTORE_L3_URL": l3, "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
             "KVSTORE_L3_LIST_ON_START": "false"}
        if not l2:
            e["KVSTORE_L2_ENABLED"] = "false"
        return e

    async def go() -> None:
        key, block = b"K" * 16, ("ns", b"K" * 16)
        a = TieredStore(load(env=env("a", l2=False)))
        b = TieredStore(load(env=env("b")))
        await a.start()
        await b.start()
        try:
            await b.put_bytes("ns", key, b"\x02" * (64 * KiB), ack=AckLevel.LOCAL)
            await a.put_bytes("ns", key, b"\x01" * (64 * KiB), ack=AckLevel.REMOTE)
            for i in range(40):  # A's K leaves its L1: L3 only
                await a.put_bytes("ns", b"f%03d" % i, b"\x07" * (64 * KiB))
            for i in range(80):  # B's L2 fills: its K is demoted over A's object
                await b.put_bytes("ns", b"g%03d" % i, b"\x08" * (64 * KiB), ack=AckLevel.LOCAL)
            for _ in range(200):  # (bounded: the demotion lands)
                e = b.index.entry(block)
                if e is not None and e.l3 and not e.l2 and e.l1_offset < 0:
                    break
                await asyncio.sleep(0.05)
            await a.get_bytes("ns", key)  # another version: a miss, nothing deleted
            assert a.l3 is not None
            await a.l3.deletes_landed([block], 5.0)  # (what A would have deleted, done)
            assert await b.get_bytes("ns", key) == b"\x02" * (64 * KiB)
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())
