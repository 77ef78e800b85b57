"""The SDK on uvloop, the event loop vLLM and SGLang run their asyncio code
on (the rest of tests/client runs on asyncio's own loop; with
``KVSTORE_TEST_LOOP=uvloop`` all of tests/ runs on uvloop). Against a real
server: every AsyncClient call answers as on asyncio's loop, by the data
plane (unix and TCP) and by gRPC; cancelled and timed-out calls, hundreds of
concurrent calls, close() with calls in flight; the fault tests of
test_aio_dataplane.py on uvloop; the sync clients from the threads of a
uvloop program. Skipped without uvloop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_aio_dataplane as dpt
from dataplane.test_tls import certs  # noqa: F401 - the CA, server and client certificates
from fds import fds_opened_since, open_fds
from serverproc import ServerProcess

from kvstore import AsyncClient, Client
from kvstore.client.shm import ShmClient
from kvstore.errors import ConnectionFailed
from kvstore.types import TierName

uvloop = pytest.importorskip("uvloop")

MiB = 1024**2
MODES: dict[str, bool | str] = {"dp-tcp": "tcp", "dp-unix": "unix", "grpc": False}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client(server: ServerProcess, mode: str, namespace: str, **kw: Any) -> AsyncClient:
    target = server.unix_target if mode == "dp-unix" else server.tcp
    return AsyncClient(target, namespace=namespace, data_plane=MODES[mode], **kw)


def on_uvloop(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    async def checked() -> Any:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return await coro_fn()

    return uvloop.run(checked())


def test_every_call_answers_as_on_the_asyncio_loop(shared_server: ServerProcess,
                                                   mode: str) -> None:
    blocks = {f"k{i}".encode(): bytes([i]) * (1000 + 5000 * i) for i in range(6)}
    blocks[b"big"] = os.urandom(5 * MiB + 3)  # received straight into its buffer
    keys = list(blocks)
    ns = f"uvloop-{mode}"

    async def body() -> tuple[list[Any], int]:
        out: list[Any] = []
        async with client(shared_server, mode, ns) as c:
            out.append(await c.put(blocks))
            out.append(await c.get(keys) == list(blocks.values()))
            out.append(await c.get([keys[0], b"missing", keys[3]]))
            out.append(await c.lookup([keys[0], b"missing", keys[2]], lease_ms=100,
                                      session_id="s"))
            bufs = [bytearray(40_000), bytearray(10), bytearray(6 * MiB)]
            out.append(await c.get_into([keys[5], b"nope", b"big"], bufs))
            out.append(bytes(bufs[0][:26_000]) + bytes(bufs[2][: 5 * MiB + 3]))
            await c.turn_end("s1", "tool_call", 500, "search")
            await c.session_end("s1")
            out.append(await c.prefetch("s2", [keys[1]]))
            out.append(await c.pin([keys[1]], 1000))
            out.append(await c.unpin([keys[1]]))
            stats = await c.stats(ns)
            out.append([t.blocks for t in stats.tiers if t.tier == TierName.L1])
            out.append(sorted((b.key, b.size) for b in (await c.list_blocks(ns)).blocks))
            out.append(await c.delete([keys[0]]))
            out.append(await c.get([keys[0], keys[1]]))
            out.append(await c.flush(ns))  # (the next run starts from an empty namespace)
            out.append(await c.data_plane_active())
            return out, c.data_plane_calls

    on_asyncio = asyncio.run(body())
    assert on_uvloop(body) == on_asyncio
    # put, get x2, lookup, get_into, turn end, session end, get (the rest: gRPC)
    assert on_asyncio[1] == (0 if mode == "grpc" else 8)


def test_cancelled_and_timed_out_calls_leave_the_session_usable(
        shared_server: ServerProcess, mode: str) -> None:
    big = os.urandom(32 * MiB)

    async def body() -> None:
        async with client(shared_server, mode, "uvloop-cancel") as c:
            await c.put({b"big": big, b"small": b"s" * 5000})
            buf = bytearray(32 * MiB)
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.001):  # mid-flight: 32 MiB take longer
                        await c.get_into([b"big"], [buf])
            put = asyncio.ensure_future(c.put({b"new": bytearray(big)}))
            await asyncio.sleep(0)
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put
            assert await c.get([b"small", b"big"]) == [b"s" * 5000, big]
            assert (await asyncio.wait_for(c.lookup([b"big"]), 30)).found == 1
            if c._data_plane is not None:  # none was dropped (a busy one may add one)
                assert c._data_plane._conns and c._data_plane.sessions == len(
                    [conn for conn in c._data_plane._conns if not conn.broken])
                assert c.data_plane_calls == 3

    on_uvloop(body)


def test_hundreds_of_concurrent_calls_on_one_client(shared_server: ServerProcess,
                                                    mode: str) -> None:
    n = 300

    async def one(c: AsyncClient, i: int) -> bool:
        key, value = f"c{i}".encode(), bytes([i % 256]) * (1000 + (i % 7) * 70_000)
        await c.put({key: value})
        buf = bytearray(len(value))
        return (await c.get([key]) == [value] and (await c.lookup([key])).found == 1
                and await c.get_into([key], [buf]) == [len(value)] and buf == value)

    async def body() -> None:
        async with client(shared_server, mode, "uvloop-many") as c:
            assert all(await asyncio.gather(*(one(c, i) for i in range(n))))
            if c._data_plane is not None:
                assert c.data_plane_calls == 4 * n
                assert c._data_plane.sessions <= 4  # pipelined on a few sessions

    on_uvloop(body)


def test_close_with_calls_in_flight(shared_server: ServerProcess, mode: str) -> None:
    async def body() -> None:
        c = client(shared_server, mode, "uvloop-close")
        await c.put({b"k": b"x" * 300_000})

        async def call(i: int) -> Any:
            if i % 2:
                return await c.get([b"k"])
            return await c.put({f"p{i}".encode(): b"y" * 200_000})

        calls = [asyncio.ensure_future(call(i)) for i in range(200)]
        await asyncio.sleep(0)  # they are on their way
        await asyncio.wait_for(c.close(), 30)
        done, pending = await asyncio.wait(calls, timeout=30)
        assert not pending
        for t in done:
            exc = t.exception()
            assert exc is None or isinstance(exc, ConnectionFailed), repr(exc)

    on_uvloop(body)  # warm: uvloop's own descriptors, opened once
    before = open_fds()
    runs = 3
    for _ in range(runs):
        on_uvloop(body)
    # (The data-plane modes open a gRPC channel too, for their tickets.)
    # grpc may open one of its own once, late: a client leaking on close
    # leaks in each of the runs.
    extra = fds_opened_since(before)
    assert len(extra) < runs, f"{len(extra)} descriptors more after {runs} clients closed: " \
        f"{extra}"


@pytest.fixture
def on_uvloop_in_dpt(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_aio_dataplane.py's tests, run on uvloop."""
    monkeypatch.setattr(dpt, "run", on_uvloop)


