"""The engine adapters' connection to kvstore: batched, failure-tolerant, copy-lean.

An engine calls its storage backend from its own threads and treats every
answer as a hint: a miss costs a recompute, an exception can kill a scheduler.
So :class:`StoreLink` never raises into the engine. While the server cannot be
reached every call answers at once with misses (or "not stored"), and the link
tries to connect again at most every ``retry_s`` seconds; after a restart the
first calls miss and the next ones hit again.

Each batch is one RPC of its kind: ``lookup`` is one Lookup, ``put`` one Put
(or one ShmReserve + pipelined ShmCommits), ``get`` one Get (or one
ShmAcquire + ShmRelease). On the same host (a ``unix:`` target whose server
has a shared-memory arena) the bytes are copied once, between the engine's own
buffers and the arena, with the CRC-32C computed in the same pass; otherwise
the gRPC client streams them.

A block is handed over as *pieces*: the byte views of the engine memory that
make up one block, in order (a page of a layer-first SGLang pool is 2 x layers
pieces). Pieces are copied straight into and out of the block's slot; nothing
joins them first on the shared-memory path.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvstore.block import copy_and_checksum
from kvstore.client import Client
from kvstore.client.shm import ShmClient
from kvstore.errors import (
    BufferTooSmall,
    Cancelled,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidArgument,
    KVStoreError,
    ProtocolError,
    ServerShuttingDown,
    StaleLease,
)
from kvstore.types import MAX_KEYS_PER_REQUEST, MAX_NAMESPACE_CHARS

log = logging.getLogger("kvstore.integrations")

Pieces = Sequence[memoryview]
# (Each client's channel has its own subchannel and reconnects within a second:
# the SDK's channel options, kvstore.client._common.channel_options.)
_T = TypeVar("_T")

#: Errors that say the connection (or the server behind it) is gone or not
#: answering: the link drops the client and tries again after ``retry_s``.
#: Any other KVStoreError is the server refusing one request (a tier it does
#: not have, a namespace it does not serve, no room now): that call is a miss
#: or "not stored", and the connection stays (a refused Put dropped it, and
#: every read missed for ``retry_s``).
_CONNECTION_ERRORS = (ConnectionFailed, DeadlineExceeded, Cancelled, ProtocolError,
                      ServerShuttingDown)
_SHM_MODES = ("auto", "on", "off")
_ACKS = ("memory", "local", "remote")


def bounded_namespace(head: str, tail: str) -> str:
    """``head + tail`` when it fits a namespace (128 characters); else the
    head cut short with a digest of the whole name, and ``tail`` kept: the
    tail names the worker (rank, world size, dtype), and cutting the name at
    128 characters dropped it for a long model path, so every worker read
    the others' blocks."""
    name = head + tail
    if len(name) <= MAX_NAMESPACE_CHARS:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    keep = MAX_NAMESPACE_CHARS - len(tail) - len(digest) - 1
    if keep < 1:
        raise ValueError(f"namespace tail {tail!r} leaves no room for the model's name")
    return f"{head[:keep]}.{digest}{tail}"


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Where the server is and how to reach it.

    ``target``: ``unix:/path`` (same host) or ``host:port``. ``shm``: ``auto``
    uses the shared-memory arena when the target is a unix socket and the
    server has one; ``on`` requires it; ``off`` never uses it. ``timeout``:
    each call's deadline (s). ``retry_s``: how long the link waits after a
    failure before it tries to connect again. ``ack``: the Put ack level.
    """

    target: str = "127.0.0.1:50051"
    namespace: str = "default"
    shm: str = "auto"
    timeout: float = 10.0
    retry_s: float = 1.0
    ack: str = "memory"

    def __post_init__(self) -> None:
        # Refused when the engine starts: a typo here made every Put fail
        # quietly (a bad ack), or shared memory silently off (YAML reads an
        # unquoted ``on`` as true).
        if self.shm not in _SHM_MODES:
            raise ValueError(f"kvstore shm must be one of {', '.join(_SHM_MODES)}, not "
                             f"{self.shm!r}")
        if self.ack not in _ACKS:
            raise ValueError(f"kvstore ack must be one of {', '.join(_ACKS)}, not {self.ack!r}")
        if not self.timeout > 0 or not self.retry_s >= 0:
            raise ValueError(f"kvstore timeout must be > 0 and retry_s >= 0, not "
                             f"{self.timeout!r} and {self.retry_s!r}")

    @classmethod
    def from_mapping(cls, values: Any, *, prefix: str = "", namespace: str) -> LinkConfig:
        """Read ``target``, ``shm``, ``timeout``, ``retry_s``, ``ack`` (each
        under ``prefix``) from an engine's config mapping."""
        def pick(name: str, default: Any) -> Any:
            value = values.get(prefix + name) if values else None
            return default if value is None else value

        base = cls()
        shm = pick("shm", base.shm)
        if isinstance(shm, bool):  # YAML 1.1: an unquoted on / off is a bool
            shm = "on" if shm else "off"
        return cls(target=str(pick("target", base.target)), namespace=namespace,
                   shm=str(shm).lower(),
                   timeout=float(pick("timeout", base.timeout)),
                   retry_s=float(pick("retry_s", base.retry_s)),
                   ack=str(pick("ack", base.ack)))


