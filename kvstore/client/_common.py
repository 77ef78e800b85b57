"""Argument checking and stream reassembly shared by the sync and async clients."""

from __future__ import annotations

import ctypes
import itertools
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from kvstore.client._convert import GetPiece, decode_get_chunk
from kvstore.client._errors import InvalidBuffer, ProtocolError
from kvstore.errors import BufferTooSmall, InvalidArgument, InvalidKey, InvalidNamespace
from kvstore.types import (  # DEFAULT_TARGET: kept here for the SDK's modules
    DEFAULT_TARGET as DEFAULT_TARGET,
)
from kvstore.types import (
    AckLevel,
    check_name,
    validate_key,
    validate_keys,
    validate_namespace,
)
from kvstore.wire.codec import WireError, encode_varint, iter_fields

if TYPE_CHECKING:
    from numpy.typing import NDArray

DEFAULT_PORT = 50051
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_MESSAGE_HEADROOM = 64 * 1024  # key, size, session id and tags around a Put chunk's data
_UINT32_MAX = 2**32 - 1

BlockBuffer = Any  # bytes or any object exporting the buffer protocol
#: A key as the SDK takes it (README: "A key is bytes (or a bytearray/memoryview)").
KeyLike = bytes | bytearray | memoryview
# (a Mapping is invariant in its key: a dict keyed by memoryview is not a
# Mapping[KeyLike, ...], so each key type is named)
Blocks = (Mapping[bytes, BlockBuffer] | Mapping[bytearray, BlockBuffer]
          | Mapping[memoryview, BlockBuffer] | Mapping[KeyLike, BlockBuffer]
          | Iterable[tuple[KeyLike, BlockBuffer]])
