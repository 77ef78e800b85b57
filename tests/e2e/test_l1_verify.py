"""L1 bytes are checked against their checksum on every read that leaves the
server (issue 12, item 5): a block whose L1 copy was changed behind the
index's back (a byte flipped in the shared-memory arena) is never served and
never written down to L2; it is dropped from L1 and counted in ``corrupt``.

Each test runs a real server with its L1 arena in a file that a
:class:`ShmClient` maps; the test finds the block through a lease and flips
one of its bytes in place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore import Client
from kvstore.client.shm import ShmClient
from kvstore.errors import CorruptBlock
from kvstore.types import TierName

KiB = 1024
MiB = 1024**2


def _shm_path(tmp_path: Path, tag: str) -> str:
    return f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-{tag}"


@pytest.fixture
def server(server_factory, tmp_path: Path) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    proc = server_factory("--l1-shm-path", _shm_path(tmp_path, "v"), l1_capacity="32MiB")
    with proc:
        yield proc


def flip_byte_in_l1(server, key: bytes, at: int, namespace: str = "v") -> None:  # type: ignore[no-untyped-def]
    """Change one byte of the block's L1 copy in place, as a late writer would."""
    with ShmClient(server.unix_target, namespace=namespace, timeout=30) as shm:
        [lease] = shm.acquire([key])
        assert lease is not None and lease.tier == TierName.L1
        view = lease.view
        view[at] = view[at] ^ 0xFF
        view.release()
        shm.release([lease])


def corrupt_count(client: Client, tier: TierName) -> int:
    return next(t.corrupt for t in client.stats().tiers if t.tier == tier)


@pytest.mark.parametrize("size", [64 * KiB, 3 * MiB])
def test_get_of_a_corrupt_l1_copy_serves_the_l2_copy(server, size: int) -> None:  # type: ignore[no-untyped-def]
    """A block small enough is checked whole before its first byte is sent:
    the bad L1 copy is dropped and the good L2 copy served in the same call
    (by GetSmall for the small block, by the Get stream for the larger)."""
    blob = os.urandom(size)
    with Client(server.unix_target, namespace="v", timeout=30) as c:
        c.put({b"k": blob, b"other": b"x" * KiB}, ack="local")
        flip_byte_in_l1(server, b"k", size // 2)
        assert c.get([b"k"]) == [blob]
        assert corrupt_count(c, TierName.L1) == 1
        assert c.get([b"k", b"other"]) == [blob, b"x" * KiB]  # and again, still exact
        assert corrupt_count(c, TierName.L1) == 1
        assert corrupt_count(c, TierName.L2) == 0


def test_get_of_a_large_corrupt_l1_copy_withholds_its_last_chunk(server) -> None:  # type: ignore[no-untyped-def]
    """A block larger than the whole-block check is checked as it is sent:
    the stream ends with DATA_LOSS naming the block before the last chunk,
    the copy is dropped, and the next Get serves the L2 copy."""
    size = 6 * MiB
    blob = os.urandom(size)
    # data_plane=False: the gRPC Get stream (the data plane checks the whole
    # block before sending it and serves the L2 copy at once).
    with Client(server.unix_target, namespace="v", timeout=30, data_plane=False) as c:
        c.put({b"big": blob, b"big2": blob}, ack="local")
        assert c.get([b"big2"]) == [blob]  # the client streams the next Get of this size
        flip_byte_in_l1(server, b"big", size - 1)
        with pytest.raises(CorruptBlock, match=b"big".hex()):
            c.get([b"big"])
        assert corrupt_count(c, TierName.L1) == 1
        assert c.get([b"big"]) == [blob]


def test_corrupt_l1_copy_is_never_written_to_l2(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A memory-acknowledged block waits in L1 for its L2 write (write-back);
    corrupted there, it is dropped when the write comes: a miss, never the
    bad bytes, in L2 or after a restart."""
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "w"), l1_capacity="16MiB")
    blob = os.urandom(256 * KiB)
    server.start()
    with Client(server.unix_target, namespace="v", timeout=30) as c:
        c.put({b"dirty": blob}, ack="memory")
        flip_byte_in_l1(server, b"dirty", 7)
        # Fill L1 so the block must leave it: its L2 write is due now.
        for i in range(12):
            c.put({f"fill{i}".encode(): os.urandom(2 * MiB)}, ack="local")
        assert c.get([b"dirty"]) == [None]
        assert corrupt_count(c, TierName.L1) == 1
        assert corrupt_count(c, TierName.L2) == 0  # L2 never got the bad bytes
    assert server.terminate() == 0  # a clean stop flushes L1 to L2
    server.start()
    with server, Client(server.unix_target, namespace="v", timeout=30) as c:
        assert c.get([b"dirty"]) == [None]
        assert corrupt_count(c, TierName.L2) == 0


def counts(client: Client) -> dict[str, int]:
    stats = client.stats()
    out = {"gets": stats.gets, "get_hits": stats.get_hits}
    for t in stats.tiers:
        out.update({f"{t.tier.name}.hits": t.hits, f"{t.tier.name}.misses": t.misses,
                    f"{t.tier.name}.corrupt": t.corrupt})
    return out


@pytest.mark.parametrize("data_plane", [True, False])
def test_a_get_of_a_corrupt_l1_copy_counts_one_read_an_l1_miss(  # type: ignore[no-untyped-def]
        server, data_plane: bool) -> None:
    """Found by a review: one Get of a block whose L1 copy was corrupt counted
    two Gets, two hits, and an L1 hit beside the L1 miss (the first read's
    counts, then the reread's): the hit rate rose exactly when copies went bad."""
    blob = os.urandom(64 * KiB)
    with Client(server.unix_target, namespace="v", timeout=30, data_plane=data_plane) as c:
        c.put({b"k": blob}, ack="local")
        flip_byte_in_l1(server, b"k", at=100)
        before = counts(c)
        assert c.get([b"k"]) == [blob]
        after = counts(c)
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert delta == {"gets": 1, "get_hits": 1, "L1.misses": 1, "L1.corrupt": 1, "L2.hits": 1}
