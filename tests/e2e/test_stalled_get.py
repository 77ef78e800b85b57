"""A gRPC Get whose client does not read it: what the server holds for it is
bounded (docs/reliability.md section 1, "What one client can make the server
hold"). A write the client takes nothing of for server.put_idle_ms ends the
call DEADLINE_EXCEEDED and lets its block's pin go; the chunks of all such
calls together stay within the server's budget for streamed responses.

The client that does not read is grpc's own with its bandwidth probe off, so
each stream's HTTP/2 window stays at 64 KiB (what a client that withholds its
window updates does): with the probe on, grpc's client takes in megabytes per
stream whether or not the application reads them, and the server sees a slow
reader rather than a stalled one."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from memsample import PeakMemory

from kvstore import Client
from kvstore.wire.pb import kvstore_pb2 as pb
from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc

MiB = 1024**2

#: A client that reads nothing it is not asked for.
STALLED = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 * MiB)]
READER = [("grpc.max_receive_message_length", 64 * MiB)]


def read_all(call: grpc.Call) -> bytes:
    data = bytearray()
    for chunk in call:  # type: ignore[attr-defined]
        assert chunk.hit and chunk.offset == len(data)
        data += chunk.data
    return bytes(data)


def test_a_get_never_read_ends_deadline_exceeded_and_lets_its_block_go(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The block is pinned while the Get streams it; a Put that needs its L1
    room succeeds once the idle limit has ended the Get (it waited for room
    for as long as the Get went on), and the client, reading at last, gets
    DEADLINE_EXCEEDED naming the limit."""
    big, other = os.urandom(32 * MiB), os.urandom(32 * MiB)
    with server_factory("--server-put-idle-ms", "1500", l1_capacity="48MiB") as server, \
            Client(server.tcp, namespace="stall", timeout=20) as c, \
            grpc.insecure_channel(server.tcp, options=STALLED) as channel:
        c.put({b"big": big}, ack="local")  # in L2 as well: L1 may drop it once unpinned
        call = pb_grpc.KVStoreStub(channel).Get(
            pb.GetRequest(namespace="stall", keys=[b"big"]), timeout=60)
        call.initial_metadata()  # the server has opened (pinned) the block and started
        started = time.monotonic()
        c.put({b"other": other})  # needs big's room in L1
        waited = time.monotonic() - started
        assert 1.0 < waited < 15, waited  # it waited for the Get's pin, then no more
        received = bytearray()
        status = None
        try:
            for chunk in call:
                received += chunk.data
        except grpc.RpcError as exc:
            status = exc
        assert status is not None, f"the Get completed ({len(received)} bytes)"
        assert status.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "read nothing" in (status.details() or "")
        assert "server.put_idle_ms" in (status.details() or "")
        assert dict(status.trailing_metadata() or ())["kvstore-error"] == "DeadlineExceeded"
        assert len(received) < len(big) and big.startswith(received)
        assert c.get([b"big", b"other"]) == [big, other]  # nothing lost, and still serving


def test_unread_gets_hold_at_most_the_response_budget(server_factory) -> None:  # type: ignore[no-untyped-def]
    """100 Gets of a 32 MiB block in 3 MiB chunks that are never read (each held
    ~6 MiB before: 600 MiB, past the bound) keep the server's own memory under
    L1 + 300 MiB; another client's Get waits for room and completes once they
    have ended (here: their deadline, grpc then lets their chunks go)."""
    capacity = 64 * MiB
    block = os.urandom(32 * MiB)
    server = server_factory("--server-put-idle-ms", "1500", l1_capacity="64MiB").start()
    with Client(server.tcp, namespace="unread", timeout=30) as c:
        c.put({b"big": block})
    memory = PeakMemory(server.pid)
    request = pb.GetRequest(namespace="unread", keys=[b"big"], max_chunk_bytes=3 * MiB)
    try:
        with grpc.insecure_channel(server.tcp, options=STALLED) as hostile, \
                grpc.insecure_channel(server.tcp, options=READER) as reader:
            stub = pb_grpc.KVStoreStub(hostile)
            calls = [stub.Get(request, timeout=6) for _ in range(100)]  # never read
            for call in calls[:5]:
                call.initial_metadata()  # streaming (and not read)
            started = time.monotonic()
            got = read_all(pb_grpc.KVStoreStub(reader).Get(request, timeout=30))
            waited = time.monotonic() - started
            codes = {call.code() for call in calls}
    finally:
        memory.stop()
    assert got == block
    assert waited < 20, waited
    assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}, codes
    bound = capacity + 300 * MiB
    assert memory.peak < bound, (f"own memory peaked at {memory.peak / MiB:.0f} MiB "
                                 f"(from {memory.before / MiB:.0f}), bound {bound / MiB:.0f} MiB")
    assert server.alive()