#: get_into's destinations: a list of writable buffers, or a 2-D array (its rows).
#: (A string: numpy's types are named for type checkers only.)
BlockBuffers: TypeAlias = "Sequence[Any] | NDArray[Any]"


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a Put stored: the number of blocks and their payload bytes."""

    stored: int
    bytes: int


# --------------------------------------------------------------------------- target

_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.%\w]+\]|[^:\[\]/\s]+):(\d{1,5})$")


def parse_target(target: str) -> str:
    """Normalise a server address to a gRPC target string.

    Accepted: ``host:port``, ``[v6]:port``, ``host`` (port 50051),
    ``unix:/path``, ``unix:///abs/path``, ``unix:relative``, a bare absolute
    path (taken as a unix socket) and any other ``scheme:`` target gRPC knows
    (``dns:``, ``ipv4:``, ``unix-abstract:``), passed through.
    """
    if not isinstance(target, str):
        raise InvalidArgument(f"target must be a string, not {type(target).__name__}")
    t = target.strip()
    if not t:
        raise InvalidArgument("target is empty: use host:port or unix:/path")
    if t.startswith("/"):
        return "unix:" + t
    if t.startswith("unix:"):
        path = t[len("unix:") :]
        if path.startswith("//") and not path.startswith("///"):
            raise InvalidArgument(
                f"target {target!r}: a unix socket path is unix:/abs/path or unix:///abs/path"
            )
        if not path.strip("/"):
            raise InvalidArgument(f"target {target!r} names no socket path")
        return t
    m = _HOST_PORT_RE.match(t)
    if m:
        port = int(m.group(2))
        if not 0 < port < 65536:
            raise InvalidArgument(f"target {target!r}: port {port} is out of range")
        return t
    scheme, sep, rest = t.partition(":")
    if sep and re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) and (rest.startswith("/") or
                                                                 scheme in _SCHEMES):
        return t
    if ":" not in t and "/" not in t and " " not in t:
        return f"{t}:{DEFAULT_PORT}"
    raise InvalidArgument(f"target {target!r} is not host:port or unix:/path")


_SCHEMES = {"dns", "ipv4", "ipv6", "unix-abstract", "vsock", "xds"}


def channel_options(chunk_bytes: int, extra: Any) -> list[tuple[str, Any]]:
    size = max(MAX_MESSAGE_BYTES, chunk_bytes + _MESSAGE_HEADROOM)
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": size,
        "grpc.max_receive_message_length": size,
        # No keepalive pings: calls are short and the server may be local.
        "grpc.keepalive_time_ms": 2**31 - 1,
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.enable_retries": 0,
        # Back within a second of a server's restart: gRPC's default reconnect
        # backoff grows to 120 s, and its process-wide subchannel pool made even
        # a new Client wait out the old one's backoff.
        "grpc.use_local_subchannel_pool": 1,
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 1000,
        # Despite its name, gRPC core takes this as the time a connection
        # attempt has to finish its handshake (its minimum connect timeout),
        # not as a floor under the backoff: set to 100 ms with the backoff, it
        # abandoned every attempt whose SETTINGS frame came later than the
        # backoff (a loaded host, a long link), and calls failed for as long.
        # gRPC's own 20 s; a refused connect still fails at once.
        "grpc.min_reconnect_backoff_ms": 20_000,
    }
    if extra:
        items = extra.items() if isinstance(extra, Mapping) else extra
        for k, v in items:
            opts[k] = v
    return list(opts.items())


#: grpc.experimental.ChannelOptions.SingleThreadedUnaryStream: the sync
#: channel reads a unary-stream call on the caller's thread instead of starting
#: a thread per call.
SINGLE_THREADED_UNARY_STREAM = "SingleThreadedUnaryStream"


def max_response_bytes(options: Sequence[tuple[str, Any]]) -> int:
    """The largest GetSmall response a channel with ``options`` accepts,
    less room for the framing around the blocks."""
    limit = dict(options).get("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)
    if not isinstance(limit, int) or limit < 0:  # -1: unlimited
        limit = MAX_MESSAGE_BYTES
    return max(0, limit - _MESSAGE_HEADROOM)


#: A Get expected to move more than this goes by a stream: measured on the
#: development machine (same-run A/B, 1 client over TCP), GetSmall and a
#: stream read on the calling thread beat grpc's thread-per-stream up to
#: 1 MiB (p50 0.73 vs 0.89 ms at 256 KiB, 1.31 vs 1.59 ms at 1 MiB), and lose
#: at 4 MiB (6.2 vs 4.9 ms), where that thread receives while the caller copies.
SMALL_GET_BYTES = 2 * 1024 * 1024
#: The unary Get (per-call cost), beside kvstore.v1.KVStore/Get.
GET_SMALL = "/kvstore.v1.KVStore/GetSmall"
_MAX_RESPONSE_TAG = b"\x28"  # GetRequest.max_response_bytes: 5, varint


def small_request_suffix(limit: int) -> bytes:
    """Appended to a serialized GetRequest (protobuf merges concatenated
    messages): its max_response_bytes field, for GetSmall."""
    return _MAX_RESPONSE_TAG + encode_varint(limit)


#: gRPC metadata: (key, value) pairs; keys are lowercase ASCII, values str
#: (or bytes for keys ending in ``-bin``).
MetadataPairs = tuple[tuple[str, str | bytes], ...]
Metadata = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]
#: A client's ``metadata=``: fixed pairs, or a function called at every call
#: for the pairs that call sends (values that change from call to call).
MetadataOption = Metadata | Callable[[], Metadata | None] | None


def metadata_pairs(metadata: Metadata | None) -> MetadataPairs | None:
    if metadata is None:
        return None
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    try:
        pairs = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise InvalidArgument("metadata must be a mapping or (key, value) pairs") from None
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, (str, bytes)):
            raise InvalidArgument(f"metadata ({key!r}, {value!r}): keys are str, values str "
                                  "or bytes")
    return pairs or None


def metadata_source(metadata: MetadataOption) -> Callable[[], MetadataPairs | None]:
    """What each call sends: the pairs checked once, or the function's result."""
    if callable(metadata):
        produce = metadata
        return lambda: metadata_pairs(produce())
    pairs = metadata_pairs(metadata)
    return lambda: pairs


def check_chunk_bytes(chunk_bytes: int) -> int:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise InvalidArgument(f"chunk_bytes must be a positive integer, not {chunk_bytes!r}")
    return chunk_bytes


# --------------------------------------------------------------------------- arguments


def resolve_namespace(namespace: str | None, default: str | None) -> str:
    ns = namespace if namespace is not None else default
    if ns is None or ns == "":
        raise InvalidNamespace(
            "namespace is required: pass namespace= to the call or to the client"
        )
    if not isinstance(ns, str):
        raise InvalidNamespace(f"namespace must be a str, not {type(ns).__name__}")
    return validate_namespace(ns)


