"""Where a data-plane session connects (docs/dataplane.md, "Opening a
session"): the server's unix socket when the client is on its host, else its
TCP listener, TLS on both sides or on neither. No I/O but one ``exists``
check; both SDKs (kvstore/client/dataplane.py, aio_dataplane.py) use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from kvstore.client._convert import DataPlaneOffer


class NoRoute(Exception):
    """The data plane exists but this client cannot use it (for good)."""

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


class Route(NamedTuple):
    """A unix socket path (``unix_path`` set) or a TCP host and port."""

    unix_path: str
    host: str
    port: int
    #: The name the TCP listener's TLS certificate is checked against: the
    #: gRPC target's host, not ``host``. The data plane serves the gRPC
    #: listener's certificate, which names the server as clients reach it;
    #: the address it offers may be one the certificate does not name (an
    #: IP where clients use a DNS name).
    server_name: str = ""

    @property
    def where(self) -> str:
        """As the SDK's log lines name it."""
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


def on_server_host(grpc_target: str) -> bool:
    """The gRPC target is a unix socket or a loopback address."""
    host = _host(grpc_target)
    return grpc_target.startswith("unix") or host in _LOCAL_HOSTS or host.startswith("127.")


def choose_route(mode: str, grpc_target: str, offer: DataPlaneOffer, tls: bool,
                 exists: Callable[[str], bool] = os.path.exists) -> Route:
    """The route for ``mode`` ("auto", "tcp" or "unix"); raises
    :data:`NoRoute` when there is none this client can take."""
    if offer.unix_path and (mode == "unix" or (mode == "auto" and on_server_host(grpc_target)
                                               and exists(offer.unix_path))):
        return Route(offer.unix_path, "", 0)
    if mode == "unix":
        raise NoRoute("data_plane='unix' but the server offers no unix socket")
    if not offer.tcp_address:
        raise NoRoute("the server's data plane has no TCP listener"
                      + (" and its unix socket is not on this host" if offer.unix_path else ""))
    if tls and not offer.tls:
        raise NoRoute("the gRPC channel uses TLS but the data plane's TCP listener does not")
    if not tls and offer.tls:
        raise NoRoute("the data plane's TCP listener speaks TLS but this client has no TLS "
                      "settings")
    host, port = _split_host_port(offer.tcp_address)
    grpc_host = _host(grpc_target)
    if host in _WILDCARD_HOSTS:
        host = grpc_host
    return Route("", host.strip("[]"), port, grpc_host.strip("[]"))


def _host(grpc_target: str) -> str:
    t = grpc_target
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme) :]
            break
    host, _, _ = t.rpartition(":") if ":" in t else (t, "", "")
    return host.lower()


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise NoRoute(f"the data plane's TCP address {address!r} is not host:port")
    return host, int(port)
