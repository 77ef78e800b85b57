"""A fixed host-memory arena carved into page-granular extents.

The arena is allocated (and pre-faulted) once at start: touching fresh memory
costs ~2 GB/s on this kind of machine while copying into pre-faulted memory
runs at 10-45 GB/s, so no Put may pay for page faults. Blocks get contiguous
extents of whole pages; free extents are kept in size classes (one list per
power of two of their page count) and coalesced with their neighbours when
freed, so a workload of same-sized blocks (the normal case: one model, one
block size) reuses extents without fragmentation.

Pure mechanism, not thread-safe: the TieredStore calls it from the event loop.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat

from kvstore.config import format_size
from kvstore.errors import InvalidConfig
from kvstore.ownpath import check_directory
from kvstore.types import ARENA_MARKER_PREFIX

log = logging.getLogger(__name__)

# How many extents of the exact size class to inspect before taking one from a
# larger class; bounds the cost of an allocation on a fragmented arena.
_SCAN_LIMIT = 32

#: The arena file's page past the blocks: ``write_marker``.
MARKER_BYTES = 4096


class Arena:
    def __init__(self, capacity: int, page_bytes: int = 4096, prefault: bool = True,
                 shm_path: str = "") -> None:
        if page_bytes <= 0 or page_bytes & (page_bytes - 1):
            raise InvalidConfig(f"arena page size {page_bytes} is not a power of two")
        self.page_bytes = page_bytes
        self.pages = capacity // page_bytes
        if self.pages <= 0:
            raise InvalidConfig(f"arena capacity {capacity} holds no {page_bytes}-byte page")
        self.capacity = self.pages * page_bytes
        self.shm_path = shm_path
        #: The open arena file (-1: anonymous); its flock says the file is ours.
        self._fd = -1
        self._file_id: tuple[int, int] | None = None
        self._mmap = self._map(shm_path, prefault)
        self.view = memoryview(self._mmap)
        self.used_pages = 0
        # Free extents: start page -> length, end page (exclusive) -> start,
        # and size classes: index = length.bit_length() -> set of start pages.
        self._free_start: dict[int, int] = {}
        self._free_end: dict[int, int] = {}
        self._classes: list[set[int]] = [set() for _ in range(self.pages.bit_length() + 1)]
        self._add_free(0, self.pages)

    def _map(self, shm_path: str, prefault: bool) -> mmap.mmap:
        if shm_path:
            mm = self._map_file(shm_path)
        else:
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0) if prefault else \
                mmap.MAP_PRIVATE
            try:
                mm = mmap.mmap(-1, self.capacity, flags=flags)
            except OSError as exc:  # ENOMEM: more than the host's memory and swap
                raise InvalidConfig(f"l1.capacity {format_size(self.capacity)}: cannot map that "
                                    f"much memory ({exc.strerror or exc})") from None
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        if prefault:
            # Write one byte per page: MAP_POPULATE is not honoured everywhere
            # (and not for shared files), a write always is.
            import numpy as np

            np.frombuffer(mm, dtype=np.uint8)[:: self.page_bytes] = 0
        return mm

    def _map_file(self, path: str) -> mmap.mmap:
        """Map the arena file, locked for this server's lifetime and with all its
        space reserved: on a tmpfs smaller than the arena a sparse file maps
        fine and then kills the server with SIGBUS at the first page it cannot
        back (at start with prefault, else at some later Put)."""
        fd = self._open_locked(path)
        try:
            # Only now, holding the lock: drop a previous (stopped or killed)
            # server's bytes, so no client reads them in the new arena.
            os.ftruncate(fd, 0)
            os.posix_fallocate(fd, 0, self.capacity + MARKER_BYTES)
            mm = mmap.mmap(fd, self.capacity, flags=mmap.MAP_SHARED)
        except OSError as exc:
            os.unlink(path)  # ours (we hold the lock): leave no half-made arena behind
            os.close(fd)
            free = _free_space(os.path.dirname(os.path.abspath(path)))
            raise InvalidConfig(f"l1.capacity {format_size(self.capacity)} does not fit in "
                                f"l1.shm_path {path}: {exc.strerror or exc} ({free} free "
                                "there)") from None
        self._fd = fd
        return mm

    def _open_locked(self, path: str) -> int:
        """Open (creating) the arena file and take its exclusive lock, or refuse:
        a second server on the same path must not truncate the first's arena.

        Every tenant's blocks go into this file, so it must be the service
        user's own: a file another user made there first (or a link to one)
        would let that user read them all through a mapping it opened
        before, and a symbolic link would have the server truncate whatever
        it points at."""
        check_directory("l1.shm_path", path)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                what = "it is a symbolic link (remove it)" if exc.errno == errno.ELOOP else \
                    exc.strerror or str(exc)
                raise InvalidConfig(f"l1.shm_path {path}: cannot create the arena file "
                                    f"there: {what}") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                os.close(fd)
                raise InvalidConfig(
                    f"l1.shm_path {path} exists and is not an arena file of this user "
                    f"(uid {os.geteuid()}): it is owned by uid {st.st_uid}, mode "
                    f"{stat.filemode(st.st_mode)}, {st.st_nlink} links. Another user may "
                    "have made it to read the arena: remove it (and use a directory only "
                    "the service's user may write)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine = os.fstat(fd)
                there: os.stat_result | None
                try:
                    there = os.stat(path)
                except FileNotFoundError:
                    there = None
            except BlockingIOError:
                os.close(fd)
                raise InvalidConfig(f"l1.shm_path {path} is the arena of another running "
                                    "kvstore server: give each server its own path") from None
            except OSError as exc:
                os.close(fd)
                raise InvalidConfig(f"l1.shm_path {path}: cannot lock the arena file: "
                                    f"{exc.strerror or exc}") from None
            if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                if stat.S_IMODE(mine.st_mode) != 0o600:
                    # A file left by an earlier start keeps the mode it was
                    # given then (a chmod for a group of engines, say): the
                    # arena is the service user's alone until the operator
                    # opens it again, as the sockets are at every start.
                    log.warning("l1.shm_path %s had mode %s: set to 0600 (a process that "
                                "opened it before this start can still map it)", path,
                                stat.filemode(mine.st_mode))
                    os.fchmod(fd, 0o600)
                self._file_id = (mine.st_dev, mine.st_ino)
                return fd
            # The previous holder unlinked the file between our open and our
            # lock: this inode is no longer the path's; open the path again.
            os.close(fd)

    # -- extents ---------------------------------------------------------------

    def _add_free(self, start: int, length: int) -> None:
        self._free_start[start] = length
        self._free_end[start + length] = start
        self._classes[length.bit_length()].add(start)

    def _remove_free(self, start: int) -> int:
        length = self._free_start.pop(start)
        del self._free_end[start + length]
        self._classes[length.bit_length()].discard(start)
        return length

    def pages_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.page_bytes))

    def alloc(self, nbytes: int) -> int:
        """Byte offset of a free extent of at least ``nbytes``, or -1."""
        need = self.pages_for(nbytes)
        cls = need.bit_length()
        if cls >= len(self._classes):
            return -1
        start = -1
        for scanned, s in enumerate(self._classes[cls]):
            if self._free_start[s] >= need:
                start = s
                break
            if scanned >= _SCAN_LIMIT:
                break
        if start < 0:
            for bigger in range(cls + 1, len(self._classes)):
                if self._classes[bigger]:
                    start = next(iter(self._classes[bigger]))
                    break
        if start < 0:
            return -1
        length = self._remove_free(start)
        if length > need:
            self._add_free(start + need, length - need)
        self.used_pages += need
        return start * self.page_bytes

    def free(self, offset: int, nbytes: int) -> None:
        start = offset // self.page_bytes
        length = self.pages_for(nbytes)
        self.used_pages -= length
        prev_start = self._free_end.get(start)
        if prev_start is not None:
            length += self._remove_free(prev_start)
            start = prev_start
        if start + length in self._free_start:
            length += self._remove_free(start + length)
        self._add_free(start, length)

    def write_marker(self, instance: str) -> int:
        """Write ``ARENA_MARKER_PREFIX`` + ``instance`` into the file's page past
        the blocks and return its offset (0: no file, nothing written)."""
        if self._fd < 0:
            return 0
        marker = ARENA_MARKER_PREFIX + instance.encode()
        os.pwrite(self._fd, marker.ljust(MARKER_BYTES, b"\0"), self.capacity)
        return self.capacity

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    def largest_free(self) -> int:
        return max(self._free_start.values(), default=0) * self.page_bytes

    def close(self) -> None:
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            # A Get still holds a slice; the mapping goes when it is dropped.
            pass
        if self._fd >= 0:
            # Unlink only the file we hold: an operator may have removed ours and
            # another server made a new one at the same path.
            try:
                st = os.stat(self.shm_path)
                if (st.st_dev, st.st_ino) == self._file_id:
                    os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
            os.close(self._fd)  # the lock goes with the mapping's own descriptor
            self._fd = -1


def _free_space(directory: str) -> str:
    try:
        st = os.statvfs(directory)
    except OSError:
        return "unknown space"
    return f"{st.f_bavail * st.f_frsize / 1024**2:.1f} MiB"