_ACK_NAMES = {"memory": AckLevel.MEMORY, "local": AckLevel.LOCAL, "remote": AckLevel.REMOTE}


def parse_ack(ack: str | AckLevel | int) -> AckLevel:
    if isinstance(ack, AckLevel):
        return ack
    if isinstance(ack, str):
        level = _ACK_NAMES.get(ack.strip().lower())
        if level is not None:
            return level
    elif isinstance(ack, int) and not isinstance(ack, bool) and ack in (1, 2, 3):
        return AckLevel(ack)
    raise InvalidArgument(f"ack {ack!r} is not one of memory, local, remote")


def check_session_id(session_id: str | None) -> str:
    if session_id is None:
        return ""
    if not isinstance(session_id, str):
        raise InvalidArgument(f"session_id must be a str, not {type(session_id).__name__}")
    return check_name(session_id, "session_id")


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def normalize_key(key: Any, index: int) -> bytes:
    if isinstance(key, bytes):
        return validate_key(key, index)
    if isinstance(key, (bytearray, memoryview)):
        return validate_key(bytes(key), index)
    raise InvalidKey(
        f"key #{index} is {_a(type(key).__name__)}: keys are bytes"
        + (" (encode the str)" if isinstance(key, str) else "")
    )


def normalize_keys(keys: Iterable[Any]) -> list[bytes]:
    return normalize_keys_with_lengths(keys)[0]


def key_list(keys: Iterable[Any]) -> list[Any]:
    """``keys`` as a list (not validated); a single key is refused here, before
    ``list()`` would turn its bytes into ints or its str into characters."""
    if isinstance(keys, (bytes, bytearray, memoryview, str)):
        raise InvalidArgument("keys must be a sequence of keys, not a single key")
    if isinstance(keys, list):
        return keys
    dtype = getattr(keys, "dtype", None)
    if getattr(dtype, "kind", None) == "S":
        # Its items come out without their trailing zero bytes (numpy's fixed
        # width): a 32-byte hash key ending in 0x00 became another key.
        raise InvalidArgument(f"keys is a numpy array of dtype {dtype}, whose items "
                              "lose their trailing zero bytes: pass a list of bytes")
    try:
        return list(keys)
    except TypeError:
        if hasattr(keys, "__iter__"):
            raise  # (an iterator of the caller's that failed: its own error)
        raise InvalidArgument(f"keys must be a sequence of bytes keys, not "
                              f"{type(keys).__name__}") from None


def normalize_keys_with_lengths(keys: Iterable[Any]) -> tuple[list[bytes], set[int] | None]:
    """The keys as a list of bytes, validated, and the set of their lengths
    when it came for free (None otherwise)."""
    ks = key_list(keys)
    if set(map(type, ks)) <= {bytes}:
        return ks, validate_keys(ks)  # the common case, checked in one pass
    return [normalize_key(k, i) for i, k in enumerate(ks)], None


