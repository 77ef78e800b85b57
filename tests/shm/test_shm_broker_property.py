"""Random sequences of shared-memory calls (valid, duplicated, forged,
foreign, expired; keyed and anonymous slots, restocks) against the broker
over a real store: every call either succeeds or fails with a client error
(never INTERNAL), and once every client is gone (its reservations and leases
expired) L1 holds nothing but committed blocks: no extent, writer count or
pin leaks.

The broker runs on a fake clock, so expiry takes no time. ~10 s in the
default run; set KVSTORE_FUZZ_EXAMPLES for a longer one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.checksum import checksum
from kvstore.config import load
from kvstore.errors import KVStoreError
from kvstore.store import CommitSpec, SharedMemoryBroker, TieredStore
from kvstore.types import AckLevel

# (namespace, owner) of each client: two share a namespace, one does not.
CLIENTS = [("a", "owner-0"), ("a", "owner-1"), ("b", "owner-2")]
KEYS = [b"k0", b"k1", b"k2", b"k3"]
SIZES = [1, 4096, 5000, 20_000]
EXAMPLES = int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "60"))
_paths = itertools.count()

# Indices counted from the most recent slot or lease (so most name live ones).
picks = st.lists(st.integers(0, 5), max_size=4)
rarely = st.integers(0, 7).map(lambda n: n == 0)
# Client 0 most of the time: the others are mostly refused (not their slots).
client = st.sampled_from([0, 0, 0, 1, 2])
# b"": an anonymous slot (issue 14), bound to a key at commit.
reserve = st.tuples(st.just("reserve"), client,
                    st.lists(st.tuples(st.sampled_from([*KEYS, b""]), st.sampled_from(SIZES)),
                             min_size=1, max_size=3))
# commit: slots (indices into those issued, repeats allowed), abandon, a
# forged id, a bad checksum, a wrong offset, the key each block names (b"":
# none) and the sizes to restock
commit = st.tuples(st.just("commit"), client, picks, st.lists(st.integers(0, 5), max_size=1),
                   rarely, rarely, rarely, st.sampled_from([b"", *KEYS]),
                   st.lists(st.sampled_from(SIZES), max_size=2))
ops = st.one_of(
    reserve, reserve, commit, commit,
    st.tuples(st.just("acquire"), client, st.lists(st.sampled_from(KEYS), max_size=3), picks),
    st.tuples(st.just("release"), client, picks, rarely),
    st.tuples(st.just("advance"), st.sampled_from([0.01, 0.6, 1.5, 6.0])),
    st.tuples(st.just("delete"), st.sampled_from(KEYS)),
)


@dataclass
class World:
    now: list[float] = field(default_factory=lambda: [1000.0])
    slots: list[tuple[int, int, int]] = field(default_factory=list)  # id, offset, size
    leases: list[int] = field(default_factory=list)
    calls: int = 0
    refused: int = 0


def _recent(issued: list, i: int):  # type: ignore[no-untyped-def,type-arg]
    return issued[-1 - i % len(issued)]


async def _apply(broker: SharedMemoryBroker, world: World, op: tuple) -> None:  # type: ignore[type-arg]
    kind = op[0]
    if kind == "advance":
        world.now[0] += op[1]
        broker.reap()
        return
    if kind == "delete":
        for ns in {"a", "b"}:
            await broker.store.delete(ns, [op[1]])
        return
    ns, owner = CLIENTS[op[1]]
    world.calls += 1
    try:
        if kind == "reserve":
            for s in (await broker.reserve(ns, op[2], None, owner))[0]:
                world.slots.append((s.slot_id, s.offset, s.size))
        elif kind == "commit":
            _, _, chosen, abandon, forge, bad_crc, wrong_offset, key, restock = op
            named = [_recent(world.slots, i) for i in chosen] if world.slots else []
            specs = []
            for slot_id, offset, size in named:
                view = broker.store.l1.slice(offset, size)
                view[:] = bytes([slot_id & 0xFF]) * size
                crc = checksum(view) ^ (1 if bad_crc else 0)
                view.release()
                specs.append(CommitSpec(slot_id, offset + (4096 if wrong_offset else 0), size,
                                        crc, key=key))
            if forge:
                specs.append(CommitSpec(12345, 0, 1, 0))
            dropped = [_recent(world.slots, i)[0] for i in abandon] \
                if world.slots else []
            broker.check_restock(restock)
            await broker.commit(ns, AckLevel.MEMORY, specs, dropped, owner, session="s")
            for s in (await broker.restock(ns, restock, owner))[0]:
                world.slots.append((s.slot_id, s.offset, s.size))
        elif kind == "acquire":
            _, _, keys, release = op
            ids = [_recent(world.leases, i) for i in release] if world.leases else []
            leases, _, _ = await broker.acquire(ns, keys, None, 0, ids, owner)
            world.leases.extend(lease.lease_id for lease in leases if lease is not None)
        elif kind == "release":
            _, _, chosen, forge = op
            ids = [_recent(world.leases, i) for i in chosen] if world.leases else []
            broker.release(ids + ([987654321] if forge else []), ns, owner)
    except KVStoreError as exc:
        # A refusal is fine; an internal error (the base class) is not.
        assert type(exc) is not KVStoreError and exc.code != "INTERNAL", repr(exc)
        world.refused += 1


@contextlib.asynccontextmanager
async def _broker(tmp: Path, tag: str, l1: str = "4MiB", l2: bool = False,
                  **kw: Any) -> AsyncIterator[tuple[TieredStore, SharedMemoryBroker]]:
    """A started store on a shared-memory L1 and a broker over it, closed (and the
    arena file removed) on the way out."""
    shm_path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp.name}-{tag}"
    config = load(env={"KVSTORE_DATA_DIR": str(tmp), "KVSTORE_L1_CAPACITY": l1,
                       "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_ENABLED": str(l2).lower(),
                       "KVSTORE_L1_SHM_PATH": shm_path,
                       "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"})
    store = TieredStore(config)
    await store.start()
    broker = SharedMemoryBroker(store, **{"reserve_ms": 1000, "lease_ms": 1000,
                                          "max_lease_ms": 1000, **kw})
    try:
        yield store, broker
    finally:
        await broker.close()
        await store.close()
        if os.path.exists(shm_path):
            os.unlink(shm_path)


async def _run(tmp: Path, sequence: list[tuple]) -> None:  # type: ignore[type-arg]
    world = World()
    async with _broker(tmp, f"prop{next(_paths)}", clock=lambda: world.now[0],
                       quarantine_ms=5000) as (store, broker):
        for op in sequence:
            await _apply(broker, world, op)
            # Never two live reservations on one byte of L1.
            live = sorted((r.offset, r.offset + r.size) for r in broker._reservations.values())
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(live)), live
        # Every client is gone: its reservations, quarantined slots and leases run out.
        world.now[0] += 3600.0
        broker.reap()
        world.now[0] += 3600.0
        broker.reap()
        assert (broker.reservations, broker.leases, broker.quarantined) == (0, 0, 0)
        assert store.placement.open_writers == 0
        assert store.index.busy_pins == 0
        for ns in ("a", "b"):
            await store.delete(ns, KEYS)
        assert store.l1.used_bytes == 0


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(ops, min_size=10, max_size=60))
def test_l1_accounting_returns_to_zero_after_any_sequence(tmp_path: Path,
                                                          sequence: list[tuple]) -> None:  # type: ignore[type-arg]
    asyncio.run(_run(tmp_path, sequence))


def test_leases_held_at_once_are_bounded(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lease costs the server ~1 KB and pins a block: past MAX_LEASES held at
    once (all clients together) an acquire is refused whole, on both paths, with
    nothing acquired or released; a release in the same call makes room."""
    from kvstore.errors import CapacityExhausted
    from kvstore.store import shm

    monkeypatch.setattr(shm, "MAX_LEASES", 4)

    async def go() -> None:
        async with _broker(tmp_path, "leases") as (store, broker):
            for key in KEYS[:3]:
                await store.put_bytes("a", key, key * 100)
            held, _, _ = await broker.acquire("a", KEYS[:3], None, 0)
            assert broker.leases == 3
            with pytest.raises(CapacityExhausted, match="at most 4 at once"):
                await broker.acquire("a", KEYS[:2], None, 0)
            with pytest.raises(CapacityExhausted, match="at most 4 at once"):
                broker.acquire_now("a", KEYS[:2], None, 0)
            assert broker.leases == 3
            ids = [lease.lease_id for lease in held if lease is not None]
            more = broker.acquire_now("a", KEYS[:3], None, 0, release=ids[:2])
            assert more is not None and broker.leases == 4
            # Ids never issued (or named twice) give no room back: the release
            # skips them, so they must not count against the bound either.
            bogus = [ids[2], ids[2], *range(1, 9)]
            with pytest.raises(CapacityExhausted, match="at most 4 at once"):
                await broker.acquire("a", KEYS[:2], None, 0, release=bogus)
            with pytest.raises(CapacityExhausted, match="at most 4 at once"):
                broker.acquire_now("a", KEYS[:2], None, 0, release=bogus)
            assert broker.leases == 4

    asyncio.run(go())


