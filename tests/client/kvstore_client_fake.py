"""An in-process fake kvstore server (sync grpc, a dict) for the SDK's tests.

It follows the kvstore.v1 contract closely enough to test the client's
chunking, reassembly, cancellation and error mapping without the real server.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvstore.wire.pb import kvstore_pb2 as pb
from kvstore.wire.pb import kvstore_pb2_grpc as pb_grpc


@dataclass
class FakeState:
    blocks: dict[tuple[str, bytes], bytes] = field(default_factory=dict)
    put_messages: list[pb.PutChunk] = field(default_factory=list)
    get_requests: list[pb.GetRequest] = field(default_factory=list)
    session_events: list[pb.SessionEventRequest] = field(default_factory=list)
    default_chunk: int = 1024 * 1024
    get_cancelled: threading.Event = field(default_factory=threading.Event)
    # namespace → (status code, kvstore-error name or None, details)
    fail: dict[str, tuple[grpc.StatusCode, str | None, str]] = field(default_factory=dict)
    # Set: Put (at its first message) and Lookup set ``arrived``, then wait for it.
    hold: threading.Event | None = None
    arrived: threading.Event = field(default_factory=threading.Event)


def _maybe_hold(state: FakeState) -> None:
    if state.hold is not None:
        state.arrived.set()
        state.hold.wait(60)


def _maybe_fail(state: FakeState, namespace: str, context: grpc.ServicerContext) -> None:
    if namespace in state.fail:
        code, name, details = state.fail[namespace]
        if name:
            context.set_trailing_metadata((("kvstore-error", name),))
        context.abort(code, details)


class FakeKVStore(pb_grpc.KVStoreServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def Put(self, request_iterator: Any, context: grpc.ServicerContext) -> pb.PutResponse:
        ns = None
        key = None
        size = 0
        buf = bytearray()
        stored = nbytes = 0
        for m in request_iterator:
            self.state.put_messages.append(m)
            if ns is None:
                ns = m.namespace
                _maybe_fail(self.state, ns, context)
                _maybe_hold(self.state)
            if m.key:
                if key is not None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "new block before end")
                key, size, buf = m.key, m.block_size, bytearray()
            buf += m.data
            if key is not None and len(buf) == size:
                self.state.blocks[(ns, key)] = bytes(buf)
                stored += 1
                nbytes += size
                key = None
        return pb.PutResponse(stored=stored, bytes=nbytes)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Any:
        self.state.get_requests.append(request)
        _maybe_fail(self.state, request.namespace, context)
        context.add_callback(self.state.get_cancelled.set)
        chunk = request.max_chunk_bytes or self.state.default_chunk
        for i, k in enumerate(request.keys):
            v = self.state.blocks.get((request.namespace, k))
            if v is None:
                yield pb.GetChunk(index=i, hit=False)
                continue
            for off in range(0, len(v), chunk):
                first = off == 0
                yield pb.GetChunk(index=i, hit=True, block_size=len(v) if first else 0,
                                  offset=off, data=v[off:off + chunk], tier=1 if first else 0)

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> Any:
        _maybe_fail(self.state, request.namespace, context)
        _maybe_hold(self.state)
        tiers = [pb.TIER_L1 if (request.namespace, k) in self.state.blocks else pb.TIER_UNSPECIFIED
                 for k in request.keys]
        found = 0
        for t in tiers:
            if t == pb.TIER_UNSPECIFIED:
                break
            found += 1
        return pb.LookupResponse(found=found, tiers=tiers)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> Any:
        _maybe_fail(self.state, request.namespace, context)
        n = sum(self.state.blocks.pop((request.namespace, k), None) is not None
                for k in request.keys)
        return pb.DeleteResponse(deleted=n)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> Any:
        nbytes = sum(len(v) for v in self.state.blocks.values())
        return pb.StatsResponse(
            tiers=[pb.TierStats(tier=pb.TIER_L1, blocks=len(self.state.blocks), bytes=nbytes,
                                capacity=1 << 30, hits=3, misses=1),
                   pb.TierStats(tier=pb.TIER_L2, capacity=1 << 33)],
            puts=len(self.state.blocks), gets=4, get_hits=3, policy="lru")

    def SessionEvent(self, request: pb.SessionEventRequest, context: grpc.ServicerContext) -> Any:
        _maybe_fail(self.state, request.namespace, context)
        self.state.session_events.append(request)
        return pb.SessionEventResponse()


class FakeServer:
    def __init__(self, unix: str | None = None) -> None:
        self.state = FakeState()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_receive_message_length", 8 << 20),
                     ("grpc.max_send_message_length", 8 << 20)],
        )
        pb_grpc.add_KVStoreServicer_to_server(FakeKVStore(self.state), self.server)
        if unix:
            self.server.add_insecure_port(f"unix:{unix}")
            self.target = f"unix:{unix}"
        else:
            port = self.server.add_insecure_port("127.0.0.1:0")
            self.target = f"127.0.0.1:{port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None).wait()
