"""One round trip per shared-memory Put (issue 14, item 1): anonymous slots
reserved ahead, bound to a key at commit, end to end against a real server.

Round trips are counted with a client interceptor on the ShmClient's channel;
the server's accounting is read from its Prometheus gauge
(``kvstore_shm_reservations``)."""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import kvstore.client.sync as sync_client
from kvstore._impl import checksum
from kvstore.client.shm import ShmClient
from kvstore.errors import BlockTooLarge, ConnectionFailed, InvalidArgument, PermissionDenied
from kvstore.wire.pb import kvstore_pb2 as pb

pytest.importorskip("prometheus_client", reason="prometheus-client is the kvstore[metrics] extra")

MiB = 1024**2


def grpc_shm_client(target: str, **settings: Any) -> ShmClient:
    """A ShmClient kept on gRPC: the stock serves the gRPC path only (over the
    data plane a reserve and a commit are two frames, cheaper than one gRPC
    commit; the last test checks that path)."""
    return ShmClient(target, data_plane=False, **settings)


def block(i: int, size: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def _shm_path(tmp_path: Path, tag: str) -> str:
    return f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-{tag}"


@pytest.fixture
def stock_server(server_factory, tmp_path: Path) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "st"),
                            "--server-shm-namespaces", "a,b",
                            "--server-metrics-listen", "127.0.0.1:0", l1_capacity="64MiB")
    with server:
        yield server


