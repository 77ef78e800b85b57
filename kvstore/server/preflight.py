"""Checks of the server's environment before anything starts.

Each failure is an :class:`~kvstore.errors.InvalidConfig` naming the option,
the path or address and what is wrong, so that ``kvstore serve`` prints one
line instead of a traceback (or grpc's "Failed to bind to address ...; set
GRPC_VERBOSITY=debug", which says neither why nor which option). They run
before the store opens, so a mistake costs no index rebuild.

The listen check binds the port and lets it go again: another process could
take it in between, and then grpc's own bind fails, which the server reports
the same way (kvstore/server/app.py).
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from pathlib import Path

from kvstore.config import Config
from kvstore.errors import InvalidConfig


def check(config: Config) -> None:
    check_data_dir(config)
    check_tls(config)
    check_listen(config.server.listen)
    check_unix_socket(config.server.unix_socket)


def check_data_dir(config: Config) -> None:
    """L2 lives in ``<data_dir>/l2``: it must be a directory we can write."""
    if not config.l2.enabled:
        return
    path = config.l2_path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InvalidConfig(f"data_dir {config.data_dir}: cannot create or write {path}: "
                            f"{exc.strerror or exc}") from None


def check_tls(config: Config) -> None:
    """The certificate parses, the key parses and belongs to it, the client
    CA bundle parses: the mistakes grpc reports only as a failed bind."""
    s = config.server
    if not s.tls_cert:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for option, path in (("server.tls_cert", s.tls_cert), ("server.tls_client_ca",
                                                         s.tls_client_ca)):
        if path:
            _load_certificates(context, option, path)
    try:
        # An empty password: an encrypted key fails here (grpc cannot use
        # one) instead of OpenSSL prompting on the terminal.
        context.load_cert_chain(s.tls_cert, s.tls_key, password="")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise InvalidConfig(f"server.tls_key {s.tls_key} does not belong to the "
                                f"certificate in server.tls_cert {s.tls_cert}") from None
        detail = f" ({exc.reason})" if exc.reason else ""
        raise InvalidConfig(f"server.tls_key {s.tls_key} is not an unencrypted PEM private "
                            f"key{detail}") from None
    except OSError as exc:
        raise InvalidConfig(f"server.tls_key {s.tls_key}: cannot read it: "
                            f"{exc.strerror or exc}") from None


def _load_certificates(context: ssl.SSLContext, option: str, path: str) -> None:
    try:
        Path(path).read_bytes()
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise InvalidConfig(f"{option} {path} holds no PEM certificate: "
                            f"{exc.reason or exc}") from None
    except OSError as exc:
        raise InvalidConfig(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None


def check_listen(listen: str) -> None:
    """The TCP address resolves and its port is free (port 0 always is)."""
    if not listen:
        return
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidConfig(f"server.listen {listen!r} is not host:port")
    port = int(port_text)
    host = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidConfig(f"server.listen {listen}: cannot resolve {host!r}: "
                            f"{exc.strerror}") from None
    if port == 0:
        return
    errors: list[str] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As grpc binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                errors.append(exc.strerror or str(exc))
            else:
                return  # grpc serves when at least one address binds
    raise InvalidConfig(f"server.listen {listen}: cannot listen there: "
                        f"{'; '.join(dict.fromkeys(errors))}")


#: sockaddr_un holds 108 bytes, the last one the terminating NUL.
UNIX_PATH_MAX = 107


def check_unix_socket(path: str) -> None:
    if path and len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise InvalidConfig(f"server.unix_socket {path}: the path is longer than "
                            f"{UNIX_PATH_MAX} bytes, the most a unix socket address holds")
