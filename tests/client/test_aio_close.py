"""AsyncClient.close() while calls are in flight: each call fails with a
kvstore error (ConnectionFailed), not a CancelledError that no one asked
for (closing the channel cancels grpc.aio's calls), and a data-plane
session still opening when close() came is closed, not pooled."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fds import fds_opened_since, open_fds
from kvstore_client_fake import FakeServer

from kvstore import AsyncClient, Client
from kvstore.errors import ConnectionFailed, InvalidArgument


@pytest.mark.parametrize("call", ["put", "lookup"])
def test_a_grpc_call_in_flight_at_close_raises_connection_failed(
        fake_server: FakeServer, call: str) -> None:
    fake_server.state.hold = threading.Event()

    async def main() -> None:
        client = AsyncClient(fake_server.target, namespace="ns", data_plane=False)
        if call == "put":
            task = asyncio.create_task(client.put({b"k": b"v" * 1000}))
        else:
            task = asyncio.create_task(client.lookup([b"k"]))
        assert await asyncio.to_thread(fake_server.state.arrived.wait, 30)  # in flight
        await client.close()
        with pytest.raises(ConnectionFailed, match="closed while the call was in flight"):
            await asyncio.wait_for(task, 30)
        assert not task.cancelled()

    try:
        asyncio.run(main())
    finally:
        fake_server.state.hold.set()


def test_a_task_cancelled_during_a_grpc_put_stays_cancelled(fake_server: FakeServer) -> None:
    """The caller's own cancellation is not turned into an error."""
    fake_server.state.hold = threading.Event()

    async def main() -> None:
        async with AsyncClient(fake_server.target, namespace="ns", data_plane=False) as client:
            task = asyncio.create_task(client.put({b"k": b"v" * 1000}))
            assert await asyncio.to_thread(fake_server.state.arrived.wait, 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()

    try:
        asyncio.run(main())
    finally:
        fake_server.state.hold.set()


def _then_close(client: AsyncClient,
                real: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    async def offer_then_close() -> Any:
        got = await real()
        await client.close()  # the session is not open yet: HELLO comes next
        return got
    return offer_then_close


def test_close_while_a_data_plane_session_opens_leaves_no_session(shared_server: Any) -> None:
    """close() between the session's offer (gRPC) and its HELLO: the call
    fails, the connection is closed, nothing stays pooled or open."""

    async def main() -> dict[str, str]:
        # a first client opens and closes everything once (imports, caches)
        async with AsyncClient(shared_server.tcp, namespace="ns") as warm:
            await warm.put({b"k": b"v" * 4096})
        before = open_fds()
        for _ in range(3):
            client = AsyncClient(shared_server.tcp, namespace="ns")
            dp = client._data_plane
            assert dp is not None
            dp._open_session = _then_close(client, dp._open_session)  # type: ignore[method-assign]
            # the first opens the session; the others wait for it (they raised
            # ValueError, as calls made after close() do)
            calls = await asyncio.gather(*(client.lookup([b"k"]) for _ in range(4)),
                                         return_exceptions=True)
            assert all(isinstance(c, ConnectionFailed) for c in calls), calls
            assert all("closed while the call was in flight" in str(c) for c in calls)
            assert dp._conns == []
        return before

    before = asyncio.run(main())
    # A leaked session would add one per round; grpc may free one of its own
    # late (see fds_opened_since): one seen under load.
    extra = fds_opened_since(before)
    assert len(extra) < 3, f"{len(extra)} descriptors more after 3 rounds: {extra}"


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("data_plane", [False, "unix"])
def test_one_client_in_one_event_loop_after_another(shared_server: Any, loop_kind: str,
                                                    data_plane: bool | str) -> None:
    """``asyncio.run`` twice with the same client: the second loop gets a new
    channel (it raised "Event loop is closed" and left a coroutine never
    awaited) and new data-plane sessions; the last loop another kind."""
    run = _runner(loop_kind)
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    other = _runner("uvloop" if loop_kind == "asyncio" and has_uvloop else "asyncio")
    client = AsyncClient(shared_server.unix_target, namespace="loops", data_plane=data_plane)

    async def put_get(value: bytes) -> list[bytes | None]:
        await client.put({b"k": value})
        return await client.get([b"k"])

    assert run(put_get(b"a" * 5000)) == [b"a" * 5000]
    assert run(put_get(b"b" * 5000)) == [b"b" * 5000]
    assert other(put_get(b"c" * 5000)) == [b"c" * 5000]
    assert client.data_plane_calls == (0 if data_plane is False else 6)
    run(client.close())


def test_a_grpc_put_to_a_server_that_stopped_reading_ends_at_its_deadline(
        server_factory: Any) -> None:
    """A 4 MiB Put blocks in its writes (HTTP/2 flow control) when the server
    stops reading: it still fails at its timeout (DeadlineExceeded), through
    AsyncClient and the sync Client, and a close() in flight fails it with
    ConnectionFailed. (Its writes waited for the server for as long as it
    was stopped.)"""
    import signal

    from kvstore import Client
    from kvstore.errors import DeadlineExceeded

    srv = server_factory().start()
    block = os.urandom(4 << 20)

    async def main() -> None:
        client = AsyncClient(srv.tcp, namespace="stop", timeout=2, data_plane=False)
        sync = Client(srv.tcp, namespace="stop", timeout=2, data_plane=False)
        await client.stats()  # both connected (and the sync Put's loop running)
        sync.put({b"warm": b"w" * 100})
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(client.put({b"a": block}), 30)
            task = asyncio.create_task(client.put({b"b": block}))
            await asyncio.wait({task}, timeout=0.5)  # (it is writing, or blocked)
            await client.close()
            with pytest.raises(ConnectionFailed):
                await asyncio.wait_for(task, 30)
            started = asyncio.get_running_loop().time()
            with pytest.raises(DeadlineExceeded):
                await asyncio.to_thread(sync.put, {b"c": block})
            assert asyncio.get_running_loop().time() - started < 30
        finally:
            os.kill(srv.pid, signal.SIGCONT)
            sync.close()

    asyncio.run(main())


def _runner(kind: str) -> Callable[[Awaitable[Any]], Any]:
    """``asyncio.run`` on asyncio's own loop, or on uvloop (what vLLM and
    SGLang run their asyncio code on)."""
    if kind == "uvloop":
        return pytest.importorskip("uvloop").run
    return asyncio.run  # type: ignore[return-value]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_call_from_a_second_running_loop_leaves_the_first_loops_sessions(
        shared_server: Any, loop_kind: str, transport: str) -> None:
    """A call from another running loop raises InvalidArgument and touches
    nothing of the first loop's: it closed the first loop's data-plane
    sessions from its own thread (not thread-safe: the first loop's call
    stalled 2 s, then reopened its session)."""
    run = _runner(loop_kind)
    client = AsyncClient(shared_server.unix_target, namespace="two-loops",
                         data_plane=transport)
    ready, done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    async def first() -> None:
        loop = asyncio.get_running_loop()
        go = asyncio.Event()
        result["go"] = lambda: loop.call_soon_threadsafe(go.set)
        await client.put({b"k": b"v" * 100_000})
        assert client._data_plane is not None
        [conn] = client._data_plane._conns
        ready.set()
        await go.wait()  # the other loop's calls happen meanwhile
        result["got"] = await client.get([b"k"])
        result["same"] = client._data_plane._conns == [conn] and not conn.broken
        result["sessions"] = client._data_plane.sessions
        await client.close()

    def first_thread() -> None:
        try:
            run(first())
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc
        finally:
            ready.set()
            done.set()

    thread = threading.Thread(target=first_thread, daemon=True)
    thread.start()
    assert ready.wait(30), "the first loop did not start"
    assert "error" not in result, result

    async def second() -> None:
        for call in (client.get([b"k"]), client.lookup([b"k"]), client.put({b"x": b"1"}),
                     client.data_plane_active()):
            with pytest.raises(InvalidArgument, match="another running event loop"):
                await call

    try:
        run(second())
    finally:
        result["go"]()
        assert done.wait(30), "the first loop's call did not end"
        thread.join(30)
    assert "error" not in result, result
    assert result["got"] == [b"v" * 100_000]
    assert result["same"] and result["sessions"] == 1


@pytest.mark.parametrize("data_plane", ["unix", False])
def test_two_loops_first_calls_at_once_one_refused_none_hangs(
        shared_server: Any, data_plane: str | bool) -> None:
    """An outside review: two threads' loops making a new client's first call
    at the same moment both passed the loop check (no channel yet). With the
    data plane one of them then waited for ever on the other loop's session
    lock; over gRPC the second loop's first call went through. Now the first
    call claims the client for its loop, and the other gets InvalidArgument."""
    for trial in range(10):
        client = AsyncClient(shared_server.unix_target, namespace="race-loops",
                             data_plane=data_plane, timeout=5)
        start, winner_done = threading.Barrier(2), threading.Event()
        outcomes: list[str] = []

        def thread_body(i: int, client: AsyncClient = client,
                        start: threading.Barrier = start,
                        winner_done: threading.Event = winner_done,
                        outcomes: list[str] = outcomes) -> None:
            async def body() -> None:
                start.wait(30)
                try:
                    await client.put({b"k%d" % i: b"v"})
                    outcomes.append("ok")
                    await asyncio.to_thread(winner_done.wait, 30)  # (its loop runs on)
                    await client.close()
                except InvalidArgument:
                    outcomes.append("refused")
                    winner_done.set()
            asyncio.run(body())

        threads = [threading.Thread(target=thread_body, args=(i,), daemon=True)
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), f"trial {trial}: a loop hangs"
        assert sorted(outcomes) == ["ok", "refused"], (trial, outcomes)


@pytest.mark.parametrize("write", ["put", "delete"])
def test_a_put_cancelled_in_an_earlier_loop_holds_no_write_in_the_next(
        shared_server: Any, write: str) -> None:
    """A fix review: a Put cancelled while its bytes went, in a loop that
    then ended, left a wait nothing could end any more (its loop was
    closed); the next loop's first write waited for it: the client's whole
    timeout, for ever with ``timeout=None``."""
    client = AsyncClient(shared_server.unix_target, namespace="loop-switch",
                         data_plane="unix", timeout=None)

    async def first() -> None:
        await client.put({b"warm": b"w"})
        put = asyncio.ensure_future(client.put({b"big": bytes(64 * 1024 * 1024)}))
        await asyncio.sleep(0.001)  # (its bytes on their way)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put

    async def second() -> None:
        if write == "put":
            await asyncio.wait_for(client.put({b"x": b"y"}), 20)
        else:
            await asyncio.wait_for(client.delete([b"x"]), 20)
        await client.close()

    asyncio.run(first())
    asyncio.run(second())


def test_a_write_from_a_second_running_loop_is_refused_at_once(
        server_factory: Any) -> None:
    """A fix review: a Delete (or Flush) from a second running loop first
    waited, from the wrong thread, for the first loop's cancelled Puts (for
    ever with ``timeout=None``) before it raised InvalidArgument."""
    import signal

    server = server_factory(l1_capacity="64MiB").start()
    client = AsyncClient(server.unix_target, namespace="wrong-loop", data_plane="unix",
                         timeout=None)
    ready, done = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def first() -> None:
        await client.put({b"w": b"w"})
        assert client._data_plane is not None
        [conn] = client._data_plane._conns
        os.kill(server.pid, signal.SIGSTOP)
        try:
            put = asyncio.ensure_future(client.put({b"K": bytes(16 * 1024 * 1024)}))
            while conn.load != 1:
                await asyncio.sleep(0.002)
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put
            assert conn.settling  # (its answer is to come)
            ready.set()
            await asyncio.to_thread(done.wait, 30)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await client.close()

    def first_thread() -> None:
        try:
            asyncio.run(first())
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=first_thread, daemon=True)
    thread.start()
    try:
        assert ready.wait(30) and not failure, failure

        async def second() -> None:
            for call in (client.delete([b"K"]), client.flush(), client.put({b"x": b"y"})):
                with pytest.raises(InvalidArgument, match="another running event loop"):
                    await asyncio.wait_for(call, 5)

        asyncio.run(second())
    finally:
        done.set()
        thread.join(30)
    assert not failure, failure


