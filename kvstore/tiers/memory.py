"""L1: the host-RAM arena, in the :class:`~kvstore.tiers.base.BlockArena` role.

The store's Put path writes incoming chunks straight into the arena:
``reserve`` an extent, fill ``slice(offset, size)``, publish the block in the
store's index (or ``release`` the extent on abort). Which block lives in which
extent is the store's index, not the tier's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.tiers.arena import Arena

if TYPE_CHECKING:
    from kvstore.tiers.base import BlockArena


class MemoryTier:
    def __init__(self, capacity: int, page_bytes: int = 4096, prefault: bool = True,
                 shm_path: str = "") -> None:
        self.arena = Arena(capacity, page_bytes, prefault, shm_path)

    def reserve(self, nbytes: int) -> int:
        return self.arena.alloc(nbytes)

    def extent(self, nbytes: int) -> int:
        """The L1 bytes a block of ``nbytes`` takes: whole pages."""
        arena = self.arena
        return arena.pages_for(nbytes) * arena.page_bytes

    def release(self, offset: int, nbytes: int) -> None:
        self.arena.free(offset, nbytes)

    def slice(self, offset: int, nbytes: int) -> memoryview:
        return self.arena.view[offset : offset + nbytes]

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def used_bytes(self) -> int:
        return self.arena.used_bytes

    async def close(self) -> None:
        self.arena.close()


if TYPE_CHECKING:  # mypy checks that the class plays its role
    _plays_role: type[BlockArena] = MemoryTier
