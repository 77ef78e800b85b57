"""Random and mutated request bodies for every kvstore.v1 method, sent raw
(no stub serialises them) to one real server with shared memory on.

For each method the suite builds valid requests (real namespaces, keys that
are stored, live shared-memory reservations and leases), damages most of
them (tests/fuzz/mutations.py) and sends them. It asserts what a client in
any language relies on:

* no answer is UNKNOWN or INTERNAL: a request the server cannot use gets a
  precise status (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...);
* the server is alive after, serves a round trip, and logged no traceback;
* accounting returns to zero: once the reservations and leases the fuzz took
  have expired and the namespaces it wrote to are flushed, the shm broker
  holds no reservation or lease and L1/L2 hold no block and no byte.

Seeded (KVSTORE_FUZZ_SEED, default fixed) so a failure replays. The default
run sends KVSTORE_FUZZ_EXAMPLES (default 300) bodies per method, about 30 s
in all; a longer run: ``KVSTORE_FUZZ_EXAMPLES=5000 pytest tests/fuzz``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import mmap
import os
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from mutations import Mutator
from serverproc import ServerProcess

from kvstore import Client
from kvstore.block.crc32c import crc32c
from kvstore.wire.pb import kvstore_pb2 as pb

pytest.importorskip("prometheus_client", reason="the shm gauges need the kvstore[metrics] extra")

SEED = int(os.environ.get("KVSTORE_FUZZ_SEED", "1203"))
EXAMPLES = int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "300"))
SERVICE = "/kvstore.v1.KVStore/"
NAMESPACES = ["fz-a", "fz.b", "Fz:c"]
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
#: Short lifetimes, so that what the fuzz reserved, leased or pinned and never
#: gave back is gone within a bounded wait.
LIFETIME_MS = "400"
WAIT_S = 30.0

#: method -> (request message, kind)
METHODS: dict[str, tuple[Any, str]] = {
    "Get": (pb.GetRequest, "unary_stream"),
    "GetSmall": (pb.GetRequest, "unary"),
    "Lookup": (pb.LookupRequest, "unary"),
    "Delete": (pb.DeleteRequest, "unary"),
    "Stats": (pb.StatsRequest, "unary"),
    "SessionEvent": (pb.SessionEventRequest, "unary"),
    "ShmAttach": (pb.ShmAttachRequest, "unary"),
    "ShmReserve": (pb.ShmReserveRequest, "unary"),
    "ShmCommit": (pb.ShmCommitRequest, "unary"),
    "ShmAcquire": (pb.ShmAcquireRequest, "unary"),
    "ShmRelease": (pb.ShmReleaseRequest, "unary"),
    "ListBlocks": (pb.ListBlocksRequest, "unary_stream"),
    "Flush": (pb.FlushRequest, "unary"),
    "OpenDataPlane": (pb.OpenDataPlaneRequest, "unary"),
}
#: Every rpc of the service is fuzzed: Put here, the others above.
assert set(pb.DESCRIPTOR.services_by_name["KVStore"].methods_by_name) == {*METHODS, "Put"}

#: What the fuzz saw, per method and status, for the summary at the end.
SEEN: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    shm = f"/dev/shm/kvstore-fuzz-{os.getpid()}"
    srv = ServerProcess(
        tmp_path_factory.mktemp("fuzz"),
        "--l1-shm-path", shm, "--server-metrics-listen", "127.0.0.1:0",
        "--server-shm-reserve-ms", LIFETIME_MS, "--server-shm-lease-ms", LIFETIME_MS,
        "--server-max-lease-ms", LIFETIME_MS, "--server-max-pin-ms", LIFETIME_MS,
        l1_capacity="64MiB")
    with srv:
        yield srv
    summary = {m: dict(c) for m, c in sorted(SEEN.items())}
    if path := os.environ.get("KVSTORE_FUZZ_REPORT"):
        Path(path).write_text(json.dumps(summary, indent=1))


class Fuzz:
    """One method's fuzz run: valid requests, their damaged copies, the calls."""

    def __init__(self, server: ServerProcess, channel: grpc.Channel, method: str) -> None:
        self.server = server
        self.channel = channel
        self.method = method
        self.rng = random.Random(f"{SEED}:{method}")
        self.namespaces = set(NAMESPACES)  # every namespace a body may have written to
        self.keys = [b"k%d" % i for i in range(6)] + [self.rng.randbytes(32) for _ in range(4)]
        attach = pb.ShmAttachResponse.FromString(self.unary("ShmAttach", b""))
        self.owner = attach.owner
        self.arena_path = attach.path

    # ---- calls ------------------------------------------------------------

    def unary(self, method: str, body: bytes) -> bytes:
        return self.channel.unary_unary(SERVICE + method)(body, timeout=WAIT_S)  # type: ignore[no-any-return]

    def send(self, body: bytes) -> None:
        """Send one body to the method under test and check the answer."""
        message, kind = METHODS[self.method]
        self._note_namespace(message, body)
        try:
            if kind == "unary":
                self.unary(self.method, body)
            else:
                list(self.channel.unary_stream(SERVICE + self.method)(body, timeout=WAIT_S))
        except grpc.RpcError as err:
            self._check(err, body)
        else:
            SEEN[self.method]["OK"] += 1

    def send_put(self, chunks: list[bytes]) -> None:
        if chunks:
            self._note_namespace(pb.PutChunk, chunks[0])
        try:
            self.channel.stream_unary(SERVICE + "Put")(iter(chunks), timeout=WAIT_S)
        except grpc.RpcError as err:
            self._check(err, b"|".join(chunks))
        else:
            SEEN["Put"]["OK"] += 1

    def _check(self, err: grpc.RpcError, body: bytes) -> None:
        code = err.code()
        SEEN[self.method]["OK" if code is None else code.name] += 1
        assert code not in FORBIDDEN, (
            f"{self.method} answered {code} {err.details()!r} to body {body[:200].hex()}"
            f" ({len(body)} bytes; seed {SEED})")
        if code not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.UNAVAILABLE):
            # Every error a client can cause names its class for SDKs.
            assert "kvstore-error" in dict(err.trailing_metadata() or ()), (
                self.method, code, err.details(), body[:200].hex())

    def _note_namespace(self, message: Any, body: bytes) -> None:
        try:
            namespace = message.FromString(body).namespace
        except DecodeError:  # an unparsable body writes nowhere
            return
        self.namespaces.add(namespace)

    # ---- valid requests ---------------------------------------------------

    def namespace(self) -> str:
        return self.rng.choice(NAMESPACES)

    def some_keys(self) -> list[bytes]:
        return self.rng.sample(self.keys, self.rng.randint(1, 5))

    def store_blocks(self) -> None:
        """Blocks for the reads to hit (sizes up to 2 KiB keep 1-byte chunks cheap)."""
        for namespace in NAMESPACES:
            with Client(self.server.tcp, namespace=namespace) as c:
                c.put({k: self.rng.randbytes(self.rng.randint(1, 2048)) for k in self.keys[::2]})

    def reserve(self, namespace: str) -> list[Any]:
        request = pb.ShmReserveRequest(
            namespace=namespace, owner=self.owner,
            blocks=[pb.ShmBlockSpec(key=k, size=self.rng.randint(1, 4096))
                    for k in self.some_keys()])
        return list(pb.ShmReserveResponse.FromString(
            self.unary("ShmReserve", request.SerializeToString())).slots)

    def commit_request(self) -> Any:
        """A commit of live reservations whose bytes were written and checksummed."""
        namespace = self.namespace()
        slots = self.reserve(namespace)
        blocks = []
        with open(self.arena_path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as arena:
            for slot in slots:
                data = self.rng.randbytes(slot.size)
                arena[slot.offset:slot.offset + slot.size] = data
                blocks.append(pb.ShmCommitBlock(slot_id=slot.slot_id, offset=slot.offset,
                                                size=slot.size, crc32c=crc32c(data)))
        abandon = [blocks.pop().slot_id] if len(blocks) > 1 and self.rng.random() < 0.3 else []
        return pb.ShmCommitRequest(namespace=namespace, ack=self.rng.choice([0, 1, 2]),
                                   blocks=blocks, abandon=abandon, owner=self.owner)

    def lease_ids(self, namespace: str) -> list[int]:
        request = pb.ShmAcquireRequest(namespace=namespace, keys=self.some_keys(),
                                       owner=self.owner)
        leases = pb.ShmAcquireResponse.FromString(
            self.unary("ShmAcquire", request.SerializeToString())).leases
        return [lease.lease_id for lease in leases if lease.hit]

    def valid_request(self) -> Any:
        ns, rng = self.namespace(), self.rng
        session = rng.choice(["", "s1", "s2"])
        make: dict[str, Callable[[], Any]] = {
            "Get": lambda: pb.GetRequest(namespace=ns, keys=self.some_keys(), session_id=session,
                                         max_chunk_bytes=rng.choice([0, 512, 4096])),
            "GetSmall": lambda: pb.GetRequest(namespace=ns, keys=self.some_keys(),
                                              max_response_bytes=rng.choice([0, 100, 8192])),
            "Lookup": lambda: pb.LookupRequest(namespace=ns, keys=self.some_keys(),
                                               lease_ms=rng.choice([0, 100]), session_id=session),
            "Delete": lambda: pb.DeleteRequest(namespace=ns, keys=self.some_keys()),
            "Stats": lambda: pb.StatsRequest(namespace=rng.choice(["", ns])),
            "SessionEvent": lambda: self.session_event(ns),
            "ShmAttach": lambda: pb.ShmAttachRequest(namespace=rng.choice(["", ns])),
            "ShmReserve": lambda: pb.ShmReserveRequest(
                namespace=ns, owner=self.owner, session_id=session,
                blocks=[pb.ShmBlockSpec(key=k, size=rng.randint(1, 8192))
                        for k in self.some_keys()]),
            "ShmCommit": self.commit_request,
            "ShmAcquire": lambda: pb.ShmAcquireRequest(
                namespace=ns, keys=self.some_keys(), owner=self.owner,
                lease_ms=rng.choice([0, 100]), release=self.lease_ids(ns)[:rng.randint(0, 2)]),
            "ShmRelease": lambda: pb.ShmReleaseRequest(
                namespace=ns, owner=self.owner, lease_ids=self.lease_ids(ns)),
            "ListBlocks": lambda: pb.ListBlocksRequest(
                namespace=ns, prefix=rng.choice([b"", b"k", b"k1"]), limit=rng.choice([0, 2])),
            "Flush": lambda: pb.FlushRequest(namespace=ns),
            "OpenDataPlane": lambda: pb.OpenDataPlaneRequest(
                namespace=rng.choice(["", ns]), shm_owner=rng.choice(["", self.owner])),
        }
        return make[self.method]()

    def session_event(self, namespace: str) -> Any:
        event = self.rng.choice([
            {"turn_end": pb.TurnEnd(reason=self.rng.randint(0, 3), expected_gap_ms=50,
                                    tool_name="grep")},
            {"session_end": pb.SessionEnd(discard=self.rng.random() < 0.5)},
            {"prefetch": pb.Prefetch(keys=self.some_keys())},
            {"pin": pb.Pin(keys=self.some_keys(), ttl_ms=self.rng.choice([0, 100]))},
            {"unpin": pb.Unpin(keys=self.some_keys())},
        ])
        return pb.SessionEventRequest(namespace=namespace, session_id="s1", **event)

    def put_chunks(self) -> list[bytes]:
        """A valid Put stream: 1-3 blocks, each split into 1-3 chunks."""
        chunks: list[Any] = []
        for key in self.some_keys()[:3]:
            data = self.rng.randbytes(self.rng.randint(1, 3000))
            cuts = sorted(self.rng.sample(range(1, len(data) + 1), min(len(data), 2)))
            bounds = zip([0, *cuts], [*cuts, len(data)], strict=True)
            pieces = [data[a:b] for a, b in bounds if b > a]
            chunks.append(pb.PutChunk(key=key, block_size=len(data), data=pieces[0],
                                      format=self.rng.choice([0, 0, 0, 1])))
            chunks += [pb.PutChunk(data=p) for p in pieces[1:]]
        chunks[0].namespace = self.namespace()
        chunks[0].ack = self.rng.choice([0, 1, 2, 3])
        return [c.SerializeToString() for c in chunks]

    # ---- damage -----------------------------------------------------------

    def body(self) -> bytes:
        message, _ = METHODS[self.method]
        valid = self.valid_request().SerializeToString()
        if self.rng.random() < 0.15:
            return valid
        return Mutator(self.rng, message.DESCRIPTOR).mutate(valid)

    def put_stream(self) -> list[bytes]:
        chunks = self.put_chunks()
        mutator = Mutator(self.rng, pb.PutChunk.DESCRIPTOR)
        for _ in range(self.rng.choice((0, 1, 1, 2, 3))):
            at = self.rng.randrange(len(chunks)) if chunks else 0
            action = self.rng.randrange(6)
            if action == 0 and chunks:
                chunks[at] = mutator.mutate(chunks[at])
            elif action == 1 and chunks:
                del chunks[at]
            elif action == 2 and chunks:
                chunks.insert(at, chunks[at])
            elif action == 3 and len(chunks) > 1:
                chunks[at], chunks[-1] = chunks[-1], chunks[at]
            elif action == 4:
                chunks.insert(at, b"")
            else:
                chunks.insert(at, mutator.mutate(b""))
        return chunks

    # ---- accounting -------------------------------------------------------

    def assert_back_to_zero(self) -> None:
        """Nothing reserved or leased once lifetimes passed; nothing stored
        once every namespace written to is flushed; serving; no traceback."""
        wait_for("the shm broker holds no reservation and no lease",
                 lambda: shm_gauges(self.server) == (0.0, 0.0), self.server)
        def flushed_and_empty() -> bool:
            for namespace in self.namespaces:
                try:
                    self.unary("Flush", pb.FlushRequest(namespace=namespace).SerializeToString())
                except grpc.RpcError as err:  # a namespace the server never accepted
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            stats = pb.StatsResponse.FromString(
                self.unary("Stats", pb.StatsRequest().SerializeToString()))
            return all(t.blocks == 0 and t.bytes == 0 for t in stats.tiers)
        wait_for("L1 and L2 hold no block after the flush", flushed_and_empty, self.server)
        assert self.server.alive()
        with Client(self.server.tcp, namespace="alive") as c:
            c.put({b"ping": b"pong"})
            assert c.get([b"ping"]) == [b"pong"]
            c.delete([b"ping"])
        assert "Traceback" not in self.server.log(), self.server.log()


def metrics_address(server: ServerProcess) -> str:
    ready = sorted(server.data_dir.glob("ready-*.json"))[-1]
    return str(json.loads(ready.read_text())["metrics"])


def shm_gauges(server: ServerProcess) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://{metrics_address(server)}/metrics",
                                timeout=10) as reply:
        values = {}
        for line in reply.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in ("kvstore_shm_reservations", "kvstore_shm_leases"):
                values[name] = float(value)
    return values["kvstore_shm_reservations"], values["kvstore_shm_leases"]


