"""The store's ops calls over a real store (L1 arena, LMDB): a namespace's
stats, listing and flush agree with a recount of the index, full entries and
compact records alike, and leave the other namespaces and the counters right."""

from __future__ import annotations

import asyncio
import hashlib
import time as real_time
from pathlib import Path

import pytest
from test_store_accounting import recount

from kvstore.config import Config, load
from kvstore.store import TieredStore
from kvstore.store import index as index_module
from kvstore.store import tiered as tiered_module
from kvstore.store.coldindex import ColdIndex
from kvstore.types import TierName


def namespace_recount(store: TieredStore, namespace: str) -> dict[TierName, tuple[int, int]]:
    held = {t: [0, 0] for t in (TierName.L1, TierName.L2, TierName.L3)}
    for e in store.index.blocks.by_namespace.get(namespace, {}).values():
        for tier, present in ((TierName.L1, e.l1_offset >= 0), (TierName.L2, e.l2),
                              (TierName.L3, e.l3)):
            if present:
                held[tier][0] += 1
                held[tier][1] += e.size
    for r in store.index.cold.records() if store.index.cold is not None else ():
        if r.namespace == namespace:
            held[TierName.L2][0] += 1
            held[TierName.L2][1] += r.size
    return {t: (b, n) for t, (b, n) in held.items()}


def node_config(tmp_path: Path, node: str = "d", l3: bool = False, **extra: str) -> Config:
    """A small store's configuration under ``tmp_path/node``; ``l3``: the
    bucket ``tmp_path/bucket`` (file://); ``extra``: more KVSTORE_* values."""
    env = {"KVSTORE_DATA_DIR": str(tmp_path / node), "KVSTORE_L1_CAPACITY": "4MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0", **extra}
    if l3:
        env["KVSTORE_L3_URL"] = f"file://{tmp_path / 'bucket'}"
    return load(env=env)


def shifted_clock(shift: float) -> object:
    """A stand-in for kvstore.store.index's ``time`` whose wall clock reads
    ``shift`` seconds off (what creation times are stamped with)."""
    class Shifted:
        @staticmethod
        def time() -> float:
            return real_time.time() + shift
    return Shifted


