"""L3: blocks as objects in an object store, through obstore.

One code path for every store obstore offers; two are configured here:

- ``s3://bucket/prefix`` — AWS S3 or any S3-compatible server (MinIO, Ceph,
  rclone serve s3...). With a custom ``endpoint`` requests use path-style
  addressing (``http://host:port/bucket/key``). Plain ``http://`` endpoints
  are accepted only on loopback (127.0.0.0/8, ::1, localhost): anything else
  must be https, or construction raises :class:`~kvstore.errors.InvalidConfig`.
- ``file:///path`` — a directory, typically a shared filesystem (NFS, Lustre,
  CephFS...) mounted on every node. Writes are atomic (temp file + rename).

Object key: ``<prefix>/<namespace>/<hex key>``.

Object layout: a 32-byte header, then the payload exactly as given::

    offset  size  field
    0       4     magic b"KVL3"
    4       1     layout version (1)
    5       3     zero
    8       8     payload size (u64 LE)  — equals object size - 32
    16      8     checksum (u64 LE)      — BlockMeta.checksum as given to put
    24      8     created (f64 LE)       — BlockMeta.created as given to put

Why a header and not S3 user metadata: user metadata is not returned by a
listing either (it needs one request per object all the same), the local
filesystem store cannot keep it, and ``rclone serve s3`` keeps it only in
memory. The header works on every store. ``list_blocks()`` rebuilds an index
from the listing alone (sizes come from it); the checksum and creation time
come from the header on each read.

Failure behaviour (the store translates; nothing here retries forever):

- every call runs under one deadline of ``timeout_s`` (waiting for a
  concurrency slot, every attempt and every backoff included);
- reads (GET, HEAD, the health probe) and writes (PUT, DELETE, the listing)
  have separate request slots (``read_concurrency``, ``concurrency``): a
  write backlog (the demotions waiting out an outage) never delays a read;
- failed requests are retried up to ``retries`` times with full-jitter
  exponential backoff (50 ms doubling, at most 1 s), within the deadline;
  errors that retrying cannot fix (403, missing bucket) are not retried;
- a delete given up on after its request went out (a timeout, a connection
  lost before the answer, a gateway's 502 or 504, its caller cancelled) is
  not sent again at once: the store may still
  carry it out, and a late delete deletes whatever is under the name then
  (the new object of an overwrite). The next write of that object (an
  upload, or the delete again) first waits until the object is seen gone,
  at most ``timeout_s`` x (``retries`` + 1);
- each call that fails (after its retries) counts towards the circuit
  breaker; after ``breaker_failures`` consecutive failed calls, calls fail at
  once, without a request, for ``breaker_reset_s``; then one call goes out as
  a single-request probe and decides (success closes, failure re-opens);
- every call raises :class:`~kvstore.errors.TierUnavailable` when the store
  cannot be reached, times out, refuses (credentials, missing bucket), the
  breaker is open or the tier is closed. A genuine miss is ``None`` /
  ``False``, never an exception, so the store can tell "not there" from
  "cannot tell";
- ``get_with_meta`` raises :class:`~kvstore.errors.CorruptBlock` when an
  object's header is not a valid kvstore header or disagrees with its size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import struct
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from kvstore.checksum import checksum
from kvstore.errors import CorruptBlock, InvalidConfig, TierUnavailable
from kvstore.l3url import check_credentials, check_location, obstore_missing
from kvstore.tiers.base import BlockMeta, Buffer
from kvstore.tiers.breaker import BreakerState, CircuitBreaker
from kvstore.types import BlockId

try:  # obstore is the optional `l3` extra: without it the server runs with L3 off
    import obstore
    from obstore.exceptions import (
        GenericError,
        JoinError,
        NotFoundError,
        PermissionDeniedError,
        UnauthenticatedError,
    )
    from obstore.store import LocalStore, S3Store
except ModuleNotFoundError as _missing:
    if _missing.name != "obstore":
        raise

    class _ObstoreAbsent(Exception):
        """Stands in for obstore's exception classes; never raised."""

    obstore = None  # type: ignore[assignment]
    GenericError = JoinError = NotFoundError = _ObstoreAbsent  # type: ignore[assignment,misc]
    PermissionDeniedError = UnauthenticatedError = _ObstoreAbsent  # type: ignore[assignment,misc]
    LocalStore = S3Store = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from kvstore.config import L3Config
    from kvstore.tiers.base import ObjectStore

