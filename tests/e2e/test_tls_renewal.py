"""A certificate renewed on disk (cert-manager, certbot) is served by both TCP
listeners -- gRPC and the data plane -- without a restart; files that do not
load leave the one in force serving; a rotated client CA applies to new
connections. Real server, real handshakes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pki import make_ca, make_leaf, needs_openssl
from serverproc import ServerProcess

from kvstore import TLS, Client
from kvstore.dataplane.tls import same_checks_as_grpc
from kvstore.errors import ConnectionFailed

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("renewal-pki")
    for ca in ("ca-1", "ca-2"):
        make_ca(d, ca)
    make_leaf(d, "ca-1", "server-1", "IP:127.0.0.1", days=2)
    make_leaf(d, "ca-1", "server-2", "IP:127.0.0.1", days=3)
    make_leaf(d, "ca-1", "engine-1", "DNS:engine-1")
    make_leaf(d, "ca-2", "engine-2", "DNS:engine-2")
    return d


def install(src: Path, dest: Path) -> None:
    """Replace ``dest`` in one step, as a secret's update or certbot's deploy does."""
    tmp = dest.with_name(f".{dest.name}.new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)  # a bounded poll, not synchronisation by sleep


_CONTEXTS: dict[tuple[Path, tuple[Path, Path] | None, bool], ssl.SSLContext] = {}


def client_context(ca: Path, client: tuple[Path, Path] | None, alpn: bool) -> ssl.SSLContext:
    """One context per kind of client (a session is resumed only from its own)."""
    ctx = _CONTEXTS.get((ca, client, alpn))
    if ctx is None:
        ctx = _CONTEXTS[(ca, client, alpn)] = ssl.create_default_context(cafile=str(ca))
        same_checks_as_grpc(ctx)
        ctx.check_hostname = False
        if client is not None:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
        if alpn:
            ctx.set_alpn_protocols(["h2"])
    return ctx


def tls_session(address: str, ca: Path, client: tuple[Path, Path]) -> ssl.SSLSession | None:
    """A session to resume later (read once, so that tickets, if any, arrive)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock, \
            client_context(ca, client, False).wrap_socket(sock) as tls:
        tls.settimeout(0.3)
        with contextlib.suppress(TimeoutError, ssl.SSLError, OSError):
            tls.recv(1)
        return tls.session


def served_cn(address: str, ca: Path, client: tuple[Path, Path] | None = None,
              alpn: bool = False, session: ssl.SSLSession | None = None) -> str:
    """The subject CN of the certificate a new TLS connection to ``address``
    gets (checked against ``ca``); "refused" when the server ends the handshake."""
    host, _, port = address.rpartition(":")
    ctx = client_context(ca, client, alpn)
    if session is not None:  # resumed from the context that made it
        ctx = next(c for (a, cl, al), c in _CONTEXTS.items() if a == ca and not al and cl)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock, \
                ctx.wrap_socket(sock, session=session) as tls:
            cert = tls.getpeercert()
            # TLS 1.3 reports a refused client certificate only at the next read.
            tls.settimeout(0.2)
            try:
                if tls.recv(1) == b"":
                    return "refused"
            except TimeoutError:
                pass
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return "refused"
    assert cert is not None
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


def addresses(server: ServerProcess) -> tuple[str, str]:
    ready = max(server.data_dir.glob("ready-*.json"), key=lambda p: p.stat().st_mtime)
    info = json.loads(ready.read_text())
    return info["tcp"], info["data_plane_tcp"]


def tls_server(server_factory: type[ServerProcess], pki: Path, tmp_path: Path,
               *flags: str) -> tuple[ServerProcess, Path]:
    files = tmp_path / "tls"
    files.mkdir()
    install(pki / "server-1.pem", files / "server.pem")
    install(pki / "server-1.key", files / "server.key")
    server = server_factory("--server-tls-cert", str(files / "server.pem"),
                            "--server-tls-key", str(files / "server.key"),
                            "--server-metrics-listen", "127.0.0.1:0", *flags,
                            env={"KVSTORE_LOG_LEVEL": "INFO"}).start()
    return server, files


