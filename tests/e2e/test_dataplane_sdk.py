"""The SDK over the data plane (docs/dataplane.md), end to end against a real
server: the same behaviour as over gRPC, the transport it picks, the fallback
to gRPC, and a new session after the server dropped the connection.

The rest of the suite runs the SDK with its default (the data plane, when the
server offers it); the round-trip tests of test_roundtrip.py run here a second
time with ``KVSTORE_DATA_PLANE=0`` (every call over gRPC), so both paths stay
covered without running the whole suite twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from serverproc import ServerProcess
from test_roundtrip import (  # noqa: F401 - collected again here, over gRPC
    test_batch_put_and_get_in_request_order_with_misses,
    test_delete_then_miss,
    test_lookup_counts_leading_present_keys,
    test_namespaces_are_disjoint,
    test_numpy_in_and_get_into_caller_buffers,
    test_overwrite_returns_latest,
)
from test_tls import pki  # noqa: F401 - the CA, server and client certificates fixture

from kvstore import TLS, Client
from kvstore.client.shm import ShmClient
from kvstore.errors import (
    BlockTooLarge,
    ConnectionFailed,
    InvalidArgument,
    InvalidKey,
    KVStoreError,
    UnknownNamespace,
)
from kvstore.types import TierName

MiB = 1024**2


@pytest.fixture(params=["tcp", "unix"])
def target(request: pytest.FixtureRequest, shared_server: ServerProcess,
           monkeypatch: pytest.MonkeyPatch) -> str:
    """test_roundtrip's tests, over gRPC only."""
    monkeypatch.setenv("KVSTORE_DATA_PLANE", "0")
    return shared_server.tcp if request.param == "tcp" else shared_server.unix_target


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("dp-server")
    shm = f"/dev/shm/kvstore-dp-sdk-{os.getpid()}"
    server = ServerProcess(tmp, "--l1-shm-path", shm, "--server-namespaces", "dp,dp2,shm",
                           "--server-max-block-bytes", str(16 * MiB),
                           "--server-metrics-listen", "127.0.0.1:0", l1_capacity="128MiB")
    with server:
        yield server


def metric(server: ServerProcess, name: str) -> float | None:
    """One sample of the server's Prometheus endpoint (no labels); None when
    the server does not export it."""
    return server.metric(name)


