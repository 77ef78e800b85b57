"""Where a data-plane session connects (docs/dataplane.md, "Opening a
session"): the server's unix socket when the client is on its host, else its
TCP listener, TLS on both sides or on neither; and when a client tries again
after it could not open one. No I/O but one ``exists`` check; both SDKs
(kvstore/client/dataplane.py, aio_dataplane.py) use it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from kvstore.client._convert import DataPlaneOffer

log = logging.getLogger("kvstore.client")

#: Opening a session (connect, TLS handshake, HELLO) may take this long (the
#: client's timeout when that is shorter): the async client bounds the whole,
#: the sync one each wait (the connect to each address of a name, each read
#: of the handshake and HELLO). Past it the listener is unusable for now and
#: the call goes by gRPC. Without this bound a listener
#: whose packets are dropped (a port no Service, NAT or firewall passes) held
#: the call for the client's whole timeout (60 s by default), and did so
#: again at every retry. A session opens in three round trips (two without
#: TLS), so this leaves room for a distant server and one lost SYN (resent
#: after 1 s).
OPEN_TIMEOUT_S = 2.0
#: A listener that could not be used is tried again after RETRY_S, then after
#: twice as long each time it still cannot, up to RETRY_MAX_S: an engine whose
#: data plane is out of reach pays OPEN_TIMEOUT_S a few times an hour, not
#: every few seconds.
RETRY_S = 5.0
RETRY_MAX_S = 300.0


def open_timeout(timeout: float | None) -> float:
    """How long opening a session may take, for a client with ``timeout``."""
    return OPEN_TIMEOUT_S if timeout is None else min(timeout, OPEN_TIMEOUT_S)


class Retry:
    """When a client that could not open a session tries again (gRPC until
    then), and the log line that says so."""

    def __init__(self) -> None:
        #: time.monotonic() before which calls go by gRPC.
        self.at = 0.0
        self._wait = RETRY_S
        self._warned = False

    def failed(self, target: str, where: str, why: object) -> None:
        wait = self._wait
        self.at = time.monotonic() + wait
        self._wait = min(2 * wait, RETRY_MAX_S)
        # A warning the first time (the engine runs slower than it could and
        # its operator should know why), then debug lines.
        (log.debug if self._warned else log.warning)(
            "kvstore data plane at %s (offered by %s) cannot be used (%s): calls go by "
            "gRPC; trying again in %.0f s (data_plane=False or KVSTORE_DATA_PLANE=0 keeps "
            "to gRPC without trying)", where, target, why, wait)
        self._warned = True

    def succeeded(self) -> None:
        self._wait = RETRY_S
        self._warned = False


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