def test_an_acquire_larger_than_l1_answers_at_once_and_leases_run_from_the_answer(
        tmp_path: Path) -> None:
    """An acquire whose blocks must come into an L1 its own leases fill would wait for
    room only they hold: those past the room are answered found and not leased, at
    once (the client reads them without a lease; the whole call used to be refused,
    and a ShmClient.get of them then waited out its timeout). Leases of a call that
    waited run from its answer, so none it returns has expired already."""
    from kvstore.store.shm import Lease, Unleased

    async def go() -> None:
        now = [1000.0]
        async with _broker(tmp_path, "half", l1="1MiB", l2=True, max_lease_ms=5000,
                           clock=lambda: now[0]) as (store, broker):
            keys = [f"k{i}".encode() for i in range(300)]  # 300 pages > L1's 256
            for key in keys:
                await store.put_bytes("a", key, key * 4, ack=AckLevel.LOCAL)
            started = time.monotonic()
            got, _, _ = await asyncio.wait_for(broker.acquire("a", keys, None, 0), 10)
            assert time.monotonic() - started < 2
            leased = [x for x in got if isinstance(x, Lease)]
            assert leased and all(isinstance(x, Unleased) for x in got[len(leased):])
            assert len(leased) + sum(isinstance(x, Unleased) for x in got) == 300
            broker.release([x.lease_id for x in leased], "a")
            assert broker.leases == 0
            few, _, _ = await broker.acquire("a", keys[:20], None, 2000)
            assert all(lease is not None and lease.expires == now[0] + 2.0 for lease in few)

    asyncio.run(go())