def sessions_opened(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Where each data plane session went (the SDK's debug log)."""
    return [r.getMessage().rsplit(" to ", 1)[1] for r in caplog.records
            if r.name == "kvstore.client" and "data plane session" in r.getMessage()]


MODES = {"dp-tcp": "tcp", "dp-unix": "unix", "grpc": False}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client(server: ServerProcess, mode: str, **kw: object) -> Client:
    return Client(server.tcp, namespace="dp", data_plane=MODES[mode], **kw)  # type: ignore[arg-type]


def test_put_get_lookup_delete_round_trip(dp_server: ServerProcess, mode: str) -> None:
    blocks = {f"{mode}-k{i}".encode(): os.urandom(1000 + 5000 * i) for i in range(6)}
    keys = list(blocks)
    before = metric(dp_server, "kvstore_dataplane_requests_total")
    with client(dp_server, mode) as c:
        assert c.put(blocks).stored == 6
        assert c.get(keys) == list(blocks.values())
        # Partial hits: misses in between and at the end are None, in order.
        got = c.get([keys[0], b"missing", keys[3], b"gone"])
        assert got == [blocks[keys[0]], None, blocks[keys[3]], None]
        hit = c.lookup([keys[0], keys[1], b"missing", keys[2]])
        assert hit.found == 2 and hit.tiers == [TierName.L1, TierName.L1, None, TierName.L1]
        outs = [np.zeros(40_000, dtype=np.uint8) for _ in range(3)]
        assert c.get_into([keys[5], b"nope", keys[1]], outs) == [26000, None, 6000]
        assert outs[0][:26000].tobytes() == blocks[keys[5]]
        assert outs[2][:6000].tobytes() == blocks[keys[1]]
        assert not outs[1].any()  # a miss leaves its buffer as it was
        assert c.delete([keys[0]]) == 1
        assert c.get([keys[0], keys[1]]) == [None, blocks[keys[1]]]
        assert c.get([]) == [] and c.lookup([]).found == 0
        used = c.data_plane_calls
    after = metric(dp_server, "kvstore_dataplane_requests_total")
    assert used == (0 if mode == "grpc" else 6)
    if before is not None and after is not None:  # the server counts the frames too
        assert after == before if mode == "grpc" else after >= before + 6


def test_large_blocks_over_4_mib(dp_server: ServerProcess, mode: str) -> None:
    big = {b"big-a": os.urandom(5 * MiB + 3), b"big-b": os.urandom(9 * MiB)}
    with client(dp_server, mode) as c:
        assert c.put(big).bytes == 14 * MiB + 3
        assert c.get([b"big-b", b"big-a"]) == [big[b"big-b"], big[b"big-a"]]
        outs = [bytearray(9 * MiB), bytearray(9 * MiB)]
        assert c.get_into([b"big-a", b"big-b"], outs) == [5 * MiB + 3, 9 * MiB]
        assert bytes(outs[0][: 5 * MiB + 3]) == big[b"big-a"]
        assert bytes(outs[1]) == big[b"big-b"]


def test_errors_are_the_grpc_classes_and_the_session_survives(
        dp_server: ServerProcess, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    with client(dp_server, mode) as c:
        c.put({b"e1": b"x" * 100})
        with pytest.raises(UnknownNamespace):
            c.get([b"e1"], namespace="not-served")
        with pytest.raises(UnknownNamespace):
            c.put({b"e1": b"y"}, namespace="not-served")
        with pytest.raises(InvalidKey):
            c.lookup([b"k" * 65])
        # (Over gRPC, grpc.aio sometimes reports a Put stream the server
        # refused early as its own INTERNAL error: only the base class.)
        with pytest.raises(BlockTooLarge if mode != "grpc" else KVStoreError):
            c.put({b"e2": b"z" * (16 * MiB + 1), b"e3": b"w" * 10})
        with pytest.raises(InvalidArgument, match="buffer #1"):
            c.get_into([b"e1", b"e1"], [bytearray(100), bytearray(99)])
        # Each error answered its request only: the same session goes on.
        assert c.get([b"e1", b"e2"]) == [b"x" * 100, None]
    assert len(sessions_opened(caplog)) == (0 if mode == "grpc" else 1)


def test_transport_follows_where_the_client_is(dp_server: ServerProcess,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    # Reached over loopback or the unix socket: the data plane's unix socket.
    for target in (dp_server.tcp, dp_server.unix_target):
        with Client(target, namespace="dp") as c:
            assert c.data_plane_active()
            c.put({b"t": b"1"})
    # data_plane="tcp" picks TCP even on the same host.
    with Client(dp_server.unix_target, namespace="dp", data_plane="tcp") as c:
        assert c.get([b"t"]) == [b"1"]
    where = sessions_opened(caplog)
    assert [w.startswith("unix:") for w in where] == [True, True, False]
    assert where[2].startswith("127.0.0.1:")


def test_shm_client_through_the_data_plane(dp_server: ServerProcess, mode: str) -> None:
    blobs = {f"s{i}".encode(): os.urandom(1000 + i * 300_000) for i in range(8)}
    with ShmClient(dp_server.unix_target, namespace="shm",
                   data_plane=MODES[mode]) as c:  # type: ignore[arg-type]
        assert c.put(blobs).stored == 8
        assert c.get([b"s3", b"none", b"s7"]) == [blobs[b"s3"], None, blobs[b"s7"]]
        bufs = [bytearray(3 * MiB) for _ in range(2)]
        for _ in range(3):  # the releases ride on the next acquire
            assert c.get_into([b"s1", b"s6"], bufs) == [len(blobs[b"s1"]), len(blobs[b"s6"])]
        assert bytes(bufs[1][: len(blobs[b"s6"])]) == blobs[b"s6"]
        with c.leased([b"s2", b"x"]) as leases:
            assert leases[1] is None and leases[0] is not None
            assert bytes(leases[0].view) == blobs[b"s2"]
        slots = c.reserve([(b"r1", 10), (b"r2", 20)])
        slots[0].view[:] = b"a" * 10
        c.commit(slots[:1], abandon=slots[1:])
        assert c.get([b"r1", b"r2"]) == [b"a" * 10, None]
        c.flush_releases()
        used = c.data_plane_calls
    # The Put is one data-plane call (its reserve and commit frames on one
    # session, tests/shm/test_shm_dataplane_put.py counts the frames).
    assert used == (0 if mode == "grpc" else 11)
    # What went through shared memory is an ordinary block for every client.
    with Client(dp_server.tcp, namespace="shm", data_plane=False) as g:
        assert g.get([b"s4"]) == [blobs[b"s4"]]


def test_a_server_without_data_plane_is_served_over_grpc(
        server_factory: type[ServerProcess], dp_server: ServerProcess,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    srv = server_factory("--server-data-plane", "false").start()
    with Client(srv.tcp, namespace="off") as c:
        c.put({b"k": b"v" * 10})
        assert c.get([b"k"]) == [b"v" * 10] and c.lookup([b"k"]).found == 1
        assert not c.data_plane_active() and c.data_plane_calls == 0
    assert any("offers no data plane" in r.getMessage() for r in caplog.records)
    # data_plane=False keeps a server that offers it on gRPC.
    before = metric(dp_server, "kvstore_dataplane_connections_accepted_total")
    with Client(dp_server.tcp, namespace="dp", data_plane=False) as c:
        c.put({b"off": b"1"})
        assert c.get([b"off"]) == [b"1"] and not c.data_plane_active()
    assert metric(dp_server, "kvstore_dataplane_connections_accepted_total") == before


def test_environment_turns_the_data_plane_off(dp_server: ServerProcess,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_DATA_PLANE", "off")
    with Client(dp_server.tcp, namespace="dp") as c:
        assert not c.data_plane_active()
    with Client(dp_server.tcp, namespace="dp", data_plane=True) as c:
        assert c.data_plane_active()
    monkeypatch.setenv("KVSTORE_DATA_PLANE", "sideways")
    with pytest.raises(InvalidArgument, match="KVSTORE_DATA_PLANE"):
        Client(dp_server.tcp)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_new_session_after_the_server_dropped_the_connection(
        server_factory: type[ServerProcess], tmp_path: Path, transport: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    srv = server_factory().start()
    port = srv.tcp.rsplit(":", 1)[1]
    with Client(srv.unix_target, namespace="re", data_plane=transport) as c:
        c.put({b"a": b"1" * 1000})
        assert c.get([b"a"]) == [b"1" * 1000]
        srv.terminate()  # graceful: L2 keeps the block; the connection is closed
        srv.flags += ["--server-listen", f"127.0.0.1:{port}"]
        srv.start()
        # The idle connection the server closed is replaced before use, for
        # a Get and a Put alike.
        assert c.get([b"a"]) == [b"1" * 1000]
        c.put({b"b": b"2" * 1000})
        assert c.get([b"b"]) == [b"2" * 1000]
        assert c.data_plane_calls == 5
    assert len(sessions_opened(caplog)) == 2


def test_bad_data_plane_argument_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="data_plane"):
        Client("127.0.0.1:1", data_plane="quic")  # type: ignore[arg-type]


def test_a_client_with_per_call_metadata_keeps_to_grpc(dp_server: ServerProcess) -> None:
    with Client(dp_server.tcp, namespace="dp", metadata={"x-tenant": "a"}) as c:
        c.put({b"md": b"1"})
        assert c.get([b"md"]) == [b"1"] and not c.data_plane_active()
    with pytest.raises(InvalidArgument, match="metadata"):
        Client(dp_server.tcp, metadata={"x-tenant": "a"}, data_plane="tcp")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_data_plane_with_the_grpc_credentials(server_factory: type[ServerProcess],
                                                  pki: Path,  # noqa: F811
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvstore.client")
    srv = server_factory("--server-tls-cert", str(pki / "server.pem"),
                         "--server-tls-key", str(pki / "server.key"),
                         "--server-tls-client-ca", str(pki / "ca.pem")).start()
    tls = TLS(ca=str(pki / "ca.pem"), cert=(pki / "client.pem").read_bytes(),
              key=str(pki / "client.key"))
    big = os.urandom(6 * MiB + 1)
    with Client(srv.tcp, namespace="tls", tls=tls, data_plane="tcp") as c:
        c.put({b"small": b"s" * 100, b"big": big})
        assert c.get([b"big", b"small", b"none"]) == [big, b"s" * 100, None]
        assert c.lookup([b"small", b"big"]).found == 2
        assert c.data_plane_calls == 3
    [where] = sessions_opened(caplog)
    assert where.startswith("127.0.0.1:")  # TCP (TLS), not the unix socket


# x86_64 numbers; a large Put under a deadline sends without blocking and
# waits for room in poll (kvstore.client.dataplane._sendmsg_pieces)
_SYSCALL = {"recvfrom": ("45",), "sendmsg": ("46", "7")}


def wait_in_syscall(tid: int, name: str, timeout: float = 30.0) -> None:
    """Bounded poll until thread ``tid`` of this process blocks in ``name``."""
    deadline = time.monotonic() + timeout
    path = f"/proc/self/task/{tid}/syscall"
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if Path(path).read_text().split()[0] in _SYSCALL[name]:
                return
        time.sleep(0.005)  # polling /proc with a deadline, not synchronisation by sleep
    raise AssertionError(f"thread {tid} never blocked in {name}")


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        out["tid"] = threading.get_native_id()
        try:
            out["result"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    while "tid" not in out:
        time.sleep(0.001)
    return t, out


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86_64 syscall numbers")
def test_a_call_in_flight_when_the_server_dies_gets_a_clear_error(
        server_factory: type[ServerProcess]) -> None:
    srv = server_factory().start()
    port = srv.tcp.rsplit(":", 1)[1]
    big = os.urandom(48 * MiB)
    with Client(srv.unix_target, namespace="gone", data_plane="unix", timeout=30) as c:
        c.put({b"a": b"1" * 1000})
        assert srv.proc is not None
        # A Put whose bytes the (stopped) server is not reading, then the server dies.
        os.kill(srv.pid, signal.SIGSTOP)
        t, out = in_thread(lambda: c.put({b"big": big}))
        wait_in_syscall(int(out["tid"]), "sendmsg")  # type: ignore[call-overload]
        srv.kill()
        t.join(30)
        err = out.get("error")
        assert isinstance(err, ConnectionFailed), out
        assert "dropped during the call" in str(err) and "unknown" in str(err)
        # The server is back (same addresses): the client opens a new session.
        srv.flags += ["--server-listen", f"127.0.0.1:{port}"]
        srv.start()
        c.put({b"b": b"2" * 1000})
        # A Get waiting for its answer when the server dies: retried once on a
        # new session, which finds no server: ConnectionFailed, not a hang.
        os.kill(srv.pid, signal.SIGSTOP)
        t, out = in_thread(lambda: c.get([b"b"]))
        wait_in_syscall(int(out["tid"]), "recvfrom")  # type: ignore[call-overload]
        srv.kill()
        t.join(30)
        assert isinstance(out.get("error"), ConnectionFailed), out
        srv.start()
        # The failed retry left grpc's channel in its reconnect backoff (about
        # 1 s), so the first calls may still fail fast; within a bound, the
        # client is back on its own (no new Client).
        deadline = time.monotonic() + 20
        while True:
            try:
                got = c.get([b"b"])
                break
            except ConnectionFailed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling a bounded wait, not synchronisation
        assert got == [None]  # the restarted server has an empty L1