def test_a_renewed_certificate_is_served_without_a_restart(
        server_factory: type[ServerProcess], pki: Path, tmp_path: Path) -> None:
    server, files = tls_server(server_factory, pki, tmp_path)
    grpc_at, dp_at = addresses(server)
    ca = pki / "ca-1.pem"
    assert served_cn(grpc_at, ca, alpn=True) == "server-1"
    assert served_cn(dp_at, ca) == "server-1"
    with Client(server.tcp, namespace="renew", tls=TLS(ca=str(ca))) as before:
        before.put({b"k": b"stored before the renewal"})
        install(pki / "server-2.key", files / "server.key")  # a renewal's new key
        install(pki / "server-2.pem", files / "server.pem")  # and its certificate
        wait_until(lambda: served_cn(grpc_at, ca, alpn=True) == "server-2",
                   "renewed certificate on the gRPC listener")
        wait_until(lambda: served_cn(dp_at, ca) == "server-2",
                   "renewed certificate on the data plane")
        # Open connections keep working; new ones handshake with the new certificate.
        assert before.get([b"k"]) == [b"stored before the renewal"]
    with Client(server.tcp, namespace="renew", tls=TLS(ca=str(ca))) as after:
        assert after.get([b"k"]) == [b"stored before the renewal"]
        assert after.data_plane_calls > 0
    assert server.metric("kvstore_tls_reloads_total") == 1
    assert server.metric("kvstore_tls_reload_failures_total") == 0
    expiry = server.metric("kvstore_tls_certificate_expiry_timestamp_seconds")
    assert expiry is not None and expiry > time.time() + 2.5 * 86400  # server-2's 3 days
    assert "reloaded the certificate files: new connections get CN=server-2" in server.log()
    assert server.terminate() == 0


def test_a_renewal_that_does_not_load_leaves_the_certificate_in_force(
        server_factory: type[ServerProcess], pki: Path, tmp_path: Path) -> None:
    server, files = tls_server(server_factory, pki, tmp_path)
    grpc_at, dp_at = addresses(server)
    ca = pki / "ca-1.pem"
    install(pki / "server-2.key", files / "server.key")  # the key copied, not yet its certificate
    os.kill(server.pid, signal.SIGHUP)
    wait_until(lambda: "not reloaded" in server.log(), "warning for the mismatched key")
    assert "the key does not belong to the certificate" in server.log()
    assert served_cn(grpc_at, ca, alpn=True) == "server-1"
    assert served_cn(dp_at, ca) == "server-1"
    with Client(server.tcp, namespace="renew", tls=TLS(ca=str(ca))) as client:
        client.put({b"k": b"v"})
        assert client.get([b"k"]) == [b"v"] and client.data_plane_calls > 0
    assert server.metric("kvstore_tls_reload_failures_total") == 1
    install(pki / "server-2.pem", files / "server.pem")  # then the certificate
    wait_until(lambda: served_cn(dp_at, ca) == "server-2", "the completed renewal")
    assert served_cn(grpc_at, ca, alpn=True) == "server-2"
    assert server.alive()


def test_a_rotated_client_ca_applies_to_new_connections(
        server_factory: type[ServerProcess], pki: Path, tmp_path: Path) -> None:
    client_ca = tmp_path / "clients.pem"
    install(pki / "ca-1.pem", client_ca)
    server, _ = tls_server(server_factory, pki, tmp_path, "--server-tls-client-ca",
                           str(client_ca))
    grpc_at, dp_at = addresses(server)
    ca = pki / "ca-1.pem"
    engine_1 = (pki / "engine-1.pem", pki / "engine-1.key")
    engine_2 = (pki / "engine-2.pem", pki / "engine-2.key")
    assert served_cn(dp_at, ca, engine_1) == "server-1"
    assert served_cn(dp_at, ca, engine_2) == "refused"
    session = tls_session(dp_at, ca, engine_1)
    install(pki / "ca-2.pem", client_ca)  # engine-1's CA is no longer trusted
    os.kill(server.pid, signal.SIGHUP)
    wait_until(lambda: "reloaded the certificate files" in server.log(), "reload line")
    assert served_cn(dp_at, ca, engine_2) == "server-1"
    assert served_cn(dp_at, ca, engine_1) == "refused"
    # Nor may engine-1 resume a session from before (resumption skips the
    # check of its certificate: it was let in with no certificate at all).
    assert served_cn(dp_at, ca, None, session=session) == "refused"
    assert served_cn(grpc_at, ca, engine_2, alpn=True) == "server-1"
    assert served_cn(grpc_at, ca, engine_1, alpn=True) == "refused"
    tls = TLS(ca=str(ca), cert=str(engine_1[0]), key=str(engine_1[1]))
    with Client(server.tcp, namespace="mtls", tls=tls, timeout=5) as old, \
            pytest.raises(ConnectionFailed):
        old.stats()
    tls = TLS(ca=str(ca), cert=str(engine_2[0]), key=str(engine_2[1]))
    with Client(server.tcp, namespace="mtls", tls=tls) as new:
        new.put({b"k": b"v"})
        assert new.get([b"k"]) == [b"v"] and new.data_plane_calls > 0
