"""AsyncClient over the data plane (kvstore/client/aio_dataplane.py), end to
end against a real server on loopback TCP and its unix socket: the same
answers and errors as over gRPC, the fallback to gRPC, concurrent calls
pipelined on a few sessions, cancellation, and a server that restarts or dies
under a call."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dataplane.test_tls import certs  # noqa: F401 - the CA, server and client certificates
from serverproc import ServerProcess

from kvstore import TLS, AsyncClient, PutResult
from kvstore.client import aio_dataplane
from kvstore.errors import (
    BlockTooLarge,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidArgument,
    InvalidKey,
    KVStoreError,
    PermissionDenied,
    UnknownNamespace,
)
from kvstore.server.auth import hash_token
from kvstore.types import TierName

MiB = 1024**2
MODES: dict[str, bool | str] = {"dp-tcp": "tcp", "dp-unix": "unix", "grpc": False}


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("aio-dp"), "--server-namespaces", "dp,dp2",
                           "--server-max-block-bytes", str(16 * MiB),
                           "--server-metrics-listen", "127.0.0.1:0", l1_capacity="192MiB")
    with server:
        yield server


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def sessions_opened(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Where each data plane session went (the SDK's debug log)."""
    return [r.getMessage().rsplit(" to ", 1)[1] for r in caplog.records
            if r.name == "kvstore.client" and "data plane session" in r.getMessage()]


def client(server: ServerProcess, mode: str, **kw: Any) -> AsyncClient:
    return AsyncClient(server.tcp, namespace="dp", data_plane=MODES[mode], **kw)


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """A bounded wait for ``check`` (the event loop runs meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def warm_session(c: AsyncClient) -> aio_dataplane.AioConnection:
    """The client's one data-plane session, opened by a first small Put."""
    await c.put({b"warm": b"w" * 4096})
    [conn] = connections(c)
    return conn


def connections(c: AsyncClient) -> list[aio_dataplane.AioConnection]:
    assert c._data_plane is not None
    return c._data_plane._conns


def test_every_call_round_trips(dp_server: ServerProcess, mode: str) -> None:
    blocks = {f"{mode}-k{i}".encode(): os.urandom(1000 + 5000 * i) for i in range(6)}
    blocks[f"{mode}-big".encode()] = os.urandom(5 * MiB + 3)  # straight into its buffer
    keys = list(blocks)
    big = keys[-1]
    before = dp_server.exported("kvstore_dataplane_requests_total")

    async def body() -> int:
        async with client(dp_server, mode) as c:
            assert (await c.put(blocks)).stored == 7
            assert await c.get(keys) == list(blocks.values())
            got = await c.get([keys[0], b"missing", keys[3], b"gone"])
            assert got == [blocks[keys[0]], None, blocks[keys[3]], None]
            assert all(type(b) is bytes for b in await c.get([big, keys[1]]))
            hit = await c.lookup([keys[0], keys[1], b"missing", keys[2]])
            assert hit.found == 2 and hit.tiers == [TierName.L1, TierName.L1, None,
                                                     TierName.L1]
            outs: list[Any] = [np.zeros(40_000, dtype=np.uint8), np.zeros(10, dtype=np.uint8),
                    bytearray(6 * MiB)]
            assert await c.get_into([keys[5], b"nope", big], outs) == [26000, None,
                                                                       5 * MiB + 3]
            assert outs[0][:26000].tobytes() == blocks[keys[5]]
            assert not outs[1].any()  # a miss leaves its buffer as it was
            assert bytes(outs[2][: 5 * MiB + 3]) == blocks[big]
            await c.turn_end("s1", "tool_call", 500, "search")
            await c.session_end("s1")
            assert await c.delete([keys[0]]) == 1
            assert await c.get([keys[0], keys[1]]) == [None, blocks[keys[1]]]
            assert await c.get([]) == [] and (await c.lookup([])).found == 0
            assert await c.get_into([], []) == []
            return c.data_plane_calls

    used = run(body)
    after = dp_server.exported("kvstore_dataplane_requests_total")
    # put, get x3, lookup, get_into, turn end, session end, get (delete is gRPC)
    assert used == (0 if mode == "grpc" else 9)
    assert after == before if mode == "grpc" else after >= before + 9