HEADER = struct.Struct("<4sB3sQQd")
HEADER_SIZE = HEADER.size  # 32
#: The header's 3 bytes after the version: a tag of the block's key (zero in
#: objects written before it, which older releases, reading them as padding,
#: still read). An object another key's bytes ended up under (a store, proxy
#: or cache that mixed them up) passes its own checksum; the tag catches it.
_NO_TAG = b"\0\0\0"
MAGIC = b"KVL3"
LAYOUT_VERSION = 1

_LIST_PAGE = 1000
#: Deletes in doubt (see ObjectTier._settle) remembered at most.
_IN_DOUBT_MAX = 100_000
log = logging.getLogger("kvstore.l3")
_PROBE_PREFIX = "_kvstore-probe"  # never a namespace (those start with [A-Za-z0-9])


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()
_NOT_FOUND = (FileNotFoundError, NotFoundError)


def object_path(block: BlockId) -> str:
    """The object key of a block, relative to the tier's prefix."""
    return f"{block[0]}/{block[1].hex()}"


def parse_object_path(path: str) -> BlockId | None:
    """The block an object key names, or None for a foreign object."""
    namespace, sep, hexkey = path.rpartition("/")
    if not sep or not namespace or "/" in namespace or not hexkey:
        return None
    try:
        key = bytes.fromhex(hexkey)
    except ValueError:
        return None
    if not key or len(hexkey) != 2 * len(key):
        return None
    return namespace, key


def key_tag(block: BlockId) -> bytes:
    """Three bytes of the CRC-32C of the block's object key, never all zero."""
    tag = checksum(object_path(block).encode()) & 0xFFFFFF
    return (tag or 1).to_bytes(3, "little")


def pack_header(block: BlockId, size: int, meta: BlockMeta) -> bytes:
    return HEADER.pack(MAGIC, LAYOUT_VERSION, key_tag(block), size, meta.checksum, meta.created)


def unpack_header(raw: Buffer, block: BlockId | None = None) -> BlockMeta | None:
    """The BlockMeta in a header, or None when it is not a kvstore header.
    With ``block``: CorruptBlock when the header is another key's."""
    mv = memoryview(raw).cast("B")
    if len(mv) < HEADER_SIZE:
        return None
    magic, version, tag, size, crc, created = HEADER.unpack_from(mv, 0)
    if magic != MAGIC or version != LAYOUT_VERSION:
        return None
    if block is not None and tag != _NO_TAG and tag != key_tag(block):
        raise CorruptBlock(f"L3 object {object_path(block)!r} holds another block's bytes "
                           f"(its header's key tag is {tag.hex()}, not {key_tag(block).hex()}): "
                           "not served")
    return BlockMeta(size, crc, created)


@dataclass(frozen=True)
class _TooLarge:
    """What a GET found: an object larger than any block this node accepts."""

    size: int


#: An error status (obstore's text) and its code.
_STATUS_RE = re.compile(r"non-2xx status code: (\d{3})")
#: Statuses a gateway in front of the store (a load balancer, a reverse
#: proxy) answers when it gave up on the store or lost its connection to it:
#: the request may have reached the store, which can still carry it out.
_GATEWAY_STATUSES = frozenset({502, 504})


def _settled_request(exc: BaseException) -> bool:
    """Whether a failed request can no longer be carried out by the store:
    its error is the store's answer (an HTTP status, given once it has dealt
    with the request), or no connection was made. Not a timeout, nor a
    connection that failed after the request may have gone out, nor a
    gateway's 502 or 504 (it gave up on the store, which may still have the
    request)."""
    if not isinstance(exc, GenericError):
        return False
    text = str(exc)
    status = _STATUS_RE.search(text)
    if status is not None:
        return int(status.group(1)) not in _GATEWAY_STATUSES
    return "ConnectError" in text or "kind: ConnectionRefused" in text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


@dataclass(slots=True)
class ListProgress:
    """How far a listing got: the prefixes (namespaces) listed to the end,
    and the path of the last object listed in the next one."""

    prefixes_done: int = 0
    after: str | None = None