def wait_for(what: str, check: Callable[[], bool], server: ServerProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {WAIT_S} s: {what}\n{server.log()}")
        time.sleep(0.05)  # polling with a deadline, not synchronisation by sleep


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.tcp) as ch:
        yield ch


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mutated_bodies_get_a_precise_status_and_leave_nothing_behind(
        server: ServerProcess, channel: grpc.Channel, method: str) -> None:
    fuzz = Fuzz(server, channel, method)
    fuzz.store_blocks()
    for _ in range(EXAMPLES):
        fuzz.send(fuzz.body())
    fuzz.assert_back_to_zero()


def test_mutated_put_streams_get_a_precise_status_and_leave_nothing_behind(
        server: ServerProcess, channel: grpc.Channel) -> None:
    fuzz = Fuzz(server, channel, "Put")
    for _ in range(EXAMPLES):
        fuzz.send_put(fuzz.put_stream())
    assert SEEN["Put"]["OK"] > 0  # some streams stayed valid: blocks were stored
    fuzz.assert_back_to_zero()


def test_mutated_bodies_from_concurrent_clients_leave_nothing_behind(
        server: ServerProcess, channel: grpc.Channel) -> None:
    """Writers, readers, shm commits and releases, deletes and flushes at
    once: the races a sequential run cannot reach."""
    methods = ["Put", "ShmCommit", "ShmAcquire", "ShmRelease", "Get", "Delete", "Flush",
               "SessionEvent"]
    fuzzes = [Fuzz(server, channel, method) for method in methods]
    fuzzes[0].store_blocks()

    def run(fuzz: Fuzz) -> None:
        for _ in range(max(EXAMPLES // 3, 1)):
            if fuzz.method == "Put":
                fuzz.send_put(fuzz.put_stream())
            else:
                fuzz.send(fuzz.body())

    with concurrent.futures.ThreadPoolExecutor(len(fuzzes)) as pool:
        for done in [pool.submit(run, fuzz) for fuzz in fuzzes]:
            done.result()  # re-raises a thread's failed assertion
    for fuzz in fuzzes[1:]:
        fuzzes[0].namespaces |= fuzz.namespaces
    fuzzes[0].assert_back_to_zero()