def test_a_put_cancelled_in_an_earlier_loop_never_lands_after_the_next_loops_delete(
        server_factory: Any) -> None:
    """A fix review: once a closed loop's cancelled Puts were no longer
    waited for, the next loop's Delete (on a new session) could land first,
    and the cancelled Put's block was served after the Delete was answered
    (1-3 of 5 trials). Their answers are read, and their last bytes sent,
    before a session of a closed loop is dropped."""
    import signal

    server = server_factory("--server-metrics-listen", "127.0.0.1:0",
                            l1_capacity="64MiB").start()
    for trial in range(5):
        key = b"K%d" % trial
        client = AsyncClient(server.unix_target, namespace="cross-loop", data_plane="unix",
                             timeout=30)

        async def first(client: AsyncClient = client, key: bytes = key,
                        trial: int = trial) -> None:
            await client.put({b"warm": b"w"})
            assert client._data_plane is not None
            [conn] = client._data_plane._conns
            os.kill(server.pid, signal.SIGSTOP)
            # Small blocks first (the server lets others in every 256 blocks).
            blocks = {b"f%d-%03d" % (trial, i): b"f" for i in range(300)}
            blocks[key] = b"1" * 65536
            put = asyncio.ensure_future(client.put(blocks))
            while conn.load != 1 or conn._outq:  # (all of it sent, unanswered)
                await asyncio.sleep(0.002)
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put

        async def second(client: AsyncClient = client, key: bytes = key) -> None:
            await client.delete([key])
            await client.close()

        asyncio.run(first())
        # The server goes on while the next loop's Delete waits (fault injection,
        # not a wait for a condition: either order of the two must end absent).
        resume = threading.Timer(0.3, os.kill, (server.pid, signal.SIGCONT))
        resume.start()
        try:
            asyncio.run(second())
        finally:
            resume.join(30)
            os.kill(server.pid, signal.SIGCONT)
        # Once the server is done with both loops' sessions, K's fate is known.
        deadline = time.monotonic() + 30
        while dataplane_connections(server) > 0:
            assert time.monotonic() < deadline, "the sessions not closed in 30 s"
            time.sleep(0.01)
        with Client(server.tcp, namespace="cross-loop", data_plane=False) as check:
            assert check.get([key]) == [None], f"trial {trial}: deleted, then stored"


