"""A client killed while its PUT or SHM_COMMIT waits on the server (here for
room in the L2 write queue, ack=local) must not overwrite what a client after
it stored: found by a kill soak, where an engine restarted after a SIGKILL
read back its dead predecessor's bytes under a key it had put since."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import socket
import struct
import termios
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import lmdb
import pytest
from serverproc import ServerProcess

from dataplane.raw import (
    HELLO,
    PUT,
    SHM_COMMIT,
    SHM_RESERVE,
    connect,
    header,
    metric,
    open_dp,
    put_meta,
    request,
    s,
    u8,
    u32,
    u64,
    wait_until,
)
from kvstore import Client
from kvstore.checksum import checksum
from kvstore.types import TierName
from kvstore.wire.pb import kvstore_pb2 as pb

MiB = 1024 * 1024


@pytest.fixture
def server(server_factory, tmp_path: Path) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    srv = server_factory("--l1-shm-path", f"/dev/shm/kvstore-test-dead-{uuid.uuid4().hex[:8]}",
                         "--server-max-block-bytes", "4MiB", "--l2-write-queue-bytes", "4MiB",
                         "--server-metrics-listen", "127.0.0.1:0", l1_capacity="32MiB")
    with srv:
        yield srv


def _attach(srv: ServerProcess) -> pb.ShmAttachResponse:
    with grpc.insecure_channel(srv.tcp) as channel:
        call = channel.unary_unary("/kvstore.v1.KVStore/ShmAttach",
                                   request_serializer=pb.ShmAttachRequest.SerializeToString,
                                   response_deserializer=pb.ShmAttachResponse.FromString)
        return call(pb.ShmAttachRequest(namespace="ns"), timeout=10)  # type: ignore[no-any-return]


def _send_and_die(srv: ServerProcess, how: str, value: bytes) -> None:
    """A client that sends a Put of K at ack=local, all its bytes, and dies
    (its socket closed, as the kernel closes a killed process's)."""
    if how == "grpc_shm_commit":
        info = _attach(srv)
        with open(info.path, "r+b") as fh, mmap.mmap(fh.fileno(), info.size) as arena, \
                grpc.insecure_channel(srv.tcp) as channel:
            def rpc(name: str, req: type, resp: type):  # type: ignore[no-untyped-def]
                return channel.unary_unary(f"/kvstore.v1.KVStore/{name}",
                                           request_serializer=req.SerializeToString,  # type: ignore[attr-defined]
                                           response_deserializer=resp.FromString)  # type: ignore[attr-defined]
            slot = rpc("ShmReserve", pb.ShmReserveRequest, pb.ShmReserveResponse)(
                pb.ShmReserveRequest(namespace="ns", owner=info.owner,
                                     blocks=[pb.ShmBlockSpec(key=b"K", size=len(value))]),
                timeout=10).slots[0]
            arena[slot.offset:slot.offset + slot.size] = value
            # (held: a future dropped at once cancels its call, at times
            # before the server has taken the slot)
            pending = rpc("ShmCommit", pb.ShmCommitRequest, pb.ShmCommitResponse).future(
                pb.ShmCommitRequest(namespace="ns", ack=2, owner=info.owner, blocks=[
                    pb.ShmCommitBlock(slot_id=slot.slot_id, offset=slot.offset,
                                      size=slot.size, crc32c=checksum(value))]), timeout=30)
            # The commit has taken its slot (and waits for L2 room) before
            # the channel closes, which cancels the call.
            assert wait_until(lambda: metric(srv.data_dir, "kvstore_shm_reservations") == 0)
            assert not pending.done()  # (still waiting for L2 room)
        return
    owner = ""
    if how == "shm_commit":
        info = _attach(srv)
        owner = info.owner
    resp = open_dp(srv.tcp, shm_owner=owner)
    raw = connect(resp, "unix")
    raw.send(request(HELLO, 1, s(resp.ticket)))
    assert raw.frame().op == 0x81
    if how == "put":
        meta = put_meta("ns", [(b"K", len(value), 0, None)], ack=2)
        raw.send(header(PUT, 2, len(meta), len(value)) + meta + value)
    else:
        raw.send(request(SHM_RESERVE, 2, s("ns") + s("") + u32(1) + s(b"K") + u64(len(value))))
        answer = raw.frame().meta
        slot_id, offset, size = (int.from_bytes(answer[8 + 8 * i:16 + 8 * i], "little")
                                 for i in range(3))
        with open(info.path, "r+b") as fh, mmap.mmap(fh.fileno(), info.size) as arena:
            arena[offset:offset + size] = value
        raw.send(request(SHM_COMMIT, 3, s("ns") + u8(2) + u32(1) + u64(slot_id) + u64(offset)
                         + u64(size) + u32(checksum(value)) + u8(0) + u32(0)))
    raw.close()


@contextlib.contextmanager
def l2_writer_stalled(srv: ServerProcess, c: Client) -> Iterator[None]:
    """While inside, the L2 writer waits for LMDB's write lock (held here) and
    a 4 MiB Put at local fills its write queue: the next block at local
    waits for room. On the way out the writer goes on and that Put ends."""
    env = lmdb.open(str(srv.data_dir / "l2"), subdir=True, max_dbs=8, lock=True)
    txn = env.begin(write=True)
    filler = threading.Thread(
        target=lambda: c.put({b"F": b"f" * (4 * MiB)}, ack="local"), daemon=True)
    try:
        filler.start()
        assert wait_until(lambda: c.lookup([b"F"]).tiers == [TierName.L1])
        yield
    finally:
        txn.abort()
        env.close()
        filler.join(30)
    assert not filler.is_alive()


@pytest.mark.parametrize("how", ["put", "shm_commit", "grpc_shm_commit"])
def test_a_put_of_a_client_gone_while_it_waited_never_overwrites_a_later_one(
        server: ServerProcess, how: str) -> None:
    srv = server
    with Client(srv.tcp, namespace="ns", timeout=30, data_plane=False) as c:
        with l2_writer_stalled(srv, c):
            _send_and_die(srv, how, b"O" * MiB)
            c.put({b"K": b"N" * MiB})  # the next client's Put, acknowledged
        # The dead client's request has been handled once its connection is gone.
        assert wait_until(lambda: metric(srv.data_dir, "kvstore_dataplane_connections") == 0)
        assert c.get([b"K"]) == [b"N" * MiB]
        assert metric(srv.data_dir, "kvstore_shm_reservations") == 0
        # Nor kept in L1: the 32 MiB hold 32 blocks of 1 MiB again (a commit
        # given up part-way kept the extents of the blocks it had not stored).
        c.delete([b"K"])
        c.put({f"x{i}".encode(): b"x" * MiB for i in range(32)})
        assert c.lookup([f"x{i}".encode() for i in range(32)]).tiers == [TierName.L1] * 32


def _unread(sock: socket.socket) -> int:
    """Bytes sent on a unix socket that its peer has not read yet."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]  # type: ignore[no-any-return]


def test_a_put_of_a_client_that_only_half_closed_a_unix_socket_is_stored_and_answered(
        server: ServerProcess) -> None:
    """A client that shuts down its sending side after its PUT and waits for
    the answer is still there: on a unix socket the server tells that from a
    close (a killed client's), and stores the block after its wait."""
    srv = server
    with Client(srv.tcp, namespace="ns", timeout=30, data_plane=False) as c:
        with l2_writer_stalled(srv, c):
            resp = open_dp(srv.tcp)
            raw = connect(resp, "unix")
            raw.send(request(HELLO, 1, s(resp.ticket)))
            assert raw.frame().op == 0x81
            value = b"H" * MiB
            meta = put_meta("ns", [(b"K", len(value), 0, None)], ack=2)
            raw.send(header(PUT, 2, len(meta), len(value)) + meta + value)
            raw.sock.shutdown(socket.SHUT_WR)
            # The server has read all its bytes (none left unread in the socket),
            # and the PUT waits for room in the L2 write queue (writer stalled).
            assert wait_until(lambda: _unread(raw.sock) == 0)
        assert raw.frame().op == 0x85  # the PUT's answer
        raw.close()
        assert c.get([b"K"]) == [value]
