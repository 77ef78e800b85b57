"""Round trips, Lookup, leases, Delete, Stats and SessionEvent against a real
server over 127.0.0.1 and a unix socket."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvstore import Client
from kvstore.types import TierName, TurnEnd, TurnEndReason


def ns(request: pytest.FixtureRequest) -> str:
    # A namespace per test keeps tests on the shared server independent.
    return "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:100]


@pytest.mark.parametrize("size", [1024, 64 * 1024, 1024**2, 4 * 1024**2 + 3, 64 * 1024**2])
def test_blocks_round_trip_byte_identical(target: str, size: int,
                                         request: pytest.FixtureRequest) -> None:
    data = os.urandom(size)
    with Client(target, namespace=ns(request)) as c:
        result = c.put({b"block": data})
        assert result.stored == 1 and result.bytes == size
        assert c.get([b"block"]) == [data]


def test_batch_put_and_get_in_request_order_with_misses(target: str,
                                                        request: pytest.FixtureRequest) -> None:
    blocks = {f"k{i}".encode(): os.urandom(1000 + i * 100) for i in range(20)}
    with Client(target, namespace=ns(request)) as c:
        assert c.put(blocks).stored == 20
        keys = [b"k5", b"missing", b"k0", b"k19", b"other"]
        got = c.get(keys)
        assert got == [blocks[b"k5"], None, blocks[b"k0"], blocks[b"k19"], None]


def test_numpy_in_and_get_into_caller_buffers(target: str, request: pytest.FixtureRequest) -> None:
    arrays = [np.random.default_rng(i).standard_normal(4096).astype(np.float16)
              for i in range(3)]
    with Client(target, namespace=ns(request)) as c:
        c.put([(f"a{i}".encode(), a) for i, a in enumerate(arrays)])
        outs = [np.zeros(4096, dtype=np.float16) for _ in range(4)]
        sizes = c.get_into([b"a0", b"a1", b"nope", b"a2"], outs)
        assert sizes == [8192, 8192, None, 8192]
        for want, got in zip(arrays, [outs[0], outs[1], outs[3]], strict=True):
            assert np.array_equal(want, got)


def test_lookup_counts_leading_present_keys(target: str, request: pytest.FixtureRequest) -> None:
    with Client(target, namespace=ns(request)) as c:
        c.put({b"p0": b"x" * 100, b"p1": b"y" * 100, b"p3": b"z" * 100})
        result = c.lookup([b"p0", b"p1", b"p2", b"p3"])
        assert result.found == 2
        assert result.tiers == [TierName.L1, TierName.L1, None, TierName.L1]
        assert c.lookup([b"p2", b"p0"]).found == 0
        assert c.lookup([]).found == 0


def test_namespaces_are_disjoint(target: str, request: pytest.FixtureRequest) -> None:
    base = ns(request)
    with Client(target) as c:
        c.put({b"same": b"tenant A"}, namespace=base + "-a")
        assert c.get([b"same"], namespace=base + "-b") == [None]
        assert c.lookup([b"same"], namespace=base + "-b").found == 0
        assert c.get([b"same"], namespace=base + "-a") == [b"tenant A"]


def test_delete_then_miss(target: str, request: pytest.FixtureRequest) -> None:
    with Client(target, namespace=ns(request)) as c:
        c.put({b"d1": b"1" * 10, b"d2": b"2" * 10})
        assert c.delete([b"d1", b"never"]) == 1
        assert c.get([b"d1", b"d2"]) == [None, b"2" * 10]


def test_overwrite_returns_latest(target: str, request: pytest.FixtureRequest) -> None:
    with Client(target, namespace=ns(request)) as c:
        c.put({b"k": b"old" * 1000})
        c.put({b"k": b"new!" * 500})
        assert c.get([b"k"]) == [b"new!" * 500]


def test_stats_count_puts_hits_and_misses(target: str, request: pytest.FixtureRequest) -> None:
    with Client(target, namespace=ns(request)) as c:
        before = c.stats()
        c.put({b"s1": b"a" * 4096})
        c.get([b"s1", b"s-missing"])
        after = c.stats()
        assert after.puts == before.puts + 1
        assert after.gets == before.gets + 2
        assert after.get_hits == before.get_hits + 1
        l1 = next(t for t in after.tiers if t.tier == TierName.L1)
        assert l1.capacity == 256 * 1024**2 and l1.blocks >= 1
        assert after.policy == "session"  # the default


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
def test_session_events_are_recorded(target: str, data_plane: bool,
                                     request: pytest.FixtureRequest) -> None:
    """Turn and session ends reach the policy: as frames on the data plane
    (one each, the default) or over gRPC."""
    with Client(target, namespace=ns(request), data_plane=data_plane) as c:
        before = c.stats().session_events
        c.get([b"warm-up"])  # opens the data-plane session
        frames_before = c.data_plane_calls
        c.session_event("s1", TurnEnd(TurnEndReason.TOOL_CALL, 1500, "bash"))
        c.turn_end("s1", "awaiting_user")
        c.session_end("s1")
        assert c.stats().session_events == before + 3
        assert c.data_plane_calls - frames_before == (3 if data_plane else 0)


def test_ack_local_put_is_in_l2_when_acknowledged(target: str,
                                                  request: pytest.FixtureRequest) -> None:
    with Client(target, namespace=ns(request)) as c:
        before = next(t for t in c.stats().tiers if t.tier == TierName.L2).blocks
        c.put({b"durable": os.urandom(100_000)}, ack="local")
        after = next(t for t in c.stats().tiers if t.tier == TierName.L2).blocks
        assert after >= before + 1
