"""Fuzzing the data plane's frames: the decoders on arbitrary and mutated
bytes (hypothesis), and a live server fed mutated frames."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serverproc import ServerProcess

from dataplane.raw import (
    CLOSING,
    ERROR,
    GET,
    LOOKUP,
    PING,
    PUT,
    SESSION_EVENT,
    SHM_COMMIT,
    SHM_RELEASE,
    SHM_RESERVE,
    block_of,
    get,
    get_meta,
    header,
    keys,
    put,
    put_meta,
    request,
    s,
    session,
    u8,
    u32,
    u64,
    u64s,
)
from kvstore.dataplane import frames as f
from kvstore.errors import error_class_by_name

DECODERS: list[Callable[[bytes], Any]] = [
    f.Hello.decode, f.HelloOk.decode, f.LookupRequest.decode, f.LookupResult.decode,
    f.GetRequest.decode, f.GetBlock.decode, f.PutRequest.decode, f.Counted.decode,
    f.ShmReserveRequest.decode, f.ShmReserveResult.decode, f.ShmCommitRequest.decode,
    f.ShmAcquireRequest.decode, f.ShmAcquireResult.decode, f.ShmReleaseRequest.decode,
    f.ShmReleaseResult.decode, f.SessionEventRequest.decode, f.ErrorInfo.decode,
    # The extended SHM_COMMIT (FLAG_SHM_NEXT) and its answer.
    lambda meta: f.ShmCommitRequest.decode(meta, True), f.ShmCommitResult.decode,
]

VALID = [
    f.PutRequest("ns", [f.PutBlock(b"k" * 32, 4096, 1, 7), f.PutBlock(b"x", 1)], 2, "s").encode(),
    f.LookupRequest("ns", [b"a", b"bb"], 10, "sess").encode(),
    f.ShmAcquireRequest("ns", [b"a"], 5, [1, 2], "s").encode(),
    f.ShmCommitRequest("ns", [(1, 2, 3, 4, 0)], [9], 1).encode(),
    f.ShmCommitRequest("ns", [(1, 2, 3, 4, 0), (5, 6, 7, 8, 1)], [9], 1, True, "s",
                       [b"key", b""], [4096]).encode(),
    f.ShmCommitResult(1, 4096, 3, [(1, 2, 4096, 7)]).encode(),
    f.ShmAcquireResult(5, 1, [3], [None, f.ShmLease(1, 2, 3, 4, 5, 1),
                                   f.ShmUnleased(2)]).encode(),
    f.ErrorInfo(3, "InvalidKey", "key is empty").encode(),
]


def _decodes_or_refuses(decode: Callable[[bytes], Any], data: bytes) -> None:
    try:
        decode(data)
    except f.FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoders_take_any_bytes(data: bytes) -> None:
    for decode in DECODERS:
        _decodes_or_refuses(decode, data)
    try:
        f.decode_header(data)
    except f.FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 10_000), st.integers(0, 255),
       st.integers(0, 300))
def test_decoders_take_mutated_frames(valid: bytes, where: int, value: int, cut: int) -> None:
    mutated = bytearray(valid)
    mutated[where % len(mutated)] = value
    for data in (bytes(mutated), valid[:cut % (len(valid) + 1)]):
        for decode in DECODERS:
            _decodes_or_refuses(decode, data)


keys_st = st.lists(st.binary(min_size=1, max_size=64), max_size=8)
names = st.text(max_size=40)


@settings(max_examples=100, deadline=None)
@given(names, st.lists(st.tuples(st.binary(min_size=1, max_size=64), st.integers(1, 2**40),
                                 st.integers(0, 1), st.none() | st.integers(0, 2**32 - 1)),
                       max_size=6), st.integers(0, 3), names)
def test_put_request_round_trips(namespace: str, blocks: list[Any], ack: int,
                                 session_id: str) -> None:
    req = f.PutRequest(namespace, [f.PutBlock(*b) for b in blocks], ack, session_id)
    assert f.PutRequest.decode(req.encode()) == req


@settings(max_examples=200, deadline=None)
@given(names, keys_st, st.integers(0, 2**32 - 1),
       st.lists(st.integers(0, 2**64 - 1), max_size=5), names)
def test_acquire_and_lookup_round_trip(namespace: str, ks: list[bytes], lease: int,
                                       release: list[int], session_id: str) -> None:
    acquire = f.ShmAcquireRequest(namespace, ks, lease, release, session_id)
    assert f.ShmAcquireRequest.decode(acquire.encode()) == acquire
    lookup = f.LookupRequest(namespace, ks, lease, session_id)
    assert f.LookupRequest.decode(lookup.encode()) == lookup


lease_st = st.builds(f.ShmLease, *[st.integers(0, 2**64 - 1)] * 3, st.integers(0, 2**32 - 1),
                     st.integers(0, 2**64 - 1), st.integers(0, 255))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.lists(st.integers(0, 2**64 - 1), max_size=4),
       st.lists(st.none() | lease_st | st.builds(f.ShmUnleased, st.integers(1, 255)),
                max_size=6))
def test_acquire_answer_round_trips(lease_ms: int, released: int, expired: list[int],
                                    leases: list[Any]) -> None:
    """A lease, a miss, and a block found but not leased (hit 0, its tier set)
    each come back as they went."""
    answer = f.ShmAcquireResult(lease_ms, released, expired, leases)
    assert f.ShmAcquireResult.decode(answer.encode()) == answer


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.lists(st.integers(0, 2**64 - 1), max_size=4),
       st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                          st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**64 - 1)), max_size=6),
       st.integers(0, 255))
def test_an_answer_of_leases_only_is_the_general_encoders_bytes(
        lease_ms: int, released: int, expired: list[int],
        granted: list[tuple[int, int, int, int, int]], tier: int) -> None:
    """The server's answer to an acquire of L1 hits (encode_shm_acquire_granted)
    is byte for byte what the general encoder makes of the same leases."""
    leases: list[Any] = [f.ShmLease(*g, tier) for g in granted]
    assert f.encode_shm_acquire_granted(lease_ms, released, expired, granted, tier) == \
        f.encode_shm_acquire_result(lease_ms, released, expired, leases)


@settings(max_examples=200, deadline=None)
@given(names, st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                                 st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                 st.integers(0, 1)), max_size=5),
       st.lists(st.integers(0, 2**64 - 1), max_size=4), st.integers(0, 3), names,
       st.lists(st.binary(max_size=64), min_size=5, max_size=5),
       st.lists(st.integers(0, 2**64 - 1), max_size=4))
def test_shm_commit_round_trips_in_both_forms(namespace: str, blocks: list[Any],
                                              abandon: list[int], ack: int, session_id: str,
                                              ks: list[bytes], reserve_next: list[int]) -> None:
    plain = f.ShmCommitRequest(namespace, blocks, abandon, ack)
    assert f.ShmCommitRequest.decode(plain.encode()) == plain
    extended = f.ShmCommitRequest(namespace, blocks, abandon, ack, True, session_id,
                                  ks[:len(blocks)], reserve_next)
    assert f.ShmCommitRequest.decode(extended.encode(), True) == extended
    # An older server reading the extended form finds bytes left over: a
    # client sends it only to a server that announced FLAG_SHM_NEXT.
    with pytest.raises(f.FrameError):
        f.ShmCommitRequest.decode(extended.encode())


# -- a live server --------------------------------------------------------------------------

CORPUS = [
    request(PING, 1),
    request(GET, 2, get_meta("ns", [b"kept", b"miss"])),
    request(LOOKUP, 3, s("ns") + s("") + u32(0) + keys([b"kept"])),
    request(PUT, 4, put_meta("ns", [(b"fz", 8, 0, None)]), b"fuzzfuzz"),
    request(SHM_RELEASE, 5, s("ns") + u64s([1])),
    request(SESSION_EVENT, 6, s("ns") + s("x") + u8(1) + u8(1) + u64(0) + s("") + u8(0)),
    header(GET, 7, 0),
    # Answered from the server's readable callback when they need no waiting.
    request(SHM_RESERVE, 8, f.ShmReserveRequest("ns", [(b"", 4096), (b"fz2", 8192)]).encode()),
    request(SHM_COMMIT, 9, f.encode_shm_commit("ns", 0, [(1, 0, 4096, 0, 0)], [])),
    (lambda meta: header(SHM_COMMIT, 10, len(meta), 0, f.FLAG_SHM_NEXT) + meta)(
        f.encode_shm_commit("ns", 0, [(1, 0, 4096, 0, 1)], [2], [b"fz3"], "s", [4096])),
]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        if not data:
            data.append(rng.randrange(256))
        how = rng.randrange(4)
        if how == 0:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 1 and len(data) > 1:
            del data[rng.randrange(len(data)):]
        elif how == 2:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(data)


def _read_until_closed(raw: Any) -> list[tuple[int, int]]:
    """Every frame the server sends until it closes: (opcode, flags)."""
    seen = []
    while True:
        head = b""
        while len(head) < 24:
            try:
                chunk = raw.sock.recv(24 - len(head))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not head, "the server closed mid-header"
                return seen
            head += chunk
        assert head[:4] == b"KVDP" and head[4] == 1
        op, flags, _, meta_len, payload_len = head[5], *struct.unpack_from("<HIIQ", head, 6)
        body = raw.recv_exact(meta_len + payload_len)
        if op == ERROR:
            name_len = struct.unpack_from("<H", body, 2)[0]
            assert error_class_by_name(body[4:4 + name_len].decode()) is not None
        else:
            assert op & 0x80
        seen.append((op, flags))


def test_a_live_server_survives_mutated_frames(dp_server: ServerProcess) -> None:
    from dataplane.conftest import OPS

    rng = random.Random(14)
    keeper = session(dp_server.tcp, OPS, "tcp")
    assert put(keeper, 1, "ns", {b"kept": b"K" * 5000}).op == 0x85
    closed = answered = 0
    for _ in range(400):
        raw = session(dp_server.tcp, OPS)
        raw.send(b"".join(_mutate(rng, frame) if rng.random() < 0.7 else frame
                          for frame in rng.sample(CORPUS, 3)))
        raw.sock.shutdown(socket.SHUT_WR)  # the server sees the end: nothing waits for ever
        seen = _read_until_closed(raw)
        answered += len(seen)
        closed += any(flags & CLOSING for _, flags in seen)
        raw.close()
    assert closed > 0 and answered > closed  # both kinds of outcome were exercised
    assert [block_of(x) for x in get(keeper, 2, "ns", [b"kept"])] == [b"K" * 5000]
    assert "internal error" not in dp_server.log()


def _get_request_by_the_general_reader(data: bytes) -> f.GetRequest:
    r = f.MetaReader(data)
    namespace, session_id = r.str_(), r.str_()
    v = f.GetRequest(namespace, r.keys(), session_id)
    r.end()
    return v


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=120),
                 st.builds(lambda ns, ks, sid, cut: f.GetRequest(ns, ks, sid).encode()[cut:],
                           names, keys_st, names, st.integers(0, 3))))
def test_the_unrolled_get_decoder_agrees_with_the_general_one(data: bytes) -> None:
    try:
        expected: f.GetRequest | None = _get_request_by_the_general_reader(data)
    except f.FrameError:
        expected = None
    try:
        got: f.GetRequest | None = f.GetRequest.decode(data)
    except f.FrameError:
        got = None
    assert got == expected


def test_a_put_request_cut_short_names_the_block_it_cut() -> None:
    """Whole blocks are read in one go (PutRequest.decode); one cut short is
    read field by field, so the error names it."""
    blocks = [f.PutBlock(b"first" * 8, 10), f.PutBlock(b"second-key", 20, 0, 5)]
    meta = f.PutRequest("ns", blocks, 0, "").encode()
    second = meta.index(b"second-key")
    with pytest.raises(f.FrameError, match=r"blocks\[1\]\.key is 10 bytes"):
        f.PutRequest.decode(meta[:second + 4])
    with pytest.raises(f.FrameError, match="metadata truncated"):
        f.PutRequest.decode(meta[:-1])
    assert f.PutRequest.decode(meta).blocks == blocks
