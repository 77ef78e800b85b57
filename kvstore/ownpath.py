"""Whether another local user could swap what the server makes at a path.

The server creates its shared-memory arena file and its unix sockets in
directories the operator names. A user who owns such a directory, or may
write to it without the sticky bit, can replace the file or the socket after
the server made it: clients would then map that user's file (writing every
block they put into it, reading the blocks it holds) or send it their bearer
tokens. One rule for ``l1.shm_path`` (kvstore/tiers) and the unix sockets
(kvstore/sockpath.py), which may not import each other's packages.
"""

from __future__ import annotations

import os
import stat

from kvstore.errors import InvalidConfig


def check_directory(option: str, path: str) -> None:
    """InvalidConfig when the directory holding ``path`` belongs to a user
    other than this process's (or root), or every user may write to it and it
    lacks the sticky bit (/tmp and /dev/shm have it: there no other user can
    remove or rename what the server made). A directory that does not exist
    yet passes: the server creates it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InvalidConfig(f"{option} {path}: {directory}: {exc.strerror or exc}") from None
    if st.st_uid not in (os.geteuid(), 0):
        raise InvalidConfig(f"{option} {path}: its directory {directory} belongs to another "
                            f"user (uid {st.st_uid}), who could replace what the server "
                            "makes there: use a directory of the service's user")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise InvalidConfig(f"{option} {path}: every user may write to its directory "
                            f"{directory} (mode {st.st_mode & 0o7777:04o}, no sticky bit) "
                            "and so replace what the server makes there: use a directory "
                            "of the service's user, or chmod o-w it")