# (bound: what the calls may add, grpc's parse of all of them at once included;
# before: +277 MiB and +403 MiB. The 200 Gets of ~1 MiB requests are all
# received and parsed by grpc before any kvstore code sees them, a transient
# that grows with the host's load (+114 MiB alone, +316 MiB beside another
# test worker in CI: docs/reliability.md, unary requests): that case checks
# the refusals, not a memory bound)
@pytest.mark.parametrize(("calls", "nkeys", "key_bytes", "bound"),
                         [(40, 65_536, 5, 120), (200, 9_300, 64, None)])
def test_unread_gets_of_many_keys_count_their_requests_in_the_budget(  # type: ignore[no-untyped-def]
        server_factory, calls: int, nkeys: int, key_bytes: int, bound: int | None) -> None:
    """A hostile-client review: 40 unread Gets, each naming 65,536 keys, held
    their requests (the keys as Python objects and protobuf's copy: ~11 MiB
    a call) beside their chunks, +440 MiB, past L1 + 300 MiB. A Get's
    reservation now counts its request too, its keys are not listed, and a
    Get whose request is large does not wait for room (waiting, it would hold
    its request uncounted): past the budget it is refused at once. A fix
    review then kept its requests just under 1 MiB (9,300 keys of 64 bytes):
    300 such Gets waited for room holding them, +590 MiB. A request is now
    counted for the whole call; it waits for room only while the requests so
    waiting (uncounted) stay under 16 MiB, else the Get is refused at once."""
    stored = [b"k%04d" % i + b"k" * (key_bytes - 5) for i in range(16)]
    server = server_factory("--server-put-idle-ms", "3000", l1_capacity="64MiB").start()
    with Client(server.tcp, namespace="many", timeout=30) as c:
        c.put({k: b"v" * 1000 for k in stored})
    memory = PeakMemory(server.pid)
    # 65,536 short keys, each its own object once decoded, all hits
    request = pb.GetRequest(namespace="many", keys=[stored[i % 16] for i in range(nkeys)])
    try:
        with grpc.insecure_channel(server.tcp, options=STALLED) as hostile:
            stub = pb_grpc.KVStoreStub(hostile)
            started = [stub.Get(request, timeout=8) for _ in range(calls)]  # never read
            memory.window(4)  # (what they hold meanwhile)
            refused = [call for call in started if call.done()]
            for call in started:
                call.cancel()
    finally:
        memory.stop()
    if bound is not None:
        assert memory.grew < bound * MiB, f"own memory grew {memory.grew / MiB:.0f} MiB"
    assert calls // 2 <= len(refused) < calls, len(refused)
    for call in refused:
        assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.code()
        assert "requests wait for it already" in (call.details() or "")
    with Client(server.tcp, namespace="many", timeout=30) as c:
        assert c.get(stored[:2]) == [b"v" * 1000] * 2


def test_a_caller_s_own_gets_of_many_keys_never_lock_each_other_out(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A fix review: with requests counted in the responses' budget, four
    Gets of 65,536 keys from one caller, read promptly, held their requests
    while each waited for response room that the others' requests took: for
    30 s nothing moved, then all four failed. Requests have a budget of
    their own now: each Get is answered, or refused at once."""
    stored = [b"k%04d" % i + b"k" * 59 for i in range(16)]  # 64-byte keys: 7 MiB requests
    server = server_factory(l1_capacity="64MiB").start()
    with Client(server.tcp, namespace="own", timeout=30) as c:
        c.put({k: b"v" * 1000 for k in stored})
    request = pb.GetRequest(namespace="own", keys=[stored[i % 16] for i in range(65_536)],
                            max_chunk_bytes=3 * MiB)
    outcomes: list[str] = []

    def get() -> None:
        with grpc.insecure_channel(server.tcp, options=READER) as channel:
            try:
                n = sum(1 for _ in pb_grpc.KVStoreStub(channel).Get(request, timeout=60))
                outcomes.append("ok" if n == 65_536 else f"short {n}")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

    started = time.monotonic()
    threads = [threading.Thread(target=get) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    took = time.monotonic() - started
    assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED"} and len(outcomes) == 4, outcomes
    assert "ok" in outcomes
    assert took < 25, f"{took:.0f} s: the Gets waited for each other"
