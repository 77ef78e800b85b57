"""Lookup: how many leading keys of a chain are stored, and the fastest tier
of each, from the full index, the compact index and (past the first local
miss) the shared L3."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kvstore.store.index import Entry, Index, tier_of
from kvstore.store.l3 import L3Mover
from kvstore.store.leases import Leases
from kvstore.types import TIER_BY_CODE, BlockId, LookupResult, TierName, validate_keys

if (TierName.L1, TierName.L2, TierName.L3) != (1, 2, 3):
    raise ImportError("Lookup.lookup_tiers inlines TierName's values: update it")

# bytes.translate table: 1 (found in the compact index) -> TierName.L2.
_ONE_TO_L2 = bytes([0, TierName.L2]) + bytes(range(2, 256))


class Lookup:
    def __init__(self, index: Index, leases: Leases, l3: L3Mover | None,
                 l3_concurrency: int) -> None:
        self.index = index
        self.leases = leases
        self.l3 = l3
        self.window = max(1, l3_concurrency)
        self._by_namespace = index.blocks.by_namespace

    async def lookup(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0,
                     session: str | None = None) -> LookupResult:
        """How many leading keys are stored, and the fastest tier of each.
        Keys this node does not know are looked for in the shared L3 from the
        first local miss on, ``l3.concurrency`` at a time, up to the first
        key L3 lacks too (later keys are then reported as not stored)."""
        found, tiers = await self.lookup_tiers(namespace, keys, lease_ms, session)
        return LookupResult(found, [TIER_BY_CODE[t] for t in tiers])

    async def lookup_tiers(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0,
                           session: str | None = None) -> tuple[int, bytes]:
        """:meth:`lookup` with the tiers as one ``TierName`` value per key
        (0 = not stored) in a bytes object."""
        lengths = validate_keys(keys)
        if session:
            self.leases.note_request(namespace, session, [(namespace, key) for key in keys])
        entries, tiers, _ = self._local_tiers(namespace, keys, lengths, lease_ms > 0)
        found = tiers.find(0)
        if found < 0:
            found = len(tiers)
        elif self.l3 is not None and self.l3.healthy:
            named = [TIER_BY_CODE[t] for t in tiers]
            await self._lookup_l3([(namespace, key) for key in keys], entries, named)
            tiers = bytearray(0 if t is None else t.value for t in named)
            found = tiers.find(0)
            if found < 0:
                found = len(tiers)
        if lease_ms > 0:
            self.leases.lease(entries, tiers, lease_ms)
        return found, bytes(tiers)

    def lookup_tiers_now(self, namespace: str, keys: Sequence[bytes], lease_ms: int = 0,
                         session: str | None = None) -> tuple[int, bytes] | None:
        """:meth:`lookup_tiers` when it needs no waiting: None, with nothing
        done, when it would ask the shared L3 (a key not found here) or
        would lease a block only the compact index holds."""
        lengths = validate_keys(keys)
        entries, tiers, cold_hits = self._local_tiers(namespace, keys, lengths, False)
        found = tiers.find(0)
        if (found >= 0 and self.l3 is not None and self.l3.healthy) or (
                cold_hits and lease_ms > 0):
            return None
        if found < 0:
            found = len(tiers)
        if session:
            self.leases.note_request(namespace, session, [(namespace, key) for key in keys])
        if lease_ms > 0:
            self.leases.lease(entries, tiers, lease_ms)
        return found, bytes(tiers)

    def _local_tiers(self, namespace: str, keys: Sequence[bytes], lengths: set[int],
                     warm: bool) -> tuple[list[Entry | None], bytearray, bool]:
        """Each key's entry (None: no full entry) and fastest tier here, from
        the full and the compact index, and whether the compact index held
        any. ``warm``: give those their full entry (a lease needs it)."""
        hot = self._by_namespace.get(namespace)
        entries: list[Entry | None] = list(map(hot.get, keys)) if hot else [None] * len(keys)
        # tier_of, inlined, with TierName's values as literals (checked at
        # import, above): this runs once per key of every Lookup, and a name
        # per value costs ~3 % of a 1,000-key Lookup.
        if entries.count(None) == len(entries):
            tiers = bytearray(len(entries))  # none has a full entry (e.g. all cold)
        else:
            tiers = bytearray(
                0 if e is None else 1 if e.l1_offset >= 0 else 2 if e.l2 else
                3 if e.l3 else 0 for e in entries)
        cold = self.index.cold
        cold_hits = False
        if cold is not None and len(cold) and 0 in tiers:
            # Blocks in the compact index are in L2; no key is in both.
            in_cold = cold.contains_many(namespace, keys, lengths)
            cold_hits = in_cold.count(0) != len(in_cold)
            n = len(tiers)
            tiers = bytearray((int.from_bytes(tiers, "little") | int.from_bytes(
                in_cold.translate(_ONE_TO_L2), "little")).to_bytes(n, "little"))
            if warm:  # a lease needs the full entry
                warm_entry = self.index.warm
                for i in [i for i, c in enumerate(in_cold) if c]:
                    entries[i] = warm_entry((namespace, keys[i]))
        return entries, tiers, cold_hits

    async def _lookup_l3(self, blocks: list[BlockId], entries: list[Entry | None],
                         tiers: list[TierName | None]) -> None:
        assert self.l3 is not None
        window = self.window
        start = tiers.index(None)
        while start < len(blocks):
            todo = [i for i in range(start, min(start + window, len(blocks)))
                    if tiers[i] is None]
            heads = await asyncio.gather(*(self.l3.head(blocks[i]) for i in todo))
            for i, entry in zip(todo, heads, strict=True):
                entries[i] = entry
                tiers[i] = tier_of(entry)
            if any(entry is None for entry in heads):
                return
            start += window
