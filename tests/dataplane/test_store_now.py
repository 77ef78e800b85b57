"""The store's no-wait paths behind the data plane's answers from the
readable callback, on a real store (L1 arena, LMDB): an L1 hit served from
``Reads.l1_ready`` + ``count_l1_hit`` counts and tells the policy exactly
what ``open_read`` does; ``l1_ready`` changes nothing when it says no;
``Lookup.lookup_tiers_now`` answers as ``lookup_tiers`` or declines (doing
nothing) when it would have to wait."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

from kvstore.config import load
from kvstore.store import TieredStore
from kvstore.types import AckLevel, TierName

KiB = 1024


def _run(tmp_path: Path, body: Callable[[TieredStore], Awaitable[None]], l2: bool = True,
         **env: str) -> None:
    config = load(env={"KVSTORE_DATA_DIR": str(tmp_path), "KVSTORE_L1_CAPACITY": "1MiB",
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "127.0.0.1:0",
                       "KVSTORE_L2_ENABLED": "true" if l2 else "false", **env})

    async def go() -> None:
        store = TieredStore(config)
        await store.start()
        try:
            await body(store)
        finally:
            await store.close()
    asyncio.run(go())


def _in_l1(store: TieredStore, ns: str, keys: list[bytes]) -> list[bytes]:
    blocks = store.index.blocks
    return [k for k in keys if (e := blocks.get((ns, k))) is not None and e.l1_offset >= 0]


def test_an_l1_hit_served_now_counts_and_ages_as_open_read(tmp_path: Path) -> None:
    keys = [f"k{i}".encode() for i in range(12)]
    hits = [b"k3", b"k0", b"k7", b"k3", b"k5", b"k0", b"k9"]  # some twice, some never
    outcomes = []
    for way in ("open_read", "now"):
        async def body(store: TieredStore, way: str = way) -> None:
            for key in keys:  # 12 x 64 KiB of the 1 MiB L1 (+ L2 copies)
                await store.put_bytes("ns", key, key * (64 * KiB // len(key)), AckLevel.LOCAL)
            for key in hits:
                if way == "open_read":
                    reader = await store.open_read(("ns", key), "s1")
                    assert reader is not None and reader.intact(reader.size)
                    reader.close()
                else:
                    view = store.reads.l1_ready(("ns", key), 1 << 20)
                    assert view is not None and bytes(view[:2]) == key[:2]
                    store.reads.count_l1_hit(("ns", key), "s1")
            stats = store.stats()
            # The policy chose the same victims: more blocks than L1 holds.
            for i in range(12, 20):
                await store.put_bytes("ns", f"k{i}".encode(), b"x" * 64 * KiB, AckLevel.LOCAL)
            outcomes.append((stats, _in_l1(store, "ns", keys)))
        (tmp_path / way).mkdir()
        _run(tmp_path / way, body)
    assert outcomes[0] == outcomes[1]
    stats, _ = outcomes[0]
    assert stats.gets == len(hits) and stats.get_hits == len(hits)


def test_l1_ready_declines_without_touching_anything(tmp_path: Path) -> None:
    async def body(store: TieredStore) -> None:
        await store.put_bytes("ns", b"small", b"s" * 4 * KiB)
        await store.put_bytes("ns", b"large", b"l" * 300 * KiB)
        await store.put_bytes("ns", b"scratched", b"c" * 4 * KiB)
        entry = store.index.blocks[("ns", b"scratched")]
        store.l1.slice(entry.l1_offset, 1)[0] ^= 0xFF
        before = store.stats()
        ready = store.reads.l1_ready
        assert ready(("ns", b"missing"), 1 << 20) is None
        assert ready(("ns", b"large"), 256 * KiB) is None  # above the limit given
        assert ready(("ns", b"scratched"), 1 << 20) is None  # fails its checksum
        assert ready(("other", b"small"), 1 << 20) is None
        assert bytes(ready(("ns", b"small"), 1 << 20) or b"") == b"s" * 4 * KiB
        assert store.stats() == before
        assert store.index.blocks[("ns", b"scratched")] is entry  # dropped by open_read only
        reader = await store.open_read(("ns", b"scratched"))
        assert reader is not None and not reader.intact(1 << 20)
        reader.close()
        assert ("ns", b"scratched") not in store.index.blocks
    # no L2 write to find the damage first; an anonymous arena is checked on request
    _run(tmp_path, body, l2=False, KVSTORE_L1_VERIFY_READS="always")


def test_an_anonymous_arena_is_not_checked_again_unless_asked(tmp_path: Path) -> None:
    """Only this process writes an anonymous arena (it checked each block on
    the way in): by default its bytes leave without a second pass, damage
    made here in-process included; ``always`` checks them, as a shared
    arena's always are."""
    served = {}
    for mode in ("shared", "always"):
        async def body(store: TieredStore, mode: str = mode) -> None:
            await store.put_bytes("ns", b"small", b"s" * 4 * KiB)
            await store.put_bytes("ns", b"large", b"l" * 300 * KiB)
            for key in (b"small", b"large"):
                entry = store.index.blocks[("ns", key)]
                store.l1.slice(entry.l1_offset, 1)[0] ^= 0xFF
            assert store.reads.check.enabled is (mode == "always")
            now = store.reads.l1_ready(("ns", b"small"), 1 << 20)
            reader = await store.open_read(("ns", b"large"))
            assert reader is not None
            served[mode] = (None if now is None else bytes(now[:2]),
                            reader.needs_check, reader.intact(1 << 20))
            reader.close()
        (tmp_path / mode).mkdir()
        _run(tmp_path / mode, body, l2=False, KVSTORE_L1_VERIFY_READS=mode)
    assert served["shared"] == (bytes([ord("s") ^ 0xFF]) + b"s", False, True)
    assert served["always"] == (None, True, False)


