"""An engine that reaches the server's gRPC under another name or address
than the one the server's data plane offers: the setups of docs/deploy.md
("Data plane") and docs/cross-host.md, where the engine is on another host
behind a Service, a NAT or a port-forward."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvstore import TLS, AsyncClient, Client
from tests.pki import make_ca, make_leaf, needs_openssl


@needs_openssl
def test_tls_data_plane_checks_the_name_the_client_reached_grpc_at(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The certificate names the server as clients reach it (here only
    "localhost"); the data plane offers the address it listens on
    (127.0.0.1). Checking the certificate against that address failed the
    handshake, and the client kept to gRPC without a word above debug."""
    make_ca(tmp_path, "ca")
    cert, key = make_leaf(tmp_path, "ca", "server", "DNS:localhost")
    with server_factory("--server-tls-cert", str(cert), "--server-tls-key", str(key),
                        unix=False) as server:
        target = f"localhost:{server.tcp.rsplit(':', 1)[1]}"
        tls = TLS(ca=str(tmp_path / "ca.pem"))
        with Client(target, namespace="tlsname", tls=tls, timeout=10, data_plane="tcp") as c:
            c.put({b"k": b"v" * 4096})
            assert c.get([b"k"]) == [b"v" * 4096]
            assert c.data_plane_calls == 2

        async def aio() -> int:
            async with AsyncClient(target, namespace="tlsname", tls=tls, timeout=10,
                                   data_plane="tcp") as a:
                await a.put({b"a": b"w" * 4096})
                assert await a.get([b"a", b"k"]) == [b"w" * 4096, b"v" * 4096]
                return a.data_plane_calls

        assert asyncio.run(aio()) == 2