class ObjectTier:
    """L3 tier over an obstore store, in the :class:`~kvstore.tiers.base.ObjectStore`
    role. See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        endpoint: str = "",
        region: str = "us-east-1",
        access_key_id: str = "",
        secret_access_key: str = "",
        concurrency: int = 16,
        read_concurrency: int | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        breaker_failures: int = 5,
        breaker_reset_s: float = 5.0,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_payload: int | None = None,
    ) -> None:
        """``max_payload``: the largest block this node accepts
        (``server.max_block_bytes``); an object holding more is neither
        listed, probed nor read (None: no limit)."""
        if concurrency < 1:
            raise InvalidConfig("l3.concurrency must be at least 1")
        if read_concurrency is None:  # (as many as writes)
            read_concurrency = concurrency
        if read_concurrency < 1:
            raise InvalidConfig("l3.read_concurrency must be at least 1")
        if timeout_s <= 0:
            raise InvalidConfig("l3.timeout_s must be positive")
        if retries < 0:
            raise InvalidConfig("l3.retries must not be negative")
        if breaker_failures < 1:
            raise InvalidConfig("l3.breaker_failures must be at least 1")
        if breaker_reset_s < 0:
            raise InvalidConfig("l3.breaker_reset_s must not be negative")
        self.timeout_s = float(timeout_s)
        self.retries = retries
        # An object under a block's name may hold anything (another program's
        # file, a node's with a larger limit): one of a gigabyte was read
        # whole into memory before its header was looked at.
        self.max_payload = max_payload if max_payload is not None else 2**63
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._store, self.location = _open_store(
            url,
            endpoint=endpoint,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            timeout_s=self.timeout_s,
        )
        # S3 lists by name, so a listing can go on after the last name listed;
        # a directory lists in its own order (not by name), where "after that
        # name" skips every object not listed yet whose name sorts before it.
        self._listing_by_name = not self.location.startswith("file://")
        # Two lanes: reads (GET, HEAD, the health probe) never queue behind
        # writes (a demotion backlog after an outage), nor writes behind reads.
        # Prefetches (hints) read in the read lane, at most a quarter of its
        # slots: one tenant's flood of them held every slot, other tenants'
        # Gets of L3 blocks waited up to 1.4 s, and missed past l3.timeout_s.
        self._concurrency = {"read": read_concurrency, "write": concurrency,
                             "prefetch": max(1, read_concurrency // 4)}
        self._lanes = {lane: asyncio.Semaphore(n) for lane, n in self._concurrency.items()}
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset_s, clock)
        self._closed = False
        # Deletes given up on after their request went out (timed out, or
        # the connection failed before the answer), by object path, with
        # when: the store may still carry one out later, and it deletes
        # whatever is under the name then. The next write of the path waits
        # until it has landed (see :meth:`_settle`), at most this long.
        # (oldest first: a delete doubted again moves to the end)
        self._in_doubt: OrderedDict[str, float] = OrderedDict()
        self.in_doubt_s = self.timeout_s * (retries + 1)
        self._last_error = ""
        # counters (for stats and tests)
        self.requests = 0  # requests sent to the store
        self.failed_requests = 0
        self.retried = 0
        self.scan_skipped = 0  # foreign or damaged objects seen by list_blocks
        self.deletes_in_doubt = 0  # deletes given up on after their request went out

    @classmethod
    def from_config(cls, config: L3Config, max_payload: int | None = None) -> ObjectTier:
        return cls(
            config.url,
            endpoint=config.endpoint,
            region=config.region,
            access_key_id=config.access_key_id,
            secret_access_key=config.secret_access_key,
            concurrency=config.concurrency,
            read_concurrency=config.read_concurrency,
            timeout_s=config.timeout_s,
            retries=config.retries,
            breaker_failures=config.breaker_failures,
            breaker_reset_s=config.breaker_reset_s,
            max_payload=max_payload,
        )

    def __repr__(self) -> str:
        return f"ObjectTier({self.location!r}, breaker={self.breaker.state.value})"

    # -- health -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while the breaker is closed (the last request succeeded or
        fewer than ``breaker_failures`` failed in a row). An idle tier with an
        open breaker stays unhealthy until a call (or :meth:`check`) probes."""
        return not self._closed and self.breaker.state is BreakerState.CLOSED

    @property
    def last_error(self) -> str:
        return self._last_error

    async def check(self) -> bool:
        """Probe the store with one cheap request through the breaker; the
        health loop calls this when the tier is idle. A GET of a key never
        written, as a Get's: a 404 NoSuchKey counts as an answer, and so does
        the 403 AccessDenied S3 gives for a missing key without
        s3:ListBucket; not NoSuchBucket, nor a 403 for the credentials
        (SignatureDoesNotMatch, InvalidAccessKeyId: every request fails).
        Not a listing: a store that refuses only listings (a policy without
        s3:ListBucket, LIST throttled) serves Gets and Puts, and was
        reported down."""

        async def probe() -> Any:
            try:
                return await obstore.get_async(self._store, _PROBE_PREFIX)
            except _NOT_FOUND as exc:
                if "NoSuchBucket" in str(exc):
                    raise
                return None  # the store answered
            except PermissionDeniedError as exc:
                if "<Code>AccessDenied</Code>" not in str(exc):
                    raise
                return None

        try:
            await self._call("probe", _PROBE_PREFIX, probe, retries=0, lane="read")
        except TierUnavailable:
            return False
        return True

    # -- blocks -----------------------------------------------------------

    async def put(self, block: BlockId, data: Buffer, meta: BlockMeta) -> None:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        size = mv.nbytes
        body = bytearray(HEADER_SIZE + size)
        HEADER.pack_into(body, 0, MAGIC, LAYOUT_VERSION, key_tag(block), size, meta.checksum,
                         meta.created)
        body[HEADER_SIZE:] = mv
        path = object_path(block)
        await self._settle(path)
        await self._call("put", path, lambda: obstore.put_async(self._store, path, body))

    async def get_with_meta(self, block: BlockId, prefetch: bool = False
                            ) -> tuple[BlockMeta, memoryview] | None:
        """The payload with the metadata its header records, or None.
        ``prefetch``: a hint's read (fewer slots: it waits behind Gets)."""
        path = object_path(block)

        async def fetch() -> Any:
            result = await obstore.get_async(self._store, path)
            size = int(result.meta["size"])
            if size - HEADER_SIZE > self.max_payload:
                return _TooLarge(size)  # (its body is not read)
            return await result.bytes_async()

        raw = await self._call("get", path, fetch, missing_ok=True,
                               lane="prefetch" if prefetch else "read")
        if raw is MISSING:
            return None
        if isinstance(raw, _TooLarge):
            raise CorruptBlock(
                f"L3 object {path!r} on {self.location} holds {raw.size} bytes, more than a "
                f"block this node accepts ({self.max_payload} bytes, server.max_block_bytes) "
                "and its header: not read")
        mv = memoryview(raw)
        meta = unpack_header(mv, block)
        if meta is None or meta.size != len(mv) - HEADER_SIZE:
            raise CorruptBlock(
                f"L3 object {path!r} on {self.location} is not a kvstore block "
                f"({len(mv)} bytes, header {bytes(mv[:HEADER_SIZE]).hex()})"
            )
        return meta, mv[HEADER_SIZE:]

    async def get(self, block: BlockId) -> memoryview | None:
        """The payload alone (bench/bench_l3.py; the store uses get_with_meta)."""
        found = await self.get_with_meta(block)
        return None if found is None else found[1]

    async def head_size(self, block: BlockId) -> int | None:
        """The payload size of a stored block (one HEAD request), or None."""
        path = object_path(block)
        found = await self._call(
            "head", path, lambda: obstore.head_async(self._store, path), missing_ok=True,
            lane="read",
        )
        if found is MISSING:
            return None
        size = int(found["size"]) - HEADER_SIZE
        return size if 0 <= size <= self.max_payload else None

    async def _list_pages(self, prefix: str | None = None,
                          after: str | None = None) -> AsyncIterator[list[Any]]:
        """The listing under the tier's prefix (and ``prefix`` within it), from
        the first path past ``after`` when given, a page at a time, each page
        fetched through the deadline and breaker (not retried: callers list
        again, from where they got to)."""
        stream = obstore.list(self._store, prefix, offset=after, chunk_size=_LIST_PAGE)

        async def next_page() -> Any:
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        while True:
            # No verdict on the store from a failed listing (its callers list
            # again later): Gets and Puts may well work (a policy without
            # s3:ListBucket), and an open breaker would refuse them.
            page = await self._call("list", "/", next_page, retries=0, judge=False)
            if page is None:
                return
            yield page

    async def list_blocks(
            self, namespaces: Iterable[str] = (),
            progress: ListProgress | None = None) -> AsyncIterator[tuple[BlockId, int]]:
        """Every block under the prefix with its payload size, from the
        listing alone (no request per object): the fast way to rebuild an
        index, whose checksums then come from each object's header on read.
        ``namespaces``: only theirs (one listing under each); empty: all.
        ``progress``: where an earlier listing that failed got to (it is kept
        up to date): this one goes on from there rather than from the start
        (a listing of a large bucket started again at every failed page, and
        under load might never end). A file:// directory is not listed by
        name: there the failed namespace (or whole listing) starts over."""
        wanted: list[str | None] = [*sorted(set(namespaces))] or [None]
        progress = progress if progress is not None else ListProgress()
        for i, prefix in enumerate(wanted):
            if i < progress.prefixes_done:
                continue
            after = progress.after if self._listing_by_name else None
            async for page in self._list_pages(prefix, after):
                for obj in page:
                    path = str(obj["path"])
                    progress.after = path
                    block = parse_object_path(path)
                    size = int(obj["size"]) - HEADER_SIZE
                    if block is None or not 0 <= size <= self.max_payload or (
                            prefix is not None and block[0] != prefix):
                        self.scan_skipped += 1
                        continue
                    yield block, size
            progress.prefixes_done, progress.after = i + 1, None

    async def delete(self, block: BlockId, *,
                     still: Callable[[], bool] | None = None) -> bool | None:
        """Delete the block's object, whatever version it is; whether one was
        there. ``still``: asked once the store was reached (after waiting out
        an earlier delete in doubt, and the HEAD); False: nothing is deleted
        and None is returned (the caller decides again: what it asked for
        may no longer hold by then)."""
        path = object_path(block)
        await self._settle(path)
        found = await self._call(
            "head", path, lambda: obstore.head_async(self._store, path), missing_ok=True
        )
        if found is MISSING:
            return False
        if still is not None and not still():
            return None
        await self._call(
            "delete", path, lambda: obstore.delete_async(self._store, path), missing_ok=True
        )
        return True

    async def _header(self, path: str) -> Any:
        """The object's header bytes, or MISSING."""

        async def header() -> Any:
            # The object's first bytes only (not a ranged GET: some S3
            # servers, rclone's among them, answer one with the whole object).
            result = await obstore.get_async(self._store, path)
            got = bytearray()
            async for chunk in result.stream(min_chunk_size=HEADER_SIZE):
                got += chunk
                if len(got) >= HEADER_SIZE:
                    break
            return bytes(got)

        await self._settle(path)
        return await self._call("head", path, header, missing_ok=True)

    async def head_meta(self, block: BlockId) -> BlockMeta | None:
        """The size, checksum and creation time its header gives the block's
        object (its first bytes only), or None when there is none or it is
        not this block's."""
        raw = await self._header(object_path(block))
        if raw is MISSING:
            return None
        try:
            return unpack_header(memoryview(raw), block)
        except CorruptBlock:
            return None

    async def delete_if(self, block: BlockId, checksum: int) -> bool:
        """Delete the block's object if it is the one with ``checksum`` (its
        header says): a delete recorded before a restart
        removes the object it was for, not one written under the key since
        (by another node, or a release that did not know the record).
        Whether it deleted."""
        path = object_path(block)
        raw = await self._header(path)
        if raw is MISSING:
            return False
        try:
            meta = unpack_header(memoryview(raw), block)
        except CorruptBlock:
            return False  # another block's bytes: not the object this delete is for
        if meta is not None and meta.checksum != checksum:
            log.info("L3 object %r was written again since its delete was recorded "
                     "(checksum %#x, not %#x): kept", path, meta.checksum, checksum)
            return False
        await self._call(
            "delete", path, lambda: obstore.delete_async(self._store, path), missing_ok=True
        )
        return True

    async def _settle(self, path: str) -> None:
        """Before a write of ``path`` (an upload or another delete): wait
        for a delete of it given up on after its request went out to land,
        seen as the object gone (it was there when that delete was sent: a
        delete is sent only after a HEAD found the object), or for
        :attr:`in_doubt_s` to pass (the request, then, never reached the
        store). Sent again, or followed by an upload, at once, such a delete
        could land after them: the store deleted the new object of an
        overwrite acknowledged at remote. Raises TierUnavailable when the
        store cannot be asked (the write fails; the doubt stays)."""
        since = self._in_doubt.get(path)
        if since is None:
            return
        loop = asyncio.get_running_loop()
        delay = self._backoff_base_s
        while loop.time() - since < self.in_doubt_s:
            found = await self._call(
                "head", path, lambda: obstore.head_async(self._store, path), missing_ok=True,
                lane="read")
            if found is MISSING:
                break  # it landed (or never had to): nothing of it is left to come
            await asyncio.sleep(min(delay, max(0.0, since + self.in_doubt_s - loop.time())))
            delay = min(delay * 2, self._backoff_max_s)
        if self._in_doubt.get(path) == since:
            del self._in_doubt[path]

    def _doubt(self, path: str, when: float) -> None:
        """A delete of ``path`` given up on after its request went out."""
        self.deletes_in_doubt += 1
        doubts = self._in_doubt
        # Those past in_doubt_s wait for nothing: dropped as new ones come
        # (kept until the next write of their object, they stayed for good,
        # up to the bound, and a full table was swept whole at each new one).
        while doubts:
            oldest, since = next(iter(doubts.items()))
            if when - since < self.in_doubt_s:
                break
            del doubts[oldest]
        if len(doubts) >= _IN_DOUBT_MAX:
            doubts.popitem(last=False)  # (a bound on memory: the oldest goes)
        doubts[path] = when
        doubts.move_to_end(path)

    async def close(self) -> None:
        self._closed = True

    # -- internals ----------------------------------------------------------------

    async def _call(
        self,
        op: str,
        path: str,
        fn: Callable[[], Awaitable[Any]],
        *,
        missing_ok: bool = False,
        retries: int | None = None,
        lane: str = "write",
        judge: bool = True,
    ) -> Any:
        """Run one call (one or more requests) with the deadline, retries,
        concurrency limit of its ``lane`` ("read" or "write") and breaker.
        Returns MISSING for a not-found when missing_ok. The breaker judges
        calls, not requests: a burst of transient errors that retries absorb
        does not open it; a call with ``judge`` False gives no verdict when
        it fails (it closes the breaker when it succeeds)."""
        if self._closed:
            raise TierUnavailable(f"L3 {self.location} is closed")
        if not self.breaker.allow():
            raise TierUnavailable(
                f"L3 {self.location} unavailable: circuit breaker open after "
                f"{self.breaker.consecutive_failures} consecutive failures "
                f"(last: {self._last_error}); next probe in "
                f"{self.breaker.retry_after():.1f}s"
            )
        # The probe after an open period is a single request.
        is_probe = self.breaker.state is BreakerState.HALF_OPEN
        retries = 0 if is_probe else self.retries if retries is None else retries
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        attempt = 0
        # (a prefetch takes a read slot too, within its own few)
        also = self._lanes["read"] if lane == "prefetch" else contextlib.nullcontext()
        while True:
            started = False
            started_at = 0.0
            try:
                if loop.time() >= deadline:
                    raise TimeoutError
                async with asyncio.timeout_at(deadline):
                    async with self._lanes[lane], also:
                        started = True
                        started_at = loop.time()
                        self.requests += 1
                        try:
                            result = await fn()
                        except _NOT_FOUND:
                            if not missing_ok:
                                raise
                            result = MISSING
            except asyncio.CancelledError:
                self.breaker.abandon()
                if op == "delete" and started:
                    # Its caller gave up (a Delete whose client's deadline
                    # passed): the request may be out all the same, and the
                    # store carry it out later, as one that timed out.
                    self._doubt(path, loop.time())
                raise
            except Exception as exc:
                if isinstance(exc, TimeoutError) and not started:
                    # Our own queue was full for the whole deadline: overload,
                    # not an outage; no verdict on the server.
                    self.breaker.abandon()
                    raise TierUnavailable(
                        f"L3 {op} {path!r} on {self.location}: no free request slot within "
                        f"{self.timeout_s}s ({self._concurrency[lane]} {lane}s in flight)"
                    ) from None
                self.failed_requests += 1
                self._last_error = _describe(exc)
                if isinstance(exc, _NOT_FOUND):
                    self._last_error += " (does the bucket exist?)"
                attempt += 1
                retryable = isinstance(exc, (TimeoutError, GenericError, JoinError, OSError))
                if isinstance(exc, (*_NOT_FOUND, PermissionDeniedError, UnauthenticatedError)):
                    retryable = False
                elif op == "delete" and started and not _settled_request(exc):
                    # The store may carry it out yet: not sent again until
                    # it has landed (the next write of the path waits, _settle).
                    self._doubt(path, loop.time())
                    retryable = False
                delay = random.uniform(
                    0, min(self._backoff_max_s, self._backoff_base_s * 2 ** (attempt - 1))
                )
                if (not retryable or attempt > retries or loop.time() + delay >= deadline
                        or self.breaker.state is BreakerState.OPEN):
                    # Out of retries or time, or other calls have opened the
                    # breaker meanwhile: this call fails. One that timed out
                    # with less than l3.timeout_s for its request (its slot
                    # came late: our own queue) says nothing of the server: a
                    # flood of local requests opened the breaker for everyone.
                    late = isinstance(exc, TimeoutError) and \
                        deadline - started_at < 0.9 * self.timeout_s
                    if judge and not late:
                        self.breaker.failure()
                    else:
                        self.breaker.abandon()
                    raise TierUnavailable(
                        f"L3 {op} {path!r} on {self.location} failed after {attempt} "
                        f"attempt(s): {self._last_error}"
                    ) from exc
                self.retried += 1
                await asyncio.sleep(delay)
                continue
            self.breaker.success()
            return result