def reservations(server: Any) -> int:
    """The server's count of live shared-memory reservations (its gauge)."""
    ready = max(server.data_dir.glob("ready-*.json"), key=lambda p: p.stat().st_mtime)
    address = re.search(r'"metrics":\s*"([^"]+)"', ready.read_text())
    assert address is not None
    with urllib.request.urlopen(f"http://{address.group(1)}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r"^kvstore_shm_reservations (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return int(float(found.group(1)))


class CountCalls(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts each unary call by method; ``edit`` may change a response."""

    def __init__(self, edit: Callable[[str, Any], None] | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.edit = edit

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        method = details.method.rsplit("/", 1)[-1]
        self.calls[method] += 1
        outcome = continuation(details, request)
        if self.edit is not None and outcome.code() is grpc.StatusCode.OK:
            self.edit(method, outcome.result())
        return outcome

    def take(self) -> Counter[str]:
        out, self.calls = self.calls, Counter()
        return out


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Callable[..., CountCalls]:
    """Make the next clients' channels count their calls."""

    def install(edit: Callable[[str, Any], None] | None = None) -> CountCalls:
        counter = CountCalls(edit)
        real = sync_client.open_channel

        def open_counted(*args: Any, **kwargs: Any) -> Any:
            return grpc.intercept_channel(real(*args, **kwargs), counter)

        monkeypatch.setattr(sync_client, "open_channel", open_counted)
        return counter

    return install


def test_later_puts_of_a_size_are_one_shm_commit_each(stock_server, counted) -> None:  # type: ignore[no-untyped-def]
    counter = counted()
    with grpc_shm_client(stock_server.unix_target, namespace="a", timeout=30) as c:
        assert c.slot_stock is not None
        counter.take()
        blobs = {f"m{i}".encode(): block(i, MiB) for i in range(6)}
        small = {f"s{i}".encode(): block(100 + i, 4096) for i in range(4)}
        # The first Put of a size reserves, and its commit restocks.
        assert c.put({b"m0": blobs[b"m0"]}).stored == 1
        assert counter.take() == Counter(ShmReserve=1, ShmCommit=1)
        for key in list(blobs)[1:]:
            assert c.put({key: blobs[key]}).stored == 1
            assert counter.take() == Counter(ShmCommit=1), key
        assert c.put({b"s0": small[b"s0"]}).stored == 1
        assert counter.take() == Counter(ShmReserve=1, ShmCommit=1)
        for key in list(small)[1:]:
            assert c.put({key: small[key]}).stored == 1
            assert counter.take() == Counter(ShmCommit=1), key
        # A Put of two sizes both in stock: one call too.
        assert c.put({b"m0": blobs[b"m1"], b"s0": small[b"s1"]}).stored == 2
        assert counter.take() == Counter(ShmCommit=1)
        want = {**blobs, **small, b"m0": blobs[b"m1"], b"s0": small[b"s1"]}
        assert c.get(list(want)) == list(want.values())
        counter.take()
        # Packing engine pages goes the same way (same-size blocks).
        np = pytest.importorskip("numpy")
        pages = [np.arange(4 * 2 * 16, dtype=np.float16).reshape(4, 2, 1, 16)] * 2
        for i in range(3):
            assert c.put_kv([f"kv{i}".encode()], pages, pages, [[i, i + 1]]).stored == 1
        assert counter.take() == Counter(ShmReserve=1, ShmCommit=3)
        out = [np.zeros((4, 2, 1, 16), np.float16) for _ in range(2)]
        assert c.get_kv_into([b"kv2"], out, out, [[0, 1]]) == 1
        assert (out[0][:2] == pages[0][2:4]).all()
    with grpc_shm_client(stock_server.unix_target, namespace="a", slot_stock=False) as c:
        assert c.slot_stock is None
        counter.take()
        for i in range(3):
            c.put({f"o{i}".encode(): block(i, 4096)})
        assert counter.take() == Counter(ShmReserve=3, ShmCommit=3)


def test_a_server_without_anonymous_slots_gets_two_calls_per_put(stock_server, counted) -> None:  # type: ignore[no-untyped-def]
    def older(method: str, response: Any) -> None:
        if method == "ShmAttach":
            response.anonymous_slots = False  # what a server before issue 14 sends

    counter = counted(older)
    with grpc_shm_client(stock_server.unix_target, namespace="a") as c:
        assert c.slot_stock is None
        counter.take()
        for i in range(3):
            assert c.put({f"k{i}".encode(): block(i, 8192)}).stored == 1
        assert counter.take() == Counter(ShmReserve=3, ShmCommit=3)
        assert c.get([b"k2"]) == [block(2, 8192)]
    assert reservations(stock_server) == 0


def test_a_server_before_the_arena_marker_is_mapped_unchecked(stock_server, counted) -> None:  # type: ignore[no-untyped-def]
    """A server before 0.21.0 answers ShmAttach without marker_offset (0) and
    writes no marker: a client of this release checks nothing then and works,
    data plane on or off (docs/deploy.md, "Upgrades and rollbacks"). The same
    answer with an offset and another instance id is refused: the check runs
    whenever the server says where its marker is."""
    marker = {"offset": False}

    def older(method: str, response: Any) -> None:
        if method == "ShmAttach":
            response.instance = "another-" + response.instance
            if not marker["offset"]:
                response.marker_offset = 0

    counted(older)
    for data_plane in (False, True):
        with ShmClient(stock_server.unix_target, namespace="a", data_plane=data_plane) as c:
            assert c.put({b"old": block(7, 8192)}).stored == 1
            assert c.get([b"old"]) == [block(7, 8192)]
            assert c.data_plane_calls > 0 if data_plane else c.data_plane_calls == 0
    marker["offset"] = True
    with pytest.raises(ConnectionFailed, match="is not the shared-memory arena"):
        ShmClient(stock_server.unix_target, namespace="a")


def test_stock_is_abandoned_at_close_and_l1_is_whole_again(stock_server) -> None:  # type: ignore[no-untyped-def]
    with grpc_shm_client(stock_server.unix_target, namespace="a", timeout=30) as c:
        c.put({b"x": block(1, 4 * MiB), b"y": block(2, 4 * MiB)})
        held = c.slot_stock.held()  # type: ignore[union-attr]
        assert held == 2  # 8 MiB: the stock's bound
        assert reservations(stock_server) == held
        # One block from stock, nothing asked back: one is enough for a Put like it.
        c.put({b"z": block(3, 4 * MiB)})
        assert c.slot_stock.held() == 1  # type: ignore[union-attr]
        assert reservations(stock_server) == 1
        assert c.delete([b"x", b"y", b"z"]) == 3
    assert reservations(stock_server) == 0
    # Nothing held: all of L1 can be reserved at once, without waiting.
    with grpc_shm_client(stock_server.unix_target, namespace="b", timeout=30,
                         slot_stock=False) as w:
        started = time.monotonic()
        slots = w.reserve([(f"f{i}".encode(), 16 * MiB) for i in range(4)])
        assert time.monotonic() - started < 5
        w.commit([], abandon=slots)


def test_stock_expires_and_is_taken_back(server_factory, tmp_path: Path, counted) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--l1-shm-path", _shm_path(tmp_path, "ex"),
                            "--server-shm-reserve-ms", "400", "--server-shm-quarantine-ms", "100",
                            "--server-metrics-listen", "127.0.0.1:0", l1_capacity="32MiB")
    counter = counted()
    with server:
        c = grpc_shm_client(server.unix_target, namespace="e", timeout=30)
        c.put({b"k0": block(0, MiB)})
        # The first Put's commit filled the stock (4 of a size on the gRPC path).
        assert reservations(server) == c.slot_stock.held() == 4  # type: ignore[union-attr]
        # The client holds its stock but does not use it: the server takes it back.
        deadline = time.monotonic() + 20
        while reservations(server) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the server's gauge, bounded
        assert reservations(server) == 0
        # The client knows its slot ran out: the next Put reserves anew.
        counter.take()
        assert c.put({b"k1": block(1, MiB)}).stored == 1
        assert counter.take() == Counter(ShmReserve=1, ShmCommit=1)
        assert c.get([b"k0", b"k1"]) == [block(0, MiB), block(1, MiB)]
        # Its expired extent comes back from quarantine: all of L1 can be reserved.
        assert c.delete([b"k0", b"k1"]) == 2
        c.close()
        with grpc_shm_client(server.unix_target, namespace="f", timeout=30, slot_stock=False) as w:
            # One slot of all of L1 (a reserve waits for room while an extent
            # is in quarantine: bounded, 30 s).
            slots = w.reserve([(b"all", 32 * MiB)])
            w.commit([], abandon=slots)
        assert reservations(server) == 0


# -- hostile and broken commits of anonymous slots ---------------------------------------


def _anonymous(c: ShmClient, namespace: str, size: int) -> pb.ShmSlot:
    [slot] = c._call(c._reserve, pb.ShmReserveRequest(
        namespace=namespace, owner=c._owner, blocks=[pb.ShmBlockSpec(size=size)])).slots
    return slot


def _commit(c: ShmClient, namespace: str, slot: pb.ShmSlot, key: bytes, data: bytes, *,
            size: int | None = None, **fields: Any) -> pb.ShmCommitResponse:
    c._arena[slot.offset : slot.offset + len(data)] = data
    return c._call(c._commit, pb.ShmCommitRequest(
        namespace=namespace, owner=c._owner, blocks=[pb.ShmCommitBlock(
            slot_id=slot.slot_id, offset=slot.offset, size=slot.size if size is None else size,
            crc32c=checksum(data), key=key)], **fields))


def test_anonymous_slot_bound_in_a_namespace_its_owner_may_not_use(stock_server) -> None:  # type: ignore[no-untyped-def]
    data = block(7, 4096)
    with grpc_shm_client(stock_server.unix_target, namespace="a", timeout=10) as c:
        slot = _anonymous(c, "a", 4096)
        # Another namespace the client may use, and one barred from shared memory.
        with pytest.raises(PermissionDenied, match="another client or namespace"):
            _commit(c, "b", slot, b"k", data)
        with pytest.raises(PermissionDenied, match="may not use shared memory"):
            _commit(c, "c", slot, b"k", data)
        assert c.get([b"k"], namespace="b") == [None]
        # Nothing changed: the slot is still the owner's, in its own namespace.
        assert _commit(c, "a", slot, b"k", data).stored == 1
        assert c.get([b"k"]) == [data]


def test_forged_and_foreign_slot_ids_are_refused(stock_server) -> None:  # type: ignore[no-untyped-def]
    data = block(8, 4096)
    with grpc_shm_client(stock_server.unix_target, namespace="a", timeout=10) as c, \
            grpc_shm_client(stock_server.unix_target, namespace="a", timeout=10) as thief:
        slot = _anonymous(c, "a", 4096)
        forged = pb.ShmSlot(slot_id=slot.slot_id ^ 0x5A5A5A, offset=slot.offset, size=4096)
        with pytest.raises(InvalidArgument, match="unknown"):
            _commit(c, "a", forged, b"f", data)
        with pytest.raises(PermissionDenied, match="another client"):
            _commit(thief, "a", slot, b"t", data)
        # A thief's restock never hands out the victim's slot.
        thief.put({b"own": data})
        stocked = thief.slot_stock._slots  # type: ignore[union-attr]
        assert all(s.slot_id != slot.slot_id for held in stocked.values() for s in held)
        assert thief.get([b"t", b"f"]) == [None, None]
        assert _commit(c, "a", slot, b"mine", data).stored == 1


def test_mismatched_or_missing_fields_are_invalid_argument(stock_server) -> None:  # type: ignore[no-untyped-def]
    data = block(9, 4096)
    with grpc_shm_client(stock_server.unix_target, namespace="a", timeout=10) as c:
        before = reservations(stock_server)
        slot = _anonymous(c, "a", 4096)
        with pytest.raises(InvalidArgument, match="do not match"):
            _commit(c, "a", slot, b"k", data, size=8192)
        # The slot named wrongly was given up (the client is broken).
        assert reservations(stock_server) == before
        slot = _anonymous(c, "a", 4096)
        with pytest.raises(InvalidArgument, match="must name one"):
            _commit(c, "a", slot, b"", data)
        [keyed] = c.reserve([(b"kk", 4096)])
        with pytest.raises(InvalidArgument, match="another key"):
            _commit(c, "a", pb.ShmSlot(slot_id=keyed.slot_id, offset=keyed.offset, size=4096),
                    b"other", data)
        # A restock of an impossible size fails the call before anything is stored.
        slot = _anonymous(c, "a", 4096)
        with pytest.raises(InvalidArgument, match=r"^reserve_next #0: block_size"):
            _commit(c, "a", slot, b"z", data, reserve_next=[0])
        with pytest.raises(BlockTooLarge, match=r"^reserve_next #1: "):
            _commit(c, "a", slot, b"z", data, reserve_next=[4096, 1 << 40])
        assert c.get([b"k", b"kk", b"z"]) == [None, None, None]
        assert _commit(c, "a", slot, b"z", data, reserve_next=[4096, 100]).next_slots
        assert c.get([b"z"]) == [data]


def test_over_the_data_plane_the_stock_lives_on_the_session(
        stock_server, counted) -> None:  # type: ignore[no-untyped-def]
    # With the data plane the stock is the data plane session's (reserve and
    # commit are frames, tests/shm/test_shm_dataplane_put.py): no gRPC Shm call
    # at all after the attach, the gRPC stock stays empty, and close gives back
    # the session's slot.
    counter = counted()
    with ShmClient(stock_server.unix_target, namespace="a", timeout=30) as c:
        counter.take()
        blobs = {f"d{i}".encode(): block(200 + i, MiB) for i in range(4)}
        for key, value in blobs.items():
            assert c.put({key: value}).stored == 1
        assert c.data_plane_active()
        assert not any(name.startswith("Shm") for name in counter.take())
        assert c.slot_stock is not None and c.slot_stock.drain() == {}
        # 8 stocked by the first Put's commit, 3 taken since (none asked for).
        assert c.stocked_slots() == 5 and reservations(stock_server) == 5
        assert c.get(list(blobs)) == list(blobs.values())
    assert reservations(stock_server) == 0
