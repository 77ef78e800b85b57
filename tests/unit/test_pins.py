"""Pins stay bounded: those of deleted blocks are dropped, not kept for their TTL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from kvstore.config import load
from kvstore.store import TieredStore
from kvstore.types import AckLevel

MiB = 1024**2


def memory_only(tmp_path: Path) -> Any:
    """An 8 MiB L1 and nothing else."""
    return load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "8MiB",
                     "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_ENABLED": "false",
                     "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})


def test_pins_of_deleted_blocks_do_not_pile_up(tmp_path: Path) -> None:
    config = memory_only(tmp_path)

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


def test_a_pin_racing_a_delete_leaves_no_pin_for_the_next_block_of_the_key(
        tmp_path: Path) -> None:
    """Blocks only in L2 are pinned, and deleted while the Pin promotes them
    (the Delete lands between the promotion and the pin's record). The Pin
    pins nothing; the blocks Put again under those keys are evictable like
    any other. The session policy kept a pin for each deleted id, inherited
    by the next block of the key: outside the pin quota and past every
    Unpin, a review filled L1 so and every tenant's Puts were refused."""
    env = {"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "8MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
           "KVSTORE_SERVER_PIN_QUOTA": "0.5"}
    keys = [b"k%d" % i for i in range(4)]
    block = b"\x01" * MiB

    async def fill(store: TieredStore) -> None:
        for k in keys:
            await store.put_bytes("a", k, block, ack=AckLevel.LOCAL)

    async def go() -> None:
        store = TieredStore(load(env=env))
        await store.start()
        await fill(store)
        await store.close()
        store = TieredStore(load(env=env))  # a restart: the blocks are in L2 only
        await store.start()
        try:
            leases = store.leases
            promote = leases._promote_all

            async def promote_then_delete(blocks):  # type: ignore[no-untyped-def]
                await promote(blocks)
                assert all(store.index.entry(("a", k)).l1_offset >= 0 for k in keys)
                await store.delete("a", keys)

            leases._promote_all = promote_then_delete  # type: ignore[method-assign]
            assert await store.pin("a", keys, 600_000) == (0, 0)
            leases._promote_all = promote  # type: ignore[method-assign]
            await fill(store)  # the same keys, Put again
            assert store.policy._pins == {}
            for i in range(16):  # 16 MiB of another tenant through an 8 MiB L1
                await store.put_bytes("b", b"b%d" % i, block)
            assert [store.index.entry(("a", k)).l1_offset for k in keys] == [-1] * 4
        finally:
            await store.close()

    asyncio.run(go())


def test_an_unpin_clears_the_policy_pin_of_every_key_it_names(tmp_path: Path) -> None:
    """However a policy pin came to be, an Unpin of its key ends it."""
    config = memory_only(tmp_path)

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        try:
            await store.put_bytes("a", b"k", b"v")
            store.policy.pin([("a", b"k")], store.leases.clock() + 600)
            assert store.policy._pins
            assert store.unpin("a", [b"k"]) == (0, 0)  # not a pin of the namespace's
            assert store.policy._pins == {}
        finally:
            await store.close()

    asyncio.run(go())