async def a_block_put_an_hour_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with L3 whose clock ran an hour fast puts ``a/old`` at remote;
    the clock is then set right."""
    monkeypatch.setattr(index_module, "time", shifted_clock(3600.0))
    store = TieredStore(node_config(tmp_path, l3=True))
    await store.start()
    await store.put_bytes("a", b"old", b"o" * 100, ack=3)  # type: ignore[arg-type]
    await store.close()
    monkeypatch.setattr(index_module, "time", real_time)


def mixed_keys(tag: str, n: int) -> list[bytes]:
    """32-byte keys (the compact index's own) and others (kept aside there)."""
    return [hashlib.sha256(f"{tag}{i}".encode()).digest() if i % 3 else f"{tag}-{i}".encode()
            for i in range(n)]


@pytest.mark.parametrize("compact", ["true", "false"])
def test_namespace_stats_listing_and_flush_match_the_index(tmp_path: Path, compact: str) -> None:
    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "1MiB",
                       "KVSTORE_L2_COMPACT_INDEX": compact, "KVSTORE_L1_PREFAULT": "false",
                       "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})
    a_keys, b_keys = mixed_keys("a", 60), mixed_keys("b", 30)

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        for key in a_keys:
            await store.put_bytes("a", key, key * (2000 // len(key)), ack=2)  # type: ignore[arg-type]
        for key in b_keys:
            await store.put_bytes("b", key, b"b" * 3000, ack=2)  # type: ignore[arg-type]
        await store.close()
        store = TieredStore(config)  # restarted: every block only in L2
        await store.start()
        for key in a_keys[:5]:
            assert await store.get_bytes("a", key) is not None  # some back in L1
        if compact == "true":
            assert store.index.cold is not None and len(store.index.cold) > 0

        for ns in ("a", "b", "none"):
            stats = await store.namespace_stats(ns)
            assert stats.namespace == ns
            got = {t.tier: (t.blocks, t.bytes) for t in stats.tiers}
            want = namespace_recount(store, ns)
            assert got == {t: want[t] for t in got}
        listing, more = await store.list_blocks("a")
        assert [b.key for b in listing] == sorted(a_keys) and not more
        assert all(TierName.L2 in b.tiers for b in listing)
        sizes = {b.key: b.size for b in listing}
        assert sizes == {k: len(k * (2000 // len(k))) for k in a_keys}
        first, more = await store.list_blocks("a", limit=7)
        assert [b.key for b in first] == sorted(a_keys)[:7] and more
        prefix = a_keys[1][:1]
        matched, _ = await store.list_blocks("a", prefix=prefix)
        assert [b.key for b in matched] == sorted(k for k in a_keys if k.startswith(prefix))
        named, _ = await store.list_blocks("a", prefix=b"a-")
        assert [b.key for b in named] == sorted(k for k in a_keys if k.startswith(b"a-"))

        assert await store.flush("a") == 60
        assert await store.list_blocks("a") == ([], False)
        assert store.counts.held == recount(store)
        assert namespace_recount(store, "a") == {t: (0, 0) for t in
                                                 (TierName.L1, TierName.L2, TierName.L3)}
        assert [b.key for b in (await store.list_blocks("b"))[0]] == sorted(b_keys)
        for key in a_keys[:3]:
            assert await store.get_bytes("a", key) is None
        assert await store.get_bytes("b", b_keys[0]) == b"b" * 3000
        await store.close()

    asyncio.run(go())


def test_compact_index_namespace_blocks_in_key_order_with_prefix_and_limit() -> None:
    cold = ColdIndex(seed=3)
    keys = mixed_keys("k", 50)
    for i, key in enumerate(keys):
        cold.add("n", key, 100 + i, i, 1000.0 + i, 0.0, i % 2 == 0)
    cold.add("other", keys[0], 5, 0, 0.0, 0.0, False)
    cold.take("n", keys[4])  # a freed row is not listed
    want = sorted(k for k in keys if k != keys[4])
    records, total = cold.namespace_blocks("n")
    assert [r.key for r in records] == want and total == 49
    assert {r.key: r.size for r in records} == {k: 100 + i for i, k in enumerate(keys)
                                                if i != 4}
    records, total = cold.namespace_blocks("n", limit=5)
    assert [r.key for r in records] == want[:5] and total == 49
    records, total = cold.namespace_blocks("n", prefix=b"k-")
    assert [r.key for r in records] == [k for k in want if k.startswith(b"k-")]
    assert total == len(records)
    assert cold.namespace_blocks("n", prefix=b"x" * 40) == ([], 0)
    assert cold.namespace_blocks("missing") == ([], 0)
    blocks, nbytes, l3_blocks, l3_bytes = cold.namespace_usage("n")
    assert (blocks, nbytes) == (49, sum(100 + i for i in range(50) if i != 4))
    assert (l3_blocks, l3_bytes) == (24, sum(100 + i for i in range(0, 50, 2) if i != 4))


def test_a_namespaces_stats_and_listing_let_other_calls_run(tmp_path: Path) -> None:
    """Found by a review: `kvstore stats -n` and `kvstore ls` of a namespace of
    200,000 blocks held every other call (a Get waited up to 0.6 s): both
    scanned it in one go on the event loop. Now in slices, and the answer
    still counts and lists every block."""
    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "64MiB",
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_ENABLED": "false",
                       "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})
    keys = [b"k%05d" % i for i in range(6000)]

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        for key in keys:
            await store.put_bytes("a", key, b"v" * 64)
        calls = (lambda: store.namespace_stats("a"), lambda: store.list_blocks("a", limit=10**5),
                 lambda: store.list_blocks("a", prefix=b"k0", limit=10))
        for call in calls:
            task = asyncio.ensure_future(call())
            turns = 0
            while not task.done():  # another call's turns while the scan runs
                turns += 1
                await asyncio.sleep(0)
            assert turns >= 2, "the scan held the event loop"
        stats = await store.namespace_stats("a")
        assert {t.tier: t.blocks for t in stats.tiers}[TierName.L1] == len(keys)
        listing, more = await store.list_blocks("a", limit=10**5)
        assert [b.key for b in listing] == keys and not more
        first, more = await store.list_blocks("a", prefix=b"k0", limit=10)
        assert [b.key for b in first] == keys[:10] and more
        await store.close()

    asyncio.run(go())


def test_a_clock_stepped_back_opens_the_l3_listings_window_earlier(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: a clock stepped back (NTP) after the L3 listing's
    window opened made a block written then look written before it, so the
    listing took an older object of the key for that block's own copy (it
    stayed, served by other nodes). The window now goes back with the clock.
    (Creation times are the clock's own: holding them at the latest one
    pinned them years ahead after the clock had once run fast.)"""
    config = node_config(tmp_path, l3=True,
                         KVSTORE_L3_LIST_ON_START="false")  # (the window stays open)

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        assert store.l3 is not None
        opened = store.l3.unlisted_since
        await store.put_bytes("a", b"before", b"x" * 100)
        monkeypatch.setattr(index_module, "time", shifted_clock(-3600.0))
        await store.put_bytes("a", b"after", b"y" * 100)
        entry = store.index.blocks[("a", b"after")]
        assert entry.created < opened  # the clock's own time, not held
        assert store.l3.unlisted_since == entry.created
        assert store.l3._unsettled(("a", b"after"), entry)
        await store.close()

    asyncio.run(go())


async def half_warm_store(tmp_path: Path, keys: list[bytes]) -> TieredStore:
    """A store (L1 64 MiB, L2 with the compact index) holding ``keys`` in
    namespace "a", restarted so that all are compact records, then the first
    half warmed into the full index."""
    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "64MiB",
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_COMPACT_INDEX": "true",
                       "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})
    store = TieredStore(config)
    await store.start()
    for key in keys:
        await store.put_bytes("a", key, b"v" * 64, ack=2)  # type: ignore[arg-type]
    await store.close()
    store = TieredStore(config)  # restarted: every block in the compact index
    await store.start()
    for key in keys[:len(keys) // 2]:  # half of them warmed into the full index
        store.index.entry(("a", key))
    return store


def test_a_listing_misses_no_block_that_moves_between_the_indexes_meanwhile(
        tmp_path: Path) -> None:
    """Found by a review of the sliced listing: a block a Get warmed from the
    compact index into the full one during the listing's awaits was in
    neither of the indexes as they were read, and left out of an answer
    that said it was complete."""
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(6000)]  # compact-index keys

    async def go() -> None:
        store = await half_warm_store(tmp_path, keys)
        full = keys[:3000]
        for call in (lambda: store.list_blocks("a", limit=10**5),
                     lambda: store.namespace_stats("a")):
            task = asyncio.ensure_future(call())
            await asyncio.sleep(0)  # the scan has begun
            for key in keys[3000:3500]:  # warmed meanwhile
                store.index.entry(("a", key))
            for key in full[:500]:  # and back into the compact index
                entry = store.index.entry(("a", key))
                assert entry is not None
                store.index.cool(("a", key), entry)
            for key in full[500:600]:  # overwritten meanwhile (a new entry)
                await store.put_bytes("a", key, b"w" * 64, ack=2)  # type: ignore[arg-type]
            result = await task
            if isinstance(result, tuple):
                listing, more = result
                assert sorted(b.key for b in listing) == sorted(keys) and not more
            else:
                # Every overwritten block in L1 (its new entry counted, not the
                # old one the overwrite forgot); in L2 all but at most the one
                # whose L2 write was on its way as its slice was counted.
                counted = {t.tier: t.blocks for t in result.tiers}
                assert counted[TierName.L1] == namespace_recount(store, "a")[TierName.L1][0]
                assert counted[TierName.L1] >= 100
                assert len(keys) - 1 <= counted[TierName.L2] <= len(keys)
        await store.close()

    asyncio.run(go())


def test_a_listing_leaves_out_every_block_deleted_before_its_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found on a loaded host: a Delete that let the listing run between its
    keys (it pauses every few ms) removed a block the listing had already
    looked at, and was answered, while the listing went on; the listing then
    answered with the deleted block. Here the Delete pauses after every key,
    so the listing's slices run between them on any host."""
    monkeypatch.setattr(tiered_module, "_REMOVE_SLICE_S", 0.0)
    keys = [hashlib.sha256(b"%d" % i).digest() for i in range(6000)]  # compact-index keys

    async def go() -> None:
        store = await half_warm_store(tmp_path, keys)
        full = keys[:3000]
        # Full entries the listing looks at in its first slice, then compact ones.
        gone = sorted(full)[:100] + keys[4000:4100]

        async def listing_and_undeleted() -> tuple[set[bytes], set[bytes]]:
            listing, more = await store.list_blocks("a", limit=10**5)
            assert not more
            # (no await between the answer and this look)
            return ({b.key for b in listing},
                    {k for k in gone if store.index.peek(("a", k)) is not None})

        task = asyncio.ensure_future(listing_and_undeleted())
        await asyncio.sleep(0)  # the listing has begun
        assert await store.delete("a", gone) == len(gone)
        listed, undeleted = await task
        assert len(undeleted) < len(gone)  # (the Delete ran while the listing did)
        # Every block deleted before the answer left out; every other one in.
        assert listed == set(keys) - set(gone) | undeleted
        listing, _ = await store.list_blocks("a", limit=10**5)
        assert {b.key for b in listing} == set(keys) - set(gone)
        await store.close()

    asyncio.run(go())


def test_blocks_written_without_l3_record_l3_deletes_only_while_the_clock_is_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a block in L2 created an hour ahead of the clock, the run without
    L3 starts after that block (so its Delete is recorded for the bucket);
    the blocks it writes, while the clock is behind that start or after,
    record the delete of whatever older object is under their key (a fix
    review: behind the start they recorded their own version's, and the
    older object was served again). Two earlier fixes each failed
    a review: without that start the old block's Delete was lost; with every
    block of the run stamped after it, times up to a day ahead reached L3
    headers, and a listing deleted another node's newer object."""
    async def go() -> None:
        await a_block_put_an_hour_ahead(tmp_path, monkeypatch)
        store = TieredStore(node_config(tmp_path))
        await store.start()
        behind = [b"behind%d" % i for i in range(5)]
        for key in behind:
            await store.put_bytes("a", key, b"n" * 100, ack=2)  # type: ignore[arg-type]
        monkeypatch.setattr(index_module, "time", shifted_clock(7200.0))  # past the start now
        passed = [b"passed%d" % i for i in range(5)]
        for key in passed:
            await store.put_bytes("a", key, b"n" * 100, ack=2)  # type: ignore[arg-type]
        assert all(store.index.blocks[("a", k)].created < store.index.l3_off_since
                   for k in behind)
        assert await store.delete("a", [*behind, *passed, b"old"]) == 11
        assert store.l2 is not None
        recorded = await asyncio.get_running_loop().run_in_executor(
            None, store.l2.tombstones_sync)
        # Every block this run wrote, behind the start or past it, records
        # the delete of whatever older object is under its key (the next
        # run's listing took such an object for the key's block once the
        # run's block was gone; a block written behind the start recorded
        # its own version's delete, which left the older object). The block
        # put an hour ahead counts as this run's too (the clock was ahead).
        assert sorted(key for (_, key), checksum in recorded if checksum is None) == \
            sorted([*behind, *passed, b"old"])
        await store.close()

    asyncio.run(go())


def test_a_run_without_l3_keeps_the_listing_window_open_from_its_first_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the fourth review of the fixes: a run without L3 kept the
    listing's window from its recorded start (after the newest L2 block, an
    hour ahead of the clock here), and never moved it back when the clock
    did: the next run's listing took another node's older object of a key
    this run had written for its copy, and the run's own bytes were lost."""
    async def go() -> None:
        await a_block_put_an_hour_ahead(tmp_path, monkeypatch)
        store = TieredStore(node_config(tmp_path))
        await store.start()
        await store.put_bytes("a", b"first", b"f" * 100, ack=2)  # type: ignore[arg-type]
        monkeypatch.setattr(index_module, "time", shifted_clock(-5.0))  # back 5 s in the run
        await store.put_bytes("a", b"later", b"l" * 100, ack=2)  # type: ignore[arg-type]
        created = [store.index.blocks[("a", k)].created for k in (b"first", b"later")]
        await store.close()
        store = TieredStore(node_config(tmp_path))
        await store.start()
        assert store.l2 is not None and store.l2.unlisted_since is not None
        assert store.l2.unlisted_since <= min(created)
        await store.close()

    asyncio.run(go())


def test_a_listing_that_finds_another_nodes_newer_object_drops_this_nodes_older_copy(
        tmp_path: Path) -> None:
    """Found by the fifth review of the fixes: node A wrote K while L3 was off,
    node B put a newer K at remote; A's listing left B's object (newer) but
    kept its own older copy outside L3, and evicting it from L2 uploaded the
    older bytes over B's: every node then read A's stale K."""
    from kvstore.types import AckLevel

    def config(node: str, l3: bool = True, small: bool = False) -> Config:
        return node_config(tmp_path, node, l3, **(
            {"KVSTORE_L1_CAPACITY": "1MiB", "KVSTORE_L2_CAPACITY": "1MiB"} if small else {}))

    key = b"K" * 32

    async def go() -> None:
        a = TieredStore(config("a"))
        await a.start()
        await a.put_bytes("ns", b"J" * 32, b"j" * 4096, ack=AckLevel.REMOTE)
        await a.close()
        a = TieredStore(config("a", l3=False))
        await a.start()
        await a.put_bytes("ns", key, b"2" * 4096, ack=AckLevel.LOCAL)  # A's, older
        await a.close()
        b = TieredStore(config("b"))
        await b.start()
        await b.put_bytes("ns", key, b"3" * 4096, ack=AckLevel.REMOTE)  # B's, newer
        await b.close()
        a = TieredStore(config("a", small=True))
        await a.start()
        assert a.l3 is not None
        await asyncio.wait_for(a.l3.scan_done.wait(), 30)
        assert await a.get_bytes("ns", key) == b"3" * 4096
        for i in range(400):  # A's L2 turns over: nothing of its K is uploaded
            await a.put_bytes("ns", b"%032d" % i, b"o" * 4096, ack=AckLevel.LOCAL)
        await a.close()
        c = TieredStore(config("c"))
        await c.start()
        assert await c.get_bytes("ns", key) == b"3" * 4096
        await c.close()

    asyncio.run(go())
