"""L2: blocks in LMDB on local NVMe, in the :class:`~kvstore.tiers.base.KeyValueTier` role.

One environment per data directory with two sub-databases: ``data`` (payloads)
and ``meta`` (BlockMeta, 24 bytes each), so a restart rebuilds the index by
scanning ``meta`` without reading payloads.

Writes go through one writer thread that drains a queue and commits each
batch in one transaction (group commit): LMDB allows one writer at a time,
and batching turns many small commits into one. A flush puts a barrier in the
same queue: the writer commits what came before it, syncs and releases the
waiter. Reads run in short read transactions on executor threads and copy
straight into the caller's buffer. When the map is full the writer grows it
(doubling) once no read transaction is open — LMDB forbids resizing under an
open transaction — and retries the batch, so clients never see MapFullError.
Every other ``lmdb.Error`` leaves this module as a
:class:`~kvstore.errors.StorageError`.

LMDB reads through a memory map of ``data.mdb``: touching a page past the
end of the file (one cut short on disk) is a SIGBUS that kills the process.
So before each transaction the file is checked against the size LMDB's
meta page records ((last page + 1) x page size); when it is shorter it is
extended with zeros first (:meth:`LMDBTier._ensure_pages_exist`). A crash
right after a commit can leave the top free pages unwritten, which is
harmless; after damage, the lost pages read as zeros: a payload then fails
its checksum (the caller drops the copy) and a B-tree page makes LMDB
report corruption (a StorageError), never a signal. An environment LMDB
cannot open or scan is refused at start with one line naming the recovery
(``l2.recover``: move it aside to ``<dir>.damaged-<time>`` and start empty).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import queue
import shutil
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from kvstore._version import __version__
from kvstore.errors import InvalidConfig, StorageError
from kvstore.tiers.base import BlockMeta, Buffer, TierUsage, WriteDone
from kvstore.types import MAX_KEY_BYTES, BlockId

if TYPE_CHECKING:
    from kvstore.tiers.base import KeyValueTier

log = logging.getLogger(__name__)

_SCAN_BATCH = 10_000
#: The smallest initial map (l2.initial_map_size below it counts as it).
MIN_MAP_SIZE = 1 << 20
#: The L2 layout this release writes, recorded in the environment (named
#: database ``kvstore``, key ``format``) with the oldest layout a reader must
#: know to read it safely (``readable_by``) and who wrote it. 1: before L3
#: delete records; 2: records (``l3gone``), no marker; 3: records carry the
#: object's checksum, and the marker. A release refuses an environment whose
#: ``readable_by`` is above its own FORMAT: one that ignored what a newer
#: one records could serve or delete what it should not (a release that did
#: not read delete records served deleted blocks, and later deleted an
#: acknowledged one).
FORMAT = 3
READABLE_BY = 2
_DATA_FILE = "data.mdb"
_PROBE_KEY = b"\x00"  # no block's key: a namespace is never empty


def encode_key(block: BlockId) -> bytes:
    ns = block[0].encode()
    return bytes((len(ns),)) + ns + block[1]


def decode_key(raw: bytes) -> BlockId:
    n = raw[0]
    # Interned: millions of keys share a handful of namespaces.
    return sys.intern(raw[1 : 1 + n].decode()), bytes(raw[1 + n :])


class _ReadWriteLock:
    """Many readers or one resizer (who waits for readers to leave)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._resizing = True
            while self._readers:
                self._cond.wait()

    def release_write(self) -> None:
        with self._cond:
            self._resizing = False
            self._cond.notify_all()


@dataclass(slots=True)
class _Op:
    key: bytes
    data: Buffer | None  # None = delete
    meta: bytes
    size: int
    done: WriteDone
    kind: int = 0  # _BLOCK, _TOMBSTONE, _MARKER or _STATE
    durable: bool = False  # a marker: synced to disk before ``done``, whatever l2.sync


_BLOCK, _TOMBSTONE, _MARKER, _STATE = 0, 1, 2, 3
#: The state file's mark of an L2 written over while a server ran on it, and
#: the transaction it records then (any start of any release refuses it).
_REPLACED = "replaced"
_NEVER_AGAIN = 2**62
#: The ``kvstore`` database's count of the writer's commits.
_COMMITS = b"commits"
#: The ``kvstore`` database's field for :attr:`LMDBTier.unlisted_since`.
_UNLISTED_SINCE = b"unlisted_since"
#: Left in the L2 directory by a server started without L2 on a data dir that
#: holds one (the time it started, one line): the next open clears the blocks.
RUN_WITHOUT_L2 = "run-without-l2"
#: ... and for :attr:`LMDBTier.l3_url`.
_L3_URL = b"l3_url"
#: ... and for :attr:`LMDBTier.l3_off_since`.
_L3_OFF_SINCE = b"l3_off_since"
#: A tombstone's value: the checksum of the L3 object it is to delete.
_TOMB_CHECKSUM = struct.Struct("<Q")


