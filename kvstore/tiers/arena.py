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

import mmap
import os

from kvstore.errors import InvalidConfig

# How many extents of the exact size class to inspect before taking one from a
# larger class; bounds the cost of an allocation on a fragmented arena.
_SCAN_LIMIT = 32


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
            fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, self.capacity)
                mm = mmap.mmap(fd, self.capacity, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        else:
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0) if prefault else \
                mmap.MAP_PRIVATE
            mm = mmap.mmap(-1, self.capacity, flags=flags)
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
        if self.shm_path:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