@pytest.mark.usefixtures("on_uvloop_in_dpt")
def test_a_call_in_flight_when_the_server_dies(server_factory: type[ServerProcess]) -> None:
    dpt.test_a_call_in_flight_when_the_server_dies(server_factory)


@pytest.mark.usefixtures("on_uvloop_in_dpt")
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_new_session_after_the_server_restarted(server_factory: type[ServerProcess],
                                                  transport: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    dpt.test_a_new_session_after_the_server_restarted(server_factory, transport, caplog)


@pytest.mark.usefixtures("on_uvloop_in_dpt")
def test_no_progress_for_the_timeout_is_a_deadline(server_factory: type[ServerProcess]) -> None:
    dpt.test_no_progress_for_the_timeout_is_a_deadline(server_factory)


@pytest.mark.usefixtures("on_uvloop_in_dpt")
def test_a_cancelled_call_leaves_its_session_usable(server_factory: type[ServerProcess],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    dpt.test_a_cancelled_call_leaves_its_session_usable(server_factory, monkeypatch, caplog)


@pytest.mark.usefixtures("on_uvloop_in_dpt")
def test_tls_data_plane_with_the_grpc_credentials(
        server_factory: type[ServerProcess], certs: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    dpt.test_tls_data_plane_with_the_grpc_credentials(server_factory, certs, caplog)


@pytest.fixture
def shm_server(server_factory: Any, tmp_path: Path) -> Iterator[ServerProcess]:
    path = f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}"
    with server_factory("--l1-shm-path", path, l1_capacity="64MiB") as server:
        yield server


@pytest.fixture
def uvloop_policy() -> Iterator[None]:
    """uvloop as every new loop's (as SGLang sets it): the sync Client's
    private Put loop is then a uvloop loop too."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(None)


@pytest.mark.usefixtures("uvloop_policy")
def test_the_sync_clients_from_the_threads_of_a_uvloop_program(
        shm_server: ServerProcess) -> None:
    """What engines do: the sync clients in an executor's threads, or right
    in the loop's thread (blocking it), of a program whose loop is uvloop."""
    value = os.urandom(3 * MiB)

    def work(kind: str) -> bool:
        if kind == "shm":
            cl: Client = ShmClient(shm_server.unix_target, namespace="uvloop-sync")
        elif kind == "data-plane":
            cl = Client(shm_server.unix_target, namespace="uvloop-sync", data_plane="unix")
        else:
            cl = Client(shm_server.tcp, namespace="uvloop-sync", data_plane=False)
        with cl:
            key = f"{kind}-{threading.get_ident()}".encode()
            cl.put({key: value})
            return cl.get([key]) == [value] and cl.lookup([key]).found == 1

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        loop = asyncio.get_running_loop()
        for kind in ("shm", "data-plane", "grpc"):
            assert await loop.run_in_executor(None, work, kind)
            assert await asyncio.to_thread(work, kind)
            assert work(kind)

    asyncio.run(main())
