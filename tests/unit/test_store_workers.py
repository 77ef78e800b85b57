"""The store's worker threads: all started with the store (a job never needs a
new thread), and a job that fills L1 pages holds its caller's cancellation
until it returns (the pages are given back only then)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import load
from kvstore.errors import InvalidConfig
from kvstore.store import TieredStore
from kvstore.store.workers import run_filling, start_workers
from kvstore.types import AckLevel

KiB = 1024


def _workers(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def test_every_worker_thread_runs_from_the_start(tmp_path: Path) -> None:
    """Started lazily, a worker thread the process could not start (a pids
    limit) left its job queued while the caller gave its L1 pages back: the
    job then filled pages another block owned."""
    store = TieredStore(load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_SERVER_WORKERS": "3",
                                  "KVSTORE_L1_CAPACITY": "1MiB", "KVSTORE_L1_PREFAULT": "false"}))
    try:
        assert len(_workers("kvstore-io")) >= 3  # before any job was submitted
    finally:
        asyncio.run(store.close())


def test_workers_that_cannot_start_refuse_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    real_start = threading.Thread.start
    starts = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("kvstore-test") and starts:
            raise RuntimeError("can't start new thread")
        starts.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(InvalidConfig, match=r"server\.workers: cannot start 3 worker threads "
                                            r"\(can't start new thread\).*pids limit"):
        start_workers(3, "kvstore-test")
    starts[0].join(timeout=10)  # the one that started is let go, not left waiting
    assert not starts[0].is_alive()


def test_a_cancelled_caller_waits_for_its_running_job() -> None:
    async def go() -> None:
        executor = start_workers(1, "kvstore-test-fill")
        started, release = threading.Event(), threading.Event()
        finished: list[bool] = []

        def fill() -> None:
            started.set()
            release.wait(10)
            finished.append(True)

        task = asyncio.create_task(run_filling(executor, fill))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)  # let the cancellation run as far as it goes
        assert not task.done()  # the pages are still being written
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [True]
        executor.shutdown()

    asyncio.run(go())


def test_a_get_cancelled_during_its_l2_read_keeps_l1_intact(tmp_path: Path) -> None:
    """A client giving up on a Get while its block was being read from L2
    into L1 gave the L1 extent back at once; the copy, still running, then
    wrote into pages the next Put was given."""
    env = {"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "1MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L1_PAGE_BYTES": "4KiB"}

    async def go() -> None:
        store = TieredStore(load(env=env))
        await store.start()
        blocks = {f"k{i}".encode(): bytes([i]) * (300 * KiB) for i in range(6)}
        for key, data in blocks.items():  # more than L1 holds: the first ones go down to L2
            await store.put_bytes("ns", key, data, ack=AckLevel.LOCAL)
        cold = b"k0"  # the first out of L1: in L2 only
        entry = store.index.blocks.get(("ns", cold))
        assert entry is None or entry.l1_offset < 0
        started, release = threading.Event(), threading.Event()
        reads: Any = store.reads
        original = reads.read_verify_l2

        def slow_read(*args: Any) -> Any:
            started.set()
            release.wait(10)
            return original(*args)

        reads.read_verify_l2 = slow_read
        task = asyncio.create_task(store.get_bytes("ns", cold))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done(), "the Get ended while its L2 read still wrote into L1"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        reads.read_verify_l2 = original
        fresh = {f"n{i}".encode(): bytes([100 + i]) * (300 * KiB) for i in range(3)}
        for key, data in fresh.items():
            await store.put_bytes("ns", key, data, ack=AckLevel.MEMORY)
        for key, data in {**blocks, **fresh}.items():
            assert await store.get_bytes("ns", key) == data, key
        await store.close()

    asyncio.run(go())
