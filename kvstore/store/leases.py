"""What keeps blocks in L1 or brings them there ahead of a Get: leases
(granted by Lookup), a session's pins, and prefetch (of given keys, or of
a session's latest Lookup)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvstore.config import ServerConfig
from kvstore.errors import CapacityExhausted
from kvstore.store.index import Entry
from kvstore.store.parts import Part, Shared, spawn
from kvstore.store.reads import BlockReader, Reads
from kvstore.types import BlockId, validate_keys

# Sessions whose latest Lookup is remembered (for Prefetch by session), and the
# most keys remembered over all of them (~100 bytes each): the least recently
# active sessions' lists go first.
_SESSIONS_KEPT = 10_000
_SESSION_KEYS_KEPT = 1 << 20
# Blocks queued for Prefetch at once (a hint: past it, more are not queued).
_PREFETCH_QUEUED = 1 << 16
# Pins remembered before expired ones are dropped.
_PINS_KEPT = 1024


class Leases(Part):
    """Leases, pins and prefetch."""

    def __init__(self, shared: Shared, reads: Reads, config: ServerConfig) -> None:
        super().__init__(shared)
        self.reads = reads
        self.max_lease_ms = config.max_lease_ms
        self.max_pin_ms = config.max_pin_ms
        self.pin_quota = int(config.pin_quota * self.l1.capacity)
        # The keys of each session's latest Lookup (for Prefetch by session).
        self._session_blocks: OrderedDict[tuple[str, str], list[BlockId]] = OrderedDict()
        self._session_keys = 0  # keys in _session_blocks, all sessions together
        # Pins per namespace: block -> until. Those of blocks expired, deleted or
        # gone from L1 are dropped whenever their namespace pins again, and all
        # namespaces are swept once the table doubles since the last sweep.
        self._pins: dict[str, dict[BlockId, float]] = {}
        self._pin_count = 0
        # L1 bytes of Pins that passed the quota and are still promoting their
        # blocks, per namespace: counted against the quota meanwhile (Pins of
        # L2 blocks at once each passed it, pinning 4x the quota).
        self._pinning: dict[str, int] = {}
        self._pins_swept = _PINS_KEPT
        self._tasks: set[asyncio.Task[None]] = set()
        self._prefetching: set[BlockId] = set()  # blocks queued by Prefetch
        self.closing = False

    async def close(self) -> None:
        """Stop the prefetches in flight."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- Lookup's leases and session notes ------------------------------------------------

    def lease(self, entries: Iterable[Entry | None], tiers: Iterable[int], lease_ms: int) -> None:
        """Keep the found blocks (non-zero ``tiers``) for ``lease_ms`` (capped)."""
        lease_until = self.clock() + min(lease_ms, self.max_lease_ms) / 1000.0
        for entry, tier in zip(entries, tiers, strict=True):
            if entry is not None and tier:
                entry.lease_until = max(entry.lease_until, lease_until)

    def note_request(self, namespace: str, session: str, blocks: list[BlockId]) -> None:
        """A session's request: tell the policy which blocks its context holds."""
        self.policy.on_request(blocks, self.clock(), session)
        key = (namespace, session)
        kept = self._session_blocks
        before = kept.get(key)
        kept[key] = blocks
        kept.move_to_end(key)
        self._session_keys += len(blocks) - (len(before) if before is not None else 0)
        while len(kept) > 1 and (len(kept) > _SESSIONS_KEPT
                                 or self._session_keys > _SESSION_KEYS_KEPT):
            self._session_keys -= len(kept.popitem(last=False)[1])

    def forget_session(self, namespace: str, session: str) -> None:
        """A session ended: its latest Lookup's keys (kept for a Prefetch of
        them) go, rather than wait for 10,000 later sessions to push them out."""
        before = self._session_blocks.pop((namespace, session), None)
        if before is not None:
            self._session_keys -= len(before)

    # -- prefetch -------------------------------------------------------------------------

    def prefetch(self, namespace: str, session: str, keys: Sequence[bytes]) -> tuple[int, int]:
        """Bring blocks into L1 in the background: ``keys``, or the blocks of
        the session's latest Lookup. Returns the blocks and bytes found."""
        validate_keys(keys)
        blocks = [(namespace, k) for k in keys] if keys else \
            list(self._session_blocks.get((namespace, session), []))
        entry_of = self.index.entry
        wanted = [(b, e) for b in blocks if (e := entry_of(b)) is not None]
        queued = self._prefetching
        room = _PREFETCH_QUEUED - len(queued)
        todo = [b for b, e in wanted if e.l1_offset < 0 and b not in queued][:max(room, 0)]
        if todo:
            queued.update(todo)
            spawn(self._tasks, self._prefetch(todo))
        return len(wanted), sum(e.size for _, e in wanted)

    async def _prefetch(self, blocks: list[BlockId]) -> None:
        try:
            await self._promote_all(blocks)
        finally:
            self._prefetching.difference_update(blocks)

    async def _promote_all(self, blocks: list[BlockId]) -> None:
        reads = self.reads
        for block in blocks:
            entry = self.index.entry(block)
            if entry is None or entry.l1_offset >= 0 or self.closing:
                continue
            reader: BlockReader | None = None
            with contextlib.suppress(Exception):
                if entry.l2 and reads.read_verify_l2 is not None:
                    reader = await reads.read_l2(block, entry, None, hint=True)
                elif entry.l3 and reads.l3 is not None:
                    reader = await reads.read_l3(block, entry, None, hint=True)
            if reader is not None:
                reader.close()

    # -- pins -----------------------------------------------------------------------------

    async def pin(self, namespace: str, keys: Sequence[bytes], ttl_ms: int) -> tuple[int, int]:
        """Keep blocks in L1 for ``ttl_ms`` (promoting them first), within the
        namespace's pin quota. Returns the blocks and bytes pinned."""
        validate_keys(keys)
        now = self.clock()
        until = now + min(ttl_ms or self.max_pin_ms, self.max_pin_ms) / 1000.0
        # A key named twice is one pin (it counted twice against the quota).
        blocks = list(dict.fromkeys((namespace, k) for k in keys))
        entry_of = self.index.entry
        found = [(b, e) for b in blocks if (e := entry_of(b)) is not None]
        quota = self.pin_quota
        wanted = {b for b, _ in found}
        extent = self.l1.extent
        pins = self._pins.setdefault(namespace, {})
        held = sum(extent(e.size) for b, e in self._held(pins, now).items()
                   if b not in wanted) + self._pinning.get(namespace, 0)
        # The quota counts the L1 a block takes: whole pages.
        asked = sum(extent(e.size) for _, e in found)
        if held + asked > quota:
            raise CapacityExhausted(
                f"pinning {asked} bytes would put namespace {namespace!r} over its pin quota "
                f"of {quota} bytes ({held} already pinned; server.pin_quota)")
        self._pinning[namespace] = self._pinning.get(namespace, 0) + asked
        try:
            await self._promote_all([b for b, e in found if e.l1_offset < 0])
        finally:
            left = self._pinning[namespace] - asked
            if left:
                self._pinning[namespace] = left
            else:
                del self._pinning[namespace]
        pins = self._pins.setdefault(namespace, {})  # (again: others ran meanwhile)
        pinned: list[BlockId] = []
        nbytes = 0
        for block, entry in found:
            if entry.dead or entry.l1_offset < 0:
                continue
            entry.pin_until = until
            if block not in pins:
                self._pin_count += 1
            pins[block] = until
            pinned.append(block)
            nbytes += entry.size
        if not pins:
            self._pins.pop(namespace, None)
        # Only what was pinned here: a block deleted or flushed while the
        # promotion awaited kept a policy pin that the next Put of its key
        # inherited, outside the quota and past every Unpin (a review held
        # all of L1 so, every tenant's Puts refused).
        self.policy.pin(pinned, until)
        if self._pin_count > 2 * self._pins_swept:
            self._sweep_pins(now)
        return len(pinned), nbytes

    def unpin(self, namespace: str, keys: Sequence[bytes]) -> tuple[int, int]:
        validate_keys(keys)
        count = nbytes = 0
        pins = self._pins.get(namespace, {})
        for key in keys:
            block = (namespace, key)
            if pins.pop(block, None) is not None:
                self._pin_count -= 1
                entry = self.index.blocks.get(block)
                if entry is not None:
                    entry.pin_until = 0.0
                    count += 1
                    nbytes += entry.size
        # The policy's pin goes too (until 0: already past), for every key
        # named: it kept the blocks from eviction until their TTL, and a
        # tenant pinning and unpinning in turn held all of L1, past its
        # pin quota.
        self.policy.pin([(namespace, key) for key in keys], 0.0)
        self.progress.wake()
        return count, nbytes

    def _held(self, pins: dict[BlockId, float], now: float) -> dict[BlockId, Entry]:
        """The entries of one namespace's pins still held; drops from ``pins`` those
        expired, deleted or gone from L1, and those whose key holds another
        block now (deleted or replaced, then Put again: the new block is not
        pinned, and counted against the quota it kept the namespace from
        pinning anything until it left L1)."""
        hot = self.index.blocks.get
        held: dict[BlockId, Entry] = {}
        for b, until in list(pins.items()):
            e = hot(b)
            if until <= now or e is None or e.l1_offset < 0 or e.pin_until != until:
                del pins[b]
                self._pin_count -= 1
            else:
                held[b] = e
        return held

    def _sweep_pins(self, now: float) -> None:
        """Drop every pin no longer held, in every namespace."""
        for namespace, pins in list(self._pins.items()):
            self._held(pins, now)
            if not pins:
                del self._pins[namespace]
        self._pins_swept = max(self._pin_count, _PINS_KEPT)
