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
    """InvalidConfig when the directory holding ``path``, or any directory
    above it, belongs to a user other than this process's (or root), or every
    user may write to it and it lacks the sticky bit (/tmp and /dev/shm have
    it: there no other user can remove or rename what the server made). A
    directory above counts as much as the last one: its owner, or anyone in a
    world-writable one, may rename the server's directory aside and put one of
    their own at its name. Directories that do not exist yet are passed over:
    the server creates them."""
    directory = os.path.dirname(os.path.abspath(path))
    # Every directory the kernel walks to reach the path: those of its
    # symbolic links' targets too.
    resolved = os.path.realpath(directory)
    for current in dict.fromkeys(_ancestors(directory) + _ancestors(resolved)):
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise InvalidConfig(f"{option} {path}: {current}: {exc.strerror or exc}") from None
        what = "its directory" if current in (directory, resolved) else "the directory above it"
        if st.st_uid not in (os.geteuid(), 0):
            raise InvalidConfig(f"{option} {path}: {what} {current} belongs to another "
                                f"user (uid {st.st_uid}), who could replace what the server "
                                "makes there: use a directory of the service's user")
        if stat.S_ISLNK(st.st_mode):
            continue  # a link's own mode means nothing; its owner was checked
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise InvalidConfig(f"{option} {path}: every user may write to {what} "
                                f"{current} (mode {st.st_mode & 0o7777:04o}, no sticky bit) "
                                "and so replace what the server makes there: use a directory "
                                "of the service's user, or chmod o-w it")


def _ancestors(directory: str) -> list[str]:
    """``directory`` and every directory above it, up to /."""
    out = [directory]
    while (parent := os.path.dirname(out[-1])) != out[-1]:
        out.append(parent)
    return out


def make_directories(directory: str | os.PathLike[str], mode: int) -> None:
    """Create ``directory`` and every missing directory above it with
    ``mode`` (less the umask). ``Path.mkdir(parents=True)`` gives the ones
    above 0777 less the umask: under umask 0 every user could rename the
    server's directory out of them, and :func:`check_directory` refuses that."""
    path = os.path.abspath(directory)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
