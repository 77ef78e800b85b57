"""``metadata=``: gRPC metadata on every call of the SDK's clients, fixed or
produced per call. Observed through a real server's ``--policy-clock client``,
which reads ``kvstore-clock`` from each call and rejects a value that is not a
number."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from kvstore import AsyncClient, Client, InvalidArgument
from kvstore.client.shm import ShmClient


@pytest.fixture(scope="module")
def clock_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.serverproc import ServerProcess

    data = tmp_path_factory.mktemp("clock")
    shm = f"/dev/shm/kvstore-test-{os.getpid()}-{data.name}"
    try:
        with ServerProcess(data, "--policy-clock", "client", "--l1-shm-path", shm,
                           l1_capacity="8MiB") as server:
            yield server
    finally:
        Path(shm).unlink(missing_ok=True)


@pytest.mark.parametrize("aio_put", [True, False])
def test_sync_client_sends_the_metadata_of_each_call(clock_server: Any, aio_put: bool) -> None:
    clock = {"kvstore-clock": "100.0"}
    with Client(clock_server.tcp, namespace="md", aio_put=aio_put,
                metadata=lambda: clock) as kv:
        assert kv.put({b"k": b"v"}).stored == 1
        assert kv.get([b"k"]) == [b"v"]
        assert kv.lookup([b"k"]).found == 1
        clock["kvstore-clock"] = "soon"  # the next calls carry the new value
        for call in (lambda: kv.put({b"k2": b"v"}), lambda: kv.get([b"k"]),
                     lambda: kv.lookup([b"k"]), lambda: kv.delete([b"k"])):
            with pytest.raises(InvalidArgument, match="kvstore-clock metadata 'soon'"):
                call()
        # Numbers that are no time: refused, and the clock is not stopped by
        # them (inf or 1e300 once taken, every later Lookup of a session
        # failed with an internal error, for the server's life).
        for absurd in ("inf", "nan", "1e300", "-5"):
            clock["kvstore-clock"] = absurd
            with pytest.raises(InvalidArgument, match="not a time in seconds"):
                kv.lookup([b"k"], session_id="s1")
        clock["kvstore-clock"] = "101.5"
        assert kv.lookup([b"k"], session_id="s1").found == 1
        assert kv.delete([b"k"]) == 1


def test_fixed_metadata_goes_with_every_call(clock_server: Any) -> None:
    with Client(clock_server.tcp, namespace="md", metadata=[("kvstore-clock", "later")]) as kv, \
            pytest.raises(InvalidArgument, match="kvstore-clock metadata 'later'"):
        kv.lookup([b"k"])
    with Client(clock_server.tcp, namespace="md", metadata={"kvstore-clock": "7"}) as kv:
        assert kv.lookup([b"k"]).found == 0


def test_async_client_sends_the_metadata(clock_server: Any) -> None:
    async def main() -> None:
        clock = [("kvstore-clock", "5.0")]
        async with AsyncClient(clock_server.tcp, namespace="md-aio",
                               metadata=lambda: clock) as kv:
            assert (await kv.put({b"a": b"x"})).stored == 1
            assert await kv.get([b"a"]) == [b"x"]
            clock[0] = ("kvstore-clock", "never")
            with pytest.raises(InvalidArgument, match="'never'"):
                await kv.get([b"a"])
            with pytest.raises(InvalidArgument, match="'never'"):
                await kv.lookup([b"a"])

    asyncio.run(main())


def test_shm_client_sends_the_metadata(clock_server: Any) -> None:
    with ShmClient(clock_server.unix_target, namespace="md-shm",
                   metadata={"kvstore-clock": "3"}) as kv:
        assert kv.put({b"s": b"y" * 100}).stored == 1
        assert kv.get([b"s"]) == [b"y" * 100]
    with ShmClient(clock_server.unix_target, namespace="md-shm",
                   metadata={"kvstore-clock": "x"}) as kv:
        for call in (lambda: kv.put({b"t": b"z"}), lambda: kv.get([b"s"])):
            with pytest.raises(InvalidArgument, match="'x'"):
                call()


def test_bad_metadata_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(InvalidArgument, match="metadata"):
        Client("127.0.0.1:1", metadata=[("kvstore-clock", 5)])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="metadata"):
        Client("127.0.0.1:1", metadata=["kvstore-clock"])  # type: ignore[list-item]
    kv = Client("127.0.0.1:1", metadata=lambda: {"kvstore-clock": 1.5})  # type: ignore[dict-item]
    with kv, pytest.raises(InvalidArgument, match="metadata"):
        kv.lookup([b"k"], namespace="ns")
