"""L1: blocks in the host-RAM arena.

Mechanism only. Besides the Tier interface (used by the conformance suite and
for simple copies) it exposes the reservation API the TieredStore's Put path
uses to write incoming chunks straight into the arena: ``reserve`` an extent,
fill ``view[offset:offset+size]``, then ``commit`` (or ``release`` on abort),
so a block is visible only once all of its bytes are in place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from kvstore.errors import CapacityExhausted
from kvstore.tiers.arena import Arena
from kvstore.tiers.base import BlockMeta, Buffer, Tier, TierUsage
from kvstore.types import BlockId, TierName


class MemoryTier(Tier):
    name = TierName.L1

    def __init__(self, capacity: int, page_bytes: int = 4096, prefault: bool = True,
                 shm_path: str = "") -> None:
        self.arena = Arena(capacity, page_bytes, prefault, shm_path)
        # block -> (offset, meta)
        self._blocks: dict[BlockId, tuple[int, BlockMeta]] = {}
        self._bytes = 0

    # -- reservation API (the store's zero-copy Put path) -----------------------

    def reserve(self, nbytes: int) -> int:
        """Offset of an extent for ``nbytes``, or -1 if the arena has no room."""
        return self.arena.alloc(nbytes)

    def release(self, offset: int, nbytes: int) -> None:
        """Give back an extent that was reserved and never committed."""
        self.arena.free(offset, nbytes)

    def commit(self, block: BlockId, offset: int, meta: BlockMeta) -> None:
        """Make a filled extent visible as ``block`` (replacing any old copy)."""
        self.remove(block)
        self._blocks[block] = (offset, meta)
        self._bytes += meta.size

    def remove(self, block: BlockId) -> bool:
        """Forget the block and free its extent."""
        old = self._blocks.pop(block, None)
        if old is None:
            return False
        offset, meta = old
        self._bytes -= meta.size
        self.arena.free(offset, meta.size)
        return True

    def locate(self, block: BlockId) -> tuple[int, BlockMeta] | None:
        return self._blocks.get(block)

    def slice(self, offset: int, nbytes: int) -> memoryview:
        return self.arena.view[offset : offset + nbytes]

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    # -- Tier interface -----------------------------------------------------------

    async def put(self, block: BlockId, data: Buffer, meta: BlockMeta) -> None:
        size = len(memoryview(data).cast("B"))
        offset = self.reserve(size)
        if offset < 0:
            raise CapacityExhausted(
                f"L1 has no free extent of {size} bytes "
                f"({self.arena.free_bytes} of {self.arena.capacity} bytes free)"
            )
        self.arena.view[offset : offset + size] = memoryview(data).cast("B")
        self.commit(block, offset, meta)

    async def get(self, block: BlockId) -> Buffer | None:
        found = self._blocks.get(block)
        if found is None:
            return None
        offset, meta = found
        return self.slice(offset, meta.size)

    async def delete(self, block: BlockId) -> bool:
        return self.remove(block)

    async def contains(self, block: BlockId) -> bool:
        return block in self._blocks

    async def scan(self) -> AsyncIterator[tuple[BlockId, BlockMeta]]:
        for block, (_, meta) in list(self._blocks.items()):
            yield block, meta

    def usage(self) -> TierUsage:
        return TierUsage(len(self._blocks), self._bytes, self.arena.capacity)

    async def close(self) -> None:
        self._blocks.clear()
        self._bytes = 0
        self.arena.close()