def test_lookup_now_answers_as_lookup_or_declines(tmp_path: Path) -> None:
    async def body(store: TieredStore) -> None:
        for i in range(4):
            await store.put_bytes("ns", f"k{i}".encode(), b"v" * 4 * KiB)
        lookups = store.lookups
        chain = [b"k0", b"k1", b"nope", b"k2"]
        assert lookups.lookup_tiers_now("ns", chain) == await lookups.lookup_tiers("ns", chain)
        assert lookups.lookup_tiers_now("ns", chain) == (2, bytes([1, 1, 0, 1]))
        assert lookups.lookup_tiers_now("ns", []) == (0, b"")
        # A lease on what is found here, as lookup_tiers does.
        assert lookups.lookup_tiers_now("ns", [b"k3"], lease_ms=60_000) == (1, b"\x01")
        assert store.index.blocks[("ns", b"k3")].lease_until > 0
        assert store.index.blocks[("ns", b"k0")].lease_until == 0
        # With a shared L3 a key not found here must be asked there: declined.
        real = lookups.l3
        lookups.l3 = SimpleNamespace(healthy=True)  # type: ignore[assignment]
        try:
            assert lookups.lookup_tiers_now("ns", chain, 0, "sess") is None
            assert ("ns", "sess") not in store.leases._session_blocks  # nothing noted
            assert lookups.lookup_tiers_now("ns", [b"k0"], 0, "sess") == (1, b"\x01")
            assert ("ns", "sess") in store.leases._session_blocks
        finally:
            lookups.l3 = real
    _run(tmp_path, body)


def test_lookup_now_declines_a_lease_on_a_compact_index_block(tmp_path: Path) -> None:
    keys = [bytes([i]) * 32 for i in range(3)]  # the compact index's own key length

    async def body(store: TieredStore) -> None:
        for key in keys:
            await store.put_bytes("ns", key, b"c" * 4 * KiB, AckLevel.LOCAL)

    async def restarted(store: TieredStore) -> None:
        lookups = store.lookups
        assert lookups.lookup_tiers_now("ns", keys) == (3, bytes([TierName.L2] * 3))
        assert store.index.cold is not None and len(store.index.cold) == 3
        assert lookups.lookup_tiers_now("ns", keys, lease_ms=1000) is None
        assert len(store.index.cold) == 3  # nothing warmed
        assert await lookups.lookup_tiers("ns", keys, 1000) == (3, bytes([TierName.L2] * 3))
    _run(tmp_path, body)
    _run(tmp_path, restarted)  # every block only in L2, in the compact index