@dataclass(slots=True)
class _Barrier:
    """Queued by flush: set once everything queued before it is committed and synced."""

    reached: threading.Event
    error: BaseException | None = None


_STOP = object()


#: How the OS says a limit was reached (not that the file is damaged).
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOSPC,
                    errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                    errno.EFBIG)  # (a file size limit: not damage, never moved aside)
_RESOURCE_TEXTS = tuple(os.strerror(n) for n in _RESOURCE_ERRNOS)


def _is_resource_error(exc: BaseException) -> bool:
    """py-lmdb raises a system error as lmdb.Error with its strerror text."""
    if isinstance(exc, (lmdb.MemoryError, lmdb.ReadersFullError, lmdb.TlsFullError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _RESOURCE_ERRNOS
    text = str(exc)
    return any(t in text for t in _RESOURCE_TEXTS)


def _call_done(op: _Op, error: BaseException | None, existed: bool) -> None:
    try:
        op.done(error, existed)
    except Exception:  # a callback must not stop the writer or the syncer
        log.exception("L2 write callback failed")


def _time_field(fields: dict[bytes, str], field: bytes) -> float | None:
    """A time the ``kvstore`` database holds (None: absent or unreadable)."""
    try:
        return float(fields[field])
    except (KeyError, ValueError):
        return None


def _meta_of(raw: Any) -> BlockMeta | None:
    """A ``meta`` record's metadata; None where it does not parse (damaged)."""
    return BlockMeta.unpack(raw) if len(raw) == BlockMeta.SIZE else None


def _decodable(key: bytes) -> bool:
    """Whether ``key`` is a block's (:func:`encode_key`): a namespace's
    length, a non-empty UTF-8 namespace, and a key of 1..MAX_KEY_BYTES."""
    if not key or key[0] == 0 or not 0 < len(key) - 1 - key[0] <= MAX_KEY_BYTES:
        return False
    try:
        key[1:1 + key[0]].decode()
    except UnicodeDecodeError:
        return False
    return True


def _commit_count(raw: Any) -> int:
    """The ``kvstore`` database's commit count (0: absent, or unreadable)."""
    try:
        return int(bytes(raw)) if raw is not None else 0
    except ValueError:
        return 0


class LMDBTier:
    def __init__(self, path: str | Path, capacity: int, initial_map_size: int = 1 << 30,
                 sync: bool = False, batch_bytes: int = 64 << 20,
                 executor: concurrent.futures.Executor | None = None,
                 recover: bool = False, state_file: str | Path | None = None) -> None:
        self.path = Path(path)
        # Which environment this data dir last ran with and how far it was
        # synced (see _check_lineage); None: not recorded nor checked.
        self._state_file = Path(state_file) if state_file is not None else None
        self._instance = ""  # the environment's id (in ``kvstore``); "" before the open
        self._state_db: Any = None  # the ``kvstore`` database (set at open)
        self._commits = 0  # write commits counted in the environment (see _mark_replaced)
        self._replaced = False  # written over while open here (see _mark_replaced)
        self._unlisted_since: float | None = None
        self._l3_url: str | None = None
        self._l3_off_since: float | None = None
        self._new_instance = False  # the open gave it one: it had none
        self._recorded_txn = -1
        self._state_lock = threading.Lock()
        self.capacity = capacity
        self.batch_bytes = batch_bytes
        self.sync = sync  # every commit synced (else only flushes, the close, durable markers)
        # Held by the writer around each transaction, and while a short
        # data file is extended (extending never races a commit's writes).
        self._write_lock = threading.Lock()
        self.extensions = 0  # times the data file was found short and extended
        self._seen_size = 0  # the largest size of data.mdb seen (LMDB never shrinks it)
        self._fd = -1
        self.dropped_at_open = 0  # damaged records dropped as it opened (_count)
        self.map_grows = 0  # times the map was found full and doubled
        # Below it LMDB cannot create its databases in a fresh file
        # (MDB_MAP_FULL at the first open, which read as a damaged file).
        initial_map_size = max(initial_map_size, MIN_MAP_SIZE)
        try:
            self._open_checked(initial_map_size, sync)
            self._check_lineage()
        except StorageError as exc:
            if not recover or not (self.path / _DATA_FILE).exists():
                raise
            self._close_env()
            self._recorded_txn = -1  # (what was recorded is of the one moved aside)
            moved = self._move_aside()
            what = str(exc).split("; set l2.recover", 1)[0]  # (the hint is what was done)
            log.warning("%s: moved it aside to %s and started empty (l2.recover)", what, moved)
            self._open_checked(initial_map_size, sync)
        self._clear_if_marked()
        self._record_synced(sync_first=True)
        self._rw = _ReadWriteLock()
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="kvstore-l2-read")
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        # Orders "closed?" against queueing: nothing is queued behind the stop.
        self._gate = threading.Lock()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="kvstore-l2-writer",
                                        daemon=True)
        self._writer.start()
        # Durable markers (a Delete's, l2.sync off) committed and waiting for
        # the syncer's next sync to disk. Synced there, not in the writer:
        # that sync writes back every commit the kernel still holds (1.1 s
        # after 768 MiB of Puts), and the writer, blocked in it, held up
        # every Put at local and the write-back behind it meanwhile.
        self._to_sync: list[tuple[_Op, bool]] = []
        self._sync_wanted = threading.Condition()
        self._syncer_stop = False
        self._syncer = threading.Thread(target=self._sync_loop, name="kvstore-l2-syncer",
                                        daemon=True)
        self._syncer.start()

    def _clear_if_marked(self) -> None:
        """A server ran on this data dir without L2 (it left
        :data:`RUN_WITHOUT_L2` here): the Deletes and overwrites it answered
        could not reach these blocks, which would come back old. They go;
        the delete records of L3 objects (``l3gone``) and the state stay, so
        nothing the earlier runs deleted in L3 comes back either."""
        marker = self.path / RUN_WITHOUT_L2
        if not marker.exists():
            return
        since = marker.read_text(errors="replace").strip()

        def clear() -> None:
            with self._write_lock, self._env.begin(write=True) as txn:
                txn.drop(self._data, delete=False)
                txn.drop(self._meta, delete=False)
        # (the pages freed make a free list that needs pages of its own: a
        # fix review's L2 past its initial map failed every start here)
        self._growing_at_open(clear)
        self._blocks = self._bytes = 0
        self._env.sync(True)  # (on disk before the marker goes: a power cut between)
        marker.unlink()
        log.warning("L2 in %s: its blocks cleared (its L3 delete records kept): a server ran "
                    "on this data dir without L2 (from %s), and the Deletes and overwrites "
                    "it answered could not reach them; served now, they would have come back "
                    "old", self.path, since or "?")

    def _open_checked(self, map_size: int, sync: bool) -> None:
        """Open the environment, make sure no recorded page lies past the end
        of the data file, and count what it holds (a scan of ``meta``, which
        also proves that B-tree readable). A damaged environment is one
        StorageError naming the file and the recovery."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)  # every tenant's blocks
            self._env = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=8, subdir=True,
                sync=sync, metasync=sync, readahead=False, max_readers=512, lock=True,
                mode=0o600,  # data.mdb holds every namespace's blocks: ours alone
            )
        except lmdb.Error as exc:
            raise self._damaged(exc) from None
        except OSError as exc:
            raise self._open_failed(exc) from exc
        try:
            self._fd = os.open(self.path / _DATA_FILE, os.O_RDWR | os.O_CLOEXEC)
            self._psize = int(self._env.stat()["psize"])
            self._ensure_pages_exist()
            # (before this open's own commits: those of the format and the probe)
            self._opened_txn = int(self._env.info()["last_txnid"])
            self._data = self._env.open_db(b"data")
            self._meta = self._env.open_db(b"meta")
            self._tombs = self._env.open_db(b"l3gone")
            self._check_format()
            self._blocks, self._bytes = self._count()
        except lmdb.Error as exc:
            self._close_files()
            raise self._damaged(exc) from None
        except OSError as exc:
            self._close_files()
            raise self._open_failed(exc) from exc
        except InvalidConfig:
            self._close_files()
            raise

    def _check_format(self) -> None:
        """Refuse an environment written in a layout this release cannot
        read safely (InvalidConfig: not damage, never moved aside by
        ``l2.recover``); record this release's layout in it otherwise."""
        marker = self._state_db = self._env.open_db(b"kvstore")
        with self._env.begin(db=marker, write=True) as txn:
            fields = {k: bytes(v).decode(errors="replace")
                      for k, v in txn.cursor().iternext(keys=True, values=True)}
            self._unlisted_since = _time_field(fields, _UNLISTED_SINCE)
            self._l3_url = fields.get(_L3_URL)
            self._l3_off_since = _time_field(fields, _L3_OFF_SINCE)
            self._commits = _commit_count(fields.get(_COMMITS, "").encode())
            written = int(fields.get(b"format", "2") or 2)
            readable_by = int(fields.get(b"readable_by", "1") or 1)
            if readable_by > FORMAT:
                raise InvalidConfig(
                    f"L2 at {self.path} was written by {fields.get(b'written_by', '?')} in "
                    f"layout {written}, which needs a release that reads layout "
                    f"{readable_by}; this one (kvstore {__version__}) reads up to {FORMAT}: "
                    "run that release or a newer one, or give this one another data_dir")
            if written <= FORMAT:
                txn.put(b"format", str(FORMAT).encode(), db=marker)
                txn.put(b"readable_by", str(READABLE_BY).encode(), db=marker)
                txn.put(b"written_by", f"kvstore {__version__}".encode(), db=marker)
            self._instance = fields.get(b"instance", "")
            self._new_instance = not self._instance
            if self._new_instance:
                self._instance = os.urandom(16).hex()
                txn.put(b"instance", self._instance.encode(), db=marker)

    # -- which L2 this data dir last ran with -----------------------------------------
    #
    # An L2 put back from a backup, or copied from another node, opens as
    # cleanly as the one it replaced, and served what it held as current: the
    # old bytes of keys overwritten since, and blocks deleted or flushed since
    # (their Deletes answered). The state file next to it records the
    # environment's id and the newest transaction known to be on disk (written
    # only after a sync, so a crash or a power cut never leaves it ahead of
    # the environment); an environment with another id, or older than that
    # transaction, is refused at start like a damaged one.

    def _check_lineage(self) -> None:
        if self._state_file is None:
            return
        recorded = self._read_state()
        if recorded is None:
            return  # the first start here (or of a release that records it)
        instance, synced, replaced = recorded
        self._recorded_txn = synced
        txn = self._opened_txn
        if self._new_instance and self._blocks == 0 and not self._has_tombstones():
            log.warning(
                "L2 at %s is new and empty, but this data dir last ran with another L2 (%s, "
                "recorded in %s): it was removed or emptied while the server was stopped; "
                "starting with an empty L2 (the blocks it held are gone, and so are the L3 "
                "deletes it had not done yet: such objects can be served again)",
                self.path, instance, self._state_file)
            self._recorded_txn = -1
            return
        if replaced:
            why = ("it was written over while a server ran on it: its commit count went "
                   "back, an older copy put back")
        elif self._instance != instance:
            why = f"its id is {self._instance or 'missing'}, not {instance}: copied from elsewhere"
        elif txn < synced:
            why = (f"it ends at transaction {txn}, older than {synced}, which was on disk "
                   "before: an older copy put back (a backup or snapshot restored)")
        else:
            return
        raise StorageError(
            f"L2 at {self.path} is not the one this data dir last ran with ({why}); it would "
            f"serve blocks deleted or overwritten since as current; set l2.recover "
            f"(--l2-recover true) to move {self.path} aside to {self.path}.damaged-<time> and "
            f"start with an empty L2")

    def _has_tombstones(self) -> bool:
        with self._env.begin(db=self._tombs) as txn:
            return txn.stat(self._tombs)["entries"] > 0

    def _read_state(self) -> tuple[str, int, bool] | None:
        assert self._state_file is not None
        try:
            fd = os.open(self._state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._open_failed(exc) from exc
        with os.fdopen(fd, "rb") as fh:
            text = fh.read(4096).decode(errors="replace").split()
        try:
            return text[0], int(text[1]), text[2:3] == [_REPLACED]
        except (IndexError, ValueError):
            log.warning("%s is unreadable (%r): L2's lineage not checked", self._state_file,
                        " ".join(text)[:80])
            return None

    def _record_synced(self, txn: int | None = None, sync_first: bool = False) -> None:
        """Record that the environment is on disk up to transaction ``txn``
        (None: the newest; ``sync_first``: sync it here first). Called only
        after a sync, so the file never runs ahead of the disk. A failure is
        logged: it weakens the next start's check, nothing else."""
        if self._state_file is None:
            return
        try:
            if txn is None:
                txn = int(self._env.info()["last_txnid"])
            if sync_first:
                self._env.sync(True)
            with self._state_lock:
                if txn <= self._recorded_txn:
                    return
                self._write_state(f"{self._instance} {txn}")
                self._recorded_txn = txn
        except (OSError, lmdb.Error) as exc:
            log.warning("cannot record L2's state in %s: %s", self._state_file, exc)

    def _mark_replaced(self, found: int) -> None:
        """The environment's commit count is not the one this process last
        wrote: the file was written over while it was open here (an older
        copy put back). Its transaction ids go on from the lock file's, so
        the next start's lineage check would not see it: recorded for good
        in the state file, which every start of any release then refuses."""
        log.error("L2 at %s was written over while this server ran on it (its commit count "
                  "is %d, not %d: an older copy put back?): blocks deleted or overwritten "
                  "since may be in it; the next start refuses it (l2.recover moves it aside)",
                  self.path, found, self._commits)
        if self._state_file is None:
            return
        try:
            with self._state_lock:
                self._write_state(f"{self._instance} {_NEVER_AGAIN} {_REPLACED}")
                self._recorded_txn = _NEVER_AGAIN
        except OSError as exc:
            log.warning("cannot record L2's state in %s: %s", self._state_file, exc)

    def _write_state(self, line: str) -> None:
        assert self._state_file is not None
        tmp = self._state_file.with_name(self._state_file.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(line + "\n")
        os.replace(tmp, self._state_file)

    def _close_env(self) -> None:
        if getattr(self, "_env", None) is not None:  # (none when lmdb.open failed)
            self._close_files()  # (closing it twice is harmless)

    def _open_failed(self, exc: OSError) -> StorageError | InvalidConfig:
        if _is_resource_error(exc):
            return self._limited(exc)
        return self._storage_error("open", exc)

    def _limited(self, exc: BaseException) -> InvalidConfig:
        """Not damage: a limit of this process or of the disk. (Called damage,
        l2.recover moved a sound L2 aside and its blocks were gone at the next
        start; InvalidConfig is never moved aside.)"""
        return InvalidConfig(
            f"L2 at {self.path} cannot be opened: {exc} -- a limit of this process or its "
            "disk, not damage (raise the open-file or memory limit, or free the disk, and "
            "start again)")

    def _damaged(self, exc: BaseException) -> StorageError | InvalidConfig:
        if _is_resource_error(exc):
            return self._limited(exc)
        return StorageError(
            f"L2 data file {self.path / _DATA_FILE} is damaged ({type(exc).__name__}: {exc}); "
            f"set l2.recover (--l2-recover true) to move {self.path} aside to "
            f"{self.path}.damaged-<time> and start with an empty L2")

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        try:
            self.path.rename(target)
        except OSError as exc:
            raise self._storage_error("recovery (moving the damaged environment aside)",
                                      exc) from exc
        return target

    def _close_files(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._env.close()

    def _ensure_pages_exist(self) -> None:
        """Make sure every page LMDB may touch lies inside ``data.mdb``, so
        the map can never fault past the end of the file (SIGBUS).

        LMDB records its last page number in the meta page; every page it
        reads or copies is at most that one. A shorter file is extended with
        zeros: after a crash the top pages may be free and never written
        (harmless); after damage (the file cut short) the lost pages read
        as zeros, which the checksums and LMDB's page checks catch. A file
        that shrank below a size seen before is damage, and is logged."""
        info = self._env.info()
        need = (int(info["last_pgno"]) + 1) * self._psize
        size = os.fstat(self._fd).st_size
        if size >= need:
            if size > self._seen_size:
                self._seen_size = size
            return
        if need > int(info["map_size"]):  # a damaged meta page: never extend to it
            raise lmdb.CorruptedError(f"the meta page records {need} bytes, more than the "
                                      f"map's {info['map_size']}")
        with self._write_lock:
            size = os.fstat(self._fd).st_size
            if size >= need:
                return
            if size < self._seen_size:
                log.error("L2 data file %s shrank to %d bytes under the server (it was %d, "
                          "LMDB needs %d): extended with zeros; blocks in the lost pages "
                          "read as misses", self.path / _DATA_FILE, size, self._seen_size,
                          need)
            else:  # at open after damage or a crash; later, after a commit (harmless)
                log.log(logging.WARNING if self._seen_size == 0 else logging.DEBUG,
                        "L2 data file %s is %d bytes, shorter than the %d LMDB recorded: "
                        "extended with zeros (blocks in missing pages, if any, read as "
                        "misses)", self.path / _DATA_FILE, size, need)
            os.ftruncate(self._fd, need)
            self.extensions += 1
            self._seen_size = need

    def disk_nearly_full(self) -> bool:
        """Whether L2's disk has less room than one commit batch (after a
        failed write: LMDB reports a full disk as an I/O error, not ENOSPC)."""
        try:
            return shutil.disk_usage(self.path).free < max(self.batch_bytes, 16 << 20)
        except OSError:
            return False

    def _write_error(self, exc: BaseException) -> StorageError:
        """A failed commit, with the disk's free space: LMDB reports a full
        disk as an I/O error."""
        try:
            free = f"; {shutil.disk_usage(self.path).free} bytes free on its disk"
        except OSError:
            free = ""
        return StorageError(f"L2 write failed at {self.path}: {type(exc).__name__}: {exc}{free}")

    def _storage_error(self, what: str, exc: BaseException) -> StorageError:
        return StorageError(f"L2 {what} failed at {self.path}: {type(exc).__name__}: {exc}")

    def _count(self) -> tuple[int, int]:
        """Blocks and bytes (from ``meta``). Walking the keys of ``data`` too
        reads every B-tree page of both (not the payloads), so a damaged
        tree shows up here, at start, rather than as failing writes later.

        A damaged record (metadata that does not parse, or whose size is not
        the stored payload's; a payload without metadata or the reverse; a
        key that does not decode) is dropped here: one such record is one
        block lost, never the others. (A review: one size field with a bit
        flipped made L2 "1 TB over capacity", and the trim that followed
        dropped every intact block; a short metadata value failed every start.)"""
        blocks = total = 0
        damaged: list[bytes] = []
        with self._env.begin(buffers=True) as txn:
            data = txn.cursor(db=self._data)
            # (the two databases in key order side by side: None past the end)
            at = bytes(data.key()) if data.first() else None
            for raw_key, raw in txn.cursor(db=self._meta):
                key = bytes(raw_key)
                while at is not None and at < key:
                    damaged.append(at)  # a payload without metadata
                    at = bytes(data.key()) if data.next() else None
                stored = -1
                if at == key:
                    stored = len(data.value())  # (LMDB's record of it: no payload read)
                    at = bytes(data.key()) if data.next() else None
                meta = _meta_of(raw)
                if meta is None or meta.size != stored or not _decodable(key):
                    damaged.append(key)
                    continue
                blocks += 1
                total += meta.size
            while at is not None:
                damaged.append(at)
                at = bytes(data.key()) if data.next() else None
        damaged = [k for k in damaged if k != _PROBE_KEY]
        if damaged:
            self._drop_damaged(damaged)
        # A write reads the free-page list and copies a path of each tree:
        # one probe commit meets damage there now, not at the first Put. (A
        # full map is no damage: the writer grows it when it meets it.)
        with contextlib.suppress(lmdb.MapFullError), self._env.begin(write=True) as txn:
            for db in (self._data, self._meta):
                txn.put(_PROBE_KEY, b"", db=db)
                txn.delete(_PROBE_KEY, db=db)
        return blocks, total

    def _growing_at_open(self, write: Callable[[], None]) -> None:
        """Run ``write`` (one write transaction of the open), growing the map
        while it is full. An L2 grown past l2.initial_map_size opens with its
        map full, and deletes need pages too (a fix review: 4 damaged records
        failed the start, and l2.recover moved all of L2 aside). Only at the
        open: no other transaction is open, so the map may grow."""
        while True:
            try:
                write()
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(int(self._env.info()["map_size"]) * 2)
                self.map_grows += 1

    def _drop_damaged(self, keys: list[bytes]) -> None:
        def drop() -> None:
            with self._env.begin(write=True) as txn:
                for key in keys:
                    txn.delete(key, db=self._data)
                    txn.delete(key, db=self._meta)
        self._growing_at_open(drop)
        self.dropped_at_open = len(keys)
        log.warning("L2 at %s held %d damaged records (metadata that does not parse or does "
                    "not match its payload, or one without the other): dropped, each a miss "
                    "(first: %s)", self.path, len(keys), ", ".join(repr(k) for k in keys[:3]))

    # -- the writer thread ------------------------------------------------------------

    def submit(self, block: BlockId, data: Buffer | None, meta: BlockMeta | None,
               done: WriteDone) -> None:
        """Queue a write (data) or a delete (data None); see KeyValueTier.submit."""
        self._enqueue(_Op(encode_key(block), data, meta.pack() if meta else b"",
                          meta.size if meta else 0, done))

    def submit_tombstone(self, block: BlockId, present: bool, done: WriteDone,
                         checksum: int | None = None) -> None:
        """Queue a record (``present``) or the removal of the record that
        the block's L3 object is to be deleted; ordered with the block writes.
        The record's value is the object's checksum (8 bytes, little-endian;
        empty: none, as releases before it wrote). ``done(error, existed)``:
        ``existed`` tells whether a record was there."""
        value = (b"" if checksum is None else _TOMB_CHECKSUM.pack(checksum)) if present \
            else None
        self._enqueue(_Op(encode_key(block), value, b"", 0, done, _TOMBSTONE))

    @property
    def unlisted_since(self) -> float | None:
        """See :attr:`KeyValueTier.unlisted_since` (as read at open)."""
        return self._unlisted_since

    def set_unlisted_since(self, value: float | None, done: WriteDone) -> None:
        """See :meth:`KeyValueTier.set_unlisted_since`."""
        self._set_state(_UNLISTED_SINCE, None if value is None else repr(value), done)

    @property
    def l3_url(self) -> str | None:
        """See :attr:`KeyValueTier.l3_url` (as read at open)."""
        return self._l3_url

    def set_l3_url(self, url: str, done: WriteDone) -> None:
        """See :meth:`KeyValueTier.set_l3_url`."""
        self._l3_url = url
        self._set_state(_L3_URL, url, done)

    @property
    def l3_off_since(self) -> float | None:
        """See :attr:`KeyValueTier.l3_off_since`."""
        return self._l3_off_since

    def set_l3_off_since(self, value: float | None, done: WriteDone) -> None:
        """See :meth:`KeyValueTier.set_l3_off_since`."""
        self._l3_off_since = value
        self._set_state(_L3_OFF_SINCE, None if value is None else repr(value), done)

    def _set_state(self, field: bytes, text: str | None, done: WriteDone) -> None:
        """Write (None: remove) a field of the ``kvstore`` database, ordered
        with the block writes."""
        self._enqueue(_Op(field, None if text is None else text.encode(), b"", 0, done, _STATE))

    def after_queued(self, done: WriteDone, durable: bool = False) -> None:
        """Call ``done`` once every write queued before this call has
        committed (or failed). ``durable``: and once they are on disk, even
        without l2.sync (what a Delete waits for: without it, the commit sat
        in the page cache and a power cut brought the deleted blocks back,
        from L2 or, its L3 delete records lost with it, from L3)."""
        self._enqueue(_Op(b"", None, b"", 0, done, _MARKER, durable))

    def _enqueue(self, op: _Op) -> None:
        with self._gate:
            if not self._closed:
                self._queue.put(op)
                return
        op.done(StorageError(f"L2 at {self.path} is closed"), False)

    def tombstones_sync(self) -> list[tuple[BlockId, int | None]]:
        """The blocks whose L3 object is still to be deleted, with the
        checksum of that object when recorded (blocking)."""
        self._guard_read("scan")
        self._rw.acquire_read()
        try:
            with self._env.begin(db=self._tombs) as txn:
                # (a damaged key names no block: left out; it failed the start)
                return [(decode_key(k), _TOMB_CHECKSUM.unpack(v)[0]
                         if len(v) == _TOMB_CHECKSUM.size else None)
                        for k, v in txn.cursor().iternext(keys=True, values=True)
                        if _decodable(k)]
        except lmdb.Error as exc:
            raise self._storage_error("scan", exc) from exc
        finally:
            self._rw.release_read()

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            if isinstance(first, _Barrier):
                self._pass_barrier(first)
                continue
            batch = [first]
            nbytes = first.size
            after: Any = None  # a barrier or _STOP that ends the batch
            while nbytes < self.batch_bytes:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or isinstance(nxt, _Barrier):
                    after = nxt
                    break
                batch.append(nxt)
                nbytes += nxt.size
            self._commit(batch)
            if after is _STOP:
                return
            if after is not None:
                self._pass_barrier(after)

    def _pass_barrier(self, barrier: _Barrier) -> None:
        try:
            txn = int(self._env.info()["last_txnid"])
            self._env.sync(True)
        except lmdb.Error as exc:
            barrier.error = self._storage_error("sync", exc)
        else:
            self._record_synced(txn)
        barrier.reached.set()

    def _commit(self, batch: list[_Op]) -> None:
        error: BaseException | None = None
        existed: list[bool] = [False] * len(batch)
        try:
            existed = self._apply_growing(batch)
        except lmdb.Error as exc:  # a disk error: every waiter hears of it
            if len(batch) > 1:
                # A batch that fails (a disk that filled up) is committed again
                # in halves, in order: the writes that fit are kept, and each
                # one that does not is reported on its own.
                half = len(batch) // 2
                self._commit(batch[:half])
                self._commit(batch[half:])
                return
            error = self._write_error(exc)
        except Exception as exc:  # a bug: reported as it is
            error = exc
        if self.sync and error is None and any(op.durable for op in batch):
            self._record_synced()  # (l2.sync: committed is on disk; before the Delete's answer)
        for op, was in zip(batch, existed, strict=True):
            if op.durable and error is None and not self.sync:
                with self._sync_wanted:  # answered once the syncer has synced this commit
                    self._to_sync.append((op, was))
                    self._sync_wanted.notify()
                continue
            _call_done(op, error, was)

    def _sync_loop(self) -> None:
        """Sync what is committed to disk for the durable markers waiting,
        all of them with one sync (every one was committed before it
        starts), while the writer goes on committing."""
        while True:
            with self._sync_wanted:
                while not self._to_sync and not self._syncer_stop:
                    self._sync_wanted.wait()
                waiting, self._to_sync = self._to_sync, []
                if not waiting:
                    return  # stopping, nothing left
            error: BaseException | None = None
            txn = -1
            self._rw.acquire_read()  # (not while the map grows)
            try:
                txn = int(self._env.info()["last_txnid"])  # (synced below, at least)
                self._env.sync(True)
            except lmdb.Error as exc:
                error = self._storage_error("sync", exc)
            finally:
                self._rw.release_read()
            if error is None:
                self._record_synced(txn)
            for op, was in waiting:
                _call_done(op, error, was)

    def _apply_growing(self, batch: list[_Op]) -> list[bool]:
        while True:
            try:
                return self._apply(batch)
            except lmdb.MapFullError:
                self._grow()

    def _apply(self, batch: list[_Op]) -> list[bool]:
        try:
            self._ensure_pages_exist()
        except OSError as exc:
            raise lmdb.Error(f"cannot check or extend the data file: {exc}") from exc
        with self._write_lock:
            return self._apply_locked(batch)

    def _apply_locked(self, batch: list[_Op]) -> list[bool]:
        existed: list[bool] = []
        d_blocks = d_bytes = 0
        with self._env.begin(write=True) as txn:
            # (each commit counts itself: see _mark_replaced)
            found = _commit_count(txn.get(_COMMITS, db=self._state_db))
            if found != self._commits and not self._replaced:
                self._replaced = True
                self._mark_replaced(found)
            commits = found + 1
            txn.put(_COMMITS, str(commits).encode(), db=self._state_db)
            for op in batch:
                if op.kind != _BLOCK:
                    if op.kind == _STATE:
                        if op.data is None:
                            txn.delete(op.key, db=self._state_db)
                        else:
                            txn.put(op.key, op.data, db=self._state_db)
                    existed.append(op.kind == _TOMBSTONE and self._apply_tombstone(txn, op))
                    continue
                old = txn.get(op.key, db=self._meta)
                old_meta = _meta_of(old) if old is not None else None
                old_size = old_meta.size if old_meta is not None else 0
                existed.append(old is not None)
                if op.data is None:
                    if old is not None:
                        txn.delete(op.key, db=self._data)
                        txn.delete(op.key, db=self._meta)
                        d_blocks -= 1
                        d_bytes -= old_size
                else:
                    txn.put(op.key, op.data, db=self._data)
                    txn.put(op.key, op.meta, db=self._meta)
                    d_blocks += 0 if old is not None else 1
                    d_bytes += op.size - old_size
        self._commits = commits
        with self._count_lock:
            self._blocks += d_blocks
            self._bytes += d_bytes
        return existed

    def _apply_tombstone(self, txn: Any, op: _Op) -> bool:
        if op.data is None:
            return bool(txn.delete(op.key, db=self._tombs))
        # The first record stays (the object a restart is to delete is the
        # one in L3 when the first delete failed: later ones wait behind it).
        return not txn.put(op.key, op.data, db=self._tombs, overwrite=False)

    def _grow(self) -> None:
        self._rw.acquire_write()
        try:
            new_size = self._env.info()["map_size"] * 2
            self._env.set_mapsize(new_size)
            self.map_grows += 1
        finally:
            self._rw.release_write()

    @property
    def map_size(self) -> int:
        return int(self._env.info()["map_size"])

    # -- reads -------------------------------------------------------------------------

    def read_into_sync(self, block: BlockId,
                       dest: memoryview | None) -> tuple[BlockMeta, Any] | None:
        """Blocking read. With ``dest`` (at least the block's size) the payload
        is copied there and returned as a view of it; without, as bytes."""
        key = encode_key(block)
        self._guard_read("read")
        self._rw.acquire_read()
        try:
            with self._env.begin(buffers=True) as txn:
                raw_meta = txn.get(key, db=self._meta)
                meta = _meta_of(raw_meta) if raw_meta is not None else None
                if meta is None:
                    return None  # (absent, or damaged since the open, which drops those)
                value = txn.get(key, db=self._data)
                if value is None:
                    return None
                n = len(value)
                if dest is not None and len(dest) >= n:
                    dest[:n] = value
                    return meta, dest[:n]
                return meta, bytes(value)
        except lmdb.Error as exc:
            raise self._storage_error("read", exc) from exc
        finally:
            self._rw.release_read()

    def _guard_read(self, what: str) -> None:
        try:
            self._ensure_pages_exist()
        except (OSError, lmdb.Error) as exc:
            raise self._storage_error(what, exc) from exc

    def _scan_batch(self, after: bytes | None) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        self._guard_read("scan")
        self._rw.acquire_read()
        try:
            with self._env.begin(db=self._meta) as txn:
                cur = txn.cursor()
                ok = cur.set_range(after) if after is not None else cur.first()
                if ok and after is not None and cur.key() == after:
                    ok = cur.next()
                while ok and len(out) < _SCAN_BATCH:
                    out.append((cur.key(), cur.value()))
                    ok = cur.next()
        except lmdb.Error as exc:
            raise self._storage_error("scan", exc) from exc
        finally:
            self._rw.release_read()
        return out

    async def scan(self) -> AsyncIterator[tuple[BlockId, BlockMeta]]:
        loop = asyncio.get_running_loop()
        after: bytes | None = None
        while True:
            batch = await loop.run_in_executor(self._executor, self._scan_batch, after)
            for raw_key, raw_meta in batch:
                # (the open dropped damaged records; one damaged since is left out)
                meta = _meta_of(raw_meta)
                if meta is not None and _decodable(raw_key):
                    yield decode_key(raw_key), meta
            if len(batch) < _SCAN_BATCH:
                return
            after = batch[-1][0]

    def usage(self) -> TierUsage:
        with self._count_lock:
            return TierUsage(self._blocks, self._bytes, self.capacity)

    # -- barrier and shutdown ------------------------------------------------------------

    def flush_sync(self) -> None:
        """Wait until every write queued before the call has committed and
        the data is synced to disk (a barrier through the writer's queue)."""
        barrier = _Barrier(threading.Event())
        with self._gate:
            if self._closed:
                return
            self._queue.put(barrier)
        barrier.reached.wait()
        if barrier.error is not None:
            raise barrier.error

    async def flush(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._stop_executor(), self.flush_sync)

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._stop_executor(), self.close_sync)

    def _stop_executor(self) -> concurrent.futures.Executor | None:
        """Where a flush or the close waits: the store's workers, all started
        with the server (a stop must not need a new thread, which a pids limit
        may refuse); a tier with workers of its own uses asyncio's (its close
        shuts its own down, which it cannot do from one of them)."""
        return None if self._own_executor else self._executor

    def close_sync(self) -> None:
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        with self._sync_wanted:  # (it syncs what is waiting first)
            self._syncer_stop = True
            self._sync_wanted.notify()
        self._syncer.join()
        try:
            self._env.sync(True)
        except lmdb.Error as exc:
            raise self._storage_error("sync", exc) from exc
        else:
            self._record_synced()  # (nothing commits any more: the newest is synced)
        finally:
            if self._own_executor:
                self._executor.shutdown(wait=True)
            self._close_files()


if TYPE_CHECKING:  # mypy checks that the class plays its role
    _plays_role: type[KeyValueTier] = LMDBTier
