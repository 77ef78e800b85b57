"""The data plane's TCP listener under (mutual) TLS: the gRPC listener's
certificate, key and client CA; the unix socket stays plaintext."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from serverproc import ServerProcess

from dataplane.raw import GET, HELLO, Raw, block_of, get, get_meta, put, request, s
from kvstore.dataplane.tls import same_checks_as_grpc
from kvstore.wire.pb import kvstore_pb2 as pb

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EC CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("dp-pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=dp-test-ca")
    for name, san in (("server", "IP:127.0.0.1"), ("client", "DNS:dp-engine")):
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                 f"{name}.ext")
    return d


def _open_data_plane(target: str, creds: grpc.ChannelCredentials) -> pb.OpenDataPlaneResponse:
    with grpc.secure_channel(target, creds) as channel:
        return channel.unary_unary(  # type: ignore[no-any-return]
            "/kvstore.v1.KVStore/OpenDataPlane",
            request_serializer=pb.OpenDataPlaneRequest.SerializeToString,
            response_deserializer=pb.OpenDataPlaneResponse.FromString)(
                pb.OpenDataPlaneRequest(), timeout=10)


def test_mutual_tls_data_plane(server_factory: type[ServerProcess], certs: Path) -> None:
    srv = server_factory("--server-tls-cert", str(certs / "server.pem"),
                         "--server-tls-key", str(certs / "server.key"),
                         "--server-tls-client-ca", str(certs / "ca.pem")).start()
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / "client.key").read_bytes(),
        (certs / "client.pem").read_bytes())
    resp = _open_data_plane(srv.tcp, creds)
    assert resp.tls
    host, _, port = resp.tcp_address.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    # The fixture's CA has no key usage extension, which Python 3.13's strict
    # default refuses and gRPC accepts (kvstore.dataplane.tls).
    same_checks_as_grpc(ctx)
    ctx.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    plain = socket.create_connection((host, int(port)), timeout=20)
    raw = Raw(ctx.wrap_socket(plain, server_hostname="127.0.0.1"))
    raw.send(request(HELLO, 1, s(resp.ticket)))
    assert raw.frame().op == 0x81
    block = bytes(range(256)) * 4096  # 1 MiB
    assert put(raw, 2, "tls", {b"k": block}).op == 0x85
    assert [block_of(f) for f in get(raw, 3, "tls", [b"k", b"miss"])] == [block, None]

    # No client certificate: the handshake is refused (TLS 1.3 may report it
    # only at the first read).
    anonymous = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    same_checks_as_grpc(anonymous)
    sock = socket.create_connection((host, int(port)), timeout=20)
    with pytest.raises((ssl.SSLError, ConnectionResetError, EOFError)):
        bare = Raw(anonymous.wrap_socket(sock, server_hostname="127.0.0.1"))
        bare.send(request(HELLO, 1, s(b"\0" * 32)))
        bare.frame()
    sock.close()
    # Plaintext on the TLS port gets no frame back.
    cleartext = Raw(socket.create_connection((host, int(port)), timeout=20))
    cleartext.send(request(HELLO, 1, s(b"\0" * 32)))
    with pytest.raises((EOFError, ConnectionResetError, AssertionError)):
        cleartext.frame()


def test_a_graceful_stop_finishes_tls_answers_and_logs_no_error(
        server_factory: type[ServerProcess], certs: Path) -> None:
    """SIGTERM with a TLS data-plane connection idle (as pooled ones are) and
    a GET read only after the signal: the idle one is closed at once, the
    GET's answer arrives whole (TLS holds it in asyncio's buffers, and the
    connection was cut with it unsent), and the log has no ERROR (asyncio
    logged the cancelled connection task with a traceback, every restart)."""
    srv = server_factory("--server-tls-cert", str(certs / "server.pem"),
                         "--server-tls-key", str(certs / "server.key"),
                         "--server-grace-seconds", "30").start()
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    same_checks_as_grpc(ctx)

    def connect() -> Raw:
        resp = _open_data_plane(srv.tcp, creds)
        host, _, port = resp.tcp_address.rpartition(":")
        raw = Raw(ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=20),
                                  server_hostname="127.0.0.1"))
        raw.send(request(HELLO, 1, s(resp.ticket)))
        assert raw.frame().op == 0x81
        return raw

    idle, reader, halfway = connect(), connect(), connect()
    block = os.urandom(8 * 1024 * 1024)
    assert put(reader, 2, "tls", {b"big": block}).op == 0x85
    reader.send(request(GET, 3, get_meta("tls", [b"big"])))
    late = request(GET, 4, get_meta("tls", [b"big"]))
    halfway.send(late[:10])  # a request of which part of the header came first
    assert srv.proc is not None
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert idle.closed()
    assert block_of(reader.frame()) == block
    halfway.send(late[10:])
    assert block_of(halfway.frame()) == block  # (it was dropped: "peer closed mid-header")
    assert srv.proc.wait(60) == 0
    assert time.monotonic() - started < 20  # not the grace: nothing was left
    log = srv.log()
    assert " ERROR " not in log and "Traceback" not in log, log


def test_connections_that_never_finish_their_handshake_are_held_to_the_limit(
        server_factory: type[ServerProcess], certs: Path) -> None:
    """The TLS listener counts from accept too: connections that never send a
    ClientHello each held a descriptor for the handshake's timeout, past any
    limit (900 kept open with a limit of 2)."""
    srv = server_factory("--server-tls-cert", str(certs / "server.pem"),
                         "--server-tls-key", str(certs / "server.key"),
                         "--server-data-plane-max-connections", "2").start()
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    host, _, port = _open_data_plane(srv.tcp, creds).tcp_address.rpartition(":")
    burst = [socket.create_connection((host, int(port)), timeout=20) for _ in range(60)]
    deadline = time.monotonic() + 3.0
    pending = set(burst)
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(list(pending), [], [], deadline - time.monotonic())
        for sock in readable:
            assert sock.recv(1) == b""  # closed unread
            pending.discard(sock)
    assert len(pending) <= 4, f"{len(pending)} of 60 connections left open (limit 2)"
    for sock in burst:
        sock.close()
