"""The tier interface every tier implements and the conformance suite tests.

A tier stores blocks (bytes) with their metadata under ``(namespace, key)``.
It never decides what to keep: the TieredStore asks the policy and tells the
tier. Checksums are verified by the store, not by tiers, so that every tier
treats payloads as opaque bytes.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvstore.types import BlockId, Buffer, TierName


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What the index needs to know about a block without reading it."""

    size: int  # payload bytes
    checksum: int  # kvstore.checksum of the payload (verified on every read from L2/L3)
    created: float  # wall-clock seconds when first stored

    _STRUCT = struct.Struct("<QQd")

    def pack(self) -> bytes:
        return self._STRUCT.pack(self.size, self.checksum, self.created)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> BlockMeta:
        size, checksum, created = cls._STRUCT.unpack(bytes(raw[: cls._STRUCT.size]))
        return cls(size, checksum, created)


@dataclass(frozen=True, slots=True)
class TierUsage:
    blocks: int
    bytes: int
    capacity: int


class Tier(abc.ABC):
    """One storage tier. All methods are safe to call from the event loop."""

    name: TierName

    @abc.abstractmethod
    async def put(self, block: BlockId, data: Buffer, meta: BlockMeta) -> None:
        """Store ``data`` under ``block``, replacing any previous copy."""

    @abc.abstractmethod
    async def get(self, block: BlockId) -> Buffer | None:
        """The stored bytes, or None. The result stays valid until the next
        call that changes this block (callers copy before awaiting others)."""

    @abc.abstractmethod
    async def delete(self, block: BlockId) -> bool:
        """Remove the block; True when it was there."""

    @abc.abstractmethod
    async def contains(self, block: BlockId) -> bool:
        """Whether the block is stored."""

    @abc.abstractmethod
    def scan(self) -> AsyncIterator[tuple[BlockId, BlockMeta]]:
        """Every stored block with its metadata, for rebuilding the index at
        start. Never reads payloads."""

    @abc.abstractmethod
    def usage(self) -> TierUsage:
        """Blocks and payload bytes held, and the configured capacity."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and release resources. Idempotent."""