def test_many_blocks_in_one_call(dp_server: ServerProcess, mode: str) -> None:
    """More block buffers than one sendmsg takes, and a Get answered in 700 frames."""
    blocks = [(f"{mode}-m{i}".encode(), os.urandom(100 + i)) for i in range(700)]

    async def body() -> None:
        async with client(dp_server, mode) as c:
            assert await c.put(blocks) == PutResult(700, sum(len(v) for _, v in blocks))
            keys = [k for k, _ in blocks]
            assert await c.get(keys) == [v for _, v in blocks]
            bufs = [bytearray(1000) for _ in keys]
            assert await c.get_into(keys, bufs) == [len(v) for _, v in blocks]
            assert all(b[: len(v)] == v for b, (_, v) in zip(bufs, blocks, strict=True))
            assert c.data_plane_calls == (0 if mode == "grpc" else 3)

    run(body)


def test_gets_larger_than_one_grpc_message(dp_server: ServerProcess, mode: str) -> None:
    """Over gRPC (the suite's other AsyncClient tests now take the data plane):
    GetSmall answers the blocks that fit one message and a stream the rest;
    the data plane gives the same answers."""
    small_messages = {"grpc.max_receive_message_length": 3 * MiB}
    blocks = {f"{mode}-s{i}".encode(): os.urandom(n)
              for i, n in enumerate([MiB, 2 * MiB + 5, 1000, 700 * 1024])}
    k0, k1, k2, k3 = blocks
    keys = [k3, k1, b"nope", k0, k2]
    want = [blocks[k3], blocks[k1], None, blocks[k0], blocks[k2]]

    async def body() -> None:
        async with client(dp_server, mode, options=small_messages) as c:
            await c.put(blocks)
            assert await c.get(keys) == want  # k3 by GetSmall, k1 on by a stream
            assert await c.get(keys) == want  # > 2 MiB expected: a stream
            assert await c.get([k2]) == [blocks[k2]]
            outs = [bytearray(3 * MiB) for _ in keys]
            assert await c.get_into(keys, outs) == [None if w is None else len(w)
                                                    for w in want]
            assert all(w is None or out[: len(w)] == w for w, out in zip(want, outs,
                                                                           strict=True))
            assert c.data_plane_calls == (0 if mode == "grpc" else 5)

    run(body)


