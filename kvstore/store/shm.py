"""Same-host shared memory: reservations and leases on the L1 arena.

The arena lives in a shared-memory file (``l1.shm_path``) that a trusted
client on the same host maps. Bulk bytes then never cross the socket:

* Put: ``reserve`` carves slots (L1 extents, evicting as needed) and hands out
  random slot ids; the client writes the blocks into its mapping; ``commit``
  checks every offset and size the client names against the reservation and
  verifies each block's checksum (CRC-32C) before the block becomes visible.
  A reservation not committed within ``reserve_ms`` is taken back.
* Get: ``acquire`` pins each block in L1 (promoting it from L2 if needed) and
  returns a lease: a random id, the slot's offset, size, checksum and
  generation. The client copies out and ``release``-s. Eviction waits for
  leases; a lease not released within its time expires (a crashed client),
  and a release reports leases that had expired, since only then could the
  slot have been reused: a copy made under a lease that was still valid at
  release time is never stale. A client whose copy ended within the lease's
  time (counted from before it sent the acquire) knows that already, and may
  instead name the lease in its next ``acquire`` (``release=``), which ends
  it, checked exactly as ``release`` checks it, before leasing anything.

The server trusts the client's process no further than that: ids are random
64-bit numbers, not offsets; a client never names memory the server did not
hand it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.checksum import checksum
from kvstore.errors import CorruptBlock, InvalidArgument, TierNotConfigured
from kvstore.store.reads import BlockReader
from kvstore.store.tiered import TieredStore
from kvstore.tiers.memory import MemoryTier
from kvstore.types import AckLevel, BlockFormat, BlockId, TierName, validate_key

# Expired lease ids remembered, to tell "expired" from "never issued".
_EXPIRED_MEMORY = 65_536


@dataclass(slots=True)
class Reservation:
    block: BlockId
    offset: int
    size: int
    generation: int
    session: str | None
    expires: float


@dataclass(slots=True)
class Slot:
    slot_id: int
    offset: int
    size: int
    generation: int


@dataclass(slots=True)
class Lease:
    lease_id: int
    offset: int
    size: int
    checksum: int
    generation: int
    tier: TierName
    expires: float
    reader: BlockReader


@dataclass(slots=True)
class CommitSpec:
    slot_id: int
    offset: int
    size: int
    checksum: int
    format: BlockFormat = BlockFormat.RAW


class SharedMemoryBroker:
    def __init__(self, store: TieredStore, reserve_ms: int, lease_ms: int,
                 max_lease_ms: int) -> None:
        self.store = store
        self.placement = store.placement
        self.reserve_ms = reserve_ms
        self.default_lease_ms = lease_ms
        self.max_lease_ms = max_lease_ms
        self.path = store.config.l1.shm_path
        self.instance = secrets.token_hex(8)
        self._reservations: dict[int, Reservation] = {}
        self._leases: dict[int, Lease] = {}
        self._expired: OrderedDict[int, None] = OrderedDict()
        self._reaper: asyncio.Task[None] | None = None
        self._generation = 0

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def _require(self) -> None:
        if not self.enabled:
            raise TierNotConfigured(
                "shared memory is off: start the server with l1.shm_path "
                "(e.g. --l1-shm-path /dev/shm/kvstore) to use the Shm* calls")

    def start(self) -> None:
        if self.enabled:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for lease in self._leases.values():
            lease.reader.close()
        self._leases.clear()
        for r in self._reservations.values():
            self.placement.release(r.offset, r.size)
        self._reservations.clear()

    def _new_id(self, taken: dict[int, object]) -> int:
        while True:
            ident = secrets.randbits(63) or 1
            if ident not in taken and ident not in self._expired:
                return ident

    # -- Put ---------------------------------------------------------------------------

    async def reserve(self, namespace: str, specs: Sequence[tuple[bytes, int]],
                      session: str | None) -> list[Slot]:
        self._require()
        for i, (key, size) in enumerate(specs):
            validate_key(key, i)
            self.placement.check_block_size(size)
        slots: list[Slot] = []
        expires = time.monotonic() + self.reserve_ms / 1000.0
        try:
            for key, size in specs:
                offset = await self.placement.reserve(size)
                self._generation += 1
                slot_id = self._new_id(self._reservations)  # type: ignore[arg-type]
                self._reservations[slot_id] = Reservation(
                    (namespace, key), offset, size, self._generation, session, expires)
                slots.append(Slot(slot_id, offset, size, self._generation))
        except BaseException:
            for slot in slots:
                self._drop_reservation(slot.slot_id)
            raise
        return slots

    def _drop_reservation(self, slot_id: int) -> None:
        r = self._reservations.pop(slot_id, None)
        if r is not None:
            self.placement.release(r.offset, r.size)

    async def commit(self, namespace: str, ack: AckLevel, specs: Sequence[CommitSpec],
                     abandon: Sequence[int]) -> tuple[int, int]:
        self._require()
        self.store.check_ack(ack)
        for slot_id in abandon:
            self._drop_reservation(slot_id)
        taken: list[tuple[CommitSpec, Reservation]] = []
        try:
            for i, spec in enumerate(specs):
                r = self._reservations.get(spec.slot_id)
                if r is None:
                    raise InvalidArgument(
                        f"block #{i}: slot id {spec.slot_id} is unknown or its reservation "
                        f"expired (reservations live {self.reserve_ms} ms)")
                if r.block[0] != namespace:
                    raise InvalidArgument(
                        f"block #{i}: slot {spec.slot_id} was reserved in namespace "
                        f"{r.block[0]!r}, not {namespace!r}")
                if spec.offset != r.offset or spec.size != r.size:
                    raise InvalidArgument(
                        f"block #{i}: offset {spec.offset} and size {spec.size} do not match "
                        f"slot {spec.slot_id} (offset {r.offset}, size {r.size})")
                taken.append((spec, r))
        except InvalidArgument:
            # A client naming memory it was not given is broken: drop what it named.
            for spec in specs:
                self._drop_reservation(spec.slot_id)
            raise
        for spec, _ in taken:
            del self._reservations[spec.slot_id]
        # Verify every block's checksum off the event loop, before any is visible.
        # One executor task per block: the native CRC releases the GIL, so
        # blocks are verified in parallel on the executor's threads.
        loop = asyncio.get_running_loop()
        arena = self.store.l1
        sums = await asyncio.gather(*(
            loop.run_in_executor(self.store.executor, _checksum_of, arena, r.offset, r.size)
            for _, r in taken))
        bad = [i for i, ((spec, _), got) in enumerate(zip(taken, sums, strict=True))
               if got != spec.checksum]
        if bad:
            for _, r in taken:
                self.placement.release(r.offset, r.size)
            spec0 = taken[bad[0]][0]
            raise CorruptBlock(
                f"{len(bad)} block(s) failed their CRC-32C check (first: block #{bad[0]}, slot "
                f"{spec0.slot_id}: client said {spec0.checksum:#010x}, slot holds "
                f"{sums[bad[0]]:#010x}); nothing of this commit was stored")
        try:
            for spec, r in taken:
                if spec.format == BlockFormat.KV_V1:
                    await self.placement.verify_block(r.offset, r.size)
        except BaseException:
            for _, r in taken:
                self.placement.release(r.offset, r.size)
            raise
        durable = []
        nbytes = 0
        for spec, r in taken:
            entry = self.placement.commit(r.block, r.size, spec.checksum, r.offset, r.session)
            fut = await self.store.make_durable(r.block, entry, ack)
            if fut is not None:
                durable.append(fut)
            nbytes += r.size
        if durable:
            await asyncio.gather(*durable)
        return len(taken), nbytes

    # -- Get ---------------------------------------------------------------------------

    async def acquire(self, namespace: str, keys: Sequence[bytes], session: str | None,
                      lease_ms: int, release: Sequence[int] = ()
                      ) -> tuple[list[Lease | None], int, list[int]]:
        """Lease ``keys``; first end the leases in ``release`` (checked as
        :meth:`release` checks them: a bad id fails the call before anything is
        released or acquired). Returns the leases (None for a miss) and what
        :meth:`release` returns for ``release``."""
        self._require()
        for i, key in enumerate(keys):
            validate_key(key, i)
        released = 0
        expired: list[int] = []
        if release:
            released, expired = self.release(
                release, what="ShmAcquire.release: nothing was released or acquired")
        ms = self.lease_ms(lease_ms)
        out: list[Lease | None] = []
        try:
            for key in keys:
                reader = await self.store.open_read((namespace, key), session)
                if reader is None:
                    out.append(None)
                    continue
                entry = reader.entry
                if entry is None or entry.l1_offset < 0:
                    # Served from a copy outside the arena (no L1 room): not shareable.
                    reader.close()
                    out.append(None)
                    continue
                lease_id = self._new_id(self._leases)  # type: ignore[arg-type]
                lease = Lease(lease_id, entry.l1_offset, entry.size, entry.checksum,
                              entry.generation, reader.tier, time.monotonic() + ms / 1000.0,
                              reader)
                self._leases[lease_id] = lease
                out.append(lease)
        except BaseException:
            for held in out:
                if held is not None:
                    self._end_lease(held.lease_id)
            raise
        return out, released, expired

    def lease_ms(self, requested: int) -> int:
        """The lease time granted for a request of ``requested`` ms (0: the default)."""
        return min(requested or self.default_lease_ms, self.max_lease_ms)

    def _end_lease(self, lease_id: int) -> Lease | None:
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            lease.reader.close()
        return lease

    def release(self, lease_ids: Sequence[int], *,
                what: str = "nothing was released") -> tuple[int, list[int]]:
        """End leases (ShmRelease, or ShmAcquire's ``release``): all ids are
        checked first, and one that this server never issued, or already
        released, fails the whole call with nothing released."""
        self._require()
        unknown = [i for i in lease_ids if i not in self._leases and i not in self._expired]
        if not unknown and len(set(lease_ids)) != len(lease_ids):
            seen: set[int] = set()
            for i in lease_ids:
                if i in seen:
                    unknown.append(i)  # named twice: the second would be a release of a
                    break              # lease already released
                seen.add(i)
        if unknown:
            raise InvalidArgument(
                f"{len(unknown)} lease id(s) were never issued by this server or were "
                f"already released (first: {unknown[0]}); {what}")
        released = 0
        expired: list[int] = []
        now = time.monotonic()
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is None or lease.expires < now:
                self._expire(lease_id)
                expired.append(lease_id)
            else:
                self._end_lease(lease_id)
                released += 1
        return released, expired

    # -- expiry ------------------------------------------------------------------------

    def _expire(self, lease_id: int) -> None:
        self._end_lease(lease_id)
        self._expired[lease_id] = None
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    def reap(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, lease in self._leases.items() if lease.expires < now]:
            self._expire(lease_id)
        for slot_id in [i for i, r in self._reservations.items() if r.expires < now]:
            self._drop_reservation(slot_id)

    async def _reap_forever(self) -> None:
        period = max(0.01, min(self.reserve_ms, self.default_lease_ms) / 4000.0)
        while True:
            await asyncio.sleep(period)  # a periodic sweep, not synchronisation
            self.reap()

    @property
    def leases(self) -> int:
        return len(self._leases)

    @property
    def reservations(self) -> int:
        return len(self._reservations)


def _checksum_of(arena: MemoryTier, offset: int, size: int) -> int:
    view = arena.slice(offset, size)
    try:
        return checksum(view)
    finally:
        view.release()