def block_view(buf: Any, index: int, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte view of ``buf`` (no copy)."""
    what = "buffer" if writable else "block"
    if getattr(getattr(buf, "dtype", None), "hasobject", False):
        # Its bytes are pointers to Python objects: put stored addresses, and
        # get_into wrote a block over them (the next read of the array
        # crashed the process).
        raise InvalidBuffer(f"{what} #{index} is an array of Python objects (dtype "
                            f"{buf.dtype}): its bytes are pointers, not data")
    try:
        view = memoryview(buf)
    except TypeError:
        raise InvalidBuffer(
            f"{what} #{index} is a {type(buf).__name__}, which does not support the buffer "
            "protocol (use bytes, bytearray, memoryview or a numpy array)"
        ) from None
    except ValueError:
        # A numpy dtype the buffer protocol has no format for (ml_dtypes'
        # bfloat16 and float8 types, datetime64): "cannot include dtype 'E'
        # in a buffer". Its bytes, through a uint8 view of the same memory.
        view = _numpy_bytes(buf, what, index)
    if view.format.lstrip("@=<>!") == "O":  # (another exporter's object pointers)
        raise InvalidBuffer(f"{what} #{index} holds Python object pointers, not data")
    if writable and view.readonly:
        raise InvalidBuffer(f"buffer #{index} is read-only")
    if not view.c_contiguous:
        raise InvalidBuffer(
            f"{what} #{index} is not C-contiguous (shape {view.shape}, strides {view.strides}); "
            "copy it first, e.g. numpy.ascontiguousarray"
        )
    if view.ndim == 1 and view.format == "B":
        return view
    return view.cast("B")


def _numpy_bytes(buf: Any, what: str, index: int) -> memoryview:
    """A numpy array's bytes when ``memoryview(buf)`` refused its dtype."""
    flags = getattr(buf, "flags", None)
    if flags is None or not hasattr(buf, "reshape") or not hasattr(buf, "view"):
        raise InvalidBuffer(f"{what} #{index} ({type(buf).__name__}) refused to export its "
                            "buffer") from None
    if not flags.c_contiguous:
        raise InvalidBuffer(
            f"{what} #{index} is not C-contiguous (shape {buf.shape}, strides {buf.strides}); "
            "copy it first, e.g. numpy.ascontiguousarray")
    # (reshape of a C-contiguous array is a view, never a copy: get_into's
    # bytes land in the caller's array)
    return memoryview(buf.reshape(-1).view("u1"))


def normalize_blocks(blocks: Blocks) -> list[tuple[bytes, memoryview]]:
    if isinstance(blocks, Mapping):
        items: Iterable[Any] = blocks.items()
    elif isinstance(blocks, (bytes, bytearray, memoryview, str)):
        raise InvalidArgument("blocks must map keys to buffers, or be (key, buffer) pairs")
    else:
        items = blocks
    out: list[tuple[bytes, memoryview]] = []
    for i, item in enumerate(items):
        try:
            key, buf = item
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"block #{i} is not a (key, buffer) pair: pass a mapping or pairs"
            ) from None
        k = normalize_key(key, i)
        view = block_view(buf, i)
        if not len(view):
            raise InvalidArgument(f"block #{i} is empty: blocks hold at least one byte")
        out.append((k, view))
    return out


def normalize_buffers(buffers: BlockBuffers, count: int) -> list[memoryview]:
    if isinstance(buffers, (bytes, bytearray, memoryview)):
        # One buffer where a sequence of them goes: iterated, its items were
        # ints ("buffer #0 is a int"). (A 2-D numpy array is a sequence of rows.)
        raise InvalidArgument("buffers must be a sequence of buffers, one per key, not a "
                              f"single {type(buffers).__name__}: pass [buffer]")
    views = [block_view(b, i, writable=True) for i, b in enumerate(buffers)]
    if len(views) != count:
        raise InvalidArgument(f"get_into got {count} keys but {len(views)} buffers")
    if len(views) > 1:
        check_disjoint(views)
    return views


def check_disjoint(views: Sequence[memoryview]) -> None:
    """InvalidArgument if two of ``views`` (writable, C-contiguous bytes) share
    memory: each block is copied into its own buffer, so the later block would
    overwrite part of the earlier one, whose size get_into still returned."""
    spans = sorted((ctypes.addressof(ctypes.c_char.from_buffer(v)), len(v), i)
                   for i, v in enumerate(views) if len(v))
    for (start, size, i), (nxt, _, j) in itertools.pairwise(spans):
        if nxt < start + size:
            first, second = sorted((i, j))
            raise InvalidArgument(
                f"buffers #{first} and #{second} overlap (the same memory): each key needs "
                "a buffer of its own")