def test_one_namespace_holds_at_most_its_share_of_the_leases(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One tenant leasing its blocks over and over held every lease of the
    server, and every other tenant's acquire failed: a namespace holds at
    most MAX_LEASES_PER_TENANT, and another namespace still leases. The
    count follows releases and expiries."""
    from kvstore.errors import CapacityExhausted
    from kvstore.store import shm

    monkeypatch.setattr(shm, "MAX_LEASES", 8)
    monkeypatch.setattr(shm, "MAX_LEASES_PER_TENANT", 4)

    async def go() -> None:
        async with _broker(tmp_path, "share") as (store, broker):
            for ns in ("a", "b"):
                await store.put_bytes(ns, KEYS[0], KEYS[0] * 100)
            held, _, _ = await broker.acquire("a", [KEYS[0]] * 4, None, 0)
            with pytest.raises(CapacityExhausted, match="at most 4 per namespace"):
                await broker.acquire("a", [KEYS[0]], None, 0)
            with pytest.raises(CapacityExhausted, match="at most 4 per namespace"):
                broker.acquire_now("a", [KEYS[0]], None, 0)
            theirs = broker.acquire_now("b", [KEYS[0]] * 2, None, 0)  # b is not held back
            assert theirs is not None and broker.leases == 6
            ids = [lease.lease_id for lease in held if lease is not None]
            broker.release(ids[:2], "a")
            again, _, _ = await broker.acquire("a", [KEYS[0]] * 2, None, 0)
            assert all(lease is not None for lease in again) and broker.leases == 6

    asyncio.run(go())


def test_one_identity_holds_at_most_its_share_over_all_its_namespaces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fix review: under auth, a tenant granted two namespaces held half
    the leases in each, all of them together, and every other tenant's
    acquire failed. The share is the identity's."""
    from kvstore.errors import CapacityExhausted
    from kvstore.store import shm

    monkeypatch.setattr(shm, "MAX_LEASES", 8)
    monkeypatch.setattr(shm, "MAX_LEASES_PER_TENANT", 4)

    async def go() -> None:
        async with _broker(tmp_path, "ident") as (store, broker):
            for ns in ("a", "b", "c"):
                await store.put_bytes(ns, KEYS[0], KEYS[0] * 100)
            held, _, _ = await broker.acquire("a", [KEYS[0]] * 2, None, 0, identity="greedy")
            more = broker.acquire_now("b", [KEYS[0]] * 2, None, 0, identity="greedy")
            assert more is not None
            for ns in ("a", "b"):
                with pytest.raises(CapacityExhausted, match=r"identity 'greedy' holds 4 .* "
                                                            "at most 4 per identity"):
                    await broker.acquire(ns, [KEYS[0]], None, 0, identity="greedy")
                with pytest.raises(CapacityExhausted, match="at most 4 per identity"):
                    broker.acquire_now(ns, [KEYS[0]], None, 0, identity="greedy")
            # Another identity on the same namespaces is not held back.
            theirs, _, _ = await broker.acquire("b", [KEYS[0]] * 4, None, 0, identity="other")
            assert all(lease is not None for lease in theirs) and broker.leases == 8
            # A release given back in the same call makes room in the share.
            ids = [lease.lease_id for lease in held if lease is not None]
            broker.release(ids, "a")
            again, _, _ = await broker.acquire("c", [KEYS[0]] * 2, None, 0, identity="greedy")
            assert all(lease is not None for lease in again) and broker.leases == 8

    asyncio.run(go())


def test_acquires_under_way_together_stay_within_the_share(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fix review: an acquire checked the bound once, then waited for blocks
    between its leases; acquires sent together each passed the check before
    the others' leases counted, and one tenant held 123,072 leases (its share
    32,768, the server's bound 65,536). The leases a call may still take
    count from its check on."""
    from kvstore.errors import CapacityExhausted
    from kvstore.store import shm

    monkeypatch.setattr(shm, "MAX_LEASES", 8)
    monkeypatch.setattr(shm, "MAX_LEASES_PER_TENANT", 4)

    async def go() -> None:
        async with _broker(tmp_path, "race") as (store, broker):
            await store.put_bytes("a", KEYS[0], KEYS[0] * 100)
            opened = store.open_read

            async def slow_open(*args: Any, **kwargs: Any) -> Any:
                await asyncio.sleep(0)  # (an L2 or L3 read: the loop runs others)
                return await opened(*args, **kwargs)

            monkeypatch.setattr(store, "open_read", slow_open)
            calls = [broker.acquire("a", [KEYS[0]] * 3, None, 0) for _ in range(3)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            granted = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, CapacityExhausted)]
            assert len(granted) == 1 and len(refused) == 2, results
            assert broker.leases == 3
            with pytest.raises(CapacityExhausted, match="at most 4 per namespace"):
                broker.acquire_now("a", [KEYS[0]] * 2, None, 0)
            assert broker.acquire_now("a", [KEYS[0]], None, 0) is not None  # 4: the share

    asyncio.run(go())


def test_lease_and_slot_ids_are_unguessable_and_never_zero() -> None:
    """Ids (leases, slots) are drawn a batch at a time from os.urandom: every
    one in 1..2**63-1, none repeated across batches, in no order another
    client could follow, and another broker's differ."""
    from kvstore.store.shm import RandomIds

    ids = RandomIds()
    drawn = [ids.take() for _ in range(3 * RandomIds.BATCH + 7)]
    assert all(1 <= i < 2**63 for i in drawn)
    assert len(set(drawn)) == len(drawn)
    assert drawn != sorted(drawn) and drawn != sorted(drawn, reverse=True)
    other = RandomIds()
    assert not set(drawn) & {other.take() for _ in range(RandomIds.BATCH)}