def dataplane_connections(server: Any) -> float:
    ready = max(server.data_dir.glob("ready-*.json"), key=os.path.getmtime)
    address = json.loads(ready.read_text())["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("kvstore_dataplane_connections "):
                return float(line.split()[1])
    raise AssertionError("no kvstore_dataplane_connections in the metrics")


def test_a_closed_loops_sessions_are_drained_on_descriptors_past_1024(
        server_factory: Any) -> None:
    """A fix review: the drain of a closed loop's sessions used select(),
    which refuses descriptors past 1,023: in a process with many files open
    it returned at once, and the next loop's Delete could land before the
    cancelled Put. It waits for the answer now (poll())."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard if hard != resource.RLIM_INFINITY else 4096) < 1200:
        pytest.skip("needs 1,200 open files")
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    server = server_factory(l1_capacity="64MiB").start()
    client = AsyncClient(server.unix_target, namespace="drain-fds", data_plane="unix",
                         timeout=30)
    conns: list[Any] = []
    try:
        async def first() -> None:
            await client.put({b"warm": b"w"})
            assert client._data_plane is not None
            conns.extend(client._data_plane._conns)
            assert conns[0]._fd >= 1024
            os.kill(server.pid, signal.SIGSTOP)
            put = asyncio.ensure_future(client.put({b"K": b"1" * 65536}))
            while conns[0].load != 1 or conns[0]._outq:
                await asyncio.sleep(0.002)
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await put

        asyncio.run(first())
        from kvstore.client import aio_dataplane
        started = time.monotonic()
        aio_dataplane.drain_closed_sessions(conns, 0.5)  # the server is stopped: no answer
        assert time.monotonic() - started >= 0.45 and conns[0].settling
        os.kill(server.pid, signal.SIGCONT)
        aio_dataplane.drain_closed_sessions(conns, 30)
        assert not conns[0].settling  # its answer read
    finally:
        os.kill(server.pid, signal.SIGCONT)
        for fd in filler:
            os.close(fd)
        for conn in conns:
            conn.close()
