"""TLS on the TCP listener, and mutual TLS, with certificates made by openssl
for the test (a CA, a server certificate for 127.0.0.1, a client one)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvstore import TLS, Client
from kvstore.errors import ConnectionFailed, InvalidArgument, KVStoreError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=kvstore-test-ca", cwd=d)
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:engine-1")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                f"{name}.ext", cwd=d)
    # a client certificate of a CA the server does not trust
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out",
            "other-ca.pem", "-days", "2", "-subj", "/CN=another-ca", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "foreign.key", "-out",
            "foreign.csr", "-subj", "/CN=foreign", cwd=d)
    openssl("x509", "-req", "-in", "foreign.csr", "-CA", "other-ca.pem", "-CAkey",
            "other-ca.key", "-CAcreateserial", "-out", "foreign.pem", "-days", "2", cwd=d)
    return d


def test_tls_round_trip_and_plaintext_refused(server_factory, pki: Path) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--server-tls-cert", str(pki / "server.pem"),
                        "--server-tls-key", str(pki / "server.key")) as server:
        with Client(server.tcp, namespace="tls", tls=TLS(ca=str(pki / "ca.pem"))) as c:
            c.put({b"k": b"secret bytes"})
            assert c.get([b"k"]) == [b"secret bytes"]
        with Client(server.tcp, namespace="tls", timeout=5) as plain, \
                pytest.raises(KVStoreError):
            plain.get([b"k"])
        # The unix socket stays local and plaintext (mode 0600).
        with Client(server.unix_target, namespace="tls") as local:
            assert local.get([b"k"]) == [b"secret bytes"]


def test_a_stalled_tls_server_fails_a_call_at_its_timeout(server_factory, pki: Path) -> None:  # type: ignore[no-untyped-def]
    """A fix review: over the TLS data plane a call waiting for the answer of a
    stopped server waited for as long as it was stopped (10 x the timeout):
    Python's TLS reads retried the kernel's EAGAIN on a blocking socket."""
    import os
    import signal
    import threading
    import time

    from kvstore.errors import DeadlineExceeded

    with server_factory("--server-tls-cert", str(pki / "server.pem"),
                        "--server-tls-key", str(pki / "server.key")) as server, \
            Client(server.tcp, namespace="tls", tls=TLS(ca=str(pki / "ca.pem")),
                   data_plane="tcp", timeout=0.5) as c:
        c.put({b"k": b"v" * 4096})
        assert c.get([b"k"]) == [b"v" * 4096]
        assert c.data_plane_calls > 0  # (the TLS data plane, not gRPC)
        os.kill(server.pid, signal.SIGSTOP)
        resume = threading.Timer(5.0, os.kill, (server.pid, signal.SIGCONT))
        resume.start()  # (the bound on the wait, should the call not end first)
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                c.lookup([b"k"])
            assert time.monotonic() - started < 3.0  # (before the server resumes)
        finally:
            resume.cancel()
            os.kill(server.pid, signal.SIGCONT)
        assert c.get([b"k"]) == [b"v" * 4096]


def test_mutual_tls_requires_a_client_certificate(server_factory, pki: Path) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--server-tls-cert", str(pki / "server.pem"),
                        "--server-tls-key", str(pki / "server.key"),
                        "--server-tls-client-ca", str(pki / "ca.pem")) as server:
        # The handshake refused reads as a closed socket: the error says what
        # it may mean (it said only "cannot reach", as for a server down).
        with Client(server.tcp, namespace="mtls", timeout=5,
                    tls=TLS(ca=str(pki / "ca.pem"))) as anonymous, \
                pytest.raises(ConnectionFailed, match=r"may require a client certificate"):
            anonymous.stats()
        foreign = TLS(ca=str(pki / "ca.pem"), cert=str(pki / "foreign.pem"),
                      key=str(pki / "foreign.key"))
        with Client(server.tcp, namespace="mtls", timeout=5, tls=foreign) as stranger, \
                pytest.raises(ConnectionFailed, match=r"may have refused the certificate: "
                                                      r"not signed by a CA in its "
                                                      r"server\.tls_client_ca"):
            stranger.get([b"k"])
        tls = TLS(ca=str(pki / "ca.pem"), cert=str(pki / "client.pem"),
                  key=str(pki / "client.key"))
        with Client(server.tcp, namespace="mtls", tls=tls) as c:
            c.put({b"k": b"v"})
            assert c.get([b"k"]) == [b"v"]


def test_tls_config_errors_are_clear(pki: Path) -> None:
    from kvstore.config import load
    from kvstore.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match="go together"):
        load(env={"KVSTORE_SERVER_TLS_CERT": str(pki / "server.pem")})
    with pytest.raises(InvalidConfig, match="not a readable file"):
        load(env={"KVSTORE_SERVER_TLS_CERT": "/nonexistent.pem",
                  "KVSTORE_SERVER_TLS_KEY": str(pki / "server.key")})
    with pytest.raises(InvalidArgument, match="unix socket"):
        Client("unix:/tmp/x.sock", tls=TLS())


def test_an_expired_server_certificate_is_refused_at_start(
        pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A server whose certificate expired started and said it was healthy
    while every TLS client failed its handshake; now it says so at start."""
    import time

    from kvstore.errors import InvalidConfig
    from kvstore.server.preflight import check_validity

    cert = str(pki / "server.pem")
    check_validity(cert)  # valid now (2 days)
    with pytest.raises(InvalidConfig, match=r"server\.tls_cert .* expired on .*renew it"):
        check_validity(cert, now=time.time() + 10 * 86400)
    with caplog.at_level("WARNING", logger="kvstore.server"):
        check_validity(cert, now=time.time() - 10 * 86400)
    assert any("not valid before" in r.getMessage() for r in caplog.records)
