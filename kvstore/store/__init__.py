"""The tiered block store: L1 (a memory arena), L2 (LMDB), L3 (an object
store), the block index over them and the movers between them.

Life of a block:

* Put: an extent is reserved in the L1 arena (evicting if needed), the chunks
  are copied straight into it while the checksum is computed, and the block
  becomes visible on commit. It is then queued for L2 (write-behind, bounded
  in bytes). Acknowledgement level local waits for that L2 commit.
* L1 eviction keeps the L2 copy (a demotion) or, when the policy says drop,
  removes the block everywhere. A block whose L2 copy is not yet written is
  pinned until it is, so nothing acknowledged is lost.
* Get: L1 hits stream from the arena while the block is pinned; L2 and L3
  hits are read into a fresh L1 extent (a promotion) when the policy admits
  them, and verified against the checksum before they are served. A bad copy
  is dropped, counted and reported as a miss.

Everything runs on the event loop thread; blocking work (LMDB reads,
checksums of whole blocks) goes to executors and the single LMDB writer.

The parts, one job each, and who calls what (each part gets the objects
and bound methods it calls once, when :class:`TieredStore` builds it; no
part imports one that imports it back):

==============  ==================================================  ======================
module          job                                                 calls
==============  ==================================================  ======================
stats           event counters per tier, blocks/bytes held per      (nothing)
                tier, request counts
index           ``Entry``, the full index (by block and by          stats, policy, L1/L2
                namespace), the compact index (``coldindex``),      tiers; ``delete_l3``
                where a block is (every change goes through it),    (the mover's, set once)
                the blocks being loaded, forget
placement       L1 extents: reserve, commit a Put                   index, policy,
                (``BlockWriter``), place a promotion, evict;        ``queue_l2_write``
                ``Progress``: wakes Puts waiting for room           (write-back's)
writeback       L2: the write queue from L1, L2 reads verified      index, policy, L2 tier,
                for demotion/promotion, trimming L2 to capacity     the L3 mover (set once)
l3              L3: demotions, ack=remote uploads, reads, HEADs,    index, ``read_l2`` and
                deletes in order, the listing at start              ``after_demotion``
                                                                    (write-back's, set once)
reads           Get: L1 hits, L2/L3 reads and promotion, one        index, placement,
                loading-future mechanism for both                   ``read_verify_l2``, mover
leases          Lookup's leases, session pins, prefetch             index, reads
lookup          Lookup over the full index, the compact one, L3     index, leases, mover
shm             same-host shared memory: reservations and leases    the store's placement,
                on the arena (``SharedMemoryBroker``)               ``open_read``,
                                                                    ``make_durable``
tiered          ``TieredStore``: builds and wires the parts,        all of the above
                validates, joins them for Put, Delete, Stats
==============  ==================================================  ======================

Set once after construction (the only late bindings): ``Index.delete_l3``,
``WriteBack.l3``, ``L3Mover.read_l2`` and ``L3Mover.after_demotion``.

Who writes what: an entry's place (``l1_offset``, ``l2``, ``l3``, ``dirty``,
the pin counts) changes only through :class:`~kvstore.store.index.Index`'s
methods; the full index gains entries through them too, except a committed
Put (placement inserts it directly: the hot path) and its ``generation``;
``lease_until`` and ``pin_until`` are the leases part's.

Tier presence speaks :class:`kvstore.types.TierName` (Lookup returns one
``TierName`` value per key); the wire's codes are the servicer's business.
"""

from kvstore.store.index import Entry
from kvstore.store.placement import ROOM_WAIT_SECONDS, BlockWriter
from kvstore.store.reads import BlockReader
from kvstore.store.shm import CommitSpec, Lease, SharedMemoryBroker, Slot
from kvstore.store.tiered import TieredStore

__all__ = [
    "ROOM_WAIT_SECONDS",
    "BlockReader",
    "BlockWriter",
    "CommitSpec",
    "Entry",
    "Lease",
    "SharedMemoryBroker",
    "Slot",
    "TieredStore",
]