def _open_store(
    url: str,
    *,
    endpoint: str,
    region: str,
    access_key_id: str,
    secret_access_key: str,
    timeout_s: float,
) -> tuple[Any, str]:
    """The obstore store for ``url`` and a printable location (no secrets)."""
    if obstore is None:  # (the configuration's validation says so first)
        raise obstore_missing(url)
    check_location(url, endpoint)
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        path = urllib.parse.unquote(parsed.path).rstrip("/") or "/"
        try:
            # Every namespace's blocks: a directory kvstore makes is 0700, as
            # L2's (obstore's would be 0777 less the umask, its files
            # readable by every user); one the operator made is left as it is.
            os.makedirs(path, mode=0o700, exist_ok=True)
            return LocalStore(prefix=path, mkdir=True), f"file://{path}"
        except Exception as exc:
            raise InvalidConfig(f"l3.url {url!r}: cannot use directory: {exc}") from None
    bucket = parsed.netloc
    prefix = parsed.path.strip("/")
    check_credentials(url, access_key_id, secret_access_key)
    config: dict[str, Any] = {"region": region or "us-east-1"}
    client: dict[str, Any] = {
        "timeout": timedelta(seconds=timeout_s),
        "connect_timeout": timedelta(seconds=min(timeout_s, 2.0)),
    }
    where = f"s3://{bucket}/{prefix}".rstrip("/")
    if endpoint:
        if urllib.parse.urlsplit(endpoint).scheme == "http":  # (loopback: checked above)
            client["allow_http"] = True
        config["endpoint"] = endpoint.rstrip("/")
        config["virtual_hosted_style_request"] = False
        where += f" at {endpoint.rstrip('/')}"
    if access_key_id:
        config["access_key_id"] = access_key_id
        config["secret_access_key"] = secret_access_key
    try:
        store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options=client,  # type: ignore[arg-type]
            # Retries, timeouts and backoff are ours (under the breaker).
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=timeout_s)},
        )
    except Exception as exc:
        raise InvalidConfig(f"l3: cannot configure {where}: {exc}") from None
    return store, where


if TYPE_CHECKING:  # mypy checks that the class plays its role
    _plays_role: type[ObjectStore] = ObjectTier