def test_errors_are_the_grpc_classes_and_the_session_survives(
        dp_server: ServerProcess, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")

    async def body() -> None:
        async with client(dp_server, mode) as c:
            await c.put({b"e1": b"x" * 100})
            with pytest.raises(UnknownNamespace):
                await c.get([b"e1"], namespace="not-served")
            with pytest.raises(UnknownNamespace):
                await c.put({b"e1": b"y"}, namespace="not-served")
            with pytest.raises(UnknownNamespace):
                await c.lookup([b"e1"], namespace="not-served")
            with pytest.raises(InvalidKey):
                await c.lookup([b"k" * 65])
            with pytest.raises(BlockTooLarge if mode != "grpc" else KVStoreError):
                await c.put({b"e2": b"z" * (16 * MiB + 1), b"e3": b"w" * 10})
            with pytest.raises(InvalidArgument, match="buffer #1"):
                await c.get_into([b"e1", b"e1"], [bytearray(100), bytearray(99)])
            # Each error answered its request only: the same session goes on.
            assert await c.get([b"e1", b"e2"]) == [b"x" * 100, None]

    run(body)
    assert len(sessions_opened(caplog)) == (0 if mode == "grpc" else 1)


@pytest.mark.parametrize("mode", list(MODES))
def test_permission_denied_with_tokens(server_factory: type[ServerProcess], tmp_path: Path,
                                       mode: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{hash_token('alice-aio')} alice chat\n")
    srv = server_factory("--auth-tokens-file", str(tokens)).start()

    async def body() -> int:
        async with AsyncClient(srv.tcp, namespace="chat", token="alice-aio",
                               data_plane=MODES[mode]) as c:
            await c.put({b"p": b"1" * 10})
            assert await c.get([b"p"]) == [b"1" * 10]
            with pytest.raises(PermissionDenied):
                await c.get([b"p"], namespace="other")
            with pytest.raises(PermissionDenied):
                await c.put({b"p": b"2"}, namespace="other")
            with pytest.raises(PermissionDenied):
                await c.lookup([b"p"], namespace="other")
            return c.data_plane_calls

    assert run(body) == (0 if mode == "grpc" else 2)


def test_a_server_without_data_plane_is_served_over_grpc(
        server_factory: type[ServerProcess], dp_server: ServerProcess,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    srv = server_factory("--server-data-plane", "false").start()
    accepted = "kvstore_dataplane_connections_accepted_total"

    async def body() -> None:
        async with AsyncClient(srv.tcp, namespace="off") as c:
            await c.put({b"k": b"v" * 10})
            assert await c.get([b"k"]) == [b"v" * 10]
            assert (await c.lookup([b"k"])).found == 1
            assert not await c.data_plane_active() and c.data_plane_calls == 0
        before = dp_server.exported(accepted)
        # data_plane=False, or KVSTORE_DATA_PLANE=0, keep a server that offers it on gRPC.
        async with AsyncClient(dp_server.tcp, namespace="dp", data_plane=False) as c:
            await c.put({b"off": b"1"})
            assert await c.get([b"off"]) == [b"1"] and not await c.data_plane_active()
        monkeypatch.setenv("KVSTORE_DATA_PLANE", "0")
        async with AsyncClient(dp_server.tcp, namespace="dp") as c:
            assert await c.get([b"off"]) == [b"1"] and not await c.data_plane_active()
        async with AsyncClient(dp_server.tcp, namespace="dp", data_plane=True) as c:
            assert await c.data_plane_active()
        assert dp_server.exported(accepted) == before + 1
        monkeypatch.delenv("KVSTORE_DATA_PLANE")
        # A client with per-call metadata keeps to gRPC.
        async with AsyncClient(dp_server.tcp, namespace="dp", metadata={"x-tenant": "a"}) as c:
            assert await c.get([b"off"]) == [b"1"] and not await c.data_plane_active()

    run(body)
    assert any("offers no data plane" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidArgument, match="metadata"):
        AsyncClient(dp_server.tcp, metadata={"x-tenant": "a"}, data_plane="tcp")
    with pytest.raises(InvalidArgument, match="data_plane"):
        AsyncClient(dp_server.tcp, data_plane="quic")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_concurrent_calls_share_a_few_pipelined_sessions(
        dp_server: ServerProcess, transport: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    sizes = [4096, 300 * 1024, 1000, 2 * MiB + 7, 70 * 1024]
    blocks = {f"{transport}-g{i}".encode(): os.urandom(sizes[i % len(sizes)])
              for i in range(50)}
    keys = list(blocks)

    async def body() -> None:
        async with AsyncClient(dp_server.unix_target, namespace="dp2",
                               data_plane=transport) as c:
            puts = [c.put({k: v}) for k, v in blocks.items()]
            assert sum(r.stored for r in await asyncio.gather(*puts)) == 50
            got = await asyncio.gather(*(c.get([k]) for k in keys))
            assert got == [[blocks[k]] for k in keys]
            bufs = [bytearray(len(blocks[k]) + 10) for k in keys]
            sizes_got = await asyncio.gather(*(c.get_into([k, b"none"], [b, bytearray(1)])
                                               for k, b in zip(keys, bufs, strict=True)))
            assert sizes_got == [[len(blocks[k]), None] for k in keys]
            assert all(bytes(b[: len(blocks[k])]) == blocks[k]
                       for k, b in zip(keys, bufs, strict=True))
            # Gets, lookups and puts interleaved on the same sessions.
            mixed: list[Any] = await asyncio.gather(*(c.lookup([k]) if i % 3 == 0 else c.get([k])
                                           for i, k in enumerate(keys)),
                                         c.put({b"late": b"l" * 5000}))
            assert mixed[1] == [blocks[keys[1]]] and mixed[3].found == 1
            assert c.data_plane_calls == 50 * 4 + 1
            assert len(connections(c)) <= aio_dataplane.MAX_CONNECTIONS

    run(body)
    assert 1 <= len(sessions_opened(caplog)) <= aio_dataplane.MAX_CONNECTIONS


def test_a_cancelled_call_leaves_its_session_usable(
        server_factory: type[ServerProcess], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The answer of a cancelled Get is read and dropped, never written into
    its caller's buffer; a cancelled Put still sends its bytes as they were
    at the call; the calls pipelined behind both are answered right."""
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    monkeypatch.setattr(aio_dataplane, "MAX_CONNECTIONS", 1)  # everything pipelined
    srv = server_factory(l1_capacity="256MiB").start()
    big = os.urandom(24 * MiB)
    small = os.urandom(5000)

    async def body() -> None:
        async with AsyncClient(srv.unix_target, namespace="cx", data_plane="unix") as c:
            await c.put({b"big": big, b"small": small})
            [conn] = connections(c)
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                buf = bytearray(24 * MiB)
                cancelled = asyncio.ensure_future(c.get_into([b"big"], [buf]))
                behind = asyncio.ensure_future(c.get([b"small", b"big"]))
                data = bytearray(big[: 16 * MiB])
                put = asyncio.ensure_future(c.put({b"new": data}))
                after = asyncio.ensure_future(c.get([b"small"]))
                await until(lambda: conn.load == 4, "four requests on the session")
                cancelled.cancel()
                put.cancel()
                await asyncio.sleep(0)
                data[:] = bytes(len(data))  # the caller reuses its buffer at once
            finally:
                os.kill(srv.pid, signal.SIGCONT)
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            with pytest.raises(asyncio.CancelledError):
                await put
            assert await behind == [small, big]
            assert await after == [small]
            assert not any(buf)  # the cancelled Get wrote nothing into its buffer
            assert await c.get([b"new"]) == [big[: 16 * MiB]]
            assert connections(c) == [conn] and not conn.broken

    run(body)
    assert len(sessions_opened(caplog)) == 1


def test_a_cancelled_put_copies_only_its_own_unsent_bytes(
        server_factory: type[ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling one of many queued Puts copies that Put's bytes, not the
    whole backlog (each cancel copied everything queued: 256 cancelled 2 MiB
    Puts blocked the event loop for 4.6 s); every Put's bytes arrive as they
    were at its call."""
    monkeypatch.setattr(aio_dataplane, "MAX_CONNECTIONS", 1)
    srv = server_factory(l1_capacity="256MiB").start()
    blocks = [bytearray(os.urandom(4 * MiB)) for _ in range(4)]
    sent = [bytes(b) for b in blocks]

    async def body() -> None:
        async with AsyncClient(srv.unix_target, namespace="cx", data_plane="unix") as c:
            conn = await warm_session(c)
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                puts = [asyncio.ensure_future(c.put({b"k%d" % i: b}))
                        for i, b in enumerate(blocks)]
                await until(lambda: conn.load == 4, "four Puts on the session")
                puts[1].cancel()
                puts[2].cancel()
                await asyncio.sleep(0)
                bases = [v.obj for v in conn._outq]
                # the cancelled Puts' bytes are copies; the others' still the callers'
                assert not any(b is blocks[1] or b is blocks[2] for b in bases)
                assert any(b is blocks[3] for b in bases)
                blocks[1][:] = bytes(4 * MiB)  # their callers reuse their buffers
                blocks[2][:] = bytes(4 * MiB)
            finally:
                os.kill(srv.pid, signal.SIGCONT)
            for i in (1, 2):
                with pytest.raises(asyncio.CancelledError):
                    await puts[i]
            await puts[0]
            await puts[3]
            assert await c.get([b"k%d" % i for i in range(4)]) == sent

    run(body)


@pytest.mark.parametrize("then", ["delete", "put", "flush"])
def test_a_cancelled_put_never_lands_after_a_later_write(
        server_factory: type[ServerProcess], then: str) -> None:
    """A fork/cancel review: a Put cancelled while its bytes were going still
    reaches the server, and a Delete (over gRPC) or a Put (on another
    session) acknowledged after the cancel landed before it: the deleted
    block was served again, the newer Put's bytes replaced by the older.
    Later writes of the client now wait for the cancelled Put's answer."""
    srv = server_factory(l1_capacity="256MiB").start()
    old, new = os.urandom(32 * MiB), os.urandom(4096)

    async def body() -> None:
        async with AsyncClient(srv.unix_target, namespace="cw", data_plane="unix") as c:
            conn = await warm_session(c)
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                put = asyncio.ensure_future(c.put({b"K": old}))
                await until(lambda: conn.load == 1, "the Put on its session")
                put.cancel()
                await asyncio.sleep(0)
                if then == "delete":
                    later = asyncio.ensure_future(c.delete([b"K"]))
                elif then == "flush":
                    later = asyncio.ensure_future(c.flush())
                else:
                    # (another session: the first has the cancelled Put's bytes queued)
                    later = asyncio.ensure_future(c.put({b"K": new}))
                await asyncio.sleep(0.05)  # the later call's request is on its way (or waits)
            finally:
                os.kill(srv.pid, signal.SIGCONT)
            with pytest.raises(asyncio.CancelledError):
                await put
            await later
            assert await c.get([b"K"]) == [new if then == "put" else None]

    run(body)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_put_cancelled_as_its_answer_is_read_holds_no_later_write(
        dp_server: ServerProcess, transport: str) -> None:
    """An outside review: a Put cancelled (``asyncio.wait_for``) in the loop
    step that read its answer, the cancel first, left a wait for that answer
    that nothing would end: every later Put, Delete and Flush of the client
    waited its whole timeout, and for ever with ``timeout=None``."""

    async def body() -> None:
        target = dp_server.tcp if transport == "tcp" else dp_server.unix_target
        async with AsyncClient(target, namespace="dp", data_plane=transport,
                               timeout=None) as c:
            conn = await warm_session(c)
            loop = asyncio.get_running_loop()
            loop.remove_reader(conn._fd)  # (the answer waits in the socket, unread)
            put = asyncio.ensure_future(c.put({b"cancelled": b"v" * 4096}))
            while conn.load == 0:
                await asyncio.sleep(0)
            assert select.select([conn.sock], [], [], 30)[0], "the Put's answer not in 30 s"
            # Next loop step: the cancel, then the read of the answer.
            loop.call_soon(put.cancel)
            loop.add_reader(conn._fd, conn._on_readable)
            with pytest.raises(asyncio.CancelledError):
                await put
            assert not conn.settling
            await asyncio.wait_for(c.put({b"later": b"x"}), 10)
            await asyncio.wait_for(c.delete([b"later"]), 10)

    run(body)


class StopOnFirstPayload:
    """A connection's socket that SIGSTOPs the server once the first bytes of a
    block were received straight into the caller's buffer, and stops reading
    until :meth:`resume`. A stop takes effect on a server thread inside a
    ``sendmsg`` only when the call would wait for room, and a receive goes on
    while the sender keeps adding to the queue: a client that kept reading,
    or asked for the whole block at once, let all 64 MiB through (a
    fresh-clone CI run; 3 in ~160 here, one ``recv_into`` of 64 MiB). So the
    first receive into the block takes at most _FIRST_BYTES, and no more than
    the socket buffers' worth follows."""

    _FIRST_BYTES = 256 * 1024

    def __init__(self, conn: aio_dataplane.AioConnection, pid: int) -> None:
        self._conn, self._sock, self._pid, self.stopped = conn, conn.sock, pid, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv_into(self, target: Any) -> int:
        c = self._conn
        into_block = c._dest is not None and c._payload_left > 0 and c._start == c._end
        if into_block and not self.stopped:
            target = target[: self._FIRST_BYTES]
        got: int = self._sock.recv_into(target)
        if into_block and got and not self.stopped:
            os.kill(self._pid, signal.SIGSTOP)
            self.stopped = True
            c.loop.remove_reader(c._fd)
        return got

    def resume(self) -> None:
        c = self._conn
        if self.stopped and not c.broken:
            c.loop.add_reader(c._fd, c._on_readable)


def test_a_get_cancelled_while_its_block_arrives(server_factory: type[ServerProcess],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes of the block after the cancellation go nowhere near the caller's buffer."""
    monkeypatch.setattr(aio_dataplane, "MAX_CONNECTIONS", 1)
    srv = server_factory(l1_capacity="256MiB").start()
    big = os.urandom(64 * MiB)

    async def body() -> None:
        async with AsyncClient(srv.unix_target, namespace="cx", data_plane="unix") as c:
            await c.put({b"big": big})
            [conn] = connections(c)
            buf = bytearray(64 * MiB)
            os.kill(srv.pid, signal.SIGSTOP)
            get = asyncio.ensure_future(c.get_into([b"big"], [buf]))
            behind = asyncio.ensure_future(c.get([b"big"]))
            await until(lambda: conn.load == 2, "two Gets on the session")
            # The server is stopped again from inside the receive path, right
            # after the first bytes of the block landed in ``buf``: polling from
            # the test could let all 64 MiB through first on a busy host.
            conn.sock = stopper = StopOnFirstPayload(conn, srv.pid)  # type: ignore[assignment]
            os.kill(srv.pid, signal.SIGCONT)
            try:
                await until(lambda: conn._dest_at > 0, "the block arriving")
                assert conn._payload_left > 0
                get.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await get
                written = bytes(buf)
            finally:
                stopper.resume()
                os.kill(srv.pid, signal.SIGCONT)
            assert await behind == [big]
            assert bytes(buf) == written  # untouched since the cancellation
            assert written != bytes(len(buf))  # (the first bytes had arrived)
            assert connections(c) == [conn] and not conn.broken

    run(body)


def test_no_progress_for_the_timeout_is_a_deadline(server_factory: type[ServerProcess]) -> None:
    srv = server_factory().start()

    async def body() -> None:
        async with AsyncClient(srv.tcp, namespace="slow", data_plane="tcp", timeout=1.0) as c:
            await c.put({b"a": b"1"})
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                with pytest.raises(DeadlineExceeded, match="no progress"):
                    await c.get([b"a"])
            finally:
                os.kill(srv.pid, signal.SIGCONT)
            assert await c.get([b"a"]) == [b"1"]  # on a new session

    run(body)


def test_calls_waiting_for_a_session_share_its_failed_open(
        server_factory: type[ServerProcess]) -> None:
    """With the server not answering, concurrent calls of a fresh client all
    wait for one session open: when it times out they fail with it, each
    within about its timeout (each used to open its own after the one before
    had timed out: the 8th of 8 calls failed after 8 s with a 1 s timeout)."""
    srv = server_factory().start()

    async def body() -> None:
        async with AsyncClient(srv.tcp, namespace="frozen", timeout=1.0) as c:
            os.kill(srv.pid, signal.SIGSTOP)
            try:
                async def one(i: int) -> float:
                    started = asyncio.get_running_loop().time()
                    with pytest.raises(DeadlineExceeded):
                        await c.get([b"k%d" % i])
                    return asyncio.get_running_loop().time() - started

                took = await asyncio.gather(*(one(i) for i in range(8)))
            finally:
                os.kill(srv.pid, signal.SIGCONT)
            assert max(took) < 3.0, [round(t, 2) for t in took]
            await c.put({b"k0": b"v"})
            assert await c.get([b"k0"]) == [b"v"]  # the next open succeeds

    run(body)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_new_session_after_the_server_restarted(
        server_factory: type[ServerProcess], transport: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    srv = server_factory().start()
    port = srv.tcp.rsplit(":", 1)[1]

    async def body() -> None:
        async with AsyncClient(srv.unix_target, namespace="re", data_plane=transport) as c:
            await c.put({b"a": b"1" * 1000})
            assert await c.get([b"a"]) == [b"1" * 1000]
            srv.terminate()  # graceful: L2 keeps the block; the connection is closed
            srv.flags += ["--server-listen", f"127.0.0.1:{port}"]
            srv.start()
            # The idle connection the server closed is replaced before use.
            assert await c.get([b"a"]) == [b"1" * 1000]
            await c.put({b"b": b"2" * 1000})
            assert await c.get([b"b"]) == [b"2" * 1000]
            assert c.data_plane_calls == 5

    run(body)
    assert len(sessions_opened(caplog)) == 2


def test_a_call_in_flight_when_the_server_dies(server_factory: type[ServerProcess]) -> None:
    srv = server_factory().start()
    port = srv.tcp.rsplit(":", 1)[1]
    big = os.urandom(48 * MiB)

    async def body() -> None:
        async with AsyncClient(srv.unix_target, namespace="gone", data_plane="unix",
                               timeout=30) as c:
            await c.put({b"a": b"1" * 1000})
            [conn] = connections(c)
            # A Put whose bytes the (stopped) server is not reading, then it dies.
            os.kill(srv.pid, signal.SIGSTOP)
            put = asyncio.ensure_future(c.put({b"big": big}))
            await until(lambda: conn.load == 1, "the Put sent")
            srv.kill()
            with pytest.raises(ConnectionFailed, match=r"dropped during the call.*unknown"):
                await put
            srv.flags += ["--server-listen", f"127.0.0.1:{port}"]
            srv.start()
            await c.put({b"b": b"2" * 1000})  # a new session
            # A Get waiting for its answer when the server dies: retried once
            # on a new session, which finds no server: ConnectionFailed.
            [conn] = connections(c)
            os.kill(srv.pid, signal.SIGSTOP)
            get = asyncio.ensure_future(c.get([b"b"]))
            await until(lambda: conn.load == 1, "the Get sent")
            srv.kill()
            with pytest.raises(ConnectionFailed):
                await get
            srv.start()
            # grpc's channel may still be in its reconnect backoff: bounded.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                try:
                    got = await c.get([b"b"])
                    break
                except ConnectionFailed:
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            assert got == [None]  # the restarted server has an empty L1

    run(body)


def test_tls_data_plane_with_the_grpc_credentials(
        server_factory: type[ServerProcess], certs: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    srv = server_factory("--server-tls-cert", str(certs / "server.pem"),
                         "--server-tls-key", str(certs / "server.key"),
                         "--server-tls-client-ca", str(certs / "ca.pem")).start()
    tls = TLS(ca=str(certs / "ca.pem"), cert=(certs / "client.pem").read_bytes(),
              key=str(certs / "client.key"))
    big = os.urandom(6 * MiB + 1)

    async def body() -> int:
        async with AsyncClient(srv.tcp, namespace="tls", tls=tls, data_plane="tcp") as c:
            await c.put({b"small": b"s" * 100, b"big": big})
            assert await c.get([b"big", b"small", b"none"]) == [big, b"s" * 100, None]
            got = await asyncio.gather(*(c.get([b"small"]) for _ in range(20)))
            assert got == [[b"s" * 100]] * 20
            assert (await c.lookup([b"small", b"big"])).found == 2
            return c.data_plane_calls

    assert run(body) == 23
    assert all(w.startswith("127.0.0.1:") for w in sessions_opened(caplog))