class StoreLink:
    """One engine worker's connection to kvstore (thread-safe)."""

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._retry_at = 0.0
        self._warned = False
        self._refusals: set[str] = set()  # the kinds of refusal already logged
        #: Calls that failed (answered as misses) since the link was made, and the last error.
        self.failures = 0
        self.last_error: BaseException | None = None

    # -- connection --------------------------------------------------------------------

    @property
    def same_host(self) -> bool:
        """Whether the current connection moves bytes through shared memory."""
        return isinstance(self._client, ShmClient)

    def client(self) -> Client | None:
        """The connected client, connecting if it is time to try; None while
        the server cannot be reached."""
        client = self._client
        if client is not None:
            return client
        if time.monotonic() < self._retry_at:
            return None
        # One thread connects; the others answer misses meanwhile instead of
        # waiting for it (a connect to a server that does not answer takes
        # the timeout, and held every engine thread that long).
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._retry_at:
                return None
            try:
                self._client = self._connect()
            except Exception as exc:  # any failure to connect is a miss, not an engine error
                self._note_failure(exc)
                return None
            if self._warned:
                log.warning("kvstore at %s reachable again", self.config.target)
                self._warned = False
            return self._client
        finally:
            self._lock.release()

    def _connect(self) -> Client:
        cfg = self.config
        use_shm = cfg.shm == "on" or (cfg.shm == "auto" and cfg.target.startswith("unix:"))
        if use_shm:
            try:
                return ShmClient(cfg.target, namespace=cfg.namespace, timeout=cfg.timeout)
            except KVStoreError as exc:
                # A server without an arena says so (FAILED_PRECONDITION / UNIMPLEMENTED);
                # an unreachable one, or one that does not answer, is a failure
                # either way (it went on to a gRPC client, and waited the
                # timeout twice).
                if cfg.shm == "on" or isinstance(exc, _CONNECTION_ERRORS) or \
                        exc.code == "UNAVAILABLE":
                    raise
        client = Client(cfg.target, namespace=cfg.namespace, timeout=cfg.timeout)
        client.stats()  # fail now, not in the middle of the first batch
        return client

    def _note_failure(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = exc
        self._retry_at = time.monotonic() + self.config.retry_s
        if not self._warned:
            log.warning("kvstore at %s unavailable (%s: %s); answering misses, retrying every "
                        "%.1f s", self.config.target, type(exc).__name__, exc,
                        self.config.retry_s)
            self._warned = True

    def _refused(self, exc: KVStoreError) -> None:
        self.failures += 1
        self.last_error = exc
        kind = type(exc).__name__
        if kind not in self._refusals:
            self._refusals.add(kind)
            log.warning("kvstore at %s refused a request (%s: %s); such requests are answered "
                        "as misses", self.config.target, kind, exc)

    def _drop(self, client: Client, exc: BaseException) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
            self._note_failure(exc)
        try:
            client.close()
        except Exception:
            pass

    def _call(self, fallback: _T, fn: Callable[[Client], _T]) -> _T:
        client = self.client()
        if client is None:
            return fallback
        try:
            return fn(client)
        except StaleLease as exc:
            # A copy that changed while it was read: a miss, the connection is fine.
            log.debug("kvstore call answered as a miss: %s", exc)
            return fallback
        except InvalidArgument as exc:
            if type(exc) in (InvalidArgument, BufferTooSmall):
                # A block larger than the engine's buffer (or buffers that
                # overlap): a miss, the connection is fine.
                log.debug("kvstore call answered as a miss: %s", exc)
            else:
                # The server refused the request itself (a chunk over its
                # max_block_bytes, a key or namespace it does not accept): the
                # connection is fine, but nothing is ever stored until the
                # deployment changes, so it is counted and said, once per kind.
                self._refused(exc)
            return fallback
        except KVStoreError as exc:
            if isinstance(exc, _CONNECTION_ERRORS):
                self._drop(client, exc)
            else:
                self._refused(exc)  # the server refused this request; the connection is fine
            return fallback
        except Exception as exc:  # the engine must never see a kvstore failure
            self._drop(client, exc)
            return fallback

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- batched calls -----------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes], session_id: str | None = None) -> int:
        """How many leading keys are stored (one Lookup a 65,536 keys)."""
        total = 0
        for part in _parts(keys):
            def found(c: Client, ks: list[bytes] = part) -> int:
                return c.lookup(ks, session_id=session_id).found

            n = self._call(0, found)
            total += n
            if n < len(part):
                break
        return total

    def exists(self, keys: Sequence[bytes], session_id: str | None = None) -> list[bool]:
        """Which keys are stored (one Lookup a 65,536 keys)."""
        stored: list[bool] = []
        for part in _parts(keys):
            def which(c: Client, ks: list[bytes] = part) -> list[bool]:
                return [t is not None for t in c.lookup(ks, session_id=session_id).tiers]

            stored += self._call([False] * len(part), which)
        return stored

    def put(self, keys: Sequence[bytes], blocks: Sequence[Pieces],
            session_id: str | None = None) -> bool:
        """Store one block per key, each given as its pieces (one Put; more past
        the 65,536 blocks one shared-memory reservation may name)."""
        if len(keys) != len(blocks):
            raise ValueError(f"{len(keys)} keys but {len(blocks)} blocks")
        if not keys:
            return True
        step = MAX_KEYS_PER_REQUEST
        for i in range(0, len(keys), step):
            part_keys, part_blocks = keys[i:i + step], blocks[i:i + step]

            def put_part(c: Client, ks: Sequence[bytes] = part_keys,
                         bs: Sequence[Pieces] = part_blocks) -> bool:
                return self._put(c, ks, bs, session_id)

            if not self._call(False, put_part):
                return False
        return True

    def _put(self, client: Client, keys: Sequence[bytes], blocks: Sequence[Pieces],
             session_id: str | None) -> bool:
        ack = self.config.ack
        if isinstance(client, ShmClient):
            if all(len(p) == 1 for p in blocks):
                # ShmClient.put copies and checksums in one pass, commits pipelined.
                client.put(list(zip(keys, (p[0] for p in blocks), strict=True)), ack=ack,
                           session_id=session_id)
                return True
            slots = client.reserve([(k, sum(len(v) for v in p)) for k, p in zip(
                keys, blocks, strict=True)], session_id=session_id)
            try:
                crcs = []
                for slot, pieces in zip(slots, blocks, strict=True):
                    crc = offset = 0
                    for piece in pieces:
                        crc = copy_and_checksum(slot.view, offset, piece, crc)
                        offset += len(piece)
                    crcs.append(crc)
            except BaseException:
                client.commit([], [], abandon=slots)
                raise
            client.commit(slots, crcs, ack=ack)
            return True
        joined = [p[0] if len(p) == 1 else b"".join(p) for p in blocks]
        client.put(list(zip(keys, joined, strict=True)), ack=ack, session_id=session_id)
        return True

    def get(self, keys: Sequence[bytes], blocks: Sequence[Pieces],
            session_id: str | None = None) -> list[int | None]:
        """Fill each key's pieces with its block (one Get). Returns each
        block's size (None: a miss, or a block larger than its pieces); a
        block smaller than its pieces fills their leading bytes."""
        if len(keys) != len(blocks):
            raise ValueError(f"{len(keys)} keys but {len(blocks)} blocks")
        sizes: list[int | None] = []
        step = MAX_KEYS_PER_REQUEST
        for i in range(0, len(keys), step):
            def part(c: Client, ks: Sequence[bytes] = keys[i:i + step],
                     bs: Sequence[Pieces] = blocks[i:i + step]) -> list[int | None]:
                return self._get(c, ks, bs, session_id)

            sizes += self._call([None] * len(keys[i:i + step]), part)
        return sizes

    def _get(self, client: Client, keys: Sequence[bytes], blocks: Sequence[Pieces],
             session_id: str | None) -> list[int | None]:
        if all(len(p) == 1 for p in blocks) and session_id is None:
            try:
                return client.get_into(list(keys), [p[0] for p in blocks])
            except BufferTooSmall:
                # A block larger than its buffer fails the whole get_into: block
                # by block below, the others still count (an outside review:
                # one oversized chunk made a batch of LMCache's all misses).
                pass
        if isinstance(client, ShmClient):
            out: list[int | None] = []
            with client.leased(list(keys), session_id=session_id) as leases:
                for lease, pieces in zip(leases, blocks, strict=True):
                    out.append(None if lease is None else _scatter(lease.view, lease.crc32c,
                                                                   pieces))
            return out
        found = client.get(list(keys), session_id=session_id)
        return [None if data is None else _scatter(memoryview(data), None, pieces)
                for data, pieces in zip(found, blocks, strict=True)]

    # -- session hints ------------------------------------------------------------------

    def turn_end(self, session_id: str, reason: str, expected_gap_ms: int = 0,
                 tool_name: str = "") -> bool:
        def send(c: Client) -> bool:
            c.turn_end(session_id, reason, expected_gap_ms, tool_name)
            return True
        return self._call(False, send)

    def session_end(self, session_id: str) -> bool:
        def send(c: Client) -> bool:
            c.session_end(session_id)
            return True
        return self._call(False, send)

    def prefetch(self, session_id: str, keys: Sequence[bytes] = ()) -> bool:
        def send(c: Client) -> bool:
            c.prefetch(session_id, list(keys))
            return True
        return self._call(False, send)


def _scatter(src: memoryview, crc32c: int | None, pieces: Pieces) -> int | None:
    """Copy one stored block into its pieces; None if it does not fit or its
    copy fails the checksum the lease carries."""
    room = sum(len(p) for p in pieces)
    if len(src) > room:
        return None
    crc = offset = 0
    for piece in pieces:
        n = min(len(piece), len(src) - offset)
        if n <= 0:
            break
        crc = copy_and_checksum(piece[:n], 0, src[offset:offset + n], crc)
        offset += n
    if crc32c is not None and crc != crc32c:
        return None
    return len(src)


__all__ = ["LinkConfig", "Pieces", "StoreLink"]


def _parts(keys: Sequence[bytes]) -> list[list[bytes]]:
    """``keys`` in requests of at most 65,536 (what one request may name)."""
    return [list(keys[i:i + MAX_KEYS_PER_REQUEST])
            for i in range(0, len(keys), MAX_KEYS_PER_REQUEST)]
