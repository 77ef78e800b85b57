"""An overwrite of a block held in L2: what reaches the L2 writer, in order.
A kill -9 can land between any two of the writer's transactions, so the
order is what decides what a restart finds."""

from __future__ import annotations

import asyncio
import threading
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


V1, V2, V3 = b"1" * 100_000, b"2" * 100_000, b"3" * 100_000


@pytest.mark.parametrize("meanwhile", ["delete", "local", "memory", "memory-chain"])
def test_an_answered_overwrite_never_leaves_the_older_block_in_l2(
        tmp_path: Path, meanwhile: str) -> None:
    """The L2 writer is held (each transaction waits for a permit) while v2
    overwrites v1 and something else happens to the key; at the moment v2's
    Put is answered (and v3's, for memory-chain), L2 must not hold v1: a kill
    then would serve it. A review found v2 (ack local) answered over v1 when a
    Delete or another overwrite came while it waited for room in the L2
    queue (its write was never queued, and the old bytes had been left for
    it), and, already before, a second memory overwrite answered while the
    first one's delete of v1 was still queued."""

    async def go() -> None:
        store = TieredStore(load(env={
            "KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "64MiB",
            "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
            "KVSTORE_SERVER_MAX_BLOCK_BYTES": "4MiB", "KVSTORE_L2_WRITE_QUEUE_BYTES": "4MiB"}))
        await store.start()
        l2 = store.l2
        assert l2 is not None
        loop = asyncio.get_running_loop()

        def l2_holds() -> bytes | None:
            found = l2.read_into_sync(("ns", b"k"), None)
            return None if found is None else bytes(found[1])

        permits = threading.Semaphore(0)
        apply = l2._apply  # type: ignore[attr-defined]

        def gated(batch: Any) -> Any:  # the writer thread: one transaction per permit
            permits.acquire()
            return apply(batch)

        try:
            await store.put_bytes("ns", b"k", V1, ack=AckLevel.LOCAL)
            await loop.run_in_executor(None, l2.flush_sync)
            l2._apply = gated  # type: ignore[attr-defined]
            answered: dict[str, bytes | None] = {}

            def watch(name: str, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
                task.add_done_callback(lambda t: answered.setdefault(name, l2_holds()))
                return task

            tasks = []
            if meanwhile == "memory-chain":
                tasks.append(watch("v2", asyncio.create_task(
                    store.put_bytes("ns", b"k", V2, ack=AckLevel.MEMORY))))
                await _until(lambda: store.placement.replace_waits(("ns", b"k")))
                tasks.append(watch("v3", asyncio.create_task(
                    store.put_bytes("ns", b"k", V3, ack=AckLevel.MEMORY))))
            else:
                # A 4 MiB block fills the L2 queue: v2 cannot queue its write at once.
                tasks.append(asyncio.create_task(
                    store.put_bytes("ns", b"f", b"f" * (4 << 20), ack=AckLevel.LOCAL)))
                await _until(lambda: store.writeback is not None and store.writeback.queued > 0)
                tasks.append(watch("v2", asyncio.create_task(
                    store.put_bytes("ns", b"k", V2, ack=AckLevel.LOCAL))))
                await _until(lambda: store.index.entry(("ns", b"k")) is not None and
                             store.index.entry(("ns", b"k")).size == len(V2))  # committed
                if meanwhile == "delete":
                    tasks.append(asyncio.create_task(store.delete("ns", [b"k"])))
                else:
                    tasks.append(watch("v3", asyncio.create_task(store.put_bytes(
                        "ns", b"k", V3,
                        ack=AckLevel.LOCAL if meanwhile == "local" else AckLevel.MEMORY))))
            for _ in range(40):  # the writer goes on, one transaction at a time
                permits.release()
                if all(t.done() for t in tasks):
                    break
                await _until(lambda: False, 0.05)
            for _ in range(100):
                permits.release()
            await asyncio.gather(*tasks)
            assert answered, "no overwrite was answered"
            for name, held in answered.items():
                assert held != V1, f"{name} was answered while L2 still held v1"
        finally:
            for _ in range(100):
                permits.release()
            await store.close()

    asyncio.run(go())


async def _until(check: Any, timeout: float = 10.0) -> bool:
    """Poll ``check`` (bounded): True once it holds, False after ``timeout``
    when the caller only wanted the time to pass (check always False)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)  # polling the store's state, bounded
    return True


def test_a_get_overlapping_an_overwrite_of_its_l2_copy_is_a_hit(tmp_path: Path) -> None:
    """A Get that reads a block's L2 copy while a Put replaces the block
    answers with bytes of the key (the new ones: it looks again), not a miss:
    the key was stored all along, and a miss makes an engine recompute it
    (an outside review saw 6 misses in 40 such overlaps)."""

    async def go() -> None:
        store = _store(tmp_path)
        await store.start()
        try:
            old, new = b"old" * 100_000, b"new" * 100_000
            await store.put_bytes("ns", b"k", old, ack=AckLevel.LOCAL)
            for i in range(40):  # 12 MiB through an 8 MiB L1: k is in L2 only
                await store.put_bytes("ns", f"f{i}".encode(), bytes(300_000),
                                      ack=AckLevel.LOCAL)
            entry = store.index.entry(("ns", b"k"))
            assert entry is not None and entry.l1_offset < 0 and entry.l2
            reads = store.reads
            working = reads.read_verify_l2
            assert working is not None
            reading, overwritten = threading.Event(), threading.Event()

            def held_back(block: Any, crc: int, dest: Any) -> Any:
                if block == ("ns", b"k") and not reading.is_set():
                    reading.set()
                    assert overwritten.wait(10), "the overwrite never came"
                return working(block, crc, dest)

            reads.read_verify_l2 = held_back
            get = asyncio.ensure_future(store.get_bytes("ns", b"k"))
            assert await asyncio.to_thread(reading.wait, 10), "the Get never read L2"
            await store.put_bytes("ns", b"k", new)
            overwritten.set()
            assert await asyncio.wait_for(get, 10) == new
        finally:
            await store.close()

    asyncio.run(go())