def check_integer(value: int, what: str) -> int:
    """``value`` as an int: an int, or a numpy integer (which worked where
    the protobuf messages took it before the SDK checked); not a bool,
    float or str."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise InvalidArgument(f"{what} must be an integer, not {type(value).__name__}")


def check_lease_ms(lease_ms: int) -> int:
    lease_ms = check_integer(lease_ms, "lease_ms")
    if not 0 <= lease_ms <= _UINT32_MAX:
        raise InvalidArgument(f"lease_ms {lease_ms} is out of range 0..{_UINT32_MAX}")
    return lease_ms


# --------------------------------------------------------------------------- Get stream


class GetAssembler:
    """Checks a Get stream against the contract and puts blocks back together.

    Without ``buffers``, each hit becomes a ``bytes`` (one copy: a single chunk
    is sliced out of its message, several are joined once). With ``buffers``,
    each hit is copied into its caller-owned buffer and its size is recorded.
    """

    __slots__ = ("_buffers", "_count", "_cur", "_filled", "_keys_done", "_next", "_parts",
                 "_size", "results")

    def __init__(self, count: int, buffers: list[memoryview] | None = None) -> None:
        self._count = count
        self._buffers = buffers
        self.results: list[Any] = [None] * count
        self._next = 0  # lowest index not yet answered
        self._cur = -1  # index of the block being filled, -1 when none
        self._size = 0
        self._filled = 0
        self._parts: list[memoryview] = []
        self._keys_done = 0

    def feed(self, piece: GetPiece) -> None:
        if self._cur < 0:
            self._start(piece)
        else:
            if piece.key_index != self._cur:
                raise ProtocolError(
                    f"Get stream switched to key #{piece.key_index} before key #{self._cur} "
                    f"was complete ({self._filled} of {self._size} bytes)"
                )
            if piece.offset != self._filled:
                raise ProtocolError(
                    f"Get chunk for key #{self._cur} starts at offset {piece.offset}, "
                    f"expected {self._filled}"
                )
        self._add(piece.data)

    def _start(self, piece: GetPiece) -> None:
        i = piece.key_index
        if i != self._next or i >= self._count:
            raise ProtocolError(
                f"Get stream answered key #{i} where key #{self._next} was due "
                f"({self._count} keys requested)"
            )
        self._next = i + 1
        if not piece.hit:
            self.results[i] = None
            return
        if piece.offset != 0:
            raise ProtocolError(f"Get chunk for key #{i} starts at offset {piece.offset}, not 0")
        size = piece.block_size
        if size <= 0:
            raise ProtocolError(f"Get hit for key #{i} has block_size {size}")
        if self._buffers is not None:
            have = len(self._buffers[i])
            if size > have:
                raise BufferTooSmall(
                    f"buffer #{i} is {have} bytes but key #{i} holds a block of {size} bytes"
                )
        self._cur = i
        self._size = size
        self._filled = 0

    def _add(self, data: memoryview) -> None:
        if self._cur < 0:
            if len(data):
                raise ProtocolError("Get miss chunk carries data")
            return
        n = len(data)
        end = self._filled + n
        if end > self._size:
            raise ProtocolError(
                f"Get stream sent {end} bytes for key #{self._cur}, whose block is "
                f"{self._size} bytes"
            )
        if self._buffers is not None:
            self._buffers[self._cur][self._filled : end] = data
        elif n:
            self._parts.append(data)
        self._filled = end
        if end == self._size:
            self._finish()

    def _finish(self) -> None:
        i = self._cur
        if self._buffers is not None:
            self.results[i] = self._size
        else:
            parts = self._parts
            self.results[i] = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
            self._parts = []
        self._cur = -1

    @property
    def count(self) -> int:
        return self._count

    @property
    def pending(self) -> bool:
        """A block is partly received."""
        return self._cur >= 0

    def done(self) -> list[Any]:
        if self._cur >= 0:
            raise ProtocolError(
                f"Get stream ended inside key #{self._cur} ({self._filled} of {self._size} bytes)"
            )
        if self._next != self._count:
            raise ProtocolError(
                f"Get stream ended after {self._next} of {self._count} keys"
            )
        return self.results


def feed_small_response(asm: GetAssembler, raw: bytes) -> int:
    """Feed a GetSmallResponse's chunks to ``asm``; returns how many leading
    keys it answered (the caller gets the rest with a Get stream)."""
    answered = chunks = 0
    try:
        for number, value in iter_fields(raw, "GetSmallResponse"):
            if number == 1 and isinstance(value, memoryview):
                asm.feed(decode_get_chunk(value))  # type: ignore[arg-type]
                chunks += 1
            elif number == 2 and isinstance(value, int):
                answered = value
    except WireError as exc:
        raise ProtocolError(f"malformed GetSmall response: {exc}") from None
    if answered != chunks or answered > asm.count:
        raise ProtocolError(f"GetSmall response answers {answered} keys with {chunks} chunks "
                            f"({asm.count} keys requested)")
    if asm.pending:
        raise ProtocolError("GetSmall response ends inside a block")
    return answered
