"""Where a unix socket may be bound: the one rule for ``server.unix_socket``
(kvstore/server) and ``server.data_plane_unix`` (kvstore/dataplane), which may
not import each other."""

from __future__ import annotations

import os
import socket
import stat

from kvstore.errors import InvalidConfig
from kvstore.ownpath import check_directory

#: sockaddr_un holds 108 bytes, the last one the terminating NUL.
UNIX_PATH_MAX = 107


def check_socket_path(option: str, path: str) -> bool:
    """Whether a unix socket may be bound at ``path`` after removing what is
    there (True: a stale socket to unlink). Anything but a socket is refused
    (a typo must not cost a file), and so is a socket that a live server
    accepts on (binding over it would silently take its address). So is a
    directory another user could swap the socket in (clients would send that
    user their tokens and blocks: kvstore/ownpath.py)."""
    check_directory(option, path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise InvalidConfig(f"{option} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidConfig(f"{option} {path} exists and is not a socket: remove it or "
                            "choose another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True  # nobody listens: left by a server that died
        except OSError as exc:
            raise InvalidConfig(f"{option} {path}: cannot tell whether a server is "
                                f"listening there: {exc.strerror or exc}") from None
    raise InvalidConfig(f"{option} {path}: another server is listening there")
